//! What made a generated image, written into its PNG: A1111's `parameters` text (which
//! its PNG Info tab, ComfyUI and most image tools show) and a `magictailor` JSON object
//! with every setting, so an image can be redrawn from itself.

use std::path::Path;

use candle_core::DType;
use serde_json::json;

use super::{InferOptions, Sampling, Sources};

/// The settings one image was drawn with.
pub struct Provenance<'a> {
    prompt: &'a str,
    seed: u64,
    sampling: &'a Sampling,
    dtype: DType,
    /// The base model (hub id or folder), as the sources name it.
    model: &'a str,
    /// What a single-file base needs beside its weights (empty for a folder).
    single_file: &'a crate::model::loader::SingleFileOptions,
    lora: Option<&'a Path>,
    embeds: Option<&'a Path>,
    /// SDXL: the second encoder's rows, when read from a file of their own.
    embeds_2: Option<&'a Path>,
    custom_diffusion: Option<&'a Path>,
    full_delta: Option<&'a Path>,
    vico_blocks: Option<&'a Path>,
    references: &'a [std::path::PathBuf],
    /// The training checkpoint sampled instead of a folder's final weights.
    checkpoint: Option<&'a Path>,
}

impl<'a> Provenance<'a> {
    pub fn new(prompt: &'a str, seed: u64, opts: &'a InferOptions, src: &'a Sources) -> Self {
        Self {
            prompt,
            seed,
            sampling: &opts.sampling,
            dtype: opts.dtype,
            model: &src.model,
            single_file: &src.single_file,
            lora: src.lora.as_deref(),
            embeds: src.embeds.as_deref(),
            embeds_2: src.embeds_2.as_deref(),
            custom_diffusion: src.custom_diffusion.as_deref(),
            full_delta: src.full_delta.as_deref(),
            vico_blocks: src.vico_blocks.as_deref(),
            references: &src.references,
            checkpoint: src.checkpoint.as_ref().map(|(f, _)| f.as_path()),
        }
    }

    /// `(keyword, text)` PNG chunks.
    pub fn chunks(&self) -> Vec<(String, String)> {
        vec![
            ("parameters".into(), self.a1111()),
            ("magictailor".into(), self.json().to_string()),
        ]
    }

    /// [`Self::chunks`] for the retouch stage's layout image: the same settings, marked as
    /// the image the retouch started from.
    pub fn layout_chunks(&self) -> Vec<(String, String)> {
        let mut record = self.json();
        record["image"] = json!("layout: stage 1, before the retouch");
        vec![
            (
                "parameters".into(),
                format!("{}, Image: layout before the retouch", self.a1111()),
            ),
            ("magictailor".into(), record.to_string()),
        ]
    }

    /// A1111's layout: the prompt, the negative prompt, then `Key: value` pairs.
    fn a1111(&self) -> String {
        let o = self.sampling;
        let mut s = self.prompt.to_string();
        if !o.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", o.negative_prompt));
        }
        let name = |p: &Path| p.display().to_string();
        s.push_str(&format!(
            "\nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            o.steps, o.guidance, self.seed, o.width, o.height, self.model
        ));
        if let Some(l) = self.lora {
            s.push_str(&format!(", LoRA: {}", name(l)));
        }
        if let Some(e) = self.embeds {
            s.push_str(&format!(", Embeddings: {}", name(e)));
        }
        if let Some(e) = self.embeds_2 {
            s.push_str(&format!(", Embeddings 2: {}", name(e)));
        }
        if let Some(c) = self.custom_diffusion {
            s.push_str(&format!(", Custom Diffusion: {}", name(c)));
        }
        if let Some(f) = self.full_delta {
            s.push_str(&format!(", Full weights: {}", name(f)));
        }
        if let Some(v) = self.vico_blocks {
            s.push_str(&format!(", ViCo: {}", name(v)));
            let refs: Vec<String> = self.references.iter().map(|p| name(p)).collect();
            s.push_str(&format!(", References: {}", refs.join(" ")));
        }
        if let Some(c) = self.checkpoint {
            s.push_str(&format!(", Checkpoint: {}", name(c)));
        }
        if o.layout_steps > 0 {
            s.push_str(&format!(", Layout steps: {}", o.layout_steps));
        }
        if let Some(r) = &o.retouch {
            let refs: Vec<String> = self.references.iter().map(|p| name(p)).collect();
            s.push_str(&format!(
                ", Retouch: swap {}, layout keys {} steps, blend from step {}, SAM: {}, References: {}",
                if r.swap { "on" } else { "off" },
                r.layout_swap_steps,
                r.blend_from,
                r.sam_model.as_deref().unwrap_or("none"),
                refs.join(" ")
            ));
        }
        s.push_str(&format!(
            ", Version: magictailor {}",
            env!("CARGO_PKG_VERSION")
        ));
        s
    }

    fn json(&self) -> serde_json::Value {
        let o = self.sampling;
        let mut record = json!({
            "prompt": self.prompt,
            "negative_prompt": o.negative_prompt,
            "seed": self.seed,
            "steps": o.steps,
            "guidance": o.guidance,
            "sampler": "DDIM, eta 0",
            "width": o.width,
            "height": o.height,
            "layout_steps": o.layout_steps,
            "retouch": o.retouch,
            "base_model": self.model,
            "lora": self.lora,
            "embeds": self.embeds,
            "custom_diffusion": self.custom_diffusion,
            "full_delta": self.full_delta,
            "vico_blocks": self.vico_blocks,
            "references": self.references,
            "dtype": self.dtype.as_str(),
            "magictailor": env!("CARGO_PKG_VERSION"),
            "commit": env!("MAGICTAILOR_COMMIT"),
        });
        // A single-file base is only reproducible with its configs and prediction type.
        if let Some(dir) = &self.single_file.model_config {
            record["model_config"] = json!(dir);
        }
        if let Some(p) = &self.single_file.prediction_type {
            record["prediction_type"] = json!(p);
        }
        if let Some(c) = self.checkpoint {
            record["checkpoint"] = json!(c);
        }
        if let Some(e) = self.embeds_2 {
            record["embeds_2"] = json!(e);
        }
        record
    }
}
