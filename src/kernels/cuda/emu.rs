//! Running a [`Launch`] on the CPU emulator (emu.h, emu.cpp), with host addresses, under
//! the launch rules of an emulated GPU: each kernel is "loaded" as `device.rs` loads it on
//! a real one (its shared-memory attribute set by the same [`Limits`]), with its registers
//! and static shared memory from the build's report (`resources.tsv`), and every launch is
//! checked as CUDA checks it.

use std::ffi::{c_char, c_void, CStr, CString};

use candle_core::{bail, Result};

use super::limits::{self, Limits, Resources};
use super::{Arg, Launch};

/// A GPU whose launch rules the emulator applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gpu {
    pub name: &'static str,
    /// The SASS it runs: sm_80 code runs on every 8.x GPU.
    pub arch: u32,
    /// Shared memory a block may opt into, in all.
    pub optin: u32,
}

pub(crate) const H100: Gpu = Gpu {
    name: "H100",
    arch: 90,
    optin: 227 * 1024,
};
pub(crate) const A100: Gpu = Gpu {
    name: "A100",
    arch: 80,
    optin: 163 * 1024,
};
pub(crate) const RTX_4090: Gpu = Gpu {
    name: "RTX 4090",
    arch: 80,
    optin: 99 * 1024,
};

/// The committed ptxas report of every kernel (build.rs keeps it current).
const TABLE: &str = include_str!("resources.tsv");

/// `kernel`'s registered launch bound (0: no such kernel).
pub(crate) fn bound(kernel: &str) -> u32 {
    let Ok(name) = CString::new(kernel) else {
        return 0;
    };
    // SAFETY: a NUL-terminated name; the registry is read-only after static init.
    unsafe { mt_emu_kernel_threads(name.as_ptr()) }
}

/// Every kernel the emulator has, with its launch bound.
pub(crate) fn kernels() -> Vec<(String, u32)> {
    extern "C" fn push(name: *const c_char, threads: u32, ctx: *mut c_void) {
        // SAFETY: `ctx` is the Vec below; `name` a NUL-terminated registry key.
        let (v, name) = unsafe { (&mut *(ctx as *mut Vec<(String, u32)>), CStr::from_ptr(name)) };
        v.push((name.to_string_lossy().into_owned(), threads));
    }
    let mut v: Vec<(String, u32)> = Vec::new();
    // SAFETY: `push` only runs during the call, with `v` alive.
    unsafe { mt_emu_kernels(push, &mut v as *mut _ as *mut c_void) };
    v
}

/// The report's row for `kernel` on `arch`.
pub(crate) fn reported(kernel: &str, arch: u32) -> Result<Resources> {
    match limits::parse_table(TABLE)
        .into_iter()
        .find(|r| r.kernel == kernel && r.arch == arch)
    {
        Some(r) => Ok(r),
        None => bail!(
            "{kernel} (sm_{arch}) is not in cuda/resources.tsv: build with --features cuda \
             and MAGICTAILOR_KERNEL_TABLE=write to record it"
        ),
    }
}

impl Gpu {
    /// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes) as CUDA judges it.
    pub(crate) fn set_max_dynamic(&self, r: &Resources, bytes: u32) -> Result<()> {
        if bytes as u64 + r.static_shared as u64 > self.optin as u64 {
            bail!(
                "CUDA_ERROR_INVALID_VALUE: {} may not opt into {bytes} bytes of dynamic shared \
                 memory: with its {} static bytes that is over the {}'s {}",
                r.kernel,
                r.static_shared,
                self.name,
                self.optin
            )
        }
        Ok(())
    }

    /// What `device.rs` does when it first loads `kernel`: read its attributes and allow
    /// it the shared memory the GPU offers.
    pub(crate) fn load(&self, kernel: &str) -> Result<Limits> {
        let r = reported(kernel, self.arch)?;
        let threads = match bound(kernel) {
            0 => bail!("emulator: no kernel named {kernel}"),
            b => b.min(r.max_threads()),
        };
        let limits = Limits::new(threads, r.static_shared, self.optin);
        if let Some(bytes) = limits.opt_in {
            self.set_max_dynamic(&r, bytes)?;
        }
        Ok(limits)
    }
}

extern "C" {
    fn mt_emu_kernel_threads(name: *const c_char) -> u32;
    fn mt_emu_kernels(f: extern "C" fn(*const c_char, u32, *mut c_void), ctx: *mut c_void);
    fn mt_emu_launch(
        name: *const std::ffi::c_char,
        grid: *const u32,
        block: *const u32,
        shared: u32,
        args: *mut *mut c_void,
        nargs: u32,
        fault: *mut std::ffi::c_char,
        fault_len: u32,
    ) -> i32;
}

/// Runs `l` to completion, as on an H100. Its pointer arguments must be host addresses of
/// buffers large enough for the kernel.
pub(crate) fn run(l: &Launch) -> Result<()> {
    run_on(&H100, l)
}

/// Runs `l` to completion under `gpu`'s launch rules.
pub(crate) fn run_on(gpu: &Gpu, l: &Launch) -> Result<()> {
    if bound(&l.kernel) == 0 {
        bail!("emulator: no kernel named {}", l.kernel)
    }
    l.check(&gpu.load(&l.kernel)?)?;
    let name = CString::new(l.kernel.as_str()).map_err(candle_core::Error::wrap)?;
    let mut args: Vec<*mut c_void> = l
        .args
        .iter()
        .map(|a| match a {
            Arg::Ptr(p) => p as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
        })
        .collect();
    let mut fault = [0u8; 256];
    // SAFETY: the emulator reads each argument through the pointer's kernel parameter
    // type; the arity is checked against the registered kernel.
    let rc = unsafe {
        mt_emu_launch(
            name.as_ptr(),
            l.grid.as_ptr(),
            l.block.as_ptr(),
            l.shared,
            args.as_mut_ptr(),
            args.len() as u32,
            fault.as_mut_ptr() as *mut std::ffi::c_char,
            fault.len() as u32,
        )
    };
    match rc {
        0 => Ok(()),
        1 => bail!("emulator: no kernel named {}", l.kernel),
        2 => bail!(
            "emulator: {} takes another number of arguments than {}",
            l.kernel,
            l.args.len()
        ),
        4 => {
            let what = std::ffi::CStr::from_bytes_until_nul(&fault).unwrap_or_default();
            bail!(
                "emulator: {} broke a CUDA rule: {}",
                l.kernel,
                what.to_string_lossy()
            )
        }
        _ => bail!("emulator: bad launch geometry for {}: {l:?}", l.kernel),
    }
}

/// The address of a host buffer, as a kernel pointer argument.
pub(crate) fn ptr<T>(v: &[T]) -> Arg {
    Arg::Ptr(v.as_ptr() as u64)
}
