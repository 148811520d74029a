//! diffusers' `UNet2DConditionModel`, written for training: per-sample timesteps,
//! LoRA-capable linears at every MagicTailor target, and the cross-attention probe.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::attention::{Transformer2D, Transformer2DConfig};
use super::config::UNetConfig;
use super::lora::{LoraTarget, MAGICTAILOR_TARGETS};
use super::nn::{group_norm, AddedCond, Conv2d, Ctx, GroupNorm, Linear};
use super::probe::BlockKind;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// One down, mid or up block: resnets, optionally each followed by a transformer.
#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

#[derive(Debug, Clone)]
pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<Block>,
    mid_block: Block,
    up_blocks: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    /// Sinusoidal timestep frequencies `[1, c0 / 2]`, made once on the model's device.
    time_freqs: Tensor,
    /// SDXL's `text_time` conditioning, when the config has it.
    added: Option<AddedEmbedding>,
}

/// SDXL's `add_time_proj` (sinusoids of the six numbers) and `add_embedding` (a two-layer
/// MLP from them and the pooled text to the timestep embedding's width).
#[derive(Debug, Clone)]
struct AddedEmbedding {
    freqs: Tensor,
    linear_1: Linear,
    linear_2: Linear,
}

/// diffusers' `get_timestep_embedding` frequencies, f32 throughout and in its order of
/// operations, so the features match bit for bit.
fn time_frequencies(dim: usize, cfg: &UNetConfig, device: &candle_core::Device) -> Result<Tensor> {
    let half = dim / 2;
    let shift = cfg.freq_shift as f32;
    let exponent: Vec<f32> = (0..half)
        .map(|i| ((-(10000f32.ln()) * i as f32) / (half as f32 - shift)).exp())
        .collect();
    Tensor::from_vec(exponent, (1, half), device)
}

/// `[sin, cos]` (or `[cos, sin]`) of `values` (any shape, flattened to `[n]`) times
/// `freqs` `[1, half]`: `[n, 2 half]`, in f32.
fn sinusoids(values: &Tensor, freqs: &Tensor, flip_sin_to_cos: bool) -> Result<Tensor> {
    let args = (values.flatten_all()?.to_dtype(DType::F32)?.unsqueeze(1)?).broadcast_mul(freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)
    }
}

impl AddedEmbedding {
    fn load(vb: &VarBuilder, cfg: &UNetConfig, temb_dim: usize) -> Result<Option<Self>> {
        let (Some(dim), Some(input)) = (
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) else {
            return Ok(None);
        };
        let add = vb.pp("add_embedding");
        Ok(Some(Self {
            freqs: time_frequencies(dim, cfg, vb.device())?,
            linear_1: Linear::load(&add.pp("linear_1"), input, temb_dim, true)?,
            linear_2: Linear::load(&add.pp("linear_2"), temb_dim, temb_dim, true)?,
        }))
    }

    /// `linear_2(silu(linear_1([text_embeds, sinusoids(time_ids)])))`, as diffusers'
    /// `text_time` branch of `get_aug_embed`.
    fn forward(&self, cond: &AddedCond, flip: bool, ctx: Ctx) -> Result<Tensor> {
        let b = cond.time_ids.dim(0)?;
        let dtype = self.linear_1.weight().dtype();
        let times = sinusoids(&cond.time_ids, &self.freqs, flip)?.reshape((b, ()))?;
        let x =
            Tensor::cat(&[&cond.text_embeds.to_dtype(DType::F32)?, &times], 1)?.to_dtype(dtype)?;
        let h = self.linear_1.forward(&x, ctx)?.silu()?;
        self.linear_2.forward(&h, ctx)
    }
}

impl UNet {
    pub fn load(vb: &VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let resnet =
            |vb: VarBuilder, i, o| ResnetBlock2D::load(&vb, i, o, Some(temb_dim), groups, eps);
        let transformer = |vb: VarBuilder, c, block: usize| {
            Transformer2D::load(
                &vb,
                &Transformer2DConfig {
                    channels: c,
                    heads: cfg.heads(block),
                    layers: cfg.transformer_layers(block),
                    context_dim: cfg.cross_attention_dim,
                    groups,
                    linear_projection: cfg.use_linear_projection,
                    upcast: cfg.upcast_attention,
                },
            )
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let c_in = c_out;
            c_out = c;
            let cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut block = Block {
                resnets: vec![],
                attentions: vec![],
                down: None,
                up: None,
            };
            for j in 0..cfg.layers_per_block {
                block.resnets.push(resnet(
                    vb.pp("resnets").pp(j),
                    if j == 0 { c_in } else { c_out },
                    c_out,
                )?);
                if cross {
                    block
                        .attentions
                        .push(transformer(vb.pp("attentions").pp(j), c_out, i)?);
                }
            }
            if i + 1 < n {
                block.down = Some(Downsample2D::load(
                    &vb.pp("downsamplers").pp(0),
                    c_out,
                    false,
                )?);
            }
            down_blocks.push(block);
        }

        let c_mid = ch[n - 1];
        let vb_mid = vb.pp("mid_block");
        let mid_block = Block {
            resnets: vec![
                resnet(vb_mid.pp("resnets").pp(0), c_mid, c_mid)?,
                resnet(vb_mid.pp("resnets").pp(1), c_mid, c_mid)?,
            ],
            // The mid block uses the heads and depth of the deepest down block.
            attentions: vec![transformer(vb_mid.pp("attentions").pp(0), c_mid, n - 1)?],
            down: None,
            up: None,
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = ch[n - 1];
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let level = n - 1 - i; // the down block this up block mirrors
            let c_prev = c_out;
            c_out = ch[level];
            let c_skip_in = ch[level.saturating_sub(1)];
            let cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let layers = cfg.layers_per_block + 1;
            let mut block = Block {
                resnets: vec![],
                attentions: vec![],
                down: None,
                up: None,
            };
            for j in 0..layers {
                let skip = if j == layers - 1 { c_skip_in } else { c_out };
                let res_in = if j == 0 { c_prev } else { c_out };
                block
                    .resnets
                    .push(resnet(vb.pp("resnets").pp(j), res_in + skip, c_out)?);
                if cross {
                    block
                        .attentions
                        .push(transformer(vb.pp("attentions").pp(j), c_out, level)?);
                }
            }
            if i + 1 < n {
                block.up = Some(Upsample2D::load(&vb.pp("upsamplers").pp(0), c_out)?);
            }
            up_blocks.push(block);
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            time_linear_1: Linear::load(
                &vb.pp("time_embedding").pp("linear_1"),
                ch[0],
                temb_dim,
                true,
            )?,
            time_linear_2: Linear::load(
                &vb.pp("time_embedding").pp("linear_2"),
                temb_dim,
                temb_dim,
                true,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&vb.pp("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            dtype: vb.dtype(),
            time_freqs: time_frequencies(ch[0], cfg, vb.device())?,
            added: AddedEmbedding::load(vb, cfg, temb_dim)?,
        })
    }

    /// Every linear that a MagicTailor LoRA adapts, in a stable order.
    /// The transformers' linear layers that can carry an adapter or be tuned, in order.
    fn adaptable(&self) -> impl Iterator<Item = &Linear> {
        let blocks = self
            .down_blocks
            .iter()
            .chain([&self.mid_block])
            .chain(&self.up_blocks);
        let linears = blocks
            .flat_map(|b| b.attentions.iter())
            .flat_map(|t| t.lora_linears());
        linears.filter(|l| {
            MAGICTAILOR_TARGETS
                .iter()
                .any(|s| l.path.ends_with(&format!(".{s}")))
        })
    }

    /// The base weight and bias of each adaptable layer named in `paths`, in the U-Net's
    /// order.
    /// Every spatial transformer in running order (encoder, middle, decoder), each with
    /// whether it is the decoder's.
    pub fn transformers(&self) -> Vec<(bool, &Transformer2D)> {
        let down = self.down_blocks.iter().chain([&self.mid_block]);
        let down = down.flat_map(|b| b.attentions.iter()).map(|t| (false, t));
        let up = self.up_blocks.iter().flat_map(|b| b.attentions.iter());
        down.chain(up.map(|t| (true, t))).collect()
    }

    pub fn base_weights(&self, paths: &[String]) -> Vec<(String, Tensor, Option<Tensor>)> {
        (self.adaptable())
            .filter(|l| paths.contains(&l.path))
            .map(|l| (l.path.clone(), l.weight().clone(), l.bias().cloned()))
            .collect()
    }

    pub fn lora_targets(&self) -> Vec<LoraTarget> {
        self.adaptable()
            .map(|l| LoraTarget {
                path: l.path.clone(),
                in_dim: l.in_dim(),
                out_dim: l.out_dim(),
                conv: !self.config.use_linear_projection
                    && (l.path.ends_with(".proj_in") || l.path.ends_with(".proj_out")),
                original: super::single_file::original_transformer_path(
                    &l.path,
                    self.config.layers_per_block,
                ),
            })
            .collect()
    }

    /// Sinusoidal timestep features `[b, c0]`, as diffusers' `get_timestep_embedding`.
    fn time_features(&self, timesteps: &Tensor) -> Result<Tensor> {
        sinusoids(timesteps, &self.time_freqs, self.config.flip_sin_to_cos)?.to_dtype(self.dtype())
    }

    /// The timestep embedding (before the resnets' SiLU), plus SDXL's added conditioning.
    fn time_embedding(&self, timesteps: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let temb = self.time_features(timesteps)?;
        let temb = self.time_linear_1.forward(&temb, ctx)?.silu()?;
        let temb = self.time_linear_2.forward(&temb, ctx)?;
        match (&self.added, ctx.added) {
            (None, None) => Ok(temb),
            (Some(add), Some(cond)) => {
                temb + add.forward(cond, self.config.flip_sin_to_cos, ctx)?
            }
            (Some(_), None) => candle_core::bail!(
                "this U-Net (addition_embed_type text_time, SDXL) needs the pooled text and size \
                 conditioning"
            ),
            (None, Some(_)) => candle_core::bail!("added conditioning given to a U-Net without it"),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `x: [b, c, h, w]` noisy latents, `timesteps: [b]` (one per sample), `context:
    /// [b, tokens, cross_attention_dim]`. Returns the predicted noise.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let _p = crate::profile::scope(crate::profile::Kind::UNet, x.device());
        let temb = self.time_embedding(timesteps, ctx)?;
        let temb = temb.silu()?; // every resnet applies silu before its projection
        let temb = Some(&temb);

        let mut h = self.conv_in.forward(x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, res) in block.resnets.iter().enumerate() {
                h = res.forward(&h, temb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, BlockKind::Down, ctx)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.down {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        let mid = &self.mid_block;
        h = mid.resnets[0].forward(&h, temb)?;
        h = mid.attentions[0].forward(&h, context, BlockKind::Mid, ctx)?;
        h = mid.resnets[1].forward(&h, temb)?;

        for block in &self.up_blocks {
            for (j, res) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("U-Net skip stack underflow".into()))?;
                h = res.forward(&Tensor::cat(&[&h, &skip], 1)?, temb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, BlockKind::Up, ctx)?;
                }
            }
            if let Some(up) = &block.up {
                // Upsample to the next skip's size, so odd latent sizes line up as in diffusers.
                let size = skips
                    .last()
                    .map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
                h = up.forward(&h, size)?;
            }
        }

        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
