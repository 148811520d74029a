//! Frozen linears, plain and with a LoRA adapter. Backward never computes the frozen
//! weight's gradient (candle's `Matmul` backward would: a third of a step's FLOPs).

use candle_core::op::Add;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor,
};

use super::{f32_slice, grads3, on_cpu_f32, to_vec_f32, with_f32, Backend};
use crate::kernels::cpu;

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
        let _p = crate::profile::scope(crate::profile::Kind::LinearBwd, x.device());
        let n = self.w.dim(0)?;
        let rows = g.elem_count() / n;
        let dx = g.reshape((rows, n))?.matmul(&self.w)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `x @ w^T + b` over the last dimension, with no gradient for `w` and `b`.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Kind::LinearFwd, x.device());
    x.contiguous()?.apply_op1(FrozenLinear {
        w: w.clone(),
        b: b.cloned(),
    })
}

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
        let Some(last) = out.last_mut() else {
            candle_core::bail!("lora_linear: a scalar input has no features")
        };
        *last = dims.n;
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
        let _p = crate::profile::scope(crate::profile::Kind::LoraBwd, x.device());
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
    let _p = crate::profile::scope(crate::profile::Kind::LoraFwd, x.device());
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

// Trained linear (full fine-tuning): y = x W^T, backward dL/dx = g W and dL/dW = g^T x as
// two 2-D GEMMs (candle's broadcast matmul would materialize the weight's gradient per
// batch entry and transpose it).

struct TrainedLinear {
    value: std::sync::Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }
    precomputed_fwd!(_x _xl, _w _wl);
    /// Each gradient only for an input that tracks one.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope(crate::profile::Kind::LinearBwd, x.device());
        let (n, k) = w.dims2()?;
        let g = g.detach().reshape((g.elem_count() / n, n))?;
        let dx = match x.track_op() {
            true => Some(g.matmul(&w.detach())?.reshape(x.shape())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(
                g.t()?
                    .matmul(&x.detach().reshape((x.elem_count() / k, k))?)?,
            ),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// `x @ w^T` over the last dimension where `w` trains (and `x` may): its gradient and
/// `x`'s by one GEMM each.
pub fn trained_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Kind::LinearFwd, x.device());
    let (n, k) = w.dims2()?;
    let x = x.contiguous()?;
    let mut out = x.dims().to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    let value = (x.detach().reshape((x.elem_count() / k, k))?)
        .matmul(&w.detach().t()?)?
        .reshape(out)?;
    let op = TrainedLinear {
        value: std::sync::Mutex::new(Some(value)),
    };
    x.apply_op2(w, op)
}
