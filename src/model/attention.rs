//! Attention and the transformer blocks of the U-Net; cross-attention layers feed the
//! probe (`probe.rs`) the probabilities MagicTailor's attention loss reads.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{group_norm, softmax_last, Ctx, GroupNorm, LayerNorm, Linear};
use super::ops;
use super::probe::BlockKind;

#[derive(Debug, Clone)]
pub struct Attention {
    path: String,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// Scores and softmax in f32 for half-precision weights (`upcast_attention`).
    upcast: bool,
}

impl Attention {
    /// `context_dim` is None for self-attention. Biases: none on q/k/v, one on the output
    /// (the U-Net's convention; the VAE uses `load_with_bias`).
    pub fn load(
        vb: &VarBuilder,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
    ) -> Result<Self> {
        Self::load_inner(vb, dim, context_dim, heads, false)
    }
    pub fn load_with_bias(vb: &VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Self::load_inner(vb, dim, None, heads, true)
    }
    fn load_inner(
        vb: &VarBuilder,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let ctx_dim = context_dim.unwrap_or(dim);
        Ok(Self {
            path: vb.prefix(),
            to_q: Linear::load(&vb.pp("to_q"), dim, dim, qkv_bias)?,
            to_k: Linear::load(&vb.pp("to_k"), ctx_dim, dim, qkv_bias)?,
            to_v: Linear::load(&vb.pp("to_v"), ctx_dim, dim, qkv_bias)?,
            to_out: Linear::load(&vb.pp("to_out").pp("0"), dim, dim, true)?,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
            upcast: false,
        })
    }

    /// With `upcast_attention`: scores and softmax in f32.
    fn upcast(mut self, upcast: bool) -> Self {
        self.upcast = upcast;
        self
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `x: [b, n, dim]`, `context: [b, m, ctx_dim]` (None: self-attention).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        kind: BlockKind,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let n = x.dim(1)?;
        let kv_in = context.unwrap_or(x);
        let q = self.to_q.forward(x, ctx)?;
        let mut k = self.to_k.forward(kv_in, ctx)?;
        let mut v = self.to_v.forward(kv_in, ctx)?;
        if let (Some(tuned), Some(_)) = (ctx.tuned.filter(|t| t.hold_first_token), context) {
            if tuned.get(&self.to_k.path).is_some() {
                k = hold_first_token(&k)?;
            }
            if tuned.get(&self.to_v.path).is_some() {
                v = hold_first_token(&v)?;
            }
        }
        let dtype = q.dtype();
        let (q, k, v) = match self.upcast && dtype != DType::F32 {
            true => {
                let f32 = DType::F32;
                (q.to_dtype(f32)?, k.to_dtype(f32)?, v.to_dtype(f32)?)
            }
            false => (q, k, v),
        };
        if let (Some(probe), Some(_)) = (ctx.probe, context) {
            if probe.wants(kind, n) {
                // The attention loss reads these probabilities, in the graph; the output
                // below is the same with or without a probe (L_pres compares the two).
                let q = self.split_heads(&(&q * self.scale)?)?;
                let probs = softmax_last(&q.matmul(&self.split_heads(&k)?.t()?)?)?;
                probe.record(&self.path, probs.mean(1)?);
            }
        }
        if let (Some(plug), Some(_)) = (ctx.vico, context) {
            if plug.wants(&self.path) {
                // ViCo's mask and L_reg read the references' maps, in the graph (f32, or
                // f64 for finite differences).
                let q = self.split_heads(&(&q * self.scale)?)?;
                let scores = q.matmul(&self.split_heads(&k)?.t()?)?;
                let up = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                plug.record(&self.path, softmax_last(&scores)?.mean(1)?.to_dtype(up)?);
            }
        }
        let swapped = match (ctx.swap, context) {
            (Some(swap), None) => {
                swap.self_attention(&self.path, (&q, &k, &v), self.heads, self.scale)?
            }
            _ => None,
        };
        let out = match swapped {
            Some(out) => out,
            None => ops::attention(&q, &k, &v, self.heads, self.scale)?,
        };
        let out = out.to_dtype(dtype)?;
        self.to_out.forward(&out, ctx)
    }
}

/// `[b, m, c]` whose first token passes no gradient back: Custom Diffusion's processor
/// detaches the start-of-text token's keys and values of tuned layers.
fn hold_first_token(t: &Tensor) -> Result<Tensor> {
    let m = t.dim(1)?;
    Tensor::cat(&[&t.narrow(1, 0, 1)?.detach(), &t.narrow(1, 1, m - 1)?], 1)
}

/// GEGLU feed-forward: `net.2(h * gelu(gate))` with `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(&vb.pp("net").pp("0").pp("proj"), dim, inner * 2, true)?,
            out: Linear::load(&vb.pp("net").pp("2"), inner, dim, true)?,
        })
    }
    fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let hg = self.proj.forward(x, ctx)?;
        // diffusers' GEGLU uses the exact (erf) GELU.
        self.out.forward(&ops::geglu(&hg)?, ctx)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(
        vb: &VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, None, heads)?.upcast(upcast),
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, Some(context_dim), heads)?.upcast(upcast),
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }
    fn forward(&self, x: &Tensor, context: &Tensor, kind: BlockKind, ctx: Ctx) -> Result<Tensor> {
        let x = (self
            .attn1
            .forward(&self.norm1.forward(x)?, None, kind, ctx)?
            + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), kind, ctx)?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?, ctx)? + x
    }
}

/// diffusers' `Transformer2DModel` (continuous input): GroupNorm, proj_in, blocks, proj_out,
/// residual. A 1x1-conv projection (SD 1.x) is the same map as a linear on channels.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    /// Its module path (`up_blocks.1.attentions.1`), width and heads.
    pub path: String,
    pub channels: usize,
    pub heads: usize,
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    /// The U-Net's `upcast_attention`.
    pub upcast: bool,
}

impl Transformer2D {
    pub fn load(vb: &VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let c = cfg.channels;
        let proj = |name: &str| {
            if cfg.linear_projection {
                Linear::load(&vb.pp(name), c, c, true)
            } else {
                Linear::load_conv1x1(&vb.pp(name), c, c)
            }
        };
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::load(
                    &vb.pp("transformer_blocks").pp(i),
                    c,
                    cfg.heads,
                    cfg.context_dim,
                    cfg.upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            path: vb.prefix(),
            channels: c,
            heads: cfg.heads,
            norm: group_norm(&vb.pp("norm"), cfg.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// How many transformer layers it holds.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    pub fn lora_linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.proj_in];
        for b in &self.blocks {
            for a in [&b.attn1, &b.attn2] {
                v.extend([&a.to_q, &a.to_k, &a.to_v, &a.to_out]);
            }
            v.push(&b.ff.out);
        }
        v.push(&self.proj_out);
        v
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        kind: BlockKind,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&tokens, ctx)?;
        for block in &self.blocks {
            t = block.forward(&t, context, kind, ctx)?;
        }
        // ViCo's block sees the transformer's finished tokens, once.
        if let Some(plug) = ctx.vico {
            t = plug.apply(&self.path, &t)?;
        }
        let t = self.proj_out.forward(&t, ctx)?;
        t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))? + x
    }
}
