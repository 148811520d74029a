//! ViCo's objective (Hao et al. 2023, as its authors' `ddpm.py` computes it): a U-Net call
//! over the references' clean latents at the images' timesteps and prompts, then one over
//! the noised images, whose tokens go through the image cross-attention blocks onto the
//! references'. The loss is the plain eps-MSE (ViCo's own; not masked) plus `weight` times
//! L_reg, summed over the blocks: the MSE between each reference's map of its pseudo-word
//! and its stop-gradient end-of-text map, each divided by its maximum.
//!
//! The reference pass stays in the graph, as in the authors' code: the pseudo-word reaches
//! the loss through the reference's tokens too, not only through the image's text.

use candle_core::{DType, Tensor};

use super::objective::{Batch, Noised, StepLosses, TextParams};
use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;
use crate::model::nn::Ctx;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::vico::{Blocks, Plug, Routing};

/// The loss terms of one ViCo step: `l_diff` holds the eps-MSE, `l_attn` L_reg (summed
/// over the blocks, before its weight).
pub fn vico_losses(
    sd: &StableDiffusion,
    batch: &Batch,
    noised: &Noised,
    text: TextParams,
    blocks: &Blocks,
    weight: f64,
) -> Result<StepLosses> {
    let dev = &sd.device;
    let b = batch.len();
    let reference = (noised.reference.as_ref())
        .ok_or_else(|| Error::internal("a ViCo step without its references"))?;
    let latent = noised.z_t.dim(2)?;
    let (context, added) = super::objective::text_conditioning(
        sd,
        None,
        (&batch.ids, batch.ids_2.as_ref()),
        text,
        latent,
    )?;
    let t = noised.timestep_tensor(dev)?;
    let routing = Routing {
        refs_of: (0..b).map(|i| vec![i]).collect(),
        mask_token: batch.token_pos.clone(),
        reg_eot: Some(end_of_text(&batch.ids, &sd.tokenizer)?),
    };
    let plug = Plug::new(blocks, routing);
    let ctx = Ctx {
        vico: Some(&plug),
        added: added.as_ref(),
        ..Ctx::default()
    };
    let dtype = sd.unet.dtype();
    // The reference pass: its output is not read, its tokens at the sites are.
    sd.unet
        .forward(&reference.to_dtype(dtype)?, &t, &context, ctx)?;
    plug.start_drawing()?;
    let pred = sd
        .unet
        .forward(&noised.z_t.to_dtype(dtype)?, &t, &context, ctx)?;
    let diff = (pred.to_dtype(DType::F32)? - &noised.target)?;
    let per_image = diff.sqr()?.flatten_from(1)?.mean(1)?;
    let l_diff = per_image.mean_all()?;
    let terms = plug.take_reg();
    if terms.is_empty() {
        return Err(Error::internal("a ViCo step whose blocks gave no L_reg"));
    }
    let l_reg = Tensor::stack(&terms, 0)?.sum_all()?;
    let loss = (&l_diff + (&l_reg * weight)?)?;
    let per_sample =
        super::ds_bal::per_sample_means(&per_image, &batch.sample_of, batch.n_samples)?;
    Ok(StepLosses {
        per_image,
        per_sample,
        l_diff,
        l_attn: l_reg,
        l_pres: Tensor::zeros((), DType::F32, dev)?,
        l_roi: None,
        l_prior: None,
        chosen: None,
        loss,
    })
}

/// Each prompt's end-of-text position in `ids: [b, len]`.
pub fn end_of_text(ids: &Tensor, tok: &ClipTokenizer) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    (rows.iter())
        .map(|r| {
            (tok.end_of_text(r))
                .ok_or_else(|| Error::internal("a prompt without its end-of-text token"))
        })
        .collect()
}
