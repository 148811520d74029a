//! Multi-head attention that keeps no `[batch*heads, n, n]` probabilities for backward,
//! and the benchmarks' switch back to the plain composition.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::kernels as cpu;
use super::{copy_value, f32_or_wider, f32_slice, grads3, on_cpu_f32, with_f32};

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
        let _p = crate::profile::scope(crate::profile::Kind::AttentionBwd, q.device());
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
    let _p = crate::profile::scope(crate::profile::Kind::AttentionFwd, q.device());
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
