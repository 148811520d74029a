//! Each fused op against the same function composed from candle's differentiable ops:
//! in f64 values and input gradients agree to rounding; in f32 (where the CPU kernels
//! run) to f32 accuracy, relative to the largest entry.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::attention::attention_head_major;
use super::*;
use crate::testkit::reference;
use crate::testkit::tolerance::rel_err_f64;

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    crate::rng::seeded_normal(seed, shape, &Device::Cpu)
        .expect("random tensor")
        .to_dtype(DType::F64)
        .expect("f64")
}

/// A frozen parameter in the dtype of the inputs.
fn like(p: &Tensor, xs: &[Tensor]) -> Tensor {
    p.to_dtype(xs[0].dtype()).expect("cast")
}

/// Compares `ours` with `reference` on inputs `xs`: outputs, and the gradient of a random
/// projection of the output with respect to every input.
fn check(
    name: &str,
    xs: &[Tensor],
    ours: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    // Runs in `dtype` (the CPU kernels take over in f32); results in f64.
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>, dtype: DType| {
        let vars: Vec<Var> = xs
            .iter()
            .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let r = randn(99, y.dims()).to_dtype(dtype).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|v| f64(grads.get(v.as_tensor()).expect("gradient")))
            .collect();
        (f64(&y.detach()), gs)
    };
    let (y2, g2) = run(&reference, DType::F64);
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-6)] {
        let (y1, g1) = run(&ours, dtype);
        let dy = rel_err_f64(&y1, &y2);
        assert!(dy < tol, "{name} {dtype:?}: output differs by {dy:e}");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{name}: gradient {i} shape");
            let d = rel_err_f64(a, b);
            assert!(d < tol, "{name} {dtype:?}: gradient {i} differs by {d:e}");
        }
    }
}

#[test]
fn frozen_linear_matches_matmul() {
    let (w, b) = (randn(1, &[7, 5]), randn(2, &[7]));
    check(
        "linear",
        &[randn(3, &[2, 3, 5])],
        |x| frozen_linear(&x[0], &like(&w, x), Some(&like(&b, x))),
        |x| x[0].broadcast_matmul(&w.t()?)?.broadcast_add(&b),
    );
}

#[test]
fn lora_linear_matches_composed() {
    // (in, out, rank) on 6 rows: the adapter folded into the weight in both passes, in
    // the forward alone, and in neither (the rank-r products).
    let cases = [(5, 7, 4), (8, 8, 1), (16, 16, 2)];
    let folds = cases.map(|(k, n, r)| {
        let d = crate::kernels::cpu::LoraDims {
            m: 6,
            k,
            n,
            r,
            scale: 0.5,
        };
        (d.merged_forward(), d.merged_backward())
    });
    assert_eq!(folds, [(true, true), (true, false), (false, false)]);
    for (k, n, r) in cases {
        let (w, b) = (randn(1, &[n, k]), randn(2, &[n]));
        check(
            &format!("lora linear {k}->{n} rank {r}"),
            &[randn(3, &[2, 3, k]), randn(4, &[r, k]), randn(5, &[n, r])],
            |x| {
                let adapter = LoraAdapter {
                    a: &x[1],
                    b: &x[2],
                    scale: 0.5,
                };
                lora_linear(&x[0], &like(&w, x), Some(&like(&b, x)), &adapter)
            },
            |x| {
                let base = x[0].broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
                let up = x[0]
                    .broadcast_matmul(&x[1].t()?)?
                    .broadcast_matmul(&x[2].t()?)?;
                base + (up * 0.5)?
            },
        );
    }
}

#[test]
fn frozen_conv_matches_conv2d() {
    // (input side, kernel, stride, padding): the U-Net's 3x3 s1/s2 and 1x1 convs, odd
    // sides, and the VAE's unpadded stride-2 conv on a padded input. Square inputs for
    // stride 2: candle's own conv backward derives the output padding from the height
    // only and fails when height and width differ in parity (checked by FD below).
    for (side, k, s, p) in [
        (6, 3, 1, 1),
        (7, 3, 1, 1),
        (17, 3, 1, 1),
        (8, 3, 2, 1),
        (7, 3, 2, 1),
        (6, 1, 1, 0),
        (9, 3, 2, 0),
        (8, 3, 2, 0),
    ] {
        let (w, b) = (randn(1, &[4, 3, k, k]), randn(2, &[4]));
        check(
            &format!("conv side {side} k{k} s{s} p{p}"),
            &[randn(3, &[2, 3, side, side + (s == 1) as usize])],
            |x| frozen_conv2d(&x[0], &like(&w, x), &like(&b, x), s, p),
            |x| {
                x[0].conv2d(&w, p, s, 1, 1)?
                    .broadcast_add(&b.reshape((1, 4, 1, 1))?)
            },
        );
    }
}

#[test]
fn strided_conv_gradient_matches_finite_differences_on_mixed_parity() {
    let (w, b) = (randn(1, &[2, 2, 3, 3]), randn(2, &[2]));
    let r = randn(4, &[1, 2, 4, 3]);
    let loss = |x: &Tensor| -> f64 {
        let y = frozen_conv2d(x, &w, &b, 2, 1).unwrap();
        (y * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let x = randn(3, &[1, 2, 8, 5]);
    let var = Var::from_tensor(&x).unwrap();
    let y = frozen_conv2d(var.as_tensor(), &w, &b, 2, 1).unwrap();
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    for (i, gi) in g.iter().enumerate() {
        let bump = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap())
        };
        let fd = (bump(1e-6) - bump(-1e-6)) / 2e-6;
        assert!((fd - gi).abs() < 1e-6, "element {i}: fd {fd} vs {gi}");
    }
}

#[test]
fn upsample_matches_candle() {
    check(
        "upsample",
        &[randn(1, &[2, 3, 4, 5])],
        |x| upsample_nearest_2x(&x[0]),
        |x| x[0].upsample_nearest2d(8, 10),
    );
}

#[test]
fn group_norm_matches_composed() {
    let (gamma, beta) = (randn(1, &[6]), randn(2, &[6]));
    for silu in [false, true] {
        check(
            &format!("group norm silu={silu}"),
            &[randn(3, &[2, 6, 4, 3])],
            |x| group_norm(&x[0], &gamma, &beta, 3, 1e-6, silu),
            |x| reference::group_norm(&x[0], &gamma, &beta, 3, 1e-6, silu),
        );
    }
}

#[test]
fn layer_norm_matches_slow() {
    let (gamma, beta) = (randn(1, &[8]), randn(2, &[8]));
    check(
        "layer norm",
        &[randn(3, &[2, 5, 8])],
        |x| layer_norm(&x[0], &like(&gamma, x), &like(&beta, x), 1e-5),
        |x| reference::layer_norm(&x[0], &gamma, &beta, 1e-5),
    );
}

#[test]
fn geglu_matches_composed() {
    check(
        "geglu",
        &[randn(1, &[2, 3, 8])],
        |x| geglu(&x[0]),
        |x| reference::geglu(&x[0]),
    );
}

#[test]
fn attention_matches_naive_in_every_chunking() {
    // Head-major chunked path (f64), query chunks of several sizes.
    let xs = [
        randn(1, &[3, 10, 4]),
        randn(2, &[3, 7, 4]),
        randn(3, &[3, 7, 4]),
    ];
    for rows in [1, 3, 10] {
        check(
            &format!("attention rows={rows}"),
            &xs,
            |x| attention_head_major(&x[0], &x[1], &x[2], rows),
            |x| reference::attention(&x[0], &x[1], &x[2], 1, 1.0),
        );
    }
}

#[test]
fn multi_head_attention_matches_naive_across_row_blocks() {
    // 2 batches x 3 heads; more query rows than one 64-row block of the CPU kernel and
    // keys not a multiple of its lane width.
    let xs = [
        randn(1, &[2, 150, 12]),
        randn(2, &[2, 70, 12]),
        randn(3, &[2, 70, 12]),
    ];
    check(
        "attention 150x70, 3 heads",
        &xs,
        |x| attention(&x[0], &x[1], &x[2], 3, 0.5),
        |x| reference::attention(&x[0], &x[1], &x[2], 3, 0.5),
    );
}

#[test]
fn untracked_inputs_build_no_graph() {
    let x = randn(1, &[1, 2, 4, 4]);
    let (w, b) = (randn(2, &[2, 2, 3, 3]), randn(3, &[2]));
    assert!(!frozen_conv2d(&x, &w, &b, 1, 1).unwrap().track_op());
    let q = randn(4, &[2, 5, 4]);
    assert!(!attention(&q, &q, &q, 2, 1.0).unwrap().track_op());
    let q = q.to_dtype(DType::F32).unwrap();
    assert!(!attention(&q, &q, &q, 2, 1.0).unwrap().track_op());
}

/// Each CPU family passes its first-use check well within tolerance; the check is cheap.
#[test]
fn cpu_kernels_pass_their_first_use_check() {
    for family in Family::ALL.into_iter().filter(|f| *f != Family::Optimizer) {
        let verdict = recheck(family, &Device::Cpu, DType::F32);
        let Verdict::Passed { max_err, seconds } = verdict else {
            panic!("{family:?}: {verdict:?}")
        };
        eprintln!("{family:?}: max rel err {max_err:.2e} in {seconds:.3} s");
        assert!(
            max_err < family.tolerance(DType::F32) / 4.0,
            "{family:?}: {max_err}"
        );
    }
}

/// On a GPU (`--features cuda` with one present; skipped without): every family's
/// first-use check passes in every dtype, with the launch limits of the real device.
#[cfg(feature = "cuda")]
#[test]
fn first_use_checks_pass_on_gpu() {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("no GPU: skipped");
        return;
    };
    for family in Family::ALL {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            if !crate::kernels::kernels_exist(family, &dev, dtype) {
                continue;
            }
            let verdict = recheck(family, &dev, dtype);
            eprintln!("{family:?} {dtype:?}: {verdict:?}");
            assert!(
                matches!(verdict, Verdict::Passed { .. }),
                "{family:?} {dtype:?}"
            );
        }
    }
}
