//! diffusers' GEGLU activation as one op: the composed version's backward makes many
//! full-size passes.

use candle_core::{DType, Device, Result, Shape, Tensor, D};

use super::{cpu_kernel_takes, fused1, kernel2, Grad1};
use crate::kernels::cpu;
use crate::kernels::gate::{self, Comparison, Family};
use crate::profile::Kind;

// GEGLU: h * gelu_erf(gate) for [h, gate] split on the last dimension.

#[derive(Clone)]
struct GegluGrad;

impl Grad1 for GegluGrad {
    const NAME: &'static str = "geglu";
    const BWD: Kind = Kind::GegluBwd;
    const FAMILY: Option<Family> = Some(Family::Geglu);
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        let mut out = dims.to_vec();
        let inner = out.last().copied().unwrap_or(0) / 2;
        *out.last_mut()? = inner;
        Some(Ok((cpu::geglu_fwd(x, inner), out.into())))
    }
    #[cfg(feature = "cuda")]
    fn cuda_value(
        &self,
        x: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Option<Result<(candle_core::CudaStorage, Shape)>> {
        Some(on_cuda::fwd(x, l))
    }
    #[cfg(feature = "cuda")]
    fn cuda_grad(&self, x: &Tensor, g: &Tensor) -> Option<Result<Tensor>> {
        Some(on_cuda::bwd(x, g))
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let inner = x.dim(D::Minus1)? / 2;
        if cpu_kernel_takes(Family::Geglu, x) {
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
    let _p = crate::profile::scope(Kind::GegluFwd, x.device());
    let inner = x.dim(D::Minus1)? / 2;
    fused1(x, GegluGrad, |x| {
        x.narrow(D::Minus1, 0, inner)? * x.narrow(D::Minus1, inner, inner)?.gelu_erf()?
    })
}

/// GEGLU's first-use check: 37 rows of 2 x 40, a size no launch divides evenly; `big`:
/// the U-Net's first feed-forward (1280 wide) at 512 px on a GPU, 256 px on the CPU.
pub(super) fn check(dev: &Device, dtype: DType, big: bool) -> Result<Comparison> {
    let (rows, inner) = match (big, dev.is_cpu()) {
        (false, _) => (37, 40),
        (true, true) => (2 * 1024, 1280),
        (true, false) => (2 * 4096, 1280),
    };
    let x = gate::input(9, &[rows, 2 * inner], 1.5, 0.0, dev, dtype)?;
    let g = gate::input(10, &[rows, inner], 1.0, 0.0, dev, dtype)?;
    gate::compare(&[x], &g, |x| geglu(&x[0]))
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

    use crate::kernels::cuda::{self, geglu, Arg};

    /// Rows and half-width of a `[.., 2 * inner]` layout.
    fn rows_inner(l: &Layout) -> (usize, usize) {
        let last = l.dims().last().copied().unwrap_or(0);
        (l.shape().elem_count() / last.max(1), last / 2)
    }

    pub fn fwd(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, inner) = rows_inner(l);
        let (dev, stream) = (x.device(), x.device().cuda_stream());
        let mut y = cuda::alloc(dev, x.dtype(), rows * inner)?;
        {
            let (xp, _r) = cuda::input_ptr(x, l, &stream)?;
            let (yp, _w) = cuda::output_ptr(&mut y, &stream)?;
            let launch = geglu::fwd(x.dtype(), Arg::Ptr(xp), Arg::Ptr(yp), rows, inner)?;
            cuda::run(dev, &launch)?;
        }
        let mut dims = l.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = inner;
        }
        Ok((y, dims.into()))
    }

    pub fn bwd(x: &Tensor, g: &Tensor) -> Result<Tensor> {
        super::super::cuda_kernel2("geglu-bwd", x, g, |x, xl, g, gl| {
            let (rows, inner) = rows_inner(xl);
            let (dev, stream) = (x.device(), x.device().cuda_stream());
            let mut dx = cuda::alloc(dev, x.dtype(), rows * 2 * inner)?;
            {
                let (xp, _r) = cuda::input_ptr(x, xl, &stream)?;
                let (gp, _s) = cuda::input_ptr(g, gl, &stream)?;
                let (dp, _w) = cuda::output_ptr(&mut dx, &stream)?;
                let (xp, gp, dp) = (Arg::Ptr(xp), Arg::Ptr(gp), Arg::Ptr(dp));
                cuda::run(dev, &geglu::bwd(x.dtype(), xp, gp, dp, rows, inner)?)?;
            }
            Ok((dx, xl.shape().clone()))
        })
    }
}
