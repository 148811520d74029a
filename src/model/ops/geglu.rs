//! diffusers' GEGLU activation as one op: the composed version's backward makes many
//! full-size passes.

use candle_core::{Result, Shape, Tensor, D};

use super::kernels as cpu;
use super::{fused1, kernel2, on_cpu_f32, Grad1};

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
        let _p = crate::profile::scope(crate::profile::Kind::GegluBwd, x.device());
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
    let _p = crate::profile::scope(crate::profile::Kind::GegluFwd, x.device());
    let inner = x.dim(D::Minus1)? / 2;
    fused1(x, GegluGrad, |x| {
        x.narrow(D::Minus1, 0, inner)? * x.narrow(D::Minus1, inner, inner)?.gelu_erf()?
    })
}
