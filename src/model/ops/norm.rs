//! GroupNorm (optionally fused with the SiLU after it) and LayerNorm, both with frozen
//! affine parameters, so backward returns only dL/dx.

use candle_core::{DType, Result, Shape, Tensor, D};

use super::kernels as cpu;
use super::{f32_or_wider, fused1, kernel2, on_cpu_f32, to_vec_f32, Grad1};

// Norms. Statistics are recomputed in backward from the input rather than stored.

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
        let _p = crate::profile::scope(crate::profile::Kind::GroupNormBwd, x.device());
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
    let _p = crate::profile::scope(crate::profile::Kind::GroupNormFwd, x.device());
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
        let _p = crate::profile::scope(crate::profile::Kind::LayerNormBwd, x.device());
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
    let _p = crate::profile::scope(crate::profile::Kind::LayerNormFwd, x.device());
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
