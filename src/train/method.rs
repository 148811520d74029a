//! A training method as the step reads it: what trains, which losses with which weights,
//! the phases in order, and what each step draws. [`Recipe::magictailor`] (warm-up, then
//! DS-Bal or the joint phase of the `--no-ds-bal` ablation) is the one method so far; the
//! step reads nothing method-specific from `TrainConfig` besides this value.

use serde::Serialize;

use super::config::TrainConfig;
use super::dm_deg::Degradation;

/// The weights of the loss terms after the (masked) diffusion loss.
#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    /// The cross-attention loss (0: off).
    pub lambda_attn: f64,
    /// DS-Bal's preserving regularization against the momentum adapters.
    pub lambda_pres: f64,
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
}

impl Phase {
    /// The name `train_log.jsonl` and the progress bar show.
    pub fn name(self) -> &'static str {
        match self {
            Phase::WarmUp => "warm-up",
            Phase::DsBal => "ds-bal",
            Phase::Joint => "joint",
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
}

/// What the optimizer updates. Always one pseudo-word embedding row per sample, starting
/// at the embedding of its class word's first token.
#[derive(Debug, Clone, PartialEq)]
pub struct Trains {
    /// LoRA adapters of this rank and alpha on every layer the U-Net's `lora_targets`
    /// names; only their gradients are clipped (to norm 1).
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Also the whole token-embedding table (`--released-script`).
    pub token_table: bool,
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

/// What a step draws: every reference image, each prompted with its sample's
/// pseudo-word, augmented, then degraded outside its mask (DM-Deg).
#[derive(Debug, Clone)]
pub struct Draw {
    /// The prompt of an image of the sample whose pseudo-word this is.
    pub prompt: fn(&str) -> String,
    /// Colour-jitter strength; 0 is none.
    pub jitter: f64,
    /// A horizontal flip of the whole batch with probability 1/2.
    pub flip: bool,
    pub degradation: Degradation,
}

/// A training method, as the trainer runs it.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub trains: Trains,
    /// The weights of L_attn and L_pres (L_diff weighs 1).
    pub losses: LossWeights,
    /// In order; step `d` (from 1) belongs to the first phase whose steps reach it.
    pub phases: Vec<PhasePlan>,
    pub momentum: Momentum,
    pub draw: Draw,
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
    /// MagicTailor (paper §3): `warmup_steps` of warm-up, then `dsbal_steps` of DS-Bal (or,
    /// with `--no-ds-bal`, of the warm-up objective at the DS-Bal rate), on `n_images`
    /// reference images (the rates' scale under `--scale-lr`).
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
            },
            PhasePlan {
                phase: second,
                steps: cfg.dsbal_steps,
                lr: cfg.dsbal_lr * scale,
                lr_after_first: cfg.released_script.then_some(cfg.warmup_lr * scale),
                fresh_optimizer: false,
            },
        ];
        Self {
            trains: Trains {
                lora_rank: cfg.lora_rank,
                lora_alpha: cfg.lora_alpha,
                token_table: cfg.released_script,
            },
            losses: LossWeights {
                lambda_attn: cfg.lambda_attn,
                lambda_pres: cfg.lambda_pres,
            },
            phases,
            momentum: Momentum {
                ema_decay: cfg.ema_decay,
                copy_at_first_update: cfg.released_script,
            },
            draw: Draw {
                prompt: |word| format!("A photo of {word}"),
                jitter: cfg.jitter,
                flip: cfg.flip,
                degradation: cfg.degradation(),
            },
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
}
