//! Our CUDA kernels (the `.cu` files beside this one) and how they are launched.
//!
//! A kernel launch is described once, as a [`Launch`] (kernel name, geometry, arguments),
//! by a function of the op's shape and buffer addresses. The same description runs on a
//! GPU (`run`, `--features cuda`) and, in `cargo test`, on the CPU emulator (`emu`), which
//! executes the same kernel source with one OS thread per CUDA thread. So the tests check
//! each kernel's maths, indexing, synchronization and launch geometry without a GPU; what
//! only a GPU can show (speed, resource limits) is left to `cargo test --features cuda`
//! on one.
//!
//! build.rs compiles each `.cu` to a fatbin with sm_80 and sm_90 SASS and compute_80 PTX,
//! checks ptxas's report of each kernel's registers and shared memory against the launch
//! rules ([`limits`]), and keeps the report (`resources.tsv`) for the emulator.
//!
//! May import candle (cudarc under `--features cuda`), `half`, and `crate::kernels::cpu`
//! (shapes shared with the CPU kernels); `limits.rs` imports nothing, as `build.rs`
//! includes it. The emulator (`emu.*`) and the tests are built with the `testkit` feature
//! only; the tests may also use `crate::testkit`, `crate::model::ops` and `crate::train`.

// Without `--features cuda` only the emulator tests launch kernels.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{bail, DType, Result};

pub(crate) mod adamw;
pub(crate) mod flash;
pub(crate) mod geglu;
pub(crate) mod limits;
pub(crate) mod norm;

/// A kernel argument, as the kernel's parameter list takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A device (or, in the emulator, host) address.
    Ptr(u64),
    U32(u32),
    F32(f32),
}

/// One `.cu` file, compiled.
pub(crate) struct Module {
    pub name: &'static str,
    #[cfg(feature = "cuda")]
    fatbin: &'static [u8],
}

macro_rules! module {
    ($name:literal) => {
        $crate::kernels::cuda::Module {
            name: $name,
            #[cfg(feature = "cuda")]
            fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".fatbin")),
        }
    };
}
use module;

/// A kernel launch: which kernel, its grid, block, dynamic shared bytes and arguments.
#[derive(Debug)]
pub(crate) struct Launch {
    pub module: &'static Module,
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
    pub args: Vec<Arg>,
}

impl Launch {
    /// Whether the GPU can run this launch of a kernel loaded with `limits`; the error
    /// names the kernel and the rule (CUDA itself would only say "invalid argument").
    pub(crate) fn check(&self, limits: &limits::Limits) -> Result<()> {
        let [x, y, z] = self.block;
        let threads = x as u64 * y as u64 * z as u64;
        let k = &self.kernel;
        if threads == 0 || threads > limits.max_threads as u64 || z > 64 {
            bail!(
                "{k}: a block of {x}x{y}x{z} threads; this kernel launches with at most {} \
                 (its __launch_bounds__ and registers)",
                limits.max_threads
            )
        }
        if self.shared > limits.max_dynamic {
            bail!(
                "{k}: {} bytes of dynamic shared memory; this GPU gives it at most {}",
                self.shared,
                limits.max_dynamic
            )
        }
        let [gx, gy, gz] = self.grid;
        if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > 65_535 || gz > 65_535 {
            bail!("{k}: a grid of {gx}x{gy}x{gz} blocks")
        }
        Ok(())
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The kernel name for `base` on `dtype` (kernels come in f32, bf16 and f16).
pub(crate) fn typed(base: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("{base}: no CUDA kernel for {d:?}"),
    };
    Ok(format!("{base}_{suffix}"))
}

/// Blocks for a grid-stride loop over `n` elements with `threads` per block.
pub(crate) fn stride_blocks(n: usize, threads: u32) -> u32 {
    n.div_ceil(threads as usize).clamp(1, 65_535) as u32
}

/// Whether CUDA tensors go through our kernels (default) or candle's composed ops
/// (`MAGICTAILOR_CUDA_KERNELS=0`: for comparisons, and a way out if a kernel misbehaves).
pub(crate) fn enabled() -> bool {
    switch().as_deref() != Some("0")
}

/// Whether our CUDA kernels run without their first-use check (`MAGICTAILOR_CUDA_KERNELS=1`).
pub(crate) fn unchecked() -> bool {
    switch().as_deref() == Some("1")
}

fn switch() -> &'static Option<String> {
    static SWITCH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SWITCH.get_or_init(|| std::env::var("MAGICTAILOR_CUDA_KERNELS").ok())
}

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub(crate) use device::{alloc, compute_major, input_ptr, output_ptr, run, shared_limit};

// Only this crate's own tests run kernels on it; with `--features cuda` the lib the
// test targets link (testkit on) has no other use for it.
#[cfg(feature = "testkit")]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod emu;

#[cfg(test)]
mod adamw_tests;
#[cfg(test)]
mod flash_tests;
#[cfg(test)]
mod norm_tests;
#[cfg(test)]
mod tests;
