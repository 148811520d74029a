//! Flash attention's tests: the kernels against the composed softmax(scale q k^T) v and
//! its autograd gradients, on the emulator (every launch builder, f32 tightly and bf16
//! loosely) and through `attention()` on a GPU.
#![cfg_attr(not(any(feature = "testkit", feature = "cuda")), allow(dead_code))]

use candle_core::{DType, Tensor};

use crate::testkit::reference;
use crate::testkit::tolerance::rel_err;

/// The reference on token-major `[b, tokens, heads * d]` tensors: the output, and the
/// rows' log-sum-exp `[b * heads, n]`.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> (Tensor, Tensor) {
    (
        reference::attention(q, k, v, heads, scale).unwrap(),
        reference::attention_lse(q, k, heads, scale).unwrap(),
    )
}

/// Tolerance of max |error| / max |reference|: f32 checks the algorithm; bf16 rounds the
/// inputs of every tile product (P and dS included) to 8 bits.
fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-5
    } else {
        2e-2
    }
}

/// `(batch, heads, n, m, d)`: head dims off multiples of 16 (scalar and 16-byte loads),
/// partial query and key tiles, m = 77 as in cross-attention, one query, head dim 128.
const CASES: [(usize, usize, usize, usize, usize); 6] = [
    (2, 3, 70, 77, 12),
    (1, 2, 130, 65, 8),
    (1, 1, 33, 100, 40),
    (1, 2, 1, 40, 6),
    (1, 1, 20, 70, 128),
    (2, 1, 64, 64, 16),
];

#[cfg(feature = "testkit")]
mod emulated {
    use candle_core::{DType, Device, Result, Tensor, Var};

    use super::super::emu::run;
    use super::super::flash::{self, Dims};
    use super::super::tests::Host;
    use super::super::Launch;
    use super::{composed, rel_err, tolerance, CASES};
    use crate::rng::seeded_normal;

    /// Normal values (times `gain`) as stored in `dtype`, in f32.
    fn input(seed: u64, shape: (usize, usize, usize), gain: f64, dtype: DType) -> Tensor {
        let t = (seeded_normal(seed, shape, &Device::Cpu).unwrap() * gain).unwrap();
        t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
    }

    /// Max relative errors of o, lse, dq, dk, dv from the four kernels.
    fn errors(
        dtype: DType,
        (batch, heads, n, m, d): (usize, usize, usize, usize, usize),
        threads: Option<u32>,
    ) -> [f32; 5] {
        let s = Dims {
            batch,
            heads,
            n,
            m,
            d,
            scale: (d as f32).powf(-0.5),
        };
        let c = heads * d;
        // Scores of a few units, so the running max moves between key tiles.
        let q = input(1, (batch, n, c), 3.0, dtype);
        let (k, v) = (
            input(2, (batch, m, c), 1.0, dtype),
            input(3, (batch, m, c), 1.0, dtype),
        );
        let g = input(4, (batch, n, c), 1.0, dtype);
        let [hq, hk, hv, hg] = [&q, &k, &v, &g].map(|t| Host::of(t, dtype));
        let (o, dq) = (
            Host::zeros(q.elem_count(), dtype),
            Host::zeros(q.elem_count(), dtype),
        );
        let (dk, dv) = (
            Host::zeros(k.elem_count(), dtype),
            Host::zeros(k.elem_count(), dtype),
        );
        let (lse, delta) = (
            Host::zeros(flash::rows(&s), DType::F32),
            Host::zeros(flash::rows(&s), DType::F32),
        );
        let ins = [
            hq.arg(),
            hk.arg(),
            hv.arg(),
            hg.arg(),
            lse.arg(),
            delta.arg(),
        ];
        // The tiled kernels with another block size, as MAGICTAILOR_FLASH_THREADS sets it.
        let tiled = |l: Result<Launch>| {
            let mut l = l.unwrap();
            if let Some(t) = threads {
                l.block = [t, 1, 1];
            }
            run(&l).unwrap()
        };
        tiled(flash::fwd(
            dtype,
            &s,
            [ins[0], ins[1], ins[2], o.arg(), lse.arg()],
        ));
        run(&flash::delta(dtype, &s, [o.arg(), hg.arg(), delta.arg()]).unwrap()).unwrap();
        let [a, b, c6, d6, e, f] = ins;
        tiled(flash::dkdv(
            dtype,
            &s,
            [a, b, c6, d6, e, f, dk.arg(), dv.arg()],
        ));
        tiled(flash::dq(dtype, &s, [a, b, c6, d6, e, f, dq.arg()]));

        let [vq, vk, vv] = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
        let (want, want_lse) = composed(
            vq.as_tensor(),
            vk.as_tensor(),
            vv.as_tensor(),
            heads,
            s.scale as f64,
        );
        let grads = (&want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
        [
            rel_err(&o.tensor(q.dims()), &want),
            rel_err(&lse.tensor(&[batch * heads, n]), &want_lse),
            rel_err(&dq.tensor(q.dims()), &grad(&vq)),
            rel_err(&dk.tensor(k.dims()), &grad(&vk)),
            rel_err(&dv.tensor(k.dims()), &grad(&vv)),
        ]
    }

    fn check(dtype: DType, threads: Option<u32>) {
        for case in CASES {
            let e = errors(dtype, case, threads);
            eprintln!("{dtype:?} {case:?} {threads:?}: o, lse, dq, dk, dv errors {e:?}");
            assert!(
                e.iter().all(|&e| e < tolerance(dtype)),
                "{dtype:?} {case:?}: {e:?}"
            );
        }
    }

    #[test]
    fn flash_f32_matches_composed() {
        check(DType::F32, None);
    }

    #[test]
    fn flash_bf16_matches_composed() {
        check(DType::BF16, None);
    }

    #[test]
    fn flash_f16_matches_composed() {
        check(DType::F16, None);
    }

    /// The kernels size their loops from blockDim: 8 warps give the same results.
    #[test]
    fn flash_with_256_threads_matches_composed() {
        check(DType::F32, Some(256));
        check(DType::BF16, Some(256));
    }
}

/// `attention()` through the kernels on a GPU against the composed op in f32 on the same
/// GPU, with gradients; includes SD 2.1's self-attention head dim at 1024 tokens.
#[cfg(feature = "cuda")]
#[test]
fn flash_on_gpu_matches_composed() {
    use candle_core::{Device, Var};

    use crate::rng::seeded_normal;

    let Some(dev) = super::tests::gpu() else {
        eprintln!("no GPU: skipped");
        return;
    };
    let shapes = [
        CASES[0],
        CASES[4],
        (1, 5, 1024, 1024, 64),
        (2, 5, 1024, 77, 64),
    ];
    let cpu = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    for (batch, heads, n, m, d) in shapes {
        let scale = (d as f64).powf(-0.5);
        for dtype in [DType::F32, DType::BF16] {
            let c = heads * d;
            let normal = |seed, tokens| {
                let t = seeded_normal(seed, (batch, tokens, c), &dev).unwrap();
                t.to_dtype(dtype).unwrap()
            };
            let (q, k, v, g) = (normal(1, n), normal(2, m), normal(3, m), normal(4, n));
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let [tq, tk, tv] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let y = crate::model::ops::attention(tq, tk, tv, heads, scale).unwrap();
            let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();

            let f32v =
                [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap());
            let [fq, fk, fv] = [0, 1, 2].map(|i| f32v[i].as_tensor());
            let (want, _) = composed(fq, fk, fv, heads, scale);
            let g32 = g.to_dtype(DType::F32).unwrap();
            let gw = (&want * g32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();

            let tol = if dtype == DType::F32 {
                1e-4
            } else {
                tolerance(dtype)
            };
            let e = rel_err(&cpu(&y), &cpu(&want));
            assert!(e < tol, "{dtype:?} {n}x{m} d={d} forward: {e}");
            for (i, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
                let got = gs.get(vars[i].as_tensor()).unwrap();
                let want = gw.get(f32v[i].as_tensor()).unwrap();
                let e = rel_err(&cpu(got), &cpu(want));
                assert!(e < tol, "{dtype:?} {n}x{m} d={d} {name}: {e}");
            }
        }
    }
}

/// The launches' shared memory decides where flash attention runs: SD 2.1's head dim fits
/// an H100's 227 KB and an A100's 163 KB in bf16, not an RTX 40xx's 99 KB (its backward
/// needs 125 KB), where the composed ops take over; and no grid has over 65535 rows.
#[test]
fn flash_launches_fit_the_gpu_or_fall_back() {
    let s = |batch, heads| super::flash::Dims {
        batch,
        heads,
        n: 4096,
        m: 4096,
        d: 64,
        scale: 0.125,
    };
    let fits = |dtype, s, kb: usize| super::flash::fits(dtype, &s, kb * 1024);
    assert!(fits(DType::BF16, s(6, 5), 227));
    assert!(fits(DType::BF16, s(6, 5), 163));
    assert!(!fits(DType::BF16, s(6, 5), 99));
    assert!(!fits(DType::BF16, s(65_536, 1), 227));
}
