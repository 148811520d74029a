//! Checkpoints: `checkpoints/step-NNNNNN.safetensors` in the output folder, each written
//! atomically, holding adapters, momentum adapters, token rows, AdamW state and step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::tensors;
use crate::error::{Error, IoOp, Result};

/// The metadata key under which a checkpoint holds the settings that fixed its run
/// (`train::segments::fixed`), so a resume can refuse different ones and `infer` can
/// sample it.
pub const SETTINGS_KEY: &str = "magictailor_settings";
/// The header entry holding the words that stand for other text (DreamBooth's
/// `<v0>` -> "sks person"), as JSON, so a checkpoint samples before the run has a record.
pub const ALIASES_KEY: &str = "magictailor_aliases";

pub fn dir(output: &Path) -> PathBuf {
    output.join(super::run::CHECKPOINTS)
}

/// The checkpoint of `step`.
pub fn file(output: &Path, step: usize) -> PathBuf {
    dir(output).join(format!("step-{step:06}.safetensors"))
}

/// Writes the checkpoint of `step`, with `meta` in its header (the run's settings).
pub fn save(
    output: &Path,
    step: usize,
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> Result<PathBuf> {
    let file = file(output, step);
    tensors::write(&file, tensors, Some(meta))?;
    Ok(file)
}

/// The steps of the checkpoints in `output`, in order.
pub fn steps(output: &Path) -> Result<Vec<usize>> {
    let d = dir(output);
    if !d.is_dir() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for e in std::fs::read_dir(&d).map_err(|e| Error::io(IoOp::List, &d, e))? {
        let p = e.map_err(|e| Error::io(IoOp::List, &d, e))?.path();
        steps.extend(step_of(&p));
    }
    steps.sort();
    Ok(steps)
}

/// Deletes all but the newest `keep` checkpoints in `output`; returns what it deleted.
pub fn prune(output: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let d = dir(output);
    let mut all: Vec<(usize, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&d).map_err(|e| Error::io(IoOp::List, &d, e))? {
        let p = e.map_err(|e| Error::io(IoOp::List, &d, e))?.path();
        if let Some(s) = step_of(&p) {
            all.push((s, p));
        }
    }
    all.sort();
    let old = all.len().saturating_sub(keep);
    let mut gone = Vec::new();
    for (_, p) in all.into_iter().take(old) {
        std::fs::remove_file(&p).map_err(|e| Error::io(IoOp::Write, &p, e))?;
        gone.push(p);
    }
    Ok(gone)
}

/// The step a checkpoint file holds, from its name.
pub fn step_of(file: &Path) -> Option<usize> {
    let name = file.file_name()?.to_str()?;
    name.strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// The checkpoint with the highest step, if any.
pub fn latest(output: &Path) -> Result<Option<PathBuf>> {
    let d = dir(output);
    if !d.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(&d).map_err(|e| Error::io(IoOp::List, &d, e))? {
        let p = e.map_err(|e| Error::io(IoOp::List, &d, e))?.path();
        if let Some(s) = step_of(&p) {
            if best.as_ref().is_none_or(|(b, _)| s > *b) {
                best = Some((s, p));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// The integer tensors a checkpoint holds: the steps done, and AdamW's step count.
const INTEGERS: [&str; 2] = ["step", "opt.step"];

pub fn load(file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    tensors::read_floats(file, device, &INTEGERS)
}
