//! Full weights that replace a U-Net linear layer's base weight (and bias), for methods
//! that fine-tune whole matrices (Custom Diffusion's `to_k`/`to_v` of every
//! cross-attention, CLiC's `to_q`/`to_k`/`to_v`/`to_out.0`), and their file in the layout
//! diffusers' `load_attn_procs` reads.
//!
//! A tuned layer multiplies by its own weight with candle's matmul, whose backward gives
//! the weight gradient that the frozen ops (`ops::frozen_linear`) leave out by design.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::lora::LoraTarget;
use crate::error::{Error, Result};
use crate::io::tensors;

/// A tuned tensor's name in a training checkpoint: this, then `<module path>.weight` or
/// `.bias`.
pub const CHECKPOINT_PREFIX: &str = "tuned.";

/// One tuned layer's weight `[out, in]`, and its bias where the method tunes it.
#[derive(Debug, Clone)]
pub struct Tuned {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// The weights a forward pass uses in place of the base's, by diffusers module path.
#[derive(Debug, Clone, Default)]
pub struct TunedSet {
    layers: HashMap<String, Tuned>,
    /// Cross-attention keys and values of the first (start-of-text) token pass no
    /// gradient back (Custom Diffusion's processor detaches them).
    pub hold_first_token: bool,
}

impl TunedSet {
    pub fn get(&self, path: &str) -> Option<&Tuned> {
        self.layers.get(path)
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Reads a Custom Diffusion file (ours, or diffusers' `save_attn_procs`): every
    /// `<attn>.processor.<proj>_custom_diffusion.<weight|bias>` must name a layer of
    /// `targets` with its shape.
    pub fn load_custom_diffusion(
        file: &Path,
        targets: &[LoraTarget],
        device: &Device,
    ) -> Result<Self> {
        let by_path: HashMap<&str, &LoraTarget> =
            targets.iter().map(|t| (t.path.as_str(), t)).collect();
        let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors::read_floats(file, device, &[])? {
            if t.elem_count() == 0 {
                continue; // an untuned processor's empty entry
            }
            let (path, is_bias) = custom_diffusion_path(&key).ok_or_else(|| {
                Error::unsupported(
                    file,
                    format!("key {key:?}, which is not a Custom Diffusion attention weight"),
                )
            })?;
            let target = by_path.get(path.as_str()).ok_or_else(|| {
                Error::mismatch(
                    file,
                    format!(
                        "{}: {key:?} tunes {path:?}, which this U-Net does not have (weights for \
                         another base model?).",
                        file.display()
                    ),
                )
            })?;
            let want: &[usize] = if is_bias {
                &[target.out_dim]
            } else {
                &[target.out_dim, target.in_dim]
            };
            if t.dims() != want {
                return Err(Error::mismatch(
                    file,
                    format!(
                        "{}: {key:?} is {:?} but the layer's is {want:?} (another base model?).",
                        file.display(),
                        t.dims(),
                    ),
                ));
            }
            let entry = parts.entry(path).or_default();
            let t = Some(t.to_dtype(DType::F32)?);
            if is_bias {
                entry.1 = t;
            } else {
                entry.0 = t;
            }
        }
        let mut layers = HashMap::new();
        for (path, (weight, bias)) in parts {
            let weight = weight.ok_or_else(|| {
                Error::bad_file(
                    file,
                    format!("{}: {path:?} has a bias but no weight.", file.display()),
                )
            })?;
            layers.insert(path, Tuned { weight, bias });
        }
        if layers.is_empty() {
            return Err(Error::bad_file(
                file,
                format!("{} holds no Custom Diffusion weights.", file.display()),
            ));
        }
        Ok(Self {
            layers,
            hold_first_token: true,
        })
    }

    /// The tuned tensors a training checkpoint holds (`tuned.<path>.weight`, `.bias`),
    /// taken out of `t`; None where the run tuned none.
    pub fn from_checkpoint(t: &mut HashMap<String, Tensor>) -> Result<Option<Self>> {
        let paths: Vec<String> = (t.keys())
            .filter_map(|k| k.strip_prefix(CHECKPOINT_PREFIX)?.strip_suffix(".weight"))
            .map(String::from)
            .collect();
        let mut layers = HashMap::new();
        for path in paths {
            let name = |part: &str| format!("{CHECKPOINT_PREFIX}{path}.{part}");
            if let Some(weight) = t.remove(&name("weight")) {
                let bias = t.remove(&name("bias"));
                layers.insert(path, Tuned { weight, bias });
            }
        }
        Ok((!layers.is_empty()).then_some(Self {
            layers,
            hold_first_token: true,
        }))
    }

    /// Writes the layers as diffusers' `save_attn_procs` does for Custom Diffusion
    /// (`to_out.0` as `to_out_custom_diffusion.0`), with an empty entry for every other
    /// attention processor of `processors` (its loader sets all of a U-Net's processors at
    /// once).
    pub fn save_custom_diffusion(&self, file: &Path, processors: &[String]) -> Result<()> {
        let mut out = HashMap::new();
        let mut tuned = std::collections::HashSet::new();
        for (path, layer) in &self.layers {
            let (attn, proj) = path.split_once(".to_").ok_or_else(|| {
                Error::internal(format!("tuned layer {path:?} is not a projection"))
            })?;
            let proj = match proj {
                "out.0" => "to_out_custom_diffusion.0".to_string(),
                p => format!("to_{p}_custom_diffusion"),
            };
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.contiguous();
            out.insert(
                format!("{attn}.processor.{proj}.weight"),
                cpu(&layer.weight)?,
            );
            if let Some(b) = &layer.bias {
                out.insert(format!("{attn}.processor.{proj}.bias"), cpu(b)?);
            }
            tuned.insert(format!("{attn}.processor"));
        }
        for p in processors.iter().filter(|p| !tuned.contains(*p)) {
            out.insert(p.clone(), Tensor::zeros(0, DType::F32, &Device::Cpu)?);
        }
        tensors::write(file, &out, None)
    }
}

/// Writes `out/unet/` as a diffusers U-Net folder: the base U-Net of `base` (its config
/// and every tensor, in the base's dtype) with the tuned layers' weights in place of the
/// base's. The result loads with `UNet2DConditionModel.from_pretrained(out,
/// subfolder="unet")`, alone or in place of a pipeline's U-Net.
pub fn export_unet(
    base: &super::loader::StableDiffusion,
    tuned: &TunedSet,
    out: &Path,
) -> Result<PathBuf> {
    let dir = out.join("unet");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(crate::error::IoOp::CreateDir, &dir, e))?;
    let (mut merged, config) = base.base_unet()?;
    for (path, layer) in &tuned.layers {
        let parts = [
            ("weight", Some(&layer.weight)),
            ("bias", layer.bias.as_ref()),
        ];
        for (part, t) in parts {
            let Some(t) = t else { continue };
            let key = format!("{path}.{part}");
            let dtype = (merged.get(&key))
                .ok_or_else(|| Error::internal(format!("the base U-Net has no {key}")))?
                .dtype();
            merged.insert(
                key,
                t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?,
            );
        }
    }
    tensors::write(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &merged,
        None,
    )?;
    crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
    Ok(dir)
}

/// `...attn2.processor.to_k_custom_diffusion.weight` -> (`...attn2.to_k`, false);
/// `...attn2.processor.to_out_custom_diffusion.0.bias` -> (`...attn2.to_out.0`, true).
fn custom_diffusion_path(key: &str) -> Option<(String, bool)> {
    let (attn, rest) = key.split_once(".processor.")?;
    let (proj, part) = rest.rsplit_once('.')?;
    let is_bias = match part {
        "weight" => false,
        "bias" => true,
        _ => return None,
    };
    let proj = match proj {
        "to_q_custom_diffusion" => "to_q",
        "to_k_custom_diffusion" => "to_k",
        "to_v_custom_diffusion" => "to_v",
        "to_out_custom_diffusion.0" => "to_out.0",
        _ => return None,
    };
    Some((format!("{attn}.{proj}"), is_bias))
}

/// One tuned layer's trainable tensors.
pub struct TunedModule {
    /// The layer's diffusers module path.
    pub path: String,
    pub weight: Var,
    pub bias: Option<Var>,
}

/// Tuned layers as trainable `Var`s, each starting as a copy of its base weight and bias
/// (in `dtype`: f32 for training, whatever the model's), so training starts from the base
/// model's output.
pub struct TrainableTuned {
    /// In the U-Net's layer order, so checkpoints and exports are deterministic.
    pub modules: Vec<TunedModule>,
    pub hold_first_token: bool,
}

impl TrainableTuned {
    /// `bases`: each tuned layer's path, base weight and (where it is tuned) base bias.
    pub fn new(
        bases: Vec<(String, Tensor, Option<Tensor>)>,
        hold_first_token: bool,
        dtype: DType,
    ) -> Result<Self> {
        let var =
            |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(dtype)?.copy()?)?) };
        let modules = (bases.into_iter())
            .map(|(path, w, b)| {
                Ok(TunedModule {
                    path,
                    weight: var(&w)?,
                    bias: b.as_ref().map(var).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            modules,
            hold_first_token,
        })
    }

    /// No tuned layers, for a method that tunes none.
    pub fn none() -> Self {
        Self {
            modules: Vec::new(),
            hold_first_token: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The set a forward pass reads; it tracks gradients to the Vars.
    pub fn as_set(&self) -> TunedSet {
        self.set_with(|v| v.as_tensor().clone())
    }

    /// The current weights without the Vars (sampling during training).
    pub fn detached(&self) -> TunedSet {
        self.set_with(|v| v.as_tensor().detach())
    }

    fn set_with(&self, f: impl Fn(&Var) -> Tensor) -> TunedSet {
        let layers = (self.modules.iter())
            .map(|m| {
                let tuned = Tuned {
                    weight: f(&m.weight),
                    bias: m.bias.as_ref().map(&f),
                };
                (m.path.clone(), tuned)
            })
            .collect();
        TunedSet {
            layers,
            hold_first_token: self.hold_first_token,
        }
    }

    /// Every trainable tensor with its checkpoint name.
    pub fn named(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for m in &self.modules {
            out.push((
                format!("{CHECKPOINT_PREFIX}{}.weight", m.path),
                m.weight.clone(),
            ));
            if let Some(b) = &m.bias {
                out.push((format!("{CHECKPOINT_PREFIX}{}.bias", m.path), b.clone()));
            }
        }
        out
    }

    pub fn vars(&self) -> Vec<Var> {
        self.named().into_iter().map(|(_, v)| v).collect()
    }
}

/// The attention processors of a U-Net as diffusers names them (`<attn>.processor`), from
/// its adaptable layers' paths, in order.
pub fn processor_names(targets: &[LoraTarget]) -> Vec<String> {
    let names: BTreeMap<String, ()> = (targets.iter())
        .filter_map(|t| t.path.strip_suffix(".to_q"))
        .map(|attn| (format!("{attn}.processor"), ()))
        .collect();
    names.into_keys().collect()
}
