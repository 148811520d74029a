//! The MagicTailor training loop on one pair folder: warm-up, then DS-Bal (or the joint
//! phase of the `--no-ds-bal` ablation).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::config::TrainConfig;
use super::ds_bal::MomentumLora;
use super::losses::{masked_diffusion_per_image, resize_nearest};
use super::noise::NoiseAhead;
use super::objective::{
    noised_latents, pseudo_word, step_losses, Batch, LossWeights, StepLosses, TextParams,
};
use super::optim::{clip_coef, grad_norms, AdamW, AdamWConfig, Clip};
use crate::data::{MaskPolicy, PairDataset};
use crate::error::{Error, Result};
use crate::io::{embeds, run, tensors};
use crate::masks::{self, auto::AutoMasks};
use crate::model::loader::StableDiffusion;
use crate::model::lora::TrainableLora;
use crate::model::nn::Ctx;
use crate::profile::{self, Kind};
use crate::rng::{normal, step_rng, Stream};

/// Which objective a step optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Mean masked diffusion loss + lambda_attn * L_attn, at the warm-up rate.
    WarmUp,
    /// Dual-Stream Balancing against the momentum adapters, at the DS-Bal rate.
    DsBal,
    /// `--no-ds-bal`: the warm-up objective continued at the DS-Bal rate.
    Joint,
}

impl Phase {
    /// The phase of global step `d` (counted from 1).
    pub fn at(cfg: &TrainConfig, d: usize) -> Self {
        match (d <= cfg.warmup_steps, cfg.ds_bal) {
            (true, _) => Phase::WarmUp,
            (false, true) => Phase::DsBal,
            (false, false) => Phase::Joint,
        }
    }

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
    pub phase: Phase,
    pub alpha_d: f64,
    pub lr: f64,
    pub loss: f32,
    pub l_diff: f32,
    pub l_attn: f32,
    pub l_pres: f32,
    pub per_sample: Vec<f32>,
    pub chosen_sample: Option<usize>,
    /// The LoRA gradients' norm before clipping.
    pub grad_norm: f64,
    /// f16 only: the step overflowed and its update was skipped.
    pub skipped: bool,
    /// Seconds spent drawing this step's sample grid, if it drew one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_seconds: Option<f64>,
}

/// With f16 loss scaling, this many overflowed steps in a row stop the run: the scale
/// cannot save it.
pub const MAX_SKIPPED_IN_A_ROW: usize = 20;

/// The logged loss terms as a message names them, in `StepLog` order.
const TERMS: [&str; 4] = [
    "the total loss",
    "the masked diffusion loss L_diff",
    "the attention loss L_attn",
    "the preserving loss L_pres",
];

/// What one forward and backward pass gives.
struct Pass {
    grads: GradStore,
    terms: Vec<f32>,
    per_sample: Vec<f32>,
    chosen: Option<usize>,
    alpha_d: f64,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub sd: StableDiffusion,
    pub batch: Batch,
    /// Each step's host noise, the next one drawn while this one runs.
    noise: NoiseAhead,
    pub lora: TrainableLora,
    pub rows: Var,
    /// Released-script mode: the whole token-embedding table, trained (with weight decay).
    pub table: Option<Var>,
    pub momentum: Option<MomentumLora>,
    opt: AdamW,
    pub step: usize,
    pub class_words: Vec<String>,
    /// f16: consecutive steps whose update was skipped for overflow.
    skipped_in_a_row: usize,
    /// Masks made from the base model's attention (the pair folder had none), written
    /// into the output folder when training starts.
    pub auto_masks: Option<AutoMasks>,
}

impl Trainer {
    /// Loads and checks everything before anything is written.
    pub fn new(cfg: TrainConfig, device: &Device, progress: Progress) -> Result<Self> {
        let sd = load_model(&cfg, device)?;
        let mut data = load_pair(&cfg, device)?;
        let auto = make_masks(&cfg, &sd, &mut data, progress)?;
        let mut t = Self::with_model(cfg, sd, &data)?;
        t.auto_masks = auto;
        Ok(t)
    }

    /// A trainer on an already loaded model (which `into_model` gives back), so many
    /// pairs share one load. `data` is `cfg.instance_dir`, loaded by [`load_pair`].
    pub fn with_model(
        cfg: TrainConfig,
        mut sd: StableDiffusion,
        data: &PairDataset,
    ) -> Result<Self> {
        let device = &sd.device.clone();
        let class_words: Vec<String> = data.samples.iter().map(|s| s.class_word.clone()).collect();
        let words: Vec<String> = (0..class_words.len()).map(pseudo_word).collect();
        super::watch::check_sample_prompts(&cfg, words.len())?;
        sd.tokenizer.add_pseudo_words(&words)?;
        if cfg.sample_every != Some(0) {
            for p in &cfg.sample_prompts {
                if let Some(w) = sd.tokenizer.check_length(p, "the sample prompt")? {
                    crate::io::console::note(format_args!("warning: {w}"));
                }
            }
        }
        let rows = init_rows(&sd, &class_words)?;
        let batch = Batch::new(&sd, data)?;
        let last = cfg.total_steps();
        let noise = NoiseAhead::new(cfg.seed, batch.noise_sizes(&sd)?, last);
        let lora = TrainableLora::new(
            &sd.unet.lora_targets(),
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.seed,
            device,
            DType::F32,
        )?;
        let table = if cfg.released_script {
            let t = sd.text_encoder.token_table().to_dtype(DType::F32)?.copy()?;
            Some(Var::from_tensor(&t)?)
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
            noise,
            lora,
            rows,
            table,
            momentum: None,
            opt,
            step: 0,
            class_words,
            skipped_in_a_row: 0,
            auto_masks: None,
        })
    }

    /// The base model, for the next pair.
    pub fn into_model(self) -> StableDiffusion {
        self.sd
    }

    /// The text-side parameters the optimizer updates: pseudo-word rows, then the table.
    fn text_vars(&self) -> Vec<Var> {
        std::iter::once(self.rows.clone())
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
        self.batch.len()
    }

    /// The learning rate at step `d`, scaled by the image count when `scale_lr`. In
    /// released-script mode the post-warm-up rate lasts one step (its scheduler resets it).
    pub fn lr(&self, d: usize) -> f64 {
        let scale = if self.cfg.scale_lr {
            self.num_images() as f64
        } else {
            1.0
        };
        let first_after_warmup = d == self.cfg.warmup_steps + 1;
        let base = match Phase::at(&self.cfg, d) {
            Phase::WarmUp => self.cfg.warmup_lr,
            _ if self.cfg.released_script && !first_after_warmup => self.cfg.warmup_lr,
            Phase::DsBal | Phase::Joint => self.cfg.dsbal_lr,
        };
        base * scale
    }

    /// One optimizer step; returns what `train_log.jsonl` records.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let d = self.step + 1;
        let dev = self.sd.device.clone();
        let _step = profile::scope(Kind::TrainStep, &dev);
        let phase = Phase::at(&self.cfg, d);
        let Pass {
            grads,
            terms,
            per_sample,
            chosen,
            alpha_d,
        } = self.forward_backward(d, phase)?;
        // As the released script: only the U-Net's (LoRA) gradients are clipped.
        let clipping = profile::scope(Kind::GradClip, &dev);
        let (lora_vars, text_vars) = (self.lora.vars(), self.text_vars());
        let norms = grad_norms(&grads, &[&lora_vars, &text_vars])?;
        let (lora_norm, text_norm) = (norms[0], norms[1]);
        let clip = Clip {
            params: &lora_vars,
            coef: clip_coef(lora_norm, 1.0),
        };
        drop(clipping);
        let lr = self.lr(d);
        self.opt.config.lr = lr;
        let finite = terms.iter().all(|v| v.is_finite()) && (lora_norm + text_norm).is_finite();
        if finite {
            profile::time(Kind::Optimizer, &dev, || {
                self.opt.step_clipped(&grads, Some(clip))
            })?;
            self.skipped_in_a_row = 0;
        } else {
            self.on_non_finite(d, &terms, lora_norm + text_norm)?;
        }
        drop(grads);
        if let Some(m) = self.momentum.as_mut().filter(|_| phase == Phase::DsBal) {
            let _ema = profile::scope(Kind::Momentum, &dev);
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
            phase,
            alpha_d,
            lr,
            loss: terms[0],
            l_diff: terms[1],
            l_attn: terms[2],
            l_pres: terms[3],
            per_sample,
            chosen_sample: chosen,
            grad_norm: lora_norm,
            skipped: !finite,
            sample_seconds: None,
        })
    }

    /// The unclipped gradients of the next step's loss by [`Self::trainable`] name, without
    /// updating anything (the step's noise depends only on seed and step, so
    /// `train_step` then computes the same step): for comparing backends
    /// (`examples/step_grads.rs`).
    pub fn next_gradients(&mut self) -> Result<HashMap<String, Tensor>> {
        let d = self.step + 1;
        let grads = self.forward_backward(d, Phase::at(&self.cfg, d))?.grads;
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
        let (noised, alpha_d) = profile::time(Kind::Data, &dev, || {
            let noise = self.noise.take(d)?;
            noised_latents(&self.sd, &self.batch, &self.cfg, d, noise)
        })?;
        let online = self.lora.as_set();
        let momentum = self
            .momentum
            .as_ref()
            .filter(|_| phase == Phase::DsBal)
            .map(|m| m.as_set());
        let w = LossWeights {
            lambda_attn: self.cfg.lambda_attn,
            lambda_pres: self.cfg.lambda_pres,
        };
        let forward = profile::scope(Kind::ForwardLoss, &dev);
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
            momentum,
            w,
        )?;
        drop(forward);
        let backward = profile::scope(Kind::Backward, &dev);
        let grads = match self.cfg.loss_scale {
            Some(scale) => {
                let mut grads = (&loss * scale)?.backward()?;
                unscale(&mut grads, &self.opt_vars(), scale)?;
                grads
            }
            None => loss.backward()?,
        };
        drop(backward);
        // The loss terms and the per-sample losses own the forward graph: read, then
        // dropped here, before the optimizer runs.
        let terms = Tensor::stack(&[&loss, &l_diff, &l_attn, &l_pres], 0)?.to_dtype(DType::F32)?;
        let mut read = profile::time(Kind::HostRead, &dev, || {
            Tensor::cat(&[&terms, &per_sample.to_dtype(DType::F32)?], 0)?
                .detach()
                .to_vec1::<f32>()
        })?;
        let per_sample = read.split_off(4);
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
        // A component names the cause better than the total it spoils.
        let what = match [1, 2, 3, 0].into_iter().find(|&i| !terms[i].is_finite()) {
            Some(i) => format!("{} is {}", TERMS[i], terms[i]),
            None => format!("the gradient norm is {grad_norm}"),
        };
        let Some(scale) = self.cfg.loss_scale else {
            return Err(Error::Diverged(format!(
                "training diverged at step {d}: {what}. The step was not applied. Lower the \
                 learning rate (--warmup-lr, --dsbal-lr){}.",
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
             lower the learning rate (--warmup-lr, --dsbal-lr).",
            d + 1 - self.skipped_in_a_row
        )))
    }

    /// Everything the optimizer updates, in its order.
    fn opt_vars(&self) -> Vec<Var> {
        let mut v = self.lora.vars();
        v.extend(self.text_vars());
        v
    }

    /// The masked diffusion loss at fixed timesteps and noise (no update): a measure of
    /// how well the pair is learned, comparable across steps.
    pub fn probe_loss(&self, timesteps: &[usize], seed: u64) -> Result<f32> {
        let dev = &self.sd.device;
        let pixels = self.batch.pixels.to_dtype(self.cfg.dtype)?;
        let z0 = (self.sd.vae.encode(&pixels)?.mean.to_dtype(DType::F32)?
            * self.sd.vae.config.scaling_factor)?;
        let eps = normal(&mut step_rng(seed, 0, Stream::Probe), z0.dims(), dev)?;
        let z_t = self.sd.schedule.add_noise(&z0, &eps, timesteps)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, timesteps.len(), dev)?;
        let table = self.table.as_ref().map(|t| t.as_tensor().detach());
        let rows = self.rows.as_tensor().detach();
        let context = self.sd.text_encoder.forward_with_table(
            &self.batch.ids,
            table.as_ref(),
            Some(&rows),
        )?;
        let set = self.lora.as_set();
        let ctx = Ctx {
            lora: Some(&set),
            probe: None,
        };
        let pred = self
            .sd
            .unet
            .forward(&z_t.to_dtype(self.cfg.dtype)?, &t, &context, ctx)?
            .to_dtype(DType::F32)?;
        let mask_latent = resize_nearest(&self.batch.masks, z_t.dim(2)?)?;
        Ok(masked_diffusion_per_image(&pred, &eps, &mask_latent)?
            .mean_all()?
            .detach()
            .to_scalar::<f32>()?)
    }

    /// Writes the adapters, embeddings and run record into `dir`, each file atomically.
    pub fn export(&self, dir: &Path) -> Result<()> {
        let targets = self.sd.unet.lora_targets();
        let set = self.lora.as_set();
        set.save_peft(&dir.join(run::LORA), &targets)?;
        set.save_kohya(&dir.join(run::LORA_KOHYA), &targets)?;
        let embeds = self.embeds()?;
        embeds::save(&dir.join(run::EMBEDS), &embeds)?;
        embeds::save_a1111(&dir.join(run::A1111_EMBEDS), &embeds)?;
        if let Some(table) = &self.table {
            // The released script saves and reloads the whole drifted table.
            let t = HashMap::from([(run::TOKEN_TABLE_KEY.to_string(), table.as_detached_tensor())]);
            tensors::write(&dir.join(run::TOKEN_TABLE), &t, None)?;
        }
        run::write_record(dir, &self.record(dir)?)
    }

    fn record(&self, dir: &Path) -> Result<run::RunRecord> {
        let tokens = (self.class_words.iter().enumerate())
            .map(|(i, w)| (pseudo_word(i), w.clone()))
            .collect();
        // A local folder is recorded absolute, so the output folder works from anywhere.
        let base = std::fs::canonicalize(&self.sd.source)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| self.sd.source.clone());
        let config = serde_json::to_value(&self.cfg)
            .map_err(|e| Error::internal(format!("serializing the settings: {e}")))?;
        let kernels = crate::kernels::kernel_states()
            .iter()
            .map(|e| e.to_json())
            .collect();
        Ok(run::RunRecord {
            base_model: base,
            tokens,
            steps_done: self.step,
            config,
            magictailor_version: env!("CARGO_PKG_VERSION").to_string(),
            magictailor_commit: env!("MAGICTAILOR_COMMIT").to_string(),
            segments: run::segments(dir)?,
            previews: super::watch::previews(dir),
            masks: Some(self.masks_made_by()),
            kernels,
        })
    }

    /// How the masks were made, for `magictailor.json`.
    fn masks_made_by(&self) -> serde_json::Value {
        match &self.auto_masks {
            Some(a) => serde_json::to_value(&a.record).unwrap_or_default(),
            None if self.cfg.no_masks => serde_json::json!({"method": "whole images (--no-masks)"}),
            None => serde_json::json!({
                "method": "files",
                "dir": self.cfg.instance_dir.join("masks"),
            }),
        }
    }

    pub fn embeds(&self) -> Result<embeds::Embeds> {
        (0..self.class_words.len())
            .map(|i| Ok((pseudo_word(i), self.rows.as_tensor().get(i)?.detach())))
            .collect()
    }

    /// Every trainable tensor by its checkpoint name: `lora.<path>.A`/`.B`, `rows`, and
    /// `table` in released-script mode.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let lora = self.lora.modules.iter().flat_map(|m| {
            [
                (format!("lora.{}.A", m.path), m.a.clone()),
                (format!("lora.{}.B", m.path), m.b.clone()),
            ]
        });
        let text = [("rows", Some(&self.rows)), ("table", self.table.as_ref())];
        let text = text
            .into_iter()
            .filter_map(|(name, v)| Some((name.to_string(), v?.clone())));
        lora.chain(text).collect()
    }

    /// Everything resume needs, as named tensors.
    pub fn checkpoint_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = (self.trainable().into_iter())
            .map(|(name, v)| (name, v.as_detached_tensor()))
            .collect();
        if let Some(m) = &self.momentum {
            for (name, t) in m.tensors()? {
                out.insert(format!("momentum.{name}"), t);
            }
        }
        for (k, v) in self.opt.state()? {
            out.insert(format!("opt.{k}"), v);
        }
        let step = Tensor::new(self.step as u32, &self.sd.device)?;
        out.insert("step".into(), step);
        Ok(out)
    }

    /// Writes the checkpoint of the current step into `out`, with the settings that shape
    /// the result in its header.
    pub fn save_checkpoint(&self, out: &Path) -> Result<std::path::PathBuf> {
        let settings = serde_json::Value::Object(super::segments::fixed(&self.cfg)?).to_string();
        let meta = HashMap::from([(super::segments::METADATA_KEY.to_string(), settings)]);
        let file = crate::io::checkpoint::save(out, self.step, &self.checkpoint_tensors()?, meta)?;
        if let Some(keep) = self.cfg.keep_checkpoints {
            crate::io::checkpoint::prune(out, keep)?;
        }
        Ok(file)
    }

    /// Restores [`Self::checkpoint_tensors`]; `file` names the checkpoint in errors.
    pub fn restore(&mut self, t: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
        let get = |k: &str| {
            t.get(k).ok_or_else(|| {
                Error::bad_file(
                    file,
                    format!(
                        "the checkpoint {} lacks {k}: it is from another run or version. Start a new \
                         run in another --output-dir.",
                        file.display()
                    ),
                )
            })
        };
        for m in &self.lora.modules {
            m.a.set(get(&format!("lora.{}.A", m.path))?)?;
            m.b.set(get(&format!("lora.{}.B", m.path))?)?;
        }
        self.rows.set(get("rows")?)?;
        if let Some(table) = &self.table {
            table.set(get("table")?)?;
        }
        if t.keys().any(|k| k.starts_with("momentum.")) {
            let mut m = MomentumLora::copy_of(&self.lora)?;
            m.load(|name| get(&format!("momentum.{name}")).cloned())?;
            self.momentum = Some(m);
        }
        let opt: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("opt.").map(|k| (k.to_string(), v.clone())))
            .collect();
        self.opt.load_state(&opt)?;
        self.step = get("step")?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        Ok(())
    }
}

/// Checks the settings and loads the base model they name.
pub fn load_model(cfg: &TrainConfig, device: &Device) -> Result<StableDiffusion> {
    cfg.validate()?;
    let sd = StableDiffusion::load(&cfg.model, device, cfg.dtype)?;
    let f = sd.vae_factor();
    if !cfg.resolution.is_multiple_of(f) {
        return Err(Error::usage(format!(
            "--resolution {} is not a multiple of {f}, this model's VAE downscale factor: try {}.",
            cfg.resolution,
            (cfg.resolution / f).max(1) * f
        )));
    }
    Ok(sd)
}

/// The reference images and masks of `cfg.instance_dir`: where bad input shows up.
/// A folder without masks loads with whole images; [`make_masks`] then replaces them.
pub fn load_pair(cfg: &TrainConfig, device: &Device) -> Result<PairDataset> {
    let policy = if cfg.no_masks || masks::auto::needed(&cfg.instance_dir, cfg.no_masks)? {
        MaskPolicy::WholeImage
    } else {
        MaskPolicy::Required {
            model: cfg.model.clone(),
        }
    };
    PairDataset::load(&cfg.instance_dir, cfg.resolution, policy, device)
}

/// The masks of a pair folder that has none, from the base model's attention.
pub fn make_masks(
    cfg: &TrainConfig,
    sd: &StableDiffusion,
    data: &mut PairDataset,
    progress: Progress,
) -> Result<Option<AutoMasks>> {
    if !masks::auto::needed(&cfg.instance_dir, cfg.no_masks)? {
        return Ok(None);
    }
    masks::auto::apply(sd, data, progress == Progress::Bar).map(Some)
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

/// Pseudo-word rows start as the embedding of the first token of their class word.
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
