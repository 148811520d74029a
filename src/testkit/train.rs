//! `Trainer::probe_loss`: a measure of how well a trainer has learned its pair, for tests.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::nn::Ctx;
use crate::rng::{normal, step_rng, Stream};
use crate::train::losses::{masked_diffusion_per_image, resize_nearest};
use crate::train::trainer::Trainer;

impl Trainer {
    /// The masked diffusion loss at fixed timesteps and noise (no update): a measure of
    /// how well the pair is learned, comparable across steps.
    pub fn probe_loss(&self, timesteps: &[usize], seed: u64) -> Result<f32> {
        let dev = &self.sd.device;
        let pixels = self.pool.all.pixels.to_dtype(self.cfg.dtype)?;
        let z0 = (self.sd.vae.encode(&pixels)?.mean.to_dtype(DType::F32)?
            * self.sd.vae.config.scaling_factor)?;
        let eps = normal(&mut step_rng(seed, 0, Stream::Probe), z0.dims(), dev)?;
        let z_t = self.sd.schedule.add_noise(&z0, &eps, timesteps)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, timesteps.len(), dev)?;
        let table = self.table.as_ref().map(|t| t.as_tensor().detach());
        let rows = self.rows.as_tensor().detach();
        let context = self.sd.text_encoder.forward_with_table(
            &self.pool.all.ids,
            table.as_ref(),
            Some(&rows),
        )?;
        let set = self.lora.as_set();
        let ctx = Ctx {
            lora: Some(&set),
            tuned: None,
            probe: None,
            ..Ctx::default()
        };
        let pred = self
            .sd
            .unet
            .forward(&z_t.to_dtype(self.cfg.dtype)?, &t, &context, ctx)?
            .to_dtype(DType::F32)?;
        let mask_latent = resize_nearest(&self.pool.all.masks, z_t.dim(2)?)?;
        Ok(masked_diffusion_per_image(&pred, &eps, &mask_latent)?
            .mean_all()?
            .detach()
            .to_scalar::<f32>()?)
    }
}
