//! What a person watches during a run: sample grids of the current adapters
//! (`samples/step-N.png`), the loss plot (`loss.png`), and TensorBoard event files.
//!
//! Sampling draws its latents from its own seeds and changes no training state, so a run
//! with samples gives the same weights as one without, and resume stays bit-identical.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use image::RgbImage;

use super::config::TrainConfig;
use super::trainer::{StepLog, Trainer};
use crate::error::Result;
use crate::infer::{decode, sample, to_images, Weights};
use crate::io::png::png_bytes;
use crate::io::run::{self, LOSS_PLOT, TENSORBOARD_DIR};
use crate::io::write_atomic;
use crate::preview::{grid::Grid, plot, tensorboard::EventWriter};

/// The per-run watchers: TensorBoard, if asked for.
pub struct Watch {
    tensorboard: Option<EventWriter>,
}

impl Watch {
    pub fn new(cfg: &TrainConfig, out: &Path) -> Result<Self> {
        let tensorboard = match cfg.tensorboard {
            true => Some(EventWriter::create(&out.join(TENSORBOARD_DIR))?),
            false => None,
        };
        Ok(Self { tensorboard })
    }

    /// After a step: its scalars to TensorBoard, and a sample grid when one is due
    /// (its time goes into the step's log line).
    pub fn after_step(&mut self, t: &mut Trainer, log: &mut StepLog, out: &Path) -> Result<()> {
        if let Some(tb) = &mut self.tensorboard {
            let scalars = [
                ("loss/total", log.loss),
                ("loss/l_diff", log.l_diff),
                ("loss/l_attn", log.l_attn),
                ("loss/l_pres", log.l_pres),
                ("train/lr", log.lr as f32),
                ("train/grad_norm", log.grad_norm as f32),
                ("train/alpha_d", log.alpha_d as f32),
            ];
            for (tag, v) in scalars {
                tb.scalar(tag, log.step, v)?;
            }
        }
        if !t.cfg.samples_at(log.step) {
            return Ok(());
        }
        let start = Instant::now();
        let grid = sample_grid(t)?;
        let png = png_bytes(&grid)?;
        write_atomic(&run::samples_file(out, log.step), &png)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.image("samples", log.step, &png, grid.width(), grid.height())?;
        }
        log.sample_seconds = Some(start.elapsed().as_secs_f64());
        Ok(())
    }
}

/// A row per sample prompt, a column per seed, drawn with the current adapters and rows
/// (and a full fine-tune's current U-Net and text encoder, swapped in for the grid).
/// Column `s` of a prompt is what `infer --seed s` draws with the same weights.
pub fn sample_grid(t: &mut Trainer) -> Result<RgbImage> {
    let Some(full) = &t.full else {
        return draw_grid(t);
    };
    let dtype = t.cfg.dtype;
    let (unet, text_encoder) = (full.unet(dtype, false)?, full.text_encoder(dtype, false)?);
    let unet = std::mem::replace(&mut t.sd.unet, unet);
    let text_encoder = std::mem::replace(&mut t.sd.text_encoder, text_encoder);
    let grid = draw_grid(t);
    (t.sd.unet, t.sd.text_encoder) = (unet, text_encoder);
    grid
}

fn draw_grid(t: &Trainer) -> Result<RgbImage> {
    let cfg = &t.cfg;
    let lora = t.lora.detached();
    let tuned = t.tuned.detached();
    let rows = t.rows.as_detached_tensor();
    let rows_2 = t.rows_2.as_ref().map(|v| v.as_detached_tensor());
    let table = t.table.as_ref().map(|v| v.as_detached_tensor());
    let table_2 = t.table_2.as_ref().map(|v| v.as_detached_tensor());
    // ViCo samples with its current blocks and each sample's first image as reference.
    let visual = match &t.vico {
        Some(blocks) => Some(crate::infer::vico::Visual::new(
            blocks,
            crate::data::first_images(&cfg.instance_dir)?,
        )),
        None => None,
    };
    let w = Weights {
        sd: &t.sd,
        lora: Some(&lora),
        tuned: (!tuned.is_empty()).then_some(&tuned),
        extra_rows: Some(&rows),
        extra_rows_2: rows_2.as_ref(),
        token_table: table.as_ref(),
        token_table_2: table_2.as_ref(),
        vico: visual.as_ref(),
    };
    let latent = cfg.resolution / t.sd.vae_factor();
    let channels = t.sd.unet.config.in_channels;
    let noise = (cfg.sample_seeds.iter())
        .map(|&s| crate::rng::seeded_normal(s, (1, channels, latent, latent), &t.sd.device))
        .collect::<Result<Vec<_>>>()?;
    let noise = Tensor::cat(&noise, 0)?;
    let mut cells = Vec::new();
    for prompt in &cfg.sample_prompts {
        let x = sample(
            w,
            prompt,
            "",
            noise.clone(),
            cfg.sample_steps,
            crate::infer::Sampling::default().guidance,
            false,
        )?;
        cells.extend(to_images(&decode(w, &x)?)?);
    }
    let cols: Vec<String> = cfg
        .sample_seeds
        .iter()
        .map(|s| format!("seed {s}"))
        .collect();
    let phase = t.recipe.at(t.step).phase().name();
    let title = format!("step {} of {} ({phase})", t.step, cfg.total_steps());
    Grid {
        title: &title,
        rows: &cfg.sample_prompts,
        cols: &cols,
        cells: &cells,
    }
    .render()
}

/// Redraws `loss.png` from the run's log.
pub fn write_loss_plot(cfg: &TrainConfig, out: &Path) -> Result<()> {
    let log = run::read_log(out)?;
    let switch = cfg.phase_switch().filter(|_| cfg.ds_bal);
    let png = png_bytes(&plot::loss_plot(&log, switch)?)?;
    write_atomic(&out.join(LOSS_PLOT), &png)
}
