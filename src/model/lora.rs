//! LoRA adapters: `W x + scale * B (A x)`, with `A: [rank, in]`, `B: [out, rank]`,
//! `scale = alpha / rank`, and the files other tools read and write.
//!
//! An adapter set is a map from diffusers module path to weights. The frozen base is
//! shared: the online and the momentum U-Net of DS-Bal are one `UNet` run with two sets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::io::tensors;

/// The module-name suffixes MagicTailor adapts (docs/method.md, "Model").
pub const MAGICTAILOR_TARGETS: [&str; 7] = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2",
];

#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// A linear layer of the U-Net that can carry an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTarget {
    pub path: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// Stored as a 1x1 convolution (SD 1.x `proj_in`/`proj_out`): adapters are 4-D on disk.
    pub conv: bool,
    /// The layer's path in the original (SGM/LDM) layout, which kohya's SDXL files name
    /// (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
    pub original: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    modules: HashMap<String, LoraWeights>,
}

/// One module's down (A) and up (B) matrices and alpha, as they turn up in a file.
type Halves = (Option<Tensor>, Option<Tensor>, Option<f64>);

/// On-disk layouts we read; we write `Peft` and `Kohya`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// `unet.<path>.lora_A.weight` / `.lora_B.weight` (peft, diffusers >= 0.22).
    Peft,
    /// `<path>.lora.down.weight` or `<attn>.processor.to_q_lora.down.weight` (older diffusers).
    DiffusersOld,
    /// `lora_unet_<path with _>.lora_down.weight` + `.alpha` (kohya; ComfyUI, A1111).
    Kohya,
}

impl LoraSet {
    pub fn get(&self, path: &str) -> Option<&LoraWeights> {
        self.modules.get(path)
    }
    pub fn get_mut(&mut self, path: &str) -> Option<&mut LoraWeights> {
        self.modules.get_mut(path)
    }
    pub fn insert(&mut self, path: String, w: LoraWeights) {
        self.modules.insert(path, w);
    }
    pub fn len(&self) -> usize {
        self.modules.len()
    }
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &LoraWeights)> {
        self.modules.iter()
    }

    /// Reads any supported LoRA file, keeps the U-Net part and checks every adapter
    /// against the model's targets. Text-encoder adapters are refused, not dropped.
    pub fn load(file: &Path, targets: &[LoraTarget], device: &Device) -> Result<Self> {
        let tensors = tensors::read_floats(file, device, &[])?;
        let alpha_meta = peft_alpha_from_metadata(file)?;
        let format = detect_format(&tensors).ok_or_else(|| {
            Error::bad_file(
                file,
                format!(
                    "{} holds no LoRA weights magictailor recognizes (expected peft `lora_A`/`lora_B`, \
                     diffusers `lora.down`/`lora.up`, or kohya `lora_down`/`lora_up` keys).",
                    file.display()
                ),
            )
        })?;
        let by_path: HashMap<&str, &LoraTarget> =
            targets.iter().map(|t| (t.path.as_str(), t)).collect();
        // kohya names a layer by its diffusers path (SD 1.x/2.x) or its original one (SDXL).
        let by_kohya: HashMap<String, &LoraTarget> = (targets.iter())
            .flat_map(|t| {
                let original = t.original.as_deref().map(|o| (kohya_name(o), t));
                std::iter::once((kohya_name(&t.path), t)).chain(original)
            })
            .collect();
        let mut pairs: BTreeMap<String, Halves> = BTreeMap::new();
        for (key, t) in &tensors {
            let Some((module, part)) = parse_key(key, format) else {
                if key.contains("lora") && !key.ends_with(".alpha") {
                    return Err(Error::unsupported(
                        file,
                        format!(
                            "key {key:?}, a LoRA weight for something other than the U-Net (e.g. the \
                             text encoder); magictailor only applies U-Net adapters"
                        ),
                    ));
                }
                continue;
            };
            let entry = pairs.entry(module).or_default();
            match part {
                Part::Down => entry.0 = Some(t.clone()),
                Part::Up => entry.1 = Some(t.clone()),
                Part::Alpha => {
                    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    let [alpha] = v[..] else {
                        return Err(Error::bad_file(
                            file,
                            format!(
                                "{}: {key:?} should hold one alpha value but holds {}.",
                                file.display(),
                                v.len()
                            ),
                        ));
                    };
                    entry.2 = Some(alpha);
                }
            }
        }
        let mut set = LoraSet::default();
        for (module, (down, up, alpha)) in pairs {
            let target = match format {
                LoraFormat::Kohya => by_kohya.get(&module).copied(),
                _ => by_path.get(module.as_str()).copied(),
            };
            let target = target.ok_or_else(|| {
                Error::mismatch(
                    file,
                    format!(
                        "{}: adapter for {module:?}, which is not an adaptable layer of this U-Net \
                         (is the LoRA for another base model?).",
                        file.display()
                    ),
                )
            })?;
            let (Some(down), Some(up)) = (down, up) else {
                return Err(Error::bad_file(
                    file,
                    format!(
                        "{}: {module:?} has only one of its two LoRA matrices.",
                        file.display()
                    ),
                ));
            };
            let a = down.flatten_from(1)?.to_dtype(DType::F32)?;
            let b = up.flatten_from(1)?.to_dtype(DType::F32)?;
            let rank = a.dim(0)?;
            if rank == 0 {
                return Err(Error::bad_file(
                    file,
                    format!(
                        "{}: {module:?} has rank 0 (an empty adapter).",
                        file.display()
                    ),
                ));
            }
            if a.dims() != [rank, target.in_dim] || b.dims() != [target.out_dim, rank] {
                return Err(Error::mismatch(
                    file,
                    format!(
                        "{}: {module:?} has shapes {:?} and {:?}, but the layer is {}x{} (another base \
                         model?).",
                        file.display(),
                        down.dims(),
                        up.dims(),
                        target.out_dim,
                        target.in_dim
                    ),
                ));
            }
            let alpha = alpha.or(alpha_meta).unwrap_or(rank as f64);
            set.insert(
                target.path.clone(),
                LoraWeights {
                    a,
                    b,
                    scale: alpha / rank as f64,
                },
            );
        }
        Ok(set)
    }

    /// Tensors in peft/diffusers layout, the layout `save_peft` writes.
    pub fn peft_tensors(&self, targets: &[LoraTarget]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for t in targets {
            if let Some(w) = self.get(&t.path) {
                let (a, b) = shaped_for_disk(w, t)?;
                out.insert(format!("unet.{}.lora_A.weight", t.path), a);
                out.insert(format!("unet.{}.lora_B.weight", t.path), b);
            }
        }
        Ok(out)
    }

    /// The adapter rank and alpha, when every module shares them (as ours do).
    pub fn rank_alpha(&self) -> Option<(usize, f64)> {
        let mut it = self.modules.values();
        let first = it.next()?;
        let r = first.a.dim(0).ok()?;
        let alpha = first.scale * r as f64;
        it.all(|w| w.a.dim(0).ok() == Some(r) && (w.scale * r as f64 - alpha).abs() < 1e-9)
            .then_some((r, alpha))
    }

    /// `pytorch_lora_weights.safetensors` as diffusers and peft read it; alpha travels in
    /// diffusers' `lora_adapter_metadata` header so a non-unit scale survives the trip.
    pub fn save_peft(&self, file: &Path, targets: &[LoraTarget]) -> Result<()> {
        let tensors = self.peft_tensors(targets)?;
        // One metadata key only: the safetensors crate writes metadata in HashMap order, and
        // equal runs must give equal bytes.
        let mut meta = HashMap::new();
        if let Some((r, alpha)) = self.rank_alpha() {
            let mut paths: Vec<&String> = self.modules.keys().collect();
            paths.sort();
            let cfg = serde_json::json!({
                "unet.r": r,
                "unet.lora_alpha": alpha,
                "unet.target_modules": paths,
                "unet.init_lora_weights": "gaussian",
            });
            meta.insert("lora_adapter_metadata".to_string(), cfg.to_string());
        }
        tensors::write(file, &tensors, (!meta.is_empty()).then_some(meta))
    }

    /// Kohya layout (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`), which
    /// ComfyUI and A1111 load; with `original`, layers named by their original path, as
    /// sd-scripts names SDXL's (`lora_unet_input_blocks_4_1_...`).
    pub fn save_kohya(&self, file: &Path, targets: &[LoraTarget], original: bool) -> Result<()> {
        let mut out = HashMap::new();
        for t in targets {
            if let Some(w) = self.get(&t.path) {
                let (a, b) = shaped_for_disk(w, t)?;
                let name = match (original, &t.original) {
                    (true, Some(o)) => kohya_name(o),
                    _ => kohya_name(&t.path),
                };
                let alpha = w.scale * w.a.dim(0)? as f64;
                out.insert(format!("{name}.lora_down.weight"), a);
                out.insert(format!("{name}.lora_up.weight"), b);
                out.insert(
                    format!("{name}.alpha"),
                    Tensor::new(alpha as f32, &Device::Cpu)?,
                );
            }
        }
        let mut meta = HashMap::new();
        meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
        tensors::write(file, &out, Some(meta))
    }
}

fn shaped_for_disk(w: &LoraWeights, t: &LoraTarget) -> Result<(Tensor, Tensor)> {
    let (a, b) = (
        w.a.to_device(&Device::Cpu)?.contiguous()?,
        w.b.to_device(&Device::Cpu)?.contiguous()?,
    );
    if t.conv {
        let (r, i) = a.dims2()?;
        let (o, _) = b.dims2()?;
        Ok((a.reshape((r, i, 1, 1))?, b.reshape((o, r, 1, 1))?))
    } else {
        Ok((a, b))
    }
}

pub fn kohya_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}

enum Part {
    Down,
    Up,
    Alpha,
}

fn detect_format(tensors: &HashMap<String, Tensor>) -> Option<LoraFormat> {
    let keys = || tensors.keys();
    if keys().any(|k| k.contains(".lora_A.") || k.contains(".lora_B.")) {
        Some(LoraFormat::Peft)
    } else if keys().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te")) {
        Some(LoraFormat::Kohya)
    } else if keys().any(|k| k.contains("lora.down") || k.contains("_lora.down")) {
        Some(LoraFormat::DiffusersOld)
    } else {
        None
    }
}

/// Splits a key into (module path or kohya name, which matrix); None for keys that are
/// not U-Net adapter weights.
fn parse_key(key: &str, format: LoraFormat) -> Option<(String, Part)> {
    match format {
        LoraFormat::Peft => {
            let k = key.strip_prefix("unet.").unwrap_or(key);
            if k.starts_with("text_encoder") {
                return None;
            }
            let k = k.replace(".default.", ".");
            if let Some(m) = k.strip_suffix(".lora_A.weight") {
                Some((m.to_string(), Part::Down))
            } else {
                k.strip_suffix(".lora_B.weight")
                    .map(|m| (m.to_string(), Part::Up))
            }
        }
        LoraFormat::Kohya => {
            let k = key
                .strip_prefix("lora_unet_")
                .map(|r| format!("lora_unet_{r}"))?;
            if let Some(m) = k.strip_suffix(".lora_down.weight") {
                Some((m.to_string(), Part::Down))
            } else if let Some(m) = k.strip_suffix(".lora_up.weight") {
                Some((m.to_string(), Part::Up))
            } else {
                k.strip_suffix(".alpha")
                    .map(|m| (m.to_string(), Part::Alpha))
            }
        }
        LoraFormat::DiffusersOld => {
            let k = key.strip_prefix("unet.").unwrap_or(key);
            if k.starts_with("text_encoder") {
                return None;
            }
            let (m, part) = if let Some(m) = k.strip_suffix(".down.weight") {
                (m, Part::Down)
            } else {
                (k.strip_suffix(".up.weight")?, Part::Up)
            };
            // `<path>.lora` (LoRACompatibleLinear) or `<attn>.processor.<proj>_lora` (attn processors).
            if let Some(p) = m.strip_suffix(".lora") {
                return Some((p.to_string(), part));
            }
            let (attn, proj) = m.split_once(".processor.")?;
            let proj = proj.strip_suffix("_lora")?;
            let proj = if proj == "to_out" { "to_out.0" } else { proj };
            Some((format!("{attn}.{proj}"), part))
        }
    }
}

/// The alpha diffusers records in the `lora_adapter_metadata` header entry, if any.
fn peft_alpha_from_metadata(file: &Path) -> Result<Option<f64>> {
    let Some(raw) = tensors::metadata(file, "lora_adapter_metadata")? else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&raw).map_err(|e| {
        Error::bad_file(
            file,
            format!(
                "{}: its lora_adapter_metadata is not JSON ({e}).",
                file.display()
            ),
        )
    })?;
    Ok(v.get("unet.lora_alpha").and_then(|a| a.as_f64()))
}

/// One adapted layer's trainable weights.
pub struct LoraModule {
    /// The layer's diffusers module path.
    pub path: String,
    pub a: Var,
    pub b: Var,
}

/// LoRA weights as trainable `Var`s: A ~ N(0, 1/rank) and B = 0 (peft's "gaussian" init),
/// so training starts from the base model's exact output.
pub struct TrainableLora {
    /// In the U-Net's target order, so checkpoints and exports are deterministic.
    pub modules: Vec<LoraModule>,
    pub scale: f64,
}

impl TrainableLora {
    pub fn new(
        targets: &[LoraTarget],
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut rng = crate::rng::seeded(seed);
        let std = 1.0 / rank as f64;
        let mut modules = Vec::with_capacity(targets.len());
        for t in targets {
            let a = (crate::rng::normal(&mut rng, (rank, t.in_dim), device)? * std)?;
            let b = Tensor::zeros((t.out_dim, rank), dtype, device)?;
            modules.push(LoraModule {
                path: t.path.clone(),
                a: Var::from_tensor(&a.to_dtype(dtype)?)?,
                b: Var::from_tensor(&b)?,
            });
        }
        Ok(Self {
            modules,
            scale: alpha / rank as f64,
        })
    }

    /// The adapter set a forward pass reads; it tracks gradients to the Vars.
    pub fn as_set(&self) -> LoraSet {
        self.set_with(|v| v.as_tensor().clone())
    }

    /// The current weights without the Vars: a forward builds no graph. Shares storage,
    /// so it reads what the next optimizer step writes (fine for sampling in between).
    pub fn detached(&self) -> LoraSet {
        self.set_with(|v| v.as_tensor().detach())
    }

    /// A copy that shares no storage with the Vars and builds no graph (the momentum
    /// adapters of DS-Bal).
    pub fn detached_copy(&self) -> Result<LoraSet> {
        let mut set = self.detached();
        for w in set.modules.values_mut() {
            (w.a, w.b) = (w.a.copy()?, w.b.copy()?);
        }
        Ok(set)
    }

    fn set_with(&self, f: impl Fn(&Var) -> Tensor) -> LoraSet {
        let mut set = LoraSet::default();
        for m in &self.modules {
            let w = LoraWeights {
                a: f(&m.a),
                b: f(&m.b),
                scale: self.scale,
            };
            set.insert(m.path.clone(), w);
        }
        set
    }

    /// No adapters, for a method that trains none.
    pub fn none() -> Self {
        Self {
            modules: Vec::new(),
            scale: 1.0,
        }
    }

    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| [m.a.clone(), m.b.clone()])
            .collect()
    }
}
