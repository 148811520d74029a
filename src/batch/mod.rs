//! `magictailor batch`: one worker trains many pairs with one base-model load.
//!
//! Workers coordinate only through the file system, so any number of them (a job array,
//! several GPUs of one box) can share one pair list and output root: a complete pair is
//! skipped, an interrupted one resumes from its checkpoint, and the per-pair lock of
//! `train` keeps two workers off the same pair.
//!
//! `mod.rs` plans, trains and records each pair ([`train_pairs`]), `pairs` lists and
//! shards the pairs, `summary` writes the per-pair records. Each pair goes through
//! `train`'s own setup (`Trainer::setup`) and loop (`train::driver`); batch may import
//! `train`, `io`, `model::loader`, `interrupt` and `error`, and nothing imports batch
//! but the command line.

pub mod pairs;
pub mod summary;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::{Error, Result};
use crate::interrupt::Interrupt;
use crate::io::progress::Progress;
use crate::io::{checkpoint, console, lock, run};
use crate::model::loader::{loads_in_process, StableDiffusion};
use crate::train::driver::{claim, finished, train_to_end, with_survivors, Continue};
use crate::train::method::Method;
use crate::train::resume::restore_latest;
use crate::train::setup::{load_pair, SetupError};
use crate::train::{TrainConfig, Trainer};
pub use pairs::Shard;
use summary::{PairRecord, Status};

pub struct BatchOptions {
    /// A folder of pair folders, or a text file listing them.
    pub pairs: PathBuf,
    /// Each pair trains into `output_root/{pair name}/`.
    pub output_root: PathBuf,
    pub shard: Shard,
    /// Train each pair with each of these methods, into `output_root/{method}/{pair}/`;
    /// none: with the template's method, into `output_root/{pair}/`.
    pub methods: Vec<Method>,
    /// List what would run and what would be skipped; train nothing.
    pub dry_run: bool,
    /// A lock silent for longer than this is taken over.
    pub stale_after: Duration,
}

/// What a worker did: the pairs it trained, skipped and failed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub records: Vec<PairRecord>,
}

impl Outcome {
    /// 0 when every pair of the shard is trained or skipped, 1 when some failed on input.
    pub fn exit_code(&self) -> u8 {
        let failed = self.records.iter().any(|r| r.status == Status::Failed);
        u8::from(failed)
    }
}

/// What a worker plans for one pair before loading anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Train,
    Resume { from_step: usize },
    SkipComplete,
    SkipHeld,
}

/// `magictailor batch`: trains this worker's shard of the pairs; every `train` setting of
/// `template` applies to each pair (its instance and output folders are replaced).
pub fn train_pairs(
    template: &TrainConfig,
    opts: &BatchOptions,
    device: &Device,
    progress: Progress,
    stop: &Interrupt,
) -> Result<Outcome> {
    for m in &opts.methods {
        TrainConfig {
            method: *m,
            ..template.clone()
        }
        .validate()?;
    }
    if opts.methods.is_empty() {
        template.validate()?;
    }
    let mine = opts
        .shard
        .take(&jobs(&pairs::list(&opts.pairs)?, &opts.methods));
    if opts.dry_run {
        return dry_run(template, opts, &mine, progress);
    }
    std::fs::create_dir_all(&opts.output_root)
        .map_err(|e| Error::io(crate::error::IoOp::CreateDir, &opts.output_root, e))?;
    let mut model: Option<StableDiffusion> = None;
    let mut outcome = Outcome::default();
    for (i, (pair, method)) in mine.iter().enumerate() {
        let cfg = pair_config(template, pair, *method, &opts.output_root);
        let started = Instant::now();
        let (status, note, loaded) =
            attempt(cfg.clone(), opts, device, progress, stop, model.take());
        model = loaded;
        let record = record(&cfg, &opts.output_root, status, &note, started);
        summary::append(&opts.output_root, &record)?;
        summary::write_markdown(&opts.output_root)?;
        if progress != Progress::Quiet {
            announce(i, mine.len(), &record, progress);
        }
        outcome.records.push(record);
        match (status, note) {
            (Status::Crashed, Some(msg)) => return Err(Error::Retryable(msg)),
            (Status::Interrupted, _) => {
                let signal = stop.requested().unwrap_or(crate::interrupt::SIGINT);
                let msg = format!(
                    "stopped by {} during {}; the batch resumes it when run again.",
                    crate::interrupt::name(signal),
                    pairs::name(pair)
                );
                return Err(Error::Interrupted { signal, msg });
            }
            _ => {}
        }
    }
    Ok(outcome)
}

/// Every (pair, method) to train, pair by pair; a method of None is the template's.
fn jobs(pairs: &[PathBuf], methods: &[Method]) -> Vec<(PathBuf, Option<Method>)> {
    match methods {
        [] => pairs.iter().map(|p| (p.clone(), None)).collect(),
        _ => (pairs.iter())
            .flat_map(|p| methods.iter().map(move |m| (p.clone(), Some(*m))))
            .collect(),
    }
}

fn pair_config(
    template: &TrainConfig,
    pair: &Path,
    method: Option<Method>,
    root: &Path,
) -> TrainConfig {
    let output_dir = match method {
        Some(m) => root.join(m.name()).join(pairs::name(pair)),
        None => root.join(pairs::name(pair)),
    };
    TrainConfig {
        instance_dir: pair.to_path_buf(),
        output_dir,
        method: method.unwrap_or(template.method),
        ..template.clone()
    }
    .with_absolute_paths()
}

/// Trains one pair if it needs it. Gives back the model (loaded on first need) unless
/// the machine failed.
fn attempt(
    cfg: TrainConfig,
    opts: &BatchOptions,
    device: &Device,
    progress: Progress,
    stop: &Interrupt,
    model: Option<StableDiffusion>,
) -> (Status, Option<String>, Option<StableDiffusion>) {
    let out = cfg.output_dir.clone();
    match plan(&cfg, opts.stale_after) {
        Ok(Plan::SkipComplete) => return (Status::Skipped, Some("complete".into()), model),
        Ok(Plan::SkipHeld) => return (Status::Skipped, Some(held_note()), model),
        Ok(_) => {}
        Err(e) => return classify(e, model),
    }
    // A pair resumed from a checkpoint says so when it fails to load.
    let failed = |e| with_survivors(e, &out, Continue::Batch);
    // Bad input fails here, before the model loads (when it is not loaded yet) or
    // anything is written.
    let mut t = match Trainer::setup(cfg.clone(), device, quiet_steps(progress), model) {
        Ok(t) => t,
        Err(e) => {
            let SetupError { error, model } = *e;
            return classify(failed(error), model);
        }
    };
    let lock = match claim(&out, opts.stale_after, progress) {
        Ok(l) => l,
        Err(Error::Usage(_)) => return (Status::Skipped, Some(held_note()), Some(t.into_model())),
        Err(e) => return classify(e, Some(t.into_model())),
    };
    // Under the lock: another worker may have finished it meanwhile.
    match is_complete(&cfg) {
        Ok(true) => {
            return (
                Status::Skipped,
                Some("complete".into()),
                Some(t.into_model()),
            )
        }
        Ok(false) => {}
        Err(e) => return classify(e, Some(t.into_model())),
    }
    let result = resume_or_restart(&mut t, &out).and_then(|()| {
        train_to_end(
            &mut t,
            &out,
            &lock,
            quiet_steps(progress),
            stop,
            Continue::Batch,
        )
    });
    drop(lock);
    let sd = Some(t.into_model());
    match result {
        Ok(()) => (Status::Trained, None, sd),
        Err(e) => classify(e, sd),
    }
}

/// Continues from the latest checkpoint; without one, starts over (a log from a run
/// killed before its first checkpoint is dropped).
fn resume_or_restart(t: &mut Trainer, out: &Path) -> Result<()> {
    if !restore_latest(t, out)? {
        run::trim_log(out, 0)?;
    }
    Ok(())
}

/// Per-step progress would interleave with the per-pair lines: only a bar, or nothing.
fn quiet_steps(progress: Progress) -> Progress {
    match progress {
        Progress::Bar => Progress::Bar,
        _ => Progress::Quiet,
    }
}

fn held_note() -> String {
    "another worker holds it".into()
}

/// Input errors fail the pair; an interruption stops the batch; anything else is the
/// machine's fault (memory, device, disk): the worker stops so a scheduler can retry.
fn classify(
    e: Error,
    model: Option<StableDiffusion>,
) -> (Status, Option<String>, Option<StableDiffusion>) {
    let status = match &e {
        Error::Interrupted { .. } => Status::Interrupted,
        e if e.is_input_error() => Status::Failed,
        _ => Status::Crashed,
    };
    (status, Some(e.to_string()), model)
}

/// What to do with a pair. A finished one trained with other settings is an error (an
/// input error: the pair fails), never a run to extend.
fn plan(cfg: &TrainConfig, stale_after: Duration) -> Result<Plan> {
    let out = &cfg.output_dir;
    if is_complete(cfg)? {
        return Ok(Plan::SkipComplete);
    }
    if lock::is_held(out, stale_after)? {
        return Ok(Plan::SkipHeld);
    }
    Ok(match checkpoint::latest(out)? {
        Some(file) => Plan::Resume {
            from_step: checkpoint::step_of(&file).unwrap_or(0),
        },
        None => Plan::Train,
    })
}

/// A pair is complete when its run record says every step is done, with these settings.
fn is_complete(cfg: &TrainConfig) -> Result<bool> {
    Ok(finished(cfg)?.is_some())
}

fn record(
    cfg: &TrainConfig,
    root: &Path,
    status: Status,
    note: &Option<String>,
    started: Instant,
) -> PairRecord {
    let log = std::fs::read_to_string(cfg.output_dir.join(run::LOG)).unwrap_or_default();
    let last_step: Option<serde_json::Value> = log
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    let steps_done = (last_step.as_ref())
        .and_then(|s| s.get("step")?.as_u64())
        .unwrap_or(0) as usize;
    PairRecord {
        pair: pairs::name(&cfg.instance_dir),
        method: cfg.method.name().to_string(),
        folder: (cfg
            .output_dir
            .strip_prefix(std::path::absolute(root).unwrap_or_default()))
        .map_or_else(
            |_| pairs::name(&cfg.instance_dir),
            |p| p.display().to_string(),
        ),
        status,
        note: note.clone(),
        steps_done,
        total_steps: cfg.total_steps(),
        last_step,
        seconds: started.elapsed().as_secs_f64(),
        worker: format!("{}:{}", crate::io::lock::hostname(), std::process::id()),
        model_loads_in_process: loads_in_process(),
    }
}

fn announce(i: usize, n: usize, r: &PairRecord, progress: Progress) {
    if progress == Progress::Json {
        if let Ok(line) = serde_json::to_string(r) {
            console::line(line);
        }
        return;
    }
    let status = serde_json::to_value(r.status)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let note = r
        .note
        .as_deref()
        .map(|n| format!(": {n}"))
        .unwrap_or_default();
    console::note(format_args!(
        "[{}/{n}] {} {status} ({}/{} steps, {:.0} s){note}",
        i + 1,
        r.folder,
        r.steps_done,
        r.total_steps,
        r.seconds
    ));
}

fn dry_run(
    template: &TrainConfig,
    opts: &BatchOptions,
    mine: &[(PathBuf, Option<Method>)],
    progress: Progress,
) -> Result<Outcome> {
    for (pair, method) in mine {
        let cfg = pair_config(template, pair, *method, &opts.output_root);
        // A pair to train is loaded as training loads it, so bad input shows now.
        let plan = plan(&cfg, opts.stale_after).and_then(|p| match p {
            Plan::Train | Plan::Resume { .. } => load_pair(&cfg, &Device::Cpu).map(|_| p),
            p => Ok(p),
        });
        let what = match plan {
            Ok(Plan::Train) => "train".to_string(),
            Ok(Plan::Resume { from_step }) => format!("resume from step {from_step}"),
            Ok(Plan::SkipComplete) => "skip: complete".to_string(),
            Ok(Plan::SkipHeld) => format!("skip: {}", held_note()),
            Err(e) if e.is_input_error() => format!("fail: {e}"),
            Err(e) => return Err(e),
        };
        let name = pairs::name(pair);
        if progress == Progress::Json {
            let line =
                serde_json::json!({ "pair": name, "method": cfg.method.name(), "plan": what });
            console::line(line);
        } else {
            let label = match method {
                Some(m) => format!("{}/{name}", m.name()),
                None => name,
            };
            console::line(format_args!("{label}\t{what}"));
        }
    }
    Ok(Outcome::default())
}
