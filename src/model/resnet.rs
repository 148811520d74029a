//! ResNet blocks and resamplers shared by the U-Net and the VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{group_norm, resize_nearest, Conv2d, GroupNorm, Linear};
use super::ops;

/// diffusers' `ResnetBlock2D` with the default time-embedding shift; `temb_dim` None for
/// the VAE. Output: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1 x)) + t)))`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn load(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        temb_dim: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let time_emb_proj = match temb_dim {
            Some(t) => Some(Linear::load(&vb.pp("time_emb_proj"), t, c_out, true)?),
            None => None,
        };
        let conv_shortcut = if c_in != c_out {
            Some(Conv2d::load(&vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(&vb.pp("norm1"), groups, c_in, eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj,
            norm2: group_norm(&vb.pp("norm2"), groups, c_out, eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `temb` is the already-activated time embedding `silu(emb)`, `[b, temb_dim]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(t, Default::default())?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// Stride-2 3x3 convolution. The VAE encoder pads only right and bottom (diffusers'
/// `padding=0` path); the U-Net pads 1 on every side.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn load(vb: &VarBuilder, c: usize, asymmetric_pad: bool) -> Result<Self> {
        let pad = if asymmetric_pad { 0 } else { 1 };
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), c, c, 3, 2, pad)?,
            asymmetric_pad,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest 2x upsampling (or to an explicit size, to match a skip connection), then 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: &VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), c, c, 3, 1, 1)?,
        })
    }
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let up = match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => resize_nearest(x, th, tw)?,
            _ => ops::upsample_nearest_2x(x)?,
        };
        self.conv.forward(&up)
    }
}
