//! Full fine-tuning (Break-A-Scene's phase 2): every U-Net and text-encoder weight as a
//! Var (`model::full`). The models built over the Vars compute what the loaded ones do;
//! every kind of weight gets the gradient central finite differences give (f64, through
//! the text encoder into the U-Net); the delta file holds exactly what changed and
//! `apply_delta` rebuilds the trained model from it; checkpoints round-trip.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use magictailor::model::full::{apply_delta, FullWeights};
use magictailor::model::loader::{SingleFileOptions, StableDiffusion};
use magictailor::model::nn::Ctx;
use magictailor::rng::seeded_normal;
use magictailor::testkit::tolerance::rel_err_f64;

fn load(model: &str, dtype: DType) -> StableDiffusion {
    StableDiffusion::load(model, &Device::Cpu, dtype).unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// Two prompts' token ids `[2, 77]`, latents `[2, 4, 8, 8]` and two timesteps.
struct Inputs {
    ids: Tensor,
    x: Tensor,
    t: Tensor,
}

fn inputs(sd: &StableDiffusion) -> Inputs {
    let dev = Device::Cpu;
    let ids: Vec<u32> = ["a photo of a cat", "a dog on the beach"]
        .iter()
        .flat_map(|p| sd.tokenizer.encode(p).unwrap())
        .collect();
    Inputs {
        ids: Tensor::from_vec(ids, (2, 77), &dev).unwrap(),
        x: seeded_normal(2, (2, 4, 8, 8), &dev)
            .unwrap()
            .to_dtype(sd.dtype)
            .unwrap(),
        t: Tensor::new(&[37f32, 801.], &dev).unwrap(),
    }
}

/// The text encoder's output and the U-Net's on it.
fn outputs(
    text: &magictailor::model::clip::ClipTextModel,
    unet: &magictailor::model::unet::UNet,
    i: &Inputs,
) -> (Tensor, Tensor) {
    let ctx = text.forward(&i.ids, None).unwrap();
    let out = unet.forward(&i.x, &i.t, &ctx, Ctx::default()).unwrap();
    (ctx, out)
}

fn find<'a>(full: &'a [(String, Var)], name: &str) -> &'a Var {
    &full
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no Var {name}"))
        .1
}

#[test]
fn models_over_the_vars_compute_what_the_loaded_ones_do() {
    for fam in &FAMILIES {
        for dtype in [DType::F64, DType::F32] {
            let sd = load(&fam.model(), dtype);
            let full = FullWeights::of(&sd).unwrap();
            let i = inputs(&sd);
            let (text, out) = outputs(&sd.text_encoder, &sd.unet, &i);
            for tracked in [true, false] {
                let (t2, u2) = (
                    full.text_encoder(dtype, tracked).unwrap(),
                    full.unet(dtype, tracked).unwrap(),
                );
                // The same context into both U-Nets, so each model is compared alone.
                let text2 = t2.forward(&i.ids, None).unwrap();
                let out2 = u2.forward(&i.x, &i.t, &text, Ctx::default()).unwrap();
                assert_eq!(text2.track_op(), tracked);
                assert_eq!(out2.track_op(), tracked);
                let (dt, du) = (rel_err_f64(&text2, &text), rel_err_f64(&out2, &out));
                println!(
                    "{} {dtype:?} tracked {tracked}: text {dt:.2e}, U-Net {du:.2e}",
                    fam.name
                );
                // Untracked: the same frozen ops on the same values. Tracked: the
                // composed ops, equal to rounding.
                let tol = match (tracked, dtype) {
                    (false, _) => 0.0,
                    (true, DType::F64) => 1e-13,
                    (true, _) => 1e-5,
                };
                assert!(
                    dt <= tol && du <= tol,
                    "{} {dtype:?} tracked {tracked}",
                    fam.name
                );
            }
        }
    }
}

/// The Vars of the SD 2.x tiny model, the inputs, and the pipeline's scalar loss.
struct Setup {
    sd: StableDiffusion,
    full: FullWeights,
    named: Vec<(String, Var)>,
    i: Inputs,
    w_out: Tensor,
}

impl Setup {
    fn new(model: &str) -> Self {
        let sd = load(model, DType::F64);
        let full = FullWeights::of(&sd).unwrap();
        let i = inputs(&sd);
        let w_out = seeded_normal(3, (2, 4, 8, 8), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        Self {
            named: full.named(),
            sd,
            full,
            i,
            w_out,
        }
    }

    /// text encoder (reading the token table Var as its table) -> U-Net -> sum(out * w).
    fn loss(&self, tracked: bool) -> Tensor {
        let text = self.full.text_encoder(DType::F64, tracked).unwrap();
        let unet = self.full.unet(DType::F64, tracked).unwrap();
        let table = match tracked {
            true => self.full.token_table().as_tensor().clone(),
            false => self.full.token_table().as_detached_tensor(),
        };
        let ctx = (text.forward_with_table(&self.i.ids, Some(&table), None)).unwrap();
        let out = unet
            .forward(&self.i.x, &self.i.t, &ctx, Ctx::default())
            .unwrap();
        (out * &self.w_out).unwrap().sum_all().unwrap()
    }

    fn value(&self) -> f64 {
        self.loss(false).to_scalar::<f64>().unwrap()
    }
}

/// d loss / d var[idx] against a central difference; returns the relative error. The
/// Vars are f32: the steps are the f32 values actually taken, the loss is computed in f64.
fn check(s: &Setup, name: &str, grads: &candle_core::backprop::GradStore, idx: usize) -> f64 {
    let var = find(&s.named, name);
    let g = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"));
    let analytic = g.flatten_all().unwrap().to_vec1::<f32>().unwrap()[idx] as f64;
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let h = 2f32.powi(-13) * orig[idx].abs().max(0.5);
    let at = |w: f32| {
        let mut v = orig.clone();
        v[idx] = w;
        var.set(&Tensor::from_vec(v, var.shape().clone(), &Device::Cpu).unwrap())
            .unwrap();
        s.value()
    };
    let (up, down) = (orig[idx] + h, orig[idx] - h);
    let numeric = (at(up) - at(down)) / (up as f64 - down as f64);
    var.set(&Tensor::from_vec(orig, var.shape().clone(), &Device::Cpu).unwrap())
        .unwrap();
    // Relative to the entry, or to a thousandth of the tensor's largest entry where the
    // entry is smaller (candle's gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942, off
    // by 7e-7, which shows in small entries through the text encoder's MLP).
    let largest = g
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let err = (analytic - numeric).abs() / numeric.abs().max(1e-3 * largest);
    println!("{name}[{idx}]: analytic {analytic:.8e}, numeric {numeric:.8e}, rel err {err:.1e}");
    assert!(
        err < 1e-5,
        "{name}[{idx}]: analytic {analytic}, numeric {numeric}, rel err {err}"
    );
    err
}

/// Entries to check in a gradient: the largest, and two fixed ones.
fn picks(g: &Tensor) -> Vec<usize> {
    let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let largest = (0..v.len())
        .max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()))
        .unwrap();
    let mut p = vec![largest, 0, v.len() / 2 + 1];
    p.dedup();
    p
}

#[test]
fn every_kind_of_weight_gets_its_finite_difference_gradient() {
    let s = Setup::new(&tiny_sd());
    let grads = s.loss(true).backward().unwrap();
    // Every weight the models read gets a gradient, nothing dropped on the way.
    for (name, v) in &s.named {
        assert!(grads.get(v.as_tensor()).is_some(), "{name}: no gradient");
    }
    let attn = "unet.down_blocks.1.attentions.0";
    let block = format!("{attn}.transformer_blocks.0");
    let names = [
        // convolutions: 3x3, strided, 1x1, after the upsampler, bias
        "unet.conv_in.weight".to_string(),
        "unet.down_blocks.0.resnets.1.conv1.weight".into(),
        "unet.down_blocks.0.downsamplers.0.conv.weight".into(),
        "unet.down_blocks.1.resnets.0.conv_shortcut.weight".into(),
        "unet.up_blocks.1.upsamplers.0.conv.weight".into(),
        "unet.conv_out.bias".into(),
        // GroupNorms: with SiLU (resnets, the output) and without (transformer)
        "unet.down_blocks.0.resnets.0.norm1.weight".into(),
        "unet.down_blocks.0.resnets.0.norm2.bias".into(),
        format!("{attn}.norm.weight"),
        format!("{attn}.norm.bias"),
        "unet.conv_norm_out.weight".into(),
        // transformer LayerNorms
        format!("{block}.norm1.weight"),
        format!("{block}.norm2.bias"),
        // linears
        format!("{block}.attn1.to_q.weight"),
        format!("{block}.attn2.to_k.weight"),
        format!("{block}.attn2.to_out.0.bias"),
        format!("{block}.ff.net.0.proj.weight"),
        format!("{block}.ff.net.2.bias"),
        format!("{attn}.proj_in.weight"),
        format!("{attn}.proj_in.bias"),
        "unet.time_embedding.linear_1.weight".into(),
        "unet.time_embedding.linear_1.bias".into(),
        "unet.down_blocks.0.resnets.0.time_emb_proj.weight".into(),
        "unet.down_blocks.0.resnets.0.time_emb_proj.bias".into(),
        // the text encoder
        "text_encoder.embeddings.position_embedding.weight".into(),
        "text_encoder.encoder.layers.0.layer_norm1.weight".into(),
        "text_encoder.final_layer_norm.bias".into(),
        "text_encoder.encoder.layers.0.self_attn.q_proj.weight".into(),
        "text_encoder.encoder.layers.1.self_attn.q_proj.bias".into(),
        "text_encoder.encoder.layers.0.mlp.fc1.weight".into(),
    ];
    let mut worst = 0f64;
    for name in &names {
        let g = grads.get(find(&s.named, name).as_tensor()).unwrap();
        for idx in picks(g) {
            worst = worst.max(check(&s, name, &grads, idx));
        }
    }
    // The token table: rows of tokens the prompts use, and the table is the Var itself.
    let table = "text_encoder.embeddings.token_embedding.weight";
    let table_var = find(&s.named, table).as_tensor();
    assert_eq!(table_var.id(), s.full.token_table().as_tensor().id());
    let hidden = s.sd.text_encoder.config.hidden_size;
    for word in ["photo", "cat"] {
        let id = s.sd.tokenizer.encode(word).unwrap()[1] as usize;
        for j in [0, 7] {
            worst = worst.max(check(&s, table, &grads, id * hidden + j));
        }
    }
    println!("worst relative error {worst:.1e}");
}

/// SD 1.x: proj_in/proj_out are stored as 1x1 convolutions `[c, c, 1, 1]` and read as
/// linears through a reshape of the Var; quick_gelu in the text encoder.
#[test]
fn sd1_projection_stored_as_a_convolution_gets_its_gradient() {
    let s = Setup::new(&SD1.model());
    let grads = s.loss(true).backward().unwrap();
    for (name, v) in &s.named {
        assert!(grads.get(v.as_tensor()).is_some(), "{name}: no gradient");
    }
    let name = "unet.down_blocks.1.attentions.0.proj_in.weight";
    assert_eq!(find(&s.named, name).dims().len(), 4);
    for name in [name, "text_encoder.encoder.layers.1.mlp.fc2.weight"] {
        let g = grads.get(find(&s.named, name).as_tensor()).unwrap();
        for idx in picks(g) {
            check(&s, name, &grads, idx);
        }
    }
}

fn scaled(v: &Var, by: f64) {
    v.set(&(v.as_tensor().detach() * by).unwrap().copy().unwrap())
        .unwrap();
}

fn write(path: &Path, t: &HashMap<String, Tensor>) {
    magictailor::io::tensors::write(path, t, None).unwrap();
}

#[test]
fn delta_holds_what_changed_and_apply_delta_rebuilds_the_trained_model() {
    let sd = load(&tiny_sd(), DType::F64);
    let full = FullWeights::of(&sd).unwrap();
    assert!(full.delta(&sd).unwrap().is_empty(), "untouched weights");
    let named = full.named();
    let changed = [
        "unet.conv_in.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "unet.mid_block.resnets.0.norm1.bias",
        "text_encoder.embeddings.token_embedding.weight",
        "text_encoder.encoder.layers.1.layer_norm2.weight",
    ];
    let mut before = HashMap::new();
    for name in changed {
        let v = find(&named, name);
        before.insert(name, v.as_tensor().copy().unwrap());
        scaled(v, 1.5);
    }
    let delta = full.delta(&sd).unwrap();
    let mut keys: Vec<&str> = delta.keys().map(String::as_str).collect();
    keys.sort();
    let mut want = changed.to_vec();
    want.sort();
    assert_eq!(keys, want);
    for name in changed {
        let d = &delta[name];
        assert_eq!((d.dtype(), d.device().is_cpu()), (DType::F32, true));
        let expected = (find(&named, name).as_tensor() - &before[name]).unwrap();
        assert_eq!(max_abs_diff(d, &expected), 0.0, "{name}");
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("full_delta.safetensors");
    write(&file, &delta);
    let mut applied = load(&tiny_sd(), DType::F64);
    apply_delta(&mut applied, &file).unwrap();
    let i = inputs(&sd);
    let reference = outputs(
        &full.text_encoder(DType::F64, false).unwrap(),
        &full.unet(DType::F64, false).unwrap(),
        &i,
    );
    let got = outputs(&applied.text_encoder, &applied.unet, &i);
    let base = outputs(&sd.text_encoder, &sd.unet, &i);
    println!(
        "applied vs trained: text {:e}, U-Net {:e}; base vs trained: U-Net {:e}",
        max_abs_diff(&got.0, &reference.0),
        max_abs_diff(&got.1, &reference.1),
        max_abs_diff(&base.1, &reference.1)
    );
    assert_eq!(max_abs_diff(&got.0, &reference.0), 0.0);
    assert_eq!(max_abs_diff(&got.1, &reference.1), 0.0);
    assert!(
        max_abs_diff(&base.1, &reference.1) > 1e-3,
        "the change shows"
    );

    // A transformers-4 style key (`text_model.` prefix) names the same weight.
    let prefixed: HashMap<String, Tensor> = (delta.iter())
        .map(|(k, v)| {
            let k = k.replace("text_encoder.", "text_encoder.text_model.");
            (k, v.clone())
        })
        .collect();
    let file2 = dir.path().join("prefixed.safetensors");
    write(&file2, &prefixed);
    let mut applied = load(&tiny_sd(), DType::F64);
    apply_delta(&mut applied, &file2).unwrap();
    let got = outputs(&applied.text_encoder, &applied.unet, &i);
    assert_eq!(max_abs_diff(&got.0, &reference.0), 0.0);

    // Refused, naming the file: keys the model does not read, a wrong shape.
    let refused = |name: &str, t: Tensor| {
        let bad = dir.path().join("bad.safetensors");
        write(&bad, &HashMap::from([(name.to_string(), t)]));
        let mut sd = load(&tiny_sd(), DType::F64);
        let e = apply_delta(&mut sd, &bad).unwrap_err().to_string();
        println!("{name}: {e}");
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains(name), "{e}");
        e
    };
    let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let e = refused("unet.down_blocks.9.conv.weight", z(&[2]));
    assert!(e.contains("not a weight"), "{e}");
    refused("text_encoder.embeddings.position_ids", z(&[77]));
    refused("vae.decoder.conv_in.weight", z(&[2]));
    let e = refused("unet.conv_in.weight", z(&[8, 4, 3, 1]));
    assert!(e.contains("[8, 4, 3, 1]"), "{e}");
}

/// A delta made on the diffusers folder applies to the single-file checkpoint of the same
/// weights (whose text encoder the loader renames) and gives the same model.
#[test]
fn a_delta_applies_to_the_single_file_form_of_its_base() {
    let folder = load(&SD1.model(), DType::F32);
    let full = FullWeights::of(&folder).unwrap();
    let named = full.named();
    for name in [
        "unet.down_blocks.0.attentions.0.proj_in.weight",
        "text_encoder.encoder.layers.0.self_attn.v_proj.weight",
    ] {
        scaled(find(&named, name), 1.5);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("full_delta.safetensors");
    write(&file, &full.delta(&folder).unwrap());
    let single = SingleFileOptions {
        model_config: Some(SD1.path("tiny-sd")),
        prediction_type: None,
    };
    let mut sd = StableDiffusion::load_with(
        &SD1.arg("single.safetensors"),
        &single,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let of_single = FullWeights::of(&sd).unwrap();
    let names = |n: &[(String, Var)]| n.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(names(&of_single.named()), names(&named));
    apply_delta(&mut sd, &file).unwrap();
    let i = inputs(&folder);
    let want = outputs(
        &full.text_encoder(DType::F32, false).unwrap(),
        &full.unet(DType::F32, false).unwrap(),
        &i,
    );
    let got = outputs(&sd.text_encoder, &sd.unet, &i);
    assert_eq!(max_abs_diff(&got.0, &want.0), 0.0);
    assert_eq!(max_abs_diff(&got.1, &want.1), 0.0);
}

#[test]
fn named_and_restore_round_trip() {
    let sd = load(&tiny_sd(), DType::F64);
    let full = FullWeights::of(&sd).unwrap();
    let named = full.named();
    // The U-Net's then the text encoder's, each sorted; every tensor the files hold
    // (the tiny files carry no buffers).
    let (unet, text): (Vec<_>, Vec<_>) = named.iter().partition(|(n, _)| n.starts_with("unet."));
    assert_eq!(named.len(), unet.len() + text.len());
    assert!(named[..unet.len()]
        .iter()
        .all(|(n, _)| n.starts_with("unet.")));
    for part in [&unet, &text] {
        assert!(part.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
    }
    let stored = |component: &str, file: &str| {
        let path = Path::new(&tiny_sd()).join(component).join(file);
        let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let mut names: Vec<String> = t.into_keys().map(|k| format!("{component}.{k}")).collect();
        names.sort();
        names
    };
    let names = |part: &[&(String, Var)]| part.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&unet),
        stored("unet", "diffusion_pytorch_model.safetensors")
    );
    assert_eq!(names(&text), stored("text_encoder", "model.safetensors"));
    assert!(named.iter().all(|(_, v)| v.dtype() == DType::F32));

    for (k, (_, v)) in named.iter().enumerate().step_by(50) {
        scaled(v, 1.0 + k as f64 / 1000.0);
    }
    let saved: HashMap<String, Tensor> = (named.iter())
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let mut checkpoint = saved.clone();
    checkpoint.insert(
        "other.tensor".into(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    let fresh = FullWeights::of(&sd).unwrap();
    fresh.restore(&mut checkpoint).unwrap();
    assert_eq!(
        checkpoint.len(),
        1,
        "the full weights taken out, the rest left"
    );
    for (n, v) in fresh.named() {
        assert_eq!(max_abs_diff(v.as_tensor(), &saved[&n]), 0.0, "{n}");
    }
    assert_eq!(
        fresh.delta(&sd).unwrap().len(),
        full.delta(&sd).unwrap().len()
    );

    let missing = "unet.conv_in.bias";
    let mut t = saved.clone();
    t.remove(missing);
    let e = fresh.restore(&mut t).unwrap_err().to_string();
    assert!(e.contains(missing), "{e}");
    let mut t = saved.clone();
    t.insert(
        missing.into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = fresh.restore(&mut t).unwrap_err().to_string();
    assert!(e.contains(missing) && e.contains("[3]"), "{e}");
}
