//! Our compute kernels, apart from the differentiable ops that call them
//! (`crate::model::ops`) and the optimizer that runs the multi-tensor ones (`crate::train`):
//!
//! - `cpu/`: f32 SIMD kernels (attention, GroupNorm/LayerNorm, GEGLU, LoRA linear, im2col),
//!   AVX2/AVX-512 picked at run time;
//! - `cuda/`: the CUDA kernel sources (`.cu`), the launch descriptions and their launcher,
//!   the launch limits `build.rs` shares (`limits.rs`), ptxas's committed report
//!   (`resources.tsv`), and the CPU emulator the tests run the kernels on (`emu.*`, built
//!   only with the `testkit` feature);
//! - `gate.rs`: which families of kernels run, checked at first use against the composed
//!   ops (the checks themselves are the ops', passed in by the caller);
//! - `multi_tensor.rs`: the optimizer's squared-gradient sums, AdamW and DS-Bal EMA, one
//!   CUDA launch over all tensors.
//!
//! May import candle, `crate::rng`, `crate::error` and `crate::io::console`; never
//! `crate::model` or `crate::train` (their tests excepted, which compare with the ops and
//! the optimizer).

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod gate;
pub(crate) mod multi_tensor;

pub use cuda::limits::Resources as KernelResources;
pub use gate::{entries as kernel_states, sticky_error_hint, Comparison, Entry, Family, Verdict};

/// Whether `family` has kernels for `dev` in `dtype`, not switched off by the environment
/// (`MAGICTAILOR_CUDA_KERNELS=0`) or the GPU's age.
pub fn kernels_exist(family: Family, dev: &Device, dtype: DType) -> bool {
    gate::exists(family, dev, dtype)
}

/// The SIMD level of the CPU kernels on this machine (AVX-512, AVX2+FMA or baseline).
pub fn simd_level() -> &'static str {
    cpu::simd_level()
}

/// The shared memory a block may opt into on `dev`, in bytes (0 off CUDA).
pub fn gpu_shared_limit(dev: &Device) -> usize {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::shared_limit(d),
        _ => 0,
    }
}

/// ptxas's report of the CUDA kernels compiled into this binary (none without
/// `--features cuda`).
pub fn compiled_kernels() -> Vec<KernelResources> {
    #[cfg(feature = "cuda")]
    let table = include_str!(concat!(env!("OUT_DIR"), "/kernel_resources.tsv"));
    #[cfg(not(feature = "cuda"))]
    let table = "";
    cuda::limits::parse_table(table)
}

/// The f32 data of a contiguous CPU tensor layout.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("cpu kernel expects contiguous f32 data"),
    }
}

/// `f` over the f32 data of CPU tensors (made contiguous first).
pub(crate) fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(f32_slice(s, layout)?),
            _ => bail!("cpu kernel expects CPU data"),
        }
    }
    Ok(f(&slices))
}
