//! `magictailor eval`: the paper's evaluation of a trained folder.

use std::path::PathBuf;

use clap::Args;
use magictailor::eval::{segment, EvalOptions};
use magictailor::infer::{prompts, Sampling};
use magictailor::io::console;
use magictailor::profile;

use super::{print_profile, Compute};

/// The protocol's defaults (the library's, with the CPU standing in for the device).
fn d() -> EvalOptions {
    EvalOptions::new(candle_core::Device::Cpu)
}

fn s() -> Sampling {
    Sampling::default()
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Segment {
    /// Each class word's cross-attention in the base model, as `masks` makes masks.
    Attention,
    /// Score whole generated images.
    None,
}

#[derive(Args)]
pub(super) struct EvalArgs {
    /// The trained folder (its magictailor.json names the base model and class words).
    #[arg(long, default_value_os_t = d().model_dir)]
    model_dir: PathBuf,
    /// The pair folder with the reference images (and masks/) [default: the one the run
    /// was trained on, from magictailor.json].
    #[arg(long)]
    instance_dir: Option<PathBuf>,
    /// One prompt per line, `{}` for --placeholder; `# group: NAME` lines group them
    /// [default: the paper's, built in (assets/eval_prompts.txt)].
    #[arg(long = "prompts-file", alias = "prompts")]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = d().placeholder)]
    placeholder: String,
    /// Seeds, as `infer --seeds`: a list like 0..31 (the paper's 32) or 0,4,7.
    #[arg(long, default_value_t = prompts::list_spec(&d().seeds))]
    seeds: String,
    /// Layout-and-Retouch's step blend (as `infer --layout-steps`); each K has its own folder.
    #[arg(long, default_value_t = s().layout_steps)]
    layout_steps: usize,
    /// Layout-and-Retouch's retouch stage (as `infer --retouch`), references from the pair
    /// folder; its images go to their own folder (eval/kK-retouch).
    #[command(flatten)]
    retouch: super::infer::RetouchArgs,
    #[arg(long, default_value_t = s().steps as u64, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    #[arg(long, default_value_t = s().guidance)]
    guidance: f64,
    /// [default: the base model's own size, as `infer`]
    #[arg(long)]
    width: Option<usize>,
    /// [default: the base model's own size]
    #[arg(long)]
    height: Option<usize>,
    /// Images denoised, and scored, together.
    #[arg(long, default_value_t = d().batch_size as u64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Where images and scores go [default: MODEL_DIR/eval/k{LAYOUT_STEPS}].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The base model, when the one magictailor.json names has moved.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    single_file: super::SingleFileArgs,
    /// CLIP for CLIP-T and CLIP-I: a transformers CLIPModel folder or hub id.
    #[arg(long, default_value_t = d().clip_model)]
    clip_model: String,
    /// How generated images are cut into concept and component for CLIP-I and DINO.
    #[arg(long, value_enum, default_value = "attention")]
    segment: Segment,
    /// DINOv2 for DINO: a transformers Dinov2Model folder or hub id.
    #[arg(long, default_value_t = d().dino_model)]
    dino_model: String,
    #[command(flatten)]
    compute: Compute,
    /// Print metrics.json on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

impl EvalArgs {
    /// The options, images sized as the base model's own where --width or --height is
    /// not given (read from its configs).
    fn options(self) -> magictailor::Result<EvalOptions> {
        let (width, height) = (self.width, self.height);
        let mut opts = self.given_options()?;
        opts.sampling.check()?;
        let (w, h) = super::sides(width, height, || magictailor::eval::native_side(&opts))?;
        (opts.sampling.width, opts.sampling.height) = (w, h);
        Ok(opts)
    }

    fn given_options(self) -> magictailor::Result<EvalOptions> {
        Ok(EvalOptions {
            model_dir: self.model_dir,
            single_file: self.single_file.options_for(self.model.as_deref())?,
            model: self.model,
            instance_dir: self.instance_dir,
            prompts_file: self.prompts,
            placeholder: self.placeholder,
            seeds: prompts::parse_seeds(&self.seeds)?,
            sampling: Sampling {
                steps: self.steps as usize,
                guidance: self.guidance,
                width: self.width.unwrap_or(s().width),
                height: self.height.unwrap_or(s().height),
                layout_steps: self.layout_steps,
                retouch: self.retouch.options(self.steps as usize)?,
                ..s()
            },
            batch_size: self.batch_size as usize,
            out_dir: self.out_dir,
            clip_model: self.clip_model,
            dino_model: self.dino_model,
            device: self.compute.device()?,
            dtype: self.compute.dtype.dtype(),
            progress: !self.quiet && !self.json,
        })
    }
}

pub(super) fn eval_cmd(a: EvalArgs) -> magictailor::Result<()> {
    if let (Ok(n), false) = (a.seeds.trim().parse::<u64>(), a.quiet) {
        // Earlier versions read a plain number here as a count of seeds.
        console::note(format_args!(
            "note: --seeds {n} is the one seed {n}, as in infer; {} seeds are --seeds 0..{}",
            n,
            n.saturating_sub(1)
        ));
    }
    let (json, quiet, segment) = (a.json, a.quiet, a.segment);
    let opts = a.options()?;
    let prof = profile::Run::start();
    let mut done = match segment {
        Segment::Attention => {
            let attention = magictailor::eval::attention_segmenter(&opts)?;
            magictailor::eval::evaluate(&opts, &attention)?
        }
        Segment::None => magictailor::eval::evaluate(&opts, &segment::WholeImage)?,
    };
    if let (Some(p), Some(m)) = (print_profile(prof), done.metrics.as_object_mut()) {
        m.insert("profile".into(), p);
    }
    if json {
        console::line(done.metrics);
    } else if !quiet {
        let files = magictailor::eval::ReportFiles::new(&done.out_dir, &done.segmentation);
        let summary = files.summary;
        let text =
            std::fs::read_to_string(&summary).map_err(|e| magictailor::Error::read(&summary, e))?;
        console::line(format_args!("{text}\n{}", files.metrics.display()));
    }
    Ok(())
}
