//! What one training step computes, given the weights: the step's batch drawn from the
//! reference images, its augmented, degraded and noised latents (DM-Deg, eq. 4-5), and
//! the loss terms (eq. 1-2 for warm-up, eq. 6-8 for DS-Bal).

use std::borrow::Cow;

use candle_core::{DType, Tensor};
use rand::Rng;

use super::augment::{color_jitter, flip_horizontal, flip_some, Jitter, Rescale};
use super::config::TrainConfig;
use super::ds_bal::{hardest_sample, per_sample_means, preserving_loss};
use super::losses::{attention_loss, masked_diffusion_per_image, resize_nearest};
use super::method::{Draw, Flip, LossWeights, Pick, Prompts};
use super::noise::{NoiseSizes, StepNoise};
use crate::data::PairDataset;
use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;
use crate::model::lora::LoraSet;
use crate::model::nn::{AddedCond, Ctx};
use crate::model::probe::{AttnProbe, BlockKind};
use crate::model::tokenizer::pseudo_word;
use crate::model::tuned::TunedSet;
use crate::model::vae::LatentDist;
use crate::rng::{step_rng, Stream};

/// The images one step trains on, on the device, with their prompts.
#[derive(Clone)]
pub struct Batch {
    pub pixels: Tensor,
    pub masks: Tensor,
    /// Each image's prompt ids (MagicTailor: `"A photo of <vN>"`), `[b, 77]`.
    pub ids: Tensor,
    /// SDXL: the same prompts by the second tokenizer.
    pub ids_2: Option<Tensor>,
    /// Position of each image's own pseudo-word in its prompt.
    pub token_pos: Vec<usize>,
    pub sample_of: Vec<usize>,
    pub n_samples: usize,
    /// CLiC: each image's region-of-interest prompt, for its masked copy.
    pub roi: Option<RoiPrompts>,
    /// Prior preservation: the last this many images are class images (whole-image
    /// masks, class prompts), weighed apart.
    pub prior: usize,
    /// ViCo: each image's reference image, `[b, 3, h, w]`.
    pub reference: Option<Tensor>,
    /// The VAE posteriors of the images (then of the references), where the draw is clean
    /// and the pool holds them ([`Pool::cache_posteriors`]).
    pub posterior: Option<LatentDist>,
}

/// The prompts of a CLiC step's masked copies: ids `[b, 77]` and where each holds its
/// image's word.
#[derive(Clone)]
pub struct RoiPrompts {
    pub ids: Tensor,
    /// SDXL: the same prompts by the second tokenizer.
    pub ids_2: Option<Tensor>,
    pub token_pos: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.sample_of.len()
    }

    /// The reference images', before any class images.
    pub fn instances(&self) -> usize {
        self.len() - self.prior
    }

    pub fn is_empty(&self) -> bool {
        self.sample_of.is_empty()
    }
}

/// The reference images of a run, on the device, and the batch each step draws from
/// them as the recipe's [`Draw`] says.
pub struct Pool {
    /// Every image in sample order, each prompted with [`Prompts::first`]: the batch of
    /// every step of a method that trains on all images with a fixed prompt.
    pub all: Batch,
    /// Prior preservation's class images (`train::prior` loads them once drawn).
    pub class: Option<Batch>,
    /// Class images a step draws: as many as reference images (None), or this many.
    pub class_per_step: Option<usize>,
}

impl Pool {
    /// The images of `data`, whose pseudo-words the tokenizer must already know.
    pub fn new(sd: &StableDiffusion, data: &PairDataset, prompts: Prompts) -> Result<Self> {
        let (mut pixels, mut masks, mut sample_of) = (Vec::new(), Vec::new(), Vec::new());
        for (s, im) in data.images() {
            pixels.push(im.pixels.clone());
            masks.push(im.mask.clone());
            sample_of.push(s);
        }
        let prompted: Vec<(usize, String)> = (sample_of.iter())
            .map(|&s| (s, prompts.first(&pseudo_word(s))))
            .collect();
        let Tokens {
            ids,
            ids_2,
            token_pos,
        } = prompt_ids(sd, &prompted)?;
        Ok(Self {
            all: Batch {
                pixels: Tensor::stack(&pixels, 0)?,
                masks: Tensor::stack(&masks, 0)?,
                ids,
                ids_2,
                token_pos,
                sample_of,
                n_samples: data.samples.len(),
                roi: None,
                prior: 0,
                reference: None,
                posterior: None,
            },
            class: None,
            class_per_step: None,
        })
    }

    /// Step `d`'s batch: a pure function of (seed, d), so a resumed run draws the same.
    pub fn batch(
        &self,
        sd: &StableDiffusion,
        draw: &Draw,
        seed: u64,
        d: usize,
    ) -> Result<Cow<'_, Batch>> {
        let plain = !draw.rescale && draw.roi.is_none() && self.class.is_none();
        if let (Pick::All, Prompts::Fixed(_), true) = (draw.pick, draw.prompts, plain) {
            return Ok(Cow::Borrowed(&self.all));
        }
        let n = self.all.len();
        let mut rng = step_rng(seed, d, Stream::Pick);
        let picked: Vec<usize> = match draw.pick {
            Pick::All => (0..n).collect(),
            Pick::Random(k) => (0..k).map(|_| rng.random_range(0..n)).collect(),
            Pick::Union => union_draw(&self.all.sample_of, self.all.n_samples, &mut rng),
        };
        let idx = Tensor::from_vec(
            picked.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            picked.len(),
            &sd.device,
        )?;
        let sample_of: Vec<usize> = picked.iter().map(|&i| self.all.sample_of[i]).collect();
        let mut pixels = self.all.pixels.index_select(&idx, 0)?;
        let mut masks = self.all.masks.index_select(&idx, 0)?;
        let mut prefixes = Vec::new();
        if draw.rescale {
            (pixels, masks, prefixes) = rescaled(&pixels, &masks, sd.vae_factor(), &mut rng)?;
        }
        let Tokens {
            ids,
            ids_2,
            token_pos,
        } = match draw.prompts {
            // Each image's fixed prompt is already tokenized in `all`.
            Prompts::Fixed(_) if prefixes.is_empty() => Tokens {
                ids: self.all.ids.index_select(&idx, 0)?,
                ids_2: (self.all.ids_2.as_ref())
                    .map(|t| t.index_select(&idx, 0))
                    .transpose()?,
                token_pos: picked.iter().map(|&i| self.all.token_pos[i]).collect(),
            },
            prompts => {
                let prompted: Vec<(usize, String)> = (sample_of.iter().enumerate())
                    .map(|(j, &s)| {
                        let word = pseudo_word(s);
                        let prompt = match prompts {
                            Prompts::Fixed(f) => f(&word),
                            Prompts::Templates(t) => {
                                t[rng.random_range(0..t.len())].replace("{}", &word)
                            }
                        };
                        let prefix = prefixes.get(j).copied().unwrap_or_default();
                        (s, format!("{prefix}{prompt}"))
                    })
                    .collect();
                prompt_ids(sd, &prompted)?
            }
        };
        let reference_idx = draw.reference.then(|| self.references(&picked, &mut rng));
        let reference = match &reference_idx {
            Some(refs) => {
                let idx = Tensor::from_vec(refs.clone(), picked.len(), &sd.device)?;
                Some(self.all.pixels.index_select(&idx, 0)?)
            }
            None => None,
        };
        let roi = match draw.roi {
            Some(templates) => {
                let prompted: Vec<(usize, String)> = (sample_of.iter())
                    .map(|&s| {
                        let t = templates[rng.random_range(0..templates.len())];
                        (s, t.replace("{}", &pseudo_word(s)))
                    })
                    .collect();
                let Tokens {
                    ids,
                    ids_2,
                    token_pos,
                } = prompt_ids(sd, &prompted)?;
                Some(RoiPrompts {
                    ids,
                    ids_2,
                    token_pos,
                })
            }
            None => None,
        };
        let batch = Batch {
            pixels,
            masks,
            ids,
            ids_2,
            token_pos,
            sample_of,
            n_samples: self.all.n_samples,
            roi,
            prior: 0,
            reference,
            posterior: self.posteriors(&picked, reference_idx.as_deref())?,
        };
        match &self.class {
            Some(class) => {
                let k = self.class_per_step.unwrap_or(batch.len());
                Ok(Cow::Owned(with_class_images(batch, class, k, &mut rng)?))
            }
            None => Ok(Cow::Owned(batch)),
        }
    }

    /// Encodes every image once, where `draw` is clean: each step then only samples its
    /// posteriors (the VAE encoder was 43% of a ViCo step on an H200).
    pub fn cache_posteriors(
        &mut self,
        sd: &StableDiffusion,
        draw: &Draw,
        dtype: DType,
    ) -> Result<()> {
        if draw.is_clean() {
            let d = sd.vae.encode(&self.all.pixels.to_dtype(dtype)?)?;
            self.all.posterior = Some(LatentDist {
                mean: d.mean.contiguous()?,
                std: d.std.contiguous()?,
            });
        }
        Ok(())
    }

    /// The cached posteriors of the picked images, then of their references.
    fn posteriors(&self, picked: &[usize], refs: Option<&[u32]>) -> Result<Option<LatentDist>> {
        let Some(all) = &self.all.posterior else {
            return Ok(None);
        };
        let mut rows: Vec<u32> = picked.iter().map(|&i| i as u32).collect();
        rows.extend(refs.unwrap_or_default());
        let idx = Tensor::from_vec(rows.clone(), rows.len(), all.mean.device())?;
        Ok(Some(LatentDist {
            mean: all.mean.index_select(&idx, 0)?,
            std: all.std.index_select(&idx, 0)?,
        }))
    }

    /// For each picked image (an index into `all`), another image of its own sample drawn
    /// uniformly; itself where its sample has one image.
    fn references(&self, picked: &[usize], rng: &mut impl Rng) -> Vec<u32> {
        let of = &self.all.sample_of;
        (picked.iter())
            .map(|&i| {
                let others: Vec<usize> = (0..of.len())
                    .filter(|&j| j != i && of[j] == of[i])
                    .collect();
                match others.is_empty() {
                    true => i as u32,
                    false => others[rng.random_range(0..others.len())] as u32,
                }
            })
            .collect()
    }

    /// The shapes of a step's noise for `per_step` images: the pixels, and the latents
    /// the VAE encodes them to.
    pub fn noise_sizes(&self, sd: &StableDiffusion, per_step: usize) -> Result<NoiseSizes> {
        let (_, c, h, w) = self.all.pixels.dims4()?;
        let pixels = [per_step, c, h, w];
        Ok(NoiseSizes {
            pixels,
            latents: sd.vae.latent_dims(&pixels),
        })
    }
}

/// Break-A-Scene's union sampling: k uniform in 1..=n_samples, a uniform k-subset of the
/// samples (partial Fisher-Yates), then one image of each, uniform among its images;
/// indices into `sample_of`, in sample order.
fn union_draw(sample_of: &[usize], n_samples: usize, rng: &mut impl Rng) -> Vec<usize> {
    let k = rng.random_range(1..=n_samples);
    let mut samples: Vec<usize> = (0..n_samples).collect();
    for i in 0..k {
        let j = rng.random_range(i..n_samples);
        samples.swap(i, j);
    }
    let mut chosen = samples[..k].to_vec();
    chosen.sort_unstable();
    (chosen.into_iter())
        .map(|s| {
            let images: Vec<usize> = (0..sample_of.len())
                .filter(|&i| sample_of[i] == s)
                .collect();
            images[rng.random_range(0..images.len())]
        })
        .collect()
}

/// `batch` followed by `k` class images, each drawn uniformly from `class`.
fn with_class_images(batch: Batch, class: &Batch, k: usize, rng: &mut impl Rng) -> Result<Batch> {
    let picked: Vec<u32> = (0..k)
        .map(|_| rng.random_range(0..class.len()) as u32)
        .collect();
    let idx = Tensor::from_vec(picked.clone(), k, class.pixels.device())?;
    let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, &b.index_select(&idx, 0)?], 0);
    let mut sample_of = batch.sample_of.clone();
    sample_of.extend(picked.iter().map(|&i| class.sample_of[i as usize]));
    let mut token_pos = batch.token_pos.clone();
    token_pos.extend(picked.iter().map(|&i| class.token_pos[i as usize]));
    Ok(Batch {
        pixels: cat(&batch.pixels, &class.pixels)?,
        masks: cat(&batch.masks, &class.masks)?,
        ids: cat(&batch.ids, &class.ids)?,
        ids_2: match (&batch.ids_2, &class.ids_2) {
            (Some(a), Some(b)) => Some(cat(a, b)?),
            _ => None,
        },
        token_pos,
        sample_of,
        n_samples: batch.n_samples,
        roi: batch.roi,
        prior: k,
        reference: None,
        posterior: None,
    })
}

/// Custom Diffusion's scale augmentation of each image ([`Rescale`]), and its prompt's
/// prefix, drawn per image in the source's order.
fn rescaled(
    pixels: &Tensor,
    masks: &Tensor,
    factor: usize,
    rng: &mut impl Rng,
) -> Result<(Tensor, Tensor, Vec<&'static str>)> {
    let size = pixels.dim(3)?;
    let (mut px, mut mk, mut prefixes) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..pixels.dim(0)? {
        let r = Rescale::draw(rng, size);
        let (p, m) = r.apply(&pixels.narrow(0, j, 1)?, &masks.narrow(0, j, 1)?, factor)?;
        px.push(p);
        mk.push(m);
        prefixes.push(r.prefix(rng));
    }
    Ok((Tensor::cat(&px, 0)?, Tensor::cat(&mk, 0)?, prefixes))
}

/// Prompts as a step's text encoders take them.
struct Tokens {
    ids: Tensor,
    ids_2: Option<Tensor>,
    token_pos: Vec<usize>,
}

/// The token ids `[b, 77]` of each (sample, prompt) (by each tokenizer, for SDXL), and
/// where each prompt holds its sample's pseudo-word.
fn prompt_ids(sd: &StableDiffusion, prompted: &[(usize, String)]) -> Result<Tokens> {
    let (mut ids, mut ids_2) = (Vec::new(), Vec::new());
    let mut token_pos = Vec::new();
    for (s, prompt) in prompted {
        if let Some((_, tok_2)) = &sd.text_encoder_2 {
            ids_2.extend(tok_2.encode(prompt)?);
        }
        let word = pseudo_word(*s);
        let prompt_ids = sd.tokenizer.encode(prompt)?;
        let word_id = sd.tokenizer.encode(&word)?[1];
        let pos = prompt_ids
            .iter()
            .position(|&i| i == word_id)
            .ok_or_else(|| Error::internal(format!("{word} missing from its prompt")))?;
        ids.extend(prompt_ids);
        token_pos.push(pos);
    }
    let b = prompted.len();
    let ids_2 = match &sd.text_encoder_2 {
        Some((_, tok_2)) => Some(Tensor::from_vec(ids_2, (b, tok_2.max_len()), &sd.device)?),
        None => None,
    };
    Ok(Tokens {
        ids: Tensor::from_vec(ids, (b, sd.tokenizer.max_len()), &sd.device)?,
        ids_2,
        token_pos,
    })
}

/// A step's noised latents: `z_t = add_noise(z0, eps, t)`, and the (augmented) masks at
/// pixel resolution. A CLiC step's latents, noise and timesteps hold each image's masked
/// copy after the images, with the same noise and timestep; its masks are the images'.
pub struct Noised {
    pub z_t: Tensor,
    pub eps: Tensor,
    /// What the U-Net is trained to predict: `eps`, or v under v-prediction.
    pub target: Tensor,
    pub timesteps: Vec<usize>,
    pub masks: Tensor,
    /// ViCo: each image's reference as a clean latent (a posterior sample, scaled).
    pub reference: Option<Tensor>,
}

impl Noised {
    /// The timesteps as the U-Net takes them, `[b]` f32 on `device`.
    pub fn timestep_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let ts: Vec<f32> = self.timesteps.iter().map(|&t| t as f32).collect();
        Ok(Tensor::from_vec(ts, self.timesteps.len(), device)?)
    }
}

/// Step `d`'s input as `draw` says: jitter and flip, DM-Deg outside the masks, VAE encode
/// (a posterior sample), then DDPM noise at a random timestep per image. Every draw comes
/// from the (seed, d) generators, so a resumed run draws the same. Also returns DM-Deg's
/// alpha_d.
pub fn noised_latents(
    sd: &StableDiffusion,
    batch: &Batch,
    cfg: &TrainConfig,
    draw: &Draw,
    d: usize,
    noise: StepNoise,
) -> Result<(Noised, f64)> {
    let dev = &sd.device;
    let [g, z_noise, eps] = noise.upload(dev)?;
    let (mut pixels, mut masks) = (batch.pixels.clone(), batch.masks.clone());
    let mut rng = step_rng(cfg.seed, d, Stream::Augment);
    if draw.jitter.iter().any(|&s| s > 0.0) {
        pixels = color_jitter(&pixels, &Jitter::draw(&mut rng, draw.jitter))?;
    }
    match draw.flip {
        Flip::Off => {}
        Flip::Batch => {
            if rng.random_bool(0.5) {
                pixels = flip_horizontal(&pixels)?;
                masks = flip_horizontal(&masks)?;
            }
        }
        Flip::PerImage => {
            let which: Vec<bool> = (0..batch.len()).map(|_| rng.random_bool(0.5)).collect();
            pixels = flip_some(&pixels, &which)?;
            masks = flip_some(&masks, &which)?;
        }
    }
    let (deg, total) = (draw.degradation, cfg.total_steps());
    let b = batch.len();
    let mut degraded = deg.apply(&pixels, &masks, &g.narrow(0, 0, b)?, d, total)?;
    if batch.roi.is_some() {
        // The masked copy: 0 (mid-grey) outside the mask.
        let masked = degraded.broadcast_mul(&masks.to_dtype(degraded.dtype())?)?;
        degraded = Tensor::cat(&[&degraded, &masked], 0)?;
    }
    let dist = match &batch.posterior {
        Some(cached) => cached.clone(),
        None => {
            if let Some(r) = &batch.reference {
                // Encoded with the images, each its own posterior noise; never degraded.
                degraded = Tensor::cat(&[&degraded, &r.to_dtype(degraded.dtype())?], 0)?;
            }
            sd.vae.encode(&degraded.to_dtype(cfg.dtype)?)?
        }
    };
    // A union draw trains on fewer images than the step's noise was drawn for: it takes
    // the first rows.
    let rows = dist.mean.dim(0)?;
    let (z_noise, eps) = match z_noise.dim(0)? > rows {
        true => (z_noise.narrow(0, 0, rows)?, eps.narrow(0, 0, rows)?),
        false => (z_noise, eps),
    };
    if dist.mean.dims() != z_noise.dims() {
        return Err(Error::internal(format!(
            "latents {:?} but posterior noise {:?}",
            dist.mean.dims(),
            z_noise.dims()
        )));
    }
    let mut z0 = (dist
        .sample_with(&z_noise.to_dtype(cfg.dtype)?)?
        .to_dtype(DType::F32)?
        * sd.vae.config.scaling_factor)?;
    let mut eps = eps;
    let reference = match &batch.reference {
        Some(_) => {
            let r = z0.narrow(0, b, b)?;
            (z0, eps) = (z0.narrow(0, 0, b)?, eps.narrow(0, 0, b)?);
            Some(r)
        }
        None => None,
    };
    let mut trng = step_rng(cfg.seed, d, Stream::Timesteps);
    let n_t = sd.schedule.num_train_timesteps();
    let mut timesteps: Vec<usize> = (0..b).map(|_| trng.random_range(0..n_t)).collect();
    if batch.roi.is_some() {
        timesteps.extend_from_within(..);
        let first = eps.narrow(0, 0, b)?;
        eps = Tensor::cat(&[&first, &first], 0)?;
    }
    let z_t = sd.schedule.add_noise(&z0, &eps, &timesteps)?;
    let target = sd.schedule.target(&z0, &eps, &timesteps)?;
    let noised = Noised {
        z_t,
        eps,
        target,
        timesteps,
        masks,
        reference,
    };
    Ok((noised, deg.alpha(d, total)))
}

/// The side of the cross-attention maps the attention loss reads: the U-Net level two
/// downsamplings below the latent (16 at 512 px). Each stride-2 convolution gives
/// ceil(n / 2), so odd latent sides work too.
pub fn attention_side(latent_side: usize) -> usize {
    latent_side.div_ceil(2).div_ceil(2)
}

/// The loss terms of one step, still in the graph.
pub struct StepLosses {
    pub per_image: Tensor,
    pub per_sample: Tensor,
    pub l_diff: Tensor,
    pub l_attn: Tensor,
    pub l_pres: Tensor,
    /// CLiC's region-of-interest loss.
    pub l_roi: Option<Tensor>,
    /// Prior preservation's loss on the class images.
    pub l_prior: Option<Tensor>,
    pub chosen: Option<usize>,
    pub loss: Tensor,
}

/// The U-Net weights of the online forward: adapters, and the tuned layers of a method
/// that fine-tunes whole matrices.
#[derive(Clone, Copy)]
pub struct Online<'a> {
    pub lora: &'a LoraSet,
    pub tuned: Option<&'a TunedSet>,
    /// ViCo's image cross-attention blocks.
    pub vico: Option<&'a crate::model::vico::Blocks>,
    /// A U-Net and text encoder over trained full weights, in place of the base's
    /// (Break-A-Scene's phase 2).
    pub full: Option<&'a Finetuned>,
}

/// The U-Net and text encoder(s) a full fine-tune's step runs, built over its weights.
pub struct Finetuned {
    pub unet: crate::model::unet::UNet,
    pub text_encoder: crate::model::clip::ClipTextModel,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<crate::model::clip::ClipTextModel>,
}

impl Finetuned {
    /// The models over `full`'s Vars, computing in `dtype`, passing gradients to them.
    pub fn over(full: &crate::model::full::FullWeights, dtype: DType) -> Result<Self> {
        Ok(Self {
            unet: full.unet(dtype, true)?,
            text_encoder: full.text_encoder(dtype, true)?,
            text_encoder_2: full.text_encoder_2(dtype, true)?,
        })
    }
}

impl<'a> Online<'a> {
    /// Adapters only.
    pub fn lora(lora: &'a LoraSet) -> Self {
        Self {
            lora,
            tuned: None,
            vico: None,
            full: None,
        }
    }
}

/// The trainable text-side parameters: the pseudo-word rows, a trainable
/// token-embedding table (released-script mode, a full fine-tune), and SDXL's rows (and a
/// full fine-tune's table) in its second text encoder.
#[derive(Clone, Copy)]
pub struct TextParams<'a> {
    pub rows: &'a Tensor,
    pub table: Option<&'a Tensor>,
    pub rows_2: Option<&'a Tensor>,
    pub table_2: Option<&'a Tensor>,
}

/// The step's text features from the base's text encoders or `full`'s, and SDXL's added
/// conditioning (the pooled projections, each image's sizes as its square training crop).
pub(super) fn text_conditioning(
    sd: &StableDiffusion,
    full: Option<&Finetuned>,
    (ids, ids_2): (&Tensor, Option<&Tensor>),
    text: TextParams,
    latent_side: usize,
) -> Result<(Tensor, Option<AddedCond>)> {
    let text_encoder = full.map_or(&sd.text_encoder, |f| &f.text_encoder);
    let Some(ids_2) = ids_2 else {
        let context = text_encoder.forward_with_table(ids, text.table, Some(text.rows))?;
        return Ok((context, None));
    };
    let base_2 = (sd.text_encoder_2.as_ref()).map(|(te, _)| te);
    let text_encoder_2 = (full.and_then(|f| f.text_encoder_2.as_ref()))
        .or(base_2)
        .ok_or_else(|| Error::internal("SDXL text features without a second encoder"))?;
    let (context, pooled) = sd.encode_sdxl_with(
        [(text_encoder, text.table), (text_encoder_2, text.table_2)],
        (ids, ids_2),
        (Some(text.rows), text.rows_2),
    )?;
    let side = latent_side * sd.vae_factor();
    Ok((context, Some(AddedCond::uncropped(pooled, (side, side))?)))
}

/// The objective of one step. Without `momentum` (warm-up, and the joint phase of the
/// `--no-ds-bal` ablation): mean masked diffusion loss + lambda_attn * L_attn. DS-Bal:
/// the largest per-sample loss + lambda_pres * L_pres (against the momentum adapters, no
/// graph) + lambda_attn * L_attn.
pub fn step_losses(
    sd: &StableDiffusion,
    batch: &Batch,
    noised: &Noised,
    online: Online,
    text: TextParams,
    momentum: Option<&LoraSet>,
    w: LossWeights,
) -> Result<StepLosses> {
    if let Some(clic) = w.clic {
        return super::clic::clic_losses(sd, batch, noised, online, text, clic);
    }
    if let (Some(weight), Some(blocks)) = (w.vico_reg, online.vico) {
        return super::vico::vico_losses(sd, batch, noised, text, blocks, weight);
    }
    let dev = &sd.device;
    let t = noised.timestep_tensor(dev)?;
    let latent_side = noised.z_t.dim(2)?;
    let mask_latent = resize_nearest(&noised.masks, latent_side)?;
    let attn_side = attention_side(latent_side);

    let unet = online.full.map_or(&sd.unet, |f| &f.unet);
    let (context, added) = text_conditioning(
        sd,
        online.full,
        (&batch.ids, batch.ids_2.as_ref()),
        text,
        latent_side,
    )?;
    let probe = AttnProbe::new(&[attn_side], &[BlockKind::Down, BlockKind::Up]);
    // The U-Net runs in the model's precision; losses are computed in f32.
    let z_t = noised.z_t.to_dtype(unet.dtype())?;
    // The maps cost a second QK^T and softmax per probed layer: only when their loss counts.
    let online_ctx = Ctx {
        lora: Some(online.lora),
        tuned: online.tuned,
        probe: (w.lambda_attn > 0.0).then_some(&probe),
        added: added.as_ref(),
        ..Ctx::default()
    };
    let pred = (unet.forward(&z_t, &t, &context, online_ctx)?).to_dtype(DType::F32)?;
    let per_image = masked_diffusion_per_image(&pred, &noised.target, &mask_latent)?;
    // Class images (prior preservation) are weighed apart; the rest is the pair's.
    let n = batch.instances();
    let l_prior = match batch.prior {
        0 => None,
        p => Some(per_image.narrow(0, n, p)?.mean_all()?),
    };
    let per_image = per_image.narrow(0, 0, n)?;
    let per_sample = per_sample_means(&per_image, &batch.sample_of[..n], batch.n_samples)?;
    let l_attn = if w.lambda_attn > 0.0 {
        // The reference images' maps: class images name no word.
        let maps = (probe.take().into_iter())
            .map(|(_, m)| m.narrow(0, 0, n)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mask_small = resize_nearest(&noised.masks.narrow(0, 0, n)?, attn_side)?;
        let mean = attention_loss(&maps, &batch.token_pos[..n], &mask_small)?;
        match w.attn_summed {
            true => (mean * n as f64)?,
            false => mean,
        }
    } else {
        Tensor::zeros((), DType::F32, dev)?
    };
    let (l_diff, l_pres, chosen) = match momentum {
        Some(mset) => {
            // The momentum U-Net's prediction is a target: no gradient through SDXL's
            // pooled projection either.
            let added = added.as_ref().map(AddedCond::detach);
            let momentum_ctx = Ctx {
                lora: Some(mset),
                // Only MagicTailor has momentum adapters, and it tunes no whole matrices.
                tuned: None,
                probe: None,
                added: added.as_ref(),
                ..Ctx::default()
            };
            let mpred = sd
                .unet
                .forward(&z_t, &t, &context.detach(), momentum_ctx)?
                .to_dtype(DType::F32)?;
            // Read after the momentum forward is queued, so the device does not idle
            // while the host waits for the online losses.
            let chosen = crate::profile::time(crate::profile::Kind::HostRead, dev, || {
                hardest_sample(&per_sample)
            })?;
            let l_pres = preserving_loss(
                &pred,
                &mpred,
                &mask_latent,
                &batch.sample_of,
                batch.n_samples,
                chosen,
            )?;
            (per_sample.get(chosen)?, l_pres, Some(chosen))
        }
        None => (
            per_image.mean_all()?,
            Tensor::zeros((), DType::F32, dev)?,
            None,
        ),
    };
    let mut loss = ((&l_diff + (&l_pres * w.lambda_pres)?)? + (&l_attn * w.lambda_attn)?)?;
    if let Some(l) = &l_prior {
        loss = (loss + (l * w.prior)?)?;
    }
    Ok(StepLosses {
        per_image,
        per_sample,
        l_diff,
        l_attn,
        l_pres,
        l_roi: None,
        l_prior,
        chosen,
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::union_draw;
    use crate::rng::{step_rng, Stream};

    /// Every non-empty subset of the samples comes up, about as often as the source's
    /// draw makes it (k uniform, then a uniform k-subset: {0}, {1} 1/4 each, {0, 1}
    /// 1/2); one image per chosen sample, in sample order, every image drawn.
    #[test]
    fn union_draws_subsets_as_the_source_and_one_image_per_sample() {
        let sample_of = [0, 0, 0, 1, 1];
        let mut subsets = std::collections::HashMap::new();
        let mut images = [0usize; 5];
        for d in 1..=4000 {
            let picked = union_draw(&sample_of, 2, &mut step_rng(7, d, Stream::Pick));
            let samples: Vec<usize> = picked.iter().map(|&i| sample_of[i]).collect();
            assert!(samples.windows(2).all(|w| w[0] < w[1]), "{samples:?}");
            *subsets.entry(samples).or_insert(0usize) += 1;
            picked.iter().for_each(|&i| images[i] += 1);
        }
        let share = |s: &[usize]| subsets[s] as f64 / 4000.0;
        assert!((share(&[0]) - 0.25).abs() < 0.03, "{subsets:?}");
        assert!((share(&[1]) - 0.25).abs() < 0.03, "{subsets:?}");
        assert!((share(&[0, 1]) - 0.5).abs() < 0.03, "{subsets:?}");
        assert!(images.iter().all(|&n| n > 500), "{images:?}");
        // A pure function of (seed, step): a resumed run draws the same.
        let again = |d| union_draw(&sample_of, 2, &mut step_rng(7, d, Stream::Pick));
        assert_eq!(again(5), again(5));
    }
}
