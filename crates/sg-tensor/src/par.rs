//! Parallel loops over the one rayon pool.
//!
//! There is one pool: the global one, or whichever pool the caller `install`s. Kernels never start
//! threads of their own and call `matrixmultiply` single-threaded, so threads never oversubscribe;
//! the tile products inside attention's per-head tasks run serially. Where a split changes the order
//! of a sum (partial sums per chunk), chunk boundaries depend on the problem size alone; splits by
//! thread count only divide outputs that one task each sums in full (GEMM blocks of C, column sums).
//! So reductions give the same bits whatever `--threads` is.

use crate::error::{Result, TensorError};

/// Threads the kernels use.
pub fn threads() -> usize {
    #[cfg(feature = "rayon")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "rayon"))]
    {
        1
    }
}

/// Sizes the global pool. Must be called before the first parallel kernel; later calls with the same
/// count succeed, a different count is an error (the pool cannot be rebuilt).
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(TensorError::Arg { op: "set_threads", msg: "thread count must be at least 1".into() });
    }
    #[cfg(feature = "rayon")]
    {
        match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            Ok(()) => Ok(()),
            Err(_) if rayon::current_num_threads() == n => Ok(()),
            Err(_) => Err(TensorError::Arg {
                op: "set_threads",
                msg: format!(
                    "the thread pool already runs {} threads and cannot be resized to {n}",
                    rayon::current_num_threads()
                ),
            }),
        }
    }
    #[cfg(not(feature = "rayon"))]
    {
        if n == 1 {
            Ok(())
        } else {
            Err(TensorError::Arg {
                op: "set_threads",
                msg: "built without the `rayon` feature: one thread only".into(),
            })
        }
    }
}

/// Runs `f` on a thread of the pool and returns its result (inline where `f` already runs on a
/// pool thread, or without the `rayon` feature); what `ThreadPool::install` does for a pool of the
/// caller's own. Run a whole forward pass this way: each parallel kernel then starts from a pool
/// thread, which wakes at most the other threads, instead of from an outside thread that wakes a
/// worker, sleeps until the work is done and is woken again, and that competes with the workers for
/// the cores. On two cores the base classifier (about 200 parallel kernels a forward) won 11 of
/// 16 alternating pairs at batch 1 (first 11: medians 2.60 -> 2.76 samples/s, and a tighter
/// spread) and 5 of 6 at batch 8 (3.31 -> 3.47).
/// `f` must not wait for other work that needs the pool: with one thread nothing could run it.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "rayon")]
    {
        rayon::scope(|_| f())
    }
    #[cfg(not(feature = "rayon"))]
    {
        f()
    }
}

/// `f()` on every thread of the pool at once (once, without rayon): a benchmark's measure of what
/// all the cores do together.
pub fn on_every_thread<R: Send>(f: impl Fn() -> R + Sync) -> Vec<R> {
    #[cfg(feature = "rayon")]
    {
        rayon::broadcast(|_| f())
    }
    #[cfg(not(feature = "rayon"))]
    {
        vec![f()]
    }
}

/// True where the pool has more than one thread. A split made inside a parallel task stays in the
/// same pool (rayon queues it), so nesting never adds threads.
pub(crate) fn can_split() -> bool {
    #[cfg(feature = "rayon")]
    {
        rayon::current_num_threads() > 1
    }
    #[cfg(not(feature = "rayon"))]
    {
        false
    }
}

/// `f(i)` for every `i < n`, in parallel when `parallel` is true.
pub(crate) fn for_each(n: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    #[cfg(feature = "rayon")]
    if parallel && n > 1 {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(f);
        return;
    }
    let _ = parallel;
    (0..n).for_each(f);
}

/// `f(chunk_index, chunk)` over `chunk`-sized pieces of `data`, in parallel when `parallel` is true.
pub(crate) fn chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    #[cfg(feature = "rayon")]
    if parallel && data.len() > chunk {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let _ = parallel;
    data.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer (strided layouts
/// that `chunks_mut` cannot express, such as one attention head's columns of every row).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: users guarantee that concurrent tasks write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method, not `.0`: a closure that names `.0` captures the bare (non-`Send`)
    /// field instead of the wrapper.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Asks the C allocator to keep freed memory for reuse instead of returning it to the system
/// (glibc on Linux; elsewhere nothing happens). A training step allocates and frees the same
/// large activation buffers every step; glibc serves blocks above its mmap threshold (at most
/// 32 MiB, a decoder MLP activation is 38 MiB) with fresh mappings, so every step pays page
/// faults and page clearing again (4 base pretraining steps: 1.94 M page faults before, 0.70 M
/// after, 15% less CPU time; peak RSS grows by the reused blocks, 2083 -> 2449 MiB).
/// One arena for all threads: a model run on a pool thread ([`install`]) would otherwise get an
/// arena of its own that keeps its freed blocks beside the main one's (batch-8 inference peak RSS
/// 391 -> 405-473 MiB); the kernels allocate rarely (their scratch buffers are reused per thread),
/// so the shared lock costs nothing measurable.
/// Binaries call this once at start; a library never changes process-wide settings by itself.
/// `SG_MALLOC=system` leaves the allocator's defaults alone.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("SG_MALLOC").map_or(true, |v| v != "system") {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tuning parameters; any values are valid.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_ARENA_MAX, 1);
        }
    }
}
