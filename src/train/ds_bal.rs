//! DS-Bal, Dual-Stream Balancing (paper eq. 6-8): the online U-Net learns only from the
//! sample with the largest loss (sample-wise min-max), while the other samples are held
//! close to a momentum U-Net (selective preserving regularization).
//!
//! Only LoRA weights differ between the two U-Nets, so the momentum U-Net is the shared
//! frozen base plus an EMA copy of the adapters: `m = beta * m + (1 - beta) * theta`.

use candle_core::{Result, Tensor};

use crate::kernels::multi_tensor::{self, ema_composed, unshared};
use crate::model::lora::{LoraSet, TrainableLora};

/// Averages per-image values `[b]` into per-sample values `[n]` (samples may have
/// different image counts). Differentiable.
pub fn per_sample_means(
    per_image: &Tensor,
    sample_of: &[usize],
    n_samples: usize,
) -> Result<Tensor> {
    let b = sample_of.len();
    let mut w = vec![0f32; n_samples * b];
    for s in 0..n_samples {
        let count = sample_of.iter().filter(|&&x| x == s).count().max(1) as f32;
        for (i, &x) in sample_of.iter().enumerate() {
            if x == s {
                w[s * b + i] = 1.0 / count;
            }
        }
    }
    let w = Tensor::from_vec(w, (n_samples, b), per_image.device())?.to_dtype(per_image.dtype())?;
    w.matmul(&per_image.unsqueeze(1)?)?.squeeze(1)
}

/// The sample DS-Bal optimizes: the one with the largest loss (one scalar read per step).
pub fn hardest_sample(per_sample: &Tensor) -> Result<usize> {
    let v = per_sample
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0)
}

/// Selective preserving regularization: for every sample except `chosen`, the mean over
/// its images of the MSE between the online and momentum masked predictions; averaged over
/// those samples. The momentum prediction carries no gradient.
pub fn preserving_loss(
    online: &Tensor,
    momentum: &Tensor,
    mask_latent: &Tensor,
    sample_of: &[usize],
    n_samples: usize,
    chosen: usize,
) -> Result<Tensor> {
    let diff = (online - momentum.detach())?.broadcast_mul(mask_latent)?;
    let per_image = diff.sqr()?.flatten_from(1)?.mean(1)?;
    let per_sample = per_sample_means(&per_image, sample_of, n_samples)?;
    let keep: Vec<bool> = (0..n_samples).map(|s| s != chosen).collect();
    super::losses::masked_mean(&per_sample, &keep)
}

/// The momentum adapters: plain tensors (never Vars), so their forward builds no graph.
pub struct MomentumLora {
    set: LoraSet,
}

impl MomentumLora {
    /// A hard copy of the online adapters (at the switch to DS-Bal).
    pub fn copy_of(online: &TrainableLora) -> crate::error::Result<Self> {
        Ok(Self {
            set: online.detached_copy()?,
        })
    }

    /// `m = beta * m + (1 - beta) * theta`, after each optimizer step.
    /// On CUDA one fused launch for all adapters, giving the same bits.
    pub fn update(&mut self, online: &TrainableLora, beta: f64) -> Result<()> {
        let mut pairs = Vec::with_capacity(online.modules.len() * 2);
        for m in &online.modules {
            let Some(w) = self.set.get(&m.path) else {
                candle_core::bail!("momentum adapters lack {}", m.path)
            };
            pairs.extend([(&w.a, m.a.as_tensor()), (&w.b, m.b.as_tensor())]);
        }
        if multi_tensor::fused_ema(&pairs, beta)? {
            return Ok(());
        }
        for m in &online.modules {
            let Some(w) = self.set.get_mut(&m.path) else {
                candle_core::bail!("momentum adapters lack {}", m.path)
            };
            w.a = ema_composed(&w.a, m.a.as_tensor(), beta)?;
            w.b = ema_composed(&w.b, m.b.as_tensor(), beta)?;
        }
        Ok(())
    }

    pub fn as_set(&self) -> &LoraSet {
        &self.set
    }

    /// Replaces every tensor by `get("<path>.A")` / `get("<path>.B")` (checkpoint restore).
    pub fn load(
        &mut self,
        get: impl Fn(&str) -> crate::error::Result<Tensor>,
    ) -> crate::error::Result<()> {
        let paths: Vec<String> = self.set.iter().map(|(p, _)| p.clone()).collect();
        for p in paths {
            // Copies on CUDA: the fused EMA updates them in place.
            let (a, b) = (get(&format!("{p}.A"))?, get(&format!("{p}.B"))?);
            let (a, b) = (unshared(&a)?, unshared(&b)?);
            if let Some(w) = self.set.get_mut(&p) {
                w.a = a;
                w.b = b;
            }
        }
        Ok(())
    }

    /// Named tensors for checkpoints (`<path>.A`, `<path>.B`), sorted by name; copies on
    /// CUDA, where the EMA updates the momentum weights in place.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = (self.set.iter())
            .flat_map(|(p, w)| {
                [
                    (format!("{p}.A"), unshared(&w.a)),
                    (format!("{p}.B"), unshared(&w.b)),
                ]
            })
            .map(|(name, t)| Ok((name, t?)))
            .collect::<Result<_>>()?;
        out.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(out)
    }
}
