//! Kernel tests' shared helpers, and GEGLU's tests. Each kernel is checked against the
//! composed candle op in f32 and bf16 twice: on the CPU emulator (the `testkit` feature, every
//! `cargo test`) and on a GPU (`--features cuda` with one present; skipped without).
//! Each kernel file has its own tests file beside this one using these helpers.

use candle_core::{DType, Device, Tensor};
#[cfg(feature = "testkit")]
use half::{bf16, f16};

#[cfg(feature = "testkit")]
use super::emu::{ptr, run};
#[cfg(feature = "testkit")]
use super::geglu;
use crate::rng::seeded_normal;
use crate::testkit::reference;
use crate::testkit::tolerance::rel_err;

#[cfg(feature = "testkit")]
/// A tensor's values in `dtype`'s storage (f32 or bf16), as the kernel reads them.
pub(super) enum Host {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

#[cfg(feature = "testkit")]
impl Host {
    pub(super) fn of(t: &Tensor, dtype: DType) -> Host {
        let t = t.to_dtype(dtype).unwrap().flatten_all().unwrap();
        match dtype {
            DType::F32 => Host::F32(t.to_vec1().unwrap()),
            DType::BF16 => Host::Bf16(t.to_vec1().unwrap()),
            DType::F16 => Host::F16(t.to_vec1().unwrap()),
            _ => unreachable!(),
        }
    }
    pub(super) fn zeros(n: usize, dtype: DType) -> Host {
        match dtype {
            DType::F32 => Host::F32(vec![0.0; n]),
            DType::F16 => Host::F16(vec![f16::ZERO; n]),
            _ => Host::Bf16(vec![bf16::ZERO; n]),
        }
    }
    pub(super) fn arg(&self) -> super::Arg {
        match self {
            Host::F32(v) => ptr(v),
            Host::Bf16(v) => ptr(v),
            Host::F16(v) => ptr(v),
        }
    }
    pub(super) fn tensor(&self, shape: &[usize]) -> Tensor {
        let t = match self {
            Host::F32(v) => Tensor::from_slice(v, shape, &Device::Cpu),
            Host::Bf16(v) => Tensor::from_slice(v, shape, &Device::Cpu),
            Host::F16(v) => Tensor::from_slice(v, shape, &Device::Cpu),
        };
        t.unwrap().to_dtype(DType::F32).unwrap()
    }
}

/// The tolerance for results stored in `dtype` (one rounding of the output, plus slack).
pub(super) fn tol(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        2e-6
    } else {
        1e-2
    }
}

#[cfg(feature = "testkit")]
#[test]
fn geglu_matches_composed() {
    let (rows, inner) = (37, 40);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // The reference sees the inputs rounded to the kernel's storage type.
        let x = seeded_normal(1, (rows, 2 * inner), &Device::Cpu).unwrap();
        let x = x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let dy = seeded_normal(2, (rows, inner), &Device::Cpu).unwrap();
        let dy = dy.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let (hx, hdy) = (Host::of(&x, dtype), Host::of(&dy, dtype));
        let (y, dx) = (
            Host::zeros(rows * inner, dtype),
            Host::zeros(rows * 2 * inner, dtype),
        );
        run(&geglu::fwd(dtype, hx.arg(), y.arg(), rows, inner).unwrap()).unwrap();
        run(&geglu::bwd(dtype, hx.arg(), hdy.arg(), dx.arg(), rows, inner).unwrap()).unwrap();

        let var = candle_core::Var::from_tensor(&x).unwrap();
        let want = reference::geglu(var.as_tensor()).unwrap();
        let grads = (&want * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want_dx = grads.get(var.as_tensor()).unwrap();
        let e = rel_err(&y.tensor(&[rows, inner]), &want);
        assert!(e < tol(dtype), "{dtype:?} forward: {e}");
        let e = rel_err(&dx.tensor(&[rows, 2 * inner]), want_dx);
        assert!(e < tol(dtype), "{dtype:?} backward: {e}");
    }
}

#[cfg(feature = "testkit")]
#[test]
fn emulator_refuses_wrong_launches() {
    let v = vec![0f32; 4];
    let mut l = geglu::fwd(DType::F32, ptr(&v), ptr(&v), 1, 2).unwrap();
    l.args.pop();
    assert!(run(&l)
        .unwrap_err()
        .to_string()
        .contains("number of arguments"));
    let mut l = geglu::fwd(DType::F32, ptr(&v), ptr(&v), 1, 2).unwrap();
    l.kernel = "no_such_kernel".into();
    assert!(run(&l).unwrap_err().to_string().contains("no kernel named"));
    let mut l = geglu::fwd(DType::F32, ptr(&v), ptr(&v), 1, 2).unwrap();
    l.block = [2048, 1, 1];
    assert!(run(&l).is_err());
}

/// A GPU, for the tests that compare a kernel with the composed op on real hardware
/// (`cargo test --features cuda` on a machine with one); `None` elsewhere.
#[cfg(feature = "cuda")]
pub(super) fn gpu() -> Option<Device> {
    Device::new_cuda(0).ok()
}

#[cfg(feature = "cuda")]
#[test]
fn geglu_on_gpu_matches_composed() {
    let Some(dev) = gpu() else {
        eprintln!("no GPU: skipped");
        return;
    };
    for dtype in [DType::F32, DType::BF16] {
        let x = seeded_normal(1, (2, 300, 2 * 160), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let dy = seeded_normal(2, (2, 300, 160), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let y = crate::model::ops::geglu(var.as_tensor()).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(var.as_tensor()).unwrap();
        let xf = candle_core::Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let want = reference::geglu(xf.as_tensor()).unwrap();
        let gw = (&want * dy.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let want_dx = gw.backward().unwrap().get(xf.as_tensor()).unwrap().clone();
        let f32 = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        let e = rel_err(&f32(&y), &f32(&want));
        assert!(e < tol(dtype), "{dtype:?} forward: {e}");
        let e = rel_err(&f32(dx), &f32(&want_dx));
        assert!(e < tol(dtype), "{dtype:?} backward: {e}");
    }
}

/// The launch rules of `limits.rs`: registers per warp in units of 256 out of a block's
/// 64 K, and the shared-memory attribute a kernel with static shared memory may take.
#[test]
fn launch_limits_follow_cuda_rules() {
    use super::limits::{register_limited_threads, Limits, Resources, DEFAULT_SHARED};
    assert_eq!(register_limited_threads(32), 1024);
    assert_eq!(register_limited_threads(64), 1024);
    assert_eq!(register_limited_threads(65), 896); // 65 * 32 rounds up to 2304 per warp
    assert_eq!(register_limited_threads(255), 256);
    let h100 = 227 * 1024;
    let gn = Limits::new(1024, 128, h100);
    assert_eq!(
        gn.opt_in,
        Some(h100 - 128),
        "all the GPU offers, less the static part"
    );
    assert_eq!(gn.max_dynamic, h100 - 128);
    let old_gpu = Limits::new(1024, 128, DEFAULT_SHARED);
    assert_eq!(old_gpu.opt_in, None, "nothing to opt into");
    assert_eq!(old_gpu.max_dynamic, DEFAULT_SHARED - 128);
    let r = |registers, bound| Resources {
        kernel: "k".into(),
        arch: 90,
        bound,
        registers,
        static_shared: 0,
        stack: 0,
        spill_stores: 0,
        spill_loads: 0,
    };
    assert!(r(64, 1024).problems().is_empty());
    assert!(
        !r(65, 1024).problems().is_empty(),
        "65 registers x 1024 threads"
    );
    assert!(!r(40, 0).problems().is_empty(), "no launch bound");
    let line = r(48, 256).line();
    assert_eq!(Resources::parse(&line), Some(r(48, 256)));
}

/// Every kernel, as `device.rs` loads it, on an H100 (sm_90 code), an A100 and an
/// RTX 4090 (sm_80 code, less shared memory): its attribute is accepted, and the build's
/// report has it with the launch bound it was registered with. The attribute `device.rs`
/// set before (the GPU's whole opt-in limit) is refused for the three kernels that declare
/// static shared memory, on every GPU with more than 48 KB.
#[cfg(feature = "testkit")]
#[test]
fn every_kernel_loads_on_each_gpu_and_the_old_attribute_would_not() {
    use super::emu::{kernels, reported, A100, H100, RTX_4090};
    let all = kernels();
    let mut listed: Vec<String> = (super::limits::parse_table(include_str!("resources.tsv")))
        .into_iter()
        .map(|r| r.kernel)
        .collect();
    listed.dedup();
    let names: Vec<&String> = all.iter().map(|(k, _)| k).collect();
    assert_eq!(
        listed.iter().collect::<Vec<_>>(),
        names,
        "resources.tsv lists other kernels"
    );
    let mut refused_before = Vec::new();
    for (kernel, bound) in &all {
        for gpu in [H100, A100, RTX_4090] {
            let r = reported(kernel, gpu.arch).unwrap();
            assert_eq!(r.bound, *bound, "{kernel}: resources.tsv is stale");
            assert!(r.problems().is_empty(), "{:?}", r.problems());
            let limits = gpu.load(kernel).unwrap();
            assert!(limits.max_threads >= *bound, "{kernel} on {}", gpu.name);
            if gpu.set_max_dynamic(&r, gpu.optin).is_err() {
                refused_before.push(format!("{kernel} on {}", gpu.name));
            }
        }
    }
    let statics = ["gn_bwd", "gn_fwd", "grad_sq_sums"];
    let expected = all
        .iter()
        .filter(|(k, _)| statics.iter().any(|s| k.starts_with(s)));
    assert_eq!(
        refused_before.len(),
        expected.count() * 3,
        "{refused_before:?}"
    );
}

/// A launch over its kernel's bound, or asking for more shared memory than the GPU gives,
/// is refused before it runs, naming the rule: flash attention's dK/dV tile in bf16 fits
/// an A100's 163 KB, not an RTX 4090's 99 KB.
#[cfg(feature = "testkit")]
#[test]
fn launches_beyond_a_kernel_limits_are_refused() {
    use super::emu::{run_on, A100, RTX_4090};
    use super::flash::{self, Dims};
    let v = vec![0f32; 2 * 512];
    let mut l = geglu::fwd(DType::F32, ptr(&v), ptr(&v), 2, 256).unwrap();
    l.block = [512, 1, 1]; // within CUDA's 1024, over geglu's __launch_bounds__(256)
    let e = run(&l).unwrap_err().to_string();
    assert!(e.contains("at most 256"), "{e}");
    let s = Dims {
        batch: 1,
        heads: 1,
        n: 64,
        m: 64,
        d: 64,
        scale: 0.125,
    };
    let l = flash::dkdv(DType::BF16, &s, [ptr(&v); 8]).unwrap();
    assert!(l.shared as usize > 99 * 1024 && (l.shared as usize) < 163 * 1024);
    let e = run_on(&RTX_4090, &l).unwrap_err().to_string();
    assert!(e.contains("dynamic shared memory"), "{e}");
    let _ = A100; // fits there: the emulator tests run it on the H100's limits
}
