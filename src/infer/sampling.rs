//! Generation, top to bottom: a prompt's conditioning, DDIM with classifier-free
//! guidance over borrowed weights (and Layout-and-Retouch's step blend, stage 1: the
//! first K steps with the base model on the class-word prompt), VAE decode, pixels.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::loader::{self, StableDiffusion};
use crate::model::lora::LoraSet;
use crate::model::nn::{AddedCond, Ctx};
use crate::model::scheduler::{Ddim, DdimInverse};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::tuned::TunedSet;
use crate::model::vico::Plug;
use crate::rng::seeded_normal;

use super::weights::Personalized;

/// How every image of a command is denoised, whatever its prompt and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    /// Layout-and-Retouch's step blend: the first K DDIM steps with the base model on the
    /// prompt with class words in place of the pseudo-words. 0: off.
    pub layout_steps: usize,
    /// Layout-and-Retouch's second stage on the layout image (None: off).
    pub retouch: Option<super::retouch::Retouch>,
}

impl Default for Sampling {
    /// Stable Diffusion 2.1-base's usual: 50 DDIM steps, guidance 7.5, 512 px.
    fn default() -> Self {
        Self {
            negative_prompt: String::new(),
            steps: 50,
            guidance: 7.5,
            width: 512,
            height: 512,
            layout_steps: 0,
            retouch: None,
        }
    }
}

/// SD's schedulers train on 1000 timesteps; DDIM cannot take more steps than that.
const MAX_STEPS: usize = 1000;

impl Sampling {
    /// Refuses values that cannot sample, naming the valid range; `infer` and `eval` call
    /// it before any model loads.
    pub fn check(&self) -> Result<()> {
        let d = Self::default();
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(Error::usage(format!(
                "--guidance {}: expected a number >= 0 (1 or less turns guidance off; the usual is {}).",
                self.guidance, d.guidance
            )));
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(Error::usage(format!(
                "--steps {}: expected 1 to {MAX_STEPS} (the scheduler's training timesteps; {} is usual).",
                self.steps, d.steps
            )));
        }
        if self.layout_steps > self.steps {
            return Err(Error::usage(format!(
                "--layout-steps {} is more than --steps {}.",
                self.layout_steps, self.steps
            )));
        }
        match &self.retouch {
            Some(r) => r.check(self.steps, (self.width, self.height)),
            None => Ok(()),
        }
    }

    /// One image's latent shape `(channels, height / f, width / f)` on `sd`.
    pub fn latent_shape(&self, sd: &StableDiffusion) -> Result<(usize, usize, usize)> {
        let f = sd.vae_factor();
        loader::check_side("--width", self.width, f, f)?;
        loader::check_side("--height", self.height, f, f)?;
        Ok((sd.unet.config.in_channels, self.height / f, self.width / f))
    }
}

/// Gaussian latents `[n, c, h, w]`, image i from `seeds[i]` alone, so that each can be
/// drawn again by itself whatever it was batched with.
pub fn seeded_latents(
    seeds: &[u64],
    (c, h, w): (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let noise = (seeds.iter())
        .map(|&s| seeded_normal(s, (1, c, h, w), device))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&noise, 0)?)
}

/// One prompt ready to denoise any number of latents: the personalized conditioning and,
/// with a step blend of K > 0, the base model's on the class-word prompt for the first K
/// steps. Built once per prompt, whatever the number of batches.
pub struct Prompted<'a> {
    main: Conditioning<'a>,
    layout: Option<(Conditioning<'a>, usize)>,
    steps: usize,
    retouch: Option<super::retouch::Prompt<'a>>,
}

/// What one batch of a prompt drew: the images and, when retouched, the layout images
/// and each image's last blend mask (latent-sized, row-major, `mask_size` = `(h, w)`).
pub struct Drawn {
    pub images: Vec<image::RgbImage>,
    pub layouts: Option<Vec<image::RgbImage>>,
    pub masks: Option<Vec<Vec<f32>>>,
    pub mask_size: (usize, usize),
}

impl<'a> Prompted<'a> {
    pub fn new(p: &'a Personalized, prompt: &str, s: &Sampling) -> Result<Self> {
        let w = p.weights();
        let main = w.condition(prompt, &s.negative_prompt, s.guidance)?;
        let layout = match s.layout_steps {
            0 => None,
            k => {
                let base_prompt = p.class_prompt(prompt)?;
                let base_negative = p.class_prompt(&s.negative_prompt)?;
                let base = w
                    .base()
                    .condition(&base_prompt, &base_negative, s.guidance)?;
                Some((base, k))
            }
        };
        let retouch = match &s.retouch {
            Some(r) => Some(super::retouch::Prompt::new(p, prompt, r)?),
            None => None,
        };
        Ok(Self {
            main,
            layout,
            steps: s.steps,
            retouch,
        })
    }

    /// Model steps per image batch (for progress): stage 1's, and with the retouch stage
    /// the layout's inversion and the retouch (a reference's inversion, once per command,
    /// is not counted).
    pub fn total_steps(&self) -> usize {
        self.steps * (1 + 2 * self.retouch.is_some() as usize)
    }

    /// The denoised latents, decoded to images; then, with the retouch stage, those
    /// images (the layouts) retouched. `on_step` runs after every step.
    pub fn draw(&self, latents: Tensor, mut on_step: impl FnMut()) -> Result<Drawn> {
        let layout = self.layout.as_ref().map(|(c, k)| (c, *k));
        let (_, _, h, w) = latents.dims4()?;
        let x = denoise(&self.main, layout, latents, self.steps, &mut on_step)?;
        let pixels = decode(self.main.weights, &x)?;
        let Some(r) = &self.retouch else {
            return Ok(Drawn {
                images: to_images(&pixels)?,
                layouts: None,
                masks: None,
                mask_size: (h, w),
            });
        };
        let done = r.retouch(&self.main, &x, &pixels, self.steps, on_step)?;
        Ok(Drawn {
            images: to_images(&decode(self.main.weights, &done.latents)?)?,
            layouts: Some(to_images(&pixels)?),
            masks: done.masks,
            mask_size: (h, w),
        })
    }
}

/// What sampling reads, borrowed: a base model and the personalization on top. Training
/// samples its current adapters through the same view without a second model.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub sd: &'a StableDiffusion,
    pub lora: Option<&'a LoraSet>,
    /// Whole matrices in place of base weights (Custom Diffusion).
    pub tuned: Option<&'a TunedSet>,
    /// Embedding rows of the pseudo-words, `[k, hidden]`, in tokenizer order.
    pub extra_rows: Option<&'a Tensor>,
    /// The same pseudo-words' rows in SDXL's second text encoder, `[k, hidden_2]`.
    pub extra_rows_2: Option<&'a Tensor>,
    /// A trained token table in place of the text encoder's (released-script runs), and
    /// SDXL's second encoder's.
    pub token_table: Option<&'a Tensor>,
    pub token_table_2: Option<&'a Tensor>,
    /// ViCo's blocks and reference images.
    pub vico: Option<&'a super::vico::Visual>,
}

impl<'a> Weights<'a> {
    /// `sd` alone: no adapters, no pseudo-words.
    pub fn plain(sd: &'a StableDiffusion) -> Self {
        Weights {
            sd,
            lora: None,
            tuned: None,
            extra_rows: None,
            extra_rows_2: None,
            token_table: None,
            token_table_2: None,
            vico: None,
        }
    }

    /// The frozen base model alone: no adapters, no pseudo-words.
    pub fn base(&self) -> Weights<'a> {
        Self::plain(self.sd)
    }

    /// Text features `[n, tokens, hidden]` for each prompt.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        Ok(self.encode_text(prompts)?.0)
    }

    /// Text features `[n, tokens, hidden]` for each prompt, and SDXL's pooled projection
    /// `[n, pooled]`: its two encoders' penultimate states side by side, as diffusers'
    /// `encode_prompt`.
    pub fn encode_text(&self, prompts: &[&str]) -> Result<(Tensor, Option<Tensor>)> {
        let ids = |tok: &ClipTokenizer| -> Result<Tensor> {
            let mut ids = Vec::new();
            for p in prompts {
                ids.extend(tok.encode(p)?);
            }
            Ok(Tensor::from_vec(
                ids,
                (prompts.len(), tok.max_len()),
                &self.sd.device,
            )?)
        };
        let te = &self.sd.text_encoder;
        let ids_1 = ids(&self.sd.tokenizer)?;
        let Some((te_2, tok_2)) = &self.sd.text_encoder_2 else {
            let hidden = te.forward_with_table(&ids_1, self.token_table, self.extra_rows)?;
            return Ok((hidden, None));
        };
        if self.extra_rows.is_some() != self.extra_rows_2.is_some() {
            return Err(Error::usage(
                "pseudo-words on SDXL need a row in each text encoder (an SDXL embedding's \
                 clip_l and clip_g).",
            ));
        }
        if self.token_table.is_some() != self.token_table_2.is_some() {
            return Err(Error::internal(
                "an SDXL token table without the other encoder's",
            ));
        }
        let ids_2 = ids(tok_2)?;
        let (hidden, pooled) = self.sd.encode_sdxl_with(
            [(te, self.token_table), (te_2, self.token_table_2)],
            (&ids_1, &ids_2),
            (self.extra_rows, self.extra_rows_2),
        )?;
        Ok((hidden, Some(pooled)))
    }

    /// Refuses `<...>` words the model does not know, listing the ones it does.
    pub fn check_prompt(&self, prompt: &str) -> Result<()> {
        let unknown = self.sd.tokenizer.unknown_pseudo_words(prompt);
        if unknown.is_empty() {
            if let Some(warning) = self.sd.tokenizer.check_length(prompt, "the prompt")? {
                crate::io::console::note(format_args!("warning: {warning}"));
            }
            return Ok(());
        }
        let known = self.sd.tokenizer.pseudo_words();
        let known = if known.is_empty() {
            "none (no embeddings were loaded)".to_string()
        } else {
            known.join(", ")
        };
        Err(Error::usage(format!(
            "the prompt {prompt:?} uses {} which this model does not know. Known pseudo-words: \
             {known}.",
            unknown.join(", ")
        )))
    }

    /// A prompt's text features, encoded once for any number of images.
    pub fn condition(
        &self,
        prompt: &str,
        negative: &str,
        guidance: f64,
    ) -> Result<Conditioning<'a>> {
        let (cond, pooled) = self.encode_text(&[prompt])?;
        // SDXL conditions an empty negative prompt on zeros (`force_zeros_for_empty_prompt`).
        let zeros =
            self.sd.is_sdxl() && negative.is_empty() && self.sd.force_zeros_for_empty_prompt;
        let uncond = match guidance > 1.0 {
            false => None,
            true if zeros => Some((
                cond.zeros_like()?,
                pooled.as_ref().map(Tensor::zeros_like).transpose()?,
            )),
            true => Some(self.encode_text(&[negative])?),
        };
        let (uncond, uncond_pooled) = match uncond {
            Some((u, p)) => (Some(u), p),
            None => (None, None),
        };
        let visual = match self.vico {
            Some(v) => Some(v.rows(
                self.sd,
                (prompt, (&cond, pooled.as_ref())),
                (uncond.as_ref()).map(|u| (negative, (u, uncond_pooled.as_ref()))),
            )?),
            None => None,
        };
        Ok(Conditioning {
            weights: *self,
            cond,
            uncond,
            pooled,
            uncond_pooled,
            guidance,
            visual,
        })
    }
}

/// Weights with one prompt's features `[1, tokens, hidden]` (and the negative prompt's
/// when guidance is on).
pub struct Conditioning<'a> {
    pub weights: Weights<'a>,
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    /// SDXL's pooled projections of the prompt and the negative prompt `[1, pooled]`.
    pub pooled: Option<Tensor>,
    pub uncond_pooled: Option<Tensor>,
    pub guidance: f64,
    /// ViCo: the references this prompt sees.
    visual: Option<super::vico::VisualRows>,
}

/// What every U-Net call of one denoising reads besides the latents: the text context and
/// SDXL's added conditioning, built once per denoising, not per step.
struct StepInputs {
    context: Tensor,
    added: Option<AddedCond>,
    /// ViCo: the references' call at each step.
    visual: Option<super::vico::ReferencePass>,
}

impl Conditioning<'_> {
    /// The step inputs for latents `x: [n, c, h, w]`.
    fn inputs(&self, x: &Tensor) -> Result<StepInputs> {
        let visual = match (&self.visual, self.weights.vico) {
            (Some(rows), Some(v)) => Some(v.step_rows(self.weights.sd, rows, x)?),
            _ => None,
        };
        Ok(StepInputs {
            context: self.context(x.dim(0)?)?,
            added: self.added(x)?,
            visual,
        })
    }

    /// The U-Net's context for `n` images: `[uncond x n, cond x n]` with guidance, else
    /// `[cond x n]`.
    pub(super) fn context(&self, n: usize) -> Result<Tensor> {
        let repeat = |c: &Tensor| c.repeat((n, 1, 1));
        Ok(match &self.uncond {
            Some(u) => Tensor::cat(&[repeat(u)?, repeat(&self.cond)?], 0)?,
            None => repeat(&self.cond)?,
        })
    }

    /// SDXL's added conditioning for latents `x: [n, c, h, w]`, in [`Self::context`]'s
    /// order: the pooled projections, and the sizes as the SDXL pipeline gives them by
    /// default (original = target = the image's, no crop).
    pub(super) fn added(&self, x: &Tensor) -> Result<Option<AddedCond>> {
        let Some(pooled) = &self.pooled else {
            return Ok(None);
        };
        let n = x.dim(0)?;
        let f = self.weights.sd.vae_factor();
        let text_embeds = match &self.uncond_pooled {
            Some(u) => Tensor::cat(&[u.repeat((n, 1))?, pooled.repeat((n, 1))?], 0)?,
            None if self.uncond.is_some() => {
                return Err(Error::internal("SDXL guidance without a pooled negative"))
            }
            None => pooled.repeat((n, 1))?,
        };
        let size = (x.dim(2)? * f, x.dim(3)? * f);
        Ok(Some(AddedCond::uncropped(text_embeds, size)?))
    }

    /// One guided noise prediction for latents `x: [n, ...]` at timestep `t`, with
    /// `inputs` from [`Self::inputs`].
    fn eps(&self, x: &Tensor, t: usize, inputs: &StepInputs) -> Result<Tensor> {
        let w = &self.weights;
        let n = x.dim(0)?;
        let input = match self.uncond {
            Some(_) => Tensor::cat(&[x, x], 0)?,
            None => x.clone(),
        };
        let b = input.dim(0)?;
        let timesteps = |rows: usize| Tensor::from_vec(vec![t as f32; rows], rows, &w.sd.device);
        let plug = match (&inputs.visual, w.vico) {
            (Some(pass), Some(v)) => {
                // The references' pass, once for the whole batch; its tokens feed the blocks.
                let plug = Plug::new(&v.blocks, pass.routing.clone());
                let ctx = Ctx {
                    lora: w.lora,
                    tuned: w.tuned,
                    vico: Some(&plug),
                    added: pass.added.as_ref(),
                    ..Ctx::default()
                };
                let refs = &pass.latents;
                (w.sd.unet).forward(refs, &timesteps(refs.dim(0)?)?, &pass.context, ctx)?;
                plug.start_drawing()?;
                Some(plug)
            }
            _ => None,
        };
        let ctx = Ctx {
            lora: w.lora,
            tuned: w.tuned,
            probe: None,
            added: inputs.added.as_ref(),
            vico: plug.as_ref(),
            swap: None,
        };
        let input = input.to_dtype(w.sd.dtype)?;
        let eps = (w.sd.unet)
            .forward(&input, &timesteps(b)?, &inputs.context, ctx)?
            .to_dtype(DType::F32)?;
        if self.uncond.is_none() {
            return Ok(eps);
        }
        let (uncond, cond) = (eps.narrow(0, 0, n)?, eps.narrow(0, n, n)?);
        Ok((&uncond + ((cond - &uncond)? * self.guidance)?)?)
    }
}

/// DDIM over `steps` from `latents`: the first `layout.1` steps with `layout.0` (the base
/// model on the class prompt), the rest with `main`. `on_step` runs after every step.
pub fn denoise(
    main: &Conditioning,
    layout: Option<(&Conditioning, usize)>,
    latents: Tensor,
    steps: usize,
    mut on_step: impl FnMut(),
) -> Result<Tensor> {
    let sd = main.weights.sd;
    let ddim = Ddim::new(&sd.schedule, steps).map_err(|e| Error::usage(format!("--steps: {e}")))?;
    let main_inputs = main.inputs(&latents)?;
    let layout = match layout {
        Some((base, k)) => Some((base, base.inputs(&latents)?, k)),
        None => None,
    };
    let mut x = latents;
    for (i, &t) in ddim.timesteps().iter().enumerate() {
        let _p = crate::profile::scope(crate::profile::Kind::DenoiseStep, &sd.device);
        let eps = match &layout {
            Some((base, inputs, k)) if i < *k => base.eps(&x, t, inputs)?,
            _ => main.eps(&x, t, &main_inputs)?,
        };
        x = ddim.step(&eps, t, &x)?;
        on_step();
    }
    Ok(x)
}

/// DDIM inversion of clean `latents` over `steps` (diffusers' `DDIMInverseScheduler`):
/// the noised latents that DDIM sampling with `cond` over as many steps starts from to
/// draw them again (approximately: each step reads the model one timestep ahead).
/// Layout-and-Retouch starts its layout and reference paths from such latents.
pub fn invert(cond: &Conditioning, latents: Tensor, steps: usize) -> Result<Tensor> {
    (invert_path(cond, latents, steps, || {})?.pop())
        .ok_or_else(|| Error::usage("--steps: DDIM inversion needs at least one step"))
}

/// [`invert`]'s latent at each of its timesteps (ascending), the noisiest last; `on_step`
/// runs after every step.
pub fn invert_path(
    cond: &Conditioning,
    latents: Tensor,
    steps: usize,
    mut on_step: impl FnMut(),
) -> Result<Vec<Tensor>> {
    let sd = cond.weights.sd;
    let inverse =
        DdimInverse::new(&sd.schedule, steps).map_err(|e| Error::usage(format!("--steps: {e}")))?;
    let inputs = cond.inputs(&latents)?;
    let mut x = latents;
    let mut path = Vec::with_capacity(steps);
    for &t in inverse.timesteps() {
        x = inverse.step(&cond.eps(&x, t, &inputs)?, t, &x)?;
        path.push(x.clone());
        on_step();
    }
    Ok(path)
}

/// DDIM from `latents` with classifier-free guidance (skipped when `guidance <= 1`).
pub fn sample(
    w: Weights,
    prompt: &str,
    negative: &str,
    latents: Tensor,
    steps: usize,
    guidance: f64,
    progress: bool,
) -> Result<Tensor> {
    let bar = denoising_ticker(steps, progress);
    let c = w.condition(prompt, negative, guidance)?;
    let x = denoise(&c, None, latents, steps, || bar.inc(1))?;
    bar.finish();
    Ok(x)
}

/// Latents -> `[n, 3, H, W]` u8 pixels, rounded as diffusers' `numpy_to_pil`.
pub fn decode(w: Weights, latents: &Tensor) -> Result<Tensor> {
    ensure_finite(latents, "the denoised latents", w.sd.dtype)?;
    let z = (latents / w.sd.vae.config.scaling_factor)?;
    // The VAE casts to its own precision (f32 for SDXL's under f16).
    let x = w.sd.vae.decode(&z)?.to_dtype(DType::F32)?;
    ensure_finite(&x, "the decoded images", w.sd.dtype)?;
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok((x * 255.0)?.round()?.to_dtype(DType::U8)?)
}

/// `[n, 3, H, W]` u8 pixels (as `decode` gives them) -> images.
pub fn to_images(pixels: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, _, h, w) = pixels.dims4()?;
    (0..n)
        .map(|i| {
            let hwc = pixels.get(i)?.permute((1, 2, 0))?.flatten_all()?;
            let raw = hwc.to_device(&Device::Cpu)?.to_vec1::<u8>()?;
            image::RgbImage::from_raw(w as u32, h as u32, raw)
                .ok_or_else(|| Error::internal("image buffer size mismatch"))
        })
        .collect()
}

/// Refuses NaN or infinity before it becomes a black or grey PNG.
fn ensure_finite(t: &Tensor, what: &str, dtype: DType) -> Result<()> {
    // x * 0 is 0 for every finite x and NaN for NaN and both infinities.
    let probe = (t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if probe.is_finite() {
        return Ok(());
    }
    let likely = if dtype == DType::F16 {
        "f16 overflowing in this model: try --dtype f32 (or bf16 on CUDA)"
    } else {
        "adapters or embeddings from a diverged training run: retrain with a lower learning rate"
    };
    Err(Error::Diverged(format!(
        "{what} hold NaN or infinite values, so no image was written. The likely cause is {likely}."
    )))
}

/// Denoising progress over `steps`, when `show`: off a terminal, a line per 10 steps at
/// most.
pub(super) fn denoising_ticker(steps: usize, show: bool) -> crate::io::ticker::Ticker {
    crate::io::progress::ticker("denoising", steps as u64, 0, 10, show)
}
