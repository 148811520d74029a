//! `magictailor infer`: one prompt, or a prompts file x seeds.

use std::path::PathBuf;

use clap::Args;
use magictailor::infer::many::Many;
use magictailor::infer::one::{companion, COMPANION_LAYOUT, COMPANION_MASK};
use magictailor::infer::prompts::{self, PLACEHOLDER};
use magictailor::infer::retouch::Retouch;
use magictailor::infer::{InferOptions, Mode, One, Sampling};
use magictailor::io::console;
use magictailor::profile;

use super::{print_profile, Compute};

fn s() -> Sampling {
    Sampling::default()
}

fn many() -> Many {
    Many::new(Vec::new(), Vec::new())
}

#[derive(Args)]
pub(super) struct InferArgs {
    /// The prompt, e.g. "<v0> with <v1>, in the snow".
    #[arg(long, required_unless_present = "prompts_file")]
    prompt: Option<String>,
    /// Many prompts, one per line, each with every --seeds seed, in one process: images go
    /// to OUT_DIR/promptNN/seedNN.png with a manifest.jsonl; existing images are skipped.
    #[arg(long, conflicts_with_all = ["prompt", "num_images", "init_latents", "out"])]
    prompts_file: Option<PathBuf>,
    /// With --prompts-file: what `{}` in it stands for.
    #[arg(long, default_value = PLACEHOLDER)]
    placeholder: String,
    /// With --prompts-file: seeds like 0..31 (inclusive) or 0,4,7 [default: --seed].
    #[arg(long)]
    seeds: Option<String>,
    /// With --prompts-file: images denoised together.
    #[arg(long, default_value_t = many().batch_size as u64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// With --prompts-file: also a labelled contact sheet per prompt (promptNN/grid.png).
    #[arg(long)]
    grid: bool,
    /// With --prompts-file: where the images go.
    #[arg(long, default_value_os_t = many().out_dir)]
    out_dir: PathBuf,
    /// Layout-and-Retouch's step blend: the first K DDIM steps with the base model on the
    /// prompt with class words for the pseudo-words (needs a trained folder), then the
    /// personalized model.
    #[arg(long, default_value_t = s().layout_steps)]
    layout_steps: usize,
    #[command(flatten)]
    retouch: RetouchArgs,
    /// With --retouch: each image's blend mask beside it (NAME-mask.png; white keeps the
    /// retouched output, black the layout's).
    #[arg(long, requires = "retouch", conflicts_with = "no_blend")]
    save_masks: bool,
    #[arg(long, default_value_t = s().negative_prompt)]
    negative_prompt: String,
    #[arg(long, default_value_t = One::default().num_images as u64, value_parser = clap::value_parser!(u64).range(1..))]
    num_images: u64,
    #[arg(long, default_value_t = s().steps as u64, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = s().guidance)]
    guidance: f64,
    #[arg(long, default_value_t = One::default().seed)]
    seed: u64,
    /// [default: the base model's own size, its U-Net's sample_size times the VAE's factor]
    #[arg(long)]
    width: Option<usize>,
    /// [default: the base model's own size]
    #[arg(long)]
    height: Option<usize>,
    /// Output PNG; with several images, files are numbered (result-0.png, ...).
    #[arg(long, default_value_os_t = One::default().out)]
    out: PathBuf,
    /// A trained output folder; its magictailor.json names the base model
    /// [default: outputs/magictailor, unless --model is given alone].
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// The base model (hub repo id, local diffusers folder, single-file .safetensors
    /// checkpoint, or `tiny-random`): alone, sample it; with --model-dir, use it in place of
    /// the base model the folder names.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    single_file: super::SingleFileArgs,
    /// LoRA file (peft, older diffusers or kohya layout).
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Pseudo-word embeddings ({token: vector} safetensors).
    #[arg(long)]
    embeds: Option<PathBuf>,
    /// Custom Diffusion's key and value matrices (`pytorch_custom_diffusion_weights`
    /// safetensors, ours or diffusers' `save_attn_procs`).
    #[arg(long)]
    custom_diffusion: Option<PathBuf>,
    /// A full fine-tune's changes to the base U-Net and text encoder
    /// (`full_weights_delta.safetensors`, Break-A-Scene's), added to --model's weights.
    #[arg(long)]
    full_delta: Option<PathBuf>,
    /// ViCo's image cross-attention blocks (`vico_blocks.safetensors`; a trained ViCo
    /// folder's are picked up).
    #[arg(long)]
    vico_blocks: Option<PathBuf>,
    /// The reference image of a pseudo-word (ViCo's, or --retouch's), repeated in order
    /// (<v0>'s first); by default the trained folder's first image of each sample.
    #[arg(long = "reference", value_name = "IMAGE")]
    references: Vec<PathBuf>,
    /// Sample a checkpoint of the --model-dir run (finished or not) instead of its final
    /// weights: step-N, N, or a checkpoint file.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Start from these latents (safetensors tensor `latents`, [n, C, h/f, w/f]) to
    /// reproduce a run made elsewhere exactly.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    #[command(flatten)]
    compute: Compute,
    /// One JSON line per image written on stdout (file, prompt, seed); with
    /// --prompts-file, one line naming the manifest.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

/// Layout-and-Retouch's second stage (`infer` and `eval`).
#[derive(Args)]
pub(super) struct RetouchArgs {
    /// Layout-and-Retouch's retouch stage: redraw the image (the layout, from
    /// --layout-steps) with each named pseudo-word's reference image swapped into its
    /// self-attention and blended by a subject mask; the layout image is kept beside it
    /// (NAME-layout.png).
    #[arg(long)]
    retouch: bool,
    /// With --retouch: the first steps whose self-attention reads the layout's keys and
    /// values (the references' after) [default: a fifth of --steps].
    #[arg(long, requires = "retouch")]
    swap_layout_steps: Option<usize>,
    /// With --retouch: the step from which the self-attention outputs are blended with the
    /// layout's by the subject mask [default: a fifth of --steps].
    #[arg(long, requires = "retouch", conflicts_with = "no_blend")]
    blend_from: Option<usize>,
    /// With --retouch: no attention swap (an ablation).
    #[arg(long, requires = "retouch", conflicts_with = "swap_layout_steps")]
    no_swap: bool,
    /// With --retouch: no mask blend (an ablation).
    #[arg(long, requires = "retouch")]
    no_blend: bool,
    /// With --retouch: refine the attention masks with SAM's segments of the layout image.
    #[arg(long, requires = "retouch", value_enum, conflicts_with = "no_blend")]
    refine: Option<super::masks::Refine>,
    /// SAM weights in candle's layout (as `masks --sam-model`).
    #[arg(long, requires = "refine", default_value = magictailor::masks::sam::DEFAULT_MODEL)]
    sam_model: String,
    /// With --retouch: memory (MiB) for the references' keys and values at every step,
    /// computed once and kept for every image of the command; 0 runs the references with
    /// each batch instead.
    /// [default: 2048]
    #[arg(long, requires = "retouch", conflicts_with = "no_swap")]
    reference_cache_mb: Option<usize>,
}

impl RetouchArgs {
    pub(super) fn options(&self, steps: usize) -> magictailor::Result<Option<Retouch>> {
        if !self.retouch {
            return Ok(None);
        }
        let d = Retouch::defaults(steps);
        let layout_swap_steps = self.swap_layout_steps.unwrap_or(d.layout_swap_steps);
        if let (Some(mb), true) = (self.reference_cache_mb, layout_swap_steps >= steps) {
            return Err(magictailor::Error::usage(format!(
                "--reference-cache-mb {mb} keeps the references' keys, which are read only after \
                 --swap-layout-steps ({layout_swap_steps} of --steps {steps}): drop it."
            )));
        }
        Ok(Some(Retouch {
            swap: !self.no_swap,
            layout_swap_steps,
            blend_from: match self.no_blend {
                true => steps,
                false => self.blend_from.unwrap_or(d.blend_from),
            },
            sam_model: self.refine.map(|_| self.sam_model.clone()),
            kv_cache_mb: self.reference_cache_mb.unwrap_or(d.kv_cache_mb),
        }))
    }
}

/// The flags that only a `--prompts-file` run uses.
const MANY_PROMPT_FLAGS: [&str; 5] = ["seeds", "batch_size", "grid", "out_dir", "placeholder"];

/// Refuses flags given on the command line that one-prompt mode would ignore (clap's
/// `requires` does not fire when the required flag conflicts with one given).
fn refuse_ignored(m: &clap::ArgMatches) -> magictailor::Result<()> {
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    if given("prompts_file") {
        return Ok(());
    }
    let ignored: Vec<String> = (MANY_PROMPT_FLAGS.iter())
        .filter(|id| given(id))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    if ignored.is_empty() {
        return Ok(());
    }
    let (verb, pronoun) = if ignored.len() == 1 {
        ("applies", "it")
    } else {
        ("apply", "them")
    };
    Err(magictailor::Error::usage(format!(
        "{} only {verb} with --prompts-file; with --prompt {pronoun} would be ignored. Drop \
         {pronoun}, or put the prompt in a file and pass --prompts-file.",
        ignored.join(", ")
    )))
}

impl InferArgs {
    fn mode(&self) -> magictailor::Result<Mode> {
        let Some(file) = &self.prompts_file else {
            return Ok(Mode::One(One {
                prompt: self.prompt.clone().unwrap_or_default(),
                num_images: self.num_images as usize,
                seed: self.seed,
                out: self.out.clone(),
                init_latents: self.init_latents.clone(),
            }));
        };
        let seeds = match &self.seeds {
            Some(spec) => prompts::parse_seeds(spec)?,
            None => vec![self.seed],
        };
        Ok(Mode::Many(Many {
            batch_size: self.batch_size as usize,
            out_dir: self.out_dir.clone(),
            grid: self.grid,
            ..Many::new(
                prompts::read_prompts(file, &self.placeholder, "--prompts-file")?,
                seeds,
            )
        }))
    }

    /// The options, images sized as the base model's own where --width or --height is
    /// not given (read from its configs).
    fn options(self) -> magictailor::Result<InferOptions> {
        let (width, height) = (self.width, self.height);
        let mut opts = self.given_options()?;
        magictailor::infer::check(&opts)?;
        let (w, h) = super::sides(width, height, || magictailor::infer::native_side(&opts))?;
        (opts.sampling.width, opts.sampling.height) = (w, h);
        Ok(opts)
    }

    fn given_options(self) -> magictailor::Result<InferOptions> {
        Ok(InferOptions {
            mode: self.mode()?,
            sampling: Sampling {
                negative_prompt: self.negative_prompt,
                steps: self.steps as usize,
                guidance: self.guidance,
                width: self.width.unwrap_or(s().width),
                height: self.height.unwrap_or(s().height),
                layout_steps: self.layout_steps,
                retouch: self.retouch.options(self.steps as usize)?,
            },
            model_dir: self.model_dir,
            single_file: self.single_file.options_for(self.model.as_deref())?,
            model: self.model,
            lora: self.lora,
            embeds: self.embeds,
            custom_diffusion: self.custom_diffusion,
            full_delta: self.full_delta,
            vico_blocks: self.vico_blocks,
            references: self.references,
            checkpoint: self.checkpoint,
            device: self.compute.device()?,
            dtype: self.compute.dtype.dtype(),
            progress: !self.quiet,
            save_masks: self.save_masks,
        })
    }
}

pub(super) fn infer_cmd(a: InferArgs, m: &clap::ArgMatches) -> magictailor::Result<()> {
    refuse_ignored(m)?;
    let (json, quiet) = (a.json, a.quiet);
    let opts = a.options()?;
    let prof = profile::Run::start();
    let written = magictailor::infer::infer(&opts)?;
    print_profile(prof);
    match (&opts.mode, json) {
        (Mode::One(one), true) => {
            for (i, p) in written.iter().enumerate() {
                let seed = one.seed + i as u64;
                let mut line = serde_json::json!({"image": p, "prompt": one.prompt, "seed": seed});
                if opts.sampling.retouch.is_some() {
                    line["layout"] = serde_json::json!(companion(p, COMPANION_LAYOUT));
                }
                let mask = companion(p, COMPANION_MASK);
                if opts.save_masks && mask.is_file() {
                    line["mask"] = serde_json::json!(mask);
                }
                console::line(line);
            }
        }
        (Mode::Many(many), true) => {
            console::line(serde_json::json!({"manifest": many.out_dir.join("manifest.jsonl")}))
        }
        (Mode::One(_), false) if !quiet => written.iter().for_each(|p| console::line(p.display())),
        (Mode::Many(many), false) if !quiet => {
            console::line(many.out_dir.join("manifest.jsonl").display())
        }
        _ => {}
    }
    Ok(())
}
