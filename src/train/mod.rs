//! MagicTailor training (paper §3): DM-Deg, the masked diffusion and cross-attention
//! losses, the warm-up phase, and DS-Bal with its momentum U-Net.

pub mod augment;
pub mod config;
pub mod dm_deg;
pub mod ds_bal;
pub mod losses;
pub mod objective;
pub mod optim;
pub mod trainer;

use candle_core::Device;

use crate::error::{Error, IoOp, Result};
use crate::io::{checkpoint, run};
pub use config::TrainConfig;
use trainer::{Progress, StepLog, Trainer};

/// `magictailor train`: checks every input, then trains and exports into `output_dir`.
pub fn run(cfg: TrainConfig, device: &Device, progress: Progress, resume: bool) -> Result<()> {
    let out = cfg.output_dir.clone();
    if run::is_occupied(&out)? && !resume {
        return Err(Error::usage(format!(
            "the output folder {} already holds files. Pass --resume to continue its run from the last \
             checkpoint, or choose another --output-dir.",
            out.display()
        )));
    }
    let (total, warmup, every) = (cfg.total_steps(), cfg.warmup_steps, cfg.checkpoint_every);
    // Everything that can be wrong with the inputs fails here, before anything is written.
    let mut t = Trainer::new(cfg, device)?;
    if resume {
        let file = checkpoint::latest(&out)?.ok_or_else(|| {
            Error::usage(format!(
                "--resume: {} has no checkpoints to resume from.",
                checkpoint::dir(&out).display()
            ))
        })?;
        t.restore(&checkpoint::load(&file, device)?, &file)?;
        run::trim_log(&out, t.step)?;
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::io(IoOp::CreateDir, &out, e))?;
    let bar = bar(total, t.step, progress);
    while t.step < total {
        let log = t.train_step()?;
        run::append_log(&out, &log)?;
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
            bar.set_message(format!("{} loss {:.4}", log.phase.name(), log.loss));
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
