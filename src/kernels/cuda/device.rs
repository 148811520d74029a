//! Launching on a GPU: module loading (once per device), buffer addresses, launch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::limits::Limits;
use super::{Arg, Launch, Module};

type Loaded = HashMap<(DeviceId, &'static str), Arc<CudaModule>>;

fn module(dev: &CudaDevice, m: &'static Module) -> Result<Arc<CudaModule>> {
    static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);
    let Ok(mut loaded) = LOADED.lock() else {
        bail!("CUDA module cache poisoned")
    };
    let loaded = loaded.get_or_insert_with(HashMap::new);
    if let Some(md) = loaded.get(&(dev.id(), m.name)) {
        return Ok(md.clone());
    }
    let ctx = dev.cuda_stream().context().clone();
    let md = ctx.load_module(Ptx::from_binary(m.fatbin.to_vec())).w()?;
    loaded.insert((dev.id(), m.name), md.clone());
    Ok(md)
}

/// `dev`'s compute capability major version (0 where CUDA does not say), read once.
pub(crate) fn compute_major(dev: &CudaDevice) -> i32 {
    static SEEN: Mutex<Option<HashMap<DeviceId, i32>>> = Mutex::new(None);
    let Ok(mut seen) = SEEN.lock() else {
        return 0;
    };
    *seen
        .get_or_insert_with(HashMap::new)
        .entry(dev.id())
        .or_insert_with(|| {
            let cc = dev.cuda_stream().context().compute_capability();
            cc.map_or(0, |(major, _)| major)
        })
}

/// The most dynamic shared memory a block may opt into on `dev` (227 KB on an H100).
pub(crate) fn shared_limit(dev: &CudaDevice) -> usize {
    static SEEN: Mutex<Option<HashMap<DeviceId, usize>>> = Mutex::new(None);
    let Ok(mut seen) = SEEN.lock() else {
        return 48 * 1024;
    };
    *seen
        .get_or_insert_with(HashMap::new)
        .entry(dev.id())
        .or_insert_with(|| {
            let attr = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
            let optin = dev.cuda_stream().context().attribute(attr);
            optin.map_or(48 * 1024, |b| b.max(0) as usize)
        })
}

type Functions = HashMap<(DeviceId, &'static str, String), (CudaFunction, Limits)>;

/// A kernel of `m` on `dev`, loaded once, with what it may be launched with. Where the GPU
/// offers more than 48 KB of shared memory per block, the kernel is allowed all of it less
/// its own static shared memory (CUDA refuses more), once: the attribute is per function,
/// and setting it per launch would race between threads launching the same kernel.
fn function(dev: &CudaDevice, m: &'static Module, kernel: &str) -> Result<(CudaFunction, Limits)> {
    static LOADED: Mutex<Option<Functions>> = Mutex::new(None);
    let Ok(mut loaded) = LOADED.lock() else {
        bail!("CUDA function cache poisoned")
    };
    let loaded = loaded.get_or_insert_with(HashMap::new);
    let key = (dev.id(), m.name, kernel.to_string());
    if let Some(f) = loaded.get(&key) {
        return Ok(f.clone());
    }
    let func = module(dev, m)?.load_function(kernel).w()?;
    let attr = |a| func.get_attribute(a).w().map(|v| v.max(0) as u32);
    let limits = Limits::new(
        attr(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
        attr(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
        shared_limit(dev) as u32,
    );
    if let Some(bytes) = limits.opt_in {
        let a = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        func.set_attribute(a, bytes as i32).w()?;
    }
    loaded.insert(key, (func.clone(), limits));
    Ok((func, limits))
}

/// Runs `l` on `dev`'s stream (asynchronously, as candle's own kernels).
pub(crate) fn run(dev: &CudaDevice, l: &Launch) -> Result<()> {
    let (func, limits) = function(dev, l.module, &l.kernel)?;
    l.check(&limits)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    for a in &l.args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::U32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
        block_dim: (l.block[0], l.block[1], l.block[2]),
        shared_mem_bytes: l.shared,
    };
    // SAFETY: `l` was built by the same function the emulator tests run, which checks the
    // argument count against the kernel's parameters; buffers are sized by the caller.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The address of a contiguous tensor's first element, and the guard that records the
/// read on `stream` once dropped (after the launch).
pub(crate) fn input_ptr<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("a CUDA kernel input is not contiguous")
    };
    macro_rules! at {
        ($t:ty) => {{
            let (p, g) = s.as_cuda_slice::<$t>()?.device_ptr(stream);
            (p + (start * std::mem::size_of::<$t>()) as u64, g)
        }};
    }
    Ok(match s.dtype() {
        DType::F32 => at!(f32),
        DType::BF16 => at!(bf16),
        DType::F16 => at!(f16),
        d => bail!("no CUDA kernel for {d:?}"),
    })
}

/// The address of a fresh output buffer, and its write guard.
pub(crate) fn output_ptr<'a>(
    s: &'a mut CudaStorage,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    Ok(match s.dtype() {
        DType::F32 => s.as_cuda_slice_mut::<f32>()?.device_ptr_mut(stream),
        DType::BF16 => s.as_cuda_slice_mut::<bf16>()?.device_ptr_mut(stream),
        DType::F16 => s.as_cuda_slice_mut::<f16>()?.device_ptr_mut(stream),
        d => bail!("no CUDA kernel for {d:?}"),
    })
}

/// An uninitialized buffer of `n` elements, for a kernel that writes all of them.
pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    // SAFETY: callers launch a kernel that writes every element before any read.
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n)? }, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f16>(n)? }, dev.clone()),
        d => bail!("no CUDA kernel for {d:?}"),
    })
}
