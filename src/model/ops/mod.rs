//! Ops with hand-written backward passes, for the parts of a training step where
//! candle's generic autograd does far more work than training needs:
//!
//! - frozen linears and convolutions: candle's `Matmul`/`Conv2D` backward also computes
//!   (and stores) the gradient of the frozen weight, a third of the step's FLOPs, and its
//!   conv input-gradient goes through a naive CPU `conv_transpose2d`;
//! - attention: the composed softmax keeps `[batch*heads, n, n]` tensors for backward and
//!   differentiates through a dozen full-size passes;
//! - GroupNorm(+SiLU), LayerNorm, GEGLU and nearest upsampling, whose composed backward
//!   makes many passes (the upsample one runs a grouped conv per channel).
//!
//! Each op computes its value with ordinary tensor ops on detached inputs (so no graph
//! is kept) and attaches a custom op whose backward returns only the input gradients.
//! With no tracked input the value is returned as is, so inference pays nothing.
//!
//! Which ops take the kernels is decided per family by `crate::kernels::gate`, which checks
//! each family against the composed op (`check_family`, here) at its first use.
//!
//! Here: the machinery every op shares (attaching a backward, running a CPU kernel on a
//! tensor's storage) and the families' first-use checks; each op lives in its own file.
//! The kernels themselves (CPU and CUDA) and the gate are in `crate::kernels`.
//!
//! May import candle, `crate::kernels`, `crate::profile` and `crate::rng`.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor,
};

/// `cpu_fwd` and `cuda_fwd` of a custom op whose value was computed beforehand (its
/// `value` field, handed over by [`copy_value`]): one `storage layout` name pair per input.
macro_rules! precomputed_fwd {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::model::ops::copy_value(&self.value)
        }
        fn cuda_fwd(
            &self,
            $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $crate::model::ops::copy_value(&self.value)
        }
    };
}

mod attention;
mod conv;
mod geglu;
mod linear;
mod norm;

use crate::kernels::gate::{self, Comparison, Family, Verdict};
use crate::kernels::multi_tensor;
use crate::kernels::{f32_slice, with_f32};

pub use attention::{attention, use_reference_attention};
pub use conv::{frozen_conv2d, images_within, trained_conv2d, upsample_nearest_2x};
pub use geglu::geglu;
pub use linear::{frozen_linear, lora_linear, trained_linear, LoraAdapter};
pub use norm::{group_norm, layer_norm};

/// One backend's storage, picked out of a tensor's `Storage`.
trait Backend: BackendStorage<Device: BackendDevice<Storage = Self>> + Sized {
    fn of(s: &Storage) -> Result<&Self>;
}

impl Backend for CpuStorage {
    fn of(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cpu(c) => Ok(c),
            _ => bail!("a frozen weight is on another device than the activations"),
        }
    }
}

impl Backend for CudaStorage {
    fn of(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => bail!("a frozen weight is on another device than the activations"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// CPU kernels (kernels/) as graph-free custom ops on contiguous f32 tensors.

/// Whether the CPU kernels apply: f32 tensors on the CPU.
fn on_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `f` over the data of `x` and `y` (an input and its output gradient), giving a
/// tensor shaped like `x`.
fn kernel2(x: &Tensor, y: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> Vec<f32>) -> Result<Tensor> {
    let v = with_f32(&[x, y], |t| f(t[0], t[1]))?;
    Tensor::from_vec(v, x.shape(), x.device())
}

/// A three-input op's CPU gradients as tensors shaped like its inputs.
#[allow(clippy::type_complexity)]
fn grads3(
    grads: [Vec<f32>; 3],
    like: [&Tensor; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let [a, b, c] = grads;
    let cpu = &candle_core::Device::Cpu;
    Ok((
        Some(Tensor::from_vec(a, like[0].shape(), cpu)?),
        Some(Tensor::from_vec(b, like[1].shape(), cpu)?),
        Some(Tensor::from_vec(c, like[2].shape(), cpu)?),
    ))
}

fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

// ---------------------------------------------------------------------------------------
// Attaching a backward to a value computed without a graph.

/// The input gradient of a one-input op, given its input, output and output gradient
/// (all detached).
trait Grad1: Clone + Send + Sync + 'static {
    const NAME: &'static str;
    /// What the profiler calls this op's backward.
    const BWD: crate::profile::Kind;
    /// The family whose check gates this op's kernels (CPU and CUDA); `None`: a CPU
    /// kernel that always runs, and no CUDA kernel.
    const FAMILY: Option<Family> = None;
    /// dL/dx by candle ops or the CPU kernels.
    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor>;
    /// dL/dx by the op's CUDA kernel, where one exists (`CUDA`); `g` has `x`'s dtype.
    fn cuda_grad(&self, _x: &Tensor, _g: &Tensor) -> Option<Result<Tensor>> {
        None
    }
    /// The op's value from the input's f32 data (dims given), where a CPU kernel exists.
    fn cpu_value(&self, _x: &[f32], _dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        None
    }
    /// The op's value by its CUDA kernel, where one exists (`CUDA`).
    fn cuda_value(&self, _x: &CudaStorage, _l: &Layout) -> Option<Result<(CudaStorage, Shape)>> {
        None
    }
}

/// An op with a kernel: the value is computed in `cpu_fwd`/`cuda_fwd` from the input
/// storage.
struct Fused<G>(G);

impl<G: Grad1> CustomOp1 for Fused<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.0.cpu_value(f32_slice(s, l)?, l.dims()) {
            Some(value) => {
                let (v, shape) = value?;
                Ok((CpuStorage::F32(v), shape))
            }
            None => bail!("{} has no cpu kernel", G::NAME),
        }
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.0.cuda_value(s, l) {
            Some(value) => value,
            None => bail!("{} has no CUDA kernel", G::NAME),
        }
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        input_grad(&self.0, x, y, g).map(Some)
    }
}

/// `op`'s dL/dx, profiled: by its CUDA kernel where that takes `x` and `g`, else by
/// `grad`. The graph is not extended (inputs detached).
fn input_grad<G: Grad1>(op: &G, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(G::BWD, x.device());
    let x = x.detach();
    if let Some(family) = G::FAMILY {
        if x.device().is_cuda() && g.dtype() == x.dtype() && kernel_takes(family, &x) {
            let dx = gate::run(family, x.device(), x.dtype(), || {
                match op.cuda_grad(&x, g) {
                    Some(dx) => dx,
                    None => bail!("{} has no CUDA kernel", G::NAME),
                }
            })?;
            if let Some(dx) = dx {
                return Ok(dx);
            }
        }
    }
    op.grad(&x, &y.detach(), g)
}

/// Whether `family`'s kernels take `t` (checked at the family's first use on its device
/// and dtype).
fn kernel_takes(family: Family, t: &Tensor) -> bool {
    let (dev, dtype) = (t.device(), t.dtype());
    gate::use_kernel(family, dev, dtype, || {
        check_family(family, dev, dtype, false)
    })
}

/// Runs `family`'s first-use check on `dev` in `dtype` now (again, if it ran before),
/// records and returns its verdict.
pub fn recheck(family: Family, dev: &Device, dtype: DType) -> Verdict {
    gate::recheck(family, dev, dtype, || {
        check_family(family, dev, dtype, false)
    })
}

/// Whether `family`'s CPU kernels take `t`: f32 on the CPU, the family not switched off.
fn cpu_kernel_takes(family: Family, t: &Tensor) -> bool {
    on_cpu_f32(t) && kernel_takes(family, t)
}

/// Whether `G`'s kernel computes its value on `x`.
fn takes<G: Grad1>(x: &Tensor) -> bool {
    match G::FAMILY {
        Some(family) => kernel_takes(family, x),
        None => on_cpu_f32(x),
    }
}

/// `op` applied to `x`: through its kernel where one takes `x` (no copy, no graph unless
/// `x` is tracked), else, or where the kernel fails, as `composed` on detached `x` with
/// `op`'s backward.
fn fused1<G: Grad1>(
    x: &Tensor,
    op: G,
    composed: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if takes::<G>(x) {
        let x = x.contiguous()?;
        let kernel = || {
            let op = Fused(op.clone());
            if x.track_op() {
                x.apply_op1(op)
            } else {
                x.apply_op1_no_bwd(&op)
            }
        };
        let y = match G::FAMILY {
            Some(family) => gate::run(family, x.device(), x.dtype(), kernel)?,
            None => Some(kernel()?),
        };
        if let Some(y) = y {
            return Ok(y);
        }
    }
    let value = composed(&x.detach())?;
    attach1(x, value, op)
}

/// `family`'s first-use check on `dev` in `dtype`: its kernels against the composed op
/// on small cases with partial tiles (`big`: one U-Net-sized case instead, for timing).
pub fn check_family(family: Family, dev: &Device, dtype: DType, big: bool) -> Result<Comparison> {
    match family {
        Family::Attention => attention::check(dev, dtype, big),
        Family::GroupNorm => norm::group_check(dev, dtype, big),
        Family::LayerNorm => norm::layer_check(dev, dtype, big),
        Family::Geglu => geglu::check(dev, dtype, big),
        Family::Optimizer => multi_tensor::check(dev, big),
    }
}

/// A two-input CUDA kernel as a graph-free op (backward passes run these).
#[cfg(feature = "cuda")]
struct CudaKernel2<F>(&'static str, F);

#[cfg(feature = "cuda")]
impl<F> candle_core::CustomOp2 for CudaKernel2<F>
where
    F: Fn(&CudaStorage, &Layout, &CudaStorage, &Layout) -> Result<(CudaStorage, Shape)>
        + Send
        + Sync,
{
    fn name(&self) -> &'static str {
        self.0
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{} runs on CUDA only", self.0)
    }
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        (self.1)(a, al, b, bl)
    }
}

/// `f` on the storage of CUDA tensors `a` and `b` (made contiguous), without a graph.
#[cfg(feature = "cuda")]
fn cuda_kernel2<F>(name: &'static str, a: &Tensor, b: &Tensor, f: F) -> Result<Tensor>
where
    F: Fn(&CudaStorage, &Layout, &CudaStorage, &Layout) -> Result<(CudaStorage, Shape)>
        + Send
        + Sync,
{
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &CudaKernel2(name, f))
}

/// Copies a precomputed value into the op's output storage. The value is taken out of
/// the op on first use, so it is not kept twice while the graph lives.
fn copy_value<S: Backend>(value: &Mutex<Option<Tensor>>) -> Result<(S, Shape)> {
    let value = match value.lock() {
        Ok(mut v) => v.take(),
        Err(_) => None,
    };
    let Some(value) = value else {
        bail!("a recorded op was run twice")
    };
    let (s, l) = value.storage_and_layout();
    let src = S::of(&s)?;
    // SAFETY: every element is written by copy_strided_src right below.
    let mut dst = unsafe { src.device().alloc_uninit(l.shape(), src.dtype())? };
    src.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, l.shape().clone()))
}

struct Attach1<G> {
    value: Mutex<Option<Tensor>>,
    grad: G,
}

impl<G: Grad1> CustomOp1 for Attach1<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }
    precomputed_fwd!(_x _xl);
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        input_grad(&self.grad, x, y, g).map(Some)
    }
}

/// `value` (computed from `x` without a graph) as a differentiable function of `x`.
fn attach1<G: Grad1>(x: &Tensor, value: Tensor, grad: G) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Attach1 {
        value: Mutex::new(Some(value)),
        grad,
    })
}

/// The dtype statistics and softmax are computed in: f32, or f64 for f64 inputs.
fn f32_or_wider(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests;
