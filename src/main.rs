//! The `magictailor` command line: parse, call the library, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use magictailor::batch::{BatchOptions, Shard};
use magictailor::infer::many::{self, Many};
use magictailor::infer::{self, InferOptions};
use magictailor::interrupt::Interrupt;
use magictailor::io::console;
use magictailor::io::progress::Progress;
use magictailor::masks::{AttentionOptions, MasksOptions};
use magictailor::profile;
use magictailor::train::dm_deg::Curve;
use magictailor::train::TrainConfig;

#[derive(Parser)]
#[command(
    name = "magictailor",
    version,
    about = "Component-controllable personalization of Stable Diffusion (MagicTailor)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune LoRA adapters and pseudo-words on a pair folder (MagicTailor).
    Train(TrainArgs),
    /// Generate images from a prompt with a trained folder or a base model.
    Infer(InferArgs),
    /// Train many pairs with one model load; safe to run as many workers (job arrays).
    ///
    /// Exit status: 0 when every pair of this worker's shard is trained or skipped, 1 when
    /// some failed on their input (recorded in batch_summary.jsonl), 75 when the machine
    /// failed (e.g. out of memory) and a scheduler may retry, 130 / 143 when stopped by
    /// Ctrl-C / SIGTERM (a re-run resumes).
    Batch(BatchArgs),
    /// Make masks/ for a pair folder from the base model's own cross-attention (no
    /// Grounded-SAM), optionally refined with Segment Anything; check them in
    /// masks/preview.png.
    ///
    /// Each image is encoded, noised to a few mid timesteps with fixed noise, and run
    /// through the U-Net on "a photo of a {concept}" (concept images) or "a photo of a
    /// {concept} with {component}" (component images). The class word's attention,
    /// averaged over heads, the 16x16 and 32x32 layers and the timesteps, is thresholded
    /// with Otsu's method and cleaned up; a concept mask leaves out its components.
    Masks(MasksArgs),
    /// Score a trained folder as the paper does: CLIP-T, CLIP-I and DINO over the
    /// evaluation prompts x seeds (drawn here, or reused when already drawn).
    Eval(EvalArgs),
    /// Check this build and machine: the GPU and its libraries, each kernel family
    /// against candle's ops, the hub cache. Run it first; paste `--json` into bug reports.
    ///
    /// Exit status: 0 when everything checked passed, 1 otherwise.
    Doctor(DoctorArgs),
    /// What a run folder holds, finished or not: method, base model, words, steps,
    /// outputs, checkpoints, and the command line of each segment.
    Info(InfoArgs),
    /// Print a shell completion script: `magictailor completions bash > ~/.local/share/bash-completion/completions/magictailor`.
    Completions(CompletionsArgs),
}

#[derive(Args)]
struct InfoArgs {
    /// The run folder (a train --output-dir, or a batch pair's folder).
    #[arg(default_value = magictailor::io::run::DEFAULT_DIR)]
    dir: PathBuf,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompletionsArgs {
    /// bash, zsh, fish, powershell or elvish.
    shell: clap_complete::Shell,
}

#[derive(Args)]
struct DoctorArgs {
    /// The device to check: auto (a GPU if there is one), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Also time training steps at 512 px on a random model of SD 2.1-base's shapes
    /// (written once into the temp folder: 5.2 GB), for their speed and peak memory.
    #[arg(long)]
    estimate: bool,
    /// One JSON object on stdout instead of the text report.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Segment {
    /// Each class word's cross-attention in the base model, as `masks` makes masks.
    Attention,
    /// Score whole generated images.
    None,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Refine {
    /// Segment Anything, prompted with the attention mask's box and strongest points.
    Sam,
}

#[derive(Args)]
struct MasksArgs {
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
    /// The Stable Diffusion model whose attention is read (folder or hub id).
    #[arg(long, default_value_t = d().model)]
    model: String,
    /// The square each image is cropped to, as `train --resolution`.
    #[arg(long, default_value_t = AttentionOptions::default().resolution)]
    resolution: usize,
    /// Diffusion timesteps whose attention is averaged: a list like 200,400,600 or 100..110.
    #[arg(long, default_value_t = many::list_spec(&AttentionOptions::default().timesteps))]
    timesteps: String,
    /// Seed of the fixed noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Refine the attention masks with a segmentation model.
    #[arg(long, value_enum)]
    refine: Option<Refine>,
    /// SAM weights in candle's layout: a .safetensors file, a folder, a hub id, or
    /// owner/repo/file.safetensors (MobileSAM: lmz/candle-sam/mobile_sam-tiny-vitt.safetensors).
    #[arg(long, requires = "refine", default_value = magictailor::masks::sam::DEFAULT_MODEL)]
    sam_model: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Precision of the diffusion model's weights: f32, bf16 (CUDA) or f16.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// One JSON line per mask on stdout.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

/// The paper's settings; every training default is read from here.
fn d() -> TrainConfig {
    TrainConfig::default()
}

#[derive(Args)]
struct TrainArgs {
    /// The pair folder, e.g. person_k+hair_c (images 0_*, 1_*, masks in masks/; without
    /// masks/ they are made first from the base model's attention, as `masks` does).
    #[arg(long, required_unless_present = "config")]
    instance_dir: Option<PathBuf>,
    /// Where the run goes: adapters, embeddings, record, log, checkpoints.
    #[arg(long = "out-dir", alias = "output-dir", default_value_os_t = d().output_dir)]
    output_dir: PathBuf,
    /// Continue the run in --out-dir from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    settings: TrainSettings,
}

#[derive(Args)]
struct BatchArgs {
    /// A folder of pair folders, or a text file with one pair folder per line.
    #[arg(long)]
    pairs: PathBuf,
    /// Each pair trains into OUT_DIR/{pair folder name}/.
    #[arg(long = "out-dir", alias = "output-root")]
    output_root: PathBuf,
    /// Train every SHARD_COUNT-th pair from this index (default: from SLURM_ARRAY_TASK_ID
    /// or JOB_COMPLETION_INDEX, else all pairs).
    #[arg(long)]
    shard_index: Option<usize>,
    /// The number of shards (default: SLURM_ARRAY_TASK_COUNT, or 1).
    #[arg(long)]
    shard_count: Option<usize>,
    /// List what this worker would train, resume or skip; train nothing.
    #[arg(long)]
    dry_run: bool,
    /// Minutes without a heartbeat after which another worker's pair lock is stale.
    #[arg(long, default_value_t = 30)]
    lock_timeout: u64,
    /// Also run the paper's evaluation per pair (not built into batch: refused; run
    /// `magictailor eval --model-dir OUTPUT_ROOT/PAIR` per trained folder).
    #[arg(long)]
    eval: bool,
    #[command(flatten)]
    settings: TrainSettings,
}

/// Every training setting; `train` and `batch` share them.
#[derive(Args)]
struct TrainSettings {
    /// Settings from a file: TOML with the flags' names as keys (`warmup-steps = 30`), or
    /// a run's magictailor.json to redo it. Flags given here win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base model: hub repo id, local diffusers folder, or `tiny-random`.
    #[arg(long, default_value_t = d().model)]
    model: String,
    #[arg(long, default_value_t = d().warmup_steps)]
    warmup_steps: usize,
    #[arg(long, default_value_t = d().dsbal_steps)]
    dsbal_steps: usize,
    #[arg(long, default_value_t = d().warmup_lr)]
    warmup_lr: f64,
    /// The rate after warm-up (DS-Bal's, or the joint phase's with --no-ds-bal).
    #[arg(long, default_value_t = d().dsbal_lr)]
    dsbal_lr: f64,
    /// Do not multiply the learning rates by the number of reference images (the paper does).
    #[arg(long)]
    no_scale_lr: bool,
    #[arg(long, default_value_t = d().lora_rank)]
    lora_rank: usize,
    /// LoRA alpha (default: the rank, i.e. scale 1).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Weight of the cross-attention loss (0 turns it off).
    #[arg(long, default_value_t = d().lambda_attn)]
    lambda_attn: f64,
    /// Weight of DS-Bal's preserving regularization.
    #[arg(long, default_value_t = d().lambda_pres)]
    lambda_pres: f64,
    /// DM-Deg's initial intensity.
    #[arg(long, default_value_t = d().alpha)]
    alpha: f64,
    /// DM-Deg's decay exponent.
    #[arg(long, default_value_t = d().gamma)]
    gamma: f64,
    /// DM-Deg intensity curve (the others are the paper's ablations).
    #[arg(long, value_enum, default_value_t = d().dm_deg)]
    dm_deg: Curve,
    /// Ablation: after warm-up, keep training the warm-up objective (at --dsbal-lr)
    /// instead of DS-Bal; --ema-decay and --lambda-pres then do not apply and are refused.
    #[arg(long)]
    no_ds_bal: bool,
    /// Momentum (EMA) decay of DS-Bal's regularizer U-Net.
    #[arg(long, default_value_t = d().ema_decay)]
    ema_decay: f64,
    /// Colour-jitter strength (brightness, contrast, saturation); 0 turns it off.
    #[arg(long, default_value_t = d().jitter)]
    color_jitter: f64,
    /// Do not flip the batch horizontally at random.
    #[arg(long)]
    no_flip: bool,
    #[arg(long, default_value_t = d().seed)]
    seed: u64,
    /// Training resolution in pixels, a multiple of 8.
    #[arg(long, default_value_t = d().resolution)]
    resolution: usize,
    /// Use whole images instead of masks (lets the background leak in); without it, a
    /// folder with no masks/ gets them from the base model's attention.
    #[arg(long)]
    no_masks: bool,
    /// Save a resumable checkpoint every N steps (one is always saved at the phase switch
    /// and at the end).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Keep only the newest N checkpoints, deleting older ones as new ones are saved
    /// [default: keep all].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    keep_checkpoints: Option<u64>,
    /// Reproduce the released script where it departs from the paper: DS-Bal's learning rate
    /// lasts one step, the momentum U-Net is hard-copied at its first update, and the whole
    /// token-embedding table is optimized (with weight decay) and exported, not only the
    /// pseudo-words.
    #[arg(long)]
    released_script: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Precision of the frozen U-Net, VAE and text encoder: f32, bf16 (CUDA) or f16.
    /// LoRA weights, pseudo-words, optimizer state and losses stay f32.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Static loss scale for f16 backward passes (default 1024 with f16, none otherwise);
    /// a step whose gradients overflow is skipped.
    #[arg(long)]
    loss_scale: Option<f64>,
    /// Render a sample grid (samples/step-N.png) every N steps [default: at the phase
    /// switch and at the end; 0: never].
    #[arg(long)]
    sample_every: Option<usize>,
    /// A text file with one sample prompt per line (`{}` stands for "<v0> with <v1>")
    /// [default: <v0>; <v1>; <v0> with <v1>; <v0> with <v1>, on the beach].
    #[arg(long = "sample-prompts-file", alias = "sample-prompts")]
    sample_prompts: Option<PathBuf>,
    /// Seeds of the grid's columns: a list like 0,1 or 0..3.
    #[arg(long, default_value_t = many::list_spec(&d().sample_seeds))]
    sample_seeds: String,
    /// DDIM steps per sample image.
    #[arg(long, default_value_t = d().sample_steps)]
    sample_steps: usize,
    /// Also write TensorBoard event files (losses per step, sample grids) into OUTPUT/tb/.
    #[arg(long)]
    tensorboard: bool,
    /// One JSON object per step on stdout instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct InferArgs {
    /// The prompt, e.g. "<v0> with <v1>, in the snow".
    #[arg(long, required_unless_present = "prompts_file")]
    prompt: Option<String>,
    /// Many prompts, one per line, each with every --seeds seed, in one process: images go
    /// to OUT_DIR/promptNN/seedNN.png with a manifest.jsonl; existing images are skipped.
    #[arg(long, conflicts_with_all = ["prompt", "num_images", "init_latents", "out"])]
    prompts_file: Option<PathBuf>,
    /// With --prompts-file: what `{}` in it stands for.
    #[arg(long, default_value = "<v0> with <v1>")]
    placeholder: String,
    /// With --prompts-file: seeds like 0..31 (inclusive) or 0,4,7 [default: --seed].
    #[arg(long)]
    seeds: Option<String>,
    /// With --prompts-file: images denoised together.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// With --prompts-file: also a labelled contact sheet per prompt (promptNN/grid.png).
    #[arg(long)]
    grid: bool,
    /// With --prompts-file: where the images go.
    #[arg(long, default_value = "outputs/inference")]
    out_dir: PathBuf,
    /// Layout-and-Retouch's step blend: the first K DDIM steps with the base model on the
    /// prompt with class words for the pseudo-words (needs a trained folder), then the
    /// personalized model.
    #[arg(long, default_value_t = 0)]
    layout_steps: usize,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    num_images: u64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// Output PNG; with several images, files are numbered (result-0.png, ...).
    #[arg(long, default_value = "outputs/inference/result.png")]
    out: PathBuf,
    /// A trained output folder; its magictailor.json names the base model
    /// [default: outputs/magictailor, unless --model is given alone].
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// The base model (hub repo id, local diffusers folder, or `tiny-random`): alone, sample
    /// it; with --model-dir, use it in place of the base model the folder names.
    #[arg(long)]
    model: Option<String>,
    /// LoRA file (peft, older diffusers or kohya layout).
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Pseudo-word embeddings ({token: vector} safetensors).
    #[arg(long)]
    embeds: Option<PathBuf>,
    /// Sample a checkpoint of the --model-dir run (finished or not) instead of its final
    /// weights: step-N, N, or a checkpoint file.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Start from these latents (safetensors tensor `latents`, [n, C, h/f, w/f]) to
    /// reproduce a run made elsewhere exactly.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Precision of the weights: f32, bf16 (CUDA) or f16.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// One JSON line per image written on stdout (file, prompt, seed); with
    /// --prompts-file, one line naming the manifest.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The trained folder (its magictailor.json names the base model and class words).
    #[arg(long, default_value = "outputs/magictailor")]
    model_dir: PathBuf,
    /// The pair folder with the reference images (and masks/) [default: the one the run
    /// was trained on, from magictailor.json].
    #[arg(long)]
    instance_dir: Option<PathBuf>,
    /// One prompt per line, `{}` for --placeholder; `# group: NAME` lines group them
    /// [default: the paper's, built in (assets/eval_prompts.txt)].
    #[arg(long = "prompts-file", alias = "prompts")]
    prompts: Option<PathBuf>,
    #[arg(long, default_value = "<v0> with <v1>")]
    placeholder: String,
    /// Seeds, as `infer --seeds`: a list like 0..31 (the paper's 32) or 0,4,7.
    #[arg(long, default_value = "0..31")]
    seeds: String,
    /// Layout-and-Retouch's step blend (as `infer --layout-steps`); each K has its own folder.
    #[arg(long, default_value_t = 0)]
    layout_steps: usize,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// Images denoised, and scored, together.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Where images and scores go [default: MODEL_DIR/eval/k{LAYOUT_STEPS}].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The base model, when the one magictailor.json names has moved.
    #[arg(long)]
    model: Option<String>,
    /// CLIP for CLIP-T and CLIP-I: a transformers CLIPModel folder or hub id.
    #[arg(long, default_value = magictailor::eval::clip::DEFAULT_MODEL)]
    clip_model: String,
    /// How generated images are cut into concept and component for CLIP-I and DINO.
    #[arg(long, value_enum, default_value = "attention")]
    segment: Segment,
    /// DINOv2 for DINO: a transformers Dinov2Model folder or hub id.
    #[arg(long, default_value = magictailor::eval::dino::DEFAULT_MODEL)]
    dino_model: String,
    /// Precision of the diffusion model's weights: f32, bf16 (CUDA) or f16.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print metrics.json on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

impl TrainSettings {
    fn config(
        &self,
        instance_dir: PathBuf,
        output_dir: PathBuf,
    ) -> magictailor::Result<TrainConfig> {
        let sample_prompts = match &self.sample_prompts {
            Some(file) => many::read_prompts(file, "<v0> with <v1>", "--sample-prompts")?,
            None => d().sample_prompts,
        };
        Ok(TrainConfig {
            instance_dir,
            output_dir,
            model: self.model.clone(),
            warmup_steps: self.warmup_steps,
            dsbal_steps: self.dsbal_steps,
            warmup_lr: self.warmup_lr,
            dsbal_lr: self.dsbal_lr,
            scale_lr: !self.no_scale_lr,
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha.unwrap_or(self.lora_rank as f64),
            lambda_attn: self.lambda_attn,
            lambda_pres: self.lambda_pres,
            dm_deg: self.dm_deg,
            alpha: self.alpha,
            gamma: self.gamma,
            ds_bal: !self.no_ds_bal,
            ema_decay: self.ema_decay,
            seed: self.seed,
            resolution: self.resolution,
            no_masks: self.no_masks,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints.map(|n| n as usize),
            released_script: self.released_script,
            jitter: self.color_jitter,
            flip: !self.no_flip,
            dtype: self.dtype.dtype(),
            loss_scale: (self.loss_scale).or(TrainConfig::default_loss_scale(self.dtype.dtype())),
            sample_every: self.sample_every,
            sample_prompts,
            sample_seeds: many::parse_list(&self.sample_seeds, "--sample-seeds")?,
            sample_steps: self.sample_steps,
            tensorboard: self.tensorboard,
        })
    }

    fn progress(&self) -> Progress {
        if self.quiet {
            Progress::Quiet
        } else if self.json {
            Progress::Json
        } else {
            Progress::Bar
        }
    }

    /// Checks the settings and prints their warnings.
    fn check(&self, cfg: &TrainConfig) -> magictailor::Result<()> {
        cfg.validate()?;
        if !self.quiet {
            for w in cfg.warnings() {
                console::note(format_args!("warning: {w}"));
            }
        }
        Ok(())
    }
}

fn train_cmd(a: TrainArgs, m: &clap::ArgMatches) -> magictailor::Result<()> {
    let s = &a.settings;
    let cfg = s.config(a.instance_dir.unwrap_or_default(), a.output_dir)?;
    let cfg = with_settings_file(cfg, s.config.as_deref(), m)?;
    s.check(&cfg)?;
    let out = cfg.output_dir.clone();
    let device = magictailor::device::parse(&s.device)?;
    let stop = Interrupt::install(s.quiet)?;
    let prof = profile::Run::start();
    magictailor::train::train(cfg, &device, s.progress(), a.resume, &stop)?;
    let prof = print_profile(prof);
    if !s.quiet && !s.json {
        console::line(out.display());
    }
    if let Some(p) = prof.filter(|_| s.json) {
        console::line(serde_json::json!({ "profile": p }));
    }
    Ok(())
}

/// With profiling on: prints where the command's time went to stderr, and gives the
/// table as JSON for `--json` output.
fn print_profile(run: Option<profile::Run>) -> Option<serde_json::Value> {
    let report = run?.finish();
    console::note(report.table().trim_end());
    Some(report.to_json())
}

/// `cfg` with the settings of `file` (`--config`) where the command line (`m`) gave none.
fn with_settings_file(
    cfg: TrainConfig,
    file: Option<&std::path::Path>,
    m: &clap::ArgMatches,
) -> magictailor::Result<TrainConfig> {
    let Some(file) = file else {
        return Ok(cfg);
    };
    let given = |id: &str| {
        m.try_get_raw(id).is_ok()
            && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    };
    let settings = magictailor::train::settings_file::read(file)?;
    magictailor::train::settings_file::overlay(&cfg, &settings, given)
}

fn batch_cmd(a: BatchArgs, m: &clap::ArgMatches) -> magictailor::Result<u8> {
    if a.eval {
        return Err(magictailor::Error::usage(
            "--eval: batch does not evaluate; train with `batch`, then run `magictailor eval \
             --model-dir OUTPUT_ROOT/PAIR` on each trained folder (one job per folder on a cluster).",
        ));
    }
    let s = &a.settings;
    let template = s.config(PathBuf::new(), PathBuf::new())?;
    let template = with_settings_file(template, s.config.as_deref(), m)?;
    s.check(&template)?;
    let env = |k: &str| std::env::var(k).ok();
    let opts = BatchOptions {
        pairs: a.pairs,
        output_root: a.output_root,
        shard: Shard::resolve(a.shard_index, a.shard_count, env)?,
        dry_run: a.dry_run,
        stale_after: std::time::Duration::from_secs(a.lock_timeout.saturating_mul(60)),
    };
    let device = magictailor::device::parse(&s.device)?;
    let stop = Interrupt::install(s.quiet)?;
    let outcome = magictailor::batch::train_pairs(&template, &opts, &device, s.progress(), &stop)?;
    Ok(outcome.exit_code())
}

fn infer_cmd(a: InferArgs) -> magictailor::Result<()> {
    let many = match &a.prompts_file {
        Some(file) => Some(Many {
            prompts: many::read_prompts(file, &a.placeholder, "--prompts-file")?,
            seeds: match &a.seeds {
                Some(spec) => many::parse_seeds(spec)?,
                None => vec![a.seed],
            },
            batch_size: a.batch_size as usize,
            out_dir: a.out_dir.clone(),
            grid: a.grid,
        }),
        None => None,
    };
    let opts = InferOptions {
        prompt: a.prompt.unwrap_or_default(),
        negative_prompt: a.negative_prompt,
        num_images: a.num_images as usize,
        steps: a.steps as usize,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width,
        height: a.height,
        out: a.out,
        model_dir: a.model_dir,
        model: a.model,
        lora: a.lora,
        embeds: a.embeds,
        init_latents: a.init_latents,
        checkpoint: a.checkpoint,
        device: magictailor::device::parse(&a.device)?,
        dtype: a.dtype.dtype(),
        progress: !a.quiet,
        layout_steps: a.layout_steps,
        many,
    };
    let prof = profile::Run::start();
    let written = infer::run(&opts)?;
    print_profile(prof);
    let manifest = a.out_dir.join("manifest.jsonl");
    match (a.json, opts.many.is_some()) {
        (true, false) => {
            for (i, p) in written.iter().enumerate() {
                let seed = opts.seed + i as u64;
                console::line(serde_json::json!({"image": p, "prompt": opts.prompt, "seed": seed}));
            }
        }
        (true, true) => console::line(serde_json::json!({"manifest": manifest})),
        (false, false) if !a.quiet => written.iter().for_each(|p| console::line(p.display())),
        (false, true) if !a.quiet => console::line(manifest.display()),
        _ => {}
    }
    Ok(())
}

fn masks_cmd(a: MasksArgs) -> magictailor::Result<()> {
    let opts = MasksOptions {
        instance_dir: a.instance_dir,
        out: a.out,
        model: a.model,
        attention: AttentionOptions {
            resolution: a.resolution,
            timesteps: (many::parse_list(&a.timesteps, "--timesteps")?.into_iter())
                .map(|t| t as usize)
                .collect(),
            seed: a.seed,
        },
        sam_model: a.refine.map(|Refine::Sam| a.sam_model),
        overwrite: a.overwrite,
        missing: a.missing,
        device: magictailor::device::parse(&a.device)?,
        dtype: a.dtype.dtype(),
        progress: !a.quiet && !a.json,
    };
    let prof = profile::Run::start();
    let (written, preview) = magictailor::masks::run(&opts)?;
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

fn eval_cmd(a: EvalArgs) -> magictailor::Result<()> {
    let seeds = many::parse_seeds(&a.seeds)?;
    if let (Ok(n), false) = (a.seeds.trim().parse::<u64>(), a.quiet) {
        // Earlier versions read a plain number here as a count of seeds.
        console::note(format_args!(
            "note: --seeds {n} is the one seed {n}, as in infer; {} seeds are --seeds 0..{}",
            n,
            n.saturating_sub(1)
        ));
    }
    let opts = magictailor::eval::EvalOptions {
        model_dir: a.model_dir,
        model: a.model,
        instance_dir: a.instance_dir,
        prompts_file: a.prompts,
        placeholder: a.placeholder,
        seeds,
        steps: a.steps as usize,
        guidance: a.guidance,
        width: a.width,
        height: a.height,
        layout_steps: a.layout_steps,
        batch_size: a.batch_size as usize,
        out_dir: a.out_dir,
        clip_model: a.clip_model,
        dino_model: a.dino_model,
        device: magictailor::device::parse(&a.device)?,
        dtype: a.dtype.dtype(),
        progress: !a.quiet && !a.json,
    };
    let prof = profile::Run::start();
    let mut done = match a.segment {
        Segment::Attention => {
            let attention = magictailor::eval::attention_segmenter(&opts)?;
            magictailor::eval::run(&opts, &attention)?
        }
        Segment::None => magictailor::eval::run(&opts, &magictailor::eval::segment::WholeImage)?,
    };
    if let (Some(p), Some(m)) = (print_profile(prof), done.metrics.as_object_mut()) {
        m.insert("profile".into(), p);
    }
    if a.json {
        console::line(done.metrics);
    } else if !a.quiet {
        let files = magictailor::eval::ReportFiles::new(&done.out_dir, &done.segmentation);
        let summary = files.summary;
        let text =
            std::fs::read_to_string(&summary).map_err(|e| magictailor::Error::read(&summary, e))?;
        console::line(format_args!("{text}\n{}", files.metrics.display()));
    }
    Ok(())
}

fn info_cmd(a: InfoArgs) -> magictailor::Result<()> {
    let info = magictailor::info::read(&a.dir)?;
    if a.json {
        console::line(info.to_json());
    } else {
        console::line(info.text());
    }
    Ok(())
}

fn doctor_cmd(a: DoctorArgs) -> magictailor::Result<u8> {
    let report = magictailor::doctor::run(&magictailor::doctor::DoctorOptions {
        device: a.device,
        estimate: a.estimate,
    })?;
    if a.json {
        console::line(report.to_json());
    } else {
        console::line(report.text().trim_end());
    }
    Ok(u8::from(!report.problems().is_empty()))
}

/// The command line. A value may be negative (`--guidance -1`), so that it reaches the
/// checks that name the valid range instead of being taken for an unknown flag.
fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command().mut_subcommands(|sc| {
        sc.mut_args(|a| {
            let takes = a.get_num_args().is_none_or(|n| n.takes_values());
            if takes && a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
    })
}

/// The flags of `infer` that only a `--prompts-file` run uses.
const MANY_PROMPT_FLAGS: [&str; 5] = ["seeds", "batch_size", "grid", "out_dir", "placeholder"];

/// Refuses flags given on the command line that the chosen mode would ignore (clap's
/// `requires` does not fire when the required flag conflicts with one given).
fn refuse_ignored(matches: &clap::ArgMatches) -> magictailor::Result<()> {
    let Some(("infer", m)) = matches.subcommand() else {
        return Ok(());
    };
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

fn main() -> ExitCode {
    magictailor::device::tune_cpu_runtime();
    let matches = command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = refuse_ignored(&matches) {
        console::note(format_args!("error: {e}"));
        return ExitCode::from(e.exit_code());
    }
    let sub = matches.subcommand().map_or(&matches, |(_, m)| m);
    let result = match cli.command {
        Command::Train(a) => train_cmd(a, sub).map(|()| 0),
        Command::Infer(a) => infer_cmd(a).map(|()| 0),
        Command::Batch(a) => batch_cmd(a, sub),
        Command::Masks(a) => masks_cmd(a).map(|()| 0),
        Command::Eval(a) => eval_cmd(a).map(|()| 0),
        Command::Doctor(a) => doctor_cmd(a),
        Command::Info(a) => info_cmd(a).map(|()| 0),
        Command::Completions(a) => {
            clap_complete::generate(
                a.shell,
                &mut command(),
                "magictailor",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            console::note(format_args!("error: {e}"));
            if let Some(hint) = magictailor::model::ops::sticky_error_hint(&e.to_string()) {
                console::note(format_args!("hint: {hint}"));
            }
            ExitCode::from(e.exit_code())
        }
    }
}
