//! Finds a model in the diffusers folder layout (local folder, hub repo id, or the
//! built-in `tiny-random`) and loads every component from its own `config.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::clip::ClipTextModel;
use super::config::{read_json, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use super::hub_env::HubEnv;
use super::scheduler::NoiseSchedule;
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
    pub root: PathBuf,
    pub unet: UNet,
    pub vae: Vae,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub schedule: NoiseSchedule,
    pub device: Device,
    pub dtype: DType,
}

/// How many times this process loaded a model: batch runs load one for many pairs.
static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn loads_in_process() -> usize {
    LOADS.load(std::sync::atomic::Ordering::Relaxed)
}

impl StableDiffusion {
    pub fn load(model: &str, device: &Device, dtype: DType) -> Result<Self> {
        // Refused before anything is downloaded or read.
        if dtype == DType::BF16 && device.is_cpu() {
            return Err(Error::usage(
                "--dtype bf16 needs a CUDA device: candle's CPU convolution has no bf16. Use \
                 --dtype f16 or f32 on the CPU.",
            ));
        }
        let root = resolve(model)?;
        let sd = load_from_root(model, &root, device, dtype)?;
        LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(sd)
    }

    /// Pixels per latent cell (8 for SD).
    pub fn vae_factor(&self) -> usize {
        self.vae.config.downscale_factor()
    }
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

fn load_from_root(
    source: &str,
    root: &Path,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    if !root.join("model_index.json").is_file() && !root.join("unet").is_dir() {
        return Err(Error::ModelNotFound(format!(
            "{} is not a diffusers model folder: it has no model_index.json and no unet/ folder. \
             Pass the folder that holds unet/, vae/, text_encoder/, tokenizer/ and scheduler/.",
            root.display()
        )));
    }
    let cfg_path = |c: &str, f: &str| root.join(c).join(f);

    let unet_cfg: UNetConfig = read_json(&cfg_path("unet", "config.json"))?;
    unet_cfg.validate(&cfg_path("unet", "config.json"))?;
    let vae_cfg: VaeConfig = read_json(&cfg_path("vae", "config.json"))?;
    vae_cfg.validate(&cfg_path("vae", "config.json"))?;
    let te_cfg: ClipTextConfig = read_json(&cfg_path("text_encoder", "config.json"))?;
    te_cfg.validate(&cfg_path("text_encoder", "config.json"))?;
    let sched_cfg: SchedulerConfig = read_json(&cfg_path("scheduler", "scheduler_config.json"))?;
    sched_cfg.validate(&cfg_path("scheduler", "scheduler_config.json"))?;
    if unet_cfg.cross_attention_dim != te_cfg.hidden_size {
        return Err(Error::mismatch(
            root,
            format!(
                "{}: the U-Net attends to {}-wide text features but the text encoder produces {}: \
             the components come from different models.",
                root.display(),
                unet_cfg.cross_attention_dim,
                te_cfg.hidden_size
            ),
        ));
    }

    let unet = UNet::load(&weights(root, "unet", device, dtype)?, &unet_cfg)
        .map_err(|e| weight_error(root, "unet", e))?;
    let vae = Vae::load(&weights(root, "vae", device, dtype)?, &vae_cfg)
        .map_err(|e| weight_error(root, "vae", e))?;
    let text_encoder = ClipTextModel::load(&weights(root, "text_encoder", device, dtype)?, &te_cfg)
        .map_err(|e| weight_error(root, "text_encoder", e))?;
    let tokenizer = ClipTokenizer::load(
        &root.join("tokenizer"),
        te_cfg.vocab_size,
        te_cfg.max_position_embeddings,
    )?;
    Ok(StableDiffusion {
        source: source.to_string(),
        root: root.to_path_buf(),
        unet,
        vae,
        text_encoder,
        tokenizer,
        schedule: NoiseSchedule::new(&sched_cfg),
        device: device.clone(),
        dtype,
    })
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
    for f in &files {
        crate::io::tensors::check(f)?;
    }
    // SAFETY: the files are memory-mapped read-only; magictailor never writes to a model
    // folder while it is loaded.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
        Error::bad_file(
            &root.join(component),
            format!(
                "cannot read the {component} weights in {}: {e}",
                root.join(component).display()
            ),
        )
    })
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
    for (component, files) in COMPONENT_FILES {
        for f in files {
            let required = !f.ends_with("_map.json") && !f.starts_with("tokenizer_config");
            need(&format!("{component}/{f}"), required)?;
        }
        if component == "tokenizer" || component == "scheduler" {
            continue;
        }
        let stem = if component == "text_encoder" {
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
