//! CLIP for scoring (openai layout, e.g. `openai/clip-vit-base-patch32`): projected,
//! L2-normalised image and text features through candle-transformers' CLIP towers.
//!
//! The towers are built one by one (not `ClipModel`) so that the text feature is read at
//! the EOS position we know, rather than at the largest token id, which is only the EOS in
//! the real vocabulary.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Module, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use serde::Deserialize;

use super::hub::Wanted;
use super::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::model::config::read_json;

pub const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";

pub const WANTED: Wanted = Wanted {
    what: "CLIP",
    flag: "--clip-model",
    required: &["tokenizer.json"],
    optional: &["preprocessor_config.json"],
};

/// transformers' `CLIPTextConfig` / `CLIPVisionConfig` fields, with their defaults (the
/// openai ViT-B/32 config leaves some out).
#[derive(Deserialize)]
struct Tower {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

#[derive(Deserialize)]
struct ClipFile {
    text_config: Tower,
    vision_config: Tower,
    #[serde(default = "projection")]
    projection_dim: usize,
}
fn projection() -> usize {
    512
}

pub struct Clip {
    text: ClipTextTransformer,
    vision: ClipVisionTransformer,
    text_projection: candle_nn::Linear,
    visual_projection: candle_nn::Linear,
    tokenizer: tokenizers::Tokenizer,
    eos_id: u32,
    max_len: usize,
    pub preprocess: Preprocess,
    pub device: Device,
}

impl Clip {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: ClipFile = read_json(&cfg_path)?;
        let (text_cfg, vision_cfg) = configs(&cfg, &cfg_path)?;
        let file = dir.join("model.safetensors");
        crate::io::tensors::check(&file)?;
        // SAFETY: read-only memory map of a file nothing writes while we run.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }?;
        let bad = |e: candle_core::Error| {
            Error::mismatch(
                &file,
                format!(
                    "the CLIP weights in {} do not fit its config.json ({}).",
                    file.display(),
                    crate::error::brief(&e)
                ),
            )
        };
        // Without this tensor candle would draw a random one.
        if !vb.contains_tensor("vision_model.embeddings.class_embedding") {
            return Err(bad(candle_core::Error::Msg(
                "no vision_model.embeddings.class_embedding".into(),
            )));
        }
        let text = ClipTextTransformer::new(vb.pp("text_model"), &text_cfg).map_err(bad)?;
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &vision_cfg).map_err(bad)?;
        let p = cfg.projection_dim;
        let text_projection =
            candle_nn::linear_no_bias(text_cfg.embed_dim, p, vb.pp("text_projection"))
                .map_err(bad)?;
        let visual_projection =
            candle_nn::linear_no_bias(vision_cfg.embed_dim, p, vb.pp("visual_projection"))
                .map_err(bad)?;
        let (tokenizer, eos_id) = tokenizer(dir)?;
        let size = vision_cfg.image_size as u32;
        let fallback = Preprocess {
            shortest_edge: size,
            crop: size,
            mean: super::preprocess::OPENAI_MEAN,
            std: super::preprocess::OPENAI_STD,
        };
        let preprocess = Preprocess::read(dir, fallback)?;
        if preprocess.crop != size {
            return Err(Error::mismatch(
                &dir.join("preprocessor_config.json"),
                format!(
                    "{}: crops of {} px, but the vision tower takes {size} px.",
                    dir.join("preprocessor_config.json").display(),
                    preprocess.crop
                ),
            ));
        }
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
            tokenizer,
            eos_id,
            max_len: text_cfg.max_position_embeddings,
            preprocess,
            device: device.clone(),
        })
    }

    /// `[b, 3, s, s]` preprocessed pictures -> `[b, projection]`, unit length.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(pixels)?;
        unit(&self.visual_projection.forward(&pooled)?)
    }

    /// Token ids as transformers' CLIP tokenizer gives them: BOS, the words, EOS; no
    /// padding; cut to the model's length with EOS kept last.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = (self.tokenizer.encode(text, true))
            .map_err(|e| Error::usage(format!("cannot tokenize {text:?} for CLIP: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            ids.truncate(self.max_len.saturating_sub(1));
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// `[1, n]` ids -> `[1, projection]`, unit length: the final hidden state at the EOS.
    pub fn text_features_of_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let eos = ids.iter().position(|&i| i == self.eos_id).ok_or_else(|| {
            Error::internal("CLIP token ids without the end-of-text token".to_string())
        })?;
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let hidden = self.text.forward_with_mask(&t, usize::MAX)?;
        let pooled = hidden.i((.., eos, ..))?;
        unit(&self.text_projection.forward(&pooled)?)
    }

    pub fn text_features(&self, text: &str) -> Result<Tensor> {
        self.text_features_of_ids(&self.token_ids(text)?)
    }
}

/// Rows scaled to unit length.
pub fn unit(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

fn configs(cfg: &ClipFile, path: &Path) -> Result<(ClipTextConfig, ClipVisionConfig)> {
    for (name, t) in [("text", &cfg.text_config), ("vision", &cfg.vision_config)] {
        // candle's CLIP has QuickGELU and eps 1e-5 built in: refuse what it would get wrong.
        if t.hidden_act != "quick_gelu" || (t.layer_norm_eps - 1e-5).abs() > 1e-12 {
            return Err(Error::unsupported(
                path,
                format!(
                    "a {name} tower with hidden_act {:?} and layer_norm_eps {} (supported: quick_gelu, \
                     1e-5, as openai's CLIP)",
                    t.hidden_act, t.layer_norm_eps
                ),
            ));
        }
    }
    let (t, v) = (&cfg.text_config, &cfg.vision_config);
    let text = ClipTextConfig {
        vocab_size: t.vocab_size.unwrap_or(49408),
        embed_dim: t.hidden_size.unwrap_or(512),
        activation: Activation::QuickGelu,
        intermediate_size: t.intermediate_size.unwrap_or(2048),
        max_position_embeddings: t.max_position_embeddings.unwrap_or(77),
        pad_with: None,
        num_hidden_layers: t.num_hidden_layers.unwrap_or(12),
        num_attention_heads: t.num_attention_heads.unwrap_or(8),
        projection_dim: cfg.projection_dim,
    };
    let vision = ClipVisionConfig {
        embed_dim: v.hidden_size.unwrap_or(768),
        activation: Activation::QuickGelu,
        intermediate_size: v.intermediate_size.unwrap_or(3072),
        num_hidden_layers: v.num_hidden_layers.unwrap_or(12),
        num_attention_heads: v.num_attention_heads.unwrap_or(12),
        projection_dim: cfg.projection_dim,
        num_channels: v.num_channels.unwrap_or(3),
        image_size: v.image_size.unwrap_or(224),
        patch_size: v.patch_size.unwrap_or(32),
    };
    if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
        return Err(Error::unsupported(
            path,
            format!(
                "an image size {} that is not a multiple of the patch size {}",
                vision.image_size, vision.patch_size
            ),
        ));
    }
    Ok((text, vision))
}

/// The folder's `tokenizer.json`, without padding, and its end-of-text id.
fn tokenizer(dir: &Path) -> Result<(tokenizers::Tokenizer, u32)> {
    let file = dir.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&file).map_err(|e| {
        Error::bad_file(
            &file,
            format!("cannot load the CLIP tokenizer {}: {e}", file.display()),
        )
    })?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| Error::internal(format!("tokenizer truncation: {e}")))?;
    let eos = crate::model::tokenizer::EOS;
    let eos_id = tok.token_to_id(eos).ok_or_else(|| {
        Error::bad_file(
            &file,
            format!("the tokenizer {} has no {eos} token", file.display()),
        )
    })?;
    Ok((tok, eos_id))
}
