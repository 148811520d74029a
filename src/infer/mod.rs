//! `magictailor infer`: prompt -> tokens -> text features -> DDIM with classifier-free
//! guidance -> VAE decode -> PNG, for one prompt ([`One`]) or a prompts file x seeds
//! ([`many::Many`]).
//!
//! `weights` finds and loads what is sampled, `sampling` generates, `one` and `many`
//! draw and write. May import `model`, `io`, `preview` and `rng`; `train` and `eval`
//! sample through it.

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

pub mod many;
pub mod one;
pub mod prompts;
pub mod provenance;
pub mod references;
pub mod retouch;
mod sampling;
pub mod vico;
mod weights;
pub use sampling::{
    decode, denoise, invert, invert_path, sample, seeded_latents, to_images, Conditioning, Drawn,
    Prompted, Sampling, Weights,
};
pub use weights::{Personalized, Sources};

/// Where `infer`'s images go unless told otherwise.
pub const DEFAULT_OUT_DIR: &str = "outputs/inference";

#[derive(Debug, Clone)]
pub struct InferOptions {
    pub sampling: Sampling,
    /// A trained output folder (its magictailor.json names the base model). With
    /// neither this nor `model`, the default output folder of `train`.
    pub model_dir: Option<PathBuf>,
    /// The base model: alone, sample it (plus `lora`/`embeds`); with `model_dir`, use it
    /// instead of the one the folder names (it moved) with the folder's adapters.
    pub model: Option<String>,
    /// What a single-file `model` needs beside its weights.
    pub single_file: crate::model::loader::SingleFileOptions,
    pub lora: Option<PathBuf>,
    pub embeds: Option<PathBuf>,
    /// Custom Diffusion's tuned matrices.
    pub custom_diffusion: Option<PathBuf>,
    /// A full fine-tune's changes to the base weights (Break-A-Scene's).
    pub full_delta: Option<PathBuf>,
    /// ViCo's image cross-attention blocks (a trained ViCo folder's by default).
    pub vico_blocks: Option<PathBuf>,
    /// ViCo's reference image per pseudo-word, in order (by default the trained folder's
    /// first image of each sample).
    pub references: Vec<PathBuf>,
    /// A checkpoint of `model_dir`'s run to sample instead of its final weights:
    /// `step-N`, `N`, or a checkpoint file.
    pub checkpoint: Option<String>,
    pub device: Device,
    /// Precision of the model weights (sampling math stays f32).
    pub dtype: DType,
    pub progress: bool,
    pub mode: Mode,
    /// With `--retouch`: each image's blend mask beside it (`name-mask.png`).
    pub save_masks: bool,
}

/// What is drawn: one prompt, or every prompt of a file with every seed.
#[derive(Debug, Clone)]
pub enum Mode {
    One(One),
    Many(many::Many),
}

/// One prompt, `num_images` images from seeds `seed..seed + num_images`.
#[derive(Debug, Clone)]
pub struct One {
    pub prompt: String,
    pub num_images: usize,
    pub seed: u64,
    /// The PNG; with several images, numbered (`result-0.png`, ...).
    pub out: PathBuf,
    /// Start from these latents (safetensors tensor `latents`) instead of seeded noise.
    pub init_latents: Option<PathBuf>,
}

impl Default for One {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            num_images: 1,
            seed: 0,
            out: PathBuf::from(DEFAULT_OUT_DIR).join("result.png"),
            init_latents: None,
        }
    }
}

/// The image side of the base model `opts` samples, from its configs alone: its U-Net's
/// `sample_size` times the VAE's factor (diffusers' pipelines' default size).
pub fn native_side(opts: &InferOptions) -> Result<usize> {
    let src = weights::sources(opts)?;
    crate::model::loader::native_side(&src.model, &src.single_file)
}

/// What is refused before anything is read: the sampling values and the output name.
pub fn check(opts: &InferOptions) -> Result<()> {
    opts.sampling.check()?;
    let blends =
        (opts.sampling.retouch.as_ref()).is_some_and(|r| r.blend_from < opts.sampling.steps);
    if opts.save_masks && !blends {
        return Err(Error::usage(
            "--save-masks writes each image's blend mask, and nothing is blended (--no-blend, or \
             --blend-from at --steps): drop --save-masks, or blend earlier.",
        ));
    }
    if let Mode::One(one) = &opts.mode {
        one::check_out(one)?;
    }
    Ok(())
}

/// Draws what `opts.mode` asks for; returns the image files.
pub fn infer(opts: &InferOptions) -> Result<Vec<PathBuf>> {
    check(opts)?;
    let src = weights::sources(opts)?;
    if opts.sampling.retouch.is_some() {
        let prompts: Vec<&str> = match &opts.mode {
            Mode::One(one) => vec![one.prompt.as_str()],
            Mode::Many(m) => m.prompts.iter().map(String::as_str).collect(),
        };
        retouch::check_prompts(prompts, &src.references)?;
    }
    let mut p = Personalized::load(&src, &opts.device, opts.dtype)?;
    // The record names the second-encoder file that was read, wherever it was found.
    let src = weights::Sources {
        embeds_2: p.embeds_2.clone(),
        ..src
    };
    p.weights().check_prompt(&opts.sampling.negative_prompt)?;
    if let Some(r) = &opts.sampling.retouch {
        p.retouch = Some(retouch::stage(
            &p,
            &src,
            r,
            opts.sampling.steps,
            &opts.device,
        )?);
    }
    match &opts.mode {
        Mode::One(one) => one::draw(&p, opts, one, &src),
        Mode::Many(m) => many::draw(&p, opts, m, &src),
    }
}
