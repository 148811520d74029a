//! Every weight of the U-Net and the text encoder(s) as a trainable `Var` (Break-A-Scene's
//! phase 2 fine-tunes them all), the models built over them, and the file a run writes:
//! only what changed, as trained minus base.
//!
//! A model built here with `tracked` holds the Vars themselves (or their casts), so its
//! layers take their differentiable branch (`nn.rs`) and every weight gets a gradient.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, UNetConfig};
use super::loader::StableDiffusion;
use super::unet::UNet;
use crate::error::{Error, Result};
use crate::io::tensors::{self, not_found, shaped};

/// The prefixes of the components' tensors in `named()`, checkpoints and delta files.
const UNET: &str = "unet.";

/// The token-embedding table's name, after any `text_model.` prefix.
const TOKEN_TABLE: &str = "embeddings.token_embedding.weight";

/// The text encoders: the first, and SDXL's second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoder {
    First,
    Second,
}

impl Encoder {
    /// Its folder in a diffusers pipeline.
    fn folder(self) -> &'static str {
        match self {
            Encoder::First => "text_encoder",
            Encoder::Second => "text_encoder_2",
        }
    }

    /// Its tensors' prefix in `named()`, checkpoints and delta files.
    fn prefix(self) -> String {
        format!("{}.", self.folder())
    }

    fn base(self, sd: &StableDiffusion) -> Result<HashMap<String, Tensor>> {
        match self {
            Encoder::First => sd.base_text_encoder(),
            Encoder::Second => sd.base_text_encoder_2(),
        }
    }

    fn model(self, sd: &StableDiffusion) -> Result<&ClipTextModel> {
        match (self, &sd.text_encoder_2) {
            (Encoder::First, _) => Ok(&sd.text_encoder),
            (Encoder::Second, Some((te, _))) => Ok(te),
            (Encoder::Second, None) => Err(Error::internal("a second text encoder on SD 1.x/2.x")),
        }
    }

    /// The model's text encoders (SDXL's two, else one).
    fn of(sd: &StableDiffusion) -> Vec<Encoder> {
        match sd.is_sdxl() {
            true => vec![Encoder::First, Encoder::Second],
            false => vec![Encoder::First],
        }
    }
}

/// One text encoder's weights as Vars.
struct TextWeights {
    encoder: Encoder,
    vars: BTreeMap<String, Var>,
    config: ClipTextConfig,
    token_table: Var,
}

/// Every weight the loaded U-Net and text encoders read, as f32 Vars starting from the
/// base (Break-A-Scene's phase 2).
pub struct FullWeights {
    /// By the names the loaders read (diffusers' and transformers' as stored).
    unet: BTreeMap<String, Var>,
    unet_config: UNetConfig,
    /// The first text encoder's, then (SDXL) the second's.
    texts: Vec<TextWeights>,
    device: Device,
}

/// `base`'s tensors among `names`, as f32 Vars on `device`.
fn vars_of(
    base: &HashMap<String, Tensor>,
    names: BTreeSet<String>,
    device: &Device,
) -> Result<BTreeMap<String, Var>> {
    (names.into_iter())
        .map(|name| {
            let t = base[&name].to_dtype(DType::F32)?.to_device(device)?;
            Ok((name, Var::from_tensor(&t)?))
        })
        .collect()
}

impl FullWeights {
    /// Copies of every tensor `sd.unet` and its text encoders read (names as
    /// diffusers/transformers store them), as f32 Vars.
    pub fn of(sd: &StableDiffusion) -> Result<Self> {
        let (unet_base, _) = sd.base_unet()?;
        let unet = vars_of(
            &unet_base,
            unet_reads(&unet_base, &sd.unet.config)?,
            &sd.device,
        )?;
        let texts = (Encoder::of(sd).into_iter())
            .map(|encoder| {
                let base = encoder.base(sd)?;
                let config = encoder.model(sd)?.config.clone();
                let vars = vars_of(&base, text_reads(&base, &config)?, &sd.device)?;
                let token_table = (vars.iter())
                    .find(|(name, _)| {
                        name.strip_prefix("text_model.").unwrap_or(name) == TOKEN_TABLE
                    })
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| {
                        Error::internal("the text encoder read no token-embedding table")
                    })?;
                Ok(TextWeights {
                    encoder,
                    vars,
                    config,
                    token_table,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            unet,
            unet_config: sd.unet.config.clone(),
            texts,
            device: sd.device.clone(),
        })
    }

    /// A U-Net over these weights computing in `dtype`: with `tracked`, its forward
    /// passes gradients to the Vars (weights cast with `to_dtype`, which is
    /// differentiable); without, over detached tensors (sampling: no graph kept).
    pub fn unet(&self, dtype: DType, tracked: bool) -> Result<UNet> {
        let vb = self.builder(&self.unet, dtype, tracked)?;
        Ok(UNet::load(&vb, &self.unet_config)?)
    }

    /// The first text encoder over these weights, as [`FullWeights::unet`].
    pub fn text_encoder(&self, dtype: DType, tracked: bool) -> Result<ClipTextModel> {
        self.encoder(&self.texts[0], dtype, tracked)
    }

    /// SDXL's second text encoder over these weights (None for SD 1.x/2.x).
    pub fn text_encoder_2(&self, dtype: DType, tracked: bool) -> Result<Option<ClipTextModel>> {
        (self.texts.get(1))
            .map(|t| self.encoder(t, dtype, tracked))
            .transpose()
    }

    fn encoder(&self, t: &TextWeights, dtype: DType, tracked: bool) -> Result<ClipTextModel> {
        let vb = self.builder(&t.vars, dtype, tracked)?;
        Ok(ClipTextModel::load(&vb, &t.config)?)
    }

    /// The first text encoder's token-embedding table's Var (so the trainer can pass it
    /// as the table).
    pub fn token_table(&self) -> &Var {
        &self.texts[0].token_table
    }

    /// SDXL's second text encoder's table.
    pub fn token_table_2(&self) -> Option<&Var> {
        self.texts.get(1).map(|t| &t.token_table)
    }

    /// The U-Net's Vars, by key.
    pub fn unet_vars(&self) -> Vec<Var> {
        self.unet.values().cloned().collect()
    }

    /// The text encoders' Vars, by encoder then key.
    pub fn text_vars(&self) -> Vec<Var> {
        (self.texts.iter())
            .flat_map(|t| t.vars.values().cloned())
            .collect()
    }

    /// Every Var by name: the U-Net's as `unet.<key>`, then each text encoder's as
    /// `text_encoder.<key>` (SDXL: then `text_encoder_2.<key>`), each sorted by key:
    /// checkpoint names and optimizer order.
    pub fn named(&self) -> Vec<(String, Var)> {
        let named = |prefix: &str, vars: &BTreeMap<String, Var>| {
            (vars.iter())
                .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
                .collect::<Vec<_>>()
        };
        let mut all = named(UNET, &self.unet);
        for t in &self.texts {
            all.extend(named(&t.encoder.prefix(), &t.vars));
        }
        all
    }

    /// Sets every Var from `t` (a checkpoint's tensors under `named()`'s names, taken out
    /// of `t`); errors naming a missing or mis-shaped tensor.
    pub fn restore(&self, t: &mut HashMap<String, Tensor>) -> Result<()> {
        let refuse = |msg: String| Error::mismatch(Path::new(""), msg);
        for (name, var) in self.named() {
            let value = t.remove(&name).ok_or_else(|| {
                refuse(format!(
                    "the checkpoint lacks the fine-tuned weight {name}: it is from another run or \
                     base model."
                ))
            })?;
            if value.shape() != var.shape() {
                return Err(refuse(format!(
                    "the checkpoint's {name} is {:?} but the model's is {:?}: it is from another \
                     base model.",
                    value.dims(),
                    var.dims()
                )));
            }
            var.set(&value.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Trained minus base, per named tensor, on the CPU in f32, only tensors whose delta
    /// is not all zero: what the run writes.
    pub fn delta(&self, sd: &StableDiffusion) -> Result<HashMap<String, Tensor>> {
        let mut parts = vec![(UNET.to_string(), &self.unet, sd.base_unet()?.0)];
        for t in &self.texts {
            parts.push((t.encoder.prefix(), &t.vars, t.encoder.base(sd)?));
        }
        let mut out = HashMap::new();
        for (prefix, vars, base) in parts {
            for (key, var) in vars {
                let base = base.get(key).ok_or_else(|| {
                    Error::internal(format!("the base model no longer has {prefix}{key}"))
                })?;
                let trained = var.as_detached_tensor().to_device(&Device::Cpu)?;
                let d = (trained - base.to_dtype(DType::F32)?)?;
                if d.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
                    out.insert(format!("{prefix}{key}"), d);
                }
            }
        }
        Ok(out)
    }

    /// Writes `out/unet/` and `out/text_encoder/` (SDXL: and `out/text_encoder_2/`) as
    /// diffusers and transformers folders: the base's tensors with the trained ones in
    /// their place (f32: an f16 copy would round away most of a small-rate update) and
    /// the base's configs (`--export-full`).
    pub fn export_folders(&self, sd: &StableDiffusion, out: &Path) -> Result<()> {
        let (unet, unet_config) = sd.base_unet()?;
        let unet_file = "diffusion_pytorch_model.safetensors";
        let mut parts = vec![("unet", unet_file, unet, &self.unet, unet_config)];
        for t in &self.texts {
            let (base, config) = (t.encoder.base(sd)?, text_config(sd, t.encoder)?);
            parts.push((
                t.encoder.folder(),
                "model.safetensors",
                base,
                &t.vars,
                config,
            ));
        }
        for (component, file, mut tensors, vars, config) in parts {
            for (key, var) in vars {
                let trained = var.as_detached_tensor().to_device(&Device::Cpu)?;
                tensors.insert(key.clone(), trained);
            }
            let dir = out.join(component);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(crate::error::IoOp::CreateDir, &dir, e))?;
            tensors::write(&dir.join(file), &tensors, None)?;
            crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        }
        Ok(())
    }

    /// A builder over the Vars (or their detached values) in `dtype`. The map's own
    /// backend returns each tensor as given when its dtype and device match, so a
    /// tracked tensor stays tracked.
    fn builder(
        &self,
        vars: &BTreeMap<String, Var>,
        dtype: DType,
        tracked: bool,
    ) -> Result<VarBuilder<'static>> {
        let tensors = (vars.iter())
            .map(|(name, var)| {
                let t = match tracked {
                    true => var.as_tensor().clone(),
                    false => var.as_detached_tensor(),
                };
                Ok((name.clone(), t.to_dtype(dtype)?))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(VarBuilder::from_tensors(tensors, dtype, &self.device))
    }
}

/// Rebuilds `sd`'s U-Net and text encoders as base + the delta file's tensors (keys
/// `unet.<key>`, `text_encoder.<key>`, SDXL's `text_encoder_2.<key>`), refusing (clear
/// error naming the file) a key the model does not read or a shape mismatch. For `infer`.
pub fn apply_delta(sd: &mut StableDiffusion, file: &Path) -> Result<()> {
    let delta = tensors::read_floats(file, &Device::Cpu, &[])?;
    let (mut unet, _) = sd.base_unet()?;
    let unet_reads = unet_reads(&unet, &sd.unet.config)?;
    let encoders = Encoder::of(sd);
    let mut texts = Vec::new();
    for &e in &encoders {
        let base = e.base(sd)?;
        let reads = text_reads(&base, &e.model(sd)?.config)?;
        texts.push((e, base, reads));
    }
    let refuse = |msg: String| Error::mismatch(file, format!("{}: {msg}", file.display()));
    let mut names: Vec<&String> = delta.keys().collect();
    names.sort();
    for name in names {
        let target = match name.strip_prefix(UNET) {
            Some(key) => unet_reads.get(key).map(|key| (&mut unet, key.clone())),
            None => (texts.iter_mut()).find_map(|(e, base, reads)| {
                let key = text_key(name.strip_prefix(&e.prefix())?, reads)?;
                Some((base, key))
            }),
        };
        let Some((base, key)) = target else {
            let encoders = match encoders.len() {
                1 => "text encoder",
                _ => "text encoders",
            };
            return Err(refuse(format!(
                "{name:?} is not a weight of this model's U-Net or {encoders} (a delta for \
                 another base model?)."
            )));
        };
        let (b, d) = (&base[&key], &delta[name]);
        if b.dims() != d.dims() {
            return Err(refuse(format!(
                "{name:?} is {:?} but the model's weight is {:?} (a delta for another base model?).",
                d.dims(),
                b.dims()
            )));
        }
        let sum = (b.to_dtype(DType::F32)? + d.to_dtype(DType::F32)?)?;
        base.insert(key, sum);
    }
    let (dtype, device) = (sd.dtype, sd.device.clone());
    sd.unet = UNet::load(
        &VarBuilder::from_tensors(unet, dtype, &device),
        &sd.unet.config,
    )?;
    for (e, base, _) in texts {
        let config = e.model(sd)?.config.clone();
        let model = ClipTextModel::load(&VarBuilder::from_tensors(base, dtype, &device), &config)?;
        match (e, &mut sd.text_encoder_2) {
            (Encoder::Second, Some((te, _))) => *te = model,
            _ => sd.text_encoder = model,
        }
    }
    Ok(())
}

/// Text encoder `e`'s `config.json`: a folder's own, or (a single file) one written from
/// the config it loaded with.
fn text_config(sd: &StableDiffusion, e: Encoder) -> Result<String> {
    if let super::loader::Origin::Folder(root) = &sd.origin {
        let file = root.join(e.folder()).join("config.json");
        return std::fs::read_to_string(&file).map_err(|err| Error::read(&file, err));
    }
    let c = &e.model(sd)?.config;
    let mut json = serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
    });
    if e == Encoder::Second {
        json["architectures"] = serde_json::json!(["CLIPTextModelWithProjection"]);
        json["projection_dim"] = serde_json::json!(c.projection_dim);
    }
    serde_json::to_string_pretty(&json).map_err(|e| Error::internal(format!("config: {e}")))
}

/// `key` of a text-encoder delta as the model reads it: transformers saves with or
/// without a `text_model.` prefix (by version), a single-file checkpoint without, and a
/// delta's key matches either.
fn text_key(key: &str, reads: &BTreeSet<String>) -> Option<String> {
    let other = match key.strip_prefix("text_model.") {
        Some(bare) => bare.to_string(),
        None => format!("text_model.{key}"),
    };
    [key.to_string(), other]
        .into_iter()
        .find(|k| reads.contains(k))
}

fn unet_reads(base: &HashMap<String, Tensor>, cfg: &UNetConfig) -> Result<BTreeSet<String>> {
    names_read(base, |vb| UNet::load(vb, cfg).map(drop))
}

fn text_reads(base: &HashMap<String, Tensor>, cfg: &ClipTextConfig) -> Result<BTreeSet<String>> {
    names_read(base, |vb| ClipTextModel::load(vb, cfg).map(drop))
}

/// The names of `base` that `build` (a model's loader) reads. The loader gets each
/// tensor as stored (no copy, no cast: the model is dropped unused).
fn names_read(
    base: &HashMap<String, Tensor>,
    build: impl FnOnce(&VarBuilder) -> candle_core::Result<()>,
) -> Result<BTreeSet<String>> {
    let read = Mutex::new(BTreeSet::new());
    let recorder = Recorder { base, read: &read };
    build(&VarBuilder::from_backend(
        Box::new(recorder),
        DType::F32,
        Device::Cpu,
    ))?;
    read.into_inner()
        .map_err(|_| Error::internal("recording the weights a model reads: poisoned lock"))
}

/// A backend answering from `base` and recording every name asked for.
struct Recorder<'a> {
    base: &'a HashMap<String, Tensor>,
    read: &'a Mutex<BTreeSet<String>>,
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        shaped(t, s, || name.to_string())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        let t = self.base.get(name).ok_or_else(|| not_found(name))?;
        if let Ok(mut read) = self.read.lock() {
            read.insert(name.to_string());
        }
        Ok(t.clone())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_key(name)
    }
}
