//! Every random number magictailor draws comes from here.
//!
//! candle's CPU generator cannot be seeded, so noise is drawn on the host from `StdRng`
//! and uploaded. A training step's randomness is a pure function of (seed, step, stream):
//! `--resume` needs no generator state to give the same bytes as an uninterrupted run.

use candle_core::{Device, Shape, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::Result;

/// What a step's generator is for; each purpose draws from its own stream, so adding a
/// draw to one never shifts another.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    /// Colour-jitter factors, their order, and the flip.
    Augment = 1,
    /// DM-Deg's pixel noise.
    DmDeg = 2,
    /// The VAE posterior sample.
    Posterior = 3,
    /// Diffusion timesteps.
    Timesteps = 4,
    /// The diffusion noise eps.
    Eps = 5,
    /// Which reference images a step trains on, and their prompt templates.
    Pick = 6,
    /// Fixed noise of `Trainer::probe_loss`.
    Probe = 9,
}

/// A generator seeded by `seed` alone (LoRA init, inference latents).
pub fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The generator of one purpose at one step.
pub fn step_rng(seed: u64, step: usize, stream: Stream) -> StdRng {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ (stream as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(mix)
}

/// `n` standard normal f32 values from `rng`.
pub fn normals(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// Standard normal f32 noise of `shape` from `rng`, on `device`.
pub fn normal(rng: &mut StdRng, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let v = normals(rng, shape.elem_count());
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Standard normal noise from a fresh generator: the same seed gives the same bytes on
/// every platform and device.
pub fn seeded_normal(seed: u64, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    normal(&mut seeded(seed), shape, device)
}
