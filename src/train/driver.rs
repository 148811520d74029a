//! A run folder from start to finish: `magictailor train`'s entry point [`train`], and
//! what it shares with `batch`: claiming the folder, the loop over steps (the watchers,
//! the log, checkpoints on the way, the export at the end), and what a stop or failure
//! leaves and says.

use std::path::Path;

use candle_core::Device;

use super::config::TrainConfig;
use super::resume::restore_latest;
use super::trainer::{StepLog, Trainer};
use super::{segments, watch};
use crate::error::{Error, IoOp, Result};
use crate::interrupt::{self, Interrupt};
use crate::io::console;
use crate::io::progress::Progress;
use crate::io::ticker::Ticker;
use crate::io::{checkpoint, leftovers, lock, run};

/// `magictailor train`: checks every input, then trains and exports into `output_dir`.
/// A first Ctrl-C or SIGTERM (`stop`) ends the run after the current step with a
/// checkpoint, so `--resume` continues it bit-identically.
pub fn train(
    cfg: TrainConfig,
    device: &Device,
    progress: Progress,
    resume: bool,
    stop: &Interrupt,
) -> Result<()> {
    let cfg = cfg.with_absolute_paths();
    let out = cfg.output_dir.clone();
    lock::check_free(&out, lock::STALE_AFTER)?;
    refuse_occupied(&out, resume)?;
    if let Some(steps) = finished(&cfg)? {
        if progress != Progress::Quiet {
            console::note(format_args!(
                "{} is finished: all {steps} steps are done, nothing to resume.",
                out.display()
            ));
        }
        return Ok(());
    }
    // Everything that can be wrong with the inputs fails here, before anything is written.
    let mut t = Trainer::new(cfg, device, progress)?;
    let lock = claim(&out, lock::STALE_AFTER, progress)?;
    // Again under the lock: another run may have filled the folder while we loaded.
    refuse_occupied(&out, resume)?;
    if resume && !restore_latest(&mut t, &out)? {
        return Err(Error::usage(format!(
            "--resume: {} has no checkpoints to resume from.",
            checkpoint::dir(&out).display()
        )));
    }
    train_to_end(&mut t, &out, &lock, progress, stop, Continue::Resume)
}

/// How a stopped run is continued, for the messages that say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continue {
    /// `train`: the same command plus `--resume`.
    Resume,
    /// `batch`: the same command again, which resumes the pair.
    Batch,
}

impl Continue {
    fn how(self) -> &'static str {
        match self {
            Continue::Resume => "continue with the same command plus --resume",
            Continue::Batch => "run the same batch command again: it resumes this pair from there",
        }
    }
}

/// `e`, which stopped the run in `out`, with what survived it: the last good checkpoint
/// and how to continue from it. Interruptions say so themselves; a run with no
/// checkpoint yet has nothing to add.
pub(crate) fn with_survivors(e: Error, out: &Path, cont: Continue) -> Error {
    let Ok(Some(file)) = checkpoint::latest(out) else {
        return e;
    };
    let step = checkpoint::step_of(&file).unwrap_or(0);
    match e {
        Error::Interrupted { .. } | Error::Stopped { .. } => e,
        Error::Diverged(msg) => Error::Diverged(format!(
            "{msg} The last checkpoint, saved before that step, is {} (step {step}): \
             {} with changed settings (if it diverges again, its weights are already off: \
             start over).",
            file.display(),
            cont.how()
        )),
        e => Error::Stopped {
            source: Box::new(e),
            saved: format!(
                "Nothing up to step {step} is lost: the last good checkpoint is {}. Once the \
                 cause is fixed, {}.",
                file.display(),
                cont.how()
            ),
        },
    }
}

/// The steps done where `cfg`'s output folder holds a finished run with the same
/// settings; an error where it holds one trained with other settings.
pub(crate) fn finished(cfg: &TrainConfig) -> Result<Option<usize>> {
    let Ok(folder) = run::open(&cfg.output_dir) else {
        return Ok(None);
    };
    let recorded = segments::fixed_of(&folder.record.config);
    let record = cfg.output_dir.join(run::RECORD);
    segments::check(cfg, &recorded, &format!("recorded in {}", record.display()))?;
    let done = folder.record.steps_done;
    Ok((done >= cfg.total_steps()).then_some(done))
}

/// Creates `out` and takes its lock, warning about a stale lock taken over.
pub fn claim(
    out: &Path,
    stale_after: std::time::Duration,
    progress: Progress,
) -> Result<lock::RunLock> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(IoOp::CreateDir, out, e))?;
    let (lock, warning) = lock::acquire(out, stale_after)?;
    if let Some(w) = warning.filter(|_| progress != Progress::Quiet) {
        console::note(format_args!("warning: {w}"));
    }
    // A killed run's half-written checkpoints can be hundreds of MB each.
    let removed = leftovers::remove_orphans(out, leftovers::Scope::Run);
    if !removed.is_empty() && progress != Progress::Quiet {
        console::note(format_args!(
            "removed {} temporary file(s) a killed run left in {}",
            removed.len(),
            out.display()
        ));
    }
    Ok(lock)
}

/// Trains from `t.step` to the last step, then exports into `out` (which `lock` holds).
/// An error after the first checkpoint names it and says how to continue (`cont`).
pub fn train_to_end(
    t: &mut Trainer,
    out: &Path,
    lock: &lock::RunLock,
    progress: Progress,
    stop: &Interrupt,
    cont: Continue,
) -> Result<()> {
    run::start_segment(out, t.step)?;
    // Every error of the loop goes through `with_survivors`.
    let mut steps = || -> Result<()> {
        super::prior::prepare(t, progress)?;
        let total = t.cfg.total_steps();
        let every = t.cfg.checkpoint_every;
        if let Some(auto) = &t.auto_masks {
            let preview = auto.write(out)?;
            if progress != Progress::Quiet {
                console::note(format_args!(
                    "{} has no masks/: made them from the base model's attention; check them in {}",
                    t.cfg.instance_dir.display(),
                    preview.display()
                ));
            }
        }
        let mut watch = watch::Watch::new(&t.cfg, out)?;
        let bar = bar(total, t.step, progress);
        while t.step < total {
            if let Some(signal) = stop.requested() {
                bar.abandon();
                return Err(interrupted(out, t, signal, total, cont));
            }
            let mut log = t.train_step()?;
            watch.after_step(t, &mut log, out)?;
            run::append_log(out, &log)?;
            lock.refresh()?;
            report(&bar, &log, progress);
            if t.recipe.switches_after(log.step)
                || every.is_some_and(|k| k > 0 && log.step % k == 0)
            {
                t.save_checkpoint(out)?;
                watch::write_loss_plot(&t.cfg, out)?;
            }
        }
        bar.finish();
        // The end of a run is always a checkpoint (`--resume` then finds it finished).
        if checkpoint::latest(out)? != Some(checkpoint::file(out, t.step)) {
            t.save_checkpoint(out)?;
        }
        watch::write_loss_plot(&t.cfg, out)?;
        t.export(out)
    };
    steps().map_err(|e| with_survivors(e, out, cont))
}

/// Saves the finished steps and says how to continue.
fn interrupted(out: &Path, t: &Trainer, signal: i32, total: usize, cont: Continue) -> Error {
    let saved = match checkpoint::latest(out) {
        Ok(Some(f)) if f == checkpoint::file(out, t.step) => Ok(f),
        _ if t.step == 0 => Err("nothing to save yet".to_string()),
        _ => {
            (t.save_checkpoint(out)).map_err(|e| format!("the checkpoint could not be saved: {e}"))
        }
    };
    let msg = match saved {
        Ok(file) => format!(
            "stopped by {} after step {} of {total}; saved {}. To go on, {}.",
            interrupt::name(signal),
            t.step,
            file.display(),
            cont.how()
        ),
        Err(why) => format!(
            "stopped by {} after step {} of {total} ({why}).",
            interrupt::name(signal),
            t.step
        ),
    };
    Error::Interrupted { signal, msg }
}

fn refuse_occupied(out: &Path, resume: bool) -> Result<()> {
    if resume || !run::is_occupied(out)? {
        return Ok(());
    }
    Err(Error::usage(format!(
        "the output folder {} already holds files. Pass --resume to continue its run from the last \
         checkpoint, or choose another --output-dir.",
        out.display()
    )))
}

/// The steps' progress: a bar on a terminal, a line every 10 steps (and 30 s) off one.
fn bar(total: usize, done: usize, progress: Progress) -> Ticker {
    progress.ticker("step", total as u64, done as u64, 10)
}

fn report(bar: &Ticker, log: &StepLog, progress: Progress) {
    match progress {
        Progress::Bar => {
            bar.set_message(format!(
                "{} loss {:.4} (diff {:.4}, attn {:.4}, pres {:.4})",
                log.phase.name(),
                log.loss,
                log.l_diff,
                log.l_attn,
                log.l_pres
            ));
            bar.inc(1);
        }
        Progress::Json => {
            if let Ok(line) = serde_json::to_string(log) {
                console::line(line);
            }
        }
        Progress::Quiet => {}
    }
}
