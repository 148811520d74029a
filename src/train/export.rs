//! What a finished run leaves for sampling: the adapters (peft and kohya layouts), Custom
//! Diffusion's tuned matrices (diffusers' layout), a full fine-tune's changes to the base
//! (Break-A-Scene), the pseudo-word embeddings (ours and A1111's), the trained token
//! table in released-script mode, and the run record `magictailor.json`.

use std::collections::HashMap;
use std::path::Path;

use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::io::{embeds, run, tensors};
use crate::model::tokenizer::pseudo_word;
use crate::model::tuned;

/// Each row of `rows` with its pseudo-word.
fn rows_of(rows: &candle_core::Var) -> Result<embeds::Embeds> {
    (0..rows.dim(0)?)
        .map(|i| Ok((pseudo_word(i), rows.as_tensor().get(i)?.detach())))
        .collect()
}

impl Trainer {
    /// Writes the adapters, embeddings and run record into `dir`, each file atomically.
    pub fn export(&self, dir: &Path) -> Result<()> {
        if let Some(shape) = &self.recipe.trains.lora {
            let targets = super::setup::lora_targets(&self.sd, shape.only);
            let set = self.lora.as_set();
            set.save_peft(&dir.join(run::LORA), &targets)?;
            // kohya names SDXL's layers by the original layout (sd-scripts' SDXL U-Net).
            set.save_kohya(&dir.join(run::LORA_KOHYA), &targets, self.sd.is_sdxl())?;
        }
        if !self.tuned.is_empty() {
            let processors = tuned::processor_names(&self.sd.unet.lora_targets());
            let set = self.tuned.detached();
            set.save_custom_diffusion(&dir.join(run::CUSTOM_DIFFUSION), &processors)?;
            if let Some(full) = &self.cfg.export_full {
                tuned::export_unet(&self.sd, &set, full)?;
            }
        }
        if let Some(full) = &self.full {
            // Only the changes: `infer` adds them to the base it loads.
            tensors::write(&dir.join(run::FULL_DELTA), &full.delta(&self.sd)?, None)?;
            if let Some(folder) = &self.cfg.export_full {
                full.export_folders(&self.sd, folder)?;
            }
        }
        if let Some(blocks) = &self.vico {
            let t = (blocks.named().into_iter())
                .map(|(name, v)| (name, v.as_detached_tensor()))
                .collect();
            tensors::write(&dir.join(run::VICO_BLOCKS), &t, None)?;
        }
        if self.recipe.trains.rows {
            let embeds = self.embeds()?;
            embeds::save(&dir.join(run::EMBEDS), &embeds)?;
            match &self.rows_2 {
                None => embeds::save_a1111(&dir.join(run::A1111_EMBEDS), &embeds)?,
                Some(rows_2) => {
                    let embeds_2 = rows_of(rows_2)?;
                    embeds::save(&dir.join(run::EMBEDS_2), &embeds_2)?;
                    embeds::save_a1111_sdxl(&dir.join(run::A1111_EMBEDS), &embeds, &embeds_2)?
                }
            };
        }
        // The released script saves and reloads the whole drifted table (each encoder's).
        for (table, file) in [
            (&self.table, run::TOKEN_TABLE),
            (&self.table_2, run::TOKEN_TABLE_2),
        ] {
            if let Some(table) = table {
                let t =
                    HashMap::from([(run::TOKEN_TABLE_KEY.to_string(), table.as_detached_tensor())]);
                tensors::write(&dir.join(file), &t, None)?;
            }
        }
        run::write_record(dir, &self.record(dir)?)
    }

    /// The pseudo-words' trained embeddings.
    pub fn embeds(&self) -> Result<embeds::Embeds> {
        rows_of(&self.rows)
    }

    /// Each sample's word and the text it stands for, where the method names samples by
    /// identifiers (`infer` and `eval` read them from the record).
    pub(super) fn aliases(&self) -> std::collections::BTreeMap<String, String> {
        let ids = self.recipe.identifiers.unwrap_or_default();
        (ids.iter().zip(&self.class_words).enumerate())
            .map(|(i, (id, class))| (pseudo_word(i), format!("{id} {class}")))
            .collect()
    }

    fn record(&self, dir: &Path) -> Result<run::RunRecord> {
        let tokens = (self.class_words.iter().enumerate())
            .map(|(i, w)| (pseudo_word(i), w.clone()))
            .collect();
        // A local folder is recorded absolute, so the output folder works from anywhere.
        let base = std::fs::canonicalize(&self.sd.source)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| self.sd.source.clone());
        let config = serde_json::to_value(&self.cfg)
            .map_err(|e| Error::internal(format!("serializing the settings: {e}")))?;
        let kernels = crate::kernels::kernel_states()
            .iter()
            .map(|e| e.to_json())
            .collect();
        let mut method = self.recipe.describe(self.num_images());
        if let Some(blocks) = &self.vico {
            let sites: Vec<&str> = blocks.blocks.iter().map(|b| b.site.path.as_str()).collect();
            method["vico"]["layers"] = serde_json::json!(sites);
            // What `infer` reads by default: each sample's first image.
            method["vico"]["references"] =
                serde_json::json!(crate::data::first_images(&self.cfg.instance_dir)?);
        }
        Ok(run::RunRecord {
            base_model: base,
            single_file: self.cfg.single_file.absolute(),
            method: Some(method),
            aliases: self.aliases(),
            tokens,
            steps_done: self.step,
            config,
            magictailor_version: env!("CARGO_PKG_VERSION").to_string(),
            magictailor_commit: env!("MAGICTAILOR_COMMIT").to_string(),
            segments: run::segments(dir)?,
            previews: run::previews(dir),
            masks: Some(self.masks_made_by()),
            kernels,
        })
    }

    /// How the masks were made, for `magictailor.json`.
    fn masks_made_by(&self) -> serde_json::Value {
        match &self.auto_masks {
            Some(a) => serde_json::to_value(&a.record).unwrap_or_default(),
            None if self.cfg.no_masks => serde_json::json!({"method": "whole images (--no-masks)"}),
            None => serde_json::json!({
                "method": "files",
                "dir": self.cfg.instance_dir.join("masks"),
            }),
        }
    }
}
