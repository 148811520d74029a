//! Prior preservation (DreamBooth, Custom Diffusion with `--prior-preservation`;
//! Break-A-Scene unless `--no-prior-preservation`): class images the base model draws
//! once per class prompt ("a photo of {class}" per sample, or Break-A-Scene's one "a photo
//! at the beach"; DDIM, seed = the image's index), kept in the class folder and reused by
//! resumes and by other runs that share the folder, then handed to the pool, which draws
//! them into every step.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::method::ClassImages;
use super::objective::Batch;
use super::trainer::Trainer;
use crate::data::load_rgb;
use crate::error::{Error, Result};
use crate::infer::{decode, sample, to_images, Weights};
use crate::io::png::png_bytes;
use crate::io::progress::Progress;
use crate::io::{console, write_atomic};

/// DDIM steps and guidance of a class image (diffusers' pipeline defaults, which the
/// scripts' class-image generation uses).
pub const STEPS: usize = 50;
pub const GUIDANCE: f64 = 7.5;

/// What a class folder's images were drawn with; a folder drawn otherwise is refused.
const INFO: &str = "class_images.json";

/// Draws the class images the run lacks and puts them all in the pool; nothing without
/// `--prior-preservation`. Runs after the run folder is claimed: it writes.
pub fn prepare(t: &mut Trainer, progress: Progress) -> Result<()> {
    let Some(c) = t.recipe.class_images.clone() else {
        return Ok(());
    };
    let mut files = Vec::new();
    for (s, prompt) in prompts(t, &c) {
        let dir = class_folder(&c.dir, &prompt);
        record_info(&dir, &info(t, &prompt))?;
        let missing: Vec<usize> = (0..c.count)
            .filter(|&k| !image(&dir, k).is_file())
            .collect();
        draw(t, &prompt, &dir, &missing, progress)?;
        files.extend((0..c.count).map(|k| (s, prompt.clone(), image(&dir, k))));
    }
    t.pool.class = Some(load(t, &files)?);
    t.pool.class_per_step = c.per_step;
    Ok(())
}

/// Each class prompt with the sample its images stand beside: one per sample, or one
/// for the run (beside sample 0; no per-sample statistic reads class images).
fn prompts(t: &Trainer, c: &ClassImages) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (s, class) in t.class_words.iter().enumerate() {
        let prompt = c.prompt.text(class);
        if !out.iter().any(|(_, p)| *p == prompt) {
            out.push((s, prompt));
        }
    }
    out
}

/// Refuses, before anything is written, class folders drawn otherwise than this run
/// would draw them.
pub fn check(t: &Trainer) -> Result<()> {
    let Some(c) = &t.recipe.class_images else {
        return Ok(());
    };
    for (_, prompt) in prompts(t, c) {
        let dir = class_folder(&c.dir, &prompt);
        let file = dir.join(INFO);
        if !file.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&file).map_err(|e| Error::read(&file, e))?;
        let have: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::BadConfig {
                path: file.clone(),
                msg: e.to_string(),
            })?;
        let want = info(t, &prompt);
        if have != want {
            return Err(Error::usage(format!(
                "{} holds class images drawn otherwise ({have}) than this run would draw them \
                 ({want}). Give this run its own --class-dir.",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The folder of a class prompt's images: named by its class word ("a photo of {class}",
/// as before there were other prompts), or by the whole prompt.
fn class_folder(dir: &Path, prompt: &str) -> PathBuf {
    let name = prompt.strip_prefix("a photo of ").unwrap_or(prompt);
    dir.join(name.replace(['/', '\\'], "_"))
}

fn image(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("{k:04}.png"))
}

/// The settings that shape a class image.
fn info(t: &Trainer, prompt: &str) -> serde_json::Value {
    let mut info = serde_json::json!({
        "base_model": t.sd.source,
        "prompt": prompt,
        "resolution": t.cfg.resolution,
        "dtype": t.cfg.dtype.as_str(),
        "sampler": "DDIM, eta 0",
        "steps": STEPS,
        "guidance": GUIDANCE,
        "seed": "the image's index",
    });
    // A single-file base is described by its configs and prediction type too.
    if t.cfg.single_file != Default::default() {
        info["single_file"] = serde_json::json!(t.cfg.single_file.absolute());
    }
    info
}

/// Records how `dir`'s images are drawn ([`check`] has compared an existing record).
fn record_info(dir: &Path, want: &serde_json::Value) -> Result<()> {
    let file = dir.join(INFO);
    if file.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(crate::error::IoOp::CreateDir, dir, e))?;
    let text = serde_json::to_string_pretty(want)
        .map_err(|e| Error::internal(format!("serializing {INFO}: {e}")))?;
    write_atomic(&file, text.as_bytes())
}

/// Draws image `k` of `missing` with the base model alone.
fn draw(
    t: &Trainer,
    prompt: &str,
    dir: &Path,
    missing: &[usize],
    progress: Progress,
) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if progress != Progress::Quiet {
        console::note(format_args!(
            "drawing {} class image(s) of {prompt:?} into {} (prior preservation)",
            missing.len(),
            dir.display()
        ));
    }
    let w = Weights::plain(&t.sd);
    let latent = t.cfg.resolution / t.sd.vae_factor();
    let shape = (1, t.sd.unet.config.in_channels, latent, latent);
    let bar = progress.ticker("class image", missing.len() as u64, 0, 1);
    for &k in missing {
        let noise = crate::rng::seeded_normal(k as u64, shape, &t.sd.device)?;
        let x = sample(w, prompt, "", noise, STEPS, GUIDANCE, false)?;
        let img = to_images(&decode(w, &x)?)?
            .pop()
            .ok_or_else(|| Error::internal("no class image decoded"))?;
        write_atomic(&image(dir, k), &png_bytes(&img)?)?;
        bar.inc(1);
    }
    bar.finish();
    Ok(())
}

/// The class images as a batch: whole-image masks, each with its prompt.
fn load(t: &Trainer, files: &[(usize, String, PathBuf)]) -> Result<Batch> {
    let (sd, res) = (&t.sd, t.cfg.resolution);
    let (mut pixels, mut ids, mut ids_2) = (Vec::new(), Vec::new(), Vec::new());
    for (_, prompt, file) in files {
        pixels.push(load_rgb(file, res, &sd.device)?);
        ids.extend(sd.tokenizer.encode(prompt)?);
        if let Some((_, tok_2)) = &sd.text_encoder_2 {
            ids_2.extend(tok_2.encode(prompt)?);
        }
    }
    let n = files.len();
    Ok(Batch {
        pixels: Tensor::stack(&pixels, 0)?,
        masks: Tensor::ones((n, 1, res, res), DType::F32, &sd.device)?,
        ids: Tensor::from_vec(ids, (n, sd.tokenizer.max_len()), &sd.device)?,
        ids_2: match &sd.text_encoder_2 {
            Some((_, tok_2)) => Some(Tensor::from_vec(ids_2, (n, tok_2.max_len()), &sd.device)?),
            None => None,
        },
        // No pseudo-word in a class prompt (and no attention loss reads it).
        token_pos: vec![0; n],
        sample_of: files.iter().map(|(s, _, _)| *s).collect(),
        n_samples: t.class_words.len(),
        roi: None,
        prior: 0,
        reference: None,
        posterior: None,
    })
}
