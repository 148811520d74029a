//! Checkpoints and resume: what a checkpoint holds (every trainable tensor, the momentum
//! adapters, the optimizer state, the step), saving one with the settings that shape the
//! result, and restoring the latest so a resumed run continues bit-identically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::ds_bal::MomentumLora;
use super::segments;
use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::io::{checkpoint, run};

/// The checkpoint names of a full fine-tune's weights start so.
const FULL: &str = "full.";

impl Trainer {
    /// Every trainable tensor by its checkpoint name: `lora.<path>.A`/`.B`,
    /// `tuned.<path>.weight`/`.bias`, `vico.<path>.image_cross_attention.<name>`,
    /// `full.unet.<key>`/`full.text_encoder.<key>` once a full fine-tune has started,
    /// `rows` (SDXL: `rows_2`), and `table` (SDXL: `table_2`) in released-script mode.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let lora = self.lora.modules.iter().flat_map(|m| {
            [
                (format!("lora.{}.A", m.path), m.a.clone()),
                (format!("lora.{}.B", m.path), m.b.clone()),
            ]
        });
        let tuned = self.tuned.named();
        let vico = (self.vico.iter()).flat_map(|b| b.named());
        let vico = vico.map(|(name, v)| (format!("vico.{name}"), v.clone()));
        let text = [
            ("rows", Some(&self.rows)),
            ("rows_2", self.rows_2.as_ref()),
            ("table", self.table.as_ref()),
            ("table_2", self.table_2.as_ref()),
        ];
        let text = text
            .into_iter()
            .filter_map(|(name, v)| Some((name.to_string(), v?.clone())));
        let full = (self.full.iter()).flat_map(|f| f.named());
        let full = full.map(|(name, v)| (format!("{FULL}{name}"), v));
        lora.chain(tuned)
            .chain(vico)
            .chain(full)
            .chain(text)
            .collect()
    }

    /// Everything resume needs, as named tensors.
    pub fn checkpoint_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = (self.trainable().into_iter())
            .map(|(name, v)| (name, v.as_detached_tensor()))
            .collect();
        if let Some(m) = &self.momentum {
            for (name, t) in m.tensors()? {
                out.insert(format!("momentum.{name}"), t);
            }
        }
        for (k, v) in self.opt.state()? {
            out.insert(format!("opt.{k}"), v);
        }
        let step = Tensor::new(self.step as u32, &self.sd.device)?;
        out.insert("step".into(), step);
        Ok(out)
    }

    /// Writes the checkpoint of the current step into `out`, with the settings that shape
    /// the result in its header.
    pub fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        let settings = serde_json::Value::Object(segments::fixed(&self.cfg)?).to_string();
        let mut meta = HashMap::from([(checkpoint::SETTINGS_KEY.to_string(), settings)]);
        let aliases = self.aliases();
        if !aliases.is_empty() {
            let text = serde_json::to_string(&aliases)
                .map_err(|e| crate::error::Error::internal(format!("serializing aliases: {e}")))?;
            meta.insert(checkpoint::ALIASES_KEY.to_string(), text);
        }
        let file = checkpoint::save(out, self.step, &self.checkpoint_tensors()?, meta)?;
        if let Some(keep) = self.cfg.keep_checkpoints {
            checkpoint::prune(out, keep)?;
        }
        Ok(file)
    }

    /// Restores [`Self::checkpoint_tensors`]; `file` names the checkpoint in errors.
    pub fn restore(&mut self, t: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
        let get = |k: &str| {
            t.get(k).ok_or_else(|| {
                Error::bad_file(
                    file,
                    format!(
                        "the checkpoint {} lacks {k}: it is from another run or version. Start a new \
                         run in another --output-dir.",
                        file.display()
                    ),
                )
            })
        };
        for m in &self.lora.modules {
            m.a.set(get(&format!("lora.{}.A", m.path))?)?;
            m.b.set(get(&format!("lora.{}.B", m.path))?)?;
        }
        for (name, v) in self.tuned.named() {
            v.set(get(&name)?)?;
        }
        for (name, v) in self.vico.iter().flat_map(|b| b.named()) {
            v.set(get(&format!("vico.{name}"))?)?;
        }
        if t.keys().any(|k| k.starts_with(FULL)) {
            let mut full: HashMap<String, Tensor> = (t.iter())
                .filter_map(|(k, v)| Some((k.strip_prefix(FULL)?.to_string(), v.clone())))
                .collect();
            self.start_full()?;
            if let Some(f) = &self.full {
                f.restore(&mut full)?;
            }
        }
        self.rows.set(get("rows")?)?;
        if let Some(rows_2) = &self.rows_2 {
            rows_2.set(get("rows_2")?)?;
        }
        if let Some(table) = &self.table {
            table.set(get("table")?)?;
        }
        if let Some(table_2) = &self.table_2 {
            table_2.set(get("table_2")?)?;
        }
        if t.keys().any(|k| k.starts_with("momentum.")) {
            let mut m = MomentumLora::copy_of(&self.lora)?;
            m.load(|name| get(&format!("momentum.{name}")).cloned())?;
            self.momentum = Some(m);
        }
        let opt: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("opt.").map(|k| (k.to_string(), v.clone())))
            .collect();
        self.step = get("step")?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        // The optimizer of the saved step's phase (Break-A-Scene's second has other
        // parameters than its first).
        self.opt = self.optimizer_for(self.step.max(1))?;
        self.opt.load_state(&opt)?;
        Ok(())
    }
}

/// Restores the latest checkpoint in `out`, if any, and drops log lines past it; refuses
/// one that was trained with other settings.
pub fn restore_latest(t: &mut Trainer, out: &Path) -> Result<bool> {
    let Some(file) = checkpoint::latest(out)? else {
        return Ok(false);
    };
    if let Some(text) = crate::io::tensors::metadata(&file, crate::io::checkpoint::SETTINGS_KEY)? {
        let recorded: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| {
                Error::bad_file(
                    &file,
                    format!("{}: unreadable settings: {e}", file.display()),
                )
            })?;
        segments::check(
            &t.cfg,
            &recorded,
            &format!("recorded in {}", file.display()),
        )?;
    }
    t.restore(&checkpoint::load(&file, &t.sd.device)?, &file)?;
    run::trim_log(out, t.step)?;
    Ok(true)
}
