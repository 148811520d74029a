//! `magictailor info RUN`: what a run folder holds, finished or not: the method and its
//! settings, the base model, the pseudo-words and their class words, the steps done,
//! the files others read, the checkpoints, and how each segment was started.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::{checkpoint, run};
use crate::train::method::Method;
use crate::train::TrainConfig;

/// What a run folder holds.
#[derive(Debug)]
pub struct RunInfo {
    pub dir: PathBuf,
    /// The settings the run records (its record, else its latest checkpoint).
    pub settings: Value,
    /// Pseudo-word -> class word (or the text it stands for, DreamBooth), where the run
    /// finished.
    pub tokens: Vec<(String, String)>,
    pub steps_done: usize,
    pub total_steps: Option<usize>,
    pub finished: bool,
    /// Outputs present, by name.
    pub files: Vec<String>,
    pub checkpoints: Vec<usize>,
    pub segments: Vec<Value>,
}

/// Reads `dir`, refusing a folder that holds no run.
pub fn read(dir: &Path) -> Result<RunInfo> {
    let checkpoints = checkpoint::steps(dir)?;
    let record = run::open(dir).ok().map(|f| f.record);
    let settings = match (&record, checkpoints.last()) {
        (Some(r), _) => r.config.clone(),
        (None, Some(&s)) => checkpoint_settings(&checkpoint::file(dir, s))?,
        (None, None) => {
            return Err(Error::usage(format!(
                "{} holds no run: no {} and no checkpoints.",
                dir.display(),
                run::RECORD
            )))
        }
    };
    let total = settings_of(&settings).map(|c| c.total_steps());
    let steps_done = match &record {
        Some(r) => r.steps_done,
        None => checkpoints.last().copied().unwrap_or(0),
    };
    let outputs = [
        run::LORA,
        run::LORA_KOHYA,
        run::EMBEDS,
        run::EMBEDS_2,
        run::TOKEN_TABLE,
        run::A1111_EMBEDS,
        run::CUSTOM_DIFFUSION,
        run::FULL_DELTA,
        run::CLASS_IMAGES,
    ];
    Ok(RunInfo {
        dir: dir.to_path_buf(),
        // What each word stands for: its alias (DreamBooth's "sks person"), else its class.
        tokens: (record.iter())
            .flat_map(|r| {
                r.tokens
                    .iter()
                    .map(|(w, c)| (w.clone(), r.aliases.get(w).unwrap_or(c).clone()))
            })
            .collect(),
        finished: record.is_some() && total.is_some_and(|t| steps_done >= t),
        files: (outputs.iter())
            .filter(|f| dir.join(f).exists())
            .map(|f| f.to_string())
            .collect(),
        segments: run::segments(dir)?,
        settings,
        steps_done,
        total_steps: total,
        checkpoints,
    })
}

/// The recorded settings as the trainer reads them (a missing one at its default).
fn settings_of(settings: &Value) -> Option<TrainConfig> {
    serde_json::from_value(settings.clone()).ok()
}

fn checkpoint_settings(file: &Path) -> Result<Value> {
    let text = crate::io::tensors::metadata(file, crate::io::checkpoint::SETTINGS_KEY)?;
    Ok(text
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null))
}

impl RunInfo {
    fn method(&self) -> &'static str {
        let method = settings_of(&self.settings).map(|c| (c.method, c.released_script));
        match method {
            Some((Method::Ti, _)) => "Textual Inversion",
            Some((Method::DreamBooth, _)) => "DreamBooth-LoRA",
            Some((Method::CustomDiffusion, _)) => "Custom Diffusion",
            Some((Method::Clic, _)) => "CLiC",
            Some((Method::Vico, _)) => "ViCo",
            Some((Method::BreakAScene, _)) => "Break-A-Scene",
            Some((Method::MagicTailor, true)) => "MagicTailor (as the released script)",
            _ => "MagicTailor",
        }
    }

    /// The method's settings in a line.
    fn settings_line(&self) -> String {
        let s = &self.settings;
        let (res, dtype) = (&s["resolution"], s["dtype"].as_str().unwrap_or("?"));
        match settings_of(s) {
            Some(c) if c.method.one_phase().is_some() => format!(
                "{} steps of {} image{}, lr {}, {res} px, {dtype}",
                c.steps(),
                c.images_per_step(),
                if c.images_per_step() == 1 { "" } else { "s" },
                c.lr()
            ),
            Some(c) if c.method == Method::BreakAScene => format!(
                "{} token + {} {} steps, lr {} / {}, {res} px, {dtype}",
                c.phase1_steps,
                c.phase2_steps,
                match c.phase2_lora {
                    Some(r) => format!("LoRA rank {r}"),
                    None => "full-weight".into(),
                },
                c.phase1_lr,
                c.phase2_lr()
            ),
            _ => format!(
                "{} warm-up + {} DS-Bal steps, lr {} / {}, LoRA rank {}, {res} px, {dtype}",
                s["warmup_steps"], s["dsbal_steps"], s["warmup_lr"], s["dsbal_lr"], s["lora_rank"]
            ),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "dir": self.dir,
            "method": self.method(),
            "base_model": self.settings["model"],
            "tokens": self.tokens.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "steps_done": self.steps_done,
            "total_steps": self.total_steps,
            "finished": self.finished,
            "files": self.files,
            "checkpoints": self.checkpoints,
            "segments": self.segments,
            "settings": self.settings,
        })
    }

    pub fn text(&self) -> String {
        let s = &self.settings;
        let total = self.total_steps.map_or("?".into(), |t| t.to_string());
        let state = if self.finished {
            "finished".to_string()
        } else {
            "unfinished: resume it with the command that started it plus --resume".to_string()
        };
        let words = if self.tokens.is_empty() {
            "(recorded when the run finishes)".to_string()
        } else {
            let pairs: Vec<String> = self
                .tokens
                .iter()
                .map(|(w, c)| format!("{w} = {c}"))
                .collect();
            pairs.join(", ")
        };
        let mut out = vec![
            format!("{}", self.dir.display()),
            format!("  method:      {}", self.method()),
            format!(
                "  base model:  {}{}",
                s["model"].as_str().unwrap_or("?"),
                single_file(s)
            ),
            format!(
                "  pair:        {}",
                s["instance_dir"].as_str().unwrap_or("?")
            ),
            format!("  words:       {words}"),
            format!("  steps:       {} of {total} ({state})", self.steps_done),
            format!("  settings:    {}", self.settings_line()),
            format!(
                "  outputs:     {}",
                if self.files.is_empty() {
                    "none yet".into()
                } else {
                    self.files.join(", ")
                }
            ),
            format!("  checkpoints: {:?}", self.checkpoints),
        ];
        for (i, seg) in self.segments.iter().enumerate() {
            let cmd: Vec<&str> = (seg["command"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            out.push(format!(
                "  segment {}:   from step {} on {}: {}",
                i + 1,
                seg["from_step"],
                seg["host"].as_str().unwrap_or("?"),
                cmd.join(" ")
            ));
        }
        out.join("\n")
    }
}

/// What a single-file base model was described with, as it follows the model's name.
fn single_file(settings: &Value) -> String {
    let mut parts = vec![];
    if let Some(dir) = settings["model_config"].as_str() {
        parts.push(format!("configs from {dir}"));
    }
    if let Some(p) = settings["prediction_type"].as_str() {
        parts.push(format!("predicts {p}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}
