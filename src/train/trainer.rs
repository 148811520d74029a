//! A run in progress and the types the train files share: [`Trainer`] holds what a run
//! trains with and on (settings, recipe, model, batch, trainable weights, optimizer,
//! step count); `setup` builds it, `step` advances it, `resume` saves and restores it,
//! `export` writes its result. [`StepLog`] is what a step reports.

use candle_core::Var;
use serde::Serialize;

use super::config::TrainConfig;
use super::ds_bal::MomentumLora;
use super::method::{Phase, Recipe};
use super::noise::NoiseAhead;
use super::objective::{Pool, TextParams};
use super::optim::{AdamW, AdamWConfig};
use crate::error::Result;
use crate::masks::auto::AutoMasks;
use crate::model::loader::StableDiffusion;
use crate::model::lora::TrainableLora;
use crate::model::tuned::TrainableTuned;

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub phase: Phase,
    pub alpha_d: f64,
    pub lr: f64,
    pub loss: f32,
    /// The diffusion loss (CLiC: L_context; ViCo: its unmasked eps-MSE).
    pub l_diff: f32,
    /// The attention loss (CLiC: L_att; ViCo: L_reg, before its weight).
    pub l_attn: f32,
    pub l_pres: f32,
    /// CLiC's region-of-interest loss (its `l_diff` is L_context, `l_attn` L_att).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l_roi: Option<f32>,
    /// Prior preservation's loss on the class images (weighed by `--prior-loss-weight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l_prior: Option<f32>,
    /// The mean loss of each sample's images in this step; None (null) where the step
    /// drew none of its images (`ti`'s random draw).
    pub per_sample: Vec<Option<f32>>,
    pub chosen_sample: Option<usize>,
    /// The gradient norm before clipping: of what the method clips together (the U-Net's
    /// adapters or tuned matrices, with the rows where it clips those too), else of the
    /// pseudo-word rows.
    pub grad_norm: f64,
    /// f16 only: the step overflowed and its update was skipped.
    pub skipped: bool,
    /// Seconds spent drawing this step's sample grid, if it drew one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_seconds: Option<f64>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    /// The method: what trains, the losses, the phases, what a step draws.
    pub recipe: Recipe,
    pub sd: StableDiffusion,
    /// The reference images each step's batch is drawn from.
    pub pool: Pool,
    /// Each step's host noise, the next one drawn while this one runs.
    pub(super) noise: NoiseAhead,
    /// No modules where the method trains no adapters.
    pub lora: TrainableLora,
    /// Whole matrices of U-Net layers (Custom Diffusion); none for other methods.
    pub tuned: TrainableTuned,
    /// ViCo's image cross-attention blocks; None for other methods.
    pub vico: Option<crate::model::vico::Blocks>,
    pub rows: Var,
    /// Released-script mode: the whole token-embedding table, trained (with weight decay).
    pub table: Option<Var>,
    pub momentum: Option<MomentumLora>,
    pub(super) opt: AdamW,
    pub step: usize,
    pub class_words: Vec<String>,
    /// f16: consecutive steps whose update was skipped for overflow.
    pub(super) skipped_in_a_row: usize,
    /// Masks made from the base model's attention (the pair folder had none), written
    /// into the output folder when training starts.
    pub auto_masks: Option<AutoMasks>,
}

impl Trainer {
    /// The base model, for the next pair.
    pub fn into_model(self) -> StableDiffusion {
        self.sd
    }

    /// The reference images of the pair.
    pub fn num_images(&self) -> usize {
        self.pool.all.len()
    }

    /// The text-side parameters the optimizer updates: pseudo-word rows (where the method
    /// trains them), then the table.
    pub(super) fn text_vars(&self) -> Vec<Var> {
        let rows = self.recipe.trains.rows.then(|| self.rows.clone());
        rows.into_iter().chain(self.table.clone()).collect()
    }

    pub(super) fn text_params(&self) -> TextParams<'_> {
        TextParams {
            rows: self.rows.as_tensor(),
            table: self.table.as_ref().map(|t| t.as_tensor()),
        }
    }

    /// The U-Net side the optimizer updates: the LoRA matrices, the tuned matrices, then
    /// ViCo's blocks.
    pub(super) fn unet_vars(&self) -> Vec<Var> {
        let mut v = self.lora.vars();
        v.extend(self.tuned.vars());
        v.extend(self.vico.iter().flat_map(|b| b.vars()));
        v
    }

    /// Everything the optimizer updates, in its order: the U-Net side, then the text side.
    pub(super) fn opt_vars(&self) -> Vec<Var> {
        let mut v = self.unet_vars();
        v.extend(self.text_vars());
        v
    }
}

/// A new optimizer over `params` with the recipe's weight decay (its rate is set every
/// step).
pub(super) fn optimizer(params: Vec<Var>, weight_decay: f64) -> Result<AdamW> {
    let config = AdamWConfig {
        lr: 0.0,
        weight_decay,
        ..Default::default()
    };
    Ok(AdamW::new(params, config)?)
}
