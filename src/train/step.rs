//! One optimizer step of a [`Trainer`], as its recipe says: the step's phase and rate,
//! forward and backward, clipping, the update (or, on NaN or infinity, a skip or a
//! stop), and the momentum adapters' update.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::ds_bal::MomentumLora;
use super::method::{Method, Phase};
use super::objective::{noised_latents, step_losses, Finetuned, Online, StepLosses};
use super::optim::{clip_coef, grad_norms, Clip};
use super::trainer::{StepLog, Trainer};
use crate::error::{Error, Result};
use crate::model::full::FullWeights;
use crate::model::lora::LoraSet;
use crate::profile::{self, Kind};

/// With f16 loss scaling, this many overflowed steps in a row stop the run: the scale
/// cannot save it.
pub const MAX_SKIPPED_IN_A_ROW: usize = 20;

/// The logged loss terms as a message names them, in `StepLog` order.
const TERMS: [&str; 6] = [
    "the total loss",
    "the masked diffusion loss L_diff",
    "the attention loss L_attn",
    "the preserving loss L_pres",
    "the region-of-interest loss L_RoI",
    "the class images' loss",
];

/// What one forward and backward pass gives.
struct Pass {
    grads: GradStore,
    terms: Vec<f32>,
    per_sample: Vec<Option<f32>>,
    chosen: Option<usize>,
    alpha_d: f64,
}

impl Trainer {
    /// The learning rate of step `d`.
    pub fn lr(&self, d: usize) -> f64 {
        self.recipe.at(d).lr()
    }

    /// One optimizer step; returns what `train_log.jsonl` records.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let d = self.step + 1;
        let dev = self.sd.device.clone();
        let _step = profile::scope(Kind::TrainStep, &dev);
        let at = self.recipe.at(d);
        let (phase, first_of_phase) = (at.phase(), at.first);
        let (weights, fresh) = (at.plan.trains_weights, at.plan.fresh_optimizer);
        if first_of_phase && weights && self.recipe.trains.full {
            self.start_full()?;
        }
        if first_of_phase && fresh {
            self.opt = self.optimizer_for(d)?;
        }
        let Pass {
            grads,
            terms,
            per_sample,
            chosen,
            alpha_d,
        } = self.forward_backward(d, phase)?;
        // The recipe says which gradients are clipped together, to what norm.
        let clipping = profile::scope(Kind::GradClip, &dev);
        let (unet_vars, text_vars) = (self.unet_vars(d), self.text_vars(d));
        let norms = grad_norms(&grads, &[&unet_vars, &text_vars])?;
        let (unet_norm, text_norm) = (norms[0], norms[1]);
        let clipped = match self.recipe.trains.clip {
            Some(c) if c.with_text => {
                let both = [unet_vars.as_slice(), &text_vars].concat();
                Some((both, unet_norm.hypot(text_norm), c.max_norm))
            }
            Some(c) => Some((unet_vars, unet_norm, c.max_norm)),
            None => None,
        };
        let clip = (clipped.as_ref()).map(|(params, norm, max)| Clip {
            params,
            coef: clip_coef(*norm, *max),
        });
        drop(clipping);
        let grad_norm = clipped.as_ref().map_or(text_norm, |(_, norm, _)| *norm);
        let lr = self.lr(d);
        self.opt.config.lr = lr;
        let finite = terms.iter().all(|v| v.is_finite()) && (unet_norm + text_norm).is_finite();
        if finite {
            profile::time(Kind::Optimizer, &dev, || {
                self.opt.step_clipped(&grads, clip)
            })?;
            self.skipped_in_a_row = 0;
        } else {
            self.on_non_finite(d, &terms, unet_norm + text_norm)?;
        }
        drop(grads);
        let momentum = &self.recipe.momentum;
        if let Some(m) = self.momentum.as_mut().filter(|_| phase == Phase::DsBal) {
            let _ema = profile::scope(Kind::Momentum, &dev);
            if momentum.copy_at_first_update && first_of_phase {
                *m = MomentumLora::copy_of(&self.lora)?;
            } else {
                m.update(&self.lora, momentum.ema_decay)?;
            }
        }
        self.step = d;
        Ok(StepLog {
            step: d,
            phase,
            alpha_d,
            lr,
            loss: terms[0],
            l_diff: terms[1],
            l_attn: terms[2],
            l_pres: terms[3],
            l_roi: self.recipe.losses.clic.map(|_| terms[4]),
            l_prior: self.recipe.class_images.as_ref().map(|_| terms[5]),
            per_sample,
            chosen_sample: chosen,
            grad_norm,
            skipped: !finite,
            sample_seconds: None,
        })
    }

    /// Makes the full weights from the base model, where a run starts training them.
    pub(super) fn start_full(&mut self) -> Result<()> {
        if self.full.is_none() {
            self.full = Some(FullWeights::of(&self.sd)?);
        }
        Ok(())
    }

    /// The unclipped gradients of the next step's loss by [`Self::trainable`] name, without
    /// updating anything (the step's noise depends only on seed and step, so
    /// `train_step` then computes the same step): for comparing backends
    /// (`examples/step_grads.rs`).
    pub fn next_gradients(&mut self) -> Result<HashMap<String, Tensor>> {
        let d = self.step + 1;
        let grads = self.forward_backward(d, self.recipe.at(d).phase())?.grads;
        let named = self.trainable().into_iter();
        Ok(named
            .filter_map(|(name, v)| Some((name, grads.get(v.as_tensor())?.detach())))
            .collect())
    }

    /// Step `d`'s forward and backward: gradients (unscaled, unclipped) and the logged
    /// values, read back in one device-to-host copy.
    fn forward_backward(&mut self, d: usize, phase: Phase) -> Result<Pass> {
        if phase == Phase::DsBal && self.momentum.is_none() {
            self.momentum = Some(MomentumLora::copy_of(&self.lora)?);
        }
        let dev = self.sd.device.clone();
        let (batch, noised, alpha_d) = profile::time(Kind::Data, &dev, || {
            let noise = self.noise.take(d)?;
            let batch = (self.pool).batch(&self.sd, &self.recipe.draw, self.cfg.seed, d)?;
            let (noised, alpha_d) =
                noised_latents(&self.sd, &batch, &self.cfg, &self.recipe.draw, d, noise)?;
            Ok::<_, crate::error::Error>((batch, noised, alpha_d))
        })?;
        // A phase that trains only the rows runs the base U-Net (adapters start at zero).
        let weights = self.trains_weights(d);
        let online = match weights {
            true => self.lora.as_set(),
            false => LoraSet::default(),
        };
        let tuned = self.tuned.as_set();
        let full = match self.full_at(d) {
            Some(f) => Some(Finetuned::over(f, self.cfg.dtype)?),
            None => None,
        };
        let momentum = self
            .momentum
            .as_ref()
            .filter(|_| phase == Phase::DsBal)
            .map(|m| m.as_set());
        let forward = profile::scope(Kind::ForwardLoss, &dev);
        let StepLosses {
            per_sample,
            l_diff,
            l_attn,
            l_pres,
            l_roi,
            l_prior,
            chosen,
            loss,
            ..
        } = step_losses(
            &self.sd,
            &batch,
            &noised,
            Online {
                lora: &online,
                tuned: (!tuned.is_empty()).then_some(&tuned),
                vico: self.vico.as_ref(),
                full: full.as_ref(),
            },
            self.text_params(d),
            momentum,
            self.recipe.losses,
        )?;
        drop(forward);
        let backward = profile::scope(Kind::Backward, &dev);
        let grads = match self.cfg.loss_scale {
            Some(scale) => {
                let mut grads = (&loss * scale)?.backward()?;
                unscale(&mut grads, &self.opt_vars(d), scale)?;
                grads
            }
            None => loss.backward()?,
        };
        drop(backward);
        // The loss terms and the per-sample losses own the forward graph: read, then
        // dropped here, before the optimizer runs.
        let or_zero = |l: Option<Tensor>| match l {
            Some(l) => Ok(l),
            None => l_pres.zeros_like(),
        };
        let (l_roi, l_prior) = (or_zero(l_roi)?, or_zero(l_prior)?);
        let terms = Tensor::stack(&[&loss, &l_diff, &l_attn, &l_pres, &l_roi, &l_prior], 0)?;
        let terms = terms.to_dtype(DType::F32)?;
        let mut read = profile::time(Kind::HostRead, &dev, || {
            Tensor::cat(&[&terms, &per_sample.to_dtype(DType::F32)?], 0)?
                .detach()
                .to_vec1::<f32>()
        })?;
        // A sample the step drew no image of has no loss (not a loss of 0).
        let drawn = |s: usize| batch.sample_of[..batch.instances()].contains(&s);
        let per_sample = (read.split_off(TERMS.len()).into_iter().enumerate())
            .map(|(s, l)| drawn(s).then_some(l))
            .collect();
        Ok(Pass {
            grads,
            terms: read,
            per_sample,
            chosen,
            alpha_d,
        })
    }

    /// A step met NaN or infinity, before any weight changed. With f16 loss scaling an
    /// overflow skips the update (up to [`MAX_SKIPPED_IN_A_ROW`] in a row); otherwise
    /// training stops, naming the step and the first non-finite term.
    fn on_non_finite(&mut self, d: usize, terms: &[f32], grad_norm: f64) -> Result<()> {
        let rates = match self.cfg.method {
            Method::MagicTailor => "--warmup-lr, --dsbal-lr",
            Method::BreakAScene => "--phase1-lr, --phase2-lr",
            _ => "--lr",
        };
        // A component names the cause better than the total it spoils.
        let what = match [1, 2, 3, 4, 5, 0]
            .into_iter()
            .find(|&i| !terms[i].is_finite())
        {
            Some(i) => format!("{} is {}", TERMS[i], terms[i]),
            None => format!("the gradient norm is {grad_norm}"),
        };
        let Some(scale) = self.cfg.loss_scale else {
            return Err(Error::Diverged(format!(
                "training diverged at step {d}: {what}. The step was not applied. Lower the \
                 learning rate ({rates}){}.",
                if self.cfg.dtype == DType::F32 {
                    ""
                } else {
                    " or train in --dtype f32"
                }
            )));
        };
        self.skipped_in_a_row += 1;
        if self.skipped_in_a_row < MAX_SKIPPED_IN_A_ROW {
            return Ok(());
        }
        Err(Error::Diverged(format!(
            "training diverged: steps {}-{d} all overflowed in f16 at loss scale {scale} ({what} at \
             step {d}), so their updates were skipped. Train in --dtype f32 (or bf16 on CUDA), or \
             lower the learning rate ({rates}).",
            d + 1 - self.skipped_in_a_row
        )))
    }
}

/// Divides the parameters' gradients by the loss scale.
fn unscale(grads: &mut GradStore, params: &[Var], scale: f64) -> Result<()> {
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            let g = (g.detach() / scale)?;
            grads.insert(p.as_tensor(), g);
        }
    }
    Ok(())
}
