//! A training method as the step reads it: what trains, which losses with which weights,
//! the phases in order, and what each step draws. [`Recipe::new`] builds the recipe of
//! `--method`: MagicTailor (warm-up, then DS-Bal or the joint phase of the `--no-ds-bal`
//! ablation), Break-A-Scene's two phases, or one of the one-phase methods. The step reads
//! nothing method-specific from `TrainConfig` besides this value.

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::dm_deg::{Curve, Degradation};

/// `--method`: the personalization method a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum Method {
    /// MagicTailor (the paper): LoRA and pseudo-words, DM-Deg, warm-up then DS-Bal.
    #[default]
    #[serde(rename = "magictailor")]
    #[value(name = "magictailor")]
    MagicTailor,
    /// Textual Inversion as diffusers' example trains it: only the pseudo-word rows.
    #[serde(rename = "ti")]
    #[value(name = "ti")]
    Ti,
    /// DreamBooth-LoRA as diffusers' example trains it: LoRA on the attention
    /// projections, rare-token identifiers instead of new words.
    #[serde(rename = "dreambooth")]
    #[value(name = "dreambooth")]
    DreamBooth,
    /// Custom Diffusion as diffusers' example trains it: the cross-attentions' key and
    /// value matrices in full, and modifier-word rows.
    #[serde(rename = "custom-diffusion")]
    #[value(name = "custom-diffusion")]
    CustomDiffusion,
    /// CLiC as its authors' code trains it: the cross-attentions' q/k/v/out in full and
    /// the words' rows, with its attention, context and region-of-interest losses.
    #[serde(rename = "clic")]
    #[value(name = "clic")]
    Clic,
    /// ViCo as its authors' code trains it: the pseudo-word rows and image cross-attention
    /// blocks that see a reference image; the U-Net and text encoder stay frozen.
    #[serde(rename = "vico")]
    #[value(name = "vico")]
    Vico,
    /// Break-A-Scene as its authors' code trains it: the pseudo-word rows, then every
    /// U-Net and text-encoder weight (or, with `--phase2-lora`, adapters), with its
    /// attention loss and prior preservation.
    #[serde(rename = "break-a-scene")]
    #[value(name = "break-a-scene")]
    BreakAScene,
}

impl Method {
    /// The name `--method` takes and the record shows.
    pub fn name(self) -> &'static str {
        match self {
            Method::MagicTailor => "magictailor",
            Method::Ti => "ti",
            Method::DreamBooth => "dreambooth",
            Method::CustomDiffusion => "custom-diffusion",
            Method::Clic => "clic",
            Method::Vico => "vico",
            Method::BreakAScene => "break-a-scene",
        }
    }

    /// Whether its loss reads the images' masks (ViCo's does not: its folder needs none,
    /// and none are made).
    pub fn reads_masks(self) -> bool {
        self != Method::Vico
    }

    /// The defaults of a method trained in one phase (`--steps`, `--lr`,
    /// `--images-per-step`); None for MagicTailor and Break-A-Scene, whose two phases
    /// have flags of their own.
    pub fn one_phase(self) -> Option<OnePhase> {
        match self {
            Method::MagicTailor | Method::BreakAScene => None,
            // diffusers' README recipe: batch 1 with 4 accumulated, 3000 steps, lr 5e-4
            // (scaled by the 4 images).
            Method::Ti => Some(OnePhase {
                steps: 3000,
                lr: 5e-4,
                images_per_step: 4,
            }),
            // The README of train_dreambooth_lora.py: batch 1, 500 steps, lr 1e-4.
            Method::DreamBooth => Some(OnePhase {
                steps: 500,
                lr: 1e-4,
                images_per_step: 1,
            }),
            // The README of train_custom_diffusion.py: batch 2, 250 steps; the paper's rate
            // (the README's is 1e-5, scaled by the batch).
            Method::CustomDiffusion => Some(OnePhase {
                steps: 250,
                lr: 1e-4,
                images_per_step: 2,
            }),
            // The authors' reproduce.sh: batch 1, 500 steps; the paper's rate (the
            // script's is 1e-5).
            Method::Clic => Some(OnePhase {
                steps: 500,
                lr: 5e-5,
                images_per_step: 1,
            }),
            // The authors' config: 400 steps (they evaluate step 399's checkpoint), 4
            // images a step, the row's rate 5e-3 scaled by them.
            Method::Vico => Some(OnePhase {
                steps: 400,
                lr: 5e-3,
                images_per_step: 4,
            }),
        }
    }
}

/// The defaults of a method trained in one phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnePhase {
    pub steps: usize,
    /// Before `--scale-lr` multiplies it by the images per step.
    pub lr: f64,
    /// Images per optimizer step: a source's batch size times its accumulated batches
    /// (the mean over them is the same gradient, as the U-Net has no batch statistics).
    pub images_per_step: usize,
}

/// Break-A-Scene's class images' prompt (its `--class_prompt` default), one set for every
/// pair.
pub const BAS_CLASS_PROMPT: &str = "a photo at the beach";

/// Break-A-Scene's phase 2 rate with `--phase2-lora`: DreamBooth-LoRA's (the source's
/// 2e-6 is a full fine-tuning rate, far too small for adapters that start at zero).
pub const BAS_LORA_LR: f64 = 1e-4;

/// Custom Diffusion's modifier words start from these tokens' rows, one per sample
/// (`--initializer_token` of diffusers' script: "ktn+pll+ucd").
pub const CUSTOM_DIFFUSION_INIT: [&str; 3] = ["ktn", "pll", "ucd"];

/// The layers Custom Diffusion tunes in full (its `--freeze_model crossattn_kv`): every
/// cross-attention's key and value projections.
pub const CROSS_ATTENTION_KV: [&str; 2] = ["attn2.to_k", "attn2.to_v"];

/// The layers CLiC tunes in full (its processors' `train_q_out`): every
/// cross-attention's four projections, the output's bias too.
pub const CROSS_ATTENTION_ALL: [&str; 4] =
    ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"];

/// CLiC's prompts for the region-of-interest image, one drawn per image per step, `{}`
/// the word (its `reconstructor_prompts`).
pub const CLIC_ROI_PROMPTS: [&str; 8] = [
    "A photo of {}",
    "A pattern of {}",
    "{}",
    "{} on a blank background",
    "A photo of {} on a blank background",
    "{} style",
    "A photo of {} style",
    "{} style on a blank background",
];

/// DreamBooth's identifiers, one per sample: rare tokens of CLIP's vocabulary that the
/// community uses ("sks" is the DreamBooth README's), each followed by its class word.
pub const DREAMBOOTH_IDENTIFIERS: [&str; 4] = ["sks", "ohwx", "zwx", "phol"];

/// The layers DreamBooth-LoRA adapts: every attention's projections (diffusers'
/// `target_modules`).
pub const ATTENTION_PROJECTIONS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// Textual Inversion's prompts, diffusers' `imagenet_templates_small` ("object"): one
/// drawn per image per step, `{}` the pseudo-word.
pub const TI_TEMPLATES: [&str; 27] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// The weights of the loss terms after the (masked) diffusion loss; the default is the
/// masked diffusion loss alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossWeights {
    /// The cross-attention loss (0: off).
    pub lambda_attn: f64,
    /// DS-Bal's preserving regularization against the momentum adapters.
    pub lambda_pres: f64,
    /// CLiC's objective in place of the masked diffusion loss and the two above.
    pub clic: Option<ClicWeights>,
    /// Prior preservation: the class images' loss weight (0: none drawn).
    pub prior: f64,
    /// ViCo's objective: plain eps-MSE + this weight times L_reg, through the blocks.
    pub vico_reg: Option<f64>,
    /// L_attn sums over the step's words instead of averaging over its images
    /// (Break-A-Scene's, one word per image here).
    pub attn_summed: bool,
}

/// CLiC's loss: `attention * L_att + context * L_context + roi * L_RoI`; L_context weighs
/// the background (mask below 0.05) by `background`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClicWeights {
    pub attention: f64,
    pub context: f64,
    pub roi: f64,
    pub background: f64,
}

impl ClicWeights {
    /// The weights of the authors' reproduce.sh and the paper.
    pub const PAPER: Self = Self {
        attention: 0.25,
        context: 0.5,
        roi: 0.25,
        background: 0.25,
    };
}

/// A phase's objective, by the name `train_log.jsonl` and the progress bar show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Mean masked diffusion loss + lambda_attn * L_attn.
    WarmUp,
    /// Dual-Stream Balancing: the hardest sample's loss + lambda_pres * L_pres against the
    /// momentum adapters + lambda_attn * L_attn.
    DsBal,
    /// `--no-ds-bal`: the warm-up objective, in a phase of its own.
    Joint,
    /// Textual Inversion: the mean masked diffusion loss, only the pseudo-word rows train.
    TextualInversion,
    /// DreamBooth-LoRA: the mean masked diffusion loss, only the adapters train.
    DreamBooth,
    /// Custom Diffusion: the mean masked diffusion loss; the cross-attention key/value
    /// matrices and the modifier rows train.
    CustomDiffusion,
    /// CLiC: its attention, context and region-of-interest losses.
    Clic,
    /// ViCo: the diffusion loss through the image cross-attention blocks, + L_reg.
    Vico,
    /// Break-A-Scene's phase 1: only the pseudo-word rows train.
    BasTokens,
    /// Break-A-Scene's phase 2: every U-Net and text-encoder weight (or adapters), with
    /// the rows.
    BasWeights,
}

impl Phase {
    /// The name `train_log.jsonl` and the progress bar show.
    pub fn name(self) -> &'static str {
        match self {
            Phase::WarmUp => "warm-up",
            Phase::DsBal => "ds-bal",
            Phase::Joint => "joint",
            Phase::TextualInversion => "ti",
            Phase::DreamBooth => "dreambooth",
            Phase::CustomDiffusion => "custom-diffusion",
            Phase::Clic => "clic",
            Phase::Vico => "vico",
            Phase::BasTokens => "bas-tokens",
            Phase::BasWeights => "bas-weights",
        }
    }
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One phase of a recipe: its objective, length and learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct PhasePlan {
    pub phase: Phase,
    pub steps: usize,
    /// The learning rate of the phase's steps.
    pub lr: f64,
    /// The rate of its steps after the first, where it differs (`--released-script`: the
    /// script's scheduler resets DS-Bal's rate to the warm-up one after one step).
    pub lr_after_first: Option<f64>,
    /// The phase starts with a new optimizer (moments and step count from zero) instead
    /// of continuing the previous phase's.
    pub fresh_optimizer: bool,
    /// The U-Net side (adapters, tuned or full weights) trains in this phase; off, only
    /// the pseudo-word rows do (Break-A-Scene's phase 1).
    pub trains_weights: bool,
}

/// What the optimizer updates.
#[derive(Debug, Clone, PartialEq)]
pub struct Trains {
    /// One pseudo-word embedding row per sample, starting as `row_init` says; off, the
    /// samples are named by `Recipe::identifiers`.
    pub rows: bool,
    pub row_init: RowInit,
    /// LoRA adapters on every layer the U-Net's `lora_targets` names.
    pub lora: Option<LoraShape>,
    /// Whole matrices of the U-Net layers whose names end so, each starting as its base
    /// weight.
    pub tuned: Option<&'static [&'static str]>,
    /// Also the whole token-embedding table (`--released-script`).
    pub token_table: bool,
    /// Gradient clipping, as the source's `clip_grad_norm_` call; None: none.
    pub clip: Option<GradClip>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// ViCo's image cross-attention blocks, at this fixed rate (the phase's rate is the
    /// rows').
    pub vico_blocks: Option<f64>,
    /// Every U-Net and text-encoder weight, token table included (Break-A-Scene's phase
    /// 2), made when the first phase that trains weights starts.
    pub full: bool,
}

impl Trains {
    /// The pseudo-word rows alone, from their class words, AdamW with weight decay 1e-2
    /// and no clipping (Textual Inversion's; ViCo adds its blocks).
    fn words_only() -> Self {
        Self {
            rows: true,
            row_init: RowInit::ClassWord,
            lora: None,
            tuned: None,
            token_table: false,
            clip: None,
            weight_decay: 1e-2,
            vico_blocks: None,
            full: false,
        }
    }
}

/// Where each sample's pseudo-word row starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowInit {
    /// The embedding of the first token of its class word.
    ClassWord,
    /// Sample `s` from the embedding of token `words[s]`.
    Words(&'static [&'static str]),
}

/// Which gradients are clipped together to a global norm: the U-Net's (adapters and tuned
/// matrices), and with `with_text` the text side's too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradClip {
    pub max_norm: f64,
    pub with_text: bool,
}

/// The rank and alpha of trained LoRA adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraShape {
    pub rank: usize,
    pub alpha: f64,
    /// The U-Net's adaptable layers whose names end so; None: all of them.
    pub only: Option<&'static [&'static str]>,
}

/// The momentum adapters of DS-Bal phases: a copy of the online ones when the first
/// DS-Bal step starts, then an EMA of them after every DS-Bal update.
#[derive(Debug, Clone, PartialEq)]
pub struct Momentum {
    pub ema_decay: f64,
    /// The first DS-Bal update copies the online adapters again instead of averaging
    /// (`--released-script`).
    pub copy_at_first_update: bool,
}

/// What a step draws: which reference images, each prompted with its sample's
/// pseudo-word, augmented, then degraded outside its mask (DM-Deg).
#[derive(Debug, Clone)]
pub struct Draw {
    pub pick: Pick,
    pub prompts: Prompts,
    /// Colour-jitter strengths of brightness, contrast and saturation (factors in
    /// [1 - s, 1 + s], one set a step); all 0 is none.
    pub jitter: [f64; 3],
    pub flip: Flip,
    /// Custom Diffusion's scale augmentation: each image shrunk onto a blank canvas or
    /// enlarged and cropped, its prompt prefixed to say so ([`super::augment::Rescale`]).
    pub rescale: bool,
    /// CLiC: each image also goes in masked (grey outside its mask), prompted with one of
    /// these templates, with the same noise and timestep.
    pub roi: Option<&'static [&'static str]>,
    /// ViCo: each image comes with a reference, another image of its own sample (itself
    /// where the sample has one), drawn per step.
    pub reference: bool,
    pub degradation: Degradation,
}

impl Draw {
    /// Every image goes to the VAE as it is on disk: no jitter, flip, rescale, masked copy
    /// or DM-Deg, so each image's posterior is the same every step.
    pub fn is_clean(&self) -> bool {
        self.jitter.iter().all(|&s| s == 0.0)
            && self.flip == Flip::Off
            && !self.rescale
            && self.roi.is_none()
            && self.degradation == Degradation::Off
    }
}

/// Which reference images a step trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Every image, in sample order.
    All,
    /// This many, each drawn uniformly from all images (with replacement).
    Random(usize),
    /// Break-A-Scene's union sampling: k drawn uniformly from 1..=samples, then a random
    /// k-subset of the samples, one image of each drawn uniformly.
    Union,
}

/// The prompt of an image, given its sample's pseudo-word.
#[derive(Debug, Clone, Copy)]
pub enum Prompts {
    /// Always this prompt.
    Fixed(fn(&str) -> String),
    /// A template drawn per image per step; `{}` is the pseudo-word.
    Templates(&'static [&'static str]),
}

impl Prompts {
    /// The first choice: the fixed prompt, or the first template.
    pub fn first(&self, word: &str) -> String {
        match self {
            Prompts::Fixed(f) => f(word),
            Prompts::Templates(t) => t[0].replace("{}", word),
        }
    }
}

/// The horizontal flip a step draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    Off,
    /// The whole batch with probability 1/2 (the released MagicTailor script).
    Batch,
    /// Each image with probability 1/2 (torchvision's `RandomHorizontalFlip` per item).
    PerImage,
}

/// Prior preservation's class images: drawn once by the base model, then mixed into
/// every step's batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassImages {
    /// Images per class prompt.
    pub count: usize,
    /// One folder per class prompt inside.
    pub dir: std::path::PathBuf,
    pub prompt: ClassPrompt,
    /// Class images a step draws: as many as reference images (None), or this many.
    pub per_step: Option<usize>,
}

/// What the class images show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassPrompt {
    /// [`CLASS_PROMPT`] with each sample's class word: one set per sample (DreamBooth,
    /// Custom Diffusion).
    OfClassWord,
    /// One prompt for the whole run (Break-A-Scene's [`BAS_CLASS_PROMPT`]).
    Fixed(&'static str),
}

impl ClassPrompt {
    /// The prompt of the class images standing beside a sample of `class`.
    pub fn text(self, class: &str) -> String {
        match self {
            ClassPrompt::OfClassWord => CLASS_PROMPT.replace("{}", class),
            ClassPrompt::Fixed(p) => p.to_string(),
        }
    }
}

/// The class images' prompt, `{}` the class word (DreamBooth's README: "a photo of dog").
pub const CLASS_PROMPT: &str = "a photo of {}";

/// A training method, as the trainer runs it.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub method: Method,
    pub trains: Trains,
    /// Existing tokens naming the samples in place of trained rows (DreamBooth): sample
    /// `s`'s word stands for `"{identifiers[s]} {class word}"`.
    pub identifiers: Option<&'static [&'static str]>,
    /// The weights of L_attn and L_pres (L_diff weighs 1).
    pub losses: LossWeights,
    /// In order; step `d` (from 1) belongs to the first phase whose steps reach it.
    pub phases: Vec<PhasePlan>,
    /// DS-Bal's momentum adapters (only read in DS-Bal phases).
    pub momentum: Momentum,
    pub draw: Draw,
    /// Prior preservation's class images (their weight is `losses.prior`).
    pub class_images: Option<ClassImages>,
}

/// Where a step falls in its recipe.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    pub plan: &'a PhasePlan,
    /// The step is its phase's first.
    pub first: bool,
}

impl At<'_> {
    pub fn phase(&self) -> Phase {
        self.plan.phase
    }

    /// The learning rate of this step.
    pub fn lr(&self) -> f64 {
        match self.plan.lr_after_first {
            Some(lr) if !self.first => lr,
            _ => self.plan.lr,
        }
    }
}

impl Recipe {
    /// The recipe of `cfg.method` on a folder of `n_images` reference images.
    pub fn new(cfg: &TrainConfig, n_images: usize) -> Self {
        match cfg.method {
            Method::MagicTailor => Self::magictailor(cfg, n_images),
            Method::Ti => Self::textual_inversion(cfg),
            Method::DreamBooth => Self::dreambooth(cfg),
            Method::CustomDiffusion => Self::custom_diffusion(cfg),
            Method::Clic => Self::clic(cfg),
            Method::Vico => Self::vico(cfg),
            Method::BreakAScene => Self::break_a_scene(cfg),
        }
    }

    /// MagicTailor (paper §3): `warmup_steps` of warm-up, then `dsbal_steps` of DS-Bal (or,
    /// with `--no-ds-bal`, of the warm-up objective at the DS-Bal rate), on all `n_images`
    /// reference images each step (the rates' scale under `--scale-lr`).
    pub fn magictailor(cfg: &TrainConfig, n_images: usize) -> Self {
        let scale = if cfg.scale_lr { n_images as f64 } else { 1.0 };
        let second = if cfg.ds_bal {
            Phase::DsBal
        } else {
            Phase::Joint
        };
        let phases = vec![
            PhasePlan {
                phase: Phase::WarmUp,
                steps: cfg.warmup_steps,
                lr: cfg.warmup_lr * scale,
                lr_after_first: None,
                fresh_optimizer: false,
                trains_weights: true,
            },
            PhasePlan {
                phase: second,
                steps: cfg.dsbal_steps,
                lr: cfg.dsbal_lr * scale,
                lr_after_first: cfg.released_script.then_some(cfg.warmup_lr * scale),
                fresh_optimizer: false,
                trains_weights: true,
            },
        ];
        Self {
            method: Method::MagicTailor,
            trains: Trains {
                rows: true,
                row_init: RowInit::ClassWord,
                lora: Some(LoraShape {
                    rank: cfg.lora_rank,
                    alpha: cfg.lora_alpha,
                    only: None,
                }),
                tuned: None,
                token_table: cfg.released_script,
                // As the released script: only the U-Net's (LoRA) gradients are clipped.
                clip: Some(GradClip {
                    max_norm: 1.0,
                    with_text: false,
                }),
                weight_decay: 1e-2,
                vico_blocks: None,
                full: false,
            },
            identifiers: None,
            losses: LossWeights {
                lambda_attn: cfg.lambda_attn,
                lambda_pres: cfg.lambda_pres,
                clic: None,
                prior: 0.0,
                vico_reg: None,
                attn_summed: false,
            },
            phases,
            momentum: Momentum {
                ema_decay: cfg.ema_decay,
                copy_at_first_update: cfg.released_script,
            },
            draw: Draw {
                pick: Pick::All,
                prompts: Prompts::Fixed(|word| format!("A photo of {word}")),
                jitter: [cfg.jitter; 3],
                flip: if cfg.flip { Flip::Batch } else { Flip::Off },
                rescale: false,
                roi: None,
                reference: false,
                degradation: cfg.degradation(),
            },
            class_images: None,
        }
    }

    /// Textual Inversion (Gal et al. 2022), as diffusers' `textual_inversion.py` trains
    /// it, with the paper's masked diffusion loss (docs/method.md): only the pseudo-word
    /// rows, AdamW (weight decay 1e-2, no clipping) at a constant rate, `images_per_step`
    /// images a step drawn at random, each with a random template and its own flip.
    pub fn textual_inversion(cfg: &TrainConfig) -> Self {
        let trains = Trains::words_only();
        let flip = if cfg.flip { Flip::PerImage } else { Flip::Off };
        let prompts = Prompts::Templates(&TI_TEMPLATES);
        Self::one_phase(cfg, Phase::TextualInversion, trains, None, prompts, flip)
    }

    /// DreamBooth-LoRA, as diffusers' `train_dreambooth_lora.py` with its README recipe,
    /// with the paper's masked diffusion loss (docs/method.md): LoRA of rank 4 (alpha 4,
    /// A ~ N(0, 1/r), B = 0) on every attention's q/k/v/out projections, their gradients
    /// clipped to norm 1, AdamW (weight decay 1e-2) at a constant 1e-4; one image a step,
    /// prompted "a photo of {identifier} {class}"; no flip (the script has none).
    pub fn dreambooth(cfg: &TrainConfig) -> Self {
        let trains = Trains {
            rows: false,
            row_init: RowInit::ClassWord,
            lora: Some(LoraShape {
                rank: 4,
                alpha: 4.0,
                only: Some(&ATTENTION_PROJECTIONS),
            }),
            tuned: None,
            token_table: false,
            clip: Some(GradClip {
                max_norm: 1.0,
                with_text: false,
            }),
            weight_decay: 1e-2,
            vico_blocks: None,
            full: false,
        };
        let ids = Some(&DREAMBOOTH_IDENTIFIERS[..]);
        let prompts = Prompts::Fixed(|word| format!("a photo of {word}"));
        Self::one_phase(cfg, Phase::DreamBooth, trains, ids, prompts, Flip::Off).with_prior(cfg)
    }

    /// `--prior-preservation`: class images and their loss weight.
    fn with_prior(mut self, cfg: &TrainConfig) -> Self {
        if cfg.prior_preservation {
            self.class_images = Some(ClassImages {
                count: cfg.class_images(),
                dir: cfg.class_dir(),
                prompt: ClassPrompt::OfClassWord,
                per_step: None,
            });
            self.losses.prior = cfg.prior_loss_weight;
        }
        self
    }

    /// Custom Diffusion (Kumari et al. 2023), as diffusers' `train_custom_diffusion.py`
    /// with its README recipe, the paper's rate and masked diffusion loss
    /// (docs/method.md): every cross-attention's key and value matrices in full (the
    /// start-of-text token's keys and values pass no gradient), one modifier row per
    /// sample from "ktn", "pll", "ucd"; all their gradients clipped together to norm 1;
    /// AdamW (weight decay 1e-2) at a constant rate; two images a step, each flipped and
    /// rescaled at random, prompted "photo of a {word}" with the scale's prefix.
    pub fn custom_diffusion(cfg: &TrainConfig) -> Self {
        let trains = Trains {
            rows: true,
            row_init: RowInit::Words(&CUSTOM_DIFFUSION_INIT),
            lora: None,
            tuned: Some(&CROSS_ATTENTION_KV),
            token_table: false,
            clip: Some(GradClip {
                max_norm: 1.0,
                with_text: true,
            }),
            weight_decay: 1e-2,
            vico_blocks: None,
            full: false,
        };
        let flip = if cfg.flip { Flip::PerImage } else { Flip::Off };
        let prompts = Prompts::Fixed(|word| format!("photo of a {word}"));
        let mut r = Self::one_phase(cfg, Phase::CustomDiffusion, trains, None, prompts, flip);
        r.draw.rescale = cfg.scale_aug;
        r.with_prior(cfg)
    }

    /// CLiC (Safaee et al. 2024), as its authors' `learning.py` trains it with their
    /// reproduce.sh (`--instance_mode style --noaug`) and the paper's rate
    /// (docs/method.md): every cross-attention's q/k/v/out in full (the out bias too; the
    /// start-of-text token's keys and values pass no gradient) and one row per sample from
    /// "ktn", "pll", "ucd"; its three losses; all gradients clipped together to norm 1;
    /// AdamW with weight decay 0.1; one image a step with a brightness jitter of 0.5 and a
    /// flip, and its masked copy prompted with a region-of-interest template.
    pub fn clic(cfg: &TrainConfig) -> Self {
        let trains = Trains {
            rows: true,
            row_init: RowInit::Words(&CUSTOM_DIFFUSION_INIT),
            lora: None,
            tuned: Some(&CROSS_ATTENTION_ALL),
            token_table: false,
            clip: Some(GradClip {
                max_norm: 1.0,
                with_text: true,
            }),
            weight_decay: 0.1,
            vico_blocks: None,
            full: false,
        };
        let flip = if cfg.flip { Flip::PerImage } else { Flip::Off };
        let prompts = Prompts::Fixed(|word| format!("a photo of {word}"));
        let mut r = Self::one_phase(cfg, Phase::Clic, trains, None, prompts, flip);
        r.losses.clic = Some(ClicWeights::PAPER);
        r.draw.jitter = [0.5, 0.0, 0.0];
        r.draw.roi = Some(&CLIC_ROI_PROMPTS);
        r
    }

    /// ViCo (Hao et al. 2023), as its authors' code trains it (docs/method.md): the
    /// pseudo-word rows (from the class word) at the phase's rate and the image
    /// cross-attention blocks at 1e-5, AdamW with weight decay 1e-2, no clipping; four
    /// images a step, each with a template prompt, no flip, and its reference; eps-MSE +
    /// 5e-4 L_reg.
    pub fn vico(cfg: &TrainConfig) -> Self {
        let trains = Trains {
            vico_blocks: Some(1e-5),
            ..Trains::words_only()
        };
        let prompts = Prompts::Templates(&TI_TEMPLATES);
        let mut r = Self::one_phase(cfg, Phase::Vico, trains, None, prompts, Flip::Off);
        r.losses.vico_reg = Some(crate::model::vico::REG_WEIGHT);
        r.draw.reference = true;
        r
    }

    /// Break-A-Scene (Avrahami et al. 2023), as its authors' `train.py` trains it, with
    /// the paper's masked diffusion loss and one pseudo-word per sample (docs/method.md):
    /// phase 1 trains only the rows (from the class words); phase 2 starts a new AdamW
    /// over every U-Net and text-encoder weight, the token table and the rows included
    /// (with `--phase2-lora`, U-Net adapters and the rows). Both phases: weight decay
    /// 1e-2, every gradient clipped together to norm 1, constant rates, union sampling
    /// with a flip per image, L_attn summed over the step's words, and prior preservation
    /// on "a photo at the beach" images, one a step.
    pub fn break_a_scene(cfg: &TrainConfig) -> Self {
        let lora = cfg.phase2_lora.map(|rank| LoraShape {
            rank,
            alpha: rank as f64,
            only: None,
        });
        let trains = Trains {
            rows: true,
            row_init: RowInit::ClassWord,
            full: lora.is_none(),
            lora,
            tuned: None,
            token_table: false,
            clip: Some(GradClip {
                max_norm: 1.0,
                with_text: true,
            }),
            weight_decay: 1e-2,
            vico_blocks: None,
        };
        let plan = |phase, steps, lr, trains_weights| PhasePlan {
            phase,
            steps,
            lr,
            lr_after_first: None,
            fresh_optimizer: trains_weights,
            trains_weights,
        };
        let phases = vec![
            plan(Phase::BasTokens, cfg.phase1_steps, cfg.phase1_lr, false),
            plan(Phase::BasWeights, cfg.phase2_steps, cfg.phase2_lr(), true),
        ];
        let prior = cfg.prior_on();
        Self {
            method: Method::BreakAScene,
            trains,
            identifiers: None,
            losses: LossWeights {
                lambda_attn: cfg.lambda_attn,
                prior: if prior { cfg.prior_loss_weight } else { 0.0 },
                attn_summed: true,
                ..LossWeights::default()
            },
            phases,
            momentum: Momentum {
                ema_decay: 0.0,
                copy_at_first_update: false,
            },
            draw: Draw {
                pick: Pick::Union,
                prompts: Prompts::Fixed(|word| format!("a photo of {word}")),
                jitter: [0.0; 3],
                flip: if cfg.flip { Flip::PerImage } else { Flip::Off },
                rescale: false,
                roi: None,
                reference: false,
                degradation: Degradation::new(Curve::Off, 0.0, 0.0),
            },
            class_images: prior.then(|| ClassImages {
                count: cfg.class_images(),
                dir: cfg.class_dir(),
                prompt: ClassPrompt::Fixed(BAS_CLASS_PROMPT),
                per_step: Some(1),
            }),
        }
    }

    /// A method of one phase: `cfg.steps()` steps at `cfg.lr()` (times the images per
    /// step under `scale_lr`), the masked diffusion loss alone, `cfg.images_per_step()`
    /// images drawn at random each step, no jitter and no DM-Deg.
    fn one_phase(
        cfg: &TrainConfig,
        phase: Phase,
        trains: Trains,
        identifiers: Option<&'static [&'static str]>,
        prompts: Prompts,
        flip: Flip,
    ) -> Self {
        let per_step = cfg.images_per_step();
        let scale = if cfg.scale_lr { per_step as f64 } else { 1.0 };
        Self {
            method: cfg.method,
            trains,
            identifiers,
            losses: LossWeights::default(),
            phases: vec![PhasePlan {
                phase,
                steps: cfg.steps(),
                lr: cfg.lr() * scale,
                lr_after_first: None,
                fresh_optimizer: false,
                trains_weights: true,
            }],
            momentum: Momentum {
                ema_decay: 0.0,
                copy_at_first_update: false,
            },
            draw: Draw {
                pick: Pick::Random(per_step),
                prompts,
                jitter: [0.0; 3],
                flip,
                rescale: false,
                roi: None,
                reference: false,
                degradation: Degradation::new(Curve::Off, 0.0, 0.0),
            },
            class_images: None,
        }
    }

    /// The recipe as `magictailor.json` records it, every default resolved.
    pub fn describe(&self, n_images: usize) -> serde_json::Value {
        let phases: Vec<serde_json::Value> = (self.phases.iter())
            .map(|p| {
                serde_json::json!({
                    "phase": p.phase.name(),
                    "steps": p.steps,
                    "lr": p.lr,
                    "lr_after_first": p.lr_after_first,
                })
            })
            .collect();
        let lora = self.trains.lora.as_ref().map(|l| {
            serde_json::json!({
                "rank": l.rank,
                "alpha": l.alpha,
                "layers": l.only.map_or(serde_json::json!("all"), |o| serde_json::json!(o)),
            })
        });
        let clip = self.trains.clip.map(|c| {
            serde_json::json!({
                "max_norm": c.max_norm,
                "of": if c.with_text { "all trained weights" } else { "the U-Net's" },
            })
        });
        let row_init = match self.trains.row_init {
            RowInit::ClassWord => serde_json::json!("class word"),
            RowInit::Words(w) => serde_json::json!(w),
        };
        let prompts = match self.draw.prompts {
            Prompts::Fixed(f) => serde_json::json!({ "fixed": f("{}") }),
            Prompts::Templates(t) => serde_json::json!({ "templates": t }),
        };
        serde_json::json!({
            "name": self.method.name(),
            "trains": {
                "pseudo_word_rows": self.trains.rows,
                "rows_start_from": row_init,
                "lora": lora,
                "full_matrices": self.trains.tuned,
                "every_unet_and_text_encoder_weight": self.trains.full,
                "token_table": self.trains.token_table,
            },
            "grad_clip": clip,
            "weight_decay": self.trains.weight_decay,
            "prior_preservation": self.class_images.as_ref().map(|c| self.describe_prior(c)),
            "clic_loss_weights": self.losses.clic.map(|c| serde_json::json!({
                "attention": c.attention,
                "context": c.context,
                "roi": c.roi,
                "background": c.background,
            })),
            "loss_weights": {
                "l_diff": 1.0,
                "lambda_attn": self.losses.lambda_attn,
                "lambda_pres": self.losses.lambda_pres,
                "l_attn_over_words": if self.losses.attn_summed { "sum" } else { "mean" },
            },
            "phases": phases,
            "identifiers": self.identifiers,
            "images_per_step": match self.draw.pick {
                Pick::Union => serde_json::json!("one image of each sample in a random non-empty subset"),
                _ => serde_json::json!(self.images_per_step(n_images)),
            },
            "trains_weights_in_phases": (self.phases.iter())
                .filter(|p| p.trains_weights)
                .map(|p| p.phase.name())
                .collect::<Vec<_>>(),
            "prompts": prompts,
            "flip": match self.draw.flip {
                Flip::Off => "off",
                Flip::Batch => "batch",
                Flip::PerImage => "per-image",
            },
            "color_jitter": {
                "brightness": self.draw.jitter[0],
                "contrast": self.draw.jitter[1],
                "saturation": self.draw.jitter[2],
            },
            "scale_augmentation": self.draw.rescale,
            "roi_prompts": self.draw.roi,
            "vico": self.trains.vico_blocks.map(|lr| serde_json::json!({
                "block_lr": lr,
                "reg_weight": self.losses.vico_reg,
                "otsu_levels": crate::model::vico::OTSU_LEVELS,
                "reference": "another image of the image's own sample, drawn per step",
            })),
        })
    }

    /// Prior preservation as the record shows it.
    fn describe_prior(&self, c: &ClassImages) -> serde_json::Value {
        let count = match c.prompt {
            ClassPrompt::OfClassWord => "class_images_per_sample",
            ClassPrompt::Fixed(_) => "class_images",
        };
        let per_step = match c.per_step {
            Some(n) => serde_json::json!(n),
            None => serde_json::json!("as many as reference images"),
        };
        let mut out = serde_json::json!({
            "prompt": c.prompt.text("{}"),
            "per_step": per_step,
            "loss_weight": self.losses.prior,
            "dir": c.dir,
        });
        out[count] = serde_json::json!(c.count);
        out
    }

    /// Images a step trains on, out of `n_images` (union sampling: at most one per
    /// sample, so at most `n_images`).
    pub fn images_per_step(&self, n_images: usize) -> usize {
        match self.draw.pick {
            Pick::All | Pick::Union => n_images,
            Pick::Random(k) => k,
        }
    }

    /// The most images a step trains on, out of `n_images` of `n_samples` samples.
    pub fn max_images_per_step(&self, n_images: usize, n_samples: usize) -> usize {
        match self.draw.pick {
            Pick::Union => n_samples.min(n_images),
            _ => self.images_per_step(n_images),
        }
    }

    /// Every phase's steps.
    pub fn total_steps(&self) -> usize {
        self.phases.iter().map(|p| p.steps).sum()
    }

    /// Where step `d` (from 1) falls: past the last phase, in the last.
    pub fn at(&self, d: usize) -> At<'_> {
        let mut start = 0;
        for plan in &self.phases {
            if d <= start + plan.steps {
                return At {
                    plan,
                    first: d == start + 1,
                };
            }
            start += plan.steps;
        }
        let plan = self.phases.last().expect("a recipe has a phase");
        At {
            plan,
            first: d == start - plan.steps + 1,
        }
    }

    /// Step `d` ends a phase and another follows (where a run always saves a checkpoint).
    pub fn switches_after(&self, d: usize) -> bool {
        d > 0 && d < self.total_steps() && self.at(d + 1).first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phase, rate, switch and first DS-Bal step of every step, as the trainer
    /// computed them from the settings before recipes.
    #[test]
    fn magictailor_phases_and_rates_follow_the_settings() {
        for (warmup, dsbal) in [(0, 3), (2, 0), (2, 3), (3, 1)] {
            for (ds_bal, released, scale_lr) in (0..8).map(|i| (i & 1 > 0, i & 2 > 0, i & 4 > 0)) {
                let cfg = TrainConfig {
                    warmup_steps: warmup,
                    dsbal_steps: dsbal,
                    ds_bal,
                    released_script: released,
                    scale_lr,
                    ..TrainConfig::default()
                };
                let r = Recipe::magictailor(&cfg, 6);
                let total = cfg.total_steps();
                assert_eq!(r.total_steps(), total);
                for d in 0..=total + 1 {
                    let phase = match (d <= warmup, ds_bal) {
                        (true, _) => Phase::WarmUp,
                        (false, true) => Phase::DsBal,
                        (false, false) => Phase::Joint,
                    };
                    let at = r.at(d);
                    assert_eq!(at.phase(), phase, "step {d}");
                    let scale = if scale_lr { 6.0 } else { 1.0 };
                    let base = match phase {
                        Phase::WarmUp => cfg.warmup_lr,
                        _ if released && d != warmup + 1 => cfg.warmup_lr,
                        _ => cfg.dsbal_lr,
                    };
                    if d > 0 {
                        assert_eq!(at.lr(), base * scale, "step {d}");
                        assert_eq!(r.switches_after(d), d == warmup && warmup < total);
                    }
                    if phase == Phase::DsBal {
                        assert_eq!(at.first, d == warmup + 1, "step {d}");
                    }
                }
            }
        }
    }

    /// diffusers' TI recipe: one phase of 3000 steps at 5e-4 x 4 images, only the rows,
    /// four random images a step with templates and a flip each, no DM-Deg or jitter.
    #[test]
    fn textual_inversion_follows_the_diffusers_recipe() {
        let mut cfg = TrainConfig {
            method: Method::Ti,
            ..TrainConfig::default()
        };
        let r = Recipe::new(&cfg, 6);
        assert_eq!(r.total_steps(), 3000);
        assert_eq!(cfg.total_steps(), 3000);
        assert_eq!(r.phases.len(), 1);
        assert_eq!(r.at(1).phase(), Phase::TextualInversion);
        assert_eq!(r.at(3000).lr(), 5e-4 * 4.0);
        assert!(r.trains.lora.is_none() && !r.trains.token_table);
        assert_eq!(r.draw.pick, Pick::Random(4));
        assert_eq!(r.images_per_step(6), 4);
        assert_eq!(r.draw.flip, Flip::PerImage);
        assert_eq!(r.draw.degradation, Degradation::Off);
        assert_eq!((r.losses.lambda_attn, r.losses.lambda_pres), (0.0, 0.0));
        assert!(!r.switches_after(1) && cfg.phase_switch().is_none());
        (cfg.steps, cfg.lr, cfg.images_per_step, cfg.scale_lr) =
            (Some(7), Some(1e-3), Some(2), false);
        let r = Recipe::new(&cfg, 6);
        assert_eq!(
            (r.total_steps(), r.at(7).lr(), r.images_per_step(6)),
            (7, 1e-3, 2)
        );
        assert_eq!(r.describe(6)["phases"][0]["steps"], 7);
    }

    /// The authors' Break-A-Scene run: 400 steps of the rows alone at 5e-4, then 400 of
    /// every weight at 2e-6 with a new optimizer; all gradients clipped together; union
    /// draws; the summed attention loss; one beach image a step. `--phase2-lora` swaps
    /// the full weights for adapters at 1e-4.
    #[test]
    fn break_a_scene_follows_its_authors_run() {
        let mut cfg = TrainConfig {
            method: Method::BreakAScene,
            ..TrainConfig::default()
        };
        let r = Recipe::new(&cfg, 6);
        assert_eq!((r.total_steps(), cfg.total_steps()), (800, 800));
        assert_eq!(
            (r.at(400).phase(), r.at(401).phase()),
            (Phase::BasTokens, Phase::BasWeights)
        );
        assert_eq!((r.at(1).lr(), r.at(800).lr()), (5e-4, 2e-6));
        assert!(!r.phases[0].trains_weights && r.phases[1].trains_weights);
        assert!(r.phases[1].fresh_optimizer && r.switches_after(400));
        assert_eq!(cfg.phase_switch(), Some(400));
        assert!(r.trains.full && r.trains.rows && r.trains.lora.is_none());
        assert_eq!(r.trains.clip.map(|c| c.with_text), Some(true));
        assert_eq!((r.draw.pick, r.draw.flip), (Pick::Union, Flip::PerImage));
        assert!(r.losses.attn_summed && r.losses.lambda_attn == 0.01);
        let class = r.class_images.as_ref().unwrap();
        assert_eq!((class.count, class.per_step), (100, Some(1)));
        assert_eq!(class.prompt.text("person"), "a photo at the beach");
        assert_eq!(r.max_images_per_step(6, 2), 2);
        cfg.phase2_lora = Some(4);
        cfg.no_prior_preservation = true;
        let r = Recipe::new(&cfg, 6);
        assert!(!r.trains.full && r.trains.lora.as_ref().is_some_and(|l| l.rank == 4));
        assert_eq!(r.at(401).lr(), BAS_LORA_LR);
        assert!(r.class_images.is_none() && r.losses.prior == 0.0);
    }

    /// The authors' ViCo config: 400 steps of 4 images, the row at 5e-3 x 4, the blocks
    /// at 1e-5, weight decay 1e-2, no clipping, no flip, TI's templates, a reference per
    /// image, 5e-4 L_reg.
    #[test]
    fn vico_follows_its_authors_config() {
        let cfg = TrainConfig {
            method: Method::Vico,
            ..TrainConfig::default()
        };
        let r = Recipe::new(&cfg, 6);
        assert_eq!((r.total_steps(), r.at(1).lr()), (400, 5e-3 * 4.0));
        assert_eq!(r.trains.vico_blocks, Some(1e-5));
        assert!(r.trains.rows && r.trains.lora.is_none() && r.trains.tuned.is_none());
        assert_eq!((r.trains.clip, r.trains.weight_decay), (None, 1e-2));
        assert_eq!((r.draw.pick, r.draw.flip), (Pick::Random(4), Flip::Off));
        assert!(r.draw.reference && matches!(r.draw.prompts, Prompts::Templates(_)));
        assert_eq!(r.losses.vico_reg, Some(5e-4));
        assert!(!Method::Vico.reads_masks() && Method::Ti.reads_masks());
        assert_eq!(r.describe(6)["vico"]["block_lr"], 1e-5);
    }
}
