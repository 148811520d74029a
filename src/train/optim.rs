//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) whose moments can be saved and
//! restored for exact resume (candle's AdamW keeps them private), and global gradient-norm
//! clipping (candle has none).

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};

use crate::kernels::multi_tensor::{self, adamw_composed, unshared, AdamWStep, Slot};

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

/// A parameter's index, its gradient this step, and whether it is clipped.
type Present = (usize, Tensor, bool);

pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    pub config: AdamWConfig,
    /// Parameters updated at a rate of their own instead of `config.lr` (a second
    /// parameter group, as torch's `AdamW([{...}, {...}])`).
    fixed_lr: HashMap<TensorId, f64>,
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
            fixed_lr: HashMap::new(),
        })
    }

    /// Updates `params` at `lr` from now on, whatever `config.lr` says.
    pub fn fix_lr(&mut self, params: &[Var], lr: f64) {
        for p in params {
            self.fixed_lr.insert(p.as_tensor().id(), lr);
        }
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update from `grads`; a parameter without a gradient is left untouched.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_clipped(grads, None)
    }

    /// One update from `grads`, the gradients of `clip.params` first scaled by
    /// `clip.coef` (as [`clip_to`] scales them, without a pass of its own). On CUDA, one
    /// fused launch for all parameters; elsewhere (or with `MAGICTAILOR_CUDA_KERNELS=0`)
    /// candle's ops, giving the same bits.
    pub fn step_clipped(&mut self, grads: &GradStore, clip: Option<Clip<'_>>) -> Result<()> {
        self.step += 1;
        let clipped: HashSet<TensorId> = clip
            .map(|c| c.params.iter().map(|p| p.as_tensor().id()).collect())
            .unwrap_or_default();
        let coef = clip.map_or(1.0, |c| c.coef);
        // One group per rate: the parameters at `config.lr`, then each fixed rate's.
        let mut groups: Vec<(f64, Vec<Present>)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if let Some(g) = grads.get(p.as_tensor()) {
                let id = p.as_tensor().id();
                let lr = self.fixed_lr.get(&id).copied().unwrap_or(self.config.lr);
                let entry = (i, g.detach().contiguous()?, clipped.contains(&id));
                match groups.iter_mut().find(|(r, _)| *r == lr) {
                    Some((_, group)) => group.push(entry),
                    None => groups.push((lr, vec![entry])),
                }
            }
        }
        for (lr, present) in groups {
            let config = AdamWConfig { lr, ..self.config };
            self.update(&present, &adamw_step(&config, self.step, coef))?;
        }
        Ok(())
    }

    /// One rate's update of `present` (parameter index, gradient, clipped).
    fn update(&mut self, present: &[Present], step: &AdamWStep) -> Result<()> {
        let slots: Vec<Slot> = (present.iter())
            .map(|(i, g, clipped)| self.slot(*i, g, *clipped))
            .collect();
        if multi_tensor::fused_adamw(&slots, step)? {
            return Ok(());
        }
        // One tensor at a time: the old values are freed as the new ones come.
        for (i, g, clipped) in present {
            let slot = self.slot(*i, g, *clipped);
            let [p, m, v] = match multi_tensor::cpu_adamw(&slot, step)? {
                Some(new) => new,
                None => adamw_composed(&slot, step)?,
            };
            self.params[*i].set(&p)?;
            (self.m[*i], self.v[*i]) = (m, v);
        }
        Ok(())
    }

    /// Parameter `i` with its gradient `g` and moments, for one step.
    fn slot<'a>(&'a self, i: usize, g: &'a Tensor, clipped: bool) -> Slot<'a> {
        Slot {
            p: self.params[i].as_tensor(),
            g,
            m: &self.m[i],
            v: &self.v[i],
            clipped,
        }
    }

    /// Moments and step count as named tensors (`m.<i>`, `v.<i>`, `step`), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            // Copies on CUDA: the fused step updates the moments in place.
            out.insert(format!("m.{i}"), unshared(m)?);
            out.insert(format!("v.{i}"), unshared(v)?);
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
                *slot = unshared(&t.to_dtype(dtype)?.to_device(&device)?)?;
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
    let mut listed = Vec::new();
    for (gi, group) in groups.iter().enumerate() {
        for g in group.iter().filter_map(|p| grads.get(p.as_tensor())) {
            listed.push((g.detach(), gi));
        }
    }
    let rows: Vec<(&Tensor, usize)> = listed.iter().map(|(g, gi)| (g, *gi)).collect();
    let sums = multi_tensor::sq_sums(&rows, groups.len())?;
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
    let coef = clip_coef(norm, max_norm);
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            let g = (g.detach() * coef)?;
            grads.insert(p.as_tensor(), g);
        }
    }
    Ok(())
}

/// `torch.nn.utils.clip_grad_norm_`'s scale for gradients of global norm `norm`.
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Gradients [`AdamW::step_clipped`] scales by `coef` (from [`clip_coef`]) before the
/// update.
#[derive(Debug, Clone, Copy)]
pub struct Clip<'a> {
    pub params: &'a [Var],
    pub coef: f64,
}

/// Step `step`'s settings (from 1), the clipped gradients scaled by `coef`.
pub(crate) fn adamw_step(c: &AdamWConfig, step: usize, coef: f64) -> AdamWStep {
    AdamWStep {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
        step,
        coef,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A parameter with a fixed rate moves by that rate, the others by `config.lr`: one
    /// AdamW step moves each entry by lr * g / (|g| + eps), about lr for |g| >> eps.
    #[test]
    fn a_fixed_rate_is_a_second_parameter_group() {
        let dev = Device::Cpu;
        let (a, b) = (
            Var::new(&[1f32, 1.0], &dev).unwrap(),
            Var::new(&[1f32, 1.0], &dev).unwrap(),
        );
        let config = AdamWConfig {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], config).unwrap();
        opt.fix_lr(std::slice::from_ref(&b), 1e-5);
        let loss = (a.as_tensor().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((moved(&a) - 2e-2).abs() < 1e-6, "{}", moved(&a));
        assert!((moved(&b) - 1e-5).abs() < 1e-7, "{}", moved(&b));
        // The moments and step count stay one state: a checkpoint restores both groups.
        assert_eq!(opt.state().unwrap().len(), 5);
    }
}
