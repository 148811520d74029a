//! Running a [`Launch`] on the CPU emulator (emu.h, emu.cpp), with host addresses.

use std::ffi::{c_void, CString};

use candle_core::{bail, Result};

use super::{Arg, Launch};

extern "C" {
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

/// Runs `l` to completion. Its pointer arguments must be host addresses of buffers large
/// enough for the kernel.
pub(crate) fn run(l: &Launch) -> Result<()> {
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
