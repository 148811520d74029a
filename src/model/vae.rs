//! diffusers' `AutoencoderKL`: encode to a diagonal Gaussian over latents, decode back.
//! Frozen in MagicTailor, so written for inference (no adapters), with both the old
//! (`query/key/value/proj_attn`) and new (`to_q/.../to_out.0`) attention weight names.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use super::nn::{group_norm, Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

const EPS: f64 = 1e-6;

/// The most bytes one full-resolution activation may take. The VAE works at the image's
/// own resolution with `block_out_channels[0]` channels, where every resnet keeps several
/// such tensors alive: encoding six 512 px images peaked at 4.8 GB on the CPU in f32, and
/// 0.9 GB one image at a time (diffusers' "VAE slicing"), no slower: one 512 px image's
/// convolutions are already large GEMMs.
const ACTIVATION_BUDGET: usize = 128 << 20;

/// Single-head self-attention over pixels, with GroupNorm and a residual.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    qkv_out: [(Tensor, Tensor); 4],
}

impl VaeAttention {
    fn load(vb: &VarBuilder, c: usize, groups: usize) -> Result<Self> {
        let new_names = vb.contains_tensor("to_q.weight");
        let names = if new_names {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let lin = |n: &str| -> Result<(Tensor, Tensor)> {
            let w = if new_names {
                vb.get((c, c), &format!("{n}.weight"))?
            } else {
                // Old checkpoints may store these as 1x1 convs: [c, c, 1, 1].
                vb.get_unchecked(&format!("{n}.weight"))?.reshape((c, c))?
            };
            Ok((w, vb.get(c, &format!("{n}.bias"))?))
        };
        Ok(Self {
            group_norm: group_norm(&vb.pp("group_norm"), groups, c, EPS)?,
            qkv_out: [
                lin(names[0])?,
                lin(names[1])?,
                lin(names[2])?,
                lin(names[3])?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let lin = |i: usize, t: &Tensor| -> Result<Tensor> {
            let (wt, bias) = &self.qkv_out[i];
            super::ops::frozen_linear(t, wt, Some(bias))
        };
        let scale = 1.0 / (c as f64).sqrt();
        let (q, k, v) = (lin(0, &t)?, lin(1, &t)?, lin(2, &t)?);
        let out = lin(3, &super::ops::attention(&q, &k, &v, 1, scale)?)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

#[derive(Debug, Clone)]
struct Mid {
    res0: ResnetBlock2D,
    attn: Option<VaeAttention>,
    res1: ResnetBlock2D,
}

impl Mid {
    fn load(vb: &VarBuilder, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            res0: ResnetBlock2D::load(&vb.pp("resnets").pp(0), c, c, None, g, EPS)?,
            attn: if cfg.mid_block_add_attention {
                Some(VaeAttention::load(&vb.pp("attentions").pp(0), c, g)?)
            } else {
                None
            },
            res1: ResnetBlock2D::load(&vb.pp("resnets").pp(1), c, c, None, g, EPS)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.res0.forward(x, None)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.res1.forward(&h, None)
    }
}

/// The latent distribution the encoder predicts.
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDist {
    /// `mean + std * noise`, with noise supplied by the caller (seeded, reproducible).
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.broadcast_add(&self.std.broadcast_mul(noise)?)
    }
}

#[derive(Debug, Clone)]
pub struct Vae {
    pub config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    enc_mid: Mid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: Mid,
    dec_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
    /// Bytes of full-resolution activation coded at a time ([`ACTIVATION_BUDGET`]).
    slice_budget: usize,
    /// The weights' precision: inputs are cast to it (SDXL's VAE stays f32 under f16).
    dtype: DType,
}

impl Vae {
    pub fn load(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (n, g, lat) = (ch.len(), cfg.norm_num_groups, cfg.latent_channels);
        let res = |vb: VarBuilder, i, o| ResnetBlock2D::load(&vb, i, o, None, g, EPS);

        let enc = vb.pp("encoder");
        let mut enc_blocks = Vec::new();
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vb = enc.pp("down_blocks").pp(i);
            let c_in = c_out;
            c_out = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    res(
                        vb.pp("resnets").pp(j),
                        if j == 0 { c_in } else { c_out },
                        c_out,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                Some(Downsample2D::load(
                    &vb.pp("downsamplers").pp(0),
                    c_out,
                    true,
                )?)
            } else {
                None
            };
            enc_blocks.push((resnets, down));
        }

        let dec = vb.pp("decoder");
        let mut dec_blocks = Vec::new();
        let mut c_out = ch[n - 1];
        for i in 0..n {
            let vb = dec.pp("up_blocks").pp(i);
            let c_prev = c_out;
            c_out = ch[n - 1 - i];
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    res(
                        vb.pp("resnets").pp(j),
                        if j == 0 { c_prev } else { c_out },
                        c_out,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Upsample2D::load(&vb.pp("upsamplers").pp(0), c_out)?)
            } else {
                None
            };
            dec_blocks.push((resnets, up));
        }

        Ok(Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            enc_conv_in: Conv2d::load(&enc.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            enc_blocks,
            enc_mid: Mid::load(&enc.pp("mid_block"), ch[n - 1], cfg)?,
            enc_norm_out: group_norm(&enc.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            enc_conv_out: Conv2d::load(&enc.pp("conv_out"), ch[n - 1], 2 * lat, 3, 1, 1)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::load(
                    &vb.pp("quant_conv"),
                    2 * lat,
                    2 * lat,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::load(&vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
            } else {
                None
            },
            dec_conv_in: Conv2d::load(&dec.pp("conv_in"), lat, ch[n - 1], 3, 1, 1)?,
            dec_mid: Mid::load(&dec.pp("mid_block"), ch[n - 1], cfg)?,
            dec_blocks,
            dec_norm_out: group_norm(&dec.pp("conv_norm_out"), g, ch[0], EPS)?,
            dec_conv_out: Conv2d::load(&dec.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            slice_budget: ACTIVATION_BUDGET,
        })
    }

    /// The shape `encode` gives pixels of shape `[b, c, h, w]`: each padded stride-2
    /// downsampling halves a side, rounding down.
    pub fn latent_dims(&self, pixels: &[usize]) -> [usize; 4] {
        let halvings = self.config.block_out_channels.len().saturating_sub(1) as u32;
        let side = |s: usize| s >> halvings;
        [
            pixels[0],
            self.config.latent_channels,
            side(pixels[2]),
            side(pixels[3]),
        ]
    }

    /// Pixels in [-1, 1], `[b, 3, H, W]` -> the latent distribution (unscaled).
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        let _p = crate::profile::scope(crate::profile::Kind::VaeEncode, x.device());
        let x = &x.to_dtype(self.dtype)?;
        let dists = self
            .slices(x, x.dim(2)? * x.dim(3)?)?
            .iter()
            .map(|x| self.encode_slice(x))
            .collect::<Result<Vec<_>>>()?;
        let cat = |f: fn(&LatentDist) -> &Tensor| {
            Tensor::cat(&dists.iter().map(f).collect::<Vec<_>>(), 0)
        };
        Ok(LatentDist {
            mean: cat(|d| &d.mean)?,
            std: cat(|d| &d.std)?,
        })
    }

    /// Unscaled latents -> pixels in roughly [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let _p = crate::profile::scope(crate::profile::Kind::VaeDecode, z.device());
        let z = &z.to_dtype(self.dtype)?;
        let halvings = self.config.block_out_channels.len().saturating_sub(1);
        let pixels = (z.dim(2)? << halvings) * (z.dim(3)? << halvings);
        let images = self
            .slices(z, pixels)?
            .iter()
            .map(|z| self.decode_slice(z))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }

    /// `x` cut along the batch into slices whose full-resolution activations (`pixels`
    /// per image, at the widest full-resolution level) fit the slice budget. Each image is
    /// coded alone, so slicing changes no value.
    fn slices(&self, x: &Tensor, pixels: usize) -> Result<Vec<Tensor>> {
        let b = x.dim(0)?;
        let widest = self.config.block_out_channels[0];
        let per_image = pixels * widest * x.dtype().size_in_bytes();
        let images = crate::model::ops::images_within(self.slice_budget, per_image, b);
        (0..b)
            .step_by(images)
            .map(|i| x.narrow(0, i, images.min(b - i)))
            .collect()
    }

    fn encode_slice(&self, x: &Tensor) -> Result<LatentDist> {
        let mut h = self.enc_conv_in.forward(x)?;
        for (resnets, down) in &self.enc_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.enc_mid.forward(&h)?;
        let mut moments = self
            .enc_conv_out
            .forward(&self.enc_norm_out.forward_silu(&h)?)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let lat = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lat)?;
        let logvar = moments.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }

    fn decode_slice(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        let mut h = self.dec_mid.forward(&self.dec_conv_in.forward(&z)?)?;
        for (resnets, up) in &self.dec_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
        }
        self.dec_conv_out
            .forward(&self.dec_norm_out.forward_silu(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;

    /// The trainer draws posterior noise before encoding, from `latent_dims`.
    #[test]
    fn latent_dims_are_the_encoded_shape() {
        let cfg: VaeConfig = serde_json::from_value(crate::model::tiny::vae_config()).unwrap();
        let vae = Vae::load(&VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).unwrap();
        for (h, w) in [(64, 64), (37, 50), (9, 8)] {
            let x = Tensor::zeros((2, 3, h, w), DType::F32, &Device::Cpu).unwrap();
            let mean = vae.encode(&x).unwrap().mean;
            assert_eq!(mean.dims(), vae.latent_dims(x.dims()), "{h}x{w}");
        }
    }

    /// Coding the batch in slices, including a short last one, gives exactly what coding
    /// it whole does.
    #[test]
    fn slicing_changes_no_value() {
        let cfg: VaeConfig = serde_json::from_value(crate::model::tiny::vae_config()).unwrap();
        let dev = Device::Cpu;
        let file = crate::model::tiny::ensure_cached()
            .unwrap()
            .join("vae/diffusion_pytorch_model.safetensors");
        // SAFETY: the tiny model is written once, atomically, and never changed.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &dev) };
        let mut vae = Vae::load(&vb.unwrap(), &cfg).unwrap();
        assert_eq!(vae.slice_budget, ACTIVATION_BUDGET);
        let x = Tensor::randn(0f32, 1.0, (5, 3, 64, 64), &dev).unwrap();
        let z = Tensor::randn(0f32, 1.0, (5, 4, 8, 8), &dev).unwrap();
        vae.slice_budget = usize::MAX;
        let (whole, pixels) = (vae.encode(&x).unwrap(), vae.decode(&z).unwrap());
        // Two images a slice: 8 channels of 64x64 f32 each.
        vae.slice_budget = 2 * 8 * 64 * 64 * 4;
        assert_eq!(vae.slices(&x, 64 * 64).unwrap().len(), 3);
        let sliced = vae.encode(&x).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.dims(), b.dims());
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        };
        same(&sliced.mean, &whole.mean);
        same(&sliced.std, &whole.std);
        same(&vae.decode(&z).unwrap(), &pixels);
    }
}
