//! `magictailor infer`: prompt -> tokens -> text features -> DDIM with classifier-free
//! guidance -> VAE decode -> PNG.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::io::{run, tensors};
use crate::model::loader::StableDiffusion;
use crate::model::lora::LoraSet;
use crate::model::nn::Ctx;
use crate::model::scheduler::Ddim;
use crate::rng::seeded_normal;

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
    /// A trained output folder (its magictailor.json names the base model). With
    /// neither this nor `model`, the default output folder of `train`.
    pub model_dir: Option<PathBuf>,
    /// The base model: alone, sample it (plus `lora`/`embeds`); with `model_dir`, use it
    /// instead of the one the folder names (it moved) with the folder's adapters.
    pub model: Option<String>,
    pub lora: Option<PathBuf>,
    pub embeds: Option<PathBuf>,
    pub init_latents: Option<PathBuf>,
    pub device: Device,
    /// Precision of the model weights (sampling math stays f32).
    pub dtype: DType,
    pub progress: bool,
}

/// Where a personalized model's weights come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Hub id, local diffusers folder, or `tiny-random`.
    pub model: String,
    pub lora: Option<PathBuf>,
    pub embeds: Option<PathBuf>,
    /// The whole trained token-embedding table (`--released-script` runs).
    pub token_table: Option<PathBuf>,
}

/// A model ready to sample: base weights, optional adapters, added pseudo-words.
pub struct Personalized {
    pub sd: StableDiffusion,
    pub lora: Option<LoraSet>,
    /// Embedding rows of the pseudo-words, `[k, hidden]`, in tokenizer order.
    pub extra_rows: Option<Tensor>,
    /// Replaces the text encoder's token table (`--released-script` runs).
    pub token_table: Option<Tensor>,
}

impl Personalized {
    pub fn load(src: &Sources, device: &Device, dtype: DType) -> Result<Self> {
        let mut sd = StableDiffusion::load(&src.model, device, dtype)?;
        let lora = match &src.lora {
            Some(f) => Some(LoraSet::load(f, &sd.unet.lora_targets(), device)?),
            None => None,
        };
        let token_table = match &src.token_table {
            Some(f) => Some(load_token_table(f, sd.text_encoder.token_table(), device)?),
            None => None,
        };
        let extra_rows = match &src.embeds {
            Some(f) => {
                let hidden = sd.text_encoder.config.hidden_size;
                let list = crate::io::embeds::load(f, hidden, device)?;
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
            token_table,
        })
    }

    pub fn weights(&self) -> Weights<'_> {
        Weights {
            sd: &self.sd,
            lora: self.lora.as_ref(),
            extra_rows: self.extra_rows.as_ref(),
            token_table: self.token_table.as_ref(),
        }
    }
}

/// What sampling reads, borrowed: a base model and the personalization on top. Training
/// samples its current adapters through the same view without a second model.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub sd: &'a StableDiffusion,
    pub lora: Option<&'a LoraSet>,
    /// Embedding rows of the pseudo-words, `[k, hidden]`, in tokenizer order.
    pub extra_rows: Option<&'a Tensor>,
    pub token_table: Option<&'a Tensor>,
}

impl Weights<'_> {
    /// Text features `[n, tokens, hidden]` for each prompt.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let tok = &self.sd.tokenizer;
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(tok.encode(p)?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), tok.max_len()), &self.sd.device)?;
        let te = &self.sd.text_encoder;
        Ok(te.forward_with_table(&ids, self.token_table, self.extra_rows)?)
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
            "the prompt {prompt:?} uses {} which this model does not know. Known pseudo-words: \
             {known}.",
            unknown.join(", ")
        )))
    }
}

/// A trained table must have the base table's shape: same vocabulary, same width.
fn load_token_table(file: &Path, base: &Tensor, device: &Device) -> Result<Tensor> {
    let t = tensors::read(file, device)?
        .remove(run::TOKEN_TABLE_KEY)
        .ok_or_else(|| {
            Error::bad_file(
                file,
                format!(
                    "{} has no tensor {:?}.",
                    file.display(),
                    run::TOKEN_TABLE_KEY
                ),
            )
        })?;
    if t.dims() != base.dims() {
        return Err(Error::mismatch(
            file,
            format!(
                "{}: the token table is {:?} but this text encoder's is {:?} (trained on another base \
                 model?).",
                file.display(),
                t.dims(),
                base.dims()
            ),
        ));
    }
    Ok(t.to_dtype(base.dtype())?)
}

/// Where the weights come from: a trained folder (whose base model `--model` may
/// replace), or `--model` alone; `--lora`/`--embeds` override the folder's files.
fn sources(opts: &InferOptions) -> Result<Sources> {
    let dir = match (&opts.model_dir, &opts.model) {
        (Some(dir), _) => dir.clone(),
        (None, Some(model)) => {
            return Ok(Sources {
                model: model.clone(),
                lora: opts.lora.clone(),
                embeds: opts.embeds.clone(),
                token_table: None,
            })
        }
        (None, None) => PathBuf::from(run::DEFAULT_DIR),
    };
    let folder = run::open(&dir)?;
    Ok(Sources {
        model: opts.model.clone().unwrap_or(folder.record.base_model),
        lora: opts.lora.clone().or(folder.lora),
        embeds: opts.embeds.clone().or(folder.embeds),
        token_table: folder.token_table,
    })
}

pub fn run(opts: &InferOptions) -> Result<Vec<PathBuf>> {
    let p = Personalized::load(&sources(opts)?, &opts.device, opts.dtype)?;
    let w = p.weights();
    w.check_prompt(&opts.prompt)?;
    w.check_prompt(&opts.negative_prompt)?;
    let latents = initial_latents(&p, opts)?;
    let latents = sample(
        w,
        &opts.prompt,
        &opts.negative_prompt,
        latents,
        opts.steps,
        opts.guidance,
        opts.progress,
    )?;
    ensure_finite(&latents, "the denoised latents", opts.dtype)?;
    let images = decode(w, &latents)?;
    save_pngs(&images, &opts.out)
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
    let tensors = tensors::read(file, &opts.device)?;
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

/// DDIM from `latents` with classifier-free guidance (skipped when `guidance <= 1`).
pub fn sample(
    p: Weights,
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
        lora: p.lora,
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
pub fn decode(p: Weights, latents: &Tensor) -> Result<Tensor> {
    let z = (latents / p.sd.vae.config.scaling_factor)?;
    let x =
        p.sd.vae
            .decode(&z.to_dtype(p.sd.dtype)?)?
            .to_dtype(DType::F32)?;
    ensure_finite(&x, "the decoded images", p.sd.dtype)?;
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
    let images = to_images(images)?;
    let paths = output_paths(out, images.len());
    for (img, path) in images.iter().zip(&paths) {
        crate::io::write_atomic(path, &crate::preview::png_bytes(img)?)?;
    }
    Ok(paths)
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
