//! The training tape.
//!
//! Forward: each op runs the shared forward half ([`sg_tensor::exec::fwd`]) and, when a gradient can
//! flow through it (an input on the tape, or a trainable parameter), records a node holding only
//! what its backward needs: a Linear keeps its input only if its weight is trainable, an add keeps
//! nothing. Ops on constants and frozen parameters are not recorded at all.
//!
//! Backward: nodes are visited in reverse. A node's gradient is taken out of its slot when the node
//! is processed (and so freed once its consumer's backward has run), together with the node's
//! saved operands. The first contribution to a gradient writes it; later ones accumulate.
//! Parameter gradients land in one flat buffer at the parameters' offsets, or, in
//! [`Tape::backward_fold`], in windows over the store entries each op writes, handed to the
//! optimiser once no op still to run can add to them.

use std::ops::Range;

use sg_tensor::backend::{Backend, Conv2dDims, Grad, GroupNormDims, MaeLossDims, ParamGrads, Slice, SliceMut};
use sg_tensor::exec::{fwd, NodeId, Value};
use sg_tensor::kernels::attention::AttnShape;
use sg_tensor::kernels::linear::Activation;
use sg_tensor::{BatchNorm, Dst, Exec, ParamRef, ParamStore, Result, TensorError};

/// What a recorded op needs for its backward. `Option<NodeId>` inputs are `None` when no gradient
/// flows into them (constants).
enum Op<B: Backend> {
    Param {
        p: ParamRef,
    },
    Linear {
        x: Option<NodeId>,
        /// The input, needed only when the weight is trainable (for `dW = dy^T x`).
        x_val: Option<Input<B>>,
        w: ParamRef,
        b: Option<ParamRef>,
        /// The pre-activation of a fused GELU.
        pre: Option<B::Buf>,
        dims: (usize, usize, usize),
    },
    LayerNorm {
        x: Option<NodeId>,
        x_val: B::Buf,
        w: ParamRef,
        b: ParamRef,
        mean: B::Buf,
        rstd: B::Buf,
        eps: f32,
    },
    Attention {
        qkv: NodeId,
        qkv_val: B::Buf,
        out: B::Buf,
        lse: B::Buf,
        shape: AttnShape,
    },
    Add {
        a: Option<NodeId>,
        b: Option<NodeId>,
    },
    Sub {
        a: Option<NodeId>,
        b: Option<NodeId>,
    },
    AddRows {
        x: Option<NodeId>,
        rows: Option<NodeId>,
        rows_count: usize,
        dim: usize,
    },
    OuterAdd {
        a: Option<NodeId>,
        b: Option<NodeId>,
        s: usize,
        dim: usize,
    },
    Gather {
        x: NodeId,
        ids: Vec<usize>,
        dims: (usize, usize, usize),
    },
    Unshuffle {
        x: Option<NodeId>,
        fill: Option<NodeId>,
        restore: Vec<usize>,
        dims: (usize, usize, usize),
        /// `fill` holds a row per position, not one row.
        table: bool,
    },
    MeanTokens {
        x: NodeId,
        dims: (usize, usize, usize),
        skip_first: bool,
    },
    Reshape {
        x: NodeId,
    },
    AdaptiveAvgPool {
        x: NodeId,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
    },
    Bilinear {
        x: NodeId,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
        align_corners: bool,
    },
    AdaptiveMaxPool {
        x: NodeId,
        /// Each output's maximum, as an index into the input.
        idx: Vec<u32>,
        in_len: usize,
    },
    Gelu {
        x: NodeId,
        x_val: B::Buf,
    },
    GroupNorm {
        x: Option<NodeId>,
        x_val: B::Buf,
        w: ParamRef,
        b: ParamRef,
        mean: Vec<f64>,
        rstd: Vec<f64>,
        dims: GroupNormDims,
    },
    Concat {
        parts: Vec<Option<NodeId>>,
        outer: usize,
        widths: Vec<usize>,
    },
    Relu {
        x: NodeId,
        /// The output: its sign is the mask.
        y: B::Buf,
    },
    /// A convolution, or with `transposed` its adjoint (then `dims` is the convolution it is the
    /// adjoint of).
    Conv {
        x: Option<NodeId>,
        /// Saved only when the weight trains.
        x_val: Option<B::Buf>,
        w: ParamRef,
        b: Option<ParamRef>,
        dims: Conv2dDims,
        transposed: bool,
    },
    Permute {
        x: NodeId,
        /// The output's shape, permuted back by the inverse permutation in the backward.
        out_shape: Vec<usize>,
        perm: Vec<usize>,
    },
    MaeLoss {
        pred: NodeId,
        pred_val: B::Buf,
        target: B::Buf,
        mask: Vec<f32>,
        dims: MaeLossDims,
    },
    CrossEntropy {
        logits: NodeId,
        logits_val: B::Buf,
        targets: Vec<f32>,
        classes: usize,
    },
    MultiLabelSoftMargin {
        logits: NodeId,
        logits_val: B::Buf,
        targets: Vec<f32>,
        classes: usize,
    },
    WeightedCrossEntropy {
        logits: NodeId,
        logits_val: B::Buf,
        labels: Vec<usize>,
        weights: Vec<f32>,
        ignore: usize,
    },
    /// Dropout and drop path: the mask is recomputed from the seed, not saved.
    Dropout {
        x: NodeId,
        p: f32,
        seed: u64,
        group: usize,
    },
    /// A node whose backward has run (its saved operands are gone).
    Done,
}

/// A Linear's input as its weight gradient will see it. Where the producing op already keeps what
/// the input is computed from, the backward recomputes it (one cheap elementwise or norm pass)
/// instead of the tape holding a second activation of that size: in a ViT block the MLP's hidden
/// activation (4 x width per token) and both LayerNorm outputs. At base size this takes about
/// 320 MB off the peak of a pretraining step; the recomputed values are bit-identical.
enum Input<B: Backend> {
    Kept(B::Buf),
    /// `gelu(pre)`: the output of a Linear with fused GELU, whose node keeps `pre`.
    Gelu(B::Buf),
    /// The output of a LayerNorm whose node keeps its input.
    Norm {
        x: B::Buf,
        w: ParamRef,
        b: ParamRef,
        rows: usize,
        eps: f32,
    },
}

/// Where [`Tape::backward_fold`] hands each final parameter gradient: its range of the flat
/// layout (whole store entries) and its values.
pub type GradSink<'s, B> = dyn FnMut(Range<usize>, &<B as Backend>::Buf) -> Result<()> + 's;

/// Parameter gradients: one flat buffer laid out like the [`ParamStore`].
pub struct Grads<B: Backend> {
    pub buf: B::Buf,
    /// Per store entry: whether its gradient has been written since the buffer was (re)started.
    written: Vec<bool>,
    /// Seconds per op family, forward and backward, when the tape was profiling.
    pub profile: Option<Profile>,
    /// [`Tape::backward_fold`]'s gradient windows instead of `buf`: (range of the flat layout over
    /// whole store entries, its gradients).
    windows: Option<Vec<(Range<usize>, B::Buf)>>,
}

/// Wall time per op family of one taped step ([`Tape::profiled`]): where a training step goes.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// (family, forward seconds, backward seconds), in first-seen order.
    pub families: Vec<(&'static str, f64, f64)>,
    last: Option<std::time::Instant>,
}

impl Profile {
    fn add(&mut self, family: &'static str, fwd: f64, bwd: f64) {
        match self.families.iter_mut().find(|f| f.0 == family) {
            Some(f) => {
                f.1 += fwd;
                f.2 += bwd;
            }
            None => self.families.push((family, fwd, bwd)),
        }
    }

    /// Adds time spent outside the tape (the optimiser step, say) under `family`.
    pub fn add_other(&mut self, family: &'static str, secs: f64) {
        self.add(family, secs, 0.0);
    }
}

impl<B: Backend> Grads<B> {
    /// An empty gradient for `store`: every entry's first write will overwrite.
    pub fn new(backend: &B, store: &ParamStore) -> Self {
        Grads {
            buf: backend.zeros(store.len()),
            written: vec![false; store.entries().len()],
            profile: None,
            windows: None,
        }
    }

    /// Starts a new accumulation: the next writes overwrite (no zeroing pass).
    pub fn restart(&mut self) {
        self.written.iter_mut().for_each(|w| *w = false);
    }

    /// Frees the buffer (after the optimiser step, say): the next backward allocates a fresh one,
    /// whose pages become resident only as gradients are written, while that backward frees the
    /// activations. Lowers the peak memory of a training step by up to the gradient's size.
    pub fn release(&mut self, backend: &B) {
        self.buf = backend.zeros(0);
    }

    /// Whether each entry of the store has received a gradient.
    pub fn written(&self) -> &[bool] {
        &self.written
    }

    /// Zeros the gradient of every entry that received none since [`Grads::restart`], so a buffer
    /// reused across steps (no 4-bytes-per-parameter allocation each step) never hands an
    /// optimiser last step's values.
    pub fn zero_unwritten(&mut self, backend: &B, store: &ParamStore) -> Result<()> {
        for (e, w) in store.entries().iter().zip(&mut self.written) {
            if !*w {
                let range = e.param.range();
                let zeros = backend.zeros(range.len());
                backend.accumulate(SliceMut { buf: &mut self.buf, range, dst: Dst::Overwrite }, &zeros)?;
                *w = true;
            }
        }
        Ok(())
    }
}

/// The training executor: see the module documentation.
pub struct Tape<'a, B: Backend> {
    backend: B,
    store: &'a ParamStore,
    params: B::Buf,
    nodes: Vec<Op<B>>,
    /// Store entries sorted by offset, with their trainable flag (for "does this range need a gradient").
    spans: Vec<(usize, usize, bool)>,
    /// Dropout randomness: each dropout op draws the next seed from this stream, so a step is
    /// reproducible from (seed, order of ops) alone.
    seed: u64,
    draws: u64,
    /// BatchNorm running statistics computed by this step's forward, for the caller to store.
    running: Vec<(ParamRef, Vec<f32>)>,
    prof: Option<Profile>,
}

impl<B: Backend> Op<B> {
    /// The parameters whose gradients this op's backward may write (no catch-all arm: a new op
    /// with parameters must say so, or [`Tape::backward_fold`] would hand a gradient over early).
    fn params(&self) -> [Option<&ParamRef>; 2] {
        match self {
            Op::Param { p } => [Some(p), None],
            Op::Linear { w, b, .. } | Op::Conv { w, b, .. } => [Some(w), b.as_ref()],
            Op::LayerNorm { w, b, .. } | Op::GroupNorm { w, b, .. } => [Some(w), Some(b)],
            Op::Attention { .. }
            | Op::Add { .. }
            | Op::Sub { .. }
            | Op::AddRows { .. }
            | Op::OuterAdd { .. }
            | Op::Gather { .. }
            | Op::Unshuffle { .. }
            | Op::MeanTokens { .. }
            | Op::Reshape { .. }
            | Op::AdaptiveAvgPool { .. }
            | Op::Bilinear { .. }
            | Op::AdaptiveMaxPool { .. }
            | Op::Gelu { .. }
            | Op::Concat { .. }
            | Op::Relu { .. }
            | Op::Permute { .. }
            | Op::MaeLoss { .. }
            | Op::CrossEntropy { .. }
            | Op::MultiLabelSoftMargin { .. }
            | Op::WeightedCrossEntropy { .. }
            | Op::Dropout { .. }
            | Op::Done => [None, None],
        }
    }

    /// The family an op's time is reported under.
    fn family(&self) -> &'static str {
        match self {
            Op::Linear { .. } | Op::Conv { .. } => "gemm (linear, conv)",
            Op::Attention { .. } => "attention",
            Op::LayerNorm { .. } | Op::GroupNorm { .. } => "norms",
            Op::MaeLoss { .. }
            | Op::CrossEntropy { .. }
            | Op::MultiLabelSoftMargin { .. }
            | Op::WeightedCrossEntropy { .. } => "losses",
            _ => "elementwise, gather, reshape",
        }
    }
}

impl<'a, B: Backend> Tape<'a, B> {
    pub fn new(backend: B, store: &'a ParamStore) -> Self {
        let params = backend.upload_params(store);
        Self::with_params(backend, store, params)
    }

    /// A tape over parameter values already on the backend (laid out like `store`): finite-difference
    /// checks perturb them in the backend's own precision.
    pub fn with_params(backend: B, store: &'a ParamStore, params: B::Buf) -> Self {
        let mut spans: Vec<(usize, usize, bool)> =
            store.entries().iter().map(|e| (e.param.offset, e.param.len(), e.trainable)).collect();
        spans.sort_unstable();
        Tape { backend, store, params, nodes: Vec::new(), spans, seed: 0, draws: 0, running: Vec::new(), prof: None }
    }

    /// Times every recorded op by family (forward: the time since the previous recorded op, which
    /// takes in any unrecorded glue; backward: each op's backward), reported in [`Grads::profile`].
    pub fn profiled(mut self) -> Self {
        self.prof = Some(Profile { families: Vec::new(), last: Some(std::time::Instant::now()) });
        self
    }

    /// Seeds dropout and drop path for this step (the default seed is 0).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    fn next_seed(&mut self) -> u64 {
        self.draws += 1;
        // Mix so that consecutive steps' seeds give unrelated masks.
        (self.seed ^ 0x6A09_E667_F3BC_C908).wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(self.draws)
    }

    /// A convolution or its transpose (the adjoint of the convolution with the same weight), recorded
    /// when a gradient can flow through it.
    fn conv(
        &mut self,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
        transposed: bool,
    ) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let (dims, y) = if transposed {
            let dims = fwd::conv_transpose2d_dims(x, w, stride, pad)?;
            (dims, fwd::conv_transpose2d(&self.backend, &self.params, x, w, b, dims)?)
        } else {
            let dims = fwd::conv2d_dims(x, w, stride, pad)?;
            (dims, fwd::conv2d(&self.backend, &self.params, x, w, b, dims)?)
        };
        let tw = self.trainable(w);
        if xn.is_none() && !tw && !b.is_some_and(|b| self.trainable(b)) {
            return Ok(y);
        }
        let x_val = tw.then(|| x.buf.clone());
        Ok(self.record(Op::Conv { x: xn, x_val, w: w.clone(), b: b.cloned(), dims, transposed }, y))
    }

    /// Records `op` for `y` when its single input `x` is on the tape; otherwise `y` needs no gradient.
    fn record_unary(
        &mut self,
        x: Option<NodeId>,
        y: Value<B>,
        op: impl FnOnce(NodeId, &Value<B>) -> Op<B>,
    ) -> Value<B> {
        match x {
            Some(n) => {
                let op = op(n, &y);
                self.record(op, y)
            }
            None => y,
        }
    }

    fn dropout_op(&mut self, x: &Value<B>, p: f32, group: usize) -> Result<Value<B>> {
        if !(0.0..1.0).contains(&p) {
            return Err(TensorError::Arg { op: "dropout", msg: format!("probability {p} is outside [0, 1)") });
        }
        let xn = self.check_node(x)?;
        if p == 0.0 {
            return Ok(x.clone());
        }
        let seed = self.next_seed();
        let y = fwd::value(self.backend.dropout(&x.buf, p, seed, group)?, x.shape.clone());
        Ok(self.record_unary(xn, y, |x, _| Op::Dropout { x, p, seed, group }))
    }

    /// GroupNorm, also returning its per-(sample, group) mean and 1/std.
    fn group_norm_stats(
        &mut self,
        x: &Value<B>,
        groups: usize,
        w: &ParamRef,
        b: &ParamRef,
        eps: f32,
    ) -> Result<(Value<B>, Vec<f64>, Vec<f64>)> {
        let xn = self.check_node(x)?;
        let dims = fwd::group_norm_dims(x, groups, w, b, eps)?;
        let (y, mean, rstd) = fwd::group_norm(&self.backend, &self.params, x, w, b, dims)?;
        if xn.is_none() && !self.trainable(w) && !self.trainable(b) {
            return Ok((y, mean, rstd));
        }
        let op = Op::GroupNorm {
            x: xn,
            x_val: x.buf.clone(),
            w: w.clone(),
            b: b.clone(),
            mean: mean.clone(),
            rstd: rstd.clone(),
            dims,
        };
        Ok((self.record(op, y), mean, rstd))
    }

    /// The BatchNorm running statistics this forward computed (PyTorch's momentum update), to be
    /// written into the parameter store once the step is taken: [`ParamStore::values_mut`].
    pub fn take_running_stats(&mut self) -> Vec<(ParamRef, Vec<f32>)> {
        std::mem::take(&mut self.running)
    }

    /// Recorded nodes (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn trainable(&self, p: &ParamRef) -> bool {
        let r = p.range();
        self.spans.iter().any(|&(o, l, t)| t && o < r.end && o + l > r.start)
    }

    fn record(&mut self, op: Op<B>, mut v: Value<B>) -> Value<B> {
        if let Some(p) = &mut self.prof {
            let now = std::time::Instant::now();
            let dt = p.last.map_or(0.0, |l| (now - l).as_secs_f64());
            p.add(op.family(), dt, 0.0);
            p.last = Some(now);
        }
        v.node = Some(NodeId(self.nodes.len()));
        self.nodes.push(op);
        v
    }

    fn check_node(&self, v: &Value<B>) -> Result<Option<NodeId>> {
        match v.node {
            Some(NodeId(i)) if i >= self.nodes.len() => Err(TensorError::Arg {
                op: "tape",
                msg: format!("value from node {i} does not belong to this tape of {} nodes", self.nodes.len()),
            }),
            n => Ok(n),
        }
    }

    /// Gradients of the scalar `loss` for every trainable parameter, into a fresh [`Grads`].
    pub fn backward(self, loss: &Value<B>) -> Result<Grads<B>> {
        let mut g = Grads::new(&self.backend, self.store);
        self.backward_into(loss, &mut g)?;
        Ok(g)
    }

    /// Like [`Tape::backward`], adding into `grads` (gradient accumulation over micro-batches: call
    /// [`Grads::restart`] before the first).
    pub fn backward_into(self, loss: &Value<B>, grads: &mut Grads<B>) -> Result<()> {
        if grads.windows.is_some() {
            return Err(TensorError::Arg { op: "backward", msg: "gradients laid out in windows".into() });
        }
        self.run_backward(loss, grads, None)
    }

    /// The backward of a training step that neither clips nor accumulates gradients: each
    /// parameter gradient goes to `sink` (a range of the flat layout covering whole store entries,
    /// and its values) as soon as no op still to run can add to it, and is then freed. No buffer
    /// of the model's size is ever held; with [`crate::optim::AdamW::fold`] as the sink the
    /// optimiser folds each gradient into its moments while the backward frees the activations
    /// (a base pretraining step: the 381 MiB gradient buffer gone from the peak). Every trainable
    /// parameter reached from the loss is handed over exactly once; returns the profile when the
    /// tape was profiling.
    pub fn backward_fold(self, loss: &Value<B>, sink: &mut GradSink<'_, B>) -> Result<Option<Profile>> {
        let mut grads = Grads {
            buf: self.backend.zeros(0),
            written: vec![false; self.store.entries().len()],
            profile: None,
            windows: Some(Vec::new()),
        };
        self.run_backward(loss, &mut grads, Some(sink))?;
        Ok(grads.profile)
    }

    fn run_backward(
        mut self,
        loss: &Value<B>,
        grads: &mut Grads<B>,
        mut sink: Option<&mut GradSink<'_, B>>,
    ) -> Result<()> {
        if loss.numel() != 1 {
            return Err(TensorError::Shape {
                op: "backward",
                msg: format!("the loss must be a scalar, got {:?}", loss.shape),
            });
        }
        let root = match self.check_node(loss)? {
            Some(NodeId(i)) => i,
            // Nothing trainable reaches the loss: every gradient is zero.
            None => return Ok(()),
        };
        let is_loss = matches!(
            self.nodes[root],
            Op::MaeLoss { .. }
                | Op::CrossEntropy { .. }
                | Op::MultiLabelSoftMargin { .. }
                | Op::WeightedCrossEntropy { .. }
        );
        if !is_loss {
            return Err(TensorError::Arg { op: "backward", msg: "backward starts from a loss op".into() });
        }
        if grads.written.len() != self.store.entries().len() {
            return Err(TensorError::Arg {
                op: "backward",
                msg: "gradients laid out for another parameter store".into(),
            });
        }
        if grads.windows.is_none() && self.backend.buf_len(&grads.buf) == 0 && !self.store.is_empty() {
            // Released after the last step: start afresh (everything unwritten).
            grads.buf = self.backend.zeros(self.store.len());
            grads.restart();
        }
        // Windowed: per store entry (in `spans` order), the ops still to run that may write it.
        let mut left = vec![0usize; self.spans.len()];
        if sink.is_some() {
            for op in &self.nodes[..=root] {
                for p in op.params().into_iter().flatten() {
                    self.overlapping(p.range()).for_each(|s| left[s] += 1);
                }
            }
        }
        let mut slots: Vec<Grad<B>> = (0..=root).map(|_| None).collect();
        for i in (0..=root).rev() {
            let op = std::mem::replace(&mut self.nodes[i], Op::Done);
            let dy = slots[i].take();
            // Loss nodes are the root and seed the backward with d loss / d loss = 1.
            let is_root = i == root;
            let touched: Vec<Range<usize>> = match sink {
                Some(_) => op.params().into_iter().flatten().map(|p| p.range()).collect(),
                None => Vec::new(),
            };
            if dy.is_some() || is_root {
                let (family, t0) = (op.family(), self.prof.is_some().then(std::time::Instant::now));
                self.backward_op(op, dy, &mut slots, grads)?;
                if let (Some(p), Some(t0)) = (&mut self.prof, t0) {
                    p.add(family, 0.0, t0.elapsed().as_secs_f64());
                }
            }
            // Only an op with parameters can make a window final.
            if let (Some(sink), false) = (sink.as_deref_mut(), touched.is_empty()) {
                for r in touched {
                    self.overlapping(r).for_each(|s| left[s] -= 1);
                }
                self.flush_windows(grads, sink, |s| left[s] == 0)?;
            }
        }
        if let Some(sink) = sink {
            self.flush_windows(grads, sink, |_| true)?;
        }
        if let Some(mut p) = self.prof.take() {
            p.last = None;
            grads.profile = Some(p);
        }
        Ok(())
    }

    /// Where `p`'s gradient goes and whether this write is its first of the step (overwrite) or not;
    /// `None` for a frozen parameter. Marks `p`'s entries as written.
    fn param_dst(&self, p: &ParamRef, grads: &mut Grads<B>) -> Result<Option<(Range<usize>, Dst)>> {
        if !self.trainable(p) {
            return Ok(None);
        }
        let (dst, fresh) = self.mark_written(p, grads);
        if dst == Dst::Accumulate {
            // A fused span over parameters of which only some were written before: zero the others
            // so that the whole span can accumulate.
            for i in fresh {
                let e = &self.store.entries()[i].param;
                let z = self.backend.zeros(e.len());
                self.backend.accumulate(SliceMut { buf: &mut grads.buf, range: e.range(), dst: Dst::Overwrite }, &z)?;
            }
        }
        Ok(Some((p.range(), dst)))
    }

    /// Indices into `spans` of the store entries overlapping `r`.
    fn overlapping(&self, r: Range<usize>) -> impl Iterator<Item = usize> + '_ {
        self.spans.iter().enumerate().filter(move |(_, &(o, l, _))| o < r.end && o + l > r.start).map(|(i, _)| i)
    }

    /// Hands every open window whose entries all pass `done` to `sink`, and frees it.
    fn flush_windows(
        &self,
        grads: &mut Grads<B>,
        sink: &mut GradSink<'_, B>,
        done: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let ws = grads.windows.as_mut().expect("windowed gradients");
        let mut i = 0;
        while i < ws.len() {
            if self.overlapping(ws[i].0.clone()).all(&done) {
                let (r, g) = ws.swap_remove(i);
                sink(r, &g)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Marks the store entries `p` covers as written: whether any was written before (then this
    /// write accumulates), and the indices of those that were not.
    fn mark_written(&self, p: &ParamRef, grads: &mut Grads<B>) -> (Dst, Vec<usize>) {
        let r = p.range();
        let (mut any, mut fresh) = (false, Vec::new());
        for (i, e) in self.store.entries().iter().enumerate() {
            if e.param.offset < r.end && e.param.offset + e.param.len() > r.start {
                if std::mem::replace(&mut grads.written[i], true) {
                    any = true;
                } else {
                    fresh.push(i);
                }
            }
        }
        (if any { Dst::Accumulate } else { Dst::Overwrite }, fresh)
    }

    /// [`Tape::layer_grads`] in windowed mode: the open window covering the whole store entries
    /// that `w` and `b` touch (a fresh zeroed one, or several merged when this op's entries span
    /// them), with `w` and `b` as ranges within it.
    fn window_grads<'g>(
        &self,
        w: Option<&ParamRef>,
        b: Option<&ParamRef>,
        grads: &'g mut Grads<B>,
    ) -> Result<Option<ParamGrads<'g, B>>> {
        let (w, b) = (w.filter(|p| self.trainable(p)), b.filter(|p| self.trainable(p)));
        let mut hull: Option<Range<usize>> = None;
        for p in w.iter().chain(b.iter()) {
            for s in self.overlapping(p.range()) {
                let (o, l, _) = self.spans[s];
                hull = Some(hull.map_or(o..o + l, |h| h.start.min(o)..h.end.max(o + l)));
            }
        }
        let Some(hull) = hull else { return Ok(None) };
        // A window starts zeroed: entries written for the first time need no clearing.
        let dw = w.map(|p| (p.range(), self.mark_written(p, grads).0));
        let db = b.map(|p| (p.range(), self.mark_written(p, grads).0));
        let be = &self.backend;
        let ws = grads.windows.as_mut().expect("windowed gradients");
        let over: Vec<usize> =
            (0..ws.len()).filter(|&i| ws[i].0.start < hull.end && ws[i].0.end > hull.start).collect();
        let i = match over[..] {
            [i] if ws[i].0.start <= hull.start && ws[i].0.end >= hull.end => i,
            _ => {
                let lo = over.iter().map(|&i| ws[i].0.start).fold(hull.start, usize::min);
                let hi = over.iter().map(|&i| ws[i].0.end).fold(hull.end, usize::max);
                let mut merged = be.zeros(hi - lo);
                for &i in over.iter().rev() {
                    let (r, g) = ws.swap_remove(i);
                    let range = r.start - lo..r.end - lo;
                    be.accumulate(SliceMut { buf: &mut merged, range, dst: Dst::Overwrite }, &g)?;
                }
                ws.push((lo..hi, merged));
                ws.len() - 1
            }
        };
        let start = ws[i].0.start;
        let local = |(r, d): (Range<usize>, Dst)| (r.start - start..r.end - start, d);
        Ok(Some(ParamGrads { buf: &mut ws[i].1, w: dw.map(local), b: db.map(local) }))
    }

    /// The weight and bias gradient ranges of a layer, or `None` when both are frozen.
    fn layer_grads<'g>(
        &self,
        w: Option<&ParamRef>,
        b: Option<&ParamRef>,
        grads: &'g mut Grads<B>,
    ) -> Result<Option<ParamGrads<'g, B>>> {
        if grads.windows.is_some() {
            return self.window_grads(w, b, grads);
        }
        let w = match w {
            Some(w) => self.param_dst(w, grads)?,
            None => None,
        };
        let b = match b {
            Some(b) => self.param_dst(b, grads)?,
            None => None,
        };
        Ok((w.is_some() || b.is_some()).then_some(ParamGrads { buf: &mut grads.buf, w, b }))
    }

    fn backward_op(&self, op: Op<B>, dy: Grad<B>, slots: &mut [Grad<B>], grads: &mut Grads<B>) -> Result<()> {
        let be = &self.backend;
        // Split the slots so that an op can write its inputs' gradients (all earlier nodes).
        let slot = |slots: &mut [Grad<B>], n: Option<NodeId>| -> *mut Grad<B> {
            match n {
                Some(NodeId(j)) => &mut slots[j] as *mut _,
                None => std::ptr::null_mut(),
            }
        };
        // SAFETY helper: distinct input nodes give distinct slots; where two inputs are the same node
        // the ops below handle them one after the other, never holding both references at once.
        let get = |p: *mut Grad<B>| -> Option<&mut Grad<B>> { unsafe { p.as_mut() } };
        let own = |dy: Grad<B>| -> Result<B::Buf> {
            dy.ok_or_else(|| TensorError::Arg { op: "backward", msg: "missing gradient".into() })
        };
        let need = |dy: &Grad<B>| own(dy.clone());
        match op {
            Op::Done => {}
            Op::Param { p } => {
                let dy = need(&dy)?;
                if let Some(ParamGrads { buf, w: Some((range, dst)), .. }) = self.layer_grads(Some(&p), None, grads)? {
                    be.accumulate(SliceMut { buf, range, dst }, &dy)?;
                }
            }
            Op::Linear { x, x_val, w, b, pre, dims: (m, k, n) } => {
                // Handed over, not cloned: the backend may reuse a buffer only this op holds.
                let dy = own(dy)?;
                let wslice = Slice { buf: &self.params, range: w.range() };
                let dx = get(slot(slots, x));
                let x_val = match x_val {
                    None => None,
                    Some(Input::Kept(v)) => Some(v),
                    Some(Input::Gelu(pre)) => Some(be.gelu(&pre)?),
                    Some(Input::Norm { x, w, b, rows, eps }) => {
                        let ws = Slice { buf: &self.params, range: w.range() };
                        let bs = Slice { buf: &self.params, range: b.range() };
                        Some(be.layernorm(&x, ws, bs, rows, eps, false)?.0)
                    }
                };
                // Without the saved input the weight is frozen (see `linear` below).
                let pg = self.layer_grads(x_val.as_ref().map(|_| &w), b.as_ref(), grads)?;
                be.linear_backward(x_val, wslice, pre.as_ref(), dy, m, k, n, dx, pg)?;
            }
            Op::LayerNorm { x, x_val, w, b, mean, rstd, .. } => {
                let dy = need(&dy)?;
                let wslice = Slice { buf: &self.params, range: w.range() };
                let dx = get(slot(slots, x));
                let pg = self.layer_grads(Some(&w), Some(&b), grads)?;
                be.layernorm_backward(&x_val, wslice, &mean, &rstd, &dy, dx, pg)?;
            }
            Op::Attention { qkv, qkv_val, out, lse, shape } => {
                let dy = need(&dy)?;
                let d = get(slot(slots, Some(qkv))).expect("attention input is on the tape");
                be.attention_backward(&qkv_val, &out, &lse, &dy, shape, d)?;
            }
            Op::Add { a, b } => {
                let dy = need(&dy)?;
                if let Some(s) = get(slot(slots, a)) {
                    be.accumulate_grad(s, &dy)?;
                }
                if let Some(s) = get(slot(slots, b)) {
                    be.accumulate_grad(s, &dy)?;
                }
            }
            Op::Sub { a, b } => {
                let dy = need(&dy)?;
                if let Some(s) = get(slot(slots, a)) {
                    be.accumulate_grad(s, &dy)?;
                }
                if let Some(s) = get(slot(slots, b)) {
                    be.neg_accumulate_grad(s, &dy)?;
                }
            }
            Op::AddRows { x, rows, rows_count, dim } => {
                let dy = need(&dy)?;
                if let Some(s) = get(slot(slots, x)) {
                    be.accumulate_grad(s, &dy)?;
                }
                if let Some(s) = get(slot(slots, rows)) {
                    be.add_rows_backward(&dy, rows_count, dim, s)?;
                }
            }
            Op::OuterAdd { a, b, s, dim } => {
                let dy = need(&dy)?;
                be.outer_add_backward(&dy, s, dim, get(slot(slots, a)), None)?;
                be.outer_add_backward(&dy, s, dim, None, get(slot(slots, b)))?;
            }
            Op::Gather { x, ids, dims: (bt, l, d) } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.gather_rows_backward(&dy, bt, l, d, &ids, s)?;
            }
            Op::Unshuffle { x, fill, restore, dims: (bt, k, d), table } => {
                let dy = need(&dy)?;
                be.unshuffle_backward(&dy, bt, k, d, &restore, get(slot(slots, x)), None, table)?;
                be.unshuffle_backward(&dy, bt, k, d, &restore, None, get(slot(slots, fill)), table)?;
            }
            Op::MeanTokens { x, dims: (bt, l, d), skip_first } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.mean_tokens_backward(&dy, bt, l, d, skip_first, s)?;
            }
            Op::AdaptiveAvgPool { x, planes, hw, out_hw } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.adaptive_avg_pool_backward(&dy, planes, hw, out_hw, s)?;
            }
            Op::Bilinear { x, planes, hw, out_hw, align_corners } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.upsample_bilinear_backward(&dy, planes, hw, out_hw, align_corners, s)?;
            }
            Op::AdaptiveMaxPool { x, idx, in_len } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.adaptive_max_pool_backward(&dy, &idx, in_len, s)?;
            }
            Op::Gelu { x, x_val } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.gelu_backward(&x_val, &dy, s)?;
            }
            Op::GroupNorm { x, x_val, w, b, mean, rstd, dims } => {
                let dy = need(&dy)?;
                let wslice = Slice { buf: &self.params, range: w.range() };
                let dx = get(slot(slots, x));
                let pg = self.layer_grads(Some(&w), Some(&b), grads)?;
                be.group_norm_backward(&x_val, wslice, (&mean, &rstd), &dy, dims, dx, pg)?;
            }
            Op::Concat { parts, outer, widths } => {
                let dy = need(&dy)?;
                for (i, p) in parts.into_iter().enumerate() {
                    if let Some(s) = get(slot(slots, p)) {
                        be.concat_backward(&dy, outer, &widths, i, s)?;
                    }
                }
            }
            Op::Conv { x, x_val, w, b, dims, transposed: true } => {
                let dy = need(&dy)?;
                let wslice = || Slice { buf: &self.params, range: w.range() };
                if let Some(s) = get(slot(slots, x)) {
                    // The adjoint of the adjoint: the convolution itself.
                    let dx = be.conv2d(&dy, wslice(), None, dims)?;
                    be.accumulate_grad(s, &dx)?;
                }
                if let Some(xv) = &x_val {
                    // dW of a transposed convolution is dW of the convolution with input and output swapped.
                    let pg = self.layer_grads(Some(&w), None, grads)?;
                    be.conv2d_backward(Some(&dy), wslice(), xv, dims, None, pg)?;
                }
                if let Some(ParamGrads { buf, b: Some((range, dst)), .. }) =
                    self.layer_grads(None, b.as_ref(), grads)?
                {
                    be.channel_bias_backward(&dy, dims.cin, dims.h * dims.w, SliceMut { buf, range, dst })?;
                }
            }
            Op::Relu { x, y } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.relu_backward(&y, &dy, s)?;
            }
            Op::Conv { x, x_val, w, b, dims, transposed: false } => {
                let dy = need(&dy)?;
                let wslice = Slice { buf: &self.params, range: w.range() };
                let dx = get(slot(slots, x));
                let pg = self.layer_grads(x_val.as_ref().map(|_| &w), b.as_ref(), grads)?;
                be.conv2d_backward(x_val.as_ref(), wslice, &dy, dims, dx, pg)?;
            }
            Op::Permute { x, out_shape, perm } => {
                let dy = need(&dy)?;
                let back = be.permute(&dy, &out_shape, &fwd::inverse_perm(&perm))?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.accumulate_grad(s, &back)?;
            }
            Op::Reshape { x } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.accumulate_grad(s, &dy)?;
            }
            Op::MaeLoss { pred, pred_val, target, mask, dims } => {
                let s = get(slot(slots, Some(pred))).expect("on the tape");
                be.mae_loss_backward(&pred_val, &target, &mask, dims, 1.0, s)?;
            }
            Op::CrossEntropy { logits, logits_val, targets, classes } => {
                let s = get(slot(slots, Some(logits))).expect("on the tape");
                be.cross_entropy_backward(&logits_val, &targets, classes, 1.0, s)?;
            }
            Op::MultiLabelSoftMargin { logits, logits_val, targets, classes } => {
                let s = get(slot(slots, Some(logits))).expect("on the tape");
                be.multilabel_soft_margin_backward(&logits_val, &targets, classes, 1.0, s)?;
            }
            Op::WeightedCrossEntropy { logits, logits_val, labels, weights, ignore } => {
                let s = get(slot(slots, Some(logits))).expect("on the tape");
                be.weighted_cross_entropy_backward(&logits_val, &labels, &weights, ignore, 1.0, s)?;
            }
            Op::Dropout { x, p, seed, group } => {
                let dy = need(&dy)?;
                let s = get(slot(slots, Some(x))).expect("on the tape");
                be.dropout_backward(&dy, p, seed, group, s)?;
            }
        }
        Ok(())
    }
}

impl<B: Backend> Exec for Tape<'_, B> {
    type B = B;

    fn backend(&self) -> &B {
        &self.backend
    }

    fn constant(&mut self, data: &[f32], shape: &[usize]) -> Result<Value<B>> {
        fwd::constant(&self.backend, data, shape)
    }

    fn param(&mut self, p: &ParamRef) -> Result<Value<B>> {
        let v = fwd::param(&self.backend, &self.params, p);
        Ok(if self.trainable(p) { self.record(Op::Param { p: p.clone() }, v) } else { v })
    }

    fn linear(&mut self, x: &Value<B>, w: &ParamRef, b: Option<&ParamRef>, act: Activation) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let tw = self.trainable(w);
        let tb = b.is_some_and(|b| self.trainable(b));
        let grad = xn.is_some() || tw || tb;
        let (y, pre) = fwd::linear(&self.backend, &self.params, x, w, b, act, grad)?;
        if !grad {
            return Ok(y);
        }
        let (m, k) = fwd::rows_cols(x);
        let x_val = tw.then(|| match xn.map(|NodeId(i)| &self.nodes[i]) {
            Some(Op::Linear { pre: Some(pre), .. }) => Input::Gelu(pre.clone()),
            Some(Op::LayerNorm { x_val, w, b, eps, .. }) => {
                Input::Norm { x: x_val.clone(), w: w.clone(), b: b.clone(), rows: m, eps: *eps }
            }
            _ => Input::Kept(x.buf.clone()),
        });
        let op = Op::Linear { x: xn, x_val, w: w.clone(), b: b.cloned(), pre, dims: (m, k, w.shape[0]) };
        Ok(self.record(op, y))
    }

    fn layernorm(&mut self, x: &Value<B>, w: &ParamRef, b: &ParamRef, eps: f32) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let grad = xn.is_some() || self.trainable(w) || self.trainable(b);
        let (y, stats) = fwd::layernorm(&self.backend, &self.params, x, w, b, eps, grad)?;
        match stats {
            Some((mean, rstd)) if grad => {
                let op = Op::LayerNorm { x: xn, x_val: x.buf.clone(), w: w.clone(), b: b.clone(), mean, rstd, eps };
                Ok(self.record(op, y))
            }
            _ => Ok(y),
        }
    }

    fn attention(&mut self, qkv: &Value<B>, heads: usize) -> Result<Value<B>> {
        let qn = self.check_node(qkv)?;
        let (y, lse) = fwd::attention(&self.backend, qkv, heads, qn.is_some())?;
        match (qn, lse) {
            (Some(q), Some(lse)) => {
                let shape = fwd::attn_shape(qkv, heads)?;
                let op = Op::Attention { qkv: q, qkv_val: qkv.buf.clone(), out: y.buf.clone(), lse, shape };
                Ok(self.record(op, y))
            }
            _ => Ok(y),
        }
    }

    fn add(&mut self, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        let (an, bn) = (self.check_node(a)?, self.check_node(b)?);
        let y = fwd::add(&self.backend, a, b)?;
        Ok(if an.is_some() || bn.is_some() { self.record(Op::Add { a: an, b: bn }, y) } else { y })
    }

    fn sub(&mut self, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        let (an, bn) = (self.check_node(a)?, self.check_node(b)?);
        let y = fwd::sub(&self.backend, a, b)?;
        Ok(if an.is_some() || bn.is_some() { self.record(Op::Sub { a: an, b: bn }, y) } else { y })
    }

    fn add_rows(&mut self, x: &Value<B>, rows: &Value<B>) -> Result<Value<B>> {
        let (xn, rn) = (self.check_node(x)?, self.check_node(rows)?);
        let y = fwd::add_rows(&self.backend, x, rows)?;
        if xn.is_none() && rn.is_none() {
            return Ok(y);
        }
        let dim = x.last_dim();
        Ok(self.record(Op::AddRows { x: xn, rows: rn, rows_count: rows.numel() / dim, dim }, y))
    }

    fn outer_add(&mut self, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        let (an, bn) = (self.check_node(a)?, self.check_node(b)?);
        let y = fwd::outer_add(&self.backend, a, b)?;
        if an.is_none() && bn.is_none() {
            return Ok(y);
        }
        let (s, dim) = fwd::rows_cols(a);
        Ok(self.record(Op::OuterAdd { a: an, b: bn, s, dim }, y))
    }

    fn gather_rows(&mut self, x: &Value<B>, ids: &[usize]) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let y = fwd::gather_rows(&self.backend, x, ids)?;
        match xn {
            Some(n) => {
                let dims = fwd::bld("gather_rows", x)?;
                Ok(self.record(Op::Gather { x: n, ids: ids.to_vec(), dims }, y))
            }
            None => Ok(y),
        }
    }

    fn unshuffle(&mut self, x: &Value<B>, fill: &Value<B>, restore: &[usize]) -> Result<Value<B>> {
        let (xn, fnode) = (self.check_node(x)?, self.check_node(fill)?);
        let (y, table) = fwd::unshuffle(&self.backend, x, fill, restore)?;
        if xn.is_none() && fnode.is_none() {
            return Ok(y);
        }
        let dims = fwd::bld("unshuffle", x)?;
        Ok(self.record(Op::Unshuffle { x: xn, fill: fnode, restore: restore.to_vec(), dims, table }, y))
    }

    fn mean_tokens(&mut self, x: &Value<B>, skip_first: bool) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let y = fwd::mean_tokens(&self.backend, x, skip_first)?;
        match xn {
            Some(n) => {
                let dims = fwd::bld("mean_tokens", x)?;
                Ok(self.record(Op::MeanTokens { x: n, dims, skip_first }, y))
            }
            None => Ok(y),
        }
    }

    fn adaptive_avg_pool(&mut self, x: &Value<B>, size: (usize, usize)) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let (planes, hw) = fwd::pool_dims(x, size)?;
        let y = fwd::adaptive_avg_pool(&self.backend, x, size)?;
        Ok(self.record_unary(xn, y, |x, _| Op::AdaptiveAvgPool { x, planes, hw, out_hw: size }))
    }

    fn upsample_bilinear(&mut self, x: &Value<B>, size: (usize, usize), align_corners: bool) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let (planes, hw) = fwd::plane_dims("upsample_bilinear", x, size)?;
        let y = fwd::upsample_bilinear(&self.backend, x, size, align_corners)?;
        Ok(self.record_unary(xn, y, |x, _| Op::Bilinear { x, planes, hw, out_hw: size, align_corners }))
    }

    fn adaptive_max_pool(&mut self, x: &Value<B>, size: (usize, usize)) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let (y, idx) = fwd::adaptive_max_pool(&self.backend, x, size)?;
        let in_len = x.numel();
        Ok(self.record_unary(xn, y, |x, _| Op::AdaptiveMaxPool { x, idx, in_len }))
    }

    fn gelu(&mut self, x: &Value<B>) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let y = fwd::gelu(&self.backend, x)?;
        Ok(self.record_unary(xn, y, |n, _| Op::Gelu { x: n, x_val: x.buf.clone() }))
    }

    fn group_norm(&mut self, x: &Value<B>, groups: usize, w: &ParamRef, b: &ParamRef, eps: f32) -> Result<Value<B>> {
        Ok(self.group_norm_stats(x, groups, w, b, eps)?.0)
    }

    fn batch_norm(&mut self, x: &Value<B>, bn: &BatchNorm) -> Result<Value<B>> {
        // Training mode: each channel normalised over (batch, spatial) is a GroupNorm of one group
        // per channel over the (channels, batch, spatial) layout; its backward comes with it.
        let (n, c, s) = fwd::channel_dims("batch_norm", x)?;
        if [&bn.running_mean, &bn.running_var].iter().any(|p| p.shape != [c]) {
            return Err(TensorError::Shape {
                op: "batch_norm",
                msg: format!("running statistics of {:?} for {c} channels", bn.running_mean.shape),
            });
        }
        let m = n * s;
        if m < 2 {
            return Err(TensorError::Arg {
                op: "batch_norm",
                msg: format!("training needs more than one value per channel, got input {:?}", x.shape),
            });
        }
        let t = self.reshape(x, &[n, c, s])?;
        let t = self.permute(&t, &[1, 0, 2])?;
        let t = self.reshape(&t, &[1, c, m])?;
        let (y, mean, rstd) = self.group_norm_stats(&t, c, &bn.weight, &bn.bias, bn.eps)?;
        let y = self.reshape(&y, &[c, n, s])?;
        let y = self.permute(&y, &[1, 0, 2])?;
        let y = self.reshape(&y, &x.shape)?;
        // Running statistics as PyTorch keeps them: the unbiased batch variance.
        let mom = bn.momentum as f64;
        let old = |p: &ParamRef| self.store.values(p).to_vec();
        let (rm, rv) = (old(&bn.running_mean), old(&bn.running_var));
        let new_mean = rm.iter().zip(&mean).map(|(&o, &b)| ((1.0 - mom) * o as f64 + mom * b) as f32).collect();
        let new_var = rv
            .iter()
            .zip(&rstd)
            .map(|(&o, &r)| {
                let var = (1.0 / (r * r) - bn.eps as f64).max(0.0) * m as f64 / (m - 1) as f64;
                ((1.0 - mom) * o as f64 + mom * var) as f32
            })
            .collect();
        self.running.push((bn.running_mean.clone(), new_mean));
        self.running.push((bn.running_var.clone(), new_var));
        Ok(y)
    }

    fn concat(&mut self, parts: &[&Value<B>], axis: usize) -> Result<Value<B>> {
        let nodes = parts.iter().map(|p| self.check_node(p)).collect::<Result<Vec<_>>>()?;
        let (outer, widths, _) = fwd::concat_dims(parts, axis)?;
        let y = fwd::concat(&self.backend, parts, axis)?;
        if nodes.iter().all(Option::is_none) {
            return Ok(y);
        }
        Ok(self.record(Op::Concat { parts: nodes, outer, widths }, y))
    }

    fn conv_transpose2d(
        &mut self,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
    ) -> Result<Value<B>> {
        self.conv(x, w, b, stride, pad, true)
    }

    fn relu(&mut self, x: &Value<B>) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let y = fwd::relu(&self.backend, x)?;
        Ok(self.record_unary(xn, y, |x, y| Op::Relu { x, y: y.buf.clone() }))
    }

    fn conv2d(
        &mut self,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
    ) -> Result<Value<B>> {
        self.conv(x, w, b, stride, pad, false)
    }

    fn permute(&mut self, x: &Value<B>, perm: &[usize]) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let y = fwd::permute(&self.backend, x, perm)?;
        Ok(self.record_unary(xn, y, |x, y| Op::Permute { x, out_shape: y.shape.clone(), perm: perm.to_vec() }))
    }

    fn reshape(&mut self, x: &Value<B>, shape: &[usize]) -> Result<Value<B>> {
        let xn = self.check_node(x)?;
        let mut y = fwd::reshape(x, shape)?;
        y.node = None;
        Ok(self.record_unary(xn, y, |x, _| Op::Reshape { x }))
    }

    fn mae_loss(
        &mut self,
        pred: &Value<B>,
        target: &Value<B>,
        mask: &[f32],
        groups: usize,
        spectral_angle: Option<sg_tensor::backend::SpectralAngle>,
    ) -> Result<(Value<B>, sg_tensor::backend::MaeLoss)> {
        let pn = self.check_node(pred)?;
        let (v, l, dims) = fwd::mae_loss(&self.backend, pred, target, mask, groups, spectral_angle)?;
        Ok(match pn {
            Some(n) => {
                let op = Op::MaeLoss {
                    pred: n,
                    pred_val: pred.buf.clone(),
                    target: target.buf.clone(),
                    mask: mask.to_vec(),
                    dims,
                };
                (self.record(op, v), l)
            }
            None => (v, l),
        })
    }

    fn cross_entropy(&mut self, logits: &Value<B>, targets: &[f32]) -> Result<(Value<B>, f64)> {
        let ln = self.check_node(logits)?;
        let (v, l, classes) = fwd::cross_entropy(&self.backend, logits, targets)?;
        Ok(match ln {
            Some(n) => {
                let op =
                    Op::CrossEntropy { logits: n, logits_val: logits.buf.clone(), targets: targets.to_vec(), classes };
                (self.record(op, v), l)
            }
            None => (v, l),
        })
    }

    fn multilabel_soft_margin(&mut self, logits: &Value<B>, targets: &[f32]) -> Result<(Value<B>, f64)> {
        let ln = self.check_node(logits)?;
        let (v, l, classes) = fwd::multilabel_soft_margin(&self.backend, logits, targets)?;
        Ok(match ln {
            Some(n) => {
                let op = Op::MultiLabelSoftMargin {
                    logits: n,
                    logits_val: logits.buf.clone(),
                    targets: targets.to_vec(),
                    classes,
                };
                (self.record(op, v), l)
            }
            None => (v, l),
        })
    }

    fn weighted_cross_entropy(
        &mut self,
        logits: &Value<B>,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
    ) -> Result<(Value<B>, f64)> {
        let ln = self.check_node(logits)?;
        let (v, l) = fwd::weighted_cross_entropy(&self.backend, logits, labels, weights, ignore)?;
        Ok(match ln {
            Some(n) => {
                let op = Op::WeightedCrossEntropy {
                    logits: n,
                    logits_val: logits.buf.clone(),
                    labels: labels.to_vec(),
                    weights: weights.to_vec(),
                    ignore,
                };
                (self.record(op, v), l)
            }
            None => (v, l),
        })
    }

    fn dropout(&mut self, x: &Value<B>, p: f32) -> Result<Value<B>> {
        self.dropout_op(x, p, 1)
    }

    fn drop_path(&mut self, x: &Value<B>, p: f32) -> Result<Value<B>> {
        let per_sample = x.numel() / x.shape.first().copied().unwrap_or(1).max(1);
        self.dropout_op(x, p, per_sample.max(1))
    }
}
