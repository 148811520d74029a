//! Pseudo-word embeddings on disk.
//!
//! `learned_embeds.safetensors` maps each token string to its vector (`[hidden]`), the
//! layout diffusers' textual-inversion training writes. A1111/ComfyUI read one embedding
//! per file (`emb_params: [1, hidden]`, named by the file); `save_a1111` writes those.
//! SDXL's (diffusers' and A1111's) hold a row per text encoder, `clip_l` and `clip_g`, one
//! word per file, named by the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::tensors;
use crate::error::{Error, Result};

/// Token string and vector, in the order the tokens are added (sorted by name).
pub type Embeds = Vec<(String, Tensor)>;

pub fn load(file: &Path, hidden: usize, device: &Device) -> Result<Embeds> {
    let tensors = tensors::read_floats(file, device, &[])?;
    let mut out = Vec::new();
    for (key, t) in tensors {
        // A1111 files hold one embedding under a fixed key; its token is the file stem.
        let token = if key == "emb_params" || key == "*" {
            token_of(file)
        } else {
            key
        };
        let v = t.to_dtype(DType::F32)?.flatten_all()?;
        if v.dim(0)? != hidden {
            return Err(Error::mismatch(
                file,
                format!(
                    "{}: the embedding of {token:?} has {} values but this text encoder is {hidden} \
                     wide (embeddings from another base model?). Multi-vector embeddings are not \
                     supported.",
                    file.display(),
                    v.dim(0)?
                ),
            ));
        }
        out.push((token, v));
    }
    if out.is_empty() {
        return Err(Error::bad_file(
            file,
            format!("{} holds no embeddings.", file.display()),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The word an A1111 file stands for: its name (`v0.safetensors` -> `<v0>`).
fn token_of(file: &Path) -> String {
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
    format!("<{}>", stem.unwrap_or_default())
}

/// An SDXL embedding: its word (named by the file) and its rows for the first (`clip_l`,
/// `hidden` wide) and second (`clip_g`, `hidden_2`) text encoders.
pub fn load_sdxl(
    file: &Path,
    (hidden, hidden_2): (usize, usize),
    device: &Device,
) -> Result<(String, Tensor, Tensor)> {
    let mut t = tensors::read_floats(file, device, &[])?;
    let (Some(l), Some(g)) = (t.remove("clip_l"), t.remove("clip_g")) else {
        let mut keys: Vec<String> = t.keys().cloned().collect();
        keys.sort();
        return Err(Error::mismatch(
            file,
            format!(
                "{}: an SDXL model takes embeddings with a row per text encoder (tensors clip_l \
                 and clip_g, as diffusers and A1111 write them), or diffusers' pair of files \
                 (learned_embeds.safetensors with learned_embeds_2.safetensors beside it); this \
                 file holds {keys:?}, with no second file of its pair beside it (an embedding \
                 for SD 1.x or 2.x?).",
                file.display()
            ),
        ));
    };
    let row = |t: Tensor, width: usize, name: &str| -> Result<Tensor> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?;
        if v.dim(0)? != width {
            return Err(Error::mismatch(
                file,
                format!(
                    "{}: {name} has {} values but its text encoder is {width} wide (another base \
                     model?). Multi-vector embeddings are not supported.",
                    file.display(),
                    v.dim(0)?
                ),
            ));
        }
        Ok(v)
    };
    let (l, g) = (row(l, hidden, "clip_l")?, row(g, hidden_2, "clip_g")?);
    Ok((token_of(file), l, g))
}

pub fn save(file: &Path, embeds: &Embeds) -> Result<()> {
    let map: HashMap<String, Tensor> = embeds.iter().cloned().collect();
    tensors::write(file, &map, None)
}

/// SDXL: one `<dir>/<name>.safetensors` per token holding its row in each text encoder,
/// `clip_l: [1, hidden]` and `clip_g: [1, hidden_2]`, as A1111, ComfyUI and diffusers
/// read SDXL embeddings ([`load_sdxl`] reads them back).
pub fn save_a1111_sdxl(dir: &Path, embeds: &Embeds, embeds_2: &Embeds) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for ((token, l), (_, g)) in embeds.iter().zip(embeds_2) {
        let file = dir.join(format!("{}.safetensors", file_stem(token)));
        let map = HashMap::from([
            ("clip_l".to_string(), l.unsqueeze(0)?),
            ("clip_g".to_string(), g.unsqueeze(0)?),
        ]);
        tensors::write(&file, &map, None)?;
        files.push(file);
    }
    Ok(files)
}

/// The file name of a token's embedding: `<v0>` -> `v0`.
fn file_stem(token: &str) -> String {
    token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// One `<dir>/<name>.safetensors` per token (`<v0>` -> `v0.safetensors`) for A1111/ComfyUI.
pub fn save_a1111(dir: &Path, embeds: &Embeds) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (token, v) in embeds {
        let file = dir.join(format!("{}.safetensors", file_stem(token)));
        let mut map = HashMap::new();
        map.insert("emb_params".to_string(), v.unsqueeze(0)?);
        tensors::write(&file, &map, None)?;
        files.push(file);
    }
    Ok(files)
}
