//! `magictailor infer`: prompt -> tokens -> text features -> DDIM with classifier-free
//! guidance -> VAE decode -> PNG.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::io::{run, tensors};
use crate::model::loader::StableDiffusion;
use crate::model::lora::LoraSet;
use crate::rng::seeded_normal;

pub mod many;
pub mod provenance;
mod sampling;
pub use sampling::{decode, denoise, progress_bar, sample, to_images, Conditioning, Weights};

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
    /// A checkpoint of `model_dir`'s run to sample instead of its final weights:
    /// `step-N`, `N`, or a checkpoint file.
    pub checkpoint: Option<String>,
    pub device: Device,
    /// Precision of the model weights (sampling math stays f32).
    pub dtype: DType,
    pub progress: bool,
    /// Layout-and-Retouch's step blend: the first K DDIM steps with the base model on the
    /// prompt with class words in place of the pseudo-words. 0: off.
    pub layout_steps: usize,
    /// Many prompts x seeds instead of `prompt` (`--prompts-file`).
    pub many: Option<many::Many>,
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
    /// Pseudo-word -> class word, from a trained folder's record (for `--layout-steps`).
    pub class_words: std::collections::BTreeMap<String, String>,
    /// A training checkpoint holding the adapters and pseudo-word rows (in place of
    /// `lora` and `embeds`), and the adapters' `alpha / rank`.
    pub checkpoint: Option<(PathBuf, f64)>,
}

/// A model ready to sample: base weights, optional adapters, added pseudo-words.
pub struct Personalized {
    pub sd: StableDiffusion,
    pub lora: Option<LoraSet>,
    /// Embedding rows of the pseudo-words, `[k, hidden]`, in tokenizer order.
    pub extra_rows: Option<Tensor>,
    /// Replaces the text encoder's token table (`--released-script` runs).
    pub token_table: Option<Tensor>,
    /// Pseudo-word -> class word, when known (a trained folder).
    pub class_words: std::collections::BTreeMap<String, String>,
}

impl Personalized {
    pub fn load(src: &Sources, device: &Device, dtype: DType) -> Result<Self> {
        let mut sd = StableDiffusion::load(&src.model, device, dtype)?;
        if let Some((file, scale)) = &src.checkpoint {
            return from_checkpoint(sd, file, *scale, src, device);
        }
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
            class_words: src.class_words.clone(),
        })
    }

    /// `prompt` with each pseudo-word replaced by its class word ("<v0> with <v1>" ->
    /// "person with hair"): what the base model draws in a step blend's layout stage.
    pub fn class_prompt(&self, prompt: &str) -> Result<String> {
        let mut out = prompt.to_string();
        for word in crate::model::tokenizer::pseudo_words_in(prompt) {
            let class = self.class_words.get(&word).ok_or_else(|| {
                Error::usage(format!(
                    "--layout-steps needs the class word of {word}, which a trained folder's \
                     magictailor.json records: use --model-dir."
                ))
            })?;
            out = out.replace(&word, class);
        }
        Ok(out)
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

/// The weights a training checkpoint holds, as a trained folder's files would give them.
fn from_checkpoint(
    mut sd: StableDiffusion,
    file: &Path,
    scale: f64,
    src: &Sources,
    device: &Device,
) -> Result<Personalized> {
    let mut t = crate::io::checkpoint::load(file, device)?;
    let mut take = |name: &str| {
        t.remove(name).ok_or_else(|| {
            Error::bad_file(
                file,
                format!("the checkpoint {} lacks {name}.", file.display()),
            )
        })
    };
    let mut lora = LoraSet::default();
    for target in sd.unet.lora_targets() {
        let (a, b) = (
            take(&format!("lora.{}.A", target.path))?,
            take(&format!("lora.{}.B", target.path))?,
        );
        lora.insert(
            target.path.clone(),
            crate::model::lora::LoraWeights { a, b, scale },
        );
    }
    let rows = take("rows")?;
    let words: Vec<String> = (0..rows.dim(0)?)
        .map(crate::model::tokenizer::pseudo_word)
        .collect();
    sd.tokenizer.add_pseudo_words(&words)?;
    let token_table = take("table").ok();
    Ok(Personalized {
        sd,
        lora: Some(lora),
        extra_rows: Some(rows),
        token_table,
        class_words: src.class_words.clone(),
    })
}

/// A trained table must have the base table's shape: same vocabulary, same width.
fn load_token_table(file: &Path, base: &Tensor, device: &Device) -> Result<Tensor> {
    let t = tensors::read_floats(file, device, &[])?
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
            if opts.checkpoint.is_some() {
                return Err(Error::usage(
                    "--checkpoint samples a checkpoint of a run: pass the run with --model-dir.",
                ));
            }
            return Ok(Sources {
                model: model.clone(),
                lora: opts.lora.clone(),
                embeds: opts.embeds.clone(),
                token_table: None,
                class_words: Default::default(),
                checkpoint: None,
            });
        }
        (None, None) => PathBuf::from(run::DEFAULT_DIR),
    };
    if let Some(which) = &opts.checkpoint {
        return checkpoint_sources(&dir, which, opts);
    }
    let folder = run::open(&dir)?;
    Ok(Sources {
        model: opts.model.clone().unwrap_or(folder.record.base_model),
        lora: opts.lora.clone().or(folder.lora),
        embeds: opts.embeds.clone().or(folder.embeds),
        token_table: folder.token_table,
        class_words: folder.record.tokens,
        checkpoint: None,
    })
}

/// A checkpoint of the run in `dir` (finished or not): its file, and from the settings it
/// records, the base model and the adapters' scale.
fn checkpoint_sources(dir: &Path, which: &str, opts: &InferOptions) -> Result<Sources> {
    if opts.lora.is_some() || opts.embeds.is_some() {
        return Err(Error::usage(
            "--checkpoint brings its own adapters and pseudo-words: drop --lora and --embeds.",
        ));
    }
    let step = which.trim_start_matches("step-").parse::<usize>().ok();
    let file = match step {
        Some(s) => crate::io::checkpoint::file(dir, s),
        None => PathBuf::from(which),
    };
    if !file.is_file() {
        let have = crate::io::checkpoint::steps(dir).unwrap_or_default();
        return Err(Error::usage(format!(
            "--checkpoint {which}: {} does not exist; the run in {} has checkpoints at steps {}.",
            file.display(),
            dir.display(),
            if have.is_empty() {
                "(none)".into()
            } else {
                format!("{have:?}")
            }
        )));
    }
    let settings = tensors::metadata(&file, crate::train::segments::METADATA_KEY)?;
    let settings: serde_json::Value = settings
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| {
            Error::bad_file(
                &file,
                format!(
                    "{} records no settings (a checkpoint of an older version): sample the \
                     finished run instead.",
                    file.display()
                ),
            )
        })?;
    let rank = settings["lora_rank"].as_f64().unwrap_or(1.0).max(1.0);
    let alpha = settings["lora_alpha"].as_f64().unwrap_or(rank);
    let model = match (&opts.model, settings["model"].as_str()) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m.to_string(),
        (None, None) => {
            return Err(Error::bad_file(
                &file,
                format!("{}: no base model recorded.", file.display()),
            ))
        }
    };
    let class_words = run::open(dir).map(|f| f.record.tokens).unwrap_or_default();
    Ok(Sources {
        model,
        lora: None,
        embeds: None,
        token_table: None,
        class_words,
        checkpoint: Some((file, alpha / rank)),
    })
}

/// SD's schedulers train on 1000 timesteps; DDIM cannot take more steps than that.
const MAX_STEPS: usize = 1000;

/// Refuses sampling values that cannot work, naming the valid range; `infer` and `eval`
/// call it before any model loads.
pub fn check_sampling(guidance: f64, steps: usize, layout_steps: usize) -> Result<()> {
    if !(guidance.is_finite() && guidance >= 0.0) {
        return Err(Error::usage(format!(
            "--guidance {guidance}: expected a number >= 0 (1 or less turns guidance off; the usual is 7.5)."
        )));
    }
    if !(1..=MAX_STEPS).contains(&steps) {
        return Err(Error::usage(format!(
            "--steps {steps}: expected 1 to {MAX_STEPS} (the scheduler's training timesteps; 50 is usual)."
        )));
    }
    if layout_steps > steps {
        return Err(Error::usage(format!(
            "--layout-steps {layout_steps} is more than --steps {steps}."
        )));
    }
    Ok(())
}

/// Refuses values that cannot sample, before any model loads, naming the valid range.
fn check_values(opts: &InferOptions) -> Result<()> {
    check_sampling(opts.guidance, opts.steps, opts.layout_steps)?;
    let ext = (opts.out.extension()).map(|e| e.to_string_lossy().to_lowercase());
    if opts.many.is_none() && ext.as_deref() != Some("png") {
        return Err(Error::usage(format!(
            "--out {}: magictailor writes PNG images (lossless, with their prompt and seed \
             inside); name the file .png.",
            opts.out.display()
        )));
    }
    Ok(())
}

pub fn run(opts: &InferOptions) -> Result<Vec<PathBuf>> {
    check_values(opts)?;
    let src = sources(opts)?;
    let p = Personalized::load(&src, &opts.device, opts.dtype)?;
    let w = p.weights();
    w.check_prompt(&opts.negative_prompt)?;
    if let Some(m) = &opts.many {
        return many::run(&p, opts, m, &src);
    }
    w.check_prompt(&opts.prompt)?;
    let latents = initial_latents(&p, opts)?;
    let bar = progress_bar(opts.steps as u64, "denoising", opts.progress);
    let latents = generate(
        &p,
        &opts.prompt,
        &opts.negative_prompt,
        latents,
        opts,
        || bar.inc(1),
    )?;
    bar.finish();
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::io::leftovers::remove_orphans(dir, crate::io::leftovers::Scope::Folder);
    }
    let provenance = |i: usize| provenance::Provenance {
        prompt: &opts.prompt,
        seed: opts.seed + i as u64,
        opts,
        model: &src.model,
        lora: src.lora.as_deref(),
        embeds: src.embeds.as_deref(),
    };
    save_pngs(&decode(w, &latents)?, &opts.out, provenance)
}

/// DDIM from `latents`: with `opts.layout_steps` K > 0, the first K steps run the base
/// model on the class-word prompt, the rest the personalized model on `prompt`.
pub fn generate(
    p: &Personalized,
    prompt: &str,
    negative: &str,
    latents: Tensor,
    opts: &InferOptions,
    on_step: impl FnMut(),
) -> Result<Tensor> {
    let (main, layout) = conditions(p, prompt, negative, opts)?;
    denoise_with(&main, &layout, latents, opts.steps, on_step)
}

/// What one prompt is denoised with: the personalized conditioning, and with
/// `--layout-steps` K > 0 the base model's on the class-word prompt for the first K steps.
/// Built once per prompt, whatever the number of batches.
pub fn conditions<'a>(
    p: &'a Personalized,
    prompt: &str,
    negative: &str,
    opts: &InferOptions,
) -> Result<(Conditioning<'a>, Option<(Conditioning<'a>, usize)>)> {
    let w = p.weights();
    let main = w.condition(prompt, negative, opts.guidance)?;
    let layout = match opts.layout_steps {
        0 => None,
        k => {
            let (base_prompt, base_negative) = (p.class_prompt(prompt)?, p.class_prompt(negative)?);
            Some((
                w.base()
                    .condition(&base_prompt, &base_negative, opts.guidance)?,
                k,
            ))
        }
    };
    Ok((main, layout))
}

/// [`denoise`] with what [`conditions`] built.
pub fn denoise_with(
    main: &Conditioning,
    layout: &Option<(Conditioning, usize)>,
    latents: Tensor,
    steps: usize,
    on_step: impl FnMut(),
) -> Result<Tensor> {
    let layout = layout.as_ref().map(|(c, k)| (c, *k));
    denoise(main, layout, latents, steps, on_step)
}

/// One image's latent shape `(channels, height / f, width / f)`.
fn latent_shape(p: &Personalized, opts: &InferOptions) -> Result<(usize, usize, usize)> {
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
        p.sd.unet.config.in_channels,
        opts.height / f,
        opts.width / f,
    ))
}

/// Seeded Gaussian latents, or the `latents` tensor of `--init-latents`.
fn initial_latents(p: &Personalized, opts: &InferOptions) -> Result<Tensor> {
    let (c, h, w) = latent_shape(p, opts)?;
    let shape = (opts.num_images, c, h, w);
    let Some(file) = &opts.init_latents else {
        // Image i has seed + i, so each can be drawn again alone (`--seed`).
        let noise = (0..opts.num_images as u64)
            .map(|i| seeded_normal(opts.seed + i, (1, c, h, w), &opts.device))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&noise, 0)?);
    };
    let tensors = tensors::read_floats(file, &opts.device, &[])?;
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

/// Writes image `i` of `images` with what made it (`provenance(i)`) in its PNG.
fn save_pngs<'a>(
    images: &Tensor,
    out: &Path,
    provenance: impl Fn(usize) -> provenance::Provenance<'a>,
) -> Result<Vec<PathBuf>> {
    let images = to_images(images)?;
    let paths = output_paths(out, images.len());
    for (i, (img, path)) in images.iter().zip(&paths).enumerate() {
        let png = crate::preview::png_with_text(img, &provenance(i).chunks())?;
        crate::io::write_atomic(path, &png)?;
    }
    Ok(paths)
}
