//! MagicTailor training (paper §3): DM-Deg, the masked diffusion and cross-attention
//! losses, the warm-up phase, and DS-Bal with its momentum U-Net.

pub mod augment;
pub mod checkpoint;
pub mod dm_deg;
pub mod ds_bal;
pub mod losses;
pub mod optim;
pub mod trainer;

use std::path::Path;

use candle_core::Device;

use crate::error::{Error, Result};
use trainer::{append_log, Progress, StepLog, TrainConfig, Trainer};

const LOG_FILE: &str = "train_log.jsonl";

/// `magictailor train`: checks every input, then trains and exports into `output_dir`.
pub fn run(cfg: TrainConfig, device: &Device, progress: Progress, resume: bool) -> Result<()> {
    let out = cfg.output_dir.clone();
    let occupied = out.is_dir()
        && std::fs::read_dir(&out)
            .map_err(|e| Error::io(&out, e))?
            .next()
            .is_some();
    if occupied && !resume {
        return Err(Error::usage(format!(
            "the output folder {} already holds files. Pass --resume to continue its run from the last \
             checkpoint, or choose another --output-dir.",
            out.display()
        )));
    }
    let total = cfg.total_steps();
    let warmup = cfg.warmup_steps;
    let every = cfg.checkpoint_every;
    // Everything that can be wrong with the inputs fails here, before anything is written.
    let mut t = Trainer::new(cfg, device)?;
    if resume {
        let file = checkpoint::latest(&out)?.ok_or_else(|| {
            Error::usage(format!(
                "--resume: {} has no checkpoints to resume from.",
                checkpoint::dir(&out).display()
            ))
        })?;
        t.restore(&checkpoint::load(&file, device)?)?;
        trim_log(&out.join(LOG_FILE), t.step)?;
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let bar = bar(total, t.step, progress);
    while t.step < total {
        let log = t.train_step()?;
        append_log(&out.join(LOG_FILE), &log)?;
        report(&bar, &log, progress);
        let at_switch = log.step == warmup && warmup < total;
        if at_switch || every.is_some_and(|k| k > 0 && log.step % k == 0) {
            checkpoint::save(&out, log.step, &t.checkpoint_tensors()?)?;
        }
    }
    bar.finish_and_clear();
    t.export(&out)
}

fn bar(total: usize, done: usize, progress: Progress) -> indicatif::ProgressBar {
    if progress != Progress::Bar {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64).with_position(done as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar
}

fn report(bar: &indicatif::ProgressBar, log: &StepLog, progress: Progress) {
    match progress {
        Progress::Bar => {
            bar.set_message(format!("{} loss {:.4}", log.phase, log.loss));
            bar.inc(1);
        }
        Progress::Json => {
            if let Ok(line) = serde_json::to_string(log) {
                println!("{line}");
            }
        }
        Progress::Quiet => {}
    }
}

/// Drops log lines past `step` (written after the checkpoint we resume from).
fn trim_log(file: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomic(file, kept.as_bytes())
}
