//! A run in several segments (started, stopped, resumed): the settings that shape its
//! result are fixed by the segment that started it. Every checkpoint records them, and
//! a resume that changes one is refused, naming each difference and its recorded value.
//! Where outputs go and what is watched (samples, TensorBoard, checkpoint cadence) may
//! change between segments.

use serde_json::{Map, Value};

use super::TrainConfig;
use crate::error::{Error, Result};

/// Settings that cannot change the trained weights.
const FREE: [&str; 9] = [
    "output_dir",
    "export_full",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_prompts",
    "sample_seeds",
    "sample_steps",
    "tensorboard",
];

/// The settings of `config` (a `TrainConfig` as JSON) that shape the result.
pub fn fixed_of(config: &Value) -> Map<String, Value> {
    let mut m = config.as_object().cloned().unwrap_or_default();
    m.retain(|k, _| !FREE.contains(&k.as_str()));
    m
}

/// [`fixed_of`] this run's settings.
pub fn fixed(cfg: &TrainConfig) -> Result<Map<String, Value>> {
    let v = serde_json::to_value(cfg)
        .map_err(|e| Error::internal(format!("serializing the settings: {e}")))?;
    Ok(fixed_of(&v))
}

/// The command-line flag of setting `key`, as a user types it.
fn flag(key: &str) -> String {
    match key {
        "scale_lr" => "--no-scale-lr".into(),
        "ds_bal" => "--no-ds-bal".into(),
        "flip" => "--no-flip".into(),
        "scale_aug" => "--no-scale-aug".into(),
        "jitter" => "--color-jitter".into(),
        k => format!("--{}", k.replace('_', "-")),
    }
}

/// What this run (`now`) changes of the settings a run was started with (`recorded`),
/// one line each: the flag, the value now, the recorded value.
pub fn differences(now: &Map<String, Value>, recorded: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<&String> = now.keys().chain(recorded.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map_or("(not recorded)".into(), Value::to_string);
    (keys.into_iter())
        .filter(|k| now.get(*k) != recorded.get(*k))
        .map(|k| {
            format!(
                "{} ({k}): {} now, {} when the run started",
                flag(k),
                show(now.get(k)),
                show(recorded.get(k))
            )
        })
        .collect()
}

/// Refuses to go on with `cfg` a run started with `recorded` settings (from `source`: a
/// checkpoint or the run record) where they differ.
pub fn check(cfg: &TrainConfig, recorded: &Map<String, Value>, source: &str) -> Result<()> {
    // A setting newer than the run was, then, at its default.
    let mut recorded = recorded.clone();
    for (k, v) in fixed(&TrainConfig::default())? {
        recorded.entry(k).or_insert(v);
    }
    let diff = differences(&fixed(cfg)?, &recorded);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::usage(format!(
        "{} was trained with other settings ({source}), and a run's settings are fixed by the \
         segment that started it:\n  {}\nResume with the recorded values, or train anew in \
         another --output-dir.",
        cfg.output_dir.display(),
        diff.join("\n  ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_that_shape_the_result_are_compared() {
        let a = TrainConfig::default();
        let mut b = a.clone();
        b.sample_every = Some(5);
        b.output_dir = "elsewhere".into();
        b.tensorboard = true;
        b.checkpoint_every = Some(10);
        assert!(differences(&fixed(&b).unwrap(), &fixed(&a).unwrap()).is_empty());
        b.warmup_lr = 5e-4;
        b.flip = false;
        let d = differences(&fixed(&b).unwrap(), &fixed(&a).unwrap());
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.contains(&"--no-flip (flip): false now, true when the run started".into()));
        assert!(
            d[1].starts_with("--warmup-lr (warmup_lr): 0.0005 now, 0.0001 when"),
            "{d:?}"
        );
    }
}
