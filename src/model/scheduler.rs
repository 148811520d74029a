//! Noise schedules: DDPM `add_noise` for training and the DDIM sampler (eta = 0), built
//! from the model's `scheduler_config.json` as diffusers' `DDIMScheduler.from_config`.

use candle_core::{Result, Tensor};

use super::config::SchedulerConfig;

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub config: SchedulerConfig,
    /// Cumulative products of `1 - beta`, as torch keeps them (f32).
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Self {
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "scaled_linear" => linspace_f32(
                config.beta_start.sqrt() as f32,
                config.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            _ => linspace_f32(config.beta_start as f32, config.beta_end as f32, n),
        };
        // torch: alphas = 1 - betas in f32; cumprod accumulates in f64 on CPU, stores f32.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        Self {
            config: config.clone(),
            alphas_cumprod,
        }
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// The clean sample and the noise that the model's `output` on `x` (at cumulative
    /// alpha `a`) stands for: the noise itself, or v under v-prediction; the clean
    /// sample clipped to [-1, 1] where the config says (diffusers' DDIM, both ways).
    fn x0_and_eps(&self, output: &Tensor, x: &Tensor, a: f64) -> Result<(Tensor, Tensor)> {
        let (x0, eps) = if self.predicts_v() {
            let x0 = ((x * a.sqrt())? - (output * (1.0 - a).sqrt())?)?;
            let eps = ((output * a.sqrt())? + (x * (1.0 - a).sqrt())?)?;
            (x0, eps)
        } else {
            let x0 = ((x - (output * (1.0 - a).sqrt())?)? / a.sqrt())?;
            (x0, output.clone())
        };
        let x0 = match self.config.clip_sample {
            true => x0.clamp(-1f32, 1f32)?,
            false => x0,
        };
        Ok((x0, eps))
    }

    /// The model predicts v (`v_prediction`, SD 2.x 768) rather than the noise.
    pub fn predicts_v(&self) -> bool {
        self.config.prediction_type == "v_prediction"
    }

    /// `sqrt(a_t)` and `sqrt(1 - a_t)` per sample, `[b, 1, 1, 1]` in `like`'s dtype.
    fn coefficients(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mut s, mut r) = (Vec::with_capacity(timesteps.len()), Vec::new());
        for &t in timesteps {
            let a = *self
                .alphas_cumprod
                .get(t)
                .ok_or_else(|| candle_core::Error::Msg(format!("timestep {t} out of range")))?;
            s.push(a.sqrt());
            r.push((1.0 - a).sqrt());
        }
        let shape = (timesteps.len(), 1, 1, 1);
        let s = Tensor::from_vec(s, shape, like.device())?.to_dtype(like.dtype())?;
        let r = Tensor::from_vec(r, shape, like.device())?.to_dtype(like.dtype())?;
        Ok((s, r))
    }

    /// What the model is trained to predict for `x0` noised with `noise` at `timesteps`:
    /// the noise, or (v-prediction) `sqrt(a_t) noise - sqrt(1 - a_t) x0` (diffusers'
    /// `get_velocity`).
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        if !self.predicts_v() {
            return Ok(noise.clone());
        }
        let (s, r) = self.coefficients(timesteps, x0)?;
        noise.broadcast_mul(&s)? - x0.broadcast_mul(&r)?
    }

    /// `sqrt(a_t) x0 + sqrt(1 - a_t) noise`, with one timestep per sample (`t: [b]`).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!(
                "add_noise: {} timesteps for a batch of {b}",
                timesteps.len()
            );
        }
        let (s, r) = self.coefficients(timesteps, x0)?;
        x0.broadcast_mul(&s)? + noise.broadcast_mul(&r)?
    }
}

/// Deterministic DDIM (eta = 0) over `steps` inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    step_ratio: usize,
    final_alpha_cumprod: f32,
}

impl Ddim {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        let cfg = &schedule.config;
        let n = cfg.num_train_timesteps;
        if steps == 0 || steps > n {
            candle_core::bail!("the number of steps must be between 1 and {n}, got {steps}");
        }
        let step_ratio = n / steps;
        let timesteps: Vec<usize> = match cfg.timestep_spacing.as_str() {
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| ((n as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect()
            }
            "linspace" => {
                let mut v: Vec<usize> = (0..steps)
                    .map(|i| {
                        (i as f64 * (n - 1) as f64 / (steps.max(2) - 1) as f64).round() as usize
                    })
                    .collect();
                v.reverse();
                v
            }
            _ => (0..steps)
                .rev()
                .map(|i| i * step_ratio + cfg.steps_offset)
                .collect(),
        };
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            schedule: schedule.clone(),
            timesteps,
            step_ratio,
            final_alpha_cumprod,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// One denoising step from `x_t` given the model's output: the noise, or v under
    /// v-prediction (as diffusers' `DDIMScheduler.step`).
    pub fn step(&self, output: &Tensor, t: usize, x: &Tensor) -> Result<Tensor> {
        let ac = &self.schedule.alphas_cumprod;
        let a_t = ac[t.min(ac.len() - 1)] as f64;
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(p) => ac[p] as f64,
            None => self.final_alpha_cumprod as f64,
        };
        let (x0, eps) = self.schedule.x0_and_eps(output, x, a_t)?;
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }
}

/// DDIM run backwards, as diffusers' `DDIMInverseScheduler`: from a clean latent up the
/// sampler's timesteps to the noised latent DDIM sampling starts from. Each step moves
/// from `t - ratio` (clean before the first) to `t`, reading the model's output at `t`
/// on the latent it starts from (the usual approximation: the output at the start's
/// timestep is not yet known).
pub struct DdimInverse {
    schedule: NoiseSchedule,
    /// Ascending: where each step ends (and where the model is asked).
    timesteps: Vec<usize>,
    step_ratio: usize,
    initial_alpha_cumprod: f32,
}

impl DdimInverse {
    /// The sampler's timesteps in reverse; linspace spacing is refused, as diffusers'
    /// `DDIMInverseScheduler` does.
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        let spacing = schedule.config.timestep_spacing.as_str();
        if !matches!(spacing, "leading" | "trailing") {
            candle_core::bail!(
                "DDIM inversion takes leading or trailing timestep spacing (diffusers' \
                 DDIMInverseScheduler), not {spacing:?}"
            );
        }
        let ddim = Ddim::new(schedule, steps)?;
        Ok(Self {
            schedule: schedule.clone(),
            timesteps: ddim.timesteps.iter().rev().copied().collect(),
            step_ratio: ddim.step_ratio,
            initial_alpha_cumprod: ddim.final_alpha_cumprod,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// One step up to `t` from `x` (at `t - ratio`), given the model's output at `t`.
    pub fn step(&self, output: &Tensor, t: usize, x: &Tensor) -> Result<Tensor> {
        let ac = &self.schedule.alphas_cumprod;
        let a_from = match t.checked_sub(self.step_ratio) {
            Some(p) => ac[p.min(ac.len() - 1)] as f64,
            None => self.initial_alpha_cumprod as f64,
        };
        let a_to = ac[t.min(ac.len() - 1)] as f64;
        let (x0, eps) = self.schedule.x0_and_eps(output, x, a_from)?;
        (x0 * a_to.sqrt())? + (eps * (1.0 - a_to).sqrt())?
    }
}

/// `torch.linspace` in f32: `start + i * (end - start) / (n - 1)`, symmetric from both ends.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn schedule(spacing: &str) -> NoiseSchedule {
        let mut cfg = crate::model::tiny::scheduler_config();
        cfg["timestep_spacing"] = spacing.into();
        NoiseSchedule::new(&serde_json::from_value(cfg).unwrap())
    }

    /// With the same noise estimate at both ends, an inversion step undoes a DDIM step
    /// exactly; and the inverse walks the sampler's timesteps in reverse.
    #[test]
    fn an_inversion_step_undoes_a_ddim_step() {
        for spacing in ["leading", "trailing"] {
            let s = schedule(spacing);
            let (ddim, inverse) = (
                Ddim::new(&s, 10).unwrap(),
                DdimInverse::new(&s, 10).unwrap(),
            );
            let mut up = inverse.timesteps().to_vec();
            up.reverse();
            assert_eq!(up, ddim.timesteps(), "{spacing}");
            let dev = &Device::Cpu;
            let x = Tensor::randn(0f32, 1., (1, 4, 4, 4), dev).unwrap();
            let eps = Tensor::randn(0f32, 1., (1, 4, 4, 4), dev).unwrap();
            for &t in ddim.timesteps() {
                let down = ddim.step(&eps, t, &x).unwrap();
                let back = inverse.step(&eps, t, &down).unwrap();
                let d = (back - &x).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{spacing} t={t}");
            }
        }
        assert!(DdimInverse::new(&schedule("linspace"), 10).is_err());
    }
}
