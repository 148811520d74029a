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

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};

use super::cpu_kernels as cpu;
use candle_core::op::Add;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor, D,
};

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
// Frozen linear: y = x W^T + b, backward dL/dx = g W only.

struct FrozenLinear {
    w: Tensor,
    b: Option<Tensor>,
}

impl FrozenLinear {
    fn fwd<S: Backend>(&self, x: &S, xl: &Layout) -> Result<(S, Shape)> {
        let dims = xl.dims();
        let k = dims[dims.len() - 1];
        let m = xl.shape().elem_count() / k.max(1);
        if !xl.is_contiguous() {
            bail!("frozen_linear expects a contiguous input")
        }
        let (ws, wl) = self.w.storage_and_layout();
        let n = wl.dims()[0];
        let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let mut y = x.matmul(S::of(&ws)?, (1, m, n, k), &x2, &wl.transpose(0, 1)?)?;
        if let Some(b) = &self.b {
            let (bs, bl) = b.storage_and_layout();
            let yl = Layout::contiguous((m, n));
            y = y.binary_impl::<Add>(S::of(&bs)?, &yl, &bl.broadcast_as((m, n))?)?;
        }
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        Ok((y, out.into()))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd(s, l)
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.fwd(s, l)
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = self.w.dim(0)?;
        let rows = g.elem_count() / n;
        let dx = g.reshape((rows, n))?.matmul(&self.w)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `x @ w^T + b` over the last dimension, with no gradient for `w` and `b`.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear {
        w: w.clone(),
        b: b.cloned(),
    })
}

// ---------------------------------------------------------------------------------------
// Frozen linear with a trainable LoRA adapter, one op on the CPU (f32): the base and
// adapter products accumulate into one output, and backward is a handful of GEMMs.

/// A LoRA adapter applied as `scale * (x A^T) B^T`.
pub struct LoraAdapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl LoraLinear {
    fn dims(&self, x: &Layout, a: &Layout) -> cpu::LoraDims {
        let k = x.dims()[x.dims().len() - 1];
        cpu::LoraDims {
            m: x.shape().elem_count() / k.max(1),
            k,
            n: self.w.dims()[0],
            r: a.dims()[0],
            scale: self.scale as f32,
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(xl, al);
        let y = with_f32(&[&self.w], |w| {
            let bias = self.bias.as_ref().map(to_vec_f32).transpose()?;
            let (x, a, b) = (f32_slice(x, xl)?, f32_slice(a, al)?, f32_slice(b, bl)?);
            Ok::<_, candle_core::Error>(cpu::lora_linear_fwd(x, w[0], bias.as_deref(), a, b, &dims))
        })??;
        let mut out = xl.dims().to_vec();
        *out.last_mut().expect("rank >= 1") = dims.n;
        Ok((CpuStorage::F32(y), out.into()))
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xl, al) = (x.layout().clone(), a.layout().clone());
        let dims = self.dims(&xl, &al);
        let (dx, da, db) = with_f32(&[x, &self.w, a, b, g], |t| {
            cpu::lora_linear_bwd(t[0], t[1], t[2], t[3], t[4], &dims)
        })?;
        grads3([dx, da, db], [x, a, b])
    }
}

/// `x W^T + bias + scale (x A^T) B^T`; gradients flow to x, A and B, never to W or bias.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: &LoraAdapter,
) -> Result<Tensor> {
    let fused = on_cpu_f32(x) && on_cpu_f32(lora.a) && on_cpu_f32(lora.b) && on_cpu_f32(w);
    if !fused {
        let y = frozen_linear(x, w, bias)?;
        let down = x.broadcast_matmul(&lora.a.to_dtype(x.dtype())?.t()?)?;
        let up = down.broadcast_matmul(&lora.b.to_dtype(x.dtype())?.t()?)?;
        return y + (up * lora.scale)?;
    }
    let op = LoraLinear {
        w: w.clone(),
        bias: bias.cloned(),
        scale: lora.scale,
    };
    let (a, b) = (lora.a.contiguous()?, lora.b.contiguous()?);
    if x.track_op() || a.track_op() || b.track_op() {
        x.contiguous()?.apply_op3(&a, &b, op)
    } else {
        x.contiguous()?.apply_op3_no_bwd(&a, &b, &op)
    }
}

// ---------------------------------------------------------------------------------------
// CPU kernels (cpu_kernels.rs) as graph-free custom ops on contiguous f32 tensors.

/// The f32 data of a contiguous CPU tensor layout.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("cpu kernel expects contiguous f32 data"),
    }
}

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

/// `f` over the f32 data of CPU tensors (made contiguous first).
fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
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
trait Grad1: Send + Sync + 'static {
    const NAME: &'static str;
    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor>;
    /// The op's value from the input's f32 data (dims given), where a CPU kernel exists.
    fn cpu_value(&self, _x: &[f32], _dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        None
    }
}

/// An op with a CPU kernel: the value is computed in `cpu_fwd` from the input storage.
struct CpuFused<G>(G);

impl<G: Grad1> CustomOp1 for CpuFused<G> {
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
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.grad(&x.detach(), &y.detach(), g)?))
    }
}

/// `op` applied to `x`: through its CPU kernel for f32 CPU input (no copy, no graph
/// unless `x` is tracked), else as `composed` on detached `x` with `op`'s backward.
fn fused1<G: Grad1>(
    x: &Tensor,
    op: G,
    composed: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if on_cpu_f32(x) {
        let x = x.contiguous()?;
        let op = CpuFused(op);
        return if x.track_op() {
            x.apply_op1(op)
        } else {
            x.apply_op1_no_bwd(&op)
        };
    }
    let value = composed(&x.detach())?;
    attach1(x, value, op)
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
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        copy_value(&self.value)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        copy_value(&self.value)
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.grad(&x.detach(), &y.detach(), g)?))
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

// ---------------------------------------------------------------------------------------
// Frozen convolution (optionally after 2x nearest upsampling).

struct ConvGrad {
    w: Tensor,
    b: Tensor,
    stride: usize,
    padding: usize,
}

impl Grad1 for ConvGrad {
    const NAME: &'static str = "frozen-conv2d";
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        let &[b, _, h, w] = dims else {
            return Some(Err(candle_core::Error::Msg(
                "conv2d expects [b, c, h, w]".into(),
            )));
        };
        let (co, k) = (self.w.dims()[0], self.w.dims()[2]);
        let shape = cpu::ConvShape {
            channels: self.w.dims()[1],
            h,
            w,
            k,
            stride: self.stride,
            padding: self.padding,
        };
        let (oh, ow) = shape.out_hw();
        Some((|| {
            let bias = to_vec_f32(&self.b)?;
            let y = with_f32(&[&self.w], |wt| {
                cpu::conv2d(x, wt[0], Some(&bias), co, &shape)
            })?;
            Ok((y, Shape::from((b, co, oh, ow))))
        })())
    }
    /// dL/dx of a cross-correlation is the full correlation of the (stride-dilated)
    /// output gradient with the flipped, in/out-swapped kernel.
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = self.w.dims4()?;
        let wt = flip_transpose(&self.w)?;
        let (s, p) = (self.stride, self.padding);
        let g = if s > 1 { dilate(g, s)? } else { g.clone() };
        let (gh, gw) = (g.dim(2)?, g.dim(3)?);
        let (lh, lw) = (kh - 1 - p, kw - 1 - p);
        let (rh, rw) = (h + kh - 1 - lh - gh, w + kw - 1 - lw - gw);
        if lh == rh && lw == rw && lh == lw {
            conv2d_value(&g, &wt, 1, lh)
        } else {
            let g = g.pad_with_zeros(2, lh, rh)?.pad_with_zeros(3, lw, rw)?;
            conv2d_value(&g, &wt, 1, 0)
        }
    }
}

/// The kernel of the input-gradient convolution: in/out channels swapped, taps flipped.
fn flip_transpose(w: &Tensor) -> Result<Tensor> {
    let (co, ci, kh, kw) = w.dims4()?;
    if on_cpu_f32(w) {
        let wt = with_f32(&[w], |t| cpu::flip_transpose(t[0], co, ci, kh, kw))?;
        return Tensor::from_vec(wt, (ci, co, kh, kw), w.device());
    }
    let wt = w.transpose(0, 1)?.contiguous()?;
    if kh * kw == 1 {
        return Ok(wt);
    }
    flip(&flip(&wt, 2)?, 3)?.contiguous()
}

fn flip(t: &Tensor, dim: usize) -> Result<Tensor> {
    let n = t.dim(dim)? as u32;
    let rev: Vec<u32> = (0..n).rev().collect();
    t.index_select(&Tensor::new(rev, t.device())?, dim)
}

/// Inserts `s - 1` zeros between the spatial entries of `g` (and none after the last).
fn dilate(g: &Tensor, s: usize) -> Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    g.reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(3, 0, s - 1)?
        .pad_with_zeros(5, 0, s - 1)?
        .reshape((b, c, h * s, w * s))?
        .narrow(2, 0, (h - 1) * s + 1)?
        .narrow(3, 0, (w - 1) * s + 1)
}

/// Cross-correlation of `x` with `w` (no bias, no graph). On the CPU in f32 through
/// `cpu::conv2d`, much faster than candle's tiled im2col.
fn conv2d_value(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let x = x.detach();
    if !on_cpu_f32(&x) {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (b, _, h, wd) = x.dims4()?;
    let (co, _, k, _) = w.dims4()?;
    let shape = cpu::ConvShape {
        channels: w.dim(1)?,
        h,
        w: wd,
        k,
        stride,
        padding,
    };
    let (oh, ow) = shape.out_hw();
    let y = with_f32(&[&x, w], |t| cpu::conv2d(t[0], t[1], None, co, &shape))?;
    Tensor::from_vec(y, (b, co, oh, ow), x.device())
}

/// A 2D convolution with a frozen kernel `w` and bias `b`: only dL/dx flows back.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = ConvGrad {
        w: w.clone(),
        b: b.clone(),
        stride,
        padding,
    };
    fused1(x, op, |x| {
        conv2d_value(x, w, stride, padding)?.broadcast_add(&b.reshape((1, (), 1, 1))?)
    })
}

struct Upsample2xGrad;

impl Grad1 for Upsample2xGrad {
    const NAME: &'static str = "upsample-nearest-2x";
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        g.reshape((b, c, h, 2, w, 2))?.sum(5)?.sum(3)
    }
}

/// Nearest-neighbour 2x upsampling whose backward sums 2x2 blocks (candle's runs a
/// grouped convolution, one conv per channel).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let y = x.detach().upsample_nearest2d(2 * h, 2 * w)?;
    attach1(x, y, Upsample2xGrad)
}

// ---------------------------------------------------------------------------------------
// Norms. Statistics are recomputed in backward from the input rather than stored.

/// The dtype statistics and softmax are computed in: f32, or f64 for f64 inputs.
fn f32_or_wider(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `(x - mean) * rstd` over the last dimension, and `rstd`.
fn standardize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// dL/dx of `xhat = standardize(x)` given dL/dxhat (reductions over the last dimension).
fn standardize_grad(xhat: &Tensor, rstd: &Tensor, dxhat: &Tensor) -> Result<Tensor> {
    let m1 = dxhat.mean_keepdim(D::Minus1)?;
    let m2 = (dxhat * xhat)?.mean_keepdim(D::Minus1)?;
    dxhat
        .broadcast_sub(&m1)?
        .sub(&xhat.broadcast_mul(&m2)?)?
        .broadcast_mul(rstd)
}

/// Frozen GroupNorm affine parameters, and whether SiLU follows.
#[derive(Clone)]
struct GroupNormParams {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormParams {
    fn cpu_args(&self, dims: &[usize]) -> Result<(Vec<f32>, Vec<f32>, cpu::GroupNormShape)> {
        let shape = cpu::GroupNormShape {
            channels: dims[1],
            hw: dims[2..].iter().product(),
            groups: self.groups,
            eps: self.eps as f32,
            silu: self.silu,
        };
        Ok((to_vec_f32(&self.gamma)?, to_vec_f32(&self.beta)?, shape))
    }
    /// `(z, xhat, rstd)` in f32 with `z = xhat * gamma + beta` shaped `[b, c, rest]` and the
    /// statistics per `[b, groups]`.
    fn normalize(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let ((b, c), acc) = ((x.dim(0)?, x.dim(1)?), f32_or_wider(x.dtype()));
        let xg = x.to_dtype(acc)?.reshape((b, self.groups, ()))?;
        let (xhat, rstd) = standardize(&xg, self.eps)?;
        let z = xhat
            .reshape((b, c, ()))?
            .broadcast_mul(&self.gamma.to_dtype(acc)?.reshape((1, c, 1))?)?
            .broadcast_add(&self.beta.to_dtype(acc)?.reshape((1, c, 1))?)?;
        Ok((z, xhat, rstd))
    }
}

impl Grad1 for GroupNormParams {
    const NAME: &'static str = "group-norm";
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        Some(self.cpu_args(dims).map(|(gamma, beta, shape)| {
            (cpu::group_norm_fwd(x, &gamma, &beta, &shape), dims.into())
        }))
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        if on_cpu_f32(x) {
            let (gamma, beta, shape) = self.cpu_args(x.dims())?;
            return kernel2(x, g, |x, g| {
                cpu::group_norm_bwd(x, g, &gamma, &beta, &shape)
            });
        }
        let ((b, c), acc) = ((x.dim(0)?, x.dim(1)?), f32_or_wider(x.dtype()));
        let (z, xhat, rstd) = self.normalize(x)?;
        let mut dz = g.to_dtype(acc)?.reshape((b, c, ()))?;
        if self.silu {
            // d silu(z)/dz = s (1 + z (1 - s)), s = sigmoid(z)
            let s = candle_nn::ops::sigmoid(&z)?;
            dz = (dz * (&s * ((z * (1.0 - &s)?)? + 1.0)?)?)?;
        }
        let gamma = self.gamma.to_dtype(acc)?.reshape((1, c, 1))?;
        let dxhat = dz.broadcast_mul(&gamma)?.reshape((b, self.groups, ()))?;
        standardize_grad(&xhat, &rstd, &dxhat)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())
    }
}

/// GroupNorm with frozen affine parameters, optionally followed by SiLU (the ResNet
/// blocks' `silu(norm(x))`), as one op. Statistics are computed in f32.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let params = GroupNormParams {
        gamma: gamma.clone(),
        beta: beta.clone(),
        groups,
        eps,
        silu,
    };
    let composed = params.clone();
    fused1(x, params, |x| {
        let (z, _, _) = composed.normalize(x)?;
        let y = if silu { z.silu()? } else { z };
        y.reshape(x.shape())?.to_dtype(x.dtype())
    })
}

struct LayerNormGrad {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl Grad1 for LayerNormGrad {
    const NAME: &'static str = "layer-norm";
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        Some((|| {
            let (gamma, beta) = (to_vec_f32(&self.gamma)?, to_vec_f32(&self.beta)?);
            let y = cpu::layer_norm_fwd(x, &gamma, &beta, self.eps as f32);
            Ok((y, dims.into()))
        })())
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        if on_cpu_f32(x) {
            let gamma = to_vec_f32(&self.gamma)?;
            let eps = self.eps as f32;
            return kernel2(x, g, |x, g| cpu::layer_norm_bwd(x, g, &gamma, eps));
        }
        let acc = f32_or_wider(x.dtype());
        let (xhat, rstd) = standardize(&x.to_dtype(acc)?, self.eps)?;
        let dxhat = g.to_dtype(acc)?.broadcast_mul(&self.gamma.to_dtype(acc)?)?;
        standardize_grad(&xhat, &rstd, &dxhat)?.to_dtype(x.dtype())
    }
}

/// LayerNorm over the last dimension with frozen affine parameters. Off the CPU the
/// value comes from candle's fused kernel (which has no backward of its own).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormGrad {
        gamma: gamma.clone(),
        beta: beta.clone(),
        eps,
    };
    fused1(x, op, |x| {
        let x = x.contiguous()?;
        // The fused kernel has no f64 (used by the gradient checks).
        if x.dtype() == DType::F64 {
            candle_nn::ops::layer_norm_slow(&x, gamma, beta, eps as f32)
        } else {
            candle_nn::ops::layer_norm(&x, gamma, beta, eps as f32)
        }
    })
}

// ---------------------------------------------------------------------------------------
// GEGLU: h * gelu_erf(gate) for [h, gate] split on the last dimension.

struct GegluGrad;

impl Grad1 for GegluGrad {
    const NAME: &'static str = "geglu";
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        let mut out = dims.to_vec();
        let inner = out.last().copied().unwrap_or(0) / 2;
        *out.last_mut()? = inner;
        Some(Ok((cpu::geglu_fwd(x, inner), out.into())))
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let inner = x.dim(D::Minus1)? / 2;
        if on_cpu_f32(x) {
            return kernel2(x, g, |x, g| cpu::geglu_bwd(x, g, inner));
        }
        let h = x.narrow(D::Minus1, 0, inner)?;
        let gate = x.narrow(D::Minus1, inner, inner)?;
        let cdf = ((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        let cdf = cdf?;
        let pdf = ((gate.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let dgelu = (&cdf + (&gate * pdf)?)?;
        let dh = (g * gate.gelu_erf()?)?;
        let dgate = ((g * h)? * dgelu)?;
        Tensor::cat(&[dh, dgate], D::Minus1)
    }
}

/// diffusers' GEGLU activation on the concatenated projection `[h, gate]`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let inner = x.dim(D::Minus1)? / 2;
    fused1(x, GegluGrad, |x| {
        x.narrow(D::Minus1, 0, inner)? * x.narrow(D::Minus1, inner, inner)?.gelu_erf()?
    })
}

// ---------------------------------------------------------------------------------------
// Memory-efficient attention: softmax(scale q k^T) v keeping only the per-row
// log-sum-exp for backward, which recomputes the probabilities block by block. On the
// CPU in f32 a flash-style kernel works on token-major tensors; elsewhere query chunks
// of head-major tensors go through candle ops.

/// Elements of one `[batch*heads, chunk, keys]` score block (64 MB in f32).
const SCORE_BLOCK: usize = 1 << 24;

fn chunk_rows(bh: usize, n: usize, m: usize) -> usize {
    (SCORE_BLOCK / (bh * m).max(1)).clamp(1, n.max(1))
}

/// Probabilities of a query chunk in f32, from scores and the rows' log-sum-exp.
fn probs(qc: &Tensor, k: &Tensor, lse: &Tensor) -> Result<Tensor> {
    qc.matmul(&k.t()?)?
        .to_dtype(lse.dtype())?
        .broadcast_sub(lse)?
        .exp()
}

/// Output `[bh, n, d]` and log-sum-exp `[bh, n, 1]` (f32), without a graph.
fn attention_value(q: &Tensor, k: &Tensor, v: &Tensor, rows: usize) -> Result<(Tensor, Tensor)> {
    let n = q.dim(1)?;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let s = q
            .narrow(1, start, len)?
            .matmul(&k.t()?)?
            .to_dtype(f32_or_wider(q.dtype()))?;
        let max = s.max_keepdim(D::Minus1)?;
        let p = s.broadcast_sub(&max)?.exp()?;
        let sum = p.sum_keepdim(D::Minus1)?;
        let o = p
            .to_dtype(v.dtype())?
            .matmul(v)?
            .broadcast_div(&sum.to_dtype(v.dtype())?)?;
        outs.push(o);
        lses.push((max + sum.log()?)?);
    }
    Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
}

struct AttentionOp {
    value: Mutex<Option<Tensor>>,
    lse: Tensor,
    rows: usize,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_value(&self.value)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_value(&self.value)
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), o.detach());
        let (dtype, n, rows) = (q.dtype(), q.dim(1)?, self.rows);
        // D_i = sum_j P_ij dP_ij = <dO_i, O_i>.
        let acc = f32_or_wider(dtype);
        let delta = (g.to_dtype(acc)? * o.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), k.zeros_like()?, v.zeros_like()?);
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let gc = g.narrow(1, start, len)?;
            let lse = self.lse.narrow(1, start, len)?;
            let (delta, dp) = (delta.narrow(1, start, len)?, gc.matmul(&v.t()?)?);
            let p = probs(&qc, &k, &lse)?;
            let dp = dp.to_dtype(acc)?;
            let ds = (&p * dp.broadcast_sub(&delta)?)?.to_dtype(dtype)?;
            dv = (dv + p.to_dtype(dtype)?.t()?.matmul(&gc)?)?;
            dk = (dk + ds.t()?.matmul(&qc)?)?;
            dq.push(ds.matmul(&k)?);
        }
        Ok((Some(Tensor::cat(&dq, 1)?), Some(dk), Some(dv)))
    }
}

/// The CPU kernel as an op: the value is computed in `cpu_fwd` from the inputs' storage.
struct FlashAttention {
    heads: usize,
    scale: f64,
    lse: Mutex<Vec<f32>>,
}

impl FlashAttention {
    fn shape(&self, ql: &Layout, kl: &Layout) -> Result<cpu::AttnShape> {
        let (&[batch, n, c], &[_, m, _]) = (ql.dims(), kl.dims()) else {
            bail!("attention expects [batch, tokens, channels] inputs")
        };
        Ok(cpu::AttnShape {
            batch,
            heads: self.heads,
            n,
            m,
            d: c / self.heads,
            scale: self.scale as f32,
        })
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }
    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.shape(ql, kl)?;
        let (q, k, v) = (f32_slice(q, ql)?, f32_slice(k, kl)?, f32_slice(v, vl)?);
        let (out, lse) = cpu::attention_fwd(q, k, v, &shape);
        match self.lse.lock() {
            Ok(mut slot) => *slot = lse,
            Err(_) => bail!("attention state poisoned"),
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = self.shape(q.layout(), k.layout())?;
        let Ok(lse) = self.lse.lock() else {
            bail!("attention state poisoned")
        };
        let (dq, dk, dv) = with_f32(&[q, k, v, o, g], |t| {
            cpu::attention_bwd(t[0], t[1], t[2], t[3], t[4], &lse, &shape)
        })?;
        grads3([dq, dk, dv], [q, k, v])
    }
}

static REFERENCE_ATTENTION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Benchmarks only: route `attention` through the plain composition (softmax of the
/// full score tensor, kept in the graph) to measure what the fused op saves.
pub fn use_reference_attention(on: bool) {
    REFERENCE_ATTENTION.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Multi-head `softmax(scale q k^T) v` for token-major `q: [b, n, heads * d]` and
/// `k, v: [b, m, heads * d]`, giving `[b, n, heads * d]`. Keeps no `[b, heads, n, m]`
/// tensor for backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()?
            .flatten_to(1)
    };
    let merge = |o: Tensor| {
        o.reshape((b, heads, n, c / heads))?
            .transpose(1, 2)?
            .reshape((b, n, c))
    };
    if REFERENCE_ATTENTION.load(std::sync::atomic::Ordering::Relaxed) {
        let s = split(&(q * scale)?)?.matmul(&split(k)?.t()?)?;
        return merge(candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&split(v)?)?);
    }
    if [q, k, v].iter().all(|t| on_cpu_f32(t)) {
        let op = FlashAttention {
            heads,
            scale,
            lse: Mutex::new(Vec::new()),
        };
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        return if q.track_op() || k.track_op() || v.track_op() {
            q.apply_op3(&k, &v, op)
        } else {
            q.apply_op3_no_bwd(&k, &v, &op)
        };
    }
    let rows = chunk_rows(b * heads, n, k.dim(1)?);
    merge(attention_head_major(
        &split(&(q * scale)?)?,
        &split(k)?,
        &split(v)?,
        rows,
    )?)
}

/// `softmax(q k^T) v` for head-major `q: [bh, n, d]` (already scaled), `k, v: [bh, m, d]`,
/// over query chunks of `rows`.
fn attention_head_major(q: &Tensor, k: &Tensor, v: &Tensor, rows: usize) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (out, lse) = attention_value(&qd, &kd, &vd, rows)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        AttentionOp {
            value: Mutex::new(Some(out)),
            lse,
            rows,
        },
    )
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
