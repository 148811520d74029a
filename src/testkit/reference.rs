//! One plain implementation of each op our kernels fuse, composed from candle's
//! differentiable ops, for the tests to compare the fused ops and kernels against.
//! Inputs may be in any float dtype and on any device; the result is in theirs.

use candle_core::{Result, Tensor, D};

/// Token-major `[b, n, heads * d]` as `[b, heads, n, d]`.
fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = t.dims3()?;
    t.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `scale q k^T` per head, `[b, heads, n, m]`, for token-major `q` and `k`.
fn scores(q: &Tensor, k: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    split_heads(q, heads)?.matmul(&split_heads(k, heads)?.t()?)? * scale
}

/// Multi-head attention spelled out on token-major `[b, tokens, heads * d]` tensors:
/// split heads, softmax(scale q k^T) v, merge heads.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let p = candle_nn::ops::softmax(&scores(q, k, heads, scale)?, D::Minus1)?;
    p.matmul(&split_heads(v, heads)?)?
        .transpose(1, 2)?
        .reshape((b, n, c))
}

/// The log-sum-exp of each row of [`attention`]'s scores, `[b * heads, n]` (what the
/// flash kernels keep for backward).
pub fn attention_lse(q: &Tensor, k: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    let s = scores(q, k, heads, scale)?;
    let max = s.max_keepdim(D::Minus1)?;
    let sum = s.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    (max + sum.log()?)?.reshape((b * heads, n))
}

/// GroupNorm of `[b, c, ...]` over `groups` channel groups (candle_nn's), then SiLU where
/// `silu`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), x.dim(1)?, groups, eps)?;
    let y = candle_core::Module::forward(&gn, x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// LayerNorm over the last dimension (candle_nn's composed `layer_norm_slow`).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    candle_nn::ops::layer_norm_slow(x, gamma, beta, eps)
}

/// diffusers' GEGLU: the last dimension's first half times the GELU of its second half.
/// GELU is spelled with erf: candle's own `gelu_erf` backward rounds 1/sqrt(2 pi) to
/// 0.398942, a 4e-8 relative error.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let inner = x.dim(D::Minus1)? / 2;
    let gate = x.narrow(D::Minus1, inner, inner)?;
    let gelu = ((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    x.narrow(D::Minus1, 0, inner)? * (gate * gelu?)?
}
