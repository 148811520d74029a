//! Tiny random Stable Diffusion 2.x-family models, written to disk in the diffusers
//! layout so tests (and users without network) go through the real loading code.
//!
//! The weights are random: images made with them are noise. The architecture mirrors
//! SD 2.1-base (four U-Net levels, cross-attention in the first three, linear
//! projections, GEGLU, a 4-level VAE with factor 8, a CLIP text encoder with exact GELU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::Rng;
use rand_distr::StandardNormal;
use serde_json::json;

use crate::error::{Error, IoOp, Result};
use crate::io::{tensors, write_atomic};
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::unet::UNet;
use crate::model::vae::Vae;

/// Bumped whenever the tiny model changes, so a stale cached copy is never reused.
const TINY_VERSION: u32 = 1;

pub fn unet_config() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": [2, 4, 4, 4],
        "block_out_channels": [16, 32, 32, 32],
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 16,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": true
    })
}

pub fn vae_config() -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "out_channels": 3,
        "sample_size": 128,
        "scaling_factor": 0.18215
    })
}

pub fn text_encoder_config(vocab_size: usize) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": "gelu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "vocab_size": vocab_size
    })
}

pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading"
    })
}

/// Words whose BPE merges the tiny vocabulary contains (the rest are spelled by bytes).
const TINY_WORDS: [&str; 16] = [
    "a", "photo", "of", "with", "the", "in", "snow", "person", "hair", "painting", "dog", "cat",
    "on", "beach", "red", "style",
];

/// GPT-2/CLIP's reversible map from bytes to printable characters.
pub fn bytes_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// A CLIP-style vocabulary and merge list: bytes, bytes + `</w>`, the merges that
/// spell `TINY_WORDS`, then the two special tokens.
pub fn tiny_vocab() -> (Vec<String>, Vec<(String, String)>) {
    let chars = bytes_to_unicode();
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in TINY_WORDS {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        while parts.len() > 1 {
            let merged = format!("{}{}", parts[0], parts[1]);
            let pair = (parts[0].clone(), parts[1].clone());
            if !merges.contains(&pair) {
                merges.push(pair);
                vocab.push(merged.clone());
            }
            parts.splice(0..2, [merged]);
        }
    }
    vocab.push(crate::model::tokenizer::BOS.to_string());
    vocab.push(crate::model::tokenizer::EOS.to_string());
    (vocab, merges)
}

/// Records every weight a model asks for (name, shape), answering with zeros; the random
/// values are drawn afterwards, in parallel (`fill`): a full-size SD 2.1 is 1.3 G values.
struct RandomBackend {
    made: Mutex<Vec<(String, Shape)>>,
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut made) = self.made.lock() {
            made.push((name.to_string(), s.clone()));
        }
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random backend needs a shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Seeded random values for one weight, by its name and shape.
fn fill(seed: u64, name: &str, s: &Shape) -> candle_core::Result<Tensor> {
    // Seed per name so values do not depend on load order (or on which thread draws them).
    let h = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = crate::rng::seeded(h);
    let dims = s.dims().to_vec();
    let n = s.elem_count();
    let is_norm = name.contains("norm");
    let values: Vec<f32> = if name.ends_with("running_var") {
        vec![1.0; n] // a BatchNorm's variance must be positive
    } else if name.ends_with("running_mean") {
        vec![0.0; n]
    } else if is_norm && name.ends_with("weight") {
        (0..n)
            .map(|_| 1.0 + 0.1 * rng.sample::<f32, _>(StandardNormal))
            .collect()
    } else if name.ends_with("bias") {
        (0..n)
            .map(|_| 0.02 * rng.sample::<f32, _>(StandardNormal))
            .collect()
    } else {
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let std = if name.contains("embedding") {
            0.5
        } else {
            1.0 / (fan_in as f32).sqrt()
        };
        (0..n)
            .map(|_| std * rng.sample::<f32, _>(StandardNormal))
            .collect()
    };
    Tensor::from_vec(values, dims, &Device::Cpu)
}

/// Builds a component through its real loader with random weights; returns the weights.
pub(crate) fn random_weights(
    seed: u64,
    build: impl FnOnce(&VarBuilder) -> candle_core::Result<()>,
) -> Result<HashMap<String, Tensor>> {
    use rayon::prelude::*;
    let backend = std::sync::Arc::new(RandomBackend {
        made: Mutex::new(Vec::new()),
    });
    struct Shared(std::sync::Arc<RandomBackend>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            h: candle_nn::Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, Device::Cpu);
    build(&vb)?;
    let made = std::mem::take(
        &mut *backend
            .made
            .lock()
            .map_err(|_| Error::internal("tiny model writer: poisoned lock"))?,
    );
    let weights = made
        .par_iter()
        .map(|(name, s)| Ok((name.clone(), fill(seed, name, s)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    Ok(weights)
}

fn parse<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T> {
    serde_json::from_value(v.clone())
        .map_err(|e| Error::internal(format!("tiny model config: {e}")))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::internal(format!("serializing {}: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

/// Writes a complete tiny model in the diffusers layout into `dir`.
pub fn write(dir: &Path, seed: u64) -> Result<()> {
    let te_cfg = text_encoder_config(tiny_vocab().0.len());
    write_with(dir, seed, &unet_config(), &vae_config(), &te_cfg)
}

/// Writes a random model of the given component configs (SD 2.1-base's shapes, or the
/// benches' mid size); the tokenizer is the tiny one, so `text_encoder.vocab_size` must
/// cover it.
pub fn write_with(
    dir: &Path,
    seed: u64,
    unet_cfg: &serde_json::Value,
    vae_cfg: &serde_json::Value,
    te_cfg: &serde_json::Value,
) -> Result<()> {
    let (vocab, merges) = tiny_vocab();
    let tok = dir.join("tokenizer");
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    write_json(
        &tok.join("vocab.json"),
        &serde_json::Value::Object(vocab_map),
    )?;
    let merges_txt: String = std::iter::once("#version: 0.2".to_string())
        .chain(merges.iter().map(|(a, b)| format!("{a} {b}")))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    write_atomic(&tok.join("merges.txt"), merges_txt.as_bytes())?;
    write_json(
        &tok.join("special_tokens_map.json"),
        &json!({
            "bos_token": crate::model::tokenizer::BOS, "eos_token": crate::model::tokenizer::EOS,
            "pad_token": "!", "unk_token": crate::model::tokenizer::EOS
        }),
    )?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
            "bos_token": crate::model::tokenizer::BOS, "eos_token": crate::model::tokenizer::EOS,
            "pad_token": "!", "unk_token": crate::model::tokenizer::EOS
        }),
    )?;

    write_json(&dir.join("unet/config.json"), unet_cfg)?;
    write_json(&dir.join("vae/config.json"), vae_cfg)?;
    write_json(&dir.join("text_encoder/config.json"), te_cfg)?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &scheduler_config(),
    )?;
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [null, null],
            "feature_extractor": [null, null],
            "requires_safety_checker": false
        }),
    )?;

    let (u, v, t): (UNetConfig, VaeConfig, ClipTextConfig) =
        (parse(unet_cfg)?, parse(vae_cfg)?, parse(te_cfg)?);
    let unet = random_weights(seed, |vb| UNet::load(vb, &u).map(|_| ()))?;
    tensors::write(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &unet,
        None,
    )?;
    let vae = random_weights(seed + 1, |vb| Vae::load(vb, &v).map(|_| ()))?;
    tensors::write(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        &vae,
        None,
    )?;
    let te = random_weights(seed + 2, |vb| ClipTextModel::load(vb, &t).map(|_| ()))?;
    tensors::write(&dir.join("text_encoder/model.safetensors"), &te, None)?;
    Ok(())
}

/// An SDXL-layout folder of random weights: [`write_with`]'s components (`unet_cfg` with
/// SDXL's added conditioning) plus a second text encoder with its pooled projection
/// (`te2_cfg`) and a second tokenizer padding with "!", listed in `model_index.json` as
/// diffusers' `StableDiffusionXLPipeline` lists them.
pub fn write_sdxl(
    dir: &Path,
    seed: u64,
    unet_cfg: &serde_json::Value,
    vae_cfg: &serde_json::Value,
    te_cfg: &serde_json::Value,
    te2_cfg: &serde_json::Value,
) -> Result<()> {
    write_with(dir, seed, unet_cfg, vae_cfg, te_cfg)?;
    write_json(&dir.join("text_encoder_2/config.json"), te2_cfg)?;
    let t2: ClipTextConfig = parse(te2_cfg)?;
    let te2 = random_weights(seed + 3, |vb| ClipTextModel::load(vb, &t2).map(|_| ()))?;
    tensors::write(&dir.join("text_encoder_2/model.safetensors"), &te2, None)?;
    let tok_2 = dir.join("tokenizer_2");
    std::fs::create_dir_all(&tok_2)
        .map_err(|e| Error::io(crate::error::IoOp::CreateDir, &tok_2, e))?;
    for f in [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        let from = dir.join("tokenizer").join(f);
        std::fs::copy(&from, tok_2.join(f)).map_err(|e| Error::read(&from, e))?;
    }
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": true,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )
}

/// The built-in `tiny-random` model, written once into the temp folder.
pub fn ensure_cached() -> Result<PathBuf> {
    cached(&format!("magictailor-tiny-random-v{TINY_VERSION}"), |dir| {
        write(dir, 0)
    })
}

/// SD 2.1-base's U-Net, VAE and text encoder configs (as in stabilityai's repository:
/// 865 M + 84 M + 340 M parameters), for a random model of the real shapes.
pub fn sd21_base_configs() -> [serde_json::Value; 3] {
    let mut unet = unet_config();
    unet["block_out_channels"] = json!([320, 640, 1280, 1280]);
    unet["attention_head_dim"] = json!([5, 10, 20, 20]); // heads: head dim 64 everywhere
    unet["norm_num_groups"] = json!(32);
    unet["cross_attention_dim"] = json!(1024);
    unet["sample_size"] = json!(64);
    let mut vae = vae_config();
    vae["block_out_channels"] = json!([128, 256, 512, 512]);
    vae["layers_per_block"] = json!(2);
    vae["norm_num_groups"] = json!(32);
    vae["sample_size"] = json!(512);
    // OpenCLIP ViT-H's text tower without its last layer. The tiny tokenizer covers the
    // first ids of the 49408-row table; the rest are rows no prompt reaches.
    let mut te = text_encoder_config(49408);
    te["hidden_size"] = json!(1024);
    te["intermediate_size"] = json!(4096);
    te["num_attention_heads"] = json!(16);
    te["num_hidden_layers"] = json!(23);
    te["projection_dim"] = json!(512);
    [unet, vae, te]
}

/// SDXL-base's U-Net (2.6 G parameters, 10.3 GB of f32, from the bundled configs) with
/// random weights, written once into `dir`, beside one-layer text encoders of SDXL's
/// widths and the tiny VAE: for timing the U-Net at 1024 px, which reads nothing else.
pub fn ensure_sdxl_unet_shapes(dir: &Path) -> Result<PathBuf> {
    let bundled: serde_json::Value = serde_json::from_str(include_str!("single_file/sdxl.json"))
        .map_err(|e| Error::internal(format!("the bundled SDXL configs: {e}")))?;
    let (mut te, mut te2) = (
        bundled["text_encoder"].clone(),
        bundled["text_encoder_2"].clone(),
    );
    for c in [&mut te, &mut te2] {
        c["num_hidden_layers"] = json!(1);
        c["vocab_size"] = json!(tiny_vocab().0.len());
    }
    let mut vae = vae_config();
    vae["scaling_factor"] = json!(0.13025);
    cached_at(dir, |d| write_sdxl(d, 0, &bundled["unet"], &vae, &te, &te2))
}

/// A random model of SD 2.1-base's shapes (5.2 GB of f32), written once into `dir`.
pub fn ensure_sd21_shapes(dir: &Path) -> Result<PathBuf> {
    let [unet, vae, te] = sd21_base_configs();
    cached_at(dir, |d| write_with(d, 0, &unet, &vae, &te))
}

/// `name` in the temp folder, written by `write` unless already there.
fn cached(name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    cached_at(&std::env::temp_dir().join(name), write)
}

/// `dir`, written by `write` unless it already holds a model. Written beside, then
/// renamed, so a concurrent or interrupted run never sees half a model.
fn cached_at(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    if dir.join("model_index.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let mut staging = dir.as_os_str().to_owned();
    staging.push(format!(".partial-{}", std::process::id()));
    let staging = PathBuf::from(staging);
    write(&staging)?;
    match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(dir.to_path_buf()),
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir.to_path_buf())
        }
        Err(e) => Err(Error::io(IoOp::Rename, dir, e)),
    }
}
