//! Single-file checkpoints, as A1111 and ComfyUI keep Stable Diffusion: one safetensors
//! file under the original names (`model.diffusion_model.*` the U-Net,
//! `first_stage_model.*` the VAE, `cond_stage_model.*` the text encoder). The file is read
//! in place, never converted to a copy: each weight the diffusers-layout model asks for is
//! looked up under its original name and reshaped as it loads (the VAE's 1x1-conv
//! attention weights squeezed, a third of OpenCLIP's fused `in_proj` for each of q, k, v).
//!
//! The weights do not say how big the blocks are meant to be grouped, which scheduler
//! trained them or how text is tokenized: those come from bundled copies of the family's
//! diffusers configs (the tokenizer from the family's hub repo), or from `--model-config`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::io::tensors::{not_found, shaped, FileTensors};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP: &str = "cond_stage_model.transformer.";
const OPEN_CLIP: &str = "cond_stage_model.model.";
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// The model families a single file can hold that magictailor loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// CLIP ViT-L text encoder (`cond_stage_model.transformer.*`).
    Sd1,
    /// OpenCLIP ViT-H text encoder (`cond_stage_model.model.*`, fused attention).
    Sd2,
    /// CLIP ViT-L and OpenCLIP ViT-bigG (`conditioner.embedders.{0,1}.*`).
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }

    /// The diffusers repo whose tokenizer files stand in for the file's (CLIP's vocabulary;
    /// SD 2.x pads with "!").
    pub fn tokenizer_repo(self) -> &'static str {
        match self {
            Family::Sd1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Family::Sd2 => "stabilityai/stable-diffusion-2-1-base",
            Family::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        }
    }

    /// Bundled copies of the family's diffusers configs: `{"unet": {...}, "vae": ...,
    /// "text_encoder": ..., "scheduler": ...}`.
    pub fn bundled_configs(self) -> &'static str {
        match self {
            Family::Sd1 => include_str!("single_file/sd1.json"),
            Family::Sd2 => include_str!("single_file/sd2.json"),
            Family::Sdxl => include_str!("single_file/sdxl.json"),
        }
    }

    /// What the weights say: by the text encoder's names, as diffusers tells them apart.
    fn detect(file: &Path, keys: &[&str]) -> Result<Self> {
        let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
        let refuse = |what: &str| Err(Error::unsupported(file, what.to_string()));
        if has("conditioner.embedders.") && !(has(XL_CLIP) && has(XL_OPEN_CLIP)) {
            return refuse(
                "an SDXL-family checkpoint without both of SDXL base's text encoders (a refiner?): \
                 only base models are supported",
            );
        }
        if !has(UNET) {
            let lora = keys.iter().any(|k| k.contains("lora_"));
            let what = if lora {
                "a LoRA, not a base model: pass it to `infer --lora`, with the base it was trained on as --model"
            } else {
                "not a Stable Diffusion checkpoint: it has no U-Net weights (`model.diffusion_model.*`)"
            };
            return refuse(what);
        }
        if has(XL_OPEN_CLIP) {
            Ok(Family::Sdxl)
        } else if has(OPEN_CLIP) {
            Ok(Family::Sd2)
        } else if has(CLIP) {
            Ok(Family::Sd1)
        } else {
            refuse("a checkpoint without a text encoder (no `cond_stage_model.*` weights)")
        }
    }
}

/// How a weight the model asks for is cut from the file's tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Whole,
    /// A 1x1 convolution's `[o, i, 1, 1]` read as a linear `[o, i]`.
    Squeeze,
    /// Row block `i` of 3 (OpenCLIP's q, k, v fused into `in_proj`).
    Third(usize),
    /// Stored `[in, out]` (OpenCLIP's `text_projection`), read as a linear's `[out, in]`.
    Transpose,
}

/// A single-file checkpoint, opened (its header read) and its family known.
pub struct Checkpoint {
    pub file: PathBuf,
    pub family: Family,
    st: Arc<FileTensors>,
    keys: Vec<String>,
}

/// The three weight-carrying components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Checkpoint {
    /// Opens `file` and tells its family; refuses what it is not (SDXL, a LoRA, a file
    /// with no U-Net or no text encoder, an inpainting model).
    pub fn open(file: &Path) -> Result<Self> {
        let (st, keys, family) = opened(file)?;
        let conv_in = format!("{UNET}input_blocks.0.0.weight");
        if let Some(shape) = st.shape(&conv_in) {
            let channels = shape.get(1).copied().unwrap_or(0);
            if channels != 4 {
                return Err(Error::unsupported(
                    file,
                    format!("a U-Net with {channels} input channels (inpainting or another task; only text-to-image with 4 is supported)"),
                ));
            }
        }
        Ok(Self {
            file: file.to_path_buf(),
            family,
            st: Arc::new(st),
            keys,
        })
    }

    /// The family of `file` from its header alone (no tensor is read).
    pub fn family_of(file: &Path) -> Result<Family> {
        opened(file).map(|(_, _, family)| family)
    }

    /// `component`'s weights under diffusers' names. `levels` tells the original block
    /// numbering apart: the U-Net's `layers_per_block`, the VAE's number of levels.
    pub fn weights(
        &self,
        component: Component,
        levels: usize,
        device: &Device,
        dtype: DType,
    ) -> VarBuilder<'static> {
        let mut map = HashMap::new();
        for key in &self.keys {
            for (name, part) in diffusers_names(component, self.family, key, levels) {
                map.insert(name, (key.clone(), part));
            }
        }
        let backend = Renamed {
            st: self.st.clone(),
            map,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Every tensor of `component` under its diffusers name, as stored (for writing a
    /// diffusers folder from the file: `--export-full`).
    pub fn tensors(&self, component: Component, levels: usize) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for key in &self.keys {
            for (name, part) in diffusers_names(component, self.family, key, levels) {
                let t = cut(self.st.load(key, &Device::Cpu)?, part)?;
                out.insert(name, t.contiguous()?);
            }
        }
        Ok(out)
    }
}

/// `file` opened for reading tensor by tensor, its tensor names and its family.
fn opened(file: &Path) -> Result<(FileTensors, Vec<String>, Family)> {
    let st = FileTensors::open(&[file.to_path_buf()])?;
    let keys = st.names();
    let family = Family::detect(file, &keys.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok((st, keys, family))
}

/// A component's view of the file under diffusers' names.
struct Renamed {
    st: Arc<FileTensors>,
    map: HashMap<String, (String, Part)>,
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        let key = &self.map[name].0;
        shaped(t, s, || format!("{name} (the file's {key})"))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (key, part) = self.map.get(name).ok_or_else(|| not_found(name))?;
        cut(self.st.load(key, dev)?, *part)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

fn cut(t: Tensor, part: Part) -> candle_core::Result<Tensor> {
    match part {
        Part::Whole => Ok(t),
        Part::Squeeze if t.rank() == 4 => t.squeeze(3)?.squeeze(2),
        Part::Squeeze => Ok(t),
        Part::Third(i) => {
            let n = t.dim(0)? / 3;
            t.narrow(0, i * n, n)
        }
        Part::Transpose => t.t()?.contiguous(),
    }
}

/// The diffusers names (usually one) a file key stands for in `component`; none when
/// the key belongs elsewhere or to nothing loaded (EMA copies, schedule buffers,
/// OpenCLIP's projection and its unused last layer).
fn diffusers_names(
    component: Component,
    family: Family,
    key: &str,
    levels: usize,
) -> Vec<(String, Part)> {
    let whole = |n: Option<String>| n.map(|n| vec![(n, Part::Whole)]).unwrap_or_default();
    // Older transformers saved CLIP without the `text_model.` wrapper.
    let unwrapped = |k: &str| k.strip_prefix("text_model.").unwrap_or(k).to_string();
    match component {
        Component::Unet => whole(key.strip_prefix(UNET).and_then(|k| unet_name(k, levels))),
        Component::Vae => key
            .strip_prefix(VAE)
            .and_then(|k| vae_name(k, levels))
            .into_iter()
            .collect(),
        Component::TextEncoder => match family {
            Family::Sd1 => whole(key.strip_prefix(CLIP).map(unwrapped)),
            Family::Sd2 => key
                .strip_prefix(OPEN_CLIP)
                .map(open_clip_names)
                .unwrap_or_default(),
            Family::Sdxl => whole(key.strip_prefix(XL_CLIP).map(unwrapped)),
        },
        Component::TextEncoder2 => match key.strip_prefix(XL_OPEN_CLIP) {
            Some("text_projection") => vec![("text_projection.weight".into(), Part::Transpose)],
            Some(k) if family == Family::Sdxl => open_clip_names(k),
            _ => vec![],
        },
    }
}

/// The first `n` dot-separated fields of `key` and the rest.
fn fields(key: &str, n: usize) -> Option<(Vec<&str>, &str)> {
    let mut parts = key.splitn(n + 1, '.');
    let head: Vec<&str> = parts.by_ref().take(n).collect();
    let rest = parts.next()?;
    (head.len() == n).then_some((head, rest))
}

/// A U-Net resnet's original sub-names -> diffusers'.
fn resnet(rest: &str) -> String {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (old, new) in RENAMES {
        if let Some(tail) = rest.strip_prefix(old) {
            return format!("{new}{tail}");
        }
    }
    rest.to_string()
}

/// A diffusers path inside one of the U-Net's transformers (`down_blocks.1.attentions.0.
/// proj_in`) in the original layout (`input_blocks.4.1.proj_in`): the names kohya's SDXL
/// LoRA files use. The inverse of [`unet_name`] there; None elsewhere.
pub fn original_transformer_path(path: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    if let Some(rest) = path.strip_prefix("mid_block.attentions.0.") {
        return Some(format!("middle_block.1.{rest}"));
    }
    let (head, rest) = fields(path, 4)?;
    let (level, j): (usize, usize) = (head[1].parse().ok()?, head[3].parse().ok()?);
    match (head[0], head[2]) {
        ("down_blocks", "attentions") => {
            Some(format!("input_blocks.{}.1.{rest}", 1 + level * per + j))
        }
        ("up_blocks", "attentions") => Some(format!("output_blocks.{}.1.{rest}", level * per + j)),
        _ => None,
    }
}

/// `key` (without `model.diffusion_model.`) in diffusers' U-Net naming. The original
/// numbers the encoder's and decoder's modules in one sequence each: per level,
/// `layers_per_block` resnets (with their transformers) and then the resampler (the
/// decoder: one more resnet, the upsampler in the last).
fn unet_name(key: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    let (head, rest) = fields(key, 2)?;
    match (head[0], head[1]) {
        ("time_embed", "0") => return Some(format!("time_embedding.linear_1.{rest}")),
        ("time_embed", "2") => return Some(format!("time_embedding.linear_2.{rest}")),
        // SDXL's added conditioning MLP.
        ("label_emb", "0") => {
            let (layer, tail) = rest.split_once('.')?;
            let linear = match layer {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            return Some(format!("add_embedding.{linear}.{tail}"));
        }
        ("out", "0") => return Some(format!("conv_norm_out.{rest}")),
        ("out", "2") => return Some(format!("conv_out.{rest}")),
        ("middle_block", m) => {
            return match m {
                "0" => Some(format!("mid_block.resnets.0.{}", resnet(rest))),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                "2" => Some(format!("mid_block.resnets.1.{}", resnet(rest))),
                _ => None,
            }
        }
        _ => {}
    }
    let (head, rest) = fields(key, 3)?;
    let k: usize = head[1].parse().ok()?;
    let module = head[2];
    match head[0] {
        "input_blocks" if k == 0 => (module == "0").then(|| format!("conv_in.{rest}")),
        "input_blocks" => {
            let (level, j) = ((k - 1) / per, (k - 1) % per);
            let block = format!("down_blocks.{level}");
            match (module, rest.strip_prefix("op.")) {
                ("0", Some(op)) if j == per - 1 => {
                    Some(format!("{block}.downsamplers.0.conv.{op}"))
                }
                ("0", _) => Some(format!("{block}.resnets.{j}.{}", resnet(rest))),
                ("1", _) => Some(format!("{block}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        "output_blocks" => {
            let (level, j) = (k / per, k % per);
            let block = format!("up_blocks.{level}");
            match module {
                "0" => Some(format!("{block}.resnets.{j}.{}", resnet(rest))),
                // An upsampler is a bare `conv`; a transformer has norm, proj_in, ...
                "1" | "2" if rest.starts_with("conv.") => {
                    Some(format!("{block}.upsamplers.0.{rest}"))
                }
                "1" => Some(format!("{block}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `key` (without `first_stage_model.`) in diffusers' VAE naming; the decoder's levels
/// run in reverse order in the original.
fn vae_name(key: &str, levels: usize) -> Option<(String, Part)> {
    let whole = |n: String| Some((n, Part::Whole));
    let vae_resnet = |r: &str| r.replace("nin_shortcut.", "conv_shortcut.");
    let (coder, rest) = key.split_once('.')?;
    if !matches!(coder, "encoder" | "decoder") {
        return matches!(coder, "quant_conv" | "post_quant_conv")
            .then(|| (key.to_string(), Part::Whole));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return whole(key.to_string());
    }
    if let Some(tail) = rest.strip_prefix("norm_out.") {
        return whole(format!("{coder}.conv_norm_out.{tail}"));
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        if let Some(r) = mid.strip_prefix("block_1.") {
            return whole(format!("{coder}.mid_block.resnets.0.{}", vae_resnet(r)));
        }
        if let Some(r) = mid.strip_prefix("block_2.") {
            return whole(format!("{coder}.mid_block.resnets.1.{}", vae_resnet(r)));
        }
        let (name, tail) = mid.strip_prefix("attn_1.")?.split_once('.')?;
        let new = match name {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let part = if name != "norm" && tail == "weight" {
            Part::Squeeze
        } else {
            Part::Whole
        };
        return Some((format!("{coder}.mid_block.attentions.0.{new}.{tail}"), part));
    }
    let (head, tail) = fields(rest, 3)?;
    let i: usize = head[1].parse().ok()?;
    let level = match head[0] {
        "down" => i,
        "up" => levels.checked_sub(i + 1)?,
        _ => return None,
    };
    let blocks = if head[0] == "down" {
        "down_blocks"
    } else {
        "up_blocks"
    };
    match head[2] {
        "block" => {
            let (j, r) = tail.split_once('.')?;
            whole(format!(
                "{coder}.{blocks}.{level}.resnets.{j}.{}",
                vae_resnet(r)
            ))
        }
        "downsample" => whole(format!("{coder}.{blocks}.{level}.downsamplers.0.{tail}")),
        "upsample" => whole(format!("{coder}.{blocks}.{level}.upsamplers.0.{tail}")),
        _ => None,
    }
}

/// `key` (without `cond_stage_model.model.`) in transformers' CLIP text naming; the fused
/// `in_proj` stands for three.
fn open_clip_names(key: &str) -> Vec<(String, Part)> {
    let one = |n: String| vec![(n, Part::Whole)];
    match key {
        "token_embedding.weight" => return one("embeddings.token_embedding.weight".into()),
        "positional_embedding" => return one("embeddings.position_embedding.weight".into()),
        _ => {}
    }
    if let Some(tail) = key.strip_prefix("ln_final.") {
        return one(format!("final_layer_norm.{tail}"));
    }
    let Some((head, rest)) = key.strip_prefix("transformer.").and_then(|k| fields(k, 2)) else {
        return vec![];
    };
    if head[0] != "resblocks" {
        return vec![];
    }
    let layer = format!("encoder.layers.{}", head[1]);
    if let Some(what) = rest.strip_prefix("attn.in_proj_") {
        return ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("{layer}.self_attn.{p}_proj.{what}"), Part::Third(i)))
            .collect();
    }
    const RENAMES: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    RENAMES
        .iter()
        .find_map(|(old, new)| {
            rest.strip_prefix(old)
                .map(|t| one(format!("{layer}.{new}{t}")))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every transformer path of an SDXL-shaped U-Net (2 and 3 layers per block) goes to
    /// the original layout and back; other modules have no transformer path.
    #[test]
    fn transformer_paths_go_to_the_original_layout_and_back() {
        let paths = [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
            "up_blocks.0.attentions.2.proj_out",
            "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        ];
        for per in [2, 3] {
            for p in paths {
                let original = original_transformer_path(p, per).unwrap();
                assert_eq!(unet_name(&original, per).as_deref(), Some(p), "{original}");
            }
        }
        assert_eq!(
            original_transformer_path(paths[0], 2).as_deref(),
            Some("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            original_transformer_path("down_blocks.1.resnets.0.conv1", 2),
            None
        );
    }

    #[test]
    fn original_unet_names_map_to_diffusers_for_two_layers_per_block() {
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.11.0.in_layers.2.weight",
                "up_blocks.3.resnets.2.conv1.weight",
            ),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("out.0.bias", "conv_norm_out.bias"),
            ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
            // SDXL: the deepest level has attention, so its upsampler is module 2.
            (
                "output_blocks.2.2.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
        ];
        for (old, new) in cases {
            assert_eq!(unet_name(old, 2).as_deref(), Some(new), "{old}");
        }
        assert_eq!(unet_name("betas", 2), None);
    }

    #[test]
    fn original_vae_and_open_clip_names_map_to_diffusers() {
        let vae = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                Part::Whole,
            ),
            (
                "decoder.up.3.block.2.conv1.bias",
                "decoder.up_blocks.0.resnets.2.conv1.bias",
                Part::Whole,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                Part::Whole,
            ),
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
                Part::Squeeze,
            ),
            (
                "encoder.mid.attn_1.q.bias",
                "encoder.mid_block.attentions.0.to_q.bias",
                Part::Whole,
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
                Part::Squeeze,
            ),
            (
                "decoder.norm_out.weight",
                "decoder.conv_norm_out.weight",
                Part::Whole,
            ),
            ("quant_conv.bias", "quant_conv.bias", Part::Whole),
        ];
        for (old, new, part) in vae {
            assert_eq!(vae_name(old, 4), Some((new.to_string(), part)), "{old}");
        }
        let qkv = open_clip_names("transformer.resblocks.3.attn.in_proj_weight");
        let names: Vec<&str> = qkv.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "encoder.layers.3.self_attn.q_proj.weight",
                "encoder.layers.3.self_attn.k_proj.weight",
                "encoder.layers.3.self_attn.v_proj.weight"
            ]
        );
        assert_eq!(qkv[2].1, Part::Third(2));
        assert_eq!(
            open_clip_names("transformer.resblocks.0.mlp.c_proj.bias")[0].0,
            "encoder.layers.0.mlp.fc2.bias"
        );
        assert!(open_clip_names("text_projection").is_empty());
        let projection = diffusers_names(
            Component::TextEncoder2,
            Family::Sdxl,
            "conditioner.embedders.1.model.text_projection",
            0,
        );
        assert_eq!(
            projection,
            [("text_projection.weight".to_string(), Part::Transpose)]
        );
    }

    #[test]
    fn a_third_of_a_fused_projection_is_its_rows() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let k = cut(t, Part::Third(1)).unwrap();
        assert_eq!(k.to_vec2::<f32>().unwrap(), [[4., 5.], [6., 7.]]);
    }
}
