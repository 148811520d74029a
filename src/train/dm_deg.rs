//! DM-Deg, Dynamic Masked Degradation (paper eq. 4-5): Gaussian noise on the pixels
//! *outside* the mask, with an intensity that stays high for most of training and
//! collapses near the end, so the model stops attending to the background without
//! memorizing the noise.
//!
//! `alpha_d = alpha_init * (1 - (d / D)^gamma)`, `I_hat = clamp(I + alpha_d * G * (1 - M), -1, 1)`.

use candle_core::{Result, Tensor};
use serde::Serialize;

/// `--dm-deg`: which intensity curve (the paper's, or one of its ablations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Curve {
    /// The paper's curve: alpha * (1 - (d/D)^gamma).
    Dynamic,
    /// Constant alpha (ablation).
    Fixed,
    /// alpha * (1 - d/D) (ablation).
    Linear,
    /// Zero the pixels outside the mask (ablation).
    MaskOut,
    /// No degradation (ablation).
    Off,
}

/// The intensity curve; `Dynamic` is the paper's, the others are its ablations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Degradation {
    /// `alpha_init * (1 - (d/D)^gamma)` (the method).
    Dynamic { alpha_init: f64, gamma: f64 },
    /// A constant intensity (ablation "fixed").
    Fixed { alpha: f64 },
    /// `alpha_init * (1 - d/D)` (ablation "linear").
    Linear { alpha_init: f64 },
    /// Pixels outside the mask set to 0, mid-grey in [-1, 1] (ablation "mask out").
    MaskOut,
    /// No degradation (ablation "w/o DM-Deg").
    Off,
}

impl Degradation {
    /// The curve with its initial intensity `alpha` and exponent `gamma` (the ablations
    /// ignore what they do not use).
    pub fn new(curve: Curve, alpha: f64, gamma: f64) -> Self {
        match curve {
            Curve::Dynamic => Degradation::Dynamic {
                alpha_init: alpha,
                gamma,
            },
            Curve::Fixed => Degradation::Fixed { alpha },
            Curve::Linear => Degradation::Linear { alpha_init: alpha },
            Curve::MaskOut => Degradation::MaskOut,
            Curve::Off => Degradation::Off,
        }
    }

    /// Noise intensity at global step `d` (counted from 1) of `total` steps.
    pub fn alpha(&self, d: usize, total: usize) -> f64 {
        let frac = d as f64 / total.max(1) as f64;
        match *self {
            Degradation::Dynamic { alpha_init, gamma } => alpha_init * (1.0 - frac.powf(gamma)),
            Degradation::Fixed { alpha } => alpha,
            Degradation::Linear { alpha_init } => alpha_init * (1.0 - frac),
            Degradation::MaskOut | Degradation::Off => 0.0,
        }
    }

    /// Degrades `pixels: [b, 3, h, w]` outside `masks: [b, 1, h, w]` with `noise` (standard
    /// normal, `pixels`' shape). Runs as tensor ops on the pixels' device.
    pub fn apply(
        &self,
        pixels: &Tensor,
        masks: &Tensor,
        noise: &Tensor,
        d: usize,
        total: usize,
    ) -> Result<Tensor> {
        match self {
            Degradation::Off => Ok(pixels.clone()),
            Degradation::MaskOut => pixels.broadcast_mul(masks),
            _ => {
                let outside = masks.affine(-1.0, 1.0)?;
                let g = noise.broadcast_mul(&outside)?;
                (pixels + (g * self.alpha(d, total))?)?.clamp(-1f32, 1f32)
            }
        }
    }
}
