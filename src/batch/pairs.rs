//! Which pairs a batch worker trains: the list, and this worker's shard of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoOp, Result};

/// Pair folders from a folder of pair folders (those named `a_x+b_y`), or from a text file
/// with one folder per line (`#` comments and blank lines skipped; relative paths are
/// relative to the file). Sorted by name, so every worker sees the same order.
pub fn list(pairs: &Path) -> Result<Vec<PathBuf>> {
    let found = if pairs.is_dir() {
        from_folder(pairs)?
    } else if pairs.is_file() {
        from_file(pairs)?
    } else {
        return Err(Error::usage(format!(
            "--pairs {}: no such folder or file. Pass a folder of pair folders, or a text file \
             with one pair folder per line.",
            pairs.display()
        )));
    };
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for p in found {
        let name = name(&p);
        if let Some(first) = by_name.insert(name.clone(), p.clone()) {
            return Err(Error::usage(format!(
                "{} and {} have the same name, {name}, and would train into the same output \
                 folder: rename one.",
                first.display(),
                p.display()
            )));
        }
    }
    if by_name.is_empty() {
        return Err(Error::usage(format!(
            "--pairs {} names no pair folders (folders named like person_k+hair_c).",
            pairs.display()
        )));
    }
    Ok(by_name.into_values().collect())
}

/// The folder name, which is also the pair's output folder name.
pub fn name(pair: &Path) -> String {
    pair.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| pair.display().to_string())
}

fn from_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(IoOp::List, dir, e))? {
        let p = e.map_err(|e| Error::io(IoOp::List, dir, e))?.path();
        if p.is_dir() && name(&p).contains('+') {
            out.push(p);
        }
    }
    Ok(out)
}

fn from_file(file: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::read(file, e))?;
    let base = file.parent().unwrap_or(Path::new("."));
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| base.join(l))
        .collect())
}

/// This worker's part of the list: every `count`-th pair from `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// From `--shard-index`/`--shard-count`, else from a Slurm job array
    /// (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`) or a
    /// Kubernetes indexed Job (`JOB_COMPLETION_INDEX` of `--shard-count`), else all pairs.
    pub fn resolve(
        index: Option<usize>,
        count: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let num = |var: &str| -> Result<Option<usize>> {
            env(var)
                .map(|v| {
                    v.trim()
                        .parse()
                        .map_err(|_| Error::usage(format!("{var}={v:?} is not a whole number.")))
                })
                .transpose()
        };
        let shard = match (index, count) {
            (Some(index), Some(count)) => Shard { index, count },
            (Some(_), None) => return Err(Error::usage("--shard-index needs --shard-count.")),
            (None, count) => match (num("SLURM_ARRAY_TASK_ID")?, num("JOB_COMPLETION_INDEX")?) {
                (Some(id), _) => {
                    let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                    let n = count.or(num("SLURM_ARRAY_TASK_COUNT")?).ok_or_else(|| {
                        Error::usage("SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT: pass --shard-count.")
                    })?;
                    Shard {
                        index: id.saturating_sub(min),
                        count: n,
                    }
                }
                (None, Some(index)) => Shard {
                    index,
                    count: count.ok_or_else(|| {
                        Error::usage("JOB_COMPLETION_INDEX is set: pass --shard-count (the Job's completions).")
                    })?,
                },
                (None, None) => Shard {
                    index: 0,
                    count: count.unwrap_or(1),
                },
            },
        };
        if shard.count == 0 || shard.index >= shard.count {
            return Err(Error::usage(format!(
                "shard {} of {}: the index must be below the count, and the count at least 1.",
                shard.index, shard.count
            )));
        }
        Ok(shard)
    }

    pub fn take<T: Clone>(&self, all: &[T]) -> Vec<T> {
        all.iter()
            .skip(self.index)
            .step_by(self.count)
            .cloned()
            .collect()
    }
}
