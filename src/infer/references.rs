//! Reference images read at sampling time (ViCo's visual condition, the retouch stage's
//! reference paths): each sample's image, VAE-encoded once per command and size.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::loader::StableDiffusion;
use crate::rng::seeded_normal;

/// The seed of every reference's VAE posterior sample (plus its sample index).
const POSTERIOR_SEED: u64 = 0x5669_436f;

/// Each sample's reference image, in sample order (`<v0>`'s first).
pub struct References {
    paths: Vec<PathBuf>,
    /// Each reference's latent by (sample, height, width).
    latents: RefCell<HashMap<(usize, usize, usize), Tensor>>,
}

impl References {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            latents: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Sample `s`'s reference as a clean latent `[1, c, h/f, w/f]` at `(height, width)`
    /// pixels (covered and cropped): its VAE posterior sample from a fixed seed, scaled.
    pub fn latent(
        &self,
        sd: &StableDiffusion,
        s: usize,
        (height, width): (usize, usize),
    ) -> Result<Tensor> {
        if let Some(z) = self.latents.borrow().get(&(s, height, width)) {
            return Ok(z.clone());
        }
        let pixels = crate::data::load_rgb_sized(&self.paths[s], width, height, &sd.device)?;
        let dist = sd.vae.encode(&pixels.unsqueeze(0)?.to_dtype(sd.dtype)?)?;
        let noise = seeded_normal(POSTERIOR_SEED + s as u64, dist.mean.dims(), &sd.device)?;
        let z = dist.sample_with(&noise.to_dtype(dist.mean.dtype())?)?;
        let z = (z.to_dtype(DType::F32)? * sd.vae.config.scaling_factor)?;
        (self.latents.borrow_mut()).insert((s, height, width), z.clone());
        Ok(z)
    }
}
