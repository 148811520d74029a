//! CLiC's objective (Safaee et al. 2024, as its authors' `learning.py` computes it in
//! "style" mode): one U-Net pass over each image and its masked copy (grey outside the
//! mask, the same noise and timestep, a region-of-interest prompt), then
//!
//! - L_att: the word's cross-attention maps of every up-block cross-attention layer,
//!   head-averaged, resized bilinearly to the latent grid and averaged, min-max
//!   normalised, against the mask (MSE);
//! - L_context: the image's eps-MSE weighted by the mask, the background (mask below
//!   0.05) at `background`;
//! - L_RoI: the masked copy's eps-MSE weighted by the mask.
//!
//! The two weighted terms divide by the weights' sum over the 1-channel mask while
//! summing over the 4 latent channels, as the source does (4x a weighted mean).

use candle_core::{DType, Tensor, D};

use super::method::ClicWeights;
use super::objective::{Batch, Noised, Online, StepLosses, TextParams};
use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;
use crate::model::nn::{resize_bilinear, Ctx};
use crate::model::probe::{AttnProbe, BlockKind};

/// The loss terms of one CLiC step: `l_diff` holds L_context, `l_attn` L_att, `l_roi`
/// L_RoI; `per_image` is each image's L_context.
pub fn clic_losses(
    sd: &StableDiffusion,
    batch: &Batch,
    noised: &Noised,
    online: Online,
    text: TextParams,
    w: ClicWeights,
) -> Result<StepLosses> {
    let dev = &sd.device;
    let b = batch.len();
    let roi = (batch.roi.as_ref())
        .ok_or_else(|| Error::internal("a CLiC step without its region-of-interest prompts"))?;
    let ids = Tensor::cat(&[&batch.ids, &roi.ids], 0)?;
    let ids_2 = match (&batch.ids_2, &roi.ids_2) {
        (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
        _ => None,
    };
    let t = noised.timestep_tensor(dev)?;
    let latent = noised.z_t.dim(2)?;
    let (context, added) =
        super::objective::text_conditioning(sd, None, (&ids, ids_2.as_ref()), text, latent)?;
    let probe = AttnProbe::new(&grid_sides(latent), &[BlockKind::Up]);
    let ctx = Ctx {
        lora: Some(online.lora),
        tuned: online.tuned,
        probe: Some(&probe),
        added: added.as_ref(),
        ..Ctx::default()
    };
    let z_t = noised.z_t.to_dtype(sd.unet.dtype())?;
    let pred = (sd.unet.forward(&z_t, &t, &context, ctx)?).to_dtype(DType::F32)?;
    // The image's target stands for its masked copy's too, as the source computes it once.
    let eps = noised.target.narrow(0, 0, b)?;
    let mask = resize_bilinear(&noised.masks, latent, latent)?;

    let l_attn = attention_term(&probe, &batch.token_pos, &mask, latent)?;
    let background = mask.lt(0.05)?.to_dtype(DType::F32)?;
    let context_mask = ((&mask * (1.0 - &background)?)? + (&background * w.background)?)?;
    let per_image = weighted_mse(&pred.narrow(0, 0, b)?, &eps, &context_mask)?;
    let l_diff = per_image.mean_all()?;
    let l_roi = weighted_mse(&pred.narrow(0, b, b)?, &eps, &mask)?.mean_all()?;
    let loss = (((&l_attn * w.attention)? + (&l_diff * w.context)?)? + (&l_roi * w.roi)?)?;
    let per_sample =
        super::ds_bal::per_sample_means(&per_image, &batch.sample_of, batch.n_samples)?;
    Ok(StepLosses {
        per_image,
        per_sample,
        l_diff,
        l_attn,
        l_pres: Tensor::zeros((), DType::F32, dev)?,
        l_roi: Some(l_roi),
        l_prior: None,
        chosen: None,
        loss,
    })
}

/// Every grid side the U-Net's levels can have below `latent` (each downsampling takes
/// ceil(n / 2)), for the probe to record every up-block cross-attention.
fn grid_sides(latent: usize) -> Vec<usize> {
    let mut sides = vec![latent];
    while *sides.last().unwrap_or(&1) > 1 {
        let next = sides[sides.len() - 1].div_ceil(2);
        sides.push(next);
    }
    sides
}

/// L_att: of the first `b` images' recorded maps (the masked copies' are not used), each
/// image's own word's column, resized to `latent x latent`, averaged over layers, min-max
/// normalised per image, against `mask` `[b, 1, latent, latent]`.
fn attention_term(
    probe: &AttnProbe,
    token_pos: &[usize],
    mask: &Tensor,
    latent: usize,
) -> Result<Tensor> {
    let b = token_pos.len();
    let mut resized = Vec::new();
    for (_, m) in probe.take() {
        let m = m.narrow(0, 0, b)?.to_dtype(DType::F32)?;
        let q = m.dim(1)?;
        let side = (q as f64).sqrt() as usize;
        let idx: Vec<u32> = (token_pos.iter())
            .flat_map(|&p| std::iter::repeat_n(p as u32, q))
            .collect();
        let idx = Tensor::from_vec(idx, (b, q, 1), m.device())?;
        let own = m.gather(&idx, D::Minus1)?.reshape((b, 1, side, side))?;
        resized.push(resize_bilinear(&own, latent, latent)?);
    }
    if resized.is_empty() {
        return Err(Error::internal(
            "CLiC: no up-block cross-attention maps were recorded",
        ));
    }
    let mean = Tensor::stack(&resized, 0)?.mean(0)?.flatten_from(1)?;
    let lo = mean.min_keepdim(1)?;
    let span = (mean.max_keepdim(1)? - &lo)?;
    let normalized = mean.broadcast_sub(&lo)?.broadcast_div(&span)?;
    Ok((normalized - mask.flatten_from(1)?)?.sqr()?.mean_all()?)
}

/// Per image: `sum((pred - eps)^2 * m) / (sum(m) + 1e-10)`, the numerator over the four
/// latent channels and the denominator over the one-channel weights `m`.
fn weighted_mse(pred: &Tensor, eps: &Tensor, m: &Tensor) -> Result<Tensor> {
    let num = (pred - eps)?
        .sqr()?
        .broadcast_mul(m)?
        .flatten_from(1)?
        .sum(1)?;
    let den = (m.flatten_from(1)?.sum(1)? + 1e-10)?;
    Ok((num / den)?)
}
