//! Batches from any dataset. Each epoch has its own seeded order; sample `i` of epoch `e` gets its
//! own generator derived from `(seed, e, i)`, so what a batch holds does not depend on which thread
//! decoded what. Samples are decoded in parallel (rayon's pool) by a background thread that keeps
//! at most `prefetch` batches ready: memory holds the batches in flight, never the dataset.
//! With `skip_bad`, a sample that fails to load is left out and reported at the end instead of
//! stopping a long run.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rayon::prelude::*;
use sg_tensor::rng::Rng;
use sg_tensor::{Result, TensorError};

/// A source of samples.
pub trait Dataset: Send + Sync + 'static {
    type Item: Send + 'static;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i`; `rng` is this sample's generator for the epoch (augmentation draws from it).
    fn get(&self, i: usize, rng: &mut Rng) -> Result<Self::Item>;
    /// A name for sample `i` in reports (its file).
    fn describe(&self, i: usize) -> String {
        format!("sample {i}")
    }
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Drop a last batch smaller than `batch`.
    pub drop_last: bool,
    /// Batches decoded ahead of the consumer.
    pub prefetch: usize,
    /// Leave out samples that fail to load (reported by [`Epoch::skipped`]) instead of failing.
    pub skip_bad: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig { batch: 8, shuffle: true, seed: 0, drop_last: true, prefetch: 2, skip_bad: false }
    }
}

/// A batch and the dataset indices it came from.
#[derive(Debug)]
pub struct Batch<T> {
    pub items: Vec<T>,
    pub indices: Vec<usize>,
}

/// A sample left out, with the reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub index: usize,
    pub name: String,
    pub error: String,
}

pub struct Loader<D: Dataset> {
    dataset: Arc<D>,
    pub cfg: LoaderConfig,
}

impl<D: Dataset> Loader<D> {
    pub fn new(dataset: D, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch == 0 {
            return Err(TensorError::Arg { op: "Loader", msg: "batch size must be at least 1".into() });
        }
        if dataset.len() == 0 {
            return Err(TensorError::Arg { op: "Loader", msg: "the dataset is empty".into() });
        }
        Ok(Loader { dataset: Arc::new(dataset), cfg })
    }

    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The sample order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.dataset.len()).collect();
        if self.cfg.shuffle {
            let mut rng = Rng::derive(self.cfg.seed, &[epoch, 0x054B_FF1E]);
            for i in (1..idx.len()).rev() {
                idx.swap(i, rng.below(i + 1));
            }
        }
        idx
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.dataset.len();
        if self.cfg.drop_last {
            n / self.cfg.batch
        } else {
            n.div_ceil(self.cfg.batch)
        }
    }

    /// The batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> Epoch<D::Item> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `start` on (resuming mid-epoch decodes nothing before it).
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Epoch<D::Item> {
        let order = self.order(epoch);
        let cfg = self.cfg.clone();
        let nb = self.batches_per_epoch();
        let batches: Vec<Vec<usize>> = order.chunks(cfg.batch).take(nb).skip(start).map(|c| c.to_vec()).collect();
        let (tx, rx) = sync_channel::<Result<Batch<D::Item>>>(cfg.prefetch.max(1));
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let (ds, sk) = (self.dataset.clone(), skipped.clone());
        let handle = std::thread::spawn(move || {
            for idx in batches {
                let loaded: Vec<(usize, Result<D::Item>)> =
                    idx.par_iter().map(|&i| (i, ds.get(i, &mut Rng::derive(cfg.seed, &[epoch, i as u64])))).collect();
                let mut batch =
                    Batch { items: Vec::with_capacity(loaded.len()), indices: Vec::with_capacity(loaded.len()) };
                for (i, r) in loaded {
                    match r {
                        Ok(item) => {
                            batch.items.push(item);
                            batch.indices.push(i);
                        }
                        Err(e) if cfg.skip_bad => {
                            sk.lock().unwrap().push(Skipped { index: i, name: ds.describe(i), error: e.to_string() })
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                // The consumer hung up (dropped the epoch): stop decoding.
                if !batch.items.is_empty() && tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
        });
        Epoch { rx: Some(rx), handle: Some(handle), skipped }
    }
}

/// The batches of one epoch, decoded ahead in the background.
pub struct Epoch<T> {
    rx: Option<Receiver<Result<Batch<T>>>>,
    handle: Option<JoinHandle<()>>,
    skipped: Arc<Mutex<Vec<Skipped>>>,
}

impl<T> Epoch<T> {
    /// Samples left out so far (all of them once the epoch is exhausted).
    pub fn skipped(&self) -> Vec<Skipped> {
        self.skipped.lock().unwrap().clone()
    }
}

impl<T> Iterator for Epoch<T> {
    type Item = Result<Batch<T>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl<T> Drop for Epoch<T> {
    fn drop(&mut self) {
        // Hang up first so that a producer blocked on a full channel returns, then wait for it.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
