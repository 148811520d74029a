//! A word's cross-attention map on a reference image, read from the base model itself
//! (ViCo, Layout-and-Retouch): encode the image, noise it to a few mid timesteps with
//! fixed noise, run the U-Net on a prompt that names the word, and average the word's
//! attention probabilities over heads, the two finest cross-attention grids below the
//! latent's and the timesteps.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;
use crate::model::nn::{AddedCond, Ctx};
use crate::model::probe::{AttnProbe, BlockKind};
use crate::rng::seeded_normal;

/// How the maps are made; recorded with the masks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttentionOptions {
    /// The square the image is centre-cropped and resized to, as `train` does.
    pub resolution: usize,
    /// Mid timesteps: early ones see only texture, late ones only noise.
    pub timesteps: Vec<usize>,
    /// Seed of the fixed noise.
    pub seed: u64,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self {
            resolution: 512,
            timesteps: vec![200, 400, 600],
            seed: 0,
        }
    }
}

/// A soft map over the `side x side` crop, row-major.
#[derive(Debug, Clone)]
pub struct SoftMap {
    pub side: usize,
    pub values: Vec<f32>,
}

/// The query grids read: SD 2.1 at 512 px has 64x64 latents, so 16x16 and 32x32, the
/// layers whose maps are both sharp and semantic.
pub fn probe_sides(latent_side: usize) -> [usize; 2] {
    [latent_side.div_ceil(4), latent_side.div_ceil(2)]
}

/// A prompt's text features, computed once for every image, and the token positions of
/// the words whose maps are read.
pub struct EncodedPrompt {
    /// `[1, tokens, dim]`.
    context: Tensor,
    /// SDXL's pooled projection `[1, pooled]`.
    pooled: Option<Tensor>,
    words: Vec<Vec<usize>>,
}

/// Where a word sits in a prompt: `before` is the prompt up to the word.
#[derive(Debug, Clone)]
pub struct WordAt {
    pub before: String,
    pub word: String,
}

/// Encodes `prompt`; each of `words` is found as `before + " " + word` in it.
pub fn encode_prompt(
    sd: &StableDiffusion,
    prompt: &str,
    words: &[WordAt],
) -> Result<EncodedPrompt> {
    let words = words
        .iter()
        .map(|w| {
            sd.tokenizer
                .word_positions(&w.before, &w.word)?
                .ok_or_else(|| unknown_word(&w.word))
        })
        .collect::<Result<_>>()?;
    let (context, pooled) = crate::infer::Weights::plain(sd).encode_text(&[prompt])?;
    Ok(EncodedPrompt {
        context,
        pooled,
        words,
    })
}

/// An image encoded and noised once, for every prompt read on it.
pub struct NoisedImage {
    /// `[timesteps, 4, h, w]` in the U-Net's dtype.
    z_t: Tensor,
    t: Tensor,
    /// The crop's side in pixels.
    res: usize,
}

/// `pixels` (`[3, R, R]` in [-1, 1]): VAE posterior mean, noised to every timestep.
pub fn noise_image(
    sd: &StableDiffusion,
    pixels: &Tensor,
    opts: &AttentionOptions,
) -> Result<NoisedImage> {
    let dev = &sd.device;
    let n = opts.timesteps.len();
    let image = pixels.unsqueeze(0)?.to_dtype(sd.dtype)?;
    // The posterior mean: the map should not depend on a sample of the VAE.
    let z0 = (sd.vae.encode(&image)?.mean.to_dtype(DType::F32)? * sd.vae.config.scaling_factor)?;
    let z0 = z0.repeat((n, 1, 1, 1))?;
    let eps = seeded_normal(opts.seed, z0.dims(), dev)?;
    let z_t = sd.schedule.add_noise(&z0, &eps, &opts.timesteps)?;
    let ts: Vec<f32> = opts.timesteps.iter().map(|&t| t as f32).collect();
    Ok(NoisedImage {
        z_t: z_t.to_dtype(sd.unet.dtype())?,
        t: Tensor::from_vec(ts, n, dev)?,
        res: pixels.dim(1)?,
    })
}

/// The attention map of each of `prompt`'s words on `image`.
pub fn word_maps(
    sd: &StableDiffusion,
    image: &NoisedImage,
    prompt: &EncodedPrompt,
) -> Result<Vec<SoftMap>> {
    let probs = layer_probs(sd, image, prompt)?;
    (prompt.words.iter())
        .map(|positions| average(&probs, positions, image.res))
        .collect()
}

fn unknown_word(word: &str) -> Error {
    Error::usage(format!(
        "the class word {word:?} has no token of its own in this model's vocabulary, so its attention \
         cannot be read: rename the pair folder with a common English word (e.g. person_k+hair_c), \
         or supply masks/ yourself."
    ))
}

/// Head-averaged probabilities `[timesteps, queries, keys]` of every probed layer.
fn layer_probs(
    sd: &StableDiffusion,
    image: &NoisedImage,
    prompt: &EncodedPrompt,
) -> Result<Vec<Tensor>> {
    let n = image.z_t.dim(0)?;
    let context = prompt.context.repeat((n, 1, 1))?;
    let probe = AttnProbe::new(
        &probe_sides(image.z_t.dim(2)?),
        &[BlockKind::Down, BlockKind::Up],
    );
    // SDXL: the image's own square as its size, as training conditions it.
    let added = (prompt.pooled.as_ref())
        .map(|p| AddedCond::uncropped(p.repeat((n, 1))?, (image.res, image.res)))
        .transpose()?;
    let ctx = Ctx {
        probe: Some(&probe),
        added: added.as_ref(),
        ..Ctx::default()
    };
    sd.unet.forward(&image.z_t, &image.t, &context, ctx)?;
    let maps = probe.take();
    if maps.is_empty() {
        return Err(Error::internal(format!(
            "no cross-attention layer at {:?} queries: the model has none at this resolution",
            probe.sides
        )));
    }
    Ok(maps
        .into_iter()
        .map(|(_, m)| m.to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?)
}

/// The mean over grids of the mean over that grid's layers and the timesteps of the mean
/// over `positions` (a word's tokens), each layer upsampled bilinearly to `res x res`
/// first. Grids weigh alike however many layers they hold: SDXL has 10 transformer
/// layers per attention at latent/4 and 2 at latent/2, SD 1.x/2.x one at each.
fn average(probs: &[Tensor], positions: &[usize], res: usize) -> Result<SoftMap> {
    let idx = Tensor::new(
        positions.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let mut grids: Vec<(usize, Vec<f32>, usize)> = Vec::new(); // (queries, sum, layers)
    for p in probs {
        let (_, q, _) = p.dims3()?;
        let side = (q as f64).sqrt().round() as usize;
        let word = p
            .index_select(&idx.to_device(p.device())?, 2)?
            .mean(2)?
            .mean(0)?;
        let up = bilinear(&word.to_vec1::<f32>()?, (side, side), (res, res));
        let at = match grids.iter().position(|g| g.0 == q) {
            Some(i) => i,
            None => {
                grids.push((q, vec![0f32; res * res], 0));
                grids.len() - 1
            }
        };
        let (_, acc, layers) = &mut grids[at];
        for (a, v) in acc.iter_mut().zip(up) {
            *a += v;
        }
        *layers += 1;
    }
    let mut values = vec![0f32; res * res];
    for (_, acc, layers) in &grids {
        for (v, a) in values.iter_mut().zip(acc) {
            *v += a / *layers as f32 / grids.len() as f32;
        }
    }
    Ok(SoftMap { side: res, values })
}

/// Bilinear resampling of a `from` = (rows, cols) grid to `to`, sampling at pixel centres
/// (align_corners = false, edges clamped).
pub fn bilinear(grid: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let coord = |o: usize, n_from: usize, n_to: usize| {
        let x =
            ((o as f32 + 0.5) * n_from as f32 / n_to as f32 - 0.5).clamp(0.0, (n_from - 1) as f32);
        let i = (x.floor() as usize).min(n_from - 1);
        (i, (i + 1).min(n_from - 1), x - i as f32)
    };
    let cols: Vec<_> = (0..to.1).map(|x| coord(x, from.1, to.1)).collect();
    let mut out = Vec::with_capacity(to.0 * to.1);
    for y in 0..to.0 {
        let (y0, y1, fy) = coord(y, from.0, to.0);
        for &(x0, x1, fx) in &cols {
            let at = |yy: usize, xx: usize| grid[yy * from.1 + xx];
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_keeps_constants_and_interpolates() {
        assert!(bilinear(&[0.25; 4], (2, 2), (8, 8))
            .iter()
            .all(|&v| v == 0.25));
        // A left-right ramp stays monotone and symmetric.
        let up = bilinear(&[0.0, 1.0, 0.0, 1.0], (2, 2), (4, 4));
        assert_eq!(&up[..4], &[0.0, 0.25, 0.75, 1.0]);
        assert_eq!(&up[..4], &up[12..]);
    }

    #[test]
    fn probe_sides_are_the_16_and_32_grids_of_sd_at_512() {
        assert_eq!(probe_sides(64), [16, 32]);
        assert_eq!(probe_sides(8), [2, 4]);
    }
}
