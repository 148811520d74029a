//! GroupNorm (optionally fused with the SiLU after it) and LayerNorm, both with frozen
//! affine parameters, so backward returns only dL/dx.

use candle_core::{DType, Device, Result, Shape, Tensor, D};

use super::{cpu_kernel_takes, f32_or_wider, fused1, kernel2, to_vec_f32, Grad1};
use crate::kernels::cpu;
use crate::kernels::gate::{self, Comparison, Family};
use crate::profile::Kind;

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
    /// The kernels' view of `x[b, c, ..]` (the trailing dimensions flattened).
    fn shape(&self, dims: &[usize]) -> cpu::GroupNormShape {
        cpu::GroupNormShape {
            channels: dims.get(1).copied().unwrap_or(1),
            hw: dims.iter().skip(2).product(),
            groups: self.groups,
            eps: self.eps as f32,
            silu: self.silu,
        }
    }
    fn cpu_args(&self, dims: &[usize]) -> Result<(Vec<f32>, Vec<f32>, cpu::GroupNormShape)> {
        let shape = self.shape(dims);
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
    const BWD: Kind = Kind::GroupNormBwd;
    const FAMILY: Option<Family> = Some(Family::GroupNorm);
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        Some(self.cpu_args(dims).map(|(gamma, beta, shape)| {
            (cpu::group_norm_fwd(x, &gamma, &beta, &shape), dims.into())
        }))
    }
    #[cfg(feature = "cuda")]
    fn cuda_value(
        &self,
        x: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Option<Result<(candle_core::CudaStorage, Shape)>> {
        Some(on_cuda::group_fwd(self, x, l))
    }
    #[cfg(feature = "cuda")]
    fn cuda_grad(&self, x: &Tensor, g: &Tensor) -> Option<Result<Tensor>> {
        Some(on_cuda::group_bwd(self, x, g))
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        if cpu_kernel_takes(Family::GroupNorm, x) {
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
    let _p = crate::profile::scope(Kind::GroupNormFwd, x.device());
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

#[derive(Clone)]
struct LayerNormGrad {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl Grad1 for LayerNormGrad {
    const NAME: &'static str = "layer-norm";
    const BWD: Kind = Kind::LayerNormBwd;
    const FAMILY: Option<Family> = Some(Family::LayerNorm);
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        Some((|| {
            let (gamma, beta) = (to_vec_f32(&self.gamma)?, to_vec_f32(&self.beta)?);
            let y = cpu::layer_norm_fwd(x, &gamma, &beta, self.eps as f32);
            Ok((y, dims.into()))
        })())
    }
    #[cfg(feature = "cuda")]
    fn cuda_value(
        &self,
        x: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Option<Result<(candle_core::CudaStorage, Shape)>> {
        Some(on_cuda::layer_fwd(self, x, l))
    }
    #[cfg(feature = "cuda")]
    fn cuda_grad(&self, x: &Tensor, g: &Tensor) -> Option<Result<Tensor>> {
        Some(on_cuda::layer_bwd(self, x, g))
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        if cpu_kernel_takes(Family::LayerNorm, x) {
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

/// LayerNorm over the last dimension with frozen affine parameters. On CUDA our kernels
/// (cuda/norm.cu) compute it; elsewhere off the CPU, candle's fused kernel (which has no
/// backward of its own).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let _p = crate::profile::scope(Kind::LayerNormFwd, x.device());
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

/// GroupNorm's first-use check, with and without SiLU: an odd `hw` (element by element) and
/// one a multiple of the 16-byte pack (vector loads); `big`: SD 2.1's first U-Net level
/// (at 512 px on a GPU, 256 px on the CPU).
pub(super) fn group_check(dev: &Device, dtype: DType, big: bool) -> Result<Comparison> {
    let side = if dev.is_cpu() { 32 } else { 64 };
    let cases: &[(usize, usize, usize, usize)] = if big {
        &[(2, 320, 32, side * side)]
    } else {
        &[(3, 12, 4, 37), (2, 6, 2, 320)]
    };
    let mut all = Comparison::none();
    for &(b, c, groups, hw) in cases {
        let x = gate::input(1, &[b, c, hw], 2.0, 3.0, dev, dtype)?;
        let g = gate::input(2, &[b, c, hw], 1.0, 0.0, dev, dtype)?;
        let gamma = gate::input(3, &[c], 0.5, 1.0, dev, dtype)?;
        let beta = gate::input(4, &[c], 0.5, 0.0, dev, dtype)?;
        for silu in [false, true] {
            let op = |x: &[Tensor]| group_norm(&x[0], &gamma, &beta, groups, 1e-6, silu);
            all = all.and(gate::compare(std::slice::from_ref(&x), &g, op)?);
        }
    }
    Ok(all)
}

/// LayerNorm's first-use check: rows not a multiple of the bf16 pack, and 1.25 packs per
/// lane, 37 rows leaving a block partly empty; `big`: the U-Net's 320-wide rows.
pub(super) fn layer_check(dev: &Device, dtype: DType, big: bool) -> Result<Comparison> {
    let tokens = if dev.is_cpu() { 2 * 1024 } else { 2 * 4096 };
    let cases: &[(usize, usize)] = if big {
        &[(tokens, 320)]
    } else {
        &[(37, 37), (37, 320)]
    };
    let mut all = Comparison::none();
    for &(rows, n) in cases {
        let x = gate::input(5, &[rows, n], 2.0, -3.0, dev, dtype)?;
        let g = gate::input(6, &[rows, n], 1.0, 0.0, dev, dtype)?;
        let gamma = gate::input(7, &[n], 0.5, 1.0, dev, dtype)?;
        let beta = gate::input(8, &[n], 0.5, 0.0, dev, dtype)?;
        let op = |x: &[Tensor]| layer_norm(&x[0], &gamma, &beta, 1e-5);
        all = all.and(gate::compare(std::slice::from_ref(&x), &g, op)?);
    }
    Ok(all)
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

    use super::super::Backend;
    use super::{GroupNormParams, LayerNormGrad};
    use crate::kernels::cpu::GroupNormShape;
    use crate::kernels::cuda::{self, norm, Arg, Launch};

    /// Frozen affine parameters of `len` elements, in the kernels' storage type (a no-op
    /// when they already are).
    fn affine(ts: [&Tensor; 2], len: usize, dtype: DType) -> Result<[Tensor; 2]> {
        let [a, b] = ts.map(|t| t.to_dtype(dtype)?.contiguous());
        let (a, b) = (a?, b?);
        if a.elem_count() != len || b.elem_count() != len {
            bail!(
                "norm: affine parameters of {:?} for {len} features",
                a.shape()
            )
        }
        Ok([a, b])
    }

    fn io<const N: usize>(args: Vec<Arg>) -> Result<[Arg; N]> {
        match <[Arg; N]>::try_from(args) {
            Ok(a) => Ok(a),
            Err(_) => bail!("norm: a kernel takes {N} buffers"),
        }
    }

    /// A fresh output shaped like `x`, written by the launch `build` makes from the
    /// addresses of `x`, `dy` (if given), `params` and the output, in that order.
    fn launch_on(
        x: (&CudaStorage, &Layout),
        dy: Option<(&CudaStorage, &Layout)>,
        params: &[Tensor],
        build: impl FnOnce(Vec<Arg>) -> Result<Launch>,
    ) -> Result<CudaStorage> {
        let (dev, stream) = (x.0.device(), x.0.device().cuda_stream());
        let n = x.1.shape().elem_count();
        let mut out = cuda::alloc(dev, x.0.dtype(), n)?;
        if n == 0 {
            return Ok(out);
        }
        let locked: Vec<_> = params.iter().map(|t| t.storage_and_layout()).collect();
        {
            let (mut args, mut reads) = (Vec::new(), Vec::new());
            for (s, l) in std::iter::once(x).chain(dy) {
                let (p, r) = cuda::input_ptr(s, l, &stream)?;
                args.push(Arg::Ptr(p));
                reads.push(r);
            }
            for (s, l) in &locked {
                let (p, r) = cuda::input_ptr(CudaStorage::of(s)?, l, &stream)?;
                args.push(Arg::Ptr(p));
                reads.push(r);
            }
            let (op, _w) = cuda::output_ptr(&mut out, &stream)?;
            args.push(Arg::Ptr(op));
            cuda::run(dev, &build(args)?)?;
        }
        Ok(out)
    }

    /// The kernel shape, batch and affine parameters of GroupNorm on `x` with `dims`.
    fn group_args(
        p: &GroupNormParams,
        dims: &[usize],
        dtype: DType,
    ) -> Result<(GroupNormShape, usize, [Tensor; 2])> {
        let s = p.shape(dims);
        let params = affine([&p.gamma, &p.beta], s.channels, dtype)?;
        Ok((s, dims.first().copied().unwrap_or(1), params))
    }

    pub fn group_fwd(
        p: &GroupNormParams,
        x: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (s, batch, params) = group_args(p, l.dims(), x.dtype())?;
        let y = launch_on((x, l), None, &params, |a| {
            norm::group_fwd(x.dtype(), io(a)?, &s, batch)
        })?;
        Ok((y, l.shape().clone()))
    }

    pub fn group_bwd(p: &GroupNormParams, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (s, batch, params) = group_args(p, x.dims(), x.dtype())?;
        super::super::cuda_kernel2("group-norm-bwd", x, g, |x, xl, g, gl| {
            let dx = launch_on((x, xl), Some((g, gl)), &params, |a| {
                norm::group_bwd(x.dtype(), io(a)?, &s, batch)
            })?;
            Ok((dx, xl.shape().clone()))
        })
    }

    /// Rows and row length of LayerNorm on `dims`.
    fn rows_len(dims: &[usize]) -> (usize, usize) {
        let n = dims.last().copied().unwrap_or(1);
        (dims.iter().product::<usize>() / n.max(1), n)
    }

    pub fn layer_fwd(
        p: &LayerNormGrad,
        x: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, n) = rows_len(l.dims());
        let params = affine([&p.gamma, &p.beta], n, x.dtype())?;
        let y = launch_on((x, l), None, &params, |a| {
            norm::layer_fwd(x.dtype(), io(a)?, rows, n, p.eps as f32)
        })?;
        Ok((y, l.shape().clone()))
    }

    pub fn layer_bwd(p: &LayerNormGrad, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (rows, n) = rows_len(x.dims());
        let [gamma, _] = affine([&p.gamma, &p.beta], n, x.dtype())?;
        super::super::cuda_kernel2("layer-norm-bwd", x, g, |x, xl, g, gl| {
            let dx = launch_on((x, xl), Some((g, gl)), std::slice::from_ref(&gamma), |a| {
                norm::layer_bwd(x.dtype(), io(a)?, rows, n, p.eps as f32)
            })?;
            Ok((dx, xl.shape().clone()))
        })
    }
}
