//! Layers written for training: frozen base weights go through `ops`, whose backward
//! returns only input gradients; everything else has a correct backward in candle 0.11
//! (no fused LayerNorm or `softmax_last_dim` without one; see docs/candle.md §1).
//!
//! A layer whose weight trains (a `Var`, or made from one: cast, reshaped; full
//! fine-tuning, `full.rs`) computes with differentiable ops instead, so its weight and
//! bias get gradients.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::lora::LoraSet;
use super::ops;
use super::probe::AttnProbe;
use super::tuned::TunedSet;

/// What a forward pass carries besides activations: which adapter set and tuned weights
/// are active and which cross-attention maps to record.
#[derive(Clone, Copy, Default)]
pub struct Ctx<'a> {
    pub lora: Option<&'a LoraSet>,
    /// Full weights in place of some layers' base weights (these layers take no adapter).
    pub tuned: Option<&'a TunedSet>,
    pub probe: Option<&'a AttnProbe>,
    /// SDXL's added conditioning, for U-Nets that take it.
    pub added: Option<&'a AddedCond>,
    /// ViCo's image cross-attention blocks and reference rows.
    pub vico: Option<&'a super::vico::Plug<'a>>,
    /// Layout-and-Retouch's attention swap and blend.
    pub swap: Option<&'a super::swap::Swap>,
}

/// SDXL's added conditioning: the second text encoder's pooled, projected output
/// `[b, pooled]` and the six numbers `[b, 6]` (original height and width, crop top and
/// left, target height and width).
#[derive(Debug, Clone)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl AddedCond {
    /// The pooled projections `[b, pooled]` with the sizes SDXL's pipeline gives by
    /// default: original = target = `(h, w)` pixels, no crop.
    pub fn uncropped(text_embeds: Tensor, (h, w): (usize, usize)) -> Result<Self> {
        let b = text_embeds.dim(0)?;
        let (h, w) = (h as f32, w as f32);
        let sizes = [h, w, 0.0, 0.0, h, w].repeat(b);
        let time_ids = Tensor::from_vec(sizes, (b, 6), text_embeds.device())?;
        Ok(Self {
            text_embeds,
            time_ids,
        })
    }

    /// The rows of `parts`, in order (one U-Net call for several conditionings).
    pub fn cat(parts: &[&AddedCond]) -> Result<Self> {
        let rows = |f: fn(&AddedCond) -> &Tensor| {
            Tensor::cat(&parts.iter().map(|p| f(p)).collect::<Vec<_>>(), 0)
        };
        Ok(Self {
            text_embeds: rows(|a| &a.text_embeds)?,
            time_ids: rows(|a| &a.time_ids)?,
        })
    }

    /// The same conditioning cut from the graph (for a forward that must not train).
    pub fn detach(&self) -> Self {
        Self {
            text_embeds: self.text_embeds.detach(),
            time_ids: self.time_ids.detach(),
        }
    }
}

/// Whether `w` trains: it is a `Var` or was computed from one.
fn trains(w: &Tensor) -> bool {
    w.track_op()
}

/// `xhat * w + b`, the `[c]` weight and bias shaped `like` to broadcast over `xhat` (in
/// its dtype), by differentiable ops.
fn affine(xhat: &Tensor, w: &Tensor, b: &Tensor, like: &[usize]) -> Result<Tensor> {
    let shaped = |t: &Tensor| t.to_dtype(xhat.dtype())?.reshape(like);
    xhat.broadcast_mul(&shaped(w)?)?.broadcast_add(&shaped(b)?)
}

/// `x W^T + b` (weights cast to `x`'s dtype) by differentiable ops, so `W` and `b` get
/// their gradients: a trained `W` through `ops::trained_linear`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let w = w.to_dtype(x.dtype())?;
    let y = match trains(&w) {
        true => ops::trained_linear(x, &w)?,
        false => x.broadcast_matmul(&w.t()?)?,
    };
    match b {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?),
        None => Ok(y),
    }
}

/// A linear layer that may carry a LoRA adapter, found by its diffusers module path.
#[derive(Debug, Clone)]
pub struct Linear {
    pub path: String,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            path: vb.prefix(),
            weight,
            bias,
        })
    }

    /// A 1x1 convolution stored as `[out, in, 1, 1]` is the same map on channels: load it
    /// as a linear so SD 1.x-style `proj_in`/`proj_out` share the LoRA path.
    pub fn load_conv1x1(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = vb
            .get((out_dim, in_dim, 1, 1), "weight")?
            .reshape((out_dim, in_dim))?;
        let bias = Some(vb.get(out_dim, "bias")?);
        Ok(Self {
            path: vb.prefix(),
            weight,
            bias,
        })
    }

    /// The base weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        if let Some(t) = ctx.tuned.and_then(|set| set.get(&self.path)) {
            // A tuned weight (and bias, where tuned), by candle's ops.
            return linear(x, &t.weight, t.bias.as_ref().or(self.bias.as_ref()));
        }
        let lora = ctx.lora.and_then(|set| set.get(&self.path));
        if trains(&self.weight) || self.bias.as_ref().is_some_and(trains) {
            let y = linear(x, &self.weight, self.bias.as_ref())?;
            let Some(lora) = lora else { return Ok(y) };
            let down = linear(x, &lora.a, None)?;
            return y + (linear(&down, &lora.b, None)? * lora.scale)?;
        }
        match lora {
            Some(lora) => {
                let adapter = ops::LoraAdapter {
                    a: &lora.a,
                    b: &lora.b,
                    scale: lora.scale,
                };
                ops::lora_linear(x, &self.weight, self.bias.as_ref(), &adapter)
            }
            None => ops::frozen_linear(x, &self.weight, self.bias.as_ref()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn load(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((c_out, c_in, k, k), "weight")?,
            bias: vb.get(c_out, "bias")?,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b, s, p) = (&self.weight, &self.bias, self.stride, self.padding);
        if trains(w) || trains(b) {
            return ops::trained_conv2d(x, w, b, s, p);
        }
        ops::frozen_conv2d(x, w, b, s, p)
    }
}

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
    /// `silu(norm(x))` as one op.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }
    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        if !(trains(w) || trains(b)) {
            return ops::group_norm(x, w, b, self.groups, self.eps, silu);
        }
        // The fused op normalizes (its backward gives dL/dx); the affine part, by
        // broadcasts, gives the weight and bias theirs.
        let (c, one) = (w.dim(0)?, Tensor::ones(w.dim(0)?, x.dtype(), x.device())?);
        let xhat = ops::group_norm(x, &one, &one.zeros_like()?, self.groups, self.eps, false)?;
        let mut like = vec![1; x.rank()];
        like[1] = c;
        let y = affine(&xhat, w, b, &like)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

pub fn group_norm(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("{}: {channels} channels in {groups} groups", vb.prefix())
    }
    Ok(GroupNorm {
        weight: vb.get(channels, "weight")?,
        bias: vb.get(channels, "bias")?,
        groups,
        eps,
    })
}

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        if !(trains(w) || trains(b)) {
            return ops::layer_norm(x, w, b, self.eps);
        }
        // As GroupNorm: the fused op normalizes, broadcasts apply the weight and bias.
        let one = Tensor::ones(w.dim(0)?, x.dtype(), x.device())?;
        let xhat = ops::layer_norm(x, &one, &one.zeros_like()?, self.eps)?;
        affine(&xhat, w, b, &[w.dim(0)?])
    }
}

/// Differentiable softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Bilinear resize of `[b, c, h, w]` to `[b, c, oh, ow]`, as torch's
/// `F.interpolate(mode="bilinear", align_corners=False)` without antialiasing: two
/// matrix products, so its backward is candle's matmul's.
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let rows = bilinear_matrix(h, oh, x)?;
    let cols = bilinear_matrix(w, ow, x)?;
    rows.broadcast_matmul(x)?.broadcast_matmul(&cols.t()?)
}

/// `[n_out, n_in]`: output i reads input `(i + 0.5) * n_in / n_out - 0.5` (clamped at 0)
/// between its two neighbours.
fn bilinear_matrix(n_in: usize, n_out: usize, like: &Tensor) -> Result<Tensor> {
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let frac = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - frac;
        m[o * n_in + i1] += frac;
    }
    Tensor::from_vec(m, (n_out, n_in), like.device())?.to_dtype(like.dtype())
}

/// Nearest-neighbour resize of `[b, c, h, w]` to `[b, c, oh, ow]`, as torch's
/// `F.interpolate(mode="nearest")`: output row i reads input row floor(i * h / oh).
/// Built from `index_select`, so its backward is exact for any size (candle's
/// `upsample_nearest2d` has none for non-integer factors).
pub fn resize_nearest(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let index = |n: usize, out: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..out).map(|i| ((i * n) / out) as u32).collect();
        Tensor::from_vec(idx, out, x.device())
    };
    x.index_select(&index(h, oh)?, 2)?
        .index_select(&index(w, ow)?, 3)
}
