//! Finds a model in the diffusers folder layout (local folder, hub repo id, or the
//! built-in `tiny-random`) and loads every component from its own `config.json`; or a
//! single-file checkpoint, read in place (`single_file`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::clip::ClipTextModel;
use super::config::{read_json, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use super::hub_env::HubEnv;
use super::scheduler::NoiseSchedule;
use super::single_file::{Checkpoint, Component, Family};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::Vae;
use crate::error::{Error, Result};

pub const DEFAULT_MODEL: &str = "stabilityai/stable-diffusion-2-1-base";
pub const TINY_RANDOM: &str = "tiny-random";

/// The files of each component we read, relative to the model root.
const COMPONENT_FILES: [(&str, &[&str]); 5] = [
    ("unet", &["config.json"]),
    ("vae", &["config.json"]),
    ("text_encoder", &["config.json"]),
    (
        "tokenizer",
        &[
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ],
    ),
    ("scheduler", &["scheduler_config.json"]),
];
const WEIGHT_NAMES: [&str; 2] = ["diffusion_pytorch_model", "model"];

pub struct StableDiffusion {
    /// How the user named the model (hub id or path), recorded in outputs.
    pub source: String,
    /// Where its weights and configs were read from.
    pub origin: Origin,
    pub unet: UNet,
    pub vae: Vae,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder (OpenCLIP, with its pooled projection) and tokenizer.
    pub text_encoder_2: Option<(ClipTextModel, ClipTokenizer)>,
    /// SDXL: an empty negative prompt conditions on zeros (`model_index.json`).
    pub force_zeros_for_empty_prompt: bool,
    pub schedule: NoiseSchedule,
    pub device: Device,
    pub dtype: DType,
}

/// Where a loaded model's weights live.
pub enum Origin {
    /// A diffusers folder.
    Folder(PathBuf),
    /// A single-file checkpoint, with the U-Net's config text and `layers_per_block`
    /// (to name its weights as diffusers does).
    SingleFile {
        checkpoint: Arc<Checkpoint>,
        unet_config: String,
        layers_per_block: usize,
    },
}

/// What a single-file checkpoint needs beside its weights; empty for a diffusers folder,
/// which carries both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SingleFileOptions {
    /// A diffusers folder whose configs and tokenizer describe the file (its weights, if
    /// any, are not read); None: the family's bundled configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_config: Option<PathBuf>,
    /// `epsilon` or `v_prediction`, where the weights cannot tell (SD 2.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
}

/// How many times this process loaded a model: batch runs load one for many pairs.
static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn loads_in_process() -> usize {
    LOADS.load(std::sync::atomic::Ordering::Relaxed)
}

impl StableDiffusion {
    /// A diffusers folder, hub id or `tiny-random`, or a single `.safetensors` checkpoint
    /// with the family's bundled configs.
    pub fn load(model: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(model, &SingleFileOptions::default(), device, dtype)
    }

    /// [`StableDiffusion::load`], with what a single-file checkpoint needs.
    pub fn load_with(
        model: &str,
        single: &SingleFileOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        // Refused before anything is downloaded or read.
        if dtype == DType::BF16 && device.is_cpu() {
            return Err(Error::usage(
                "--dtype bf16 needs a CUDA device: candle's CPU convolution has no bf16. Use \
                 --dtype f16 or f32 on the CPU.",
            ));
        }
        let sd = match single_file_path(model)? {
            Some(file) => load_single_file(model, &file, single, device, dtype)?,
            None => {
                check_single_file_options(model, single)?;
                let root = resolve(model)?;
                load_from_root(model, &root, device, dtype)?
            }
        };
        LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(sd)
    }

    /// SDXL's text features `[b, tokens, hidden]` of token ids of each tokenizer, with the
    /// pseudo-words' rows of each encoder: both encoders' penultimate states side by side,
    /// and the second's pooled projection at its end-of-text token, as diffusers'
    /// `encode_prompt`. Differentiable in the rows.
    pub fn encode_sdxl(
        &self,
        ids: &Tensor,
        ids_2: &Tensor,
        rows: Option<&Tensor>,
        rows_2: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let te_2 = (self.text_encoder_2.as_ref())
            .ok_or_else(|| Error::internal("SDXL text features of a model with one encoder"))?;
        let encoders = [(&self.text_encoder, None), (&te_2.0, None)];
        self.encode_sdxl_with(encoders, (ids, ids_2), (rows, rows_2))
    }

    /// [`Self::encode_sdxl`] through `encoders` (each with its token table, None: its
    /// own), in place of the model's: a full fine-tune's, differentiable in their weights.
    pub fn encode_sdxl_with(
        &self,
        encoders: [(&ClipTextModel, Option<&Tensor>); 2],
        (ids, ids_2): (&Tensor, &Tensor),
        (rows, rows_2): (Option<&Tensor>, Option<&Tensor>),
    ) -> Result<(Tensor, Tensor)> {
        let (_, tok_2) = (self.text_encoder_2.as_ref())
            .ok_or_else(|| Error::internal("SDXL text features of a model with one encoder"))?;
        let [(te_1, table_1), (te_2, table_2)] = encoders;
        let s_1 = te_1.forward_states(ids, table_1, rows)?;
        let s_2 = te_2.forward_states(ids_2, table_2, rows_2)?;
        let hidden = Tensor::cat(
            &[s_1.penultimate(), s_2.penultimate()],
            candle_core::D::Minus1,
        )?;
        let pooled = te_2.pooled(&s_2.last, ids_2, tok_2.eos_id())?;
        Ok((hidden, pooled))
    }

    /// SDXL: two text encoders and the U-Net's added size conditioning.
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// Pixels per latent cell (8 for SD).
    pub fn vae_factor(&self) -> usize {
        self.vae.config.downscale_factor()
    }

    /// The base U-Net's tensors under diffusers' names, as stored, and its config text
    /// (`--export-full`).
    pub fn base_unet(&self) -> Result<(HashMap<String, Tensor>, String)> {
        match &self.origin {
            Origin::Folder(root) => {
                let tensors = component_tensors(root, "unet")?;
                let config = root.join("unet").join("config.json");
                let text = std::fs::read_to_string(&config).map_err(|e| Error::read(&config, e))?;
                Ok((tensors, text))
            }
            Origin::SingleFile {
                checkpoint,
                unet_config,
                layers_per_block,
            } => Ok((
                checkpoint.tensors(Component::Unet, *layers_per_block)?,
                unet_config.clone(),
            )),
        }
    }

    /// The base text encoder's tensors, as stored on the CPU, under the names its loader
    /// reads (a folder's as saved, with or without `text_model.`; a single file's as
    /// renamed for diffusers).
    pub fn base_text_encoder(&self) -> Result<HashMap<String, Tensor>> {
        match &self.origin {
            Origin::Folder(root) => component_tensors(root, "text_encoder"),
            Origin::SingleFile { checkpoint, .. } => checkpoint.tensors(Component::TextEncoder, 0),
        }
    }

    /// SDXL's second text encoder's tensors, as [`Self::base_text_encoder`].
    pub fn base_text_encoder_2(&self) -> Result<HashMap<String, Tensor>> {
        match &self.origin {
            Origin::Folder(root) => component_tensors(root, "text_encoder_2"),
            Origin::SingleFile { checkpoint, .. } => checkpoint.tensors(Component::TextEncoder2, 0),
        }
    }
}

/// Every tensor of a diffusers folder's `component`, as stored, on the CPU.
fn component_tensors(root: &Path, component: &str) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in weight_files(root, component)? {
        tensors.extend(
            candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
                Error::bad_file(&file, format!("cannot read {}: {e}", file.display()))
            })?,
        );
    }
    Ok(tensors)
}

/// Refuses `--model-config` and `--prediction-type` for a `model` that is not a
/// single-file checkpoint: called by the commands before anything is read or loaded.
pub fn check_single_file_options(model: &str, single: &SingleFileOptions) -> Result<()> {
    let ext = Path::new(model).extension().and_then(|e| e.to_str());
    match ext.is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        true => Ok(()),
        false => single.refuse_for_folder(model),
    }
}

impl SingleFileOptions {
    /// With `model_config` made absolute, so a record works from anywhere.
    pub fn absolute(&self) -> Self {
        Self {
            model_config: (self.model_config.as_ref())
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())),
            prediction_type: self.prediction_type.clone(),
        }
    }

    /// A diffusers folder says both itself: settings for a single file are refused, not
    /// ignored.
    fn refuse_for_folder(&self, model: &str) -> Result<()> {
        let flag = if self.model_config.is_some() {
            "--model-config"
        } else if self.prediction_type.is_some() {
            "--prediction-type"
        } else {
            return Ok(());
        };
        Err(Error::usage(format!(
            "{flag} describes a single-file checkpoint, but {model} is a diffusers model: its \
             own configs (unet/config.json, scheduler/scheduler_config.json) say that. Drop {flag}."
        )))
    }
}

/// The image side `model` was trained at, read from its configs alone (no weights): the
/// U-Net's `sample_size` in latent cells times the VAE's factor, as diffusers' pipelines
/// size their images (512 for SD 1.x and 2.x-base, 768 for 2.x at 768 px). A hub model's
/// two config files are fetched, not the model.
pub fn native_side(model: &str, single: &SingleFileOptions) -> Result<usize> {
    let (unet, vae): (UNetConfig, VaeConfig) =
        match (single_file_path(model)?, &single.model_config) {
            (Some(_), Some(dir)) | (None, Some(dir)) => configs_in(dir)?,
            (Some(file), None) => {
                let family = Checkpoint::family_of(&file)?;
                let prediction = single.prediction_type.as_deref().unwrap_or("epsilon");
                let (c, _) = family_configs(family, prediction)?;
                (c.unet, c.vae)
            }
            (None, None)
                if model != TINY_RANDOM
                    && !Path::new(model).exists()
                    && looks_like_hub_id(model) =>
            {
                let flag = "--model";
                (
                    read_json(&hub_file(model, "unet/config.json", flag)?)?,
                    read_json(&hub_file(model, "vae/config.json", flag)?)?,
                )
            }
            (None, None) => configs_in(&resolve(model)?)?,
        };
    let cells = unet.sample_size.unwrap_or(64);
    Ok(cells * vae.downscale_factor())
}

fn configs_in(root: &Path) -> Result<(UNetConfig, VaeConfig)> {
    let unet = root.join("unet").join("config.json");
    let vae = root.join("vae").join("config.json");
    Ok((read_json(&unet)?, read_json(&vae)?))
}

/// Refuses an image side (`flag`'s value, in pixels) that is not a whole number of latent
/// cells of `factor` pixels, or is under `min` pixels, naming the nearest size that works.
pub fn check_side(flag: &str, pixels: usize, factor: usize, min: usize) -> Result<()> {
    let min = min.div_ceil(factor).max(1) * factor;
    if pixels >= min && pixels.is_multiple_of(factor) {
        return Ok(());
    }
    let nearest = (pixels / factor * factor).max(min);
    Err(Error::usage(format!(
        "{flag} {pixels} is not a multiple of {factor} (the VAE's downscale factor) of at least \
         {min}: try {nearest}."
    )))
}

/// Every component's config and the tokenizer folder.
struct Configs {
    unet: UNetConfig,
    vae: VaeConfig,
    text: ClipTextConfig,
    scheduler: SchedulerConfig,
    tokenizer: PathBuf,
    /// SDXL's second text encoder and its tokenizer folder.
    text_2: Option<(ClipTextConfig, PathBuf)>,
    force_zeros_for_empty_prompt: bool,
}

impl Configs {
    /// The configs of a diffusers folder (`root/unet/config.json`, ...), checked.
    fn read(root: &Path) -> Result<Self> {
        let path = |c: &str, f: &str| root.join(c).join(f);
        let configs = Self {
            unet: read_json(&path("unet", "config.json"))?,
            vae: read_json(&path("vae", "config.json"))?,
            text: read_json(&path("text_encoder", "config.json"))?,
            scheduler: read_json(&path("scheduler", "scheduler_config.json"))?,
            tokenizer: root.join("tokenizer"),
            text_2: match path("text_encoder_2", "config.json") {
                f if f.is_file() => Some((read_json(&f)?, root.join("tokenizer_2"))),
                _ => None,
            },
            force_zeros_for_empty_prompt: force_zeros(&root.join("model_index.json"))?,
        };
        configs.check(
            |c| {
                path(
                    c,
                    if c == "scheduler" {
                        "scheduler_config.json"
                    } else {
                        "config.json"
                    },
                )
            },
            root,
        )?;
        Ok(configs)
    }

    /// Each config valid, and the components made for one another.
    fn check(&self, file: impl Fn(&str) -> PathBuf, root: &Path) -> Result<()> {
        self.unet.validate(&file("unet"))?;
        self.vae.validate(&file("vae"))?;
        self.text.validate(&file("text_encoder"))?;
        self.scheduler.validate(&file("scheduler"))?;
        let text_width = match &self.text_2 {
            Some((t2, _)) => {
                t2.validate(&file("text_encoder_2"))?;
                self.check_sdxl(t2, root)?;
                self.text.hidden_size + t2.hidden_size
            }
            None if self.unet.addition_embed_type.is_some() => {
                return Err(Error::unsupported(
                    root,
                    "an SDXL U-Net (added size conditioning) without text_encoder_2/".into(),
                ))
            }
            None => self.text.hidden_size,
        };
        if self.unet.cross_attention_dim != text_width {
            return Err(Error::mismatch(
                root,
                format!(
                    "{}: the U-Net attends to {}-wide text features but the text encoder produces {}: \
                     the components come from different models.",
                    root.display(),
                    self.unet.cross_attention_dim,
                    text_width
                ),
            ));
        }
        Ok(())
    }

    /// SDXL's U-Net takes the second encoder's pooled projection and six sizes.
    fn check_sdxl(&self, t2: &ClipTextConfig, root: &Path) -> Result<()> {
        let (Some(time), Some(input)) = (
            self.unet.addition_time_embed_dim,
            self.unet.projection_class_embeddings_input_dim,
        ) else {
            return Err(Error::unsupported(
                root,
                "a second text encoder without SDXL's added conditioning in the U-Net".into(),
            ));
        };
        if t2.projection_dim + 6 * time != input {
            return Err(Error::mismatch(
                root,
                format!(
                    "{}: the U-Net's added conditioning takes {input} numbers, but the second text \
                     encoder's {} pooled ones and six sizes of {time} make {}.",
                    root.display(),
                    t2.projection_dim,
                    t2.projection_dim + 6 * time
                ),
            ));
        }
        Ok(())
    }
}

/// SDXL pipelines' `force_zeros_for_empty_prompt` (true unless `model_index.json` says).
fn force_zeros(model_index: &Path) -> Result<bool> {
    if !model_index.is_file() {
        return Ok(true);
    }
    let v: serde_json::Value = read_json(model_index)?;
    Ok(v["force_zeros_for_empty_prompt"].as_bool().unwrap_or(true))
}

/// Builds the model from checked configs and each component's weights.
fn assemble(
    source: &str,
    origin: Origin,
    c: Configs,
    weights: impl Fn(&str, DType) -> Result<VarBuilder<'static>>,
    fits: impl Fn(&str, candle_core::Error) -> Error,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    // A corrupt file's own error (its reader carries it) stands; anything else is a misfit.
    let fits = |c: &str, e| crate::error::carried(e).unwrap_or_else(|e| fits(c, e));
    let unet = UNet::load(&weights("unet", dtype)?, &c.unet).map_err(|e| fits("unet", e))?;
    // SDXL's pipeline decodes in f32 under f16 (its VAE overflows in half precision).
    let upcast = c.text_2.is_some() && c.vae.force_upcast && dtype == DType::F16;
    let vae_dtype = if upcast { DType::F32 } else { dtype };
    let vae = Vae::load(&weights("vae", vae_dtype)?, &c.vae).map_err(|e| fits("vae", e))?;
    let text_encoder = ClipTextModel::load(&weights("text_encoder", dtype)?, &c.text)
        .map_err(|e| fits("text_encoder", e))?;
    let tokenizer = ClipTokenizer::load(
        &c.tokenizer,
        c.text.vocab_size,
        c.text.max_position_embeddings,
    )?;
    let text_encoder_2 = match &c.text_2 {
        Some((cfg, dir)) => Some((
            ClipTextModel::load(&weights("text_encoder_2", dtype)?, cfg)
                .map_err(|e| fits("text_encoder_2", e))?,
            ClipTokenizer::load(dir, cfg.vocab_size, cfg.max_position_embeddings)?,
        )),
        None => None,
    };
    Ok(StableDiffusion {
        source: source.to_string(),
        origin,
        unet,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        force_zeros_for_empty_prompt: c.force_zeros_for_empty_prompt,
        schedule: NoiseSchedule::new(&c.scheduler),
        device: device.clone(),
        dtype,
    })
}

fn load_from_root(
    source: &str,
    root: &Path,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    if !root.join("model_index.json").is_file() && !root.join("unet").is_dir() {
        return Err(Error::ModelNotFound(format!(
            "{} is not a diffusers model folder: it has no model_index.json and no unet/ folder. \
             Pass the folder that holds unet/, vae/, text_encoder/, tokenizer/ and scheduler/, \
             or a single-file .safetensors checkpoint.",
            root.display()
        )));
    }
    let configs = Configs::read(root)?;
    assemble(
        source,
        Origin::Folder(root.to_path_buf()),
        configs,
        |c, dtype| weights(root, c, device, dtype),
        |c, e| weight_error(root, c, e),
        device,
        dtype,
    )
}

/// `model` as a single-file checkpoint: a `.safetensors` file. Pickled checkpoints are
/// refused by name; anything else is not one.
fn single_file_path(model: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(model);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("safetensors") if path.is_file() => Ok(Some(path.to_path_buf())),
        Some("safetensors") => Err(Error::ModelNotFound(format!(
            "the checkpoint {model} does not exist."
        ))),
        Some("ckpt" | "pt" | "pth" | "bin") if path.is_file() => Err(Error::unsupported(
            path,
            "a pickled checkpoint: magictailor never loads pickle (it can run code). Use the \
             model's .safetensors file, or convert it once with a tool you trust"
                .into(),
        )),
        _ => Ok(None),
    }
}

/// A single-file checkpoint with its family's configs (or `--model-config`'s).
fn load_single_file(
    source: &str,
    file: &Path,
    single: &SingleFileOptions,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    let checkpoint = Arc::new(Checkpoint::open(file)?);
    let (configs, unet_config) = match &single.model_config {
        Some(dir) => single_file_configs_from(dir, single)?,
        None => bundled_configs(&checkpoint, single)?,
    };
    let (per_block, levels) = (
        configs.unet.layers_per_block,
        configs.vae.block_out_channels.len(),
    );
    let origin = Origin::SingleFile {
        checkpoint: checkpoint.clone(),
        unet_config,
        layers_per_block: per_block,
    };
    let family = checkpoint.family.name();
    let described_by = match &single.model_config {
        Some(dir) => format!("the configs in {}", dir.display()),
        None => format!("the bundled {family} configs"),
    };
    assemble(
        source,
        origin,
        configs,
        |c, dtype| {
            let (component, n) = match c {
                "unet" => (Component::Unet, per_block),
                "vae" => (Component::Vae, levels),
                "text_encoder_2" => (Component::TextEncoder2, 0),
                _ => (Component::TextEncoder, 0),
            };
            Ok(checkpoint.weights(component, n, device, dtype))
        },
        |c, e| {
            Error::mismatch(
                file,
                format!(
                    "{}: the {c} weights of this {family} checkpoint do not fit {described_by} ({}). \
                     A model of another size needs --model-config DIR, a diffusers folder whose \
                     configs describe it.",
                    file.display(),
                    crate::error::brief(&e)
                ),
            )
        },
        device,
        dtype,
    )
}

/// `--model-config DIR`: a diffusers folder's configs and tokenizer, and the prediction
/// type from `--prediction-type` where given.
fn single_file_configs_from(dir: &Path, single: &SingleFileOptions) -> Result<(Configs, String)> {
    if !dir.join("unet").join("config.json").is_file() {
        return Err(Error::usage(format!(
            "--model-config {}: expected a diffusers folder with unet/config.json, vae/, \
             text_encoder/, tokenizer/ and scheduler/ (weights are not needed).",
            dir.display()
        )));
    }
    let mut configs = Configs::read(dir)?;
    if let Some(p) = &single.prediction_type {
        configs.scheduler.prediction_type = p.clone();
        configs.scheduler.validate(Path::new("--prediction-type"))?;
    }
    let file = dir.join("unet").join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|e| Error::read(&file, e))?;
    Ok((configs, text))
}

/// The family's bundled configs, sized for its prediction type, with the tokenizer of
/// the family's hub repo (downloaded once into the hub cache).
fn bundled_configs(ckpt: &Checkpoint, single: &SingleFileOptions) -> Result<(Configs, String)> {
    let family = ckpt.family;
    let prediction = match (&single.prediction_type, family) {
        (Some(p), _) => p.as_str(),
        (None, Family::Sd1 | Family::Sdxl) => "epsilon",
        (None, Family::Sd2) => {
            return Err(Error::usage(format!(
                "{} is an SD 2.x checkpoint, whose weights do not say what the U-Net predicts: \
                 pass --prediction-type epsilon (2.x-base, 512 px) or --prediction-type \
                 v_prediction (2.x at 768 px, and most fine-tunes of it).",
                ckpt.file.display()
            )))
        }
    };
    let (mut configs, unet_text) = family_configs(family, prediction)?;
    configs.tokenizer = family_tokenizer(family, "tokenizer")?;
    if let Some((_, dir)) = &mut configs.text_2 {
        *dir = family_tokenizer(family, "tokenizer_2")?;
    }
    Ok((configs, unet_text))
}

/// The family's bundled configs for `prediction` (no tokenizer yet), checked, and the
/// U-Net's config text.
fn family_configs(family: Family, prediction: &str) -> Result<(Configs, String)> {
    let mut all: serde_json::Value = serde_json::from_str(family.bundled_configs())
        .map_err(|e| Error::internal(format!("bundled {} configs: {e}", family.name())))?;
    if family == Family::Sd2 && prediction == "v_prediction" {
        // SD 2.x at 768 px: the sizes and attention upcast of stabilityai/stable-diffusion-2-1.
        all["unet"]["sample_size"] = 96.into();
        all["unet"]["upcast_attention"] = true.into();
        all["vae"]["sample_size"] = 768.into();
    }
    all["scheduler"]["prediction_type"] = prediction.into();
    let configs = Configs {
        unet: bundled(&all, "unet")?,
        vae: bundled(&all, "vae")?,
        text: bundled(&all, "text_encoder")?,
        scheduler: bundled(&all, "scheduler")?,
        tokenizer: PathBuf::new(),
        text_2: match all.get("text_encoder_2") {
            Some(_) => Some((bundled(&all, "text_encoder_2")?, PathBuf::new())),
            None => None,
        },
        force_zeros_for_empty_prompt: true,
    };
    let name = |c: &str| {
        PathBuf::from(format!(
            "--prediction-type / bundled {} {c} config",
            family.name()
        ))
    };
    configs.check(name, Path::new(family.name()))?;
    let unet_text = serde_json::to_string_pretty(&all["unet"])
        .map_err(|e| Error::internal(format!("bundled unet config: {e}")))?;
    Ok((configs, unet_text))
}

fn bundled<T: serde::de::DeserializeOwned>(all: &serde_json::Value, component: &str) -> Result<T> {
    serde_json::from_value(all[component].clone())
        .map_err(|e| Error::internal(format!("bundled {component} config: {e}")))
}

/// The tokenizer files of the family's hub repo, from the cache or downloaded.
fn family_tokenizer(family: Family, folder: &str) -> Result<PathBuf> {
    let flag = "--model-config DIR (a diffusers folder with the family's configs and tokenizer/)";
    let repo = family.tokenizer_repo();
    let mut dir = PathBuf::new();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        let path = hub_file(repo, &format!("{folder}/{f}"), flag)?;
        dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    // Older saves keep the pad token here; newer ones have none.
    let _ = hub_file(repo, &format!("{folder}/special_tokens_map.json"), flag);
    Ok(dir)
}

fn weight_error(root: &Path, component: &str, e: candle_core::Error) -> Error {
    Error::mismatch(&root.join(component), format!(
        "the {component} weights in {} do not fit its config.json ({}). The folder may be incomplete, \
         or its weights and config come from different models.",
        root.join(component).display(),
        crate::error::brief(&e)
    ))
}

/// The safetensors files of one component: a single file (full precision preferred over
/// the fp16 variant) or the shards listed in an index.
pub fn weight_files(root: &Path, component: &str) -> Result<Vec<PathBuf>> {
    let dir = root.join(component);
    for name in WEIGHT_NAMES {
        for variant in ["", ".fp16"] {
            let single = dir.join(format!("{name}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{name}{variant}.safetensors.index.json"));
            if index.is_file() {
                return shards_from_index(&index);
            }
        }
    }
    let has_pickle = ["diffusion_pytorch_model.bin", "pytorch_model.bin"]
        .iter()
        .any(|f| dir.join(f).is_file());
    let hint = if has_pickle {
        " It has only pickled .bin weights, which magictailor never loads (they can run code); \
         convert them with diffusers (`save_pretrained(..., safe_serialization=True)`)."
    } else {
        ""
    };
    Err(Error::bad_file(
        &dir,
        format!("no safetensors weights in {}.{hint}", dir.display()),
    ))
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::BadConfig {
            path: index.to_path_buf(),
            msg: "no weight_map".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn weights(
    root: &Path,
    component: &str,
    device: &Device,
    dtype: DType,
) -> Result<VarBuilder<'static>> {
    let files = weight_files(root, component)?;
    // Read tensor by tensor, not memory-mapped, and checked as read: see `FileTensors`.
    let backend = crate::io::tensors::FileTensors::open(&files)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

/// Turns what the user passed as `--model` into a local folder.
pub fn resolve(model: &str) -> Result<PathBuf> {
    if model == TINY_RANDOM {
        return super::tiny::ensure_cached();
    }
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if looks_like_hub_id(model) {
        return fetch_from_hub(model);
    }
    Err(Error::ModelNotFound(format!(
        "the model folder {model} does not exist. Pass a diffusers model folder, a hub repo id such as \
         {DEFAULT_MODEL}, or `{TINY_RANDOM}` for a tiny random model (meaningless images, for trying the pipeline)."
    )))
}

pub(crate) fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !s.starts_with('.')
}

/// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: the local cache only.
pub(crate) fn offline() -> bool {
    HubEnv::from_env().offline
}

/// One hub repo's files at one revision, from the local hf-hub cache first, downloaded
/// otherwise (never when HF_HUB_OFFLINE is set). Callers word the errors, since each
/// knows which flag named the repo.
pub(crate) struct Hub {
    cached: hf_hub::CacheRepo,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

pub(crate) type HubError = hf_hub::api::sync::ApiError;

impl Hub {
    pub(crate) fn new(id: &str, revision: &str) -> std::result::Result<Self, HubError> {
        let repo = hf_hub::Repo::with_revision(
            id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let env = HubEnv::from_env();
        let cached = env.cache().repo(repo.clone());
        let api = if env.offline {
            None
        } else {
            Some(env.api().with_progress(true).build()?.repo(repo))
        };
        Ok(Self { cached, api })
    }

    /// `None` for a file the repo does not have (or, offline, that is not cached).
    pub(crate) fn get(&self, file: &str) -> std::result::Result<Option<PathBuf>, HubError> {
        if let Some(p) = self.cached.get(file) {
            return Ok(Some(p));
        }
        match &self.api {
            None => Ok(None),
            Some(api) => match api.get(file) {
                Ok(p) => Ok(Some(p)),
                // A file the repo does not have (404) is "absent"; anything else is a failure.
                Err(e) if e.to_string().contains("404") => Ok(None),
                Err(e) => Err(e),
            },
        }
    }
}

/// One file of a hub repo (e.g. SAM weights), as a local path; `flag` is the option
/// that named it, for the error.
pub fn hub_file(id: &str, file: &str, flag: &str) -> Result<PathBuf> {
    let fetch_error = |e: HubError| {
        Error::ModelNotFound(format!(
            "could not fetch {file} of {id} from {} ({e}). Without network access, \
             download it elsewhere and pass the file with {flag}.",
            hub_name()
        ))
    };
    let found = Hub::new(id, "main")
        .and_then(|h| h.get(file))
        .map_err(fetch_error)?;
    found.ok_or_else(|| {
        Error::ModelNotFound(format!(
            "{file} of {id} could not be found{}. Check {flag}, or pass a local file or folder.",
            if offline() {
                " (HF_HUB_OFFLINE is set and it is not in the local hub cache)"
            } else {
                ""
            }
        ))
    })
}

/// The snapshot folder of hub model `id` in the local cache, where it holds everything
/// `train` and `infer` read; else what is missing.
pub fn cached_snapshot(id: &str) -> std::result::Result<PathBuf, String> {
    let repo = hf_hub::Repo::model(id.to_string());
    let Some(index) = HubEnv::from_env()
        .cache()
        .repo(repo)
        .get("model_index.json")
    else {
        return Err("not in the cache".into());
    };
    let root = index.parent().map(Path::to_path_buf).unwrap_or_default();
    for component in ["unet", "vae", "text_encoder"] {
        if weight_files(&root, component).is_err() {
            return Err(format!(
                "partly cached: {component} weights missing in {}",
                root.display()
            ));
        }
    }
    Ok(root)
}

/// Downloads (or finds in the hf-hub cache) the files we read; returns the snapshot folder.
fn fetch_from_hub(id: &str) -> Result<PathBuf> {
    let hub = Hub::new(id, "main").map_err(|e| hub_error(id, e))?;
    let get = |file: &str| hub.get(file).map_err(|e| hub_error(id, e));
    let mut root: Option<PathBuf> = None;
    let mut need = |file: &str, required: bool| -> Result<bool> {
        match get(file)? {
            Some(p) => {
                if root.is_none() {
                    root = p
                        .ancestors()
                        .nth(file.split('/').count())
                        .map(Path::to_path_buf);
                }
                Ok(true)
            }
            None if required => Err(missing_on_hub(id, file)),
            None => Ok(false),
        }
    };
    need("model_index.json", true)?;
    // SDXL's second text encoder and tokenizer, when the pipeline lists them.
    let index: serde_json::Value = match get("model_index.json")? {
        Some(p) => read_json(&p)?,
        None => serde_json::Value::Null,
    };
    let mut components = COMPONENT_FILES.to_vec();
    if index.get("text_encoder_2").is_some_and(|v| !v.is_null()) {
        components.push(("text_encoder_2", COMPONENT_FILES[2].1));
        components.push(("tokenizer_2", COMPONENT_FILES[3].1));
    }
    for (component, files) in components {
        // A tokenizer saved by transformers 5 may have only tokenizer.json.
        let whole = component.starts_with("tokenizer")
            && need(&format!("{component}/tokenizer.json"), false)?;
        for f in files {
            let optional = f.ends_with("_map.json") || f.starts_with("tokenizer_config");
            need(&format!("{component}/{f}"), !optional && !whole)?;
        }
        if component.starts_with("tokenizer") || component == "scheduler" {
            continue;
        }
        let stem = if component.starts_with("text_encoder") {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        let found = need(&format!("{component}/{stem}.safetensors"), false)?
            || need(&format!("{component}/{stem}.fp16.safetensors"), false)?;
        if !found {
            return Err(missing_on_hub(
                id,
                &format!("{component}/{stem}.safetensors"),
            ));
        }
    }
    root.ok_or_else(|| missing_on_hub(id, "model_index.json"))
}

fn missing_on_hub(id: &str, file: &str) -> Error {
    let how = if offline() {
        "HF_HUB_OFFLINE is set, so nothing is downloaded and the file is not in the local hub cache. \
         Unset HF_HUB_OFFLINE to download it, or pass a local diffusers folder with --model DIR."
    } else {
        "Check the repo id, or pass a local diffusers folder with --model DIR."
    };
    Error::ModelNotFound(format!("{file} of {id} could not be found. {how}"))
}

fn hub_error(id: &str, e: impl std::fmt::Display) -> Error {
    Error::ModelNotFound(format!(
        "could not fetch {id} from {} ({e}). Without network access, download the model \
         elsewhere and pass its folder with --model DIR (or set HF_HUB_OFFLINE=1 to use only the local cache).",
        hub_name()
    ))
}

/// The hub as messages name it: the mirror `HF_ENDPOINT` names, if any.
pub(crate) fn hub_name() -> String {
    match HubEnv::from_env().endpoint.as_str() {
        super::hub_env::DEFAULT_ENDPOINT => "the Hugging Face hub".into(),
        other => format!("the hub at {other} (HF_ENDPOINT)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_family_configs_parse_and_fit_together() {
        for (family, width) in [(Family::Sd1, 768), (Family::Sd2, 1024), (Family::Sdxl, 768)] {
            for prediction in ["epsilon", "v_prediction"] {
                let (c, text) = family_configs(family, prediction).unwrap();
                assert_eq!(c.text.hidden_size, width);
                assert_eq!(c.scheduler.prediction_type, prediction);
                assert_eq!(c.vae.downscale_factor(), 8);
                let v = family == Family::Sd2 && prediction == "v_prediction";
                assert_eq!(c.unet.upcast_attention, v);
                assert_eq!(text.contains("\"sample_size\": 96"), v, "{text}");
                assert_eq!(c.text_2.is_some(), family == Family::Sdxl);
            }
        }
        assert!(family_configs(Family::Sd2, "sample").is_err());
    }
}
