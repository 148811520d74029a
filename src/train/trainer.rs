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
use crate::model::full::FullWeights;
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
    /// SDXL: the pseudo-words' rows in the second text encoder.
    pub rows_2: Option<Var>,
    /// Released-script mode: the whole token-embedding table, trained (with weight decay).
    pub table: Option<Var>,
    /// SDXL in released-script mode: the second text encoder's table, alike.
    pub table_2: Option<Var>,
    /// Every U-Net and text-encoder weight (Break-A-Scene's phase 2), made when the first
    /// phase that trains them starts.
    pub full: Option<FullWeights>,
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

    /// Step `d` trains the U-Net side (adapters, tuned or full weights), not only the
    /// pseudo-word rows.
    pub(super) fn trains_weights(&self, d: usize) -> bool {
        self.recipe.at(d).plan.trains_weights
    }

    /// The full weights, where step `d` trains them.
    pub(super) fn full_at(&self, d: usize) -> Option<&FullWeights> {
        self.full.as_ref().filter(|_| self.trains_weights(d))
    }

    /// The text-side parameters step `d` updates: pseudo-word rows (where the method
    /// trains them), the table, then a full fine-tune's text encoder.
    pub(super) fn text_vars(&self, d: usize) -> Vec<Var> {
        let rows = (self
            .recipe
            .trains
            .rows
            .then(|| [Some(self.rows.clone()), self.rows_2.clone()]))
        .into_iter()
        .flatten()
        .flatten();
        let tables = self.table.iter().chain(&self.table_2).cloned();
        let mut v: Vec<Var> = rows.chain(tables).collect();
        v.extend(
            self.full_at(d)
                .map(FullWeights::text_vars)
                .unwrap_or_default(),
        );
        v
    }

    /// The text side a forward pass reads; a full fine-tune's token tables where step `d`
    /// trains them.
    pub(super) fn text_params(&self, d: usize) -> TextParams<'_> {
        let full = self.full_at(d);
        let table = match full {
            Some(f) => Some(f.token_table().as_tensor()),
            None => self.table.as_ref().map(|t| t.as_tensor()),
        };
        TextParams {
            rows: self.rows.as_tensor(),
            table,
            rows_2: self.rows_2.as_ref().map(|v| v.as_tensor()),
            table_2: match full {
                Some(f) => f.token_table_2().map(|t| t.as_tensor()),
                None => self.table_2.as_ref().map(|t| t.as_tensor()),
            },
        }
    }

    /// The U-Net side step `d` updates: the LoRA matrices, the tuned matrices, ViCo's
    /// blocks, then a full fine-tune's U-Net; none in a phase that trains only the rows.
    pub(super) fn unet_vars(&self, d: usize) -> Vec<Var> {
        if !self.trains_weights(d) {
            return Vec::new();
        }
        let mut v = self.lora.vars();
        v.extend(self.tuned.vars());
        v.extend(self.vico.iter().flat_map(|b| b.vars()));
        v.extend(
            self.full_at(d)
                .map(FullWeights::unet_vars)
                .unwrap_or_default(),
        );
        v
    }

    /// Everything step `d`'s optimizer updates, in its order: the U-Net side, then the
    /// text side.
    pub(super) fn opt_vars(&self, d: usize) -> Vec<Var> {
        let mut v = self.unet_vars(d);
        v.extend(self.text_vars(d));
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
