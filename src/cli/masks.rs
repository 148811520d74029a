//! `magictailor masks`: masks for a pair folder from the base model's cross-attention.

use std::path::PathBuf;

use clap::Args;
use magictailor::infer::prompts;
use magictailor::io::console;
use magictailor::masks::{AttentionOptions, MasksOptions};
use magictailor::profile;
use magictailor::train::TrainConfig;

use super::{print_profile, Compute};

/// The default timesteps as the flag takes them.
fn timesteps_spec() -> String {
    let t = AttentionOptions::default().timesteps;
    prompts::list_spec(&t.into_iter().map(|t| t as u64).collect::<Vec<_>>())
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(super) enum Refine {
    /// Segment Anything, prompted with the attention mask's box and strongest points.
    Sam,
}

#[derive(Args)]
pub(super) struct MasksArgs {
    /// The pair folder, e.g. person_k+hair_c; class words come from its name.
    #[arg(long)]
    instance_dir: PathBuf,
    /// Where to write the masks [default: INSTANCE_DIR/masks].
    #[arg(long = "out-dir", alias = "out")]
    out: Option<PathBuf>,
    /// Replace masks that already exist.
    #[arg(long, conflicts_with = "missing")]
    overwrite: bool,
    /// Make only the masks the folder lacks; the others stay as they are.
    #[arg(long)]
    missing: bool,
    /// The Stable Diffusion model whose attention is read (folder, hub id or single-file
    /// checkpoint).
    #[arg(long, default_value_t = TrainConfig::default().model)]
    model: String,
    #[command(flatten)]
    single_file: super::SingleFileArgs,
    /// The square each image is cropped to, as `train --resolution` [default: the
    /// model's own size, as train's].
    #[arg(long)]
    resolution: Option<usize>,
    /// Diffusion timesteps whose attention is averaged: a list like 200,400,600 or 100..110.
    #[arg(long, default_value_t = timesteps_spec())]
    timesteps: String,
    /// Seed of the fixed noise.
    #[arg(long, default_value_t = AttentionOptions::default().seed)]
    seed: u64,
    /// Refine the attention masks with a segmentation model.
    #[arg(long, value_enum)]
    refine: Option<Refine>,
    /// SAM weights in candle's layout: a .safetensors file, a folder, a hub id, or
    /// owner/repo/file.safetensors (MobileSAM: lmz/candle-sam/mobile_sam-tiny-vitt.safetensors).
    #[arg(long, requires = "refine", default_value = magictailor::masks::sam::DEFAULT_MODEL)]
    sam_model: String,
    #[command(flatten)]
    compute: Compute,
    /// One JSON line per mask on stdout.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

pub(super) fn masks_cmd(a: MasksArgs) -> magictailor::Result<()> {
    let timesteps = prompts::parse_list(&a.timesteps, "--timesteps")?;
    let single_file = a.single_file.options();
    magictailor::model::loader::check_single_file_options(&a.model, &single_file)?;
    let resolution = match a.resolution {
        Some(r) => r,
        None => {
            // A missing or misnamed pair folder is said before the model is read.
            magictailor::data::class_words(&a.instance_dir)?;
            magictailor::model::loader::native_side(&a.model, &single_file)?
        }
    };
    let opts = MasksOptions {
        instance_dir: a.instance_dir,
        out: a.out,
        single_file,
        model: a.model,
        attention: AttentionOptions {
            resolution,
            timesteps: timesteps.into_iter().map(|t| t as usize).collect(),
            seed: a.seed,
        },
        sam_model: a.refine.map(|Refine::Sam| a.sam_model),
        overwrite: a.overwrite,
        missing: a.missing,
        device: a.compute.device()?,
        dtype: a.compute.dtype.dtype(),
        progress: !a.quiet && !a.json,
    };
    let prof = profile::Run::start();
    let (written, preview) = magictailor::masks::make_masks(&opts)?;
    let prof = print_profile(prof);
    if a.json {
        for w in &written {
            console::line(serde_json::to_string(w).unwrap_or_default());
        }
        if let Some(p) = prof {
            console::line(serde_json::json!({ "profile": p }));
        }
    } else if written.is_empty() {
        if !a.quiet {
            console::note("no mask is missing: nothing to make");
        }
    } else if !a.quiet {
        for w in &written {
            console::line(w.mask.display());
        }
        console::note(format_args!(
            "check every mask at a glance in {}",
            preview.display()
        ));
    }
    Ok(())
}
