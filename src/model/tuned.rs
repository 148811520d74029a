//! Full-matrix weights that replace a U-Net linear layer's base weight, for methods that
//! fine-tune whole matrices (Custom Diffusion's `to_k`/`to_v` of every cross-attention),
//! and their file in the layout diffusers' `load_attn_procs` reads.
//!
//! A tuned layer multiplies by its own weight with candle's matmul, whose backward gives
//! the weight gradient that the frozen ops (`ops::frozen_linear`) leave out by design.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::lora::LoraTarget;
use crate::error::{Error, Result};
use crate::io::tensors;

/// A tuned layer's name in a training checkpoint: this, then its module path.
pub const CHECKPOINT_PREFIX: &str = "tuned.";

/// The weights a forward pass uses in place of the base's, by diffusers module path.
#[derive(Debug, Clone, Default)]
pub struct TunedSet {
    weights: HashMap<String, Tensor>,
    /// Cross-attention keys and values of the first (start-of-text) token pass no
    /// gradient back (Custom Diffusion's processor detaches them).
    pub hold_first_token: bool,
}

impl TunedSet {
    pub fn get(&self, path: &str) -> Option<&Tensor> {
        self.weights.get(path)
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Reads a Custom Diffusion file (ours, or diffusers' `save_attn_procs`): every
    /// `<attn>.processor.to_{k,v}_custom_diffusion.weight` must name a layer of `targets`
    /// with its shape. A processor that tunes q and out too is refused, not dropped.
    pub fn load_custom_diffusion(
        file: &Path,
        targets: &[LoraTarget],
        device: &Device,
    ) -> Result<Self> {
        let by_path: HashMap<&str, &LoraTarget> =
            targets.iter().map(|t| (t.path.as_str(), t)).collect();
        let mut weights = HashMap::new();
        for (key, t) in tensors::read_floats(file, device, &[])? {
            if t.elem_count() == 0 {
                continue; // an untuned processor's empty entry
            }
            let path = custom_diffusion_path(&key).ok_or_else(|| {
                Error::unsupported(
                    file,
                    format!(
                        "key {key:?}: magictailor applies Custom Diffusion's key and value \
                         matrices (`to_k_custom_diffusion`, `to_v_custom_diffusion`), not tuned \
                         queries or outputs"
                    ),
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
            if t.dims() != [target.out_dim, target.in_dim] {
                return Err(Error::mismatch(
                    file,
                    format!(
                        "{}: {key:?} is {:?} but the layer is {}x{} (another base model?).",
                        file.display(),
                        t.dims(),
                        target.out_dim,
                        target.in_dim
                    ),
                ));
            }
            weights.insert(path, t.to_dtype(DType::F32)?);
        }
        if weights.is_empty() {
            return Err(Error::bad_file(
                file,
                format!("{} holds no Custom Diffusion weights.", file.display()),
            ));
        }
        Ok(Self {
            weights,
            hold_first_token: true,
        })
    }

    /// The tuned weights a training checkpoint holds (`tuned.<path>`), taken out of `t`;
    /// None where the run tuned none.
    pub fn from_checkpoint(t: &mut HashMap<String, Tensor>) -> Result<Option<Self>> {
        let keys: Vec<String> = (t.keys())
            .filter(|k| k.starts_with(CHECKPOINT_PREFIX))
            .cloned()
            .collect();
        let mut weights = HashMap::new();
        for k in keys {
            if let Some(w) = t.remove(&k) {
                weights.insert(k[CHECKPOINT_PREFIX.len()..].to_string(), w);
            }
        }
        Ok((!weights.is_empty()).then_some(Self {
            weights,
            hold_first_token: true,
        }))
    }

    /// Writes the weights as diffusers' `save_attn_procs` does for Custom Diffusion, with an
    /// empty entry for every other attention processor of `processors` (its loader sets
    /// all of a U-Net's processors at once).
    pub fn save_custom_diffusion(&self, file: &Path, processors: &[String]) -> Result<()> {
        let mut out = HashMap::new();
        let mut tuned = std::collections::HashSet::new();
        for (path, w) in &self.weights {
            let (attn, proj) = path
                .rsplit_once('.')
                .ok_or_else(|| Error::internal(format!("tuned layer {path:?} has no parent")))?;
            let key = format!("{attn}.processor.{proj}_custom_diffusion.weight");
            out.insert(key, w.to_device(&Device::Cpu)?.contiguous()?);
            tuned.insert(format!("{attn}.processor"));
        }
        for p in processors.iter().filter(|p| !tuned.contains(*p)) {
            out.insert(p.clone(), Tensor::zeros(0, DType::F32, &Device::Cpu)?);
        }
        tensors::write(file, &out, None)
    }
}

/// `down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight`
/// -> `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`.
fn custom_diffusion_path(key: &str) -> Option<String> {
    let (attn, rest) = key.split_once(".processor.")?;
    let proj = match rest {
        "to_k_custom_diffusion.weight" => "to_k",
        "to_v_custom_diffusion.weight" => "to_v",
        _ => return None,
    };
    Some(format!("{attn}.{proj}"))
}

/// Tuned weights as trainable `Var`s, each starting as a copy of its base weight (in
/// `dtype`: f32 for training, whatever the model's), so training starts from the base
/// model's output.
pub struct TrainableTuned {
    /// In the U-Net's layer order, so checkpoints and exports are deterministic.
    pub modules: Vec<(String, Var)>,
    pub hold_first_token: bool,
}

impl TrainableTuned {
    /// `bases`: each tuned layer's path and base weight.
    pub fn new(bases: Vec<(String, Tensor)>, hold_first_token: bool, dtype: DType) -> Result<Self> {
        let modules = (bases.into_iter())
            .map(|(path, w)| Ok((path, Var::from_tensor(&w.to_dtype(dtype)?.copy()?)?)))
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
        TunedSet {
            weights: self.modules.iter().map(|(p, v)| (p.clone(), f(v))).collect(),
            hold_first_token: self.hold_first_token,
        }
    }

    pub fn vars(&self) -> Vec<Var> {
        self.modules.iter().map(|(_, v)| v.clone()).collect()
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
