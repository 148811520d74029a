//! The optimizer's multi-tensor kernels (adamw.cu) against the candle ops they replace
//! (optim.rs, ds_bal.rs): on the CPU emulator against the CPU path, and on a GPU the fused
//! path against the fallback. AdamW and the EMA round each op as candle does, so they must
//! agree to the bit; the norms sum in another order (f64), so to ~1e-15.

use candle_core::{Device, Tensor, Var};

use crate::rng::seeded_normal;
use crate::train::optim::{clip_coef, grad_norms, AdamW, AdamWConfig, Clip};

/// Odd sizes: partial chunks, a one-element tensor, one spanning many chunks.
const SIZES: [usize; 5] = [1, 37, 300, 4097, 1000];
/// Which tensors are clipped (group 0, the LoRA weights in training); the rest are group 1.
const CLIPPED: [bool; 5] = [true, false, true, true, false];
/// Gradient scales per step: clipped (norm > 1), not (coef exactly 1), clipped.
const SCALES: [f64; 3] = [0.05, 0.005, 0.02];

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    }
}

fn init(dev: &Device) -> Vec<Var> {
    (SIZES.iter().enumerate())
        .map(|(i, &n)| Var::from_tensor(&seeded_normal(i as u64, n, dev).unwrap()).unwrap())
        .collect()
}

/// Step `k`'s gradients: the backward of sum(p * w) is exactly w.
fn grads(params: &[Var], k: usize) -> candle_core::backprop::GradStore {
    let mut loss = Tensor::zeros((), candle_core::DType::F32, params[0].device()).unwrap();
    for (i, p) in params.iter().enumerate() {
        let w = seeded_normal((100 * k + i) as u64, p.elem_count(), p.device()).unwrap();
        let w = (w * SCALES[k]).unwrap();
        loss = (loss + (p.as_tensor() * w).unwrap().sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

fn split(params: &[Var]) -> (Vec<Var>, Vec<Var>) {
    let clipped = |want| {
        (params.iter().zip(CLIPPED))
            .filter(|(_, c)| *c == want)
            .map(|(p, _)| p.clone())
            .collect::<Vec<_>>()
    };
    (clipped(true), clipped(false))
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu).unwrap().to_vec1().unwrap()
}

/// Asserts `a` and `b` are the same bits, naming the first element that differs.
fn same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: element {i} is {} instead of {}", a[i], b[i]);
    }
}

#[cfg(feature = "testkit")]
mod emulated {
    use super::super::adamw::{self, Table};
    use super::super::emu::run;
    use super::super::Arg;
    use super::*;
    use crate::kernels::multi_tensor::ema_composed as ema_step;
    use crate::train::optim::adamw_step;

    /// Small chunks, so the small tensors still take tens of blocks.
    const CHUNK: u32 = 256;

    /// The kernels' state, in host memory.
    struct Host {
        p: Vec<Vec<f32>>,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    }

    fn addr(v: &[f32]) -> u64 {
        v.as_ptr() as u64
    }

    /// The address of a buffer the kernel writes.
    fn out<T>(v: &mut [T]) -> u64 {
        v.as_mut_ptr() as u64
    }

    /// The norms of the two groups, through grad_sq_sums.
    fn norms(g: &[Vec<f32>]) -> Vec<f64> {
        let mut t = Table::new(CHUNK);
        for (gi, c) in g.iter().zip(CLIPPED) {
            t.push([addr(gi), 0, 0, 0], gi.len(), u64::from(!c));
        }
        let (mut words, mut partial, mut sums) = (t.words(), vec![0f64; t.chunks()], vec![0f64; 2]);
        let (partial_at, sums_at) = (Arg::Ptr(out(&mut partial)), Arg::Ptr(out(&mut sums)));
        run(&adamw::sq_sums(&t, out(&mut words), 2, partial_at, sums_at).unwrap()).unwrap();
        assert_eq!(
            words.last(),
            Some(&(t.chunks() as u64)),
            "every block counted"
        );
        sums.into_iter().map(f64::sqrt).collect()
    }

    /// One fused step on `h` with gradients `g`, as the trainer takes it.
    fn step(h: &mut Host, g: &[Vec<f32>], k: usize) -> Vec<f64> {
        let n = norms(g);
        let mut t = Table::new(CHUNK);
        for i in 0..SIZES.len() {
            let (p, m, v) = (out(&mut h.p[i]), out(&mut h.m[i]), out(&mut h.v[i]));
            let ptrs = [p, addr(&g[i]), m, v];
            t.push(ptrs, SIZES[i], u64::from(CLIPPED[i]));
        }
        let words = t.words();
        let hy = adamw_step(&config(), k + 1, clip_coef(n[0], 1.0)).hyper();
        run(&adamw::step(&t, words.as_ptr() as u64, &hy).unwrap()).unwrap();
        n
    }

    #[test]
    fn adamw_and_norms_match_the_cpu_path() {
        let params = init(&Device::Cpu);
        let mut h = Host {
            p: params.iter().map(|p| host(p.as_tensor())).collect(),
            m: SIZES.iter().map(|&n| vec![0.0; n]).collect(),
            v: SIZES.iter().map(|&n| vec![0.0; n]).collect(),
        };
        let mut opt = AdamW::new(params.clone(), config()).unwrap();
        let (lora, text) = split(&params);
        for k in 0..SCALES.len() {
            let gs = grads(&params, k);
            let g: Vec<Vec<f32>> = params.iter().map(|p| host(gs.get(p).unwrap())).collect();
            let want = grad_norms(&gs, &[&lora, &text]).unwrap();
            let got = step(&mut h, &g, k);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-14 * b, "step {k}: norm {a} vs {b}");
            }
            assert_eq!(
                clip_coef(got[0], 1.0) as f32,
                clip_coef(want[0], 1.0) as f32
            );
            let coef = clip_coef(want[0], 1.0);
            opt.step_clipped(
                &gs,
                Some(Clip {
                    params: &lora,
                    coef,
                }),
            )
            .unwrap();
            let state = opt.state().unwrap();
            for (i, p) in params.iter().enumerate() {
                let m = host(&state[&format!("m.{i}")]);
                let v = host(&state[&format!("v.{i}")]);
                same(&h.p[i], &host(p.as_tensor()), &format!("step {k}: p.{i}"));
                same(&h.m[i], &m, &format!("step {k}: m.{i}"));
                same(&h.v[i], &v, &format!("step {k}: v.{i}"));
            }
        }
    }

    #[test]
    fn ema_matches_the_cpu_path() {
        let beta = 0.99;
        let mut want: Vec<Tensor> = init(&Device::Cpu)
            .iter()
            .map(|p| p.as_tensor().clone())
            .collect();
        let mut m: Vec<Vec<f32>> = want.iter().map(host).collect();
        for k in 0..3u64 {
            let theta: Vec<Tensor> = (SIZES.iter().enumerate())
                .map(|(i, &n)| seeded_normal(50 + 10 * k + i as u64, n, &Device::Cpu).unwrap())
                .collect();
            let theta_host: Vec<Vec<f32>> = theta.iter().map(host).collect();
            let mut t = Table::new(CHUNK);
            for (mi, ti) in m.iter_mut().zip(&theta_host) {
                t.push([out(mi), addr(ti), 0, 0], mi.len(), 0);
            }
            let words = t.words();
            run(&adamw::ema(&t, words.as_ptr() as u64, beta).unwrap()).unwrap();
            for (w, th) in want.iter_mut().zip(&theta) {
                *w = ema_step(w, th, beta).unwrap();
            }
            for (i, (a, b)) in m.iter().zip(&want).enumerate() {
                same(a, &host(b), &format!("step {k}: tensor {i}"));
            }
        }
    }
}

/// On a GPU: three training-like steps through the fused kernels against candle's ops on
/// the CPU (the reference the emulator tests use; `MAGICTAILOR_CUDA_KERNELS` is read once
/// per process, so the CUDA fallback cannot run beside the fused path here). The gradients
/// are exactly `w` on both devices, so everything must agree to the bit but the norms.
#[cfg(feature = "cuda")]
#[test]
fn adamw_and_ema_on_gpu_match_the_cpu_path() {
    let Some(dev) = super::tests::gpu() else {
        eprintln!("no GPU: skipped");
        return;
    };
    let (gpu, cpu) = (init(&dev), init(&Device::Cpu));
    let mut fused = AdamW::new(gpu.clone(), config()).unwrap();
    let mut plain = AdamW::new(cpu.clone(), config()).unwrap();
    let ((gl, gt), (cl, ct)) = (split(&gpu), split(&cpu));
    for k in 0..SCALES.len() {
        let (gg, cg) = (grads(&gpu, k), grads(&cpu, k));
        let gn = grad_norms(&gg, &[&gl, &gt]).unwrap();
        let cn = grad_norms(&cg, &[&cl, &ct]).unwrap();
        for (a, b) in gn.iter().zip(&cn) {
            assert!((a - b).abs() <= 1e-14 * b, "step {k}: norm {a} vs {b}");
        }
        let coef = clip_coef(cn[0], 1.0);
        let clip = Clip { params: &gl, coef };
        fused.step_clipped(&gg, Some(clip)).unwrap();
        let clip = Clip { params: &cl, coef };
        plain.step_clipped(&cg, Some(clip)).unwrap();
        let (fs, ps) = (fused.state().unwrap(), plain.state().unwrap());
        for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
            let (a, b) = (host(a.as_tensor()), host(b.as_tensor()));
            same(&a, &b, &format!("step {k}: p.{i}"));
            for name in [format!("m.{i}"), format!("v.{i}")] {
                same(
                    &host(&fs[&name]),
                    &host(&ps[&name]),
                    &format!("step {k}: {name}"),
                );
            }
        }
        // The EMA of the momentum adapters, here of the parameters.
        let beta = 0.99;
        let m: Vec<Tensor> = gpu.iter().map(|p| (p.as_tensor() * 0.5).unwrap()).collect();
        let pairs: Vec<_> = m
            .iter()
            .zip(&gpu)
            .map(|(m, p)| (m, p.as_tensor()))
            .collect();
        assert!(crate::kernels::multi_tensor::fused_ema(&pairs, beta).unwrap());
        for (i, (m, c)) in m.iter().zip(&cpu).enumerate() {
            let half = (c.as_tensor() * 0.5).unwrap();
            let want =
                crate::kernels::multi_tensor::ema_composed(&half, c.as_tensor(), beta).unwrap();
            same(&host(m), &host(&want), &format!("step {k}: EMA {i}"));
        }
    }
}
