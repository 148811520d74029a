//! The pieces of MagicTailor's training step, each against its formula: DM-Deg, the
//! masked and attention losses, DS-Bal's min-max / preserving terms and momentum EMA,
//! and AdamW + clipping against torch's numbers.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::TrainableLora;
use magictailor::model::nn::Ctx;
use magictailor::rng::seeded_normal;
use magictailor::train::augment::{color_jitter, flip_some, Jitter, JitterOp};
use magictailor::train::dm_deg::Degradation;
use magictailor::train::ds_bal::{hardest_sample, per_sample_means, preserving_loss, MomentumLora};
use magictailor::train::losses::{attention_loss, masked_diffusion_per_image, resize_nearest};
use magictailor::train::objective::attention_side;
use magictailor::train::optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEV: Device = Device::Cpu;

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Left half of each image inside the mask.
fn half_masks(b: usize, side: usize) -> Tensor {
    let m: Vec<f32> = (0..b * side * side)
        .map(|i| if i % side < side / 2 { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(m, (b, 1, side, side), &DEV).unwrap()
}

#[test]
fn dm_deg_follows_the_dynamic_curve_and_spares_the_mask() {
    let dyn_ = Degradation::Dynamic {
        alpha_init: 0.5,
        gamma: 32.0,
    };
    let total = 500;
    assert!((dyn_.alpha(1, total) - 0.5 * (1.0 - (1.0f64 / 500.0).powi(32))).abs() < 1e-15);
    assert!((dyn_.alpha(250, total) - 0.5 * (1.0 - 0.5f64.powi(32))).abs() < 1e-15);
    assert_eq!(dyn_.alpha(500, total), 0.0);
    assert!((Degradation::Linear { alpha_init: 0.5 }.alpha(250, total) - 0.25).abs() < 1e-15);
    assert_eq!(Degradation::Fixed { alpha: 0.3 }.alpha(499, total), 0.3);

    let (b, side) = (2, 64);
    let pixels = Tensor::zeros((b, 3, side, side), DType::F32, &DEV).unwrap();
    let masks = half_masks(b, side);
    let noise = seeded_normal(3, (b, 3, side, side), &DEV).unwrap();
    let alpha = Degradation::Fixed { alpha: 0.1 };
    let out = vec(&alpha.apply(&pixels, &masks, &noise, 1, total).unwrap());
    let m = vec(&masks
        .broadcast_as((b, 3, side, side))
        .unwrap()
        .contiguous()
        .unwrap());
    let inside: Vec<f32> = out
        .iter()
        .zip(&m)
        .filter(|(_, &k)| k == 1.0)
        .map(|(v, _)| *v)
        .collect();
    let outside: Vec<f32> = out
        .iter()
        .zip(&m)
        .filter(|(_, &k)| k == 0.0)
        .map(|(v, _)| *v)
        .collect();
    assert!(
        inside.iter().all(|&v| v == 0.0),
        "pixels inside the mask are untouched"
    );
    let std = (outside.iter().map(|v| v * v).sum::<f32>() / outside.len() as f32).sqrt();
    assert!(
        (std - 0.1).abs() < 0.005,
        "noise outside has scale alpha: std {std}"
    );
    // Clamped to [-1, 1], and the mask-out ablation zeroes the outside.
    let big = Degradation::Fixed { alpha: 5.0 }
        .apply(&pixels, &masks, &noise, 1, total)
        .unwrap();
    assert!(vec(&big).iter().all(|v| (-1.0..=1.0).contains(v)));
    let ones = Tensor::ones((b, 3, side, side), DType::F32, &DEV).unwrap();
    let out = vec(&Degradation::MaskOut
        .apply(&ones, &masks, &noise, 1, total)
        .unwrap());
    assert_eq!(out, m);
}

#[test]
fn nearest_resize_matches_torch_indexing() {
    let x = Tensor::arange(0f32, 36., &DEV)
        .unwrap()
        .reshape((1, 1, 6, 6))
        .unwrap();
    // torch: F.interpolate(x, size=(4, 4), mode="nearest") reads rows/cols 0, 1, 3, 4.
    let got = vec(&resize_nearest(&x, 4).unwrap());
    let want: Vec<f32> = [0, 1, 3, 4]
        .iter()
        .flat_map(|&r| [0, 1, 3, 4].map(|c| (r * 6 + c) as f32))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn masked_loss_ignores_predictions_outside_the_mask() {
    let (b, side) = (2, 8);
    let eps = seeded_normal(1, (b, 4, side, side), &DEV).unwrap();
    let pred = seeded_normal(2, (b, 4, side, side), &DEV).unwrap();
    let mask = half_masks(b, side);
    let base = vec(&masked_diffusion_per_image(&pred, &eps, &mask).unwrap());
    // Mean over all elements, masked-out zeros included.
    let d = vec(&((&pred - &eps).unwrap().broadcast_mul(&mask).unwrap()));
    let n = 4 * side * side;
    assert!((base[0] - d[..n].iter().map(|v| v * v).sum::<f32>() / n as f32).abs() < 1e-6);
    let outside = (mask
        .affine(-1.0, 1.0)
        .unwrap()
        .broadcast_mul(&seeded_normal(5, (b, 4, side, side), &DEV).unwrap()))
    .unwrap();
    let moved = vec(&masked_diffusion_per_image(&(&pred + outside).unwrap(), &eps, &mask).unwrap());
    assert_eq!(base, moved, "changes outside the mask do not count");
    let inside = mask
        .broadcast_mul(&seeded_normal(5, (b, 4, side, side), &DEV).unwrap())
        .unwrap();
    let moved = vec(&masked_diffusion_per_image(&(&pred + inside).unwrap(), &eps, &mask).unwrap());
    assert!(moved[0] != base[0] && moved[1] != base[1]);
}

#[test]
fn attention_loss_reads_each_images_own_pseudo_word() {
    let (side, tokens) = (4, 8);
    let mask = half_masks(2, side);
    let m = vec(&mask);
    // Image 0's token 4 and image 1's token 5 attend exactly where their masks are (x 0.3,
    // which the max-normalization removes); every other column is uniform.
    let mut maps = vec![0.1f32; 2 * 16 * tokens];
    for img in 0..2 {
        let tok = 4 + img;
        for q in 0..16 {
            maps[(img * 16 + q) * tokens + tok] = 0.3 * m[img * 16 + q];
        }
    }
    let maps = Tensor::from_vec(maps, (2, 16, tokens), &DEV).unwrap();
    let layers = [maps.clone(), maps];
    let own = attention_loss(&layers, &[4, 5], &mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(own.abs() < 1e-7, "own token matches its mask: {own}");
    let swapped = attention_loss(&layers, &[5, 4], &mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(swapped > 0.2, "the other image's token does not: {swapped}");
}

#[test]
fn ds_bal_optimizes_the_largest_sample_and_preserves_the_others() {
    // Three images of sample 0, one of sample 1 (unequal counts are allowed).
    let sample_of = [0, 0, 0, 1];
    let per_image = Tensor::new(&[0.1f32, 0.2, 0.3, 0.5], &DEV).unwrap();
    let per_sample = per_sample_means(&per_image, &sample_of, 2).unwrap();
    let v = vec(&per_sample);
    assert!((v[0] - 0.2).abs() < 1e-7 && (v[1] - 0.5).abs() < 1e-7);
    assert_eq!(hardest_sample(&per_sample).unwrap(), 1);

    let (b, side) = (4, 4);
    let mask = half_masks(b, side);
    let online = seeded_normal(1, (b, 4, side, side), &DEV).unwrap();
    let momentum = seeded_normal(2, (b, 4, side, side), &DEV).unwrap();
    let pres = |mom: &Tensor| {
        preserving_loss(&online, mom, &mask, &sample_of, 2, 1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let base = pres(&momentum);
    // Only sample 0's images count when sample 1 is chosen.
    let bump = |img: usize| {
        let mut d = vec![0f32; b * 4 * side * side];
        for x in &mut d[img * 4 * side * side..(img + 1) * 4 * side * side] {
            *x = 1.0;
        }
        (&momentum + Tensor::from_vec(d, (b, 4, side, side), &DEV).unwrap()).unwrap()
    };
    assert_eq!(pres(&bump(3)), base, "the chosen sample is not regularized");
    assert!(pres(&bump(0)) != base, "the others are");
    // Equals the masked MSE over sample 0's images.
    let diff = vec(&(&online - &momentum).unwrap().broadcast_mul(&mask).unwrap());
    let n = 3 * 4 * side * side;
    assert!((base - diff[..n].iter().map(|x| x * x).sum::<f32>() / n as f32).abs() < 1e-6);
}

#[test]
fn momentum_adapters_follow_the_ema_and_build_no_graph() {
    let sd = StableDiffusion::load(&tiny_sd(), &DEV, DType::F32).unwrap();
    let online = TrainableLora::new(&sd.unet.lora_targets(), 4, 4.0, 0, &DEV, DType::F32).unwrap();
    let mut momentum = MomentumLora::copy_of(&online).unwrap();
    let a0 = &online.modules[0].a;
    let mut expected = vec(a0.as_tensor());
    let beta = 0.99;
    for k in 0..3 {
        let new = seeded_normal(10 + k, a0.shape().clone(), &DEV).unwrap();
        a0.set(&new).unwrap();
        momentum.update(&online, beta).unwrap();
        let n = vec(&new);
        expected = expected
            .iter()
            .zip(&n)
            .map(|(m, t)| (beta as f32) * m + (1.0 - beta as f32) * t)
            .collect();
    }
    let a_name = format!("{}.A", online.modules[0].path);
    let tensors = momentum.tensors().unwrap();
    let got = vec(&tensors.iter().find(|(n, _)| *n == a_name).unwrap().1);
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-6);
    }
    // The momentum forward, on detached text features, is not part of any graph.
    let r = reference();
    let ctx_text = Var::from_tensor(&r["te_hidden"].narrow(0, 0, 2).unwrap()).unwrap();
    let forward = |set: &magictailor::model::lora::LoraSet| {
        let ctx = Ctx {
            lora: Some(set),
            ..Ctx::default()
        };
        sd.unet
            .forward(
                &r["unet_x"],
                &r["unet_t"],
                &ctx_text.as_tensor().detach(),
                ctx,
            )
            .unwrap()
    };
    assert!(
        !forward(momentum.as_set()).track_op(),
        "momentum forward built a graph"
    );
    let out = forward(&online.as_set());
    assert!(
        out.track_op(),
        "the online forward does track (sanity check of the probe above)"
    );
}

#[test]
fn adamw_and_clipping_match_torch() {
    let p = Var::from_tensor(&Tensor::new(&[0.5f64, -1.0, 2.0], &DEV).unwrap()).unwrap();
    let q = Var::from_tensor(&Tensor::new(&[[0.1f64, 0.2], [0.3, -0.4]], &DEV).unwrap()).unwrap();
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(vec![p.clone(), q.clone()], cfg).unwrap();
    let grads: [([f64; 3], [[f64; 2]; 2]); 3] = [
        ([1.0, -2.0, 0.5], [[0.3, 0.0], [-1.0, 2.0]]),
        ([0.2, 0.1, -0.3], [[1.0, 1.0], [0.5, -0.5]]),
        ([-1.5, 0.0, 2.0], [[0.0, -0.2], [0.1, 0.4]]),
    ];
    // torch 2.15: clip_grad_norm_([p, q], 1.0) then AdamW.step(), three times.
    let torch_norms = [3.215587038162705, 1.624807680927192, 2.541653005427767];
    for ((gp, gq), want_norm) in grads.iter().zip(torch_norms) {
        // A GradStore with exactly these gradients: backward of sum(p * gp) + sum(q * gq).
        let loss = ((p.as_tensor() * Tensor::new(gp, &DEV).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            + (q.as_tensor() * Tensor::new(gq, &DEV).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let mut store = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut store, &[p.clone(), q.clone()], 1.0).unwrap();
        assert!((norm - want_norm).abs() < 1e-12);
        opt.step(&store).unwrap();
    }
    let torch_p = [0.3305216508145513, -0.792037091606197, 1.8500188744309458];
    let torch_q = [
        -0.14825978705333043,
        0.0761098187167991,
        0.3847961722502914,
        -0.5601365843529066,
    ];
    let got_p = p.as_tensor().to_vec1::<f64>().unwrap();
    let got_q = q
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (g, w) in got_p
        .iter()
        .chain(&got_q)
        .zip(torch_p.iter().chain(&torch_q))
    {
        assert!((g - w).abs() < 1e-12, "{g} vs torch {w}");
    }

    // State round trip: a restored optimizer continues identically.
    let state = opt.state().unwrap();
    let p2 = Var::from_tensor(&p.as_tensor().copy().unwrap()).unwrap();
    let q2 = Var::from_tensor(&q.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 = AdamW::new(vec![p2.clone(), q2.clone()], cfg).unwrap();
    opt2.load_state(&state).unwrap();
    assert_eq!(opt2.steps_taken(), 3);
    let step = |pv: &Var, qv: &Var, o: &mut AdamW| {
        let l = (pv.as_tensor().sum_all().unwrap()
            + qv.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        o.step(&l.backward().unwrap()).unwrap();
    };
    step(&p, &q, &mut opt);
    step(&p2, &q2, &mut opt2);
    assert_eq!(
        p.as_tensor().to_vec1::<f64>().unwrap(),
        p2.as_tensor().to_vec1::<f64>().unwrap()
    );
}

/// torch's `F.interpolate(mode="nearest")` at non-integer factors, both ways: output
/// index i reads input floor(i * in / out). Up 2x3 -> 5x7 (rows 0,0,0,1,1; columns
/// 0,0,0,1,1,2,2) and down 5x7 -> 3x2 (rows 0,1,3; columns 0,3), as torch computes them.
#[test]
fn nearest_resize_at_non_integer_factors_matches_torch_indexing() {
    let resize = magictailor::model::nn::resize_nearest;
    // (input size, output size, the input rows and columns torch reads)
    type Case = (
        (usize, usize),
        (usize, usize),
        &'static [usize],
        &'static [usize],
    );
    let cases: [Case; 2] = [
        ((2, 3), (5, 7), &[0, 0, 0, 1, 1], &[0, 0, 0, 1, 1, 2, 2]),
        ((5, 7), (3, 2), &[0, 1, 3], &[0, 3]),
    ];
    for ((h, w), (oh, ow), rows, cols) in cases {
        let x = Tensor::arange(0f32, (2 * h * w) as f32, &DEV)
            .unwrap()
            .reshape((1, 2, h, w))
            .unwrap();
        let got = vec(&resize(&x, oh, ow).unwrap());
        let want: Vec<f32> = (0..2)
            .flat_map(|c| {
                rows.iter()
                    .flat_map(move |&r| cols.iter().map(move |&k| (c * h * w + r * w + k) as f32))
            })
            .collect();
        assert_eq!(got, want, "{h}x{w} -> {oh}x{ow}");
    }
}

/// The attention maps the loss reads sit two stride-2 convolutions below the latent,
/// each giving ceil(n / 2): 16 at 512 px, and odd latent sides round up.
#[test]
fn attention_side_is_two_ceil_halvings_of_the_latent() {
    for (latent, side) in [(64, 16), (65, 17), (9, 3), (8, 2), (1, 1)] {
        assert_eq!(attention_side(latent), side, "latent side {latent}");
    }
}

/// torchvision's ColorJitter on one pixel value at a time, in f64: pixels in [-1, 1]
/// of a `[b, 3, h, w]` batch (flattened), the ops in `order`, back to [-1, 1].
fn jitter_reference(pixels: &[f32], (b, h, w): (usize, usize, usize), j: &Jitter) -> Vec<f64> {
    let n = h * w;
    let mut x: Vec<f64> = pixels.iter().map(|&p| (p as f64 + 1.0) / 2.0).collect();
    let at = |i: usize, c: usize, p: usize| (i * 3 + c) * n + p;
    let grey = |x: &[f64], i: usize, p: usize| {
        0.2989 * x[at(i, 0, p)] + 0.587 * x[at(i, 1, p)] + 0.114 * x[at(i, 2, p)]
    };
    let clamp = |v: f64| v.clamp(0.0, 1.0);
    for op in j.order {
        let prev = x.clone();
        for i in 0..b {
            let mean = (0..n).map(|p| grey(&prev, i, p)).sum::<f64>() / n as f64;
            for c in 0..3 {
                for p in 0..n {
                    let v = prev[at(i, c, p)];
                    x[at(i, c, p)] = match op {
                        JitterOp::Brightness => clamp(j.brightness as f64 * v),
                        JitterOp::Contrast => {
                            let f = j.contrast as f64;
                            clamp(f * v + (1.0 - f) * mean)
                        }
                        JitterOp::Saturation => {
                            let f = j.saturation as f64;
                            clamp(f * v + (1.0 - f) * grey(&prev, i, p))
                        }
                    };
                }
            }
        }
    }
    x.iter().map(|v| 2.0 * v - 1.0).collect()
}

/// `color_jitter` is torchvision's ColorJitter on the batch (as the released script):
/// brightness scales, contrast blends with each image's mean grey, saturation with the
/// per-pixel grey, each clamped to [0, 1], in the drawn order. Strong factors make the
/// clamps bite, so two orders give different images: the order is honoured, not fixed.
#[test]
fn colour_jitter_matches_torchvision_in_the_drawn_order() {
    use JitterOp::*;
    let (b, h, w) = (2, 5, 7);
    let mut rng = StdRng::seed_from_u64(3);
    let pixels: Vec<f32> = (0..b * 3 * h * w)
        .map(|_| rng.random_range(-1.0f32..=1.0))
        .collect();
    let batch = Tensor::from_vec(pixels.clone(), (b, 3, h, w), &DEV).unwrap();
    let jitter = |order| Jitter {
        brightness: 1.4,
        contrast: 0.6,
        saturation: 1.5,
        order,
    };
    let mut outputs = Vec::new();
    for order in [
        [Brightness, Contrast, Saturation],
        [Saturation, Contrast, Brightness],
        [Contrast, Brightness, Saturation],
    ] {
        let j = jitter(order);
        let got = color_jitter(&batch, &j).unwrap();
        assert_eq!(got.dims(), [b, 3, h, w]);
        let got = vec(&got);
        let want = jitter_reference(&pixels, (b, h, w), &j);
        for (k, (g, r)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - r).abs() < 1e-6,
                "{order:?}, element {k}: {g} vs torchvision {r}"
            );
        }
        outputs.push(got);
    }
    for k in 1..outputs.len() {
        let d = outputs[0]
            .iter()
            .zip(&outputs[k])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d > 1e-2,
            "order {k} gives the same image as order 0 (max diff {d})"
        );
    }
}

/// `Jitter::draw`: factors uniform in [1 - s, 1 + s] (and spread over it, not constant),
/// and all 6 orders of the three ops occur over 200 draws.
#[test]
fn jitter_draws_factors_in_range_and_every_order() {
    let s = 0.1f32;
    let mut orders: Vec<[JitterOp; 3]> = Vec::new();
    let (mut lo, mut hi) = (f32::MAX, f32::MIN);
    for seed in 0..200 {
        let j = Jitter::draw(&mut StdRng::seed_from_u64(seed), [s as f64; 3]);
        for f in [j.brightness, j.contrast, j.saturation] {
            assert!((1.0 - s..=1.0 + s).contains(&f), "seed {seed}: factor {f}");
            (lo, hi) = (lo.min(f), hi.max(f));
        }
        let mut sorted = j.order.map(|o| o as u8);
        sorted.sort();
        assert_eq!(
            sorted,
            [0, 1, 2],
            "seed {seed}: each op once in {:?}",
            j.order
        );
        if !orders.contains(&j.order) {
            orders.push(j.order);
        }
    }
    assert_eq!(orders.len(), 6, "orders seen: {orders:?}");
    assert!(
        lo < 0.92 && hi > 1.08,
        "factors spread over the range: {lo}..{hi}"
    );
    let off = Jitter::draw(&mut StdRng::seed_from_u64(0), [0.0; 3]);
    assert_eq!(
        [off.brightness, off.contrast, off.saturation],
        [1.0; 3],
        "strength 0 changes nothing"
    );
}

/// As the released script, only the LoRA parameters' gradients are clipped: clipping
/// over the first of two Vars brings its norm to max_norm, returns its own norm (not
/// the global one), and leaves the second's gradient bit for bit. `grad_norm` is the
/// plain L2 norm over the Vars given.
#[test]
fn clipping_covers_only_the_parameters_given() {
    let lora = Var::from_tensor(&Tensor::new(&[0.5f64, -1.0, 2.0], &DEV).unwrap()).unwrap();
    let text =
        Var::from_tensor(&Tensor::new(&[[0.1f64, 0.2], [0.3, -0.4]], &DEV).unwrap()).unwrap();
    let (g_lora, g_text) = ([30.0f64, -40.0, 120.0], [[7.0f64, -3.5], [0.25, 11.0]]);
    let loss = ((lora.as_tensor() * Tensor::new(&g_lora, &DEV).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        + (text.as_tensor() * Tensor::new(&g_text, &DEV).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let mut store = loss.backward().unwrap();
    let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let flat_text: Vec<f64> = g_text.concat();
    let both: Vec<f64> = g_lora.iter().chain(&flat_text).copied().collect();
    let (want_lora, want_text, want_both) = (l2(&g_lora), l2(&flat_text), l2(&both));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b;
    assert!(close(
        grad_norm(&store, std::slice::from_ref(&lora)).unwrap(),
        want_lora
    ));
    assert!(close(
        grad_norm(&store, std::slice::from_ref(&text)).unwrap(),
        want_text
    ));
    assert!(close(
        grad_norm(&store, &[lora.clone(), text.clone()]).unwrap(),
        want_both
    ));

    let text_before: Vec<u64> = vec_f64(store.get(text.as_tensor()).unwrap())
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let max_norm = 1.0;
    let norm = clip_grad_norm(&mut store, std::slice::from_ref(&lora), max_norm).unwrap();
    assert!(
        close(norm, want_lora),
        "returns the LoRA norm before clipping: {norm}"
    );
    let after = grad_norm(&store, std::slice::from_ref(&lora)).unwrap();
    assert!(
        after <= max_norm + 1e-6 && after > 0.99 * max_norm,
        "clipped to {after}"
    );
    let text_after: Vec<u64> = vec_f64(store.get(text.as_tensor()).unwrap())
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(text_before, text_after, "the other gradient is untouched");
    // The LoRA gradient keeps its direction.
    let g = vec_f64(store.get(lora.as_tensor()).unwrap());
    for (a, b) in g.iter().zip(&g_lora) {
        assert!(
            (a - b * max_norm / (want_lora + 1e-6)).abs() < 1e-12,
            "{a} vs {b}"
        );
    }
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// TI's per-image flip: the flagged images mirrored, the others untouched.
#[test]
fn flip_some_mirrors_only_the_flagged_images() {
    let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 1, 1, 4))
        .unwrap();
    let rows = |t: &Tensor| t.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let y = flip_some(&x, &[true, false, true]).unwrap();
    assert_eq!(
        rows(&y),
        [[3., 2., 1., 0.], [4., 5., 6., 7.], [11., 10., 9., 8.]]
    );
    assert_eq!(rows(&flip_some(&x, &[false; 3]).unwrap()), rows(&x));
}
