//! `cargo xtask parity FIXTURE.safetensors`: reproduces a PyTorch reference dump.
//!
//! The fixture's metadata `config` sets the model; the parameters present decide which model
//! (`param.decoder_embed.weight`: pretraining; `param.head.weight`: classifier;
//! `param.cls_seg.0.weight`: the segmentation head on given encoder features). Every `param.*` is
//! loaded (strictly: missing, extra or mis-shaped tensors are errors), the forward and backward run
//! on the f32 CPU tape, and every `output.*` and `grad.*` is compared: outputs and losses within
//! 1e-5 relative (1e-6 absolute) elementwise, gradients within 1e-4 of each tensor's largest value
//! (gradients that vanish in exact arithmetic: see `grad_check`). The model's outputs are also run
//! in f64 ([`CpuF64`]), and their allowance grows by the reference's own worst distance from that
//! run (see `exact_check`): PyTorch rounds in f32 too.

use std::path::Path;

use sg_autograd::Tape;
use sg_mae3d::{Mae3d, MaeConfig, Masking};
use sg_tensor::backend::{Cpu, CpuF64};
use sg_tensor::io::{load_params, SafetensorsFile};
use sg_tensor::kernels::linear::Activation;
use sg_tensor::{Eval, Exec, ParamStore, Result, TensorError};
use sg_vit::config::{parse_json, PosEmbed, VitConfig};
use sg_vit::Vit;

/// One compared tensor.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub max_abs_err: f64,
    /// The worst error divided by its allowance: `<= 1` passes.
    pub ratio: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.ratio <= 1.0
    }
}

/// Everything compared for one fixture.
#[derive(Clone, Debug)]
pub struct Report {
    pub model: &'static str,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> TensorError {
    TensorError::Format { path: path.display().to_string(), msg: msg.into() }
}

/// Output comparison: `|got - want| <= 1e-6 + 1e-5 |want|` for every element.
fn output_check(name: &str, got: &[f64], want: &[f32]) -> Check {
    within(name, got, want, 0.0)
}

/// `|got - want| <= 1e-6 + 1e-5 |want| + extra` for every element; a length mismatch fails.
fn within(name: &str, got: &[f64], want: &[f32], extra: f64) -> Check {
    let mut max_abs: f64 = 0.0;
    let mut ratio: f64 = if got.len() == want.len() { 0.0 } else { f64::INFINITY };
    for (&g, &w) in got.iter().zip(want) {
        let e = abs_diff(g, w as f64);
        max_abs = max_abs.max(e);
        ratio = ratio.max(e / (1e-6 + 1e-5 * (w as f64).abs() + extra));
    }
    Check { name: name.to_string(), max_abs_err: max_abs, ratio }
}

/// Output comparison against the reference `want` and the same model run in f64, `exact`:
/// `|got - want| <= 1e-6 + 1e-5 |want| + r` for every element, where `r = max |want - exact|` is
/// the reference's own worst rounding error in this tensor. Both sides round in f32, and ours can
/// not be held closer to PyTorch than PyTorch is to exact arithmetic. Why: in the small pretraining
/// fixture PyTorch's encoder output is up to 1.8e-6 from the f64 run (ours: 1.5-1.6e-6, the same
/// RMS error, 3.3e-7 against 3.5e-7), so against PyTorch alone the plain 1e-6 floor passed or
/// failed by the order of a sum. Where the reference is accurate, `r` is small and the check stays
/// as tight as [`output_check`].
fn exact_check(name: &str, got: &[f64], want: &[f32], exact: &[f64]) -> Check {
    if exact.len() != want.len() {
        return Check { name: name.to_string(), max_abs_err: f64::INFINITY, ratio: f64::INFINITY };
    }
    let r = want.iter().zip(exact).map(|(&w, &x)| abs_diff(w as f64, x)).fold(0.0, f64::max);
    within(name, got, want, r)
}

/// `|got - want|`, infinite where exactly one of them is NaN: `f64::max` skips a NaN, so a NaN
/// output would otherwise pass every comparison.
fn abs_diff(got: f64, want: f64) -> f64 {
    match (got.is_nan(), want.is_nan()) {
        // Equal infinities are equal (their difference would be NaN).
        (false, false) if got == want => 0.0,
        (false, false) => (got - want).abs(),
        (true, true) => 0.0,
        _ => f64::INFINITY,
    }
}

/// Below this fraction of the model's largest gradient, a reference gradient is rounding noise.
const VANISHING: f64 = 1e-6;

/// Gradient comparison: `max |got - want| <= 1e-4 max |want|`. A gradient that is identically zero
/// in exact arithmetic (a key bias: softmax ignores a shift shared by all keys; q and k with one
/// visible token) holds only rounding noise in the reference; there we require ours to be at
/// rounding level too, `max |got| <= 1e-6` of the model's largest gradient.
fn grad_check(name: &str, got: &[f64], want: &[f32], model_scale: f64) -> Check {
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs()));
    let max_abs = got.iter().zip(want).map(|(&g, &w)| abs_diff(g, w as f64)).fold(0.0, f64::max);
    if got.len() != want.len() {
        return Check { name: name.to_string(), max_abs_err: max_abs, ratio: f64::INFINITY };
    }
    if scale <= VANISHING * model_scale {
        let ours = got.iter().fold(0f64, |m, &g| m.max(abs_diff(g, 0.0)));
        return Check {
            name: format!("{name} (vanishing)"),
            max_abs_err: max_abs,
            ratio: ours / (VANISHING * model_scale).max(f64::MIN_POSITIVE),
        };
    }
    Check { name: name.to_string(), max_abs_err: max_abs, ratio: max_abs / (1e-4 * scale) }
}

fn int_check(name: &str, got: &[usize], want: &[i64]) -> Check {
    let same = got.len() == want.len() && got.iter().zip(want).all(|(&g, &w)| g as i64 == w);
    Check {
        name: name.to_string(),
        max_abs_err: if same { 0.0 } else { 1.0 },
        ratio: if same { 0.0 } else { f64::INFINITY },
    }
}

fn load_strict(store: &mut ParamStore, f: &SafetensorsFile) -> Result<()> {
    let report = load_params(store, f, "param.", true)?;
    if !report.unexpected.is_empty() {
        return Err(fmt_err(f.path(), format!("has parameters the model lacks: {}", report.unexpected.join(", "))));
    }
    Ok(())
}

fn image(f: &SafetensorsFile, cfg: &VitConfig) -> Result<(usize, Vec<f32>)> {
    let (shape, x) = f.f32("input.x")?;
    match shape[..] {
        [n, b, h, w] if b == cfg.bands && (h, w) == cfg.img_size => Ok((n, x)),
        _ => Err(fmt_err(
            f.path(),
            format!(
                "input.x has shape {shape:?}, the config wants (N, {}, {}, {})",
                cfg.bands, cfg.img_size.0, cfg.img_size.1
            ),
        )),
    }
}

/// Runs one fixture.
pub fn run(path: impl AsRef<Path>) -> Result<Report> {
    let path = path.as_ref();
    let f = SafetensorsFile::open(path)?;
    let meta = f.metadata();
    let config = meta.get("config").ok_or_else(|| fmt_err(path, "has no `config` metadata"))?;
    let json = parse_json(config, &format!("{} (config)", path.display()))?;
    if f.contains("param.decoder_embed.weight") {
        run_mae(&f, &json)
    } else if f.contains("param.head.weight") {
        run_classifier(&f, &json)
    } else if f.contains("param.cls_seg.0.weight") {
        run_dense(&f, &json)
    } else {
        Err(fmt_err(path, "holds no pretraining model (decoder_embed), classifier (head) or dense head (cls_seg)"))
    }
}

fn run_mae(f: &SafetensorsFile, json: &serde_json::Value) -> Result<Report> {
    let mut cfg = MaeConfig::preset("tiny", 16)?;
    cfg.update_from_json(json)?;
    let mut store = ParamStore::new();
    let model = Mae3d::new(cfg.clone(), &mut store, 0)?;
    load_strict(&mut store, f)?;
    let (n, x) = image(f, &cfg.encoder)?;
    let tokens = model.encoder.tokens(&x, n)?;
    let (l, td) = (cfg.encoder.tokens(), cfg.encoder.token_dim());
    let (_, noise) = f.f32("input.noise")?;
    let m = Masking::from_noise(&noise, n, l, cfg.mask_ratio)?;

    let mut checks = Vec::new();
    // The patch embedding alone, on an inference executor, and the model in f64.
    {
        let mut e = Eval::new(Cpu, &store);
        let t = e.constant(&tokens, &[n, l, td])?;
        let pe = model.encoder.patch_embed.forward(&mut e, &t, Activation::Identity)?;
        let mut x = Eval::new(CpuF64, &store);
        let tx = x.constant(&tokens, &[n, l, td])?;
        let pex = model.encoder.patch_embed.forward(&mut x, &tx, Activation::Identity)?;
        let want = f.f32("output.patch_embed_out")?.1;
        checks.push(exact_check("output.patch_embed_out", &e.read(&pe), &want, &x.read(&pex)));
    }
    let exact = {
        let mut x = Eval::new(CpuF64, &store);
        let t = x.constant(&tokens, &[n, l, td])?;
        let out = model.forward(&mut x, &t, &m)?;
        (x.read(&out.encoder_out), x.read(&out.pred))
    };
    let mut tape = Tape::new(Cpu, &store);
    let t = tape.constant(&tokens, &[n, l, td])?;
    let out = model.forward(&mut tape, &t, &m)?;
    let (enc, pred) = (tape.read(&out.encoder_out), tape.read(&out.pred));
    checks.push(exact_check("output.encoder_out", &enc, &f.f32("output.encoder_out")?.1, &exact.0));
    checks.push(exact_check("output.pred", &pred, &f.f32("output.pred")?.1, &exact.1));
    let tokens64: Vec<f64> = tokens.iter().map(|&v| v as f64).collect();
    checks.push(output_check("output.target", &tokens64, &f.f32("output.target")?.1));
    let mask64: Vec<f64> = m.mask.iter().map(|&v| v as f64).collect();
    checks.push(output_check("output.mask", &mask64, &f.f32("output.mask")?.1));
    checks.push(int_check("output.ids_restore", &m.ids_restore, &f.i64("output.ids_restore")?.1));
    checks.push(int_check("output.ids_keep", &m.ids_keep, &f.i64("output.ids_keep")?.1));
    for (name, v) in
        [("output.loss1", out.parts.loss1), ("output.loss3", out.parts.loss3), ("output.loss", out.parts.loss)]
    {
        checks.push(output_check(name, &[v], &f.f32(name)?.1));
    }
    let grads = tape.backward(&out.loss)?;
    checks.extend(compare_grads(&store, &grads.buf, f)?);
    Ok(Report { model: "pretraining (Mae3d)", checks })
}

fn run_classifier(f: &SafetensorsFile, json: &serde_json::Value) -> Result<Report> {
    let mut cfg = VitConfig::preset("tiny", 16)?;
    cfg.pos_embed = PosEmbed::Joined;
    cfg.update_from_json(json)?;
    if cfg.num_classes == 0 {
        return Err(fmt_err(f.path(), "a classifier fixture without num_classes"));
    }
    let mut store = ParamStore::new();
    let model = Vit::new(cfg.clone(), &mut store, 0)?;
    load_strict(&mut store, f)?;
    let (n, x) = image(f, &cfg)?;
    let tokens = model.tokens(&x, n)?;
    let (_, labels) = f.i64("input.labels")?;
    let c = cfg.num_classes;
    let mut targets = vec![0f32; n * c];
    for (i, &y) in labels.iter().enumerate() {
        if y < 0 || y as usize >= c {
            return Err(fmt_err(f.path(), format!("label {y} outside {c} classes")));
        }
        targets[i * c + y as usize] = 1.0;
    }
    let shape = [n, cfg.tokens(), cfg.token_dim()];
    let exact = {
        let mut x = Eval::new(CpuF64, &store);
        let t = x.constant(&tokens, &shape)?;
        let (feats, logits) = (model.features(&mut x, &t)?, model.logits(&mut x, &t)?);
        (x.read(&feats), x.read(&logits))
    };
    let mut tape = Tape::new(Cpu, &store);
    let t = tape.constant(&tokens, &shape)?;
    let feats = model.features(&mut tape, &t)?;
    let logits = model.logits(&mut tape, &t)?;
    let (loss, l) = tape.cross_entropy(&logits, &targets)?;
    let mut checks = vec![
        exact_check("output.tokens_out", &tape.read(&feats), &f.f32("output.tokens_out")?.1, &exact.0),
        exact_check("output.logits", &tape.read(&logits), &f.f32("output.logits")?.1, &exact.1),
        output_check("output.loss", &[l], &f.f32("output.loss")?.1),
    ];
    let grads = tape.backward(&loss)?;
    checks.extend(compare_grads(&store, &grads.buf, f)?);
    Ok(Report { model: "classifier (Vit)", checks })
}

/// The segmentation head on given encoder features (`tools/upernet_reference.py`).
fn run_dense(f: &SafetensorsFile, json: &serde_json::Value) -> Result<Report> {
    let num = |k: &str| json.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let grid = json.get("grid").and_then(|g| g.get(0)).and_then(|v| v.as_u64()).map(|v| v as usize);
    let (Some(t), Some(d), Some(ch), Some(fpn), Some(classes), Some(g)) =
        (num("t"), num("embed_dim"), num("channels"), num("fpn"), num("classes"), grid)
    else {
        return Err(fmt_err(f.path(), "a dense fixture needs t, embed_dim, channels, fpn, classes and grid"));
    };
    let mut enc = VitConfig::preset("tiny", g * 8)?;
    (enc.bands, enc.embed_dim, enc.depth, enc.num_heads) = (t * enc.t_patch_size, d, 1, 1);
    let mut cfg = sg_heads::DenseConfig::new(enc, classes);
    (cfg.channels, cfg.fpn, cfg.dropout) = (ch, fpn, 0.0);
    let mut store = ParamStore::new();
    let model = sg_heads::UperNet::new(cfg, &mut store, 0)?;
    let report = load_params(&mut store, f, "param.", false)?;
    if !report.unexpected.is_empty() {
        return Err(fmt_err(f.path(), format!("has parameters the model lacks: {}", report.unexpected.join(", "))));
    }
    let (fshape, feats) = f.f32("input.features")?;
    let fref = store.add("features", &fshape, feats)?;
    let labels: Vec<usize> = f.f32("input.labels")?.1.iter().map(|&v| v as usize).collect();
    let weights = f.f32("input.weights")?.1;
    let exact = {
        let mut e = Eval::new(CpuF64, &store);
        let x = e.param(&fref)?;
        let map = model.merge(&mut e, &x)?;
        let logits = model.decode(&mut e, &map)?;
        e.read(&logits)
    };
    let mut tape = Tape::new(Cpu, &store);
    let x = tape.param(&fref)?;
    let map = model.merge(&mut tape, &x)?;
    let logits = model.decode(&mut tape, &map)?;
    let (loss, l) = sg_heads::UperNet::pixel_loss(&mut tape, &logits, &labels, &weights, 255)?;
    let mut checks = vec![
        exact_check("output.logits", &tape.read(&logits), &f.f32("output.logits")?.1, &exact),
        output_check("output.loss", &[l], &f.f32("output.loss")?.1),
    ];
    let grads = tape.backward(&loss)?;
    let entries: Vec<_> = store.entries().iter().filter(|e| f.contains(&format!("grad.{}", e.name))).collect();
    let want = entries.iter().map(|e| f.f32(&format!("grad.{}", e.name))).collect::<Result<Vec<_>>>()?;
    let model_scale = want.iter().flat_map(|(_, w)| w.iter()).fold(0f64, |m, &w| m.max((w as f64).abs()));
    for (e, (_, w)) in entries.iter().zip(&want) {
        let got: Vec<f64> = grads.buf[e.param.range()].iter().map(|&v| v as f64).collect();
        checks.push(grad_check(&format!("grad.{}", e.name), &got, w, model_scale));
    }
    Ok(Report { model: "segmentation head (UperNet)", checks })
}

fn compare_grads(store: &ParamStore, grads: &[f32], f: &SafetensorsFile) -> Result<Vec<Check>> {
    let want: Vec<(String, Vec<f32>)> = store
        .entries()
        .iter()
        .map(|e| {
            let key = format!("grad.{}", e.name);
            Ok((key.clone(), f.f32(&key)?.1))
        })
        .collect::<Result<_>>()?;
    let model_scale = want.iter().flat_map(|(_, w)| w.iter()).fold(0f64, |m, &w| m.max((w as f64).abs()));
    Ok(store
        .entries()
        .iter()
        .zip(&want)
        .map(|(e, (key, w))| {
            let got: Vec<f64> = grads[e.param.range()].iter().map(|&v| v as f64).collect();
            grad_check(key, &got, w, model_scale)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_may_differ_by_the_references_own_rounding_and_no_more() {
        // The reference is 3e-6 off exact arithmetic at its second element.
        let (exact, want) = ([1.0f64, 0.0, -2.0], [1.0f32, 3e-6, -2.0]);
        // 1.2e-5 from the reference at the first: over the plain 1e-6 + 1e-5 allowance, within it
        // plus the reference's own 3e-6.
        let got = [1.0 + 1.2e-5, 3e-6, -2.0];
        assert!(!output_check("x", &got, &want).passed());
        assert!(exact_check("x", &got, &want, &exact).passed());
        // A real error, a NaN and a wrong length still fail.
        assert!(!exact_check("x", &[1.0 + 1e-4, 3e-6, -2.0], &want, &exact).passed());
        assert!(!exact_check("x", &[f64::NAN, 3e-6, -2.0], &want, &exact).passed());
        assert!(!exact_check("x", &got[..2], &want, &exact).passed());
        // With an exact reference the check is the plain one.
        let want_exact = [1.0f32, 0.0, -2.0];
        let exact0 = [1.0f64, 0.0, -2.0];
        assert!(!exact_check("x", &got, &want_exact, &exact0).passed());
    }
}
