//! DINOv2 for scoring (`facebook/dinov2-small`, transformers layout): the CLS token after
//! the final layernorm, L2-normalised.
//!
//! Written here rather than taken from `candle_transformers::models::dinov2`, which reads
//! the original torch-hub layout and would give other numbers than transformers: it
//! resizes the position embeddings by nearest neighbour (transformers: bicubic), uses the
//! tanh GELU (transformers: exact), hard-codes eps 1e-5 (the checkpoint: 1e-6), and needs an
//! ImageNet head the hub checkpoint does not have.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::hub::Wanted;
use super::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::model::config::read_json;

pub const DEFAULT_MODEL: &str = "facebook/dinov2-small";

pub const WANTED: Wanted = Wanted {
    what: "DINOv2",
    flag: "--dino-model",
    required: &[],
    optional: &["preprocessor_config.json"],
};

/// transformers' `Dinov2Config` (defaults as there).
#[derive(Deserialize)]
struct DinoFile {
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default = "d_ratio")]
    mlp_ratio: f64,
    #[serde(default = "d_patch")]
    patch_size: usize,
    #[serde(default = "d_channels")]
    num_channels: usize,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default)]
    use_swiglu_ffn: bool,
    #[serde(default = "d_true")]
    qkv_bias: bool,
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_ratio() -> f64 {
    4.0
}
fn d_patch() -> usize {
    14
}
fn d_channels() -> usize {
    3
}
fn d_eps() -> f64 {
    1e-6
}
fn d_act() -> String {
    "gelu".into()
}
fn d_true() -> bool {
    true
}

struct Layer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    scale2: Tensor,
    heads: usize,
}

impl Layer {
    fn load(vb: VarBuilder, c: &DinoFile) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let inner = (h as f64 * c.mlp_ratio) as usize;
        let att = vb.pp("attention");
        let lin = |name: &str| -> candle_core::Result<Linear> {
            if c.qkv_bias {
                candle_nn::linear(h, h, att.pp("attention").pp(name))
            } else {
                candle_nn::linear_no_bias(h, h, att.pp("attention").pp(name))
            }
        };
        Ok(Self {
            norm1: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("norm1"))?,
            query: lin("query")?,
            key: lin("key")?,
            value: lin("value")?,
            out: candle_nn::linear(h, h, att.pp("output").pp("dense"))?,
            scale1: vb.pp("layer_scale1").get(h, "lambda1")?,
            norm2: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("norm2"))?,
            fc1: candle_nn::linear(h, inner, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(inner, h, vb.pp("mlp").pp("fc2"))?,
            scale2: vb.pp("layer_scale2").get(h, "lambda1")?,
            heads: c.num_attention_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        self.out.forward(&o)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.attention(&self.norm1.forward(x)?)?;
        let x = (x + a.broadcast_mul(&self.scale1)?)?;
        let m = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        let m = self.fc2.forward(&m)?;
        x + m.broadcast_mul(&self.scale2)?
    }
}

pub struct Dino {
    patch: candle_nn::Conv2d,
    cls: Tensor,
    /// `[1, 1 + g*g, hidden]`, already resized to the crop's `g x g` patch grid.
    positions: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    pub preprocess: Preprocess,
    pub device: Device,
}

impl Dino {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let c: DinoFile = read_json(&cfg_path)?;
        if c.use_swiglu_ffn || c.hidden_act != "gelu" || c.num_attention_heads == 0 {
            return Err(Error::unsupported(
                &cfg_path,
                format!(
                    "a DINOv2 with use_swiglu_ffn {} and hidden_act {:?} (supported: the ViT-S/B/L \
                     checkpoints: an MLP with exact GELU)",
                    c.use_swiglu_ffn, c.hidden_act
                ),
            ));
        }
        if c.patch_size == 0 {
            return Err(Error::BadConfig {
                path: cfg_path,
                msg: "patch_size is 0".into(),
            });
        }
        let fallback = Preprocess {
            shortest_edge: 256,
            crop: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let preprocess = Preprocess::read(dir, fallback)?;
        let file = dir.join("model.safetensors");
        crate::io::tensors::check(&file)?;
        // SAFETY: read-only memory map of a file nothing writes while we run.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }?;
        let grid = preprocess.crop as usize / c.patch_size;
        Self::build(vb, &c, grid, preprocess, device).map_err(|e| {
            Error::mismatch(
                &file,
                format!(
                    "the DINOv2 weights in {} do not fit its config.json ({}).",
                    file.display(),
                    crate::error::brief(&e)
                ),
            )
        })
    }

    fn build(
        vb: VarBuilder,
        c: &DinoFile,
        grid: usize,
        preprocess: Preprocess,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        // Both layouts exist: the hub's (`dinov2.` prefix only in classifier checkpoints).
        let vb = if vb.contains_tensor("dinov2.embeddings.cls_token") {
            vb.pp("dinov2")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let conv = candle_nn::Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        let patch = candle_nn::conv2d(
            c.num_channels,
            h,
            c.patch_size,
            conv,
            emb.pp("patch_embeddings").pp("projection"),
        )?;
        let cls = emb.get((1, 1, h), "cls_token")?;
        let table = emb.get_unchecked("position_embeddings")?;
        let positions = resize_positions(&table, grid)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder").pp("layer").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layernorm"))?;
        Ok(Self {
            patch,
            cls,
            positions,
            layers,
            norm,
            preprocess,
            device: device.clone(),
        })
    }

    /// `[b, 3, s, s]` preprocessed pictures -> `[b, hidden]` CLS features, unit length.
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        super::clip::unit(&self.cls_token(pixels)?)
    }

    /// The raw CLS token after the final layernorm (transformers' `pooler_output`).
    pub fn cls_token(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let x = self
            .patch
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls.broadcast_as((b, 1, self.cls.dim(2)?))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        if x.dim(1)? != self.positions.dim(1)? {
            return Err(Error::internal(format!(
                "DINOv2 input {:?} does not give the {} tokens its position table was resized for",
                pixels.dims(),
                self.positions.dim(1)?
            )));
        }
        x = x.broadcast_add(&self.positions)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(self.norm.forward(&x)?.i((.., 0, ..))?)
    }
}

/// The `[1, 1 + n*n, d]` position table resized to a `grid x grid` patch grid as
/// transformers does (`F.interpolate(..., mode="bicubic", align_corners=False)`); the CLS
/// row is kept.
fn resize_positions(table: &Tensor, grid: usize) -> candle_core::Result<Tensor> {
    let (_, rows, d) = table.dims3()?;
    if rows < 2 {
        candle_core::bail!("{rows} position rows: no patch positions");
    }
    let n = ((rows - 1) as f64).sqrt().round() as usize;
    if n * n != rows - 1 {
        candle_core::bail!("{} position rows are not 1 + a square", rows);
    }
    if n == grid {
        return Ok(table.clone());
    }
    let cls = table.i((.., ..1, ..))?;
    let patches = table.i((0, 1.., ..))?.reshape((n, n * d))?;
    let w = Tensor::from_vec(bicubic_matrix(n, grid), (grid, n), table.device())?;
    // Rows first: [grid, n * d] = [grid_y, n_x, d]; then columns the same way.
    let rows_done = w.matmul(&patches)?.reshape((grid, n, d))?;
    let cols_first = rows_done.transpose(0, 1)?.reshape((n, grid * d))?;
    let both = w
        .matmul(&cols_first)?
        .reshape((grid, grid, d))?
        .transpose(0, 1)?;
    let patches = both.reshape((1, grid * grid, d))?;
    Tensor::cat(&[&cls, &patches], 1)?.contiguous()
}

/// `[out, in]` weights of torch's 1-D bicubic resize (a = -0.75, align_corners=False,
/// borders clamped).
fn bicubic_matrix(input: usize, out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = input as f64 / out as f64;
    let mut m = vec![0f32; out * input];
    for i in 0..out {
        let src = scale * (i as f64 + 0.5) - 0.5;
        let base = src.floor();
        let t = src - base;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in weights.iter().enumerate() {
            let j = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[i * input + j] += *wk as f32;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_rows_sum_to_one_and_identity_at_same_size() {
        for (i, o) in [(4, 7), (37, 16), (5, 5)] {
            let m = bicubic_matrix(i, o);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{i}->{o} row {r}: {s}");
            }
        }
        let m = bicubic_matrix(5, 5);
        for r in 0..5 {
            assert!((m[r * 5 + r] - 1.0).abs() < 1e-6);
        }
    }
}
