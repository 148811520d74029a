//! Every training setting, its default (the paper's, docs/method.md), and the checks that
//! run before anything is loaded or written. The CLI reads its defaults from here.

use std::path::PathBuf;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::dm_deg::{Curve, Degradation};
use super::method::Method;
use crate::error::{Error, Result};
use crate::infer::prompts::PLACEHOLDER;
use crate::model::loader::{check_side, SingleFileOptions};

/// Pixels per latent cell of every SD VAE; the loader re-checks it against the model.
pub const SD_VAE_FACTOR: usize = 8;

/// Serialized as `magictailor.json`'s `config`, and read back (`train --config`); a
/// missing setting takes its default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub instance_dir: PathBuf,
    pub output_dir: PathBuf,
    /// Hub id, local diffusers folder, `tiny-random`, or a single `.safetensors` file.
    pub model: String,
    /// What a single-file `model` needs beside its weights.
    #[serde(flatten)]
    pub single_file: SingleFileOptions,
    /// The personalization method; the settings below it name which they apply to.
    pub method: Method,
    /// One-phase methods (`ti`): steps, rate (before `scale_lr`) and images per step;
    /// None takes the method's default ([`Method::one_phase`]).
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub images_per_step: Option<usize>,
    // MagicTailor's own settings, up to `released_script` but for `seed` and `resolution`.
    pub warmup_steps: usize,
    pub dsbal_steps: usize,
    pub warmup_lr: f64,
    /// The rate after warm-up: of DS-Bal, or of the joint phase with `ds_bal` off.
    pub dsbal_lr: f64,
    /// Multiply both rates by the number of reference images, as the released script does.
    pub scale_lr: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lambda_attn: f64,
    pub lambda_pres: f64,
    /// DM-Deg's intensity curve, initial intensity and decay exponent (eq. 4-5).
    pub dm_deg: Curve,
    pub alpha: f64,
    pub gamma: f64,
    /// Off: the "w/o DS-Bal" ablation, plain joint training after warm-up.
    pub ds_bal: bool,
    pub ema_decay: f64,
    pub seed: u64,
    pub resolution: usize,
    /// Images without masks are learned whole.
    pub no_masks: bool,
    pub checkpoint_every: Option<usize>,
    /// Keep only the newest N checkpoints; None: all.
    pub keep_checkpoints: Option<usize>,
    /// Reproduce the released script: DS-Bal's rate lasts one step, the momentum U-Net is
    /// hard-copied at its first update, the whole embedding table is trained and exported
    /// (docs/method.md, "Where we follow the released script").
    pub released_script: bool,
    /// Colour-jitter strength: brightness, contrast and saturation factors in [1 - s, 1 + s].
    pub jitter: f64,
    /// Flip horizontally with probability 1/2 (MagicTailor the whole batch, one-phase
    /// methods each image).
    pub flip: bool,
    /// Custom Diffusion's scale augmentation (off: its `--noaug`).
    pub scale_aug: bool,
    // Break-A-Scene's phases: the rows alone, then every weight (or adapters).
    pub phase1_steps: usize,
    pub phase1_lr: f64,
    pub phase2_steps: usize,
    /// None: 2e-6 (the source's), or with `phase2_lora` DreamBooth-LoRA's 1e-4.
    pub phase2_lr: Option<f64>,
    /// Phase 2 trains LoRA adapters of this rank on the U-Net instead of every weight.
    pub phase2_lora: Option<usize>,
    /// Break-A-Scene without its prior preservation (on in the source).
    pub no_prior_preservation: bool,
    /// DreamBooth and Custom Diffusion: prior preservation with class images the base
    /// model draws ("a photo of {class}"), each step as many as reference images.
    pub prior_preservation: bool,
    /// Class images per sample; None: the method's source's count.
    pub class_images: Option<usize>,
    pub prior_loss_weight: f64,
    /// Where class images are drawn and reused; None: `OUTPUT/class_images/`. Runs on
    /// the same base model and resolution can share one.
    pub class_dir: Option<PathBuf>,
    /// Methods that tune whole matrices: also write the base U-Net with them merged in,
    /// as a diffusers `unet/` folder in this folder.
    pub export_full: Option<PathBuf>,
    /// Precision of the frozen U-Net, VAE and text encoder; LoRA weights, pseudo-word
    /// rows, AdamW state and the losses stay f32.
    #[serde(serialize_with = "dtype_name", deserialize_with = "dtype_of")]
    pub dtype: DType,
    /// Static loss scale for f16 (gradients are unscaled before clipping; a step whose
    /// gradients overflow is skipped). None: no scaling.
    pub loss_scale: Option<f64>,
    /// Sample grids every N steps; None: at the phase switch and at the end; 0: never.
    pub sample_every: Option<usize>,
    /// A grid row per prompt, a column per seed, `sample_steps` DDIM steps each.
    pub sample_prompts: Vec<String>,
    pub sample_seeds: Vec<u64>,
    pub sample_steps: usize,
    /// Also write TensorBoard event files into `OUTPUT/tb/`.
    pub tensorboard: bool,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

fn dtype_of<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<DType, D::Error> {
    let name = String::deserialize(d)?;
    match name.as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(serde::de::Error::custom(format!(
            "dtype {other:?}: expected f32, f16 or bf16"
        ))),
    }
}

impl Default for TrainConfig {
    /// The paper's settings (docs/method.md).
    fn default() -> Self {
        Self {
            instance_dir: PathBuf::new(),
            output_dir: PathBuf::from(crate::io::run::DEFAULT_DIR),
            model: crate::model::loader::DEFAULT_MODEL.to_string(),
            single_file: SingleFileOptions::default(),
            method: Method::MagicTailor,
            steps: None,
            lr: None,
            images_per_step: None,
            warmup_steps: 200,
            dsbal_steps: 300,
            warmup_lr: 1e-4,
            dsbal_lr: 1e-5,
            scale_lr: true,
            lora_rank: 32,
            lora_alpha: 32.0,
            lambda_attn: 0.01,
            lambda_pres: 0.2,
            dm_deg: Curve::Dynamic,
            alpha: 0.5,
            gamma: 32.0,
            ds_bal: true,
            ema_decay: 0.99,
            seed: 0,
            resolution: 512,
            no_masks: false,
            checkpoint_every: None,
            keep_checkpoints: None,
            released_script: false,
            jitter: 0.1,
            flip: true,
            scale_aug: true,
            phase1_steps: 400,
            phase1_lr: 5e-4,
            phase2_steps: 400,
            phase2_lr: None,
            phase2_lora: None,
            no_prior_preservation: false,
            prior_preservation: false,
            class_images: None,
            prior_loss_weight: 1.0,
            class_dir: None,
            export_full: None,
            dtype: DType::F32,
            loss_scale: None,
            sample_every: None,
            sample_prompts: ["<v0>", "<v1>", PLACEHOLDER, "<v0> with <v1>, on the beach"]
                .map(String::from)
                .to_vec(),
            sample_seeds: vec![0, 1],
            sample_steps: 25,
            tensorboard: false,
        }
    }
}

impl TrainConfig {
    /// The paper's settings for one pair folder.
    pub fn new(instance_dir: PathBuf, output_dir: PathBuf, model: String) -> Self {
        Self {
            instance_dir,
            output_dir,
            model,
            ..Self::default()
        }
    }

    /// This config with its folders absolute (a local model folder too), so that what a
    /// run records works from any directory, and a resume from another directory
    /// compares equal.
    pub fn with_absolute_paths(mut self) -> Self {
        let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        self.instance_dir = abs(&self.instance_dir);
        self.output_dir = abs(&self.output_dir);
        self.class_dir = self.class_dir.as_deref().map(abs);
        self.export_full = self.export_full.as_deref().map(abs);
        if std::path::Path::new(&self.model).is_dir() {
            self.model = abs(std::path::Path::new(&self.model))
                .to_string_lossy()
                .into_owned();
        }
        self
    }

    pub fn total_steps(&self) -> usize {
        match self.method.one_phase() {
            None if self.method == Method::BreakAScene => self.phase1_steps + self.phase2_steps,
            None => self.warmup_steps + self.dsbal_steps,
            Some(_) => self.steps(),
        }
    }

    /// Break-A-Scene's phase 2 rate.
    pub fn phase2_lr(&self) -> f64 {
        let default = match self.phase2_lora {
            Some(_) => super::method::BAS_LORA_LR,
            None => 2e-6,
        };
        self.phase2_lr.unwrap_or(default)
    }

    /// Prior preservation is on: with `--prior-preservation`, or for Break-A-Scene
    /// unless `--no-prior-preservation`.
    pub fn prior_on(&self) -> bool {
        match self.method {
            Method::BreakAScene => !self.no_prior_preservation,
            _ => self.prior_preservation,
        }
    }

    /// The defaults of a one-phase method; MagicTailor's are unused placeholders.
    fn one_phase(&self) -> super::method::OnePhase {
        self.method.one_phase().unwrap_or(super::method::OnePhase {
            steps: 0,
            lr: 0.0,
            images_per_step: 0,
        })
    }

    /// A one-phase method's steps.
    pub fn steps(&self) -> usize {
        self.steps.unwrap_or(self.one_phase().steps)
    }

    /// A one-phase method's rate before `scale_lr`.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(self.one_phase().lr)
    }

    /// A one-phase method's images per step.
    pub fn images_per_step(&self) -> usize {
        self.images_per_step
            .unwrap_or(self.one_phase().images_per_step)
    }

    /// The last step of a first phase that another follows: MagicTailor's warm-up,
    /// Break-A-Scene's phase 1.
    pub fn phase_switch(&self) -> Option<usize> {
        let total = self.total_steps();
        let first = match self.method {
            Method::MagicTailor => self.warmup_steps,
            Method::BreakAScene => self.phase1_steps,
            _ => return None,
        };
        (first > 0 && first < total).then_some(first)
    }

    /// Whether step `d` renders a sample grid.
    pub fn samples_at(&self, d: usize) -> bool {
        let total = self.total_steps();
        let switch = self.phase_switch() == Some(d);
        match self.sample_every {
            Some(0) => false,
            Some(n) => d.is_multiple_of(n) || switch || d == total,
            None => switch || d == total,
        }
    }

    pub fn degradation(&self) -> Degradation {
        Degradation::new(self.dm_deg, self.alpha, self.gamma)
    }

    /// The loss scale f16 needs when none is given.
    pub fn default_loss_scale(dtype: DType) -> Option<f64> {
        (dtype == DType::F16).then_some(1024.0)
    }

    /// Refuses settings that cannot train, naming the flag and a value that works.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::usage(msg));
        self.refuse_flags_of_other_methods()?;
        if self.total_steps() == 0 {
            return bad(match self.method.one_phase() {
                None if self.method == Method::BreakAScene => {
                    "--phase1-steps and --phase2-steps are both 0: there is nothing to train."
                        .into()
                }
                None => {
                    "--warmup-steps and --dsbal-steps are both 0: there is nothing to train.".into()
                }
                Some(_) => "--steps 0: there is nothing to train.".into(),
            });
        }
        if self.method.one_phase().is_some() && self.images_per_step() == 0 {
            return bad("--images-per-step 0: a step needs at least one image.".into());
        }
        if self.phase2_lora == Some(0) {
            return bad("--phase2-lora 0: adapters need a rank of at least 1 (e.g. 4).".into());
        }
        if self.phase2_lora.is_some() && self.export_full.is_some() {
            return bad(
                "--export-full writes fine-tuned U-Net and text-encoder folders, and with \
                 --phase2-lora nothing is fine-tuned in full: the adapters are in \
                 pytorch_lora_weights.safetensors. Drop one of the two."
                    .into(),
            );
        }
        if self.lora_rank == 0 {
            return bad(
                "--lora-rank 0: the adapters need a rank of at least 1 (the paper uses 32).".into(),
            );
        }
        check_side(
            "--resolution",
            self.resolution,
            SD_VAE_FACTOR,
            SD_VAE_FACTOR,
        )?;
        for (flag, v) in [
            ("--lr", self.lr.unwrap_or(0.0)),
            ("--warmup-lr", self.warmup_lr),
            ("--dsbal-lr", self.dsbal_lr),
            ("--phase1-lr", self.phase1_lr),
            ("--phase2-lr", self.phase2_lr.unwrap_or(0.0)),
            ("--lambda-attn", self.lambda_attn),
            ("--lambda-pres", self.lambda_pres),
            ("--alpha", self.alpha),
            ("--gamma", self.gamma),
            ("--color-jitter", self.jitter),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{flag} {v}: expected a number >= 0."));
            }
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad(format!(
                "--lora-alpha {}: expected a positive number (the rank gives scale 1).",
                self.lora_alpha
            ));
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return bad(format!(
                "--ema-decay {}: expected a value in [0, 1] (the paper uses 0.99).",
                self.ema_decay
            ));
        }
        if self.jitter >= 1.0 {
            return bad(format!(
                "--color-jitter {}: factors in [1 - s, 1 + s] need s < 1 (the paper uses 0.1).",
                self.jitter
            ));
        }
        if self.sample_every != Some(0) {
            if self.sample_prompts.iter().all(|p| p.trim().is_empty()) {
                return bad(
                    "--sample-prompts: no prompts to sample (the file is empty?); \
                     --sample-every 0 turns sampling off."
                        .into(),
                );
            }
            if self.sample_seeds.is_empty() || self.sample_steps == 0 {
                return bad("--sample-seeds and --sample-steps need at least one each.".into());
            }
        }
        self.refuse_flags_without_ds_bal()?;
        self.check_prior()?;
        if let Some(s) = self.loss_scale {
            if !(s.is_finite() && s > 0.0) {
                return bad(format!(
                    "--loss-scale {s}: expected a positive number, e.g. 1024."
                ));
            }
        }
        Ok(())
    }

    /// Refuses a setting the chosen method does not read, naming it and the method: it
    /// would otherwise be silently ignored. A setting counts as given when it differs from
    /// its default (from any source: flags, `--config`, a record); the CLI also refuses a
    /// flag typed with its default value ([`applies`]).
    fn refuse_flags_of_other_methods(&self) -> Result<()> {
        let d = Self::default();
        let set: Vec<&str> = (FLAGS_BY_METHOD.iter())
            .filter(|(flag, _)| !applies(flag, self.method) && self.differs(flag, &d))
            .map(|(flag, _)| *flag)
            .collect();
        if set.is_empty() {
            return Ok(());
        }
        Err(not_for_method(&set, self.method))
    }

    /// Whether the setting of `flag` differs between `self` and `other`.
    fn differs(&self, flag: &str, other: &Self) -> bool {
        match flag {
            "--steps" => self.steps != other.steps,
            "--lr" => self.lr != other.lr,
            "--images-per-step" => self.images_per_step != other.images_per_step,
            "--warmup-steps" => self.warmup_steps != other.warmup_steps,
            "--dsbal-steps" => self.dsbal_steps != other.dsbal_steps,
            "--warmup-lr" => self.warmup_lr != other.warmup_lr,
            "--dsbal-lr" => self.dsbal_lr != other.dsbal_lr,
            "--lora-rank" => self.lora_rank != other.lora_rank,
            "--lora-alpha" => self.lora_alpha != other.lora_alpha,
            "--lambda-attn" => self.lambda_attn != other.lambda_attn,
            "--lambda-pres" => self.lambda_pres != other.lambda_pres,
            "--dm-deg" => self.dm_deg != other.dm_deg,
            "--alpha" => self.alpha != other.alpha,
            "--gamma" => self.gamma != other.gamma,
            "--no-ds-bal" => self.ds_bal != other.ds_bal,
            "--ema-decay" => self.ema_decay != other.ema_decay,
            "--color-jitter" => self.jitter != other.jitter,
            "--released-script" => self.released_script != other.released_script,
            "--no-scale-aug" => self.scale_aug != other.scale_aug,
            "--prior-preservation" => self.prior_preservation != other.prior_preservation,
            "--class-images" => self.class_images != other.class_images,
            "--prior-loss-weight" => self.prior_loss_weight != other.prior_loss_weight,
            "--class-dir" => self.class_dir != other.class_dir,
            "--phase1-steps" => self.phase1_steps != other.phase1_steps,
            "--phase1-lr" => self.phase1_lr != other.phase1_lr,
            "--phase2-steps" => self.phase2_steps != other.phase2_steps,
            "--phase2-lr" => self.phase2_lr != other.phase2_lr,
            "--phase2-lora" => self.phase2_lora != other.phase2_lora,
            "--no-prior-preservation" => self.no_prior_preservation != other.no_prior_preservation,
            "--export-full" => self.export_full != other.export_full,
            "--no-masks" => self.no_masks != other.no_masks,
            "--no-flip" => self.flip != other.flip,
            _ => false,
        }
    }

    /// The prior-preservation settings only apply with `--prior-preservation`.
    fn check_prior(&self) -> Result<()> {
        let w = self.prior_loss_weight;
        if !(w.is_finite() && w >= 0.0) {
            return Err(Error::usage(format!(
                "--prior-loss-weight {w}: expected a number >= 0 (the sources use 1)."
            )));
        }
        if self.class_images == Some(0) {
            return Err(Error::usage(
                "--class-images 0: prior preservation needs at least one class image per sample.",
            ));
        }
        let d = Self::default();
        let set: Vec<&str> = [
            ("--class-images", self.class_images.is_some()),
            ("--prior-loss-weight", w != d.prior_loss_weight),
            ("--class-dir", self.class_dir.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if self.prior_on() || set.is_empty() {
            return Ok(());
        }
        let (shape, it) = match set.len() {
            1 => ("shapes", "it"),
            _ => ("shape", "them"),
        };
        let turn_on = match self.method {
            Method::BreakAScene => "drop --no-prior-preservation",
            _ => "add --prior-preservation",
        };
        Err(Error::usage(format!(
            "{} only {shape} prior preservation: {turn_on}, or drop {it}.",
            set.join(", "),
        )))
    }

    /// The class images per class prompt: the flag's, else the method's source's
    /// (DreamBooth's and Break-A-Scene's `--num_class_images` 100, Custom Diffusion's 200).
    pub fn class_images(&self) -> usize {
        self.class_images.unwrap_or(match self.method {
            Method::CustomDiffusion => 200,
            _ => 100,
        })
    }

    /// Where class images go: `--class-dir`, else `OUTPUT/class_images`.
    pub fn class_dir(&self) -> PathBuf {
        (self.class_dir.clone())
            .unwrap_or_else(|| self.output_dir.join(crate::io::run::CLASS_IMAGES))
    }

    /// `--no-ds-bal` turns off the phase that `--ema-decay` and `--lambda-pres` shape, so
    /// setting either is a mistake to name, not a value to drop silently.
    fn refuse_flags_without_ds_bal(&self) -> Result<()> {
        if self.ds_bal || self.dsbal_steps == 0 {
            return Ok(());
        }
        let d = Self::default();
        let set: Vec<&str> = [
            ("--ema-decay", self.ema_decay != d.ema_decay),
            ("--lambda-pres", self.lambda_pres != d.lambda_pres),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if set.is_empty() {
            return Ok(());
        }
        let verb = if set.len() == 1 { "shapes" } else { "shape" };
        Err(Error::usage(format!(
            "--no-ds-bal: {} only {verb} DS-Bal, which --no-ds-bal turns off (the joint phase \
             after warm-up trains the warm-up objective at --dsbal-lr). Drop {}, or drop --no-ds-bal.",
            set.join(" and "),
            set.join(" and ")
        )))
    }

    /// Settings that are accepted but do something a user may not expect.
    ///
    /// (MagicTailor's warnings; a one-phase method has none of its own yet.)
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.no_masks {
            out.push(
                "--no-masks: images without masks are learned whole, so their background and other \
                 objects can leak into the pseudo-words (the semantic pollution MagicTailor's masks \
                 prevent)."
                    .into(),
            );
        }
        out
    }
}

/// The settings only some methods read, by flag, with those methods.
const FLAGS_BY_METHOD: [(&str, &[Method]); 32] = {
    const MT: &[Method] = &[Method::MagicTailor];
    const BAS: &[Method] = &[Method::BreakAScene];
    // Both weigh the cross-attention loss at 16x16.
    const ATTN: &[Method] = &[Method::MagicTailor, Method::BreakAScene];
    const ONE: &[Method] = &[
        Method::Ti,
        Method::DreamBooth,
        Method::CustomDiffusion,
        Method::Clic,
        Method::Vico,
    ];
    // ViCo's loss reads no masks.
    const MASKED: &[Method] = &[
        Method::MagicTailor,
        Method::Ti,
        Method::DreamBooth,
        Method::CustomDiffusion,
        Method::Clic,
        Method::BreakAScene,
    ];
    // DreamBooth's and ViCo's sources flip nothing.
    const FLIPPED: &[Method] = &[
        Method::MagicTailor,
        Method::Ti,
        Method::CustomDiffusion,
        Method::Clic,
        Method::BreakAScene,
    ];
    const CD: &[Method] = &[Method::CustomDiffusion];
    // Prior preservation off by default: `--prior-preservation` turns it on.
    const PRIOR: &[Method] = &[Method::DreamBooth, Method::CustomDiffusion];
    // The settings of the class images, wherever prior preservation can be on.
    const CLASS: &[Method] = &[
        Method::DreamBooth,
        Method::CustomDiffusion,
        Method::BreakAScene,
    ];
    const TUNED: &[Method] = &[Method::CustomDiffusion, Method::Clic, Method::BreakAScene];
    [
        ("--steps", ONE),
        ("--lr", ONE),
        ("--images-per-step", ONE),
        ("--warmup-steps", MT),
        ("--dsbal-steps", MT),
        ("--warmup-lr", MT),
        ("--dsbal-lr", MT),
        ("--lora-rank", MT),
        ("--lora-alpha", MT),
        ("--lambda-attn", ATTN),
        ("--lambda-pres", MT),
        ("--dm-deg", MT),
        ("--alpha", MT),
        ("--gamma", MT),
        ("--no-ds-bal", MT),
        ("--ema-decay", MT),
        ("--color-jitter", MT),
        ("--released-script", MT),
        ("--no-scale-aug", CD),
        ("--prior-preservation", PRIOR),
        ("--class-images", CLASS),
        ("--prior-loss-weight", CLASS),
        ("--class-dir", CLASS),
        ("--phase1-steps", BAS),
        ("--phase1-lr", BAS),
        ("--phase2-steps", BAS),
        ("--phase2-lr", BAS),
        ("--phase2-lora", BAS),
        ("--no-prior-preservation", BAS),
        ("--export-full", TUNED),
        ("--no-masks", MASKED),
        ("--no-flip", FLIPPED),
    ]
};

/// The flags whose settings `method` does not read.
pub fn flags_not_for(method: Method) -> Vec<&'static str> {
    (FLAGS_BY_METHOD.iter())
        .filter(|(_, methods)| !methods.contains(&method))
        .map(|(flag, _)| *flag)
        .collect()
}

/// Whether `method` reads the setting of `flag` (every flag not listed above applies to
/// every method).
pub fn applies(flag: &str, method: Method) -> bool {
    (FLAGS_BY_METHOD.iter())
        .find(|(f, _)| *f == flag)
        .is_none_or(|(_, methods)| methods.contains(&method))
}

/// The error for `flags`, which `method` does not read.
pub fn not_for_method(flags: &[&str], method: Method) -> Error {
    let hint = match method.one_phase() {
        Some(_) => " (it trains in one phase: --steps, --lr and --images-per-step set it)",
        None if method == Method::BreakAScene => {
            " (its phases take --phase1-steps/--phase2-steps and --phase1-lr/--phase2-lr)"
        }
        None => " (its phases take --warmup-steps/--dsbal-steps and --warmup-lr/--dsbal-lr)",
    };
    let (it, verb) = if flags.len() == 1 {
        ("it", "does")
    } else {
        ("them", "do")
    };
    Error::usage(format!(
        "--method {}: {} {verb} not apply to this method{hint}. Drop {it}, or choose the \
         method {it} belongs to.",
        method.name(),
        flags.join(", ")
    ))
}
