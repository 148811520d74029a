//! A training run's output folder: what it holds and under which names.
//!
//! ```text
//! outputs/magictailor/
//!   pytorch_lora_weights.safetensors   LoRA, peft/diffusers layout
//!   lora_kohya.safetensors             LoRA, kohya layout (ComfyUI, A1111)
//!   learned_embeds.safetensors         {"<v0>": [hidden], ...}
//!   embeddings/v0.safetensors ...      one A1111/ComfyUI embedding per pseudo-word
//!   token_embedding.safetensors        --released-script only: the whole trained table
//!   class_images/person/0000.png ...  --prior-preservation: the base model's class images
//!   pytorch_custom_diffusion_weights.safetensors
//!                                      custom-diffusion only: the tuned k/v matrices
//!   magictailor.json                   base model, tokens, settings, steps done
//!   train_log.jsonl                    one JSON object per step
//!   segments.jsonl                     one JSON object per segment: command, host, version
//!   checkpoints/step-NNNNNN.safetensors
//!   samples/step-NNNNNN.png            sample grids drawn during training
//!   loss.png                           the loss plot
//!   tb/                                --tensorboard: TensorBoard event files
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoOp, Result};

/// Where `train` writes and `infer` reads when no folder is named.
pub const DEFAULT_DIR: &str = "outputs/magictailor";

pub const LORA: &str = "pytorch_lora_weights.safetensors";
pub const LORA_KOHYA: &str = "lora_kohya.safetensors";
pub const EMBEDS: &str = "learned_embeds.safetensors";
/// SDXL: the words' rows in the second text encoder, as diffusers' SDXL Textual Inversion
/// names its file.
pub const EMBEDS_2: &str = "learned_embeds_2.safetensors";
pub const A1111_EMBEDS: &str = "embeddings";
pub const TOKEN_TABLE: &str = "token_embedding.safetensors";
/// SDXL: the second text encoder's drifted table (same key).
pub const TOKEN_TABLE_2: &str = "token_embedding_2.safetensors";
/// `--prior-preservation`'s class images, one folder per class word (unless `--class-dir`).
pub const CLASS_IMAGES: &str = "class_images";
/// Custom Diffusion's tuned matrices, as diffusers' `save_attn_procs` names them.
pub const CUSTOM_DIFFUSION: &str = "pytorch_custom_diffusion_weights.safetensors";
/// ViCo's image cross-attention blocks, named `<transformer>.image_cross_attention.<param>`.
pub const VICO_BLOCKS: &str = "vico_blocks.safetensors";
/// A full fine-tune's trained weights minus the base's (`unet.<key>`,
/// `text_encoder.<key>`), for the tensors that changed (Break-A-Scene).
pub const FULL_DELTA: &str = "full_weights_delta.safetensors";
pub const RECORD: &str = "magictailor.json";
pub const LOG: &str = "train_log.jsonl";
/// One line per segment of the run (start, or resume): its command line and whence.
pub const SEGMENTS: &str = "segments.jsonl";
pub const CHECKPOINTS: &str = "checkpoints";
/// Sample grids drawn during training, one per [`samples_file`].
pub const SAMPLES_DIR: &str = "samples";
pub const LOSS_PLOT: &str = "loss.png";
/// `--tensorboard`: the event files.
pub const TENSORBOARD_DIR: &str = "tb";

/// The tensor name in [`TOKEN_TABLE`]: the text encoder's own, so the file reads as a
/// partial text-encoder checkpoint.
pub const TOKEN_TABLE_KEY: &str = "text_model.embeddings.token_embedding.weight";

/// `magictailor.json`: enough to sample the run again and to know how it was made.
/// Sampling needs only `base_model`, so the rest may be missing from a hand-written one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Hub id, or an absolute local folder or single-file checkpoint.
    pub base_model: String,
    /// A single-file base model's configs folder and prediction type, when given.
    #[serde(flatten)]
    pub single_file: crate::model::loader::SingleFileOptions,
    /// The method as it ran: its name, what trained, its phases with their steps and
    /// rates, and what a step drew (`train::method::Recipe::describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<serde_json::Value>,
    /// Words that stand for other text in prompts (DreamBooth: `<v0>` -> "sks person").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, String>,
    #[serde(default)]
    /// Pseudo-word -> the class word it started from.
    pub tokens: BTreeMap<String, String>,
    #[serde(default)]
    pub steps_done: usize,
    /// Every training setting (the trainer's `TrainConfig`).
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub magictailor_version: String,
    /// The commit it was built from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub magictailor_commit: String,
    /// Every segment of the run (its start and each resume): the exact command line, the
    /// working directory, host, start time, the step it started from, version and commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<serde_json::Value>,
    /// Sample grids, the loss plot and the TensorBoard folder, relative to the folder.
    #[serde(default)]
    pub previews: Vec<String>,
    /// How the masks were made: from files, whole images, or the base model's attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<serde_json::Value>,
    /// Which kernel families ran on which device and dtype, and which were switched off
    /// (`state: "off"` and why), in the process that finished the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<serde_json::Value>,
}

/// The files a trained folder offers for sampling.
#[derive(Debug, Clone)]
pub struct TrainedFolder {
    pub record: RunRecord,
    pub lora: Option<PathBuf>,
    pub embeds: Option<PathBuf>,
    pub embeds_2: Option<PathBuf>,
    pub token_table: Option<PathBuf>,
    pub token_table_2: Option<PathBuf>,
    pub custom_diffusion: Option<PathBuf>,
    pub vico_blocks: Option<PathBuf>,
    pub full_delta: Option<PathBuf>,
}

/// True when `dir` exists and holds anything besides a run lock.
pub fn is_occupied(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(IoOp::List, dir, e))? {
        let entry = entry.map_err(|e| Error::io(IoOp::List, dir, e))?;
        if entry.file_name() != super::lock::LOCK_FILE {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn write_record(dir: &Path, record: &RunRecord) -> Result<()> {
    let text = serde_json::to_string_pretty(record)
        .map_err(|e| Error::internal(format!("serializing {RECORD}: {e}")))?;
    super::write_atomic(&dir.join(RECORD), text.as_bytes())
}

/// Opens a trained folder, refusing one that lacks or garbles its `magictailor.json`.
pub fn open(dir: &Path) -> Result<TrainedFolder> {
    let path = dir.join(RECORD);
    if !path.is_file() && super::checkpoint::latest(dir).is_ok_and(|c| c.is_some()) {
        return Err(Error::usage(format!(
            "{} is an unfinished run: it has checkpoints but no {RECORD} yet. Finish it with the \
             same `magictailor train` command plus --resume (or `magictailor batch` again), then \
             sample it.",
            dir.display()
        )));
    }
    if !path.is_file() {
        return Err(Error::usage(format!(
            "{} does not exist: {} is not a trained magictailor folder. Train one with `magictailor \
             train`, point --model-dir at one, or sample a base model with --model (plus --lora/--embeds \
             files).",
            path.display(),
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::read(&path, e))?;
    let record: RunRecord = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let present = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    Ok(TrainedFolder {
        record,
        lora: present(LORA),
        embeds: present(EMBEDS),
        embeds_2: present(EMBEDS_2),
        token_table: present(TOKEN_TABLE),
        token_table_2: present(TOKEN_TABLE_2),
        custom_diffusion: present(CUSTOM_DIFFUSION),
        vico_blocks: present(VICO_BLOCKS),
        full_delta: present(FULL_DELTA),
    })
}

/// Appends one JSON line to the training log.
pub fn append_log(dir: &Path, entry: &impl Serialize) -> Result<()> {
    append_jsonl(&dir.join(LOG), entry)
}

/// Records that a segment of the run in `dir` starts now, at `from_step`, with this
/// process's command line.
pub fn start_segment(dir: &Path, from_step: usize) -> Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let entry = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "cwd": std::env::current_dir().ok(),
        "host": super::lock::hostname(),
        "pid": std::process::id(),
        "started_unix": now.map_or(0, |d| d.as_secs()),
        "from_step": from_step,
        "magictailor_version": env!("CARGO_PKG_VERSION"),
        "magictailor_commit": env!("MAGICTAILOR_COMMIT"),
    });
    append_jsonl(&dir.join(SEGMENTS), &entry)
}

/// The segments recorded in `dir`, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let file = dir.join(SEGMENTS);
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::read(&file, e)),
    }
}

/// Appends `entry` as one line, in one `write` on an append-mode file, so lines from
/// concurrent writers (batch workers) never interleave.
pub fn append_jsonl(file: &Path, entry: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_string(entry)
        .map_err(|e| Error::internal(format!("serializing a line of {}: {e}", file.display())))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| Error::io(IoOp::Write, file, e))?;
    f.write_all(line.as_bytes())
        .map_err(|e| Error::io(IoOp::Write, file, e))
}

/// The training log, one JSON value per line (a line that does not parse is skipped).
pub fn read_log(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let file = dir.join(LOG);
    let text = std::fs::read_to_string(&file).map_err(|e| Error::read(&file, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Drops log lines past `step` (written after the checkpoint a run resumes from).
pub fn trim_log(dir: &Path, step: usize) -> Result<()> {
    let file = dir.join(LOG);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::read(&file, e)),
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
    super::write_atomic(&file, kept.as_bytes())
}

/// The sample grid drawn after step `step`.
pub fn samples_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(SAMPLES_DIR).join(format!("step-{step:06}.png"))
}

/// The pictures `dir` holds, relative to it, for `magictailor.json`: the sample grids,
/// the loss plot and the TensorBoard folder.
pub fn previews(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir.join(SAMPLES_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".png"))
        .map(|n| format!("{SAMPLES_DIR}/{n}"))
        .collect();
    found.sort();
    if dir.join(LOSS_PLOT).is_file() {
        found.push(LOSS_PLOT.into());
    }
    if dir.join(TENSORBOARD_DIR).is_dir() {
        found.push(format!("{TENSORBOARD_DIR}/"));
    }
    found
}
