//! `magictailor train`, and the training settings `train` and `batch` share.

use std::path::PathBuf;

use clap::Args;
use magictailor::infer::prompts::{self, PLACEHOLDER};
use magictailor::interrupt::Interrupt;
use magictailor::io::console;
use magictailor::io::progress::Progress;
use magictailor::model::loader::native_side;
use magictailor::profile;
use magictailor::train::config::{flags_not_for, not_for_method};
use magictailor::train::dm_deg::Curve;
use magictailor::train::method::Method;
use magictailor::train::TrainConfig;

use super::{print_profile, Precision};

/// The paper's settings; every training default is read from here.
fn d() -> TrainConfig {
    TrainConfig::default()
}

const MT: &str = "MagicTailor (--method magictailor)";
const ONE: &str = "One-phase methods (--method ti, dreambooth, custom-diffusion, clic, vico)";
const CD: &str = "Custom Diffusion (--method custom-diffusion)";
const PRIOR: &str =
    "Prior preservation (--method dreambooth, custom-diffusion; on for break-a-scene)";
const BAS: &str = "Break-A-Scene (--method break-a-scene)";

#[derive(Args)]
pub(super) struct TrainArgs {
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

/// Every training setting; `train` and `batch` share them.
#[derive(Args)]
pub(super) struct TrainSettings {
    /// Settings from a file: TOML with the flags' names as keys (`warmup-steps = 30`), or
    /// a run's magictailor.json to redo it. Flags given here win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base model: hub repo id, local diffusers folder, single-file .safetensors
    /// checkpoint, or `tiny-random`.
    #[arg(long, default_value_t = d().model)]
    model: String,
    #[command(flatten)]
    single_file: super::SingleFileArgs,
    /// The personalization method: MagicTailor, Textual Inversion, DreamBooth-LoRA, Custom
    /// Diffusion, CLiC, ViCo or Break-A-Scene (each as its source trains it, with the
    /// paper's adaptations). A flag of another method is refused.
    #[arg(long, value_enum, default_value_t = d().method)]
    method: Method,
    /// Optimizer steps [default: ti 3000, dreambooth 500, custom-diffusion 250, clic 500,
    /// vico 400].
    #[arg(long, help_heading = ONE)]
    steps: Option<usize>,
    /// Learning rate, multiplied by --images-per-step unless --no-scale-lr [default: ti
    /// 5e-4, dreambooth 1e-4, custom-diffusion 1e-4, clic 5e-5, vico 5e-3 (its pseudo-word;
    /// its blocks train at 1e-5)].
    #[arg(long, help_heading = ONE)]
    lr: Option<f64>,
    /// Images per optimizer step, each drawn at random: the source's batch size times its
    /// accumulated batches [default: ti 4, dreambooth 1, custom-diffusion 2, clic 1, vico
    /// 4].
    #[arg(long, help_heading = ONE)]
    images_per_step: Option<usize>,
    #[arg(long, help_heading = MT, default_value_t = d().warmup_steps)]
    warmup_steps: usize,
    #[arg(long, help_heading = MT, default_value_t = d().dsbal_steps)]
    dsbal_steps: usize,
    #[arg(long, help_heading = MT, default_value_t = d().warmup_lr)]
    warmup_lr: f64,
    /// The rate after warm-up (DS-Bal's, or the joint phase's with --no-ds-bal).
    #[arg(long, help_heading = MT, default_value_t = d().dsbal_lr)]
    dsbal_lr: f64,
    /// Do not multiply the learning rates by the images per step (all reference images
    /// for MagicTailor); the paper and diffusers' scripts do.
    #[arg(long)]
    no_scale_lr: bool,
    #[arg(long, help_heading = MT, default_value_t = d().lora_rank)]
    lora_rank: usize,
    /// LoRA alpha (default: the rank, i.e. scale 1).
    #[arg(long, help_heading = MT)]
    lora_alpha: Option<f64>,
    /// Weight of the cross-attention loss, MagicTailor's and Break-A-Scene's (0 turns it
    /// off).
    #[arg(long, help_heading = MT, default_value_t = d().lambda_attn)]
    lambda_attn: f64,
    /// Weight of DS-Bal's preserving regularization.
    #[arg(long, help_heading = MT, default_value_t = d().lambda_pres)]
    lambda_pres: f64,
    /// DM-Deg's initial intensity.
    #[arg(long, help_heading = MT, default_value_t = d().alpha)]
    alpha: f64,
    /// DM-Deg's decay exponent.
    #[arg(long, help_heading = MT, default_value_t = d().gamma)]
    gamma: f64,
    /// DM-Deg intensity curve (the others are the paper's ablations).
    #[arg(long, help_heading = MT, value_enum, default_value_t = d().dm_deg)]
    dm_deg: Curve,
    /// Ablation: after warm-up, keep training the warm-up objective (at --dsbal-lr)
    /// instead of DS-Bal; --ema-decay and --lambda-pres then do not apply and are refused.
    #[arg(long, help_heading = MT)]
    no_ds_bal: bool,
    /// Momentum (EMA) decay of DS-Bal's regularizer U-Net.
    #[arg(long, help_heading = MT, default_value_t = d().ema_decay)]
    ema_decay: f64,
    /// Colour-jitter strength (brightness, contrast, saturation); 0 turns it off.
    #[arg(long, help_heading = MT, default_value_t = d().jitter)]
    color_jitter: f64,
    /// Do not flip horizontally at random (MagicTailor flips the whole batch, TI each
    /// image, with probability 1/2).
    #[arg(long)]
    no_flip: bool,
    /// Phase 1: steps that train only the pseudo-words.
    #[arg(long, help_heading = BAS, default_value_t = d().phase1_steps)]
    phase1_steps: usize,
    #[arg(long, help_heading = BAS, default_value_t = d().phase1_lr)]
    phase1_lr: f64,
    /// Phase 2: steps that train every U-Net and text-encoder weight and the pseudo-words,
    /// with a new optimizer.
    #[arg(long, help_heading = BAS, default_value_t = d().phase2_steps)]
    phase2_steps: usize,
    /// Phase 2's rate [default: 2e-6, the source's; 1e-4 with --phase2-lora].
    #[arg(long, help_heading = BAS)]
    phase2_lr: Option<f64>,
    /// Phase 2 trains LoRA adapters of this rank on the U-Net (and the pseudo-words)
    /// instead of every weight: for GPUs that cannot hold a full fine-tune.
    #[arg(long, help_heading = BAS, value_name = "RANK",
          value_parser = clap::value_parser!(u64).range(1..))]
    phase2_lora: Option<u64>,
    /// Turn off the source's prior preservation (100 class images of "a photo at the
    /// beach" drawn once by the base model, one in every step).
    #[arg(long, help_heading = BAS)]
    no_prior_preservation: bool,
    /// Turn off Custom Diffusion's scale augmentation (each image shrunk onto a blank
    /// canvas or enlarged and cropped, its prompt saying "a far away", "close up", ...).
    #[arg(long, help_heading = CD)]
    no_scale_aug: bool,
    /// Prior preservation: each step also trains on as many class images, drawn once by
    /// the base model ("a photo of {class}", 50 DDIM steps, guidance 7.5) and reused.
    #[arg(long, help_heading = PRIOR)]
    prior_preservation: bool,
    /// Class images per class prompt [default: dreambooth 100 and custom-diffusion 200 per
    /// sample, break-a-scene 100].
    #[arg(long, help_heading = PRIOR, value_parser = clap::value_parser!(u64).range(1..))]
    class_images: Option<u64>,
    /// The class images' loss weight.
    #[arg(long, help_heading = PRIOR, default_value_t = d().prior_loss_weight)]
    prior_loss_weight: f64,
    /// Where class images are drawn and reused [default: OUT_DIR/class_images]; share one
    /// between runs on the same base model and resolution (e.g. a whole batch).
    #[arg(long, help_heading = PRIOR)]
    class_dir: Option<PathBuf>,
    /// Custom Diffusion, CLiC and Break-A-Scene: also write the base U-Net with the tuned
    /// weights merged in, as a diffusers `DIR/unet/` folder (Break-A-Scene also
    /// `DIR/text_encoder/`): full copies; the run folder keeps only the changes.
    #[arg(long, value_name = "DIR")]
    export_full: Option<PathBuf>,
    #[arg(long, default_value_t = d().seed)]
    seed: u64,
    /// Training resolution in pixels, a multiple of 8 [default: the model's own size, its
    /// U-Net's sample_size times the VAE's factor: 512 for SD 1.x and 2.x-base, 768 for
    /// 2.x at 768 px].
    #[arg(long)]
    resolution: Option<usize>,
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
    #[arg(long, help_heading = MT)]
    released_script: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = magictailor::device::AUTO)]
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
    #[arg(long, default_value_t = prompts::list_spec(&d().sample_seeds))]
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

impl TrainSettings {
    fn config(
        &self,
        instance_dir: PathBuf,
        output_dir: PathBuf,
    ) -> magictailor::Result<TrainConfig> {
        let sample_prompts = match &self.sample_prompts {
            Some(file) => prompts::read_prompts(file, PLACEHOLDER, "--sample-prompts")?,
            None => d().sample_prompts,
        };
        Ok(TrainConfig {
            instance_dir,
            output_dir,
            model: self.model.clone(),
            single_file: self.single_file.options(),
            method: self.method,
            // Recorded as given; None takes the method's default.
            steps: self.steps,
            lr: self.lr,
            images_per_step: self.images_per_step,
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
            resolution: self.resolution.unwrap_or(d().resolution),
            no_masks: self.no_masks,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints.map(|n| n as usize),
            released_script: self.released_script,
            jitter: self.color_jitter,
            flip: !self.no_flip,
            scale_aug: !self.no_scale_aug,
            phase1_steps: self.phase1_steps,
            phase1_lr: self.phase1_lr,
            phase2_steps: self.phase2_steps,
            phase2_lr: self.phase2_lr,
            phase2_lora: self.phase2_lora.map(|r| r as usize),
            no_prior_preservation: self.no_prior_preservation,
            prior_preservation: self.prior_preservation,
            class_images: self.class_images.map(|n| n as usize),
            prior_loss_weight: self.prior_loss_weight,
            class_dir: self.class_dir.clone(),
            export_full: self.export_full.clone(),
            dtype: self.dtype.dtype(),
            loss_scale: (self.loss_scale).or(TrainConfig::default_loss_scale(self.dtype.dtype())),
            sample_every: self.sample_every,
            sample_prompts,
            sample_seeds: prompts::parse_list(&self.sample_seeds, "--sample-seeds")?,
            sample_steps: self.sample_steps,
            tensorboard: self.tensorboard,
        })
    }

    pub(super) fn progress(&self) -> Progress {
        if self.quiet {
            Progress::Quiet
        } else if self.json {
            Progress::Json
        } else {
            Progress::Bar
        }
    }

    /// The settings of the command line (`m`), over those of `--config`'s file, checked
    /// for each of `methods` (none: the settings' own method), with their warnings
    /// printed; and the device, with Ctrl-C and SIGTERM caught.
    pub(super) fn resolve(
        &self,
        instance_dir: PathBuf,
        output_dir: PathBuf,
        methods: &[Method],
        m: &clap::ArgMatches,
    ) -> magictailor::Result<(TrainConfig, candle_core::Device, Interrupt)> {
        let cfg = self.config(instance_dir, output_dir)?;
        let (mut cfg, file) = with_settings_file(cfg, self.config.as_deref(), m)?;
        magictailor::model::loader::check_single_file_options(&cfg.model, &cfg.single_file)?;
        if let Some(&first) = methods.first() {
            cfg.method = first;
        }
        let own = [cfg.method];
        for &method in if methods.is_empty() {
            &own[..]
        } else {
            methods
        } {
            refuse_typed_flags_of_other_methods(method, m)?;
            TrainConfig {
                method,
                ..cfg.clone()
            }
            .validate()?;
        }
        // The model's own size, once everything that can be refused unread is checked
        // (train's pair folder too; batch checks each of its pairs later).
        if !given(m, "resolution") && !file.contains_key("resolution") {
            if !cfg.instance_dir.as_os_str().is_empty() {
                magictailor::data::class_words(&cfg.instance_dir)?;
            }
            cfg.resolution = native_side(&cfg.model, &cfg.single_file)?;
            cfg.validate()?;
        }
        self.check(&cfg)?;
        let device = magictailor::device::parse(&self.device)?;
        Ok((cfg, device, Interrupt::install(self.quiet)?))
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

pub(super) fn train_cmd(a: TrainArgs, m: &clap::ArgMatches) -> magictailor::Result<()> {
    let s = &a.settings;
    let instance_dir = a.instance_dir.unwrap_or_default();
    let (cfg, device, stop) = s.resolve(instance_dir, a.output_dir, &[], m)?;
    let out = cfg.output_dir.clone();
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

/// Refuses a flag typed on the command line that `method` does not read, even at its
/// default value (`TrainConfig::validate` catches the others, from any source, by value).
fn refuse_typed_flags_of_other_methods(
    method: Method,
    m: &clap::ArgMatches,
) -> magictailor::Result<()> {
    let typed: Vec<&str> = (flags_not_for(method).into_iter())
        .filter(|flag| given(m, &flag[2..].replace('-', "_")))
        .collect();
    if typed.is_empty() {
        return Ok(());
    }
    Err(not_for_method(&typed, method))
}

/// Whether setting `id` was typed on the command line.
fn given(m: &clap::ArgMatches, id: &str) -> bool {
    m.try_get_raw(id).is_ok() && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
}

/// `cfg` with the settings of `file` (`--config`) where the command line (`m`) gave none,
/// and the file's settings (none without a file).
fn with_settings_file(
    cfg: TrainConfig,
    file: Option<&std::path::Path>,
    m: &clap::ArgMatches,
) -> magictailor::Result<(TrainConfig, serde_json::Map<String, serde_json::Value>)> {
    let Some(file) = file else {
        return Ok((cfg, Default::default()));
    };
    let settings = magictailor::train::settings_file::read(file)?;
    let cfg = magictailor::train::settings_file::overlay(&cfg, &settings, |id| given(m, id))?;
    Ok((cfg, settings))
}
