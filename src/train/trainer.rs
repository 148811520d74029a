//! The MagicTailor training loop: warm-up, then DS-Bal, on one pair folder.
//!
//! Randomness is a pure function of (seed, step), so `--resume` from a checkpoint gives
//! the same weights as an uninterrupted run.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use super::augment::{color_jitter, flip_horizontal, Jitter};
use super::dm_deg::Degradation;
use super::ds_bal::{hardest_sample, per_sample_means, preserving_loss, MomentumLora};
use super::losses::{attention_loss, masked_diffusion_per_image, resize_nearest};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::data::{MaskPolicy, PairDataset};
use crate::error::{Error, Result};
use crate::infer::{EMBEDS_FILE, LORA_FILE, RUN_FILE};
use crate::model::loader::StableDiffusion;
use crate::model::lora::{LoraSet, TrainableLora};
use crate::model::nn::Ctx;
use crate::model::probe::{AttnProbe, BlockKind};

#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub instance_dir: PathBuf,
    pub output_dir: PathBuf,
    pub model: String,
    pub warmup_steps: usize,
    pub dsbal_steps: usize,
    pub warmup_lr: f64,
    pub dsbal_lr: f64,
    pub scale_lr: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lambda_attn: f64,
    pub lambda_pres: f64,
    #[serde(serialize_with = "degradation_name")]
    pub degradation: Degradation,
    pub ds_bal: bool,
    pub ema_decay: f64,
    pub seed: u64,
    pub resolution: usize,
    pub no_masks: bool,
    pub checkpoint_every: Option<usize>,
    /// Reproduce the released script: DS-Bal's rate lasts one step, the momentum U-Net is
    /// hard-copied at its first update, the whole embedding table is trained (METHOD.md,
    /// "where the released script differs", 1-3).
    pub released_script: bool,
    pub jitter: f64,
    pub flip: bool,
    /// Precision of the frozen U-Net, VAE and text encoder; LoRA weights, pseudo-word
    /// rows, AdamW state and the losses stay f32.
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    /// Static loss scale for f16 (gradients are unscaled before clipping; a step whose
    /// gradients overflow is skipped). None: no scaling.
    pub loss_scale: Option<f64>,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

fn degradation_name<S: serde::Serializer>(
    d: &Degradation,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}

impl TrainConfig {
    /// The paper's settings (METHOD.md) for one pair folder.
    pub fn new(instance_dir: PathBuf, output_dir: PathBuf, model: String) -> Self {
        Self {
            instance_dir,
            output_dir,
            model,
            warmup_steps: 200,
            dsbal_steps: 300,
            warmup_lr: 1e-4,
            dsbal_lr: 1e-5,
            scale_lr: true,
            lora_rank: 32,
            lora_alpha: 32.0,
            lambda_attn: 0.01,
            lambda_pres: 0.2,
            degradation: Degradation::Dynamic {
                alpha_init: 0.5,
                gamma: 32.0,
            },
            ds_bal: true,
            ema_decay: 0.99,
            seed: 0,
            resolution: 512,
            no_masks: false,
            checkpoint_every: None,
            released_script: false,
            jitter: 0.1,
            flip: true,
            dtype: DType::F32,
            loss_scale: None,
        }
    }

    pub fn total_steps(&self) -> usize {
        self.warmup_steps + self.dsbal_steps
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Bar,
    Json,
    Quiet,
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub phase: &'static str,
    pub alpha_d: f64,
    pub lr: f64,
    pub loss: f32,
    pub l_diff: f32,
    pub l_attn: f32,
    pub l_pres: f32,
    pub per_sample: Vec<f32>,
    pub chosen_sample: Option<usize>,
    pub grad_norm: f64,
}

/// Everything a step reads that does not change during training, on the device.
pub struct Batch {
    pub pixels: Tensor,
    pub masks: Tensor,
    /// Prompt ids `"A photo of <vN>"` per image, `[b, 77]`.
    pub ids: Tensor,
    /// Position of each image's own pseudo-word in its prompt.
    pub token_pos: Vec<usize>,
    pub sample_of: Vec<usize>,
    pub n_samples: usize,
}

/// A step's noised latents: `z_t = add_noise(z0, eps, t)`, and the (augmented) masks at
/// pixel resolution.
pub struct Noised {
    pub z_t: Tensor,
    pub eps: Tensor,
    pub timesteps: Vec<usize>,
    pub masks: Tensor,
}

/// The loss terms of one step, still in the graph.
pub struct StepLosses {
    pub per_image: Tensor,
    pub per_sample: Tensor,
    pub l_diff: Tensor,
    pub l_attn: Tensor,
    pub l_pres: Tensor,
    pub chosen: Option<usize>,
    pub loss: Tensor,
}

/// The trainable text-side parameters: the pseudo-word rows, and (released-script mode
/// only) a trainable copy of the whole token-embedding table.
#[derive(Clone, Copy)]
pub struct TextParams<'a> {
    pub rows: &'a Tensor,
    pub table: Option<&'a Tensor>,
}

#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    pub lambda_attn: f64,
    pub lambda_pres: f64,
}

/// The objective of one step. Warm-up (`momentum` None): mean masked diffusion loss +
/// lambda_attn * L_attn. DS-Bal: the largest per-sample loss + lambda_pres * L_pres
/// (against the momentum adapters, no graph) + lambda_attn * L_attn.
pub fn step_losses(
    sd: &StableDiffusion,
    batch: &Batch,
    noised: &Noised,
    online: &LoraSet,
    text: TextParams,
    momentum: Option<&LoraSet>,
    w: LossWeights,
) -> Result<StepLosses> {
    let dev = &sd.device;
    let ts: Vec<f32> = noised.timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(ts, noised.timesteps.len(), dev)?;
    let latent_side = noised.z_t.dim(2)?;
    let mask_latent = resize_nearest(&noised.masks, latent_side)?;
    let attn_side = (latent_side / 4).max(1);

    let context = sd
        .text_encoder
        .forward_with_table(&batch.ids, text.table, Some(text.rows))?;
    let probe = AttnProbe::new(attn_side, &[BlockKind::Down, BlockKind::Up]);
    // The U-Net runs in the model's precision; losses are computed in f32.
    let z_t = noised.z_t.to_dtype(sd.unet.dtype())?;
    let pred = sd
        .unet
        .forward(
            &z_t,
            &t,
            &context,
            Ctx {
                lora: Some(online),
                probe: Some(&probe),
            },
        )?
        .to_dtype(DType::F32)?;
    let per_image = masked_diffusion_per_image(&pred, &noised.eps, &mask_latent)?;
    let per_sample = per_sample_means(&per_image, &batch.sample_of, batch.n_samples)?;
    let l_attn = if w.lambda_attn > 0.0 {
        let maps = probe
            .take()
            .into_iter()
            .map(|(_, m)| m.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        attention_loss(
            &maps,
            &batch.token_pos,
            &resize_nearest(&noised.masks, attn_side)?,
        )?
    } else {
        Tensor::zeros((), DType::F32, dev)?
    };
    let (l_diff, l_pres, chosen) = match momentum {
        Some(mset) => {
            let chosen = hardest_sample(&per_sample)?;
            let mpred = sd
                .unet
                .forward(
                    &z_t,
                    &t,
                    &context.detach(),
                    Ctx {
                        lora: Some(mset),
                        probe: None,
                    },
                )?
                .to_dtype(DType::F32)?;
            let l_pres = preserving_loss(
                &pred,
                &mpred,
                &mask_latent,
                &batch.sample_of,
                batch.n_samples,
                chosen,
            )?;
            (per_sample.get(chosen)?, l_pres, Some(chosen))
        }
        None => (
            per_image.mean_all()?,
            Tensor::zeros((), DType::F32, dev)?,
            None,
        ),
    };
    let loss = ((&l_diff + (&l_pres * w.lambda_pres)?)? + (&l_attn * w.lambda_attn)?)?;
    Ok(StepLosses {
        per_image,
        per_sample,
        l_diff,
        l_attn,
        l_pres,
        chosen,
        loss,
    })
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub sd: StableDiffusion,
    pub batch: Batch,
    pub lora: TrainableLora,
    pub rows: Var,
    /// Released-script mode: the whole token-embedding table, trained (with weight decay).
    pub table: Option<Var>,
    pub momentum: Option<MomentumLora>,
    opt: AdamW,
    pub step: usize,
    pub class_words: Vec<String>,
}

pub fn pseudo_word(i: usize) -> String {
    format!("<v{i}>")
}

/// A generator for one purpose at one step: a pure function of (seed, step, stream).
fn step_rng(seed: u64, step: usize, stream: u64) -> rand::rngs::StdRng {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ stream.wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(mix)
}

fn normal(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

impl Trainer {
    /// Loads and checks everything before anything is written.
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self> {
        if cfg.total_steps() == 0 {
            return Err(Error::usage(
                "--warmup-steps and --dsbal-steps are both 0: there is nothing to train.",
            ));
        }
        let mut sd = StableDiffusion::load(&cfg.model, device, cfg.dtype)?;
        let f = sd.vae_factor();
        if cfg.resolution == 0 || !cfg.resolution.is_multiple_of(f) {
            return Err(Error::usage(format!(
                "--resolution {} is not a positive multiple of {f}, the VAE's downscale factor: try {}.",
                cfg.resolution,
                (cfg.resolution / f).max(1) * f
            )));
        }
        let policy = if cfg.no_masks {
            MaskPolicy::WholeImage
        } else {
            MaskPolicy::Required
        };
        let data = PairDataset::load(&cfg.instance_dir, cfg.resolution, policy, device)?;
        let class_words: Vec<String> = data.samples.iter().map(|s| s.class_word.clone()).collect();
        let words: Vec<String> = (0..class_words.len()).map(pseudo_word).collect();
        sd.tokenizer.add_pseudo_words(&words)?;
        let rows = init_rows(&sd, &class_words)?;
        let batch = build_batch(&sd, &data, &words)?;
        let lora = TrainableLora::new(
            &sd.unet.lora_targets(),
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.seed,
            device,
            DType::F32,
        )?;
        let table = if cfg.released_script {
            Some(Var::from_tensor(
                &sd.text_encoder.token_table().to_dtype(DType::F32)?.copy()?,
            )?)
        } else {
            None
        };
        let mut params = lora.vars();
        params.push(rows.clone());
        params.extend(table.clone());
        let opt = AdamW::new(
            params,
            AdamWConfig {
                lr: 0.0,
                ..Default::default()
            },
        )?;
        Ok(Self {
            cfg,
            sd,
            batch,
            lora,
            rows,
            table,
            momentum: None,
            opt,
            step: 0,
            class_words,
        })
    }

    /// Everything the optimizer updates, in a fixed order.
    fn params(&self) -> Vec<Var> {
        self.lora
            .vars()
            .into_iter()
            .chain([self.rows.clone()])
            .chain(self.table.clone())
            .collect()
    }

    fn text_params(&self) -> TextParams<'_> {
        TextParams {
            rows: self.rows.as_tensor(),
            table: self.table.as_ref().map(|t| t.as_tensor()),
        }
    }

    pub fn num_images(&self) -> usize {
        self.batch.sample_of.len()
    }

    fn in_dsbal(&self, d: usize) -> bool {
        d > self.cfg.warmup_steps
    }

    /// The learning rate at step `d`, scaled by the image count when `scale_lr`.
    pub fn lr(&self, d: usize) -> f64 {
        let scale = if self.cfg.scale_lr {
            self.num_images() as f64
        } else {
            1.0
        };
        let first_dsbal = d == self.cfg.warmup_steps + 1;
        let base = if !self.in_dsbal(d) || (self.cfg.released_script && !first_dsbal) {
            self.cfg.warmup_lr
        } else {
            self.cfg.dsbal_lr
        };
        base * scale
    }

    /// The augmented, degraded pixels of step `d`, encoded and noised; and alpha_d.
    fn noisy_latents(&self, d: usize) -> Result<(Noised, f64)> {
        let b = self.num_images();
        let dev = &self.sd.device;
        let (mut pixels, mut masks) = (self.batch.pixels.clone(), self.batch.masks.clone());
        let mut rng = step_rng(self.cfg.seed, d, 1);
        if self.cfg.jitter > 0.0 {
            let s = self.cfg.jitter as f32;
            let mut draw = || {
                (0..b)
                    .map(|_| rng.random_range(1.0 - s..=1.0 + s))
                    .collect::<Vec<f32>>()
            };
            let j = Jitter {
                brightness: draw(),
                contrast: draw(),
                saturation: draw(),
            };
            pixels = color_jitter(&pixels, &j)?;
        }
        if self.cfg.flip && rng.random_bool(0.5) {
            pixels = flip_horizontal(&pixels)?;
            masks = flip_horizontal(&masks)?;
        }
        let total = self.cfg.total_steps();
        let alpha_d = self.cfg.degradation.alpha(d, total);
        let g = normal(&mut step_rng(self.cfg.seed, d, 2), pixels.dims(), dev)?;
        let degraded = self.cfg.degradation.apply(&pixels, &masks, &g, d, total)?;
        let dist = self.sd.vae.encode(&degraded.to_dtype(self.cfg.dtype)?)?;
        let z_noise = normal(&mut step_rng(self.cfg.seed, d, 3), dist.mean.dims(), dev)?;
        let z0 = (dist
            .sample_with(&z_noise.to_dtype(self.cfg.dtype)?)?
            .to_dtype(DType::F32)?
            * self.sd.vae.config.scaling_factor)?;
        let mut trng = step_rng(self.cfg.seed, d, 4);
        let n_t = self.sd.schedule.num_train_timesteps();
        let timesteps: Vec<usize> = (0..b).map(|_| trng.random_range(0..n_t)).collect();
        let eps = normal(&mut step_rng(self.cfg.seed, d, 5), z0.dims(), dev)?;
        let z_t = self.sd.schedule.add_noise(&z0, &eps, &timesteps)?;
        Ok((
            Noised {
                z_t,
                eps,
                timesteps,
                masks,
            },
            alpha_d,
        ))
    }

    /// One optimizer step; returns what `train_log.jsonl` records.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let d = self.step + 1;
        let dsbal = self.in_dsbal(d) && self.cfg.ds_bal;
        if dsbal && self.momentum.is_none() {
            self.momentum = Some(MomentumLora::copy_of(&self.lora)?);
        }
        let (noised, alpha_d) = self.noisy_latents(d)?;
        let online = self.lora.as_set();
        let mset = self.momentum.as_ref().filter(|_| dsbal).map(|m| m.as_set());
        let w = LossWeights {
            lambda_attn: self.cfg.lambda_attn,
            lambda_pres: self.cfg.lambda_pres,
        };
        let StepLosses {
            per_sample,
            l_diff,
            l_attn,
            l_pres,
            chosen,
            loss,
            ..
        } = step_losses(
            &self.sd,
            &self.batch,
            &noised,
            &online,
            self.text_params(),
            mset.as_ref(),
            w,
        )?;
        let params = self.params();
        let mut grads = match self.cfg.loss_scale {
            Some(scale) => {
                let mut grads = (&loss * scale)?.backward()?;
                unscale(&mut grads, &params, scale)?;
                grads
            }
            None => loss.backward()?,
        };
        // One device-to-host read for all logged scalars; then the loss terms, which own
        // the forward graph, are dropped before the optimizer runs.
        let terms = Tensor::stack(&[&loss, &l_diff, &l_attn, &l_pres], 0)?
            .detach()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let per_sample = per_sample.detach().to_vec1::<f32>()?;
        drop((loss, l_diff, l_attn, l_pres));
        let grad_norm = clip_grad_norm(&mut grads, &params, 1.0)?;
        let lr = self.lr(d);
        self.opt.config.lr = lr;
        // An overflowed f16 backward gives non-finite gradients: skip that update.
        if grad_norm.is_finite() {
            self.opt.step(&grads)?;
        }
        drop(grads);
        if let Some(m) = self.momentum.as_mut().filter(|_| dsbal) {
            let first_update = d == self.cfg.warmup_steps + 1;
            if self.cfg.released_script && first_update {
                *m = MomentumLora::copy_of(&self.lora)?;
            } else {
                m.update(&self.lora, self.cfg.ema_decay)?;
            }
        }
        self.step = d;
        Ok(StepLog {
            step: d,
            phase: if self.in_dsbal(d) {
                "ds-bal"
            } else {
                "warm-up"
            },
            alpha_d,
            lr,
            loss: terms[0],
            l_diff: terms[1],
            l_attn: terms[2],
            l_pres: terms[3],
            per_sample,
            chosen_sample: chosen,
            grad_norm,
        })
    }

    /// The masked diffusion loss at fixed timesteps and noise (no update): a measure of
    /// how well the pair is learned, comparable across steps.
    pub fn probe_loss(&self, timesteps: &[usize], seed: u64) -> Result<f32> {
        let dev = &self.sd.device;
        let dist = self
            .sd
            .vae
            .encode(&self.batch.pixels.to_dtype(self.cfg.dtype)?)?;
        let z0 = (dist.mean.to_dtype(DType::F32)? * self.sd.vae.config.scaling_factor)?;
        let eps = normal(&mut step_rng(seed, 0, 9), z0.dims(), dev)?;
        let z_t = self.sd.schedule.add_noise(&z0, &eps, timesteps)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            timesteps.len(),
            dev,
        )?;
        let table = self.table.as_ref().map(|t| t.as_tensor().detach());
        let rows = self.rows.as_tensor().detach();
        let context = self.sd.text_encoder.forward_with_table(
            &self.batch.ids,
            table.as_ref(),
            Some(&rows),
        )?;
        let set = self.lora.as_set();
        let pred = self
            .sd
            .unet
            .forward(
                &z_t.to_dtype(self.cfg.dtype)?,
                &t,
                &context,
                Ctx {
                    lora: Some(&set),
                    probe: None,
                },
            )?
            .to_dtype(DType::F32)?;
        let mask_latent = resize_nearest(&self.batch.masks, z_t.dim(2)?)?;
        Ok(masked_diffusion_per_image(&pred, &eps, &mask_latent)?
            .mean_all()?
            .detach()
            .to_scalar::<f32>()?)
    }

    /// Writes the adapters, embeddings and run record into the output folder, atomically.
    pub fn export(&self, dir: &Path) -> Result<()> {
        let targets = self.sd.unet.lora_targets();
        let set = self.lora.as_set();
        set.save_peft(&dir.join(LORA_FILE), &targets)?;
        set.save_kohya(&dir.join("lora_kohya.safetensors"), &targets)?;
        let embeds = self.embeds()?;
        crate::embeds::save(&dir.join(EMBEDS_FILE), &embeds)?;
        crate::embeds::save_a1111(&dir.join("embeddings"), &embeds)?;
        let tokens: serde_json::Map<String, serde_json::Value> = self
            .class_words
            .iter()
            .enumerate()
            .map(|(i, w)| (pseudo_word(i), serde_json::json!(w)))
            .collect();
        // A local folder is recorded absolute, so the output folder works from anywhere.
        let base = std::fs::canonicalize(&self.sd.source)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| self.sd.source.clone());
        let record = serde_json::json!({
            "base_model": base,
            "tokens": tokens,
            "steps_done": self.step,
            "config": self.cfg,
            "magictailor_version": env!("CARGO_PKG_VERSION"),
        });
        let text =
            serde_json::to_string_pretty(&record).map_err(|e| Error::model(e.to_string()))?;
        crate::fsutil::write_atomic(&dir.join(RUN_FILE), text.as_bytes())
    }

    pub fn embeds(&self) -> Result<crate::embeds::Embeds> {
        (0..self.class_words.len())
            .map(|i| Ok((pseudo_word(i), self.rows.as_tensor().get(i)?.detach())))
            .collect()
    }

    /// Everything resume needs, as named tensors.
    pub fn checkpoint_tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        for (p, a, b) in &self.lora.modules {
            out.insert(format!("lora.{p}.A"), a.as_tensor().detach());
            out.insert(format!("lora.{p}.B"), b.as_tensor().detach());
        }
        if let Some(m) = &self.momentum {
            for (name, t) in m.tensors() {
                out.insert(format!("momentum.{name}"), t);
            }
        }
        out.insert("rows".into(), self.rows.as_tensor().detach());
        if let Some(t) = &self.table {
            out.insert("table".into(), t.as_tensor().detach());
        }
        for (k, v) in self.opt.state()? {
            out.insert(format!("opt.{k}"), v);
        }
        out.insert(
            "step".into(),
            Tensor::new(self.step as u32, &self.sd.device)?,
        );
        Ok(out)
    }

    pub fn restore(&mut self, t: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            t.get(k).ok_or_else(|| {
                Error::model(format!(
                    "the checkpoint lacks {k}: it is from another run or version"
                ))
            })
        };
        for (p, a, b) in &self.lora.modules {
            a.set(get(&format!("lora.{p}.A"))?)?;
            b.set(get(&format!("lora.{p}.B"))?)?;
        }
        self.rows.set(get("rows")?)?;
        if let Some(t) = &self.table {
            t.set(get("table")?)?;
        }
        if t.contains_key(&format!("momentum.{}.A", self.lora.modules[0].0)) {
            let mut m = MomentumLora::copy_of(&self.lora)?;
            m.load(|name| get(&format!("momentum.{name}")).cloned())?;
            self.momentum = Some(m);
        }
        let opt: std::collections::HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("opt.").map(|k| (k.to_string(), v.clone())))
            .collect();
        self.opt.load_state(&opt)?;
        self.step = get("step")?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        Ok(())
    }
}

/// Pseudo-word rows start as the embedding of the first token of their class word.
/// Divides the parameters' gradients by the loss scale.
fn unscale(grads: &mut candle_core::backprop::GradStore, params: &[Var], scale: f64) -> Result<()> {
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            let g = (g.detach() / scale)?;
            grads.insert(p.as_tensor(), g);
        }
    }
    Ok(())
}

fn init_rows(sd: &StableDiffusion, class_words: &[String]) -> Result<Var> {
    let mut rows = Vec::new();
    for w in class_words {
        let ids = sd.tokenizer.encode(w)?;
        // ids[0] is BOS; ids[1] the first token of the word.
        rows.push(sd.text_encoder.token_row(ids[1])?);
    }
    Ok(Var::from_tensor(
        &Tensor::stack(&rows, 0)?.to_dtype(DType::F32)?,
    )?)
}

fn build_batch(sd: &StableDiffusion, data: &PairDataset, words: &[String]) -> Result<Batch> {
    let mut pixels = Vec::new();
    let mut masks = Vec::new();
    let mut ids = Vec::new();
    let mut token_pos = Vec::new();
    let mut sample_of = Vec::new();
    for (s, im) in data.images() {
        pixels.push(im.pixels.clone());
        masks.push(im.mask.clone());
        let prompt_ids = sd.tokenizer.encode(&format!("A photo of {}", words[s]))?;
        let word_id = sd.tokenizer.encode(&words[s])?[1];
        let pos = prompt_ids
            .iter()
            .position(|&i| i == word_id)
            .ok_or_else(|| Error::model("pseudo-word missing from its prompt"))?;
        ids.extend(prompt_ids);
        token_pos.push(pos);
        sample_of.push(s);
    }
    let b = sample_of.len();
    Ok(Batch {
        pixels: Tensor::stack(&pixels, 0)?,
        masks: Tensor::stack(&masks, 0)?,
        ids: Tensor::from_vec(ids, (b, sd.tokenizer.max_len()), &sd.device)?,
        token_pos,
        sample_of,
        n_samples: data.samples.len(),
    })
}

/// Appends one JSON line to the training log.
pub fn append_log(file: &Path, log: &StepLog) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| Error::io(file, e))?;
    let line = serde_json::to_string(log).map_err(|e| Error::model(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(file, e))
}
