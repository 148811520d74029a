//! `magictailor infer`: prompt -> tokens -> text features -> DDIM with classifier-free
//! guidance -> VAE decode -> PNG.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;
use crate::model::lora::{read_safetensors, LoraSet};
use crate::model::nn::Ctx;
use crate::model::scheduler::Ddim;

pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const EMBEDS_FILE: &str = "learned_embeds.safetensors";
pub const RUN_FILE: &str = "magictailor.json";

#[derive(Debug, Clone)]
pub struct InferOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub num_images: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub out: PathBuf,
    /// A trained output folder (its magictailor.json names the base model).
    pub model_dir: PathBuf,
    /// A base model instead of a trained folder.
    pub model: Option<String>,
    pub lora: Option<PathBuf>,
    pub embeds: Option<PathBuf>,
    pub init_latents: Option<PathBuf>,
    pub device: Device,
    /// Precision of the model weights (sampling math stays f32).
    pub dtype: DType,
    pub progress: bool,
}

/// A model ready to sample: base weights, optional adapters, added pseudo-words.
pub struct Personalized {
    pub sd: StableDiffusion,
    pub lora: Option<LoraSet>,
    /// Embedding rows of the pseudo-words, `[k, hidden]`, in tokenizer order.
    pub extra_rows: Option<Tensor>,
}

impl Personalized {
    pub fn load(
        model: &str,
        lora: Option<&Path>,
        embeds: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut sd = StableDiffusion::load(model, device, dtype)?;
        let lora = match lora {
            Some(f) => Some(LoraSet::load(f, &sd.unet.lora_targets(), device)?),
            None => None,
        };
        let extra_rows = match embeds {
            Some(f) => {
                let list = crate::embeds::load(f, sd.text_encoder.config.hidden_size, device)?;
                let words: Vec<String> = list.iter().map(|(w, _)| w.clone()).collect();
                sd.tokenizer.add_pseudo_words(&words)?;
                let rows: Vec<Tensor> = list.into_iter().map(|(_, v)| v).collect();
                Some(Tensor::stack(&rows, 0)?)
            }
            None => None,
        };
        Ok(Self {
            sd,
            lora,
            extra_rows,
        })
    }

    /// Text features `[n, tokens, hidden]` for each prompt.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.sd.tokenizer.encode(p)?);
        }
        let ids = Tensor::from_vec(
            ids,
            (prompts.len(), self.sd.tokenizer.max_len()),
            &self.sd.device,
        )?;
        Ok(self
            .sd
            .text_encoder
            .forward(&ids, self.extra_rows.as_ref())?)
    }

    /// Refuses `<...>` words the model does not know, listing the ones it does.
    pub fn check_prompt(&self, prompt: &str) -> Result<()> {
        let unknown = self.sd.tokenizer.unknown_pseudo_words(prompt);
        if unknown.is_empty() {
            return Ok(());
        }
        let known = self.sd.tokenizer.pseudo_words();
        let known = if known.is_empty() {
            "none (no embeddings were loaded)".to_string()
        } else {
            known.join(", ")
        };
        Err(Error::usage(format!(
            "the prompt uses {} which this model does not know. Known pseudo-words: {known}.",
            unknown.join(", ")
        )))
    }
}

/// Where the weights come from: `--model` (+ `--lora`/`--embeds`) or a trained folder.
fn model_sources(opts: &InferOptions) -> Result<(String, Option<PathBuf>, Option<PathBuf>)> {
    if let Some(model) = &opts.model {
        return Ok((model.clone(), opts.lora.clone(), opts.embeds.clone()));
    }
    let dir = &opts.model_dir;
    let run = dir.join(RUN_FILE);
    if !run.is_file() {
        return Err(Error::usage(format!(
            "{} does not exist: {} is not a trained magictailor folder. Train one with `magictailor train`, \
             point --model-dir at one, or sample a base model with --model (plus --lora/--embeds files).",
            run.display(),
            dir.display()
        )));
    }
    let v: serde_json::Value = crate::model::config::read_json(&run)?;
    let base = v
        .get("base_model")
        .and_then(|b| b.as_str())
        .ok_or_else(|| Error::BadConfig {
            path: run.clone(),
            msg: "no \"base_model\" entry".into(),
        })?;
    let file = |name: &str, flag: &Option<PathBuf>| {
        flag.clone()
            .or_else(|| Some(dir.join(name)).filter(|p| p.is_file()))
    };
    Ok((
        base.to_string(),
        file(LORA_FILE, &opts.lora),
        file(EMBEDS_FILE, &opts.embeds),
    ))
}

pub fn run(opts: &InferOptions) -> Result<Vec<PathBuf>> {
    let (model, lora, embeds) = model_sources(opts)?;
    let p = Personalized::load(
        &model,
        lora.as_deref(),
        embeds.as_deref(),
        &opts.device,
        opts.dtype,
    )?;
    p.check_prompt(&opts.prompt)?;
    p.check_prompt(&opts.negative_prompt)?;
    let latents = initial_latents(&p, opts)?;
    let latents = sample(
        &p,
        &opts.prompt,
        &opts.negative_prompt,
        latents,
        opts.steps,
        opts.guidance,
        opts.progress,
    )?;
    let images = decode(&p, &latents)?;
    save_pngs(&images, &opts.out)
}

fn latent_shape(p: &Personalized, opts: &InferOptions) -> Result<(usize, usize, usize, usize)> {
    let f = p.sd.vae_factor();
    for (name, v) in [("--width", opts.width), ("--height", opts.height)] {
        if v == 0 || v % f != 0 {
            return Err(Error::usage(format!(
                "{name} {v} is not a positive multiple of {f}, the VAE's downscale factor: try {}.",
                (v / f).max(1) * f
            )));
        }
    }
    Ok((
        opts.num_images,
        p.sd.unet.config.in_channels,
        opts.height / f,
        opts.width / f,
    ))
}

/// Seeded Gaussian latents, or the `latents` tensor of `--init-latents`.
fn initial_latents(p: &Personalized, opts: &InferOptions) -> Result<Tensor> {
    let shape = latent_shape(p, opts)?;
    let Some(file) = &opts.init_latents else {
        return seeded_normal(opts.seed, shape, &opts.device);
    };
    let tensors = read_safetensors(file, &opts.device)?;
    let t = tensors.get("latents").ok_or_else(|| {
        Error::usage(format!(
            "{} has no tensor named \"latents\" (it has: {:?}).",
            file.display(),
            tensors.keys().collect::<Vec<_>>()
        ))
    })?;
    let want = [shape.0, shape.1, shape.2, shape.3];
    if t.dims() != want {
        return Err(Error::usage(format!(
            "{}: latents have shape {:?}, but --num-images {} at {}x{} needs {want:?} (images, latent channels, \
             height / {f}, width / {f}).",
            file.display(),
            t.dims(),
            opts.num_images,
            opts.width,
            opts.height,
            f = p.sd.vae_factor()
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Standard normal noise from a seeded generator: the same seed gives the same bytes on
/// every platform and device (candle's CPU RNG cannot be seeded).
pub fn seeded_normal(
    seed: u64,
    shape: impl Into<candle_core::Shape>,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// DDIM from `latents` with classifier-free guidance (skipped when `guidance <= 1`).
pub fn sample(
    p: &Personalized,
    prompt: &str,
    negative: &str,
    latents: Tensor,
    steps: usize,
    guidance: f64,
    progress: bool,
) -> Result<Tensor> {
    let n = latents.dim(0)?;
    let cfg = guidance > 1.0;
    let mut prompts: Vec<&str> = Vec::with_capacity(2 * n);
    if cfg {
        prompts.extend(std::iter::repeat_n(negative, n));
    }
    prompts.extend(std::iter::repeat_n(prompt, n));
    let context = p.encode_prompts(&prompts)?;
    let ddim =
        Ddim::new(&p.sd.schedule, steps).map_err(|e| Error::usage(format!("--steps: {e}")))?;
    let bar = progress_bar(steps, progress);
    let ctx = Ctx {
        lora: p.lora.as_ref(),
        probe: None,
    };
    let mut x = latents;
    for &t in ddim.timesteps() {
        let input = if cfg {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let ts = Tensor::from_vec(vec![t as f32; input.dim(0)?], input.dim(0)?, &p.sd.device)?;
        let eps =
            p.sd.unet
                .forward(&input.to_dtype(p.sd.dtype)?, &ts, &context, ctx)?
                .to_dtype(DType::F32)?;
        let eps = if cfg {
            let (uncond, cond) = (eps.narrow(0, 0, n)?, eps.narrow(0, n, n)?);
            (&uncond + ((cond - &uncond)? * guidance)?)?
        } else {
            eps
        };
        x = ddim.step(&eps, t, &x)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(x)
}

/// Latents -> `[n, 3, H, W]` u8 pixels, rounded as diffusers' `numpy_to_pil`.
pub fn decode(p: &Personalized, latents: &Tensor) -> Result<Tensor> {
    let z = (latents / p.sd.vae.config.scaling_factor)?;
    let x =
        p.sd.vae
            .decode(&z.to_dtype(p.sd.dtype)?)?
            .to_dtype(DType::F32)?;
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok((x * 255.0)?.round()?.to_dtype(DType::U8)?)
}

fn progress_bar(steps: usize, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "denoising {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Numbered files (`name-0.png`, ...) when there are several images.
pub fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "result".into());
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

fn save_pngs(images: &Tensor, out: &Path) -> Result<Vec<PathBuf>> {
    let (n, _, h, w) = images.dims4()?;
    let paths = output_paths(out, n);
    for (i, path) in paths.iter().enumerate() {
        let hwc = images
            .get(i)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let img = image::RgbImage::from_raw(w as u32, h as u32, hwc)
            .ok_or_else(|| Error::model("image buffer size mismatch"))?;
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::model(format!("encoding {}: {e}", path.display())))?;
        crate::fsutil::write_atomic(path, &bytes)?;
    }
    Ok(paths)
}
