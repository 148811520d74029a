//! norm.cu's tests: GroupNorm (+ SiLU) and LayerNorm, forward and backward, against the
//! composed candle ops and their autograd gradients, in f32 and bf16.
#![cfg(any(feature = "testkit", feature = "cuda"))]

use candle_core::{DType, Device, Tensor, Var};

use super::tests::tol;
use crate::rng::seeded_normal;
use crate::testkit::reference;
use crate::testkit::tolerance::rel_err;

/// A seeded normal tensor `* scale + shift`, rounded to `dtype` and back to f32 (so the
/// reference sees what the kernel reads).
fn input(seed: u64, dims: &[usize], scale: f64, shift: f64, dtype: DType, dev: &Device) -> Tensor {
    let t = seeded_normal(seed, dims, dev)
        .unwrap()
        .affine(scale, shift)
        .unwrap();
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

fn composed_group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    silu: bool,
) -> Tensor {
    reference::group_norm(x, gamma, beta, groups, 1e-6, silu).unwrap()
}

fn composed_layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
    reference::layer_norm(x, gamma, beta, 1e-5).unwrap()
}

/// `op(x)` and dL/dx for L = sum(op(x) * dy), by candle's autograd.
fn value_and_grad(x: &Tensor, dy: &Tensor, op: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let y = op(var.as_tensor());
    let grads = (&y * dy).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(var.as_tensor()).unwrap().clone();
    (y, dx)
}

/// Asserts `got` is within `dtype`'s tolerance of `want` (`limit` times it), printing the
/// error for the record.
fn check(what: &str, dtype: DType, got: &Tensor, want: &Tensor, limit: f32) {
    let f32 = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let e = rel_err(&f32(got), &f32(want));
    eprintln!("{what} {dtype:?}: rel err {e:.2e}");
    assert!(e < limit * tol(dtype), "{what} {dtype:?}: {e}");
}

/// (batch, channels, groups, hw): hw odd (element by element), hw a multiple of the
/// 16-byte pack (vector loads, several per thread), and a group large enough for 1024
/// threads per block.
const GROUP_CASES: [(usize, usize, usize, usize); 3] =
    [(3, 12, 4, 37), (2, 6, 2, 320), (1, 8, 1, 4096)];

/// (rows, n): a row length not a multiple of the bf16 pack, and one of 1.25 packs per lane;
/// 37 rows leave the last block partly empty.
const LAYER_CASES: [(usize, usize); 2] = [(37, 37), (37, 320)];

#[cfg(feature = "testkit")]
mod emulated {
    use super::super::emu::run;
    use super::super::norm;
    use super::super::tests::Host;
    use super::super::Arg;
    use super::*;
    use crate::kernels::cpu::GroupNormShape;

    /// The vector path needs 16-byte aligned buffers: make sure the pack cases take it.
    fn assert_aligned(hs: &[&Host]) {
        for h in hs {
            let Arg::Ptr(p) = h.arg() else { unreachable!() };
            assert_eq!(p % 16, 0, "host buffer not 16-byte aligned");
        }
    }

    #[test]
    fn group_norm_matches_composed() {
        let cpu = &Device::Cpu;
        for (b, c, groups, hw) in GROUP_CASES {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                // Away from zero mean, so the statistics' cancellation is exercised.
                let x = input(1, &[b, c, hw], 2.0, 3.0, dtype, cpu);
                let dy = input(2, &[b, c, hw], 1.0, 0.0, dtype, cpu);
                let gamma = input(3, &[c], 0.5, 1.0, dtype, cpu);
                let beta = input(4, &[c], 0.5, 0.0, dtype, cpu);
                let h: Vec<Host> = [&x, &dy, &gamma, &beta]
                    .iter()
                    .map(|t| Host::of(t, dtype))
                    .collect();
                let n = b * c * hw;
                if hw % 8 == 0 {
                    assert_aligned(&h.iter().collect::<Vec<_>>());
                }
                for silu in [false, true] {
                    let (y, dx) = (Host::zeros(n, dtype), Host::zeros(n, dtype));
                    let s = GroupNormShape {
                        channels: c,
                        hw,
                        groups,
                        eps: 1e-6,
                        silu,
                    };
                    let fwd = [h[0].arg(), h[2].arg(), h[3].arg(), y.arg()];
                    run(&norm::group_fwd(dtype, fwd, &s, b).unwrap()).unwrap();
                    let bwd = [h[0].arg(), h[1].arg(), h[2].arg(), h[3].arg(), dx.arg()];
                    run(&norm::group_bwd(dtype, bwd, &s, b).unwrap()).unwrap();

                    let op = |x: &Tensor| composed_group_norm(x, &gamma, &beta, groups, silu);
                    let (want, want_dx) = value_and_grad(&x, &dy, op);
                    let what = format!("group norm {b}x{c}x{hw}/{groups} silu={silu}");
                    check(
                        &format!("{what} fwd"),
                        dtype,
                        &y.tensor(&[b, c, hw]),
                        &want,
                        1.0,
                    );
                    check(
                        &format!("{what} bwd"),
                        dtype,
                        &dx.tensor(&[b, c, hw]),
                        &want_dx,
                        1.0,
                    );
                }
            }
        }
    }

    #[test]
    fn layer_norm_matches_composed() {
        let cpu = &Device::Cpu;
        for (rows, n) in LAYER_CASES {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = input(5, &[rows, n], 2.0, -3.0, dtype, cpu);
                let dy = input(6, &[rows, n], 1.0, 0.0, dtype, cpu);
                let gamma = input(7, &[n], 0.5, 1.0, dtype, cpu);
                let beta = input(8, &[n], 0.5, 0.0, dtype, cpu);
                let h: Vec<Host> = [&x, &dy, &gamma, &beta]
                    .iter()
                    .map(|t| Host::of(t, dtype))
                    .collect();
                if n % 8 == 0 {
                    assert_aligned(&h.iter().collect::<Vec<_>>());
                }
                let (y, dx) = (Host::zeros(rows * n, dtype), Host::zeros(rows * n, dtype));
                let fwd = [h[0].arg(), h[2].arg(), h[3].arg(), y.arg()];
                run(&norm::layer_fwd(dtype, fwd, rows, n, 1e-5).unwrap()).unwrap();
                let bwd = [h[0].arg(), h[1].arg(), h[2].arg(), dx.arg()];
                run(&norm::layer_bwd(dtype, bwd, rows, n, 1e-5).unwrap()).unwrap();

                let (want, want_dx) =
                    value_and_grad(&x, &dy, |x| composed_layer_norm(x, &gamma, &beta));
                let what = format!("layer norm {rows}x{n}");
                check(
                    &format!("{what} fwd"),
                    dtype,
                    &y.tensor(&[rows, n]),
                    &want,
                    1.0,
                );
                check(
                    &format!("{what} bwd"),
                    dtype,
                    &dx.tensor(&[rows, n]),
                    &want_dx,
                    1.0,
                );
            }
        }
    }

    #[test]
    fn group_norm_refuses_bad_groups() {
        let s = GroupNormShape {
            channels: 6,
            hw: 4,
            groups: 4,
            eps: 1e-6,
            silu: false,
        };
        let v = Host::zeros(24, DType::F32);
        assert!(norm::group_fwd(DType::F32, [v.arg(); 4], &s, 1).is_err());
    }
}

/// The public ops on a GPU (our kernels) against the composed ops there, in f32.
#[cfg(feature = "cuda")]
mod on_gpu {
    use super::super::tests::gpu;
    use super::*;
    use crate::model::ops::{group_norm, layer_norm};

    #[test]
    fn group_norm_on_gpu_matches_composed() {
        let Some(dev) = gpu() else {
            eprintln!("no GPU: skipped");
            return;
        };
        for (b, c, groups, hw) in GROUP_CASES.into_iter().chain([(2, 320, 32, 4096)]) {
            for dtype in [DType::F32, DType::BF16] {
                let x = input(1, &[b, c, hw], 2.0, 3.0, dtype, &dev);
                let dy = input(2, &[b, c, hw], 1.0, 0.0, dtype, &dev);
                let gamma = input(3, &[c], 0.5, 1.0, dtype, &dev);
                let beta = input(4, &[c], 0.5, 0.0, dtype, &dev);
                for silu in [false, true] {
                    let at = |t: &Tensor| t.to_dtype(dtype).unwrap();
                    let (gm, bt) = (at(&gamma), at(&beta));
                    let op = |x: &Tensor| group_norm(x, &gm, &bt, groups, 1e-6, silu).unwrap();
                    let (y, dx) = value_and_grad(&at(&x), &at(&dy), op);
                    let op = |x: &Tensor| composed_group_norm(x, &gamma, &beta, groups, silu);
                    let (want, want_dx) = value_and_grad(&x, &dy, op);
                    let what = format!("gpu group norm {b}x{c}x{hw}/{groups} silu={silu}");
                    check(&format!("{what} fwd"), dtype, &y, &want, 1.0);
                    check(&format!("{what} bwd"), dtype, &dx, &want_dx, 1.0);
                }
            }
        }
    }

    #[test]
    fn layer_norm_on_gpu_matches_composed() {
        let Some(dev) = gpu() else {
            eprintln!("no GPU: skipped");
            return;
        };
        for (rows, n) in LAYER_CASES
            .into_iter()
            .chain([(4096, 320), (77, 1024), (256, 1280)])
        {
            for dtype in [DType::F32, DType::BF16] {
                let x = input(5, &[rows, n], 2.0, -3.0, dtype, &dev);
                let dy = input(6, &[rows, n], 1.0, 0.0, dtype, &dev);
                let gamma = input(7, &[n], 0.5, 1.0, dtype, &dev);
                let beta = input(8, &[n], 0.5, 0.0, dtype, &dev);
                let at = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let (gm, bt) = (at(&gamma), at(&beta));
                let op = |x: &Tensor| layer_norm(x, &gm, &bt, 1e-5).unwrap();
                let (y, dx) = value_and_grad(&at(&x), &at(&dy), op);
                let (want, want_dx) =
                    value_and_grad(&x, &dy, |x| composed_layer_norm(x, &gamma, &beta));
                let what = format!("gpu layer norm {rows}x{n}");
                check(&format!("{what} fwd"), dtype, &y, &want, 1.0);
                check(&format!("{what} bwd"), dtype, &dx, &want_dx, 1.0);
            }
        }
    }
}
