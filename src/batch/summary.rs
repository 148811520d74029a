//! `batch_summary.jsonl` (one line per pair and attempt, appended by every worker) and
//! `batch_summary.md`, the latest line of each pair as a table.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::io::run;

pub const JSONL: &str = "batch_summary.jsonl";
pub const MARKDOWN: &str = "batch_summary.md";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Trained,
    /// Already complete, or another worker holds it.
    Skipped,
    /// Bad input or a diverging run: recorded, and the batch goes on.
    Failed,
    /// The machine failed (memory, device): the worker exits 75 so it can be retried.
    Crashed,
    /// Stopped by Ctrl-C or SIGTERM after a checkpoint.
    Interrupted,
}

/// One pair's outcome in one worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairRecord {
    pub pair: String,
    /// The method it trained with (`--methods` trains a pair once per method).
    #[serde(default)]
    pub method: String,
    /// Its run folder below the output root: the pair, or `method/pair` under `--methods`.
    #[serde(default)]
    pub folder: String,
    pub status: Status,
    /// Why it was skipped, or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub steps_done: usize,
    pub total_steps: usize,
    /// The last logged step's loss terms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_step: Option<serde_json::Value>,
    pub seconds: f64,
    pub worker: String,
    /// Base-model loads of this worker process so far (one for the whole batch).
    pub model_loads_in_process: usize,
}

pub fn append(root: &Path, record: &PairRecord) -> Result<()> {
    run::append_jsonl(&root.join(JSONL), record)
}

/// Rewrites the table from the JSON lines (every worker's), latest line per pair.
pub fn write_markdown(root: &Path) -> Result<()> {
    let text = std::fs::read_to_string(root.join(JSONL)).unwrap_or_default();
    let latest: BTreeMap<String, PairRecord> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<PairRecord>(l).ok())
        .map(|r| (r.folder.clone(), r))
        .collect();
    let mut md = String::from(
        "| run | method | status | steps | loss | seconds | note |\n|---|---|---|---|---|---|---|\n",
    );
    for r in latest.values() {
        let loss = (r.last_step.as_ref())
            .and_then(|s| s.get("loss")?.as_f64())
            .map_or(String::new(), |l| format!("{l:.4}"));
        let status = serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let note = r.note.as_deref().unwrap_or("").replace('|', "\\|");
        md.push_str(&format!(
            "| {} | {} | {status} | {}/{} | {loss} | {:.0} | {note} |\n",
            r.folder, r.method, r.steps_done, r.total_steps, r.seconds
        ));
    }
    crate::io::write_atomic(&root.join(MARKDOWN), md.as_bytes())
}
