//! `train --config FILE` (and `batch --config`): the settings of a run from a file, with
//! the flags given on the command line winning. The file is TOML with the flags' names as
//! keys (`warmup-steps = 30`, `no-flip = true`, `sample-seeds = "0..3"`), or a run's
//! `magictailor.json`, whose `config` redoes that run. An unknown key is refused: a typo
//! in a settings file must not be a silently ignored setting.

use std::path::Path;

use serde_json::{Map, Value};

use super::TrainConfig;
use crate::error::{Error, Result};

/// Keys of a file that name a flag spelled otherwise in `TrainConfig`: the flag, the
/// field, and whether the flag negates the field.
const RENAMED: [(&str, &str, bool); 6] = [
    ("out_dir", "output_dir", false),
    ("color_jitter", "jitter", false),
    ("no_ds_bal", "ds_bal", true),
    ("no_scale_lr", "scale_lr", true),
    ("no_flip", "flip", true),
    ("no_scale_aug", "scale_aug", true),
];

/// The command-line flag id of `field` (how clap knows it was given).
pub fn flag_of(field: &str) -> &str {
    match field {
        "jitter" => "color_jitter",
        "ds_bal" => "no_ds_bal",
        "scale_lr" => "no_scale_lr",
        "flip" => "no_flip",
        "scale_aug" => "no_scale_aug",
        f => f,
    }
}

/// The settings `file` holds, by `TrainConfig` field.
pub fn read(file: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::read(file, e))?;
    let bad = |msg: String| Error::usage(format!("--config {}: {msg}.", file.display()));
    let value: Value = if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        let t: toml::Value = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        serde_json::to_value(t).map_err(|e| bad(e.to_string()))?
    };
    // A run record: its settings are under `config`.
    let value = match value.get("config") {
        Some(c) if value.get("base_model").is_some() => c.clone(),
        _ => value,
    };
    let Value::Object(entries) = value else {
        return Err(bad("expected a table of settings".into()));
    };
    let known = fields()?;
    let mut out = Map::new();
    for (key, v) in entries {
        let key = key.replace('-', "_");
        let (field, negate) = match RENAMED.iter().find(|(flag, _, _)| *flag == key) {
            Some(&(_, field, negate)) => (field.to_string(), negate),
            None => (key.clone(), false),
        };
        if !known.contains(&field) && field != "sample_prompts_file" {
            let keys: Vec<String> = (known.iter())
                .map(|f| flag_of(f).replace('_', "-"))
                .chain(["sample-prompts-file".to_string()])
                .collect();
            return Err(bad(format!(
                "{key:?} is not a training setting (the keys: {}; device, output and logging \
                 flags go on the command line)",
                keys.join(", ")
            )));
        }
        let v = match (negate, v) {
            (true, Value::Bool(b)) => Value::Bool(!b),
            (true, other) => {
                return Err(bad(format!("{key}: expected true or false, got {other}")))
            }
            (false, v) => v,
        };
        out.insert(field, v);
    }
    normalize(out, file)
}

/// Values the command line spells another way: a prompts file's lines, lists as text.
fn normalize(mut m: Map<String, Value>, file: &Path) -> Result<Map<String, Value>> {
    if let Some(Value::String(p)) = m.remove("sample_prompts_file") {
        let dir = file.parent().unwrap_or(Path::new("."));
        let prompts = crate::infer::prompts::read_prompts(
            &dir.join(p),
            crate::infer::prompts::PLACEHOLDER,
            "sample-prompts-file",
        )?;
        m.insert("sample_prompts".into(), prompts.into());
    }
    if let Some(Value::String(spec)) = m.get("sample_seeds") {
        let seeds = crate::infer::prompts::parse_list(spec, "sample-seeds")?;
        m.insert("sample_seeds".into(), seeds.into());
    }
    Ok(m)
}

/// Every `TrainConfig` field.
fn fields() -> Result<Vec<String>> {
    let v = serde_json::to_value(TrainConfig::default())
        .map_err(|e| Error::internal(format!("serializing the settings: {e}")))?;
    Ok(v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}

/// `cli` with every setting not given on the command line (`given(flag id)`) taken from
/// `file` where it has it. Defaults that follow other settings follow the result: the
/// LoRA alpha (the rank) and f16's loss scale.
pub fn overlay(
    cli: &TrainConfig,
    file: &Map<String, Value>,
    given: impl Fn(&str) -> bool,
) -> Result<TrainConfig> {
    let Value::Object(mut merged) = serde_json::to_value(cli)
        .map_err(|e| Error::internal(format!("serializing the settings: {e}")))?
    else {
        return Err(Error::internal("settings are not a JSON object"));
    };
    for (field, v) in file {
        if !given(flag_of(field)) {
            merged.insert(field.clone(), v.clone());
        }
    }
    if !given("lora_alpha") && !file.contains_key("lora_alpha") {
        merged.insert("lora_alpha".into(), merged["lora_rank"].clone());
    }
    let mut cfg: TrainConfig = serde_json::from_value(Value::Object(merged))
        .map_err(|e| Error::usage(format!("--config: {e}")))?;
    if !given("loss_scale") && !file.contains_key("loss_scale") {
        cfg.loss_scale = TrainConfig::default_loss_scale(cfg.dtype);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_on_the_command_line_win_and_dependent_defaults_follow() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("run.toml");
        let text = "warmup-steps = 30\nno-flip = true\nlora_rank = 8\ndtype = \"f16\"\n\
                    sample-seeds = \"0..2\"\ncolor-jitter = 0.2\n";
        std::fs::write(&f, text).unwrap();
        let file = read(&f).unwrap();
        let cli = TrainConfig::default();
        let cfg = overlay(&cli, &file, |id| id == "warmup_steps").unwrap();
        assert_eq!(cfg.warmup_steps, 200, "given on the command line: it wins");
        assert!(!cfg.flip && cfg.lora_rank == 8 && cfg.lora_alpha == 8.0);
        assert_eq!((cfg.jitter, cfg.sample_seeds.clone()), (0.2, vec![0, 1, 2]));
        assert_eq!(cfg.loss_scale, Some(1024.0), "f16's default scale");

        std::fs::write(&f, "warmup_stpes = 3\n").unwrap();
        let e = read(&f).unwrap_err().to_string();
        assert!(
            e.contains("\"warmup_stpes\" is not a training setting"),
            "{e}"
        );
        std::fs::write(&f, "device = \"cuda\"\n").unwrap();
        assert!(read(&f).is_err(), "device goes on the command line");
    }
}
