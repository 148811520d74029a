//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) whose moments can be saved and
//! restored for exact resume (candle's AdamW keeps them private), and global gradient-norm
//! clipping (candle has none).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    pub config: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        let v = params.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            config,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update from `grads`; a parameter without a gradient is left untouched.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for ((p, m), v) in self
            .params
            .iter()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&*v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&*m / bc1)? / denom)?;
            let decayed = (p.as_tensor().detach() * (1.0 - c.lr * c.weight_decay))?;
            p.set(&(decayed - (update * c.lr)?)?)?;
        }
        Ok(())
    }

    /// Moments and step count as named tensors (`m.<i>`, `v.<i>`, `step`), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.insert(format!("m.{i}"), m.clone());
            out.insert(format!("v.{i}"), v.clone());
        }
        out.insert(
            "step".into(),
            Tensor::new(
                self.step as u32,
                self.m
                    .first()
                    .map(|t| t.device())
                    .unwrap_or(&candle_core::Device::Cpu),
            )?,
        );
        Ok(out)
    }

    /// Restores what `state` wrote; shapes must match the parameters.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for i in 0..self.params.len() {
            let shape = self.params[i].shape().clone();
            let dtype = self.params[i].dtype();
            let device = self.params[i].device().clone();
            for (name, slot) in [
                (format!("m.{i}"), &mut self.m[i]),
                (format!("v.{i}"), &mut self.v[i]),
            ] {
                let t = state.get(&name).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks {name}"))
                })?;
                if t.shape() != &shape {
                    candle_core::bail!(
                        "optimizer state {name} has shape {:?}, parameter {:?}",
                        t.dims(),
                        shape.dims()
                    );
                }
                *slot = t.to_dtype(dtype)?.to_device(&device)?;
            }
        }
        let step = state
            .get("step")
            .ok_or_else(|| candle_core::Error::Msg("optimizer state lacks step".into()))?;
        self.step = step.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        Ok(())
    }
}

/// The global L2 norm (in f64) of each group's gradients, those present, with a single
/// device-to-host read for all groups.
pub fn grad_norms(grads: &GradStore, groups: &[&[Var]]) -> Result<Vec<f64>> {
    let mut sq = Vec::new();
    let mut group_of = Vec::new();
    for (gi, group) in groups.iter().enumerate() {
        for g in group.iter().filter_map(|p| grads.get(p.as_tensor())) {
            sq.push(g.detach().to_dtype(DType::F64)?.sqr()?.sum_all()?);
            group_of.push(gi);
        }
    }
    let mut sums = vec![0f64; groups.len()];
    if !sq.is_empty() {
        let host = Tensor::stack(&sq, 0)?.to_vec1::<f64>()?;
        for (v, gi) in host.into_iter().zip(group_of) {
            sums[gi] += v;
        }
    }
    Ok(sums.into_iter().map(f64::sqrt).collect())
}

/// The global L2 norm of the gradients of `params` (those present), in f64.
pub fn grad_norm(grads: &GradStore, params: &[Var]) -> Result<f64> {
    Ok(grad_norms(grads, &[params])?[0])
}

/// Scales all gradients of `params` so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, capped at 1).
/// Returns the norm before clipping. Gradients are detached first: candle's gradients are
/// graph nodes themselves (docs/candle.md §6).
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, params)?;
    clip_to(grads, params, norm, max_norm)?;
    Ok(norm)
}

/// Scales the gradients of `params`, whose global norm is `norm`, to at most `max_norm`.
pub fn clip_to(grads: &mut GradStore, params: &[Var], norm: f64, max_norm: f64) -> Result<()> {
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            let g = (g.detach() * coef)?;
            grads.insert(p.as_tensor(), g);
        }
    }
    Ok(())
}
