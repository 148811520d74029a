//! Every gradient path the trainer relies on, against central finite differences in f64:
//! LoRA A and B on self- and cross-attention q/k/v/out, proj_in/out and ff.net.2, the
//! pseudo-word rows through the whole CLIP encoder, tuned whole matrices (Custom
//! Diffusion's cross-attention keys and values), and the loss on recorded
//! cross-attention maps. (candle's fused LayerNorm and softmax_last_dim would drop these
//! silently; see docs/candle.md §1.)

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::{LoraModule, TrainableLora};
use magictailor::model::nn::Ctx;
use magictailor::model::probe::{AttnProbe, BlockKind};
use magictailor::model::tuned::TrainableTuned;
use magictailor::rng::seeded_normal;

struct Setup {
    sd: StableDiffusion,
    lora: TrainableLora,
    tuned: TrainableTuned,
    rows: Var,
    ids: Tensor,
    x: Tensor,
    t: Tensor,
    w_out: Tensor,
    w_attn: Tensor,
}

fn setup() -> Setup {
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F64).unwrap();
    let lora = TrainableLora::new(&sd.unet.lora_targets(), 4, 4.0, 0, &dev, DType::F64).unwrap();
    // B starts at zero; make it non-zero so A's gradient is too.
    for (i, LoraModule { b, .. }) in lora.modules.iter().enumerate() {
        b.set(
            &(seeded_normal(100 + i as u64, b.shape().clone(), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                * 0.1)
                .unwrap(),
        )
        .unwrap();
    }
    sd.tokenizer
        .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
        .unwrap();
    let rows = Var::from_tensor(
        &seeded_normal(1, (2, 32), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = ["a photo of <v0>", "a photo of <v1>"]
        .iter()
        .flat_map(|p| sd.tokenizer.encode(p).unwrap())
        .collect();
    let ids = Tensor::from_vec(ids, (2, 77), &dev).unwrap();
    let f64n = |seed, shape: &[usize]| {
        seeded_normal(seed, shape, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    Setup {
        x: f64n(2, &[2, 4, 8, 8]),
        t: Tensor::new(&[37f64, 801.], &dev).unwrap(),
        w_out: f64n(3, &[2, 4, 8, 8]),
        w_attn: f64n(4, &[2, 16, 77]),
        sd,
        lora,
        tuned: TrainableTuned::none(),
        rows,
        ids,
    }
}

/// A scalar that depends on the U-Net output and on the recorded 4x4 cross-attention maps.
fn loss(s: &Setup) -> Tensor {
    let ctx_text =
        s.sd.text_encoder
            .forward(&s.ids, Some(s.rows.as_tensor()))
            .unwrap();
    let probe = AttnProbe::new(&[4], &[BlockKind::Down, BlockKind::Up]);
    let set = s.lora.as_set();
    let tuned = s.tuned.as_set();
    let out =
        s.sd.unet
            .forward(
                &s.x,
                &s.t,
                &ctx_text,
                Ctx {
                    lora: Some(&set),
                    tuned: Some(&tuned),
                    probe: Some(&probe),
                    ..Ctx::default()
                },
            )
            .unwrap();
    let maps = probe.take();
    assert_eq!(maps.len(), 5, "two down and three up transformers at 4x4");
    let mut l = (out * &s.w_out).unwrap().sum_all().unwrap();
    for (_, m) in maps {
        l = (l + (m * &s.w_attn).unwrap().sum_all().unwrap() * 10.0).unwrap();
    }
    l
}

fn value(s: &Setup) -> f64 {
    loss(s).to_scalar::<f64>().unwrap()
}

/// Compares d loss / d var[idx] with a central difference.
fn check(s: &Setup, name: &str, var: &Var, grads: &candle_core::backprop::GradStore, idx: usize) {
    let g = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"));
    let analytic = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-5;
    let at = |delta: f64| {
        let mut v = orig.clone();
        v[idx] += delta;
        var.set(&Tensor::from_vec(v, var.shape().clone(), &Device::Cpu).unwrap())
            .unwrap();
        value(s)
    };
    let numeric = (at(h) - at(-h)) / (2.0 * h);
    var.set(&Tensor::from_vec(orig, var.shape().clone(), &Device::Cpu).unwrap())
        .unwrap();
    let err = (analytic - numeric).abs() / numeric.abs().max(1e-3);
    assert!(
        err < 1e-5,
        "{name}[{idx}]: analytic {analytic}, numeric {numeric}, rel err {err}"
    );
}

#[test]
fn lora_and_token_row_gradients_match_finite_differences() {
    let s = setup();
    let grads = loss(&s).backward().unwrap();
    let find = |suffix: &str, a: bool| {
        let m = s
            .lora
            .modules
            .iter()
            .find(|m| m.path.ends_with(suffix))
            .unwrap();
        (m.path.clone(), if a { m.a.clone() } else { m.b.clone() })
    };
    let picks = [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            true,
        ),
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
            false,
        ),
        (
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q",
            true,
        ),
        (
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v",
            true,
        ),
        (
            "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_out.0",
            false,
        ),
        ("mid_block.attentions.0.proj_in", true),
        ("down_blocks.2.attentions.0.proj_out", false),
        (
            "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
            true,
        ),
    ];
    for (suffix, a) in picks {
        let (path, var) = find(suffix, a);
        for idx in [0, 5] {
            check(
                &s,
                &format!("{path} {}", if a { "A" } else { "B" }),
                &var,
                &grads,
                idx,
            );
        }
    }
    // Pseudo-word rows: through CLIP's LayerNorms and attention into the U-Net.
    for idx in [0, 17, 32 + 3] {
        check(&s, "token rows", &s.rows, &grads, idx);
    }
    // Every adapter gets a gradient (none silently dropped).
    for v in s.lora.vars() {
        assert!(grads.get(v.as_tensor()).is_some());
    }
}

/// Tuned whole matrices (Custom Diffusion's cross-attention keys and values, here with the
/// start-of-text token not held back): their gradients through attention, and the rows'
/// through them. The layers' adapters stay in place, so a tuned layer that also applied
/// its adapter would show as a wrong gradient.
#[test]
fn tuned_matrix_gradients_match_finite_differences() {
    let mut s = setup();
    let paths: Vec<String> = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v",
    ]
    .map(String::from)
    .into();
    s.tuned = TrainableTuned::new(s.sd.unet.base_weights(&paths), false, DType::F64).unwrap();
    assert_eq!(s.tuned.modules.len(), 2);
    let grads = loss(&s).backward().unwrap();
    for (name, var) in s.tuned.named() {
        for idx in [0, 7, 40] {
            check(&s, &name, &var, &grads, idx);
        }
    }
    for idx in [1, 32 + 5] {
        check(&s, "token rows", &s.rows, &grads, idx);
    }
    // A tuned layer's adapter is not applied: its matrices get no gradient.
    let a = |p: &str| {
        (s.lora.modules.iter())
            .find(|m| m.path == p)
            .unwrap()
            .a
            .clone()
    };
    assert!(grads.get(a(&paths[0]).as_tensor()).is_none());
}

/// `resize_nearest` at non-integer factors (2x3 -> 5x7, as the U-Net upsamples odd
/// latent sides) is differentiable and its gradient is right: d sum(w * resize(x)) / dx
/// against central differences, for a fixed random `w`. Each input element's gradient
/// is the sum of `w` over the outputs that read it, so a wrong index map shows here.
#[test]
fn nearest_resize_gradient_matches_finite_differences_at_non_integer_factors() {
    let dev = Device::Cpu;
    let f64n = |seed, shape: &[usize]| {
        seeded_normal(seed, shape, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let x = Var::from_tensor(&f64n(11, &[1, 2, 2, 3])).unwrap();
    let w = f64n(12, &[1, 2, 5, 7]);
    let value = |x: &Tensor| {
        (magictailor::model::nn::resize_nearest(x, 5, 7).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = value(x.as_tensor()).backward().unwrap();
    let analytic = grads
        .get(x.as_tensor())
        .expect("a gradient for the input")
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let orig = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-4;
    for (i, a) in analytic.iter().enumerate() {
        let at = |delta: f64| {
            let mut v = orig.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, (1, 2, 2, 3), &dev).unwrap();
            value(&t).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (a - numeric).abs() < 1e-8 * numeric.abs().max(1.0),
            "x[{i}]: analytic {a}, numeric {numeric}"
        );
    }
    // Every input element is read by some output, so none has a zero gradient.
    assert!(analytic.iter().all(|g| *g != 0.0), "{analytic:?}");
}
