//! Multi-head attention that keeps no `[batch*heads, n, n]` probabilities for backward,
//! and the benchmarks' switch back to the plain composition.

use std::sync::{Mutex, MutexGuard};

use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, Var, D,
};

use super::{cpu_kernel_takes, f32_or_wider, f32_slice, grads3, kernel_takes, with_f32};
use crate::kernels::cpu;
use crate::kernels::gate::{self, Comparison, Family};

// Memory-efficient attention: softmax(scale q k^T) v keeping only the per-row
// log-sum-exp for backward, which recomputes the probabilities block by block. On the
// CPU in f32 a flash-style kernel works on token-major tensors, and on CUDA our flash
// kernels (cuda/flash.cu) do; elsewhere (f64, head dim > 128, kernels switched off)
// query chunks of head-major tensors go through candle ops.

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
    precomputed_fwd!(_a _al, _b _bl, _c _cl);
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope(crate::profile::Kind::AttentionBwd, q.device());
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

/// An op's state from forward to backward (candle hands ops only `&self`).
fn state<T>(slot: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))
}

/// The CPU kernel as an op: the value is computed in `cpu_fwd` from the inputs' storage.
struct FlashAttention {
    heads: usize,
    scale: f64,
    lse: Mutex<Vec<f32>>,
}

impl FlashAttention {
    fn new(heads: usize, scale: f64) -> Self {
        Self {
            heads,
            scale,
            lse: Mutex::new(Vec::new()),
        }
    }
}

/// The attention shape of token-major q `[b, n, heads * d]` and k `[b, m, heads * d]`.
fn attn_shape(ql: &Layout, kl: &Layout, heads: usize, scale: f32) -> Result<cpu::AttnShape> {
    let (&[batch, n, c], &[_, m, _]) = (ql.dims(), kl.dims()) else {
        bail!("attention expects [batch, tokens, channels] inputs")
    };
    Ok(cpu::AttnShape {
        batch,
        heads,
        n,
        m,
        d: c / heads.max(1),
        scale,
    })
}

impl FlashAttention {
    fn shape(&self, ql: &Layout, kl: &Layout) -> Result<cpu::AttnShape> {
        attn_shape(ql, kl, self.heads, self.scale as f32)
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
        *state(&self.lse)? = lse;
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
        let _p = crate::profile::scope(crate::profile::Kind::AttentionBwd, q.device());
        let shape = self.shape(q.layout(), k.layout())?;
        let lse = state(&self.lse)?;
        let (dq, dk, dv) = with_f32(&[q, k, v, o, g], |t| {
            cpu::attention_bwd(t[0], t[1], t[2], t[3], t[4], &lse, &shape)
        })?;
        grads3([dq, dk, dv], [q, k, v])
    }
}

/// The CUDA flash kernels as an op: `cuda_fwd` computes the value and keeps the rows'
/// log-sum-exp for backward, which runs the backward kernels.
struct CudaFlash {
    heads: usize,
    scale: f32,
    lse: Mutex<Option<Tensor>>,
}

impl CudaFlash {
    fn new(heads: usize, scale: f64) -> Self {
        Self {
            heads,
            scale: scale as f32,
            lse: Mutex::new(None),
        }
    }
}

impl CustomOp3 for CudaFlash {
    fn name(&self) -> &'static str {
        "flash-attention-cuda"
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
        bail!("flash-attention-cuda runs on CUDA only")
    }
    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (o, shape, lse) = on_cuda::fwd([(q, ql), (k, kl), (v, vl)], self.heads, self.scale)?;
        *state(&self.lse)? = Some(lse);
        Ok((o, shape))
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
        let Some(lse) = state(&self.lse)?.clone() else {
            bail!("flash attention backward before its forward")
        };
        let (dev, dtype) = (q.device(), q.dtype());
        let kernels = || on_cuda::bwd([q, k, v, o, g], &lse, self.heads, self.scale);
        let (dq, dk, dv) = match gate::run(Family::Attention, dev, dtype, kernels)? {
            Some(grads) => grads,
            None => composed_grads([q, k, v], g, self.heads, self.scale as f64)?,
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Whether the CUDA flash kernels take these inputs: one dtype our kernels handle, head
/// dim 1..=128, at least one query and one key.
fn cuda_flash_applies(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<bool> {
    let same = [k, v].iter().all(|t| t.dtype() == q.dtype());
    let (c, n, m) = (q.dim(2)?, q.dim(1)?, k.dim(1)?);
    let d = c / heads.max(1);
    Ok(same
        && q.device().is_cuda()
        && kernel_takes(Family::Attention, q)
        && d * heads == c
        && (1..=crate::kernels::cuda::flash::MAX_HEAD_DIM).contains(&d)
        && n > 0
        && m > 0
        && flash_fits(q, &attn_shape(q.layout(), k.layout(), heads, 1.0)?))
}

/// Whether the flash kernels' launches for `s` fit `q`'s GPU (grid, shared memory: an
/// A100 gives a block 163 KB, an RTX 40xx 99 KB, an H100 227 KB).
#[cfg(feature = "cuda")]
fn flash_fits(q: &Tensor, s: &cpu::AttnShape) -> bool {
    match q.device() {
        candle_core::Device::Cuda(dev) => {
            crate::kernels::cuda::flash::fits(q.dtype(), s, crate::kernels::cuda::shared_limit(dev))
        }
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn flash_fits(_: &Tensor, _: &cpu::AttnShape) -> bool {
    false
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
    let _p = crate::profile::scope(crate::profile::Kind::AttentionFwd, q.device());
    if REFERENCE_ATTENTION.load(std::sync::atomic::Ordering::Relaxed) {
        let s = split_heads(&(q * scale)?, heads)?.matmul(&split_heads(k, heads)?.t()?)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        return merge_heads(&p.matmul(&split_heads(v, heads)?)?, q.dims3()?, heads);
    }
    let on_cpu = [q, k, v]
        .iter()
        .all(|t| cpu_kernel_takes(Family::Attention, t));
    if on_cpu || cuda_flash_applies(q, k, v, heads)? {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let kernel = || {
            let tracked = q.track_op() || k.track_op() || v.track_op();
            match (on_cpu, tracked) {
                (true, true) => q.apply_op3(&k, &v, FlashAttention::new(heads, scale)),
                (true, false) => q.apply_op3_no_bwd(&k, &v, &FlashAttention::new(heads, scale)),
                (false, true) => q.apply_op3(&k, &v, CudaFlash::new(heads, scale)),
                (false, false) => q.apply_op3_no_bwd(&k, &v, &CudaFlash::new(heads, scale)),
            }
        };
        if let Some(o) = gate::run(Family::Attention, q.device(), q.dtype(), kernel)? {
            return Ok(o);
        }
    }
    composed_attention(q, k, v, heads, scale)
}

/// Token-major `[b, n, heads * d]` as head-major `[b * heads, n, d]`.
fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = t.dims3()?;
    t.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_to(1)
}

/// Head-major `[b * heads, n, d]` back to token-major `(b, n, c)`.
fn merge_heads(o: &Tensor, (b, n, c): (usize, usize, usize), heads: usize) -> Result<Tensor> {
    o.reshape((b, heads, n, c / heads))?
        .transpose(1, 2)?
        .reshape((b, n, c))
}

/// [`attention`] by candle's ops, over query chunks of head-major tensors.
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let dims @ (b, n, _) = q.dims3()?;
    let rows = chunk_rows(b * heads, n, k.dim(1)?);
    let [q, k, v] = [&(q * scale)?, k, v].map(|t| split_heads(t, heads));
    merge_heads(&attention_head_major(&q?, &k?, &v?, rows)?, dims, heads)
}

/// dL/dq, dL/dk, dL/dv of [`composed_attention`] given the output gradient `g`: where
/// a backward kernel fails, the step's gradients still come.
fn composed_grads(
    [q, k, v]: [&Tensor; 3],
    g: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let [vq, vk, vv] = [q, k, v].map(|t| Var::from_tensor(&t.detach()));
    let (vq, vk, vv) = (vq?, vk?, vv?);
    let (vq, vk, vv) = (vq.as_tensor(), vk.as_tensor(), vv.as_tensor());
    let o = composed_attention(vq, vk, vv, heads, scale)?;
    let grads = (o * g.to_dtype(q.dtype())?)?.sum_all()?.backward()?;
    let grad = |t: &Tensor| match grads.get(t) {
        Some(d) => Ok(d.detach()),
        None => bail!("attention: no gradient for an input"),
    };
    Ok((grad(vq)?, grad(vk)?, grad(vv)?))
}

/// Attention's first-use check, forward and backward: 70 queries and 77 keys (a partial
/// tile each, 77 as in cross-attention) at head dims 40, 64 and 80 (SD's); `big`: SD 2.1's
/// first self-attention (64x64 tokens at 512 px on a GPU, 32x32 on the CPU).
pub(super) fn check(dev: &Device, dtype: DType, big: bool) -> Result<Comparison> {
    let side = if dev.is_cpu() { 32 } else { 64 };
    let cases: &[(usize, usize, usize, usize, usize)] = if big {
        &[(2, 5, side * side, side * side, 64)]
    } else {
        &[(1, 2, 70, 77, 40), (1, 2, 70, 77, 64), (1, 2, 70, 77, 80)]
    };
    let mut all = Comparison::none();
    for &(b, heads, n, m, d) in cases {
        let c = heads * d;
        let q = gate::input(11, &[b, n, c], 1.0, 0.0, dev, dtype)?;
        let k = gate::input(12, &[b, m, c], 1.0, 0.0, dev, dtype)?;
        let v = gate::input(13, &[b, m, c], 1.0, 0.0, dev, dtype)?;
        let g = gate::input(14, &[b, n, c], 1.0, 0.0, dev, dtype)?;
        let scale = (d as f64).powf(-0.5);
        let op = |t: &[Tensor]| attention(&t[0], &t[1], &t[2], heads, scale);
        all = all.and(gate::compare(&[q, k, v], &g, op)?);
    }
    Ok(all)
}

/// `softmax(q k^T) v` for head-major `q: [bh, n, d]` (already scaled), `k, v: [bh, m, d]`,
/// over query chunks of `rows`.
pub(super) fn attention_head_major(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: usize,
) -> Result<Tensor> {
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

#[cfg(feature = "cuda")]
mod on_cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::op::BackpropOp;
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    };

    use super::attn_shape as dims;
    use crate::kernels::cuda::flash;
    use crate::kernels::cuda::{self, Arg};

    /// The output (like q) and the rows' log-sum-exp `[b * heads, n]` (f32).
    pub fn fwd(
        [(q, ql), (k, kl), (v, vl)]: [(&CudaStorage, &Layout); 3],
        heads: usize,
        scale: f32,
    ) -> Result<(CudaStorage, Shape, Tensor)> {
        let s = dims(ql, kl, heads, scale)?;
        let (dev, stream) = (q.device(), q.device().cuda_stream());
        let mut o = cuda::alloc(dev, q.dtype(), ql.shape().elem_count())?;
        let mut lse = cuda::alloc(dev, DType::F32, flash::rows(&s))?;
        {
            let (qp, _q) = cuda::input_ptr(q, ql, &stream)?;
            let (kp, _k) = cuda::input_ptr(k, kl, &stream)?;
            let (vp, _v) = cuda::input_ptr(v, vl, &stream)?;
            let (op, _o) = cuda::output_ptr(&mut o, &stream)?;
            let (lp, _l) = cuda::output_ptr(&mut lse, &stream)?;
            let bufs = [qp, kp, vp, op, lp].map(Arg::Ptr);
            cuda::run(dev, &flash::fwd(q.dtype(), &s, bufs)?)?;
        }
        let lse = Storage::Cuda(lse);
        let lse = Tensor::from_storage(lse, (s.batch * heads, s.n), BackpropOp::none(), false);
        Ok((o, ql.shape().clone(), lse))
    }

    /// dq, dk, dv from `[q, k, v, o, g]` (`g` the output gradient) and the forward's
    /// log-sum-exp.
    pub fn bwd(
        [q, k, v, o, g]: [&Tensor; 5],
        lse: &Tensor,
        heads: usize,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // The kernels read every operand in q's storage type.
        let g = &g.to_dtype(q.dtype())?;
        let delta = super::super::cuda_kernel2("flash-delta", o, g, |o, ol, g, gl| {
            let s = dims(ol, ol, heads, scale)?;
            let (dev, stream) = (o.device(), o.device().cuda_stream());
            let mut delta = cuda::alloc(dev, DType::F32, flash::rows(&s))?;
            {
                let (op, _o) = cuda::input_ptr(o, ol, &stream)?;
                let (gp, _g) = cuda::input_ptr(g, gl, &stream)?;
                let (dp, _w) = cuda::output_ptr(&mut delta, &stream)?;
                let bufs = [op, gp, dp].map(Arg::Ptr);
                cuda::run(dev, &flash::delta(o.dtype(), &s, bufs)?)?;
            }
            Ok((delta, (s.batch * heads, s.n).into()))
        })?;
        let op = Grads {
            g: g.contiguous()?,
            lse: lse.clone(),
            delta,
            heads,
            scale,
        };
        // One buffer [dq | dk | dv], cut into the three gradients.
        let all = q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            all.narrow(0, 0, nq)?.reshape(q.shape())?,
            all.narrow(0, nq, nk)?.reshape(k.shape())?,
            all.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
        ))
    }

    /// The backward kernels over q, k, v with the other operands held.
    struct Grads {
        g: Tensor,
        lse: Tensor,
        delta: Tensor,
        heads: usize,
        scale: f32,
    }

    impl CustomOp3 for Grads {
        fn name(&self) -> &'static str {
            "flash-attention-bwd"
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
            bail!("flash-attention-bwd runs on CUDA only")
        }
        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let s = dims(ql, kl, self.heads, self.scale)?;
            let (dev, stream) = (q.device(), q.device().cuda_stream());
            let (nq, nk) = (ql.shape().elem_count(), kl.shape().elem_count());
            let mut out = cuda::alloc(dev, q.dtype(), nq + 2 * nk)?;
            let (g_guard, gl) = self.g.storage_and_layout();
            let (lse_guard, lsel) = self.lse.storage_and_layout();
            let (delta_guard, dl) = self.delta.storage_and_layout();
            let (Storage::Cuda(g), Storage::Cuda(lse), Storage::Cuda(delta)) =
                (&*g_guard, &*lse_guard, &*delta_guard)
            else {
                bail!("flash attention backward operands are not on CUDA")
            };
            {
                let (qp, _q) = cuda::input_ptr(q, ql, &stream)?;
                let (kp, _k) = cuda::input_ptr(k, kl, &stream)?;
                let (vp, _v) = cuda::input_ptr(v, vl, &stream)?;
                let (gp, _g) = cuda::input_ptr(g, gl, &stream)?;
                let (lp, _l) = cuda::input_ptr(lse, lsel, &stream)?;
                let (dp, _d) = cuda::input_ptr(delta, dl, &stream)?;
                let (op, _w) = cuda::output_ptr(&mut out, &stream)?;
                let size = q.dtype().size_in_bytes() as u64;
                let (dk, dv) = (op + nq as u64 * size, op + (nq + nk) as u64 * size);
                let dkdv = [qp, kp, vp, gp, lp, dp, dk, dv].map(Arg::Ptr);
                cuda::run(dev, &flash::dkdv(q.dtype(), &s, dkdv)?)?;
                let dq = [qp, kp, vp, gp, lp, dp, op].map(Arg::Ptr);
                cuda::run(dev, &flash::dq(q.dtype(), &s, dq)?)?;
            }
            Ok((out, (nq + 2 * nk).into()))
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod on_cuda {
    use candle_core::{bail, CudaStorage, Layout, Result, Shape, Tensor};

    pub fn fwd(
        _: [(&CudaStorage, &Layout); 3],
        _: usize,
        _: f32,
    ) -> Result<(CudaStorage, Shape, Tensor)> {
        bail!("built without CUDA")
    }

    pub fn bwd(_: [&Tensor; 5], _: &Tensor, _: usize, _: f32) -> Result<(Tensor, Tensor, Tensor)> {
        bail!("built without CUDA")
    }
}
