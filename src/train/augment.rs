//! The released script's augmentation, as tensor ops on the training device.
//!
//! The script applies torchvision's `ColorJitter(0.1, 0.1, 0.1)` to the whole batch
//! tensor, so one set of factors is drawn per step for every image, and the three ops run
//! in an order drawn per step. Each op blends with a reference image and clamps to
//! [0, 1], as torchvision does: brightness with black, contrast with the image's mean
//! grey level, saturation with its grey image. Then the whole batch is flipped
//! horizontally with probability 1/2, masks with it.
//!
//! Custom Diffusion's scale augmentation ([`Rescale`]) is here too.

use candle_core::{DType, Result, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JitterOp {
    Brightness,
    Contrast,
    Saturation,
}

/// One step's colour jitter: a factor per op and the order the ops run in.
#[derive(Debug, Clone, PartialEq)]
pub struct Jitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub order: [JitterOp; 3],
}

impl Jitter {
    /// Factors uniform in [1 - s, 1 + s] for the strengths of brightness, contrast and
    /// saturation, and a uniformly random order.
    pub fn draw(rng: &mut impl Rng, strengths: [f64; 3]) -> Self {
        let mut factor = |s: f64| {
            let s = s as f32;
            rng.random_range(1.0 - s..=1.0 + s)
        };
        let [b, c, s] = strengths;
        let (brightness, contrast, saturation) = (factor(b), factor(c), factor(s));
        let mut order = [
            JitterOp::Brightness,
            JitterOp::Contrast,
            JitterOp::Saturation,
        ];
        order.shuffle(rng);
        Self {
            brightness,
            contrast,
            saturation,
            order,
        }
    }
}

/// Grey level `[b, 1, h, w]` of RGB in [0, 1], with torchvision's weights.
fn gray(x: &Tensor) -> Result<Tensor> {
    let w = Tensor::new(&[0.2989f32, 0.587, 0.114], x.device())?
        .to_dtype(x.dtype())?
        .reshape((1, 3, 1, 1))?;
    x.broadcast_mul(&w)?.sum_keepdim(1)
}

/// `ratio * x + (1 - ratio) * other`, clamped to [0, 1].
fn blend(x: &Tensor, other: &Tensor, ratio: f32) -> Result<Tensor> {
    let ratio = ratio as f64;
    (x * ratio)?
        .broadcast_add(&(other * (1.0 - ratio))?)?
        .clamp(0f32, 1f32)
}

/// Pixels in [-1, 1] -> jittered pixels in [-1, 1].
pub fn color_jitter(pixels: &Tensor, j: &Jitter) -> Result<Tensor> {
    let mut x = ((pixels + 1.0)? / 2.0)?;
    for op in j.order {
        x = match op {
            // A blend with black is a plain scaling.
            JitterOp::Brightness => (x * j.brightness as f64)?.clamp(0f32, 1f32)?,
            JitterOp::Contrast => {
                let mean = gray(&x)?.mean_keepdim(2)?.mean_keepdim(3)?;
                blend(&x, &mean, j.contrast)?
            }
            JitterOp::Saturation => blend(&x, &gray(&x)?, j.saturation)?,
        };
    }
    (x * 2.0)? - 1.0
}

/// Mirror `[b, c, h, w]` left-right.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::from_vec(idx, w, x.device())?, 3)
}

/// `[b, c, h, w]` with the images whose flag is set flipped horizontally.
pub fn flip_some(x: &Tensor, which: &[bool]) -> Result<Tensor> {
    if !which.contains(&true) {
        return Ok(x.clone());
    }
    let flipped = flip_horizontal(x)?;
    let rows = (which.iter().enumerate())
        .map(|(i, &f)| if f { &flipped } else { x }.narrow(0, i, 1))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

/// Custom Diffusion's scale augmentation of one square image of side `size`: a new side
/// drawn from [size/3, size] with probability 0.66, else from [1.2 size, 1.4 size); a
/// smaller image sits at a random place on a blank canvas (0, mid-grey), a larger one is
/// cropped at a random place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rescale {
    pub size: usize,
    pub side: usize,
    pub top: usize,
    pub left: usize,
}

impl Rescale {
    /// The source's draws, in its order: the side, then the offsets.
    pub fn draw(rng: &mut impl Rng, size: usize) -> Self {
        let side = if rng.random::<f64>() < 0.66 {
            rng.random_range(size / 3..=size)
        } else {
            let (lo, hi) = ((1.2 * size as f64) as usize, (1.4 * size as f64) as usize);
            rng.random_range(lo..hi.max(lo + 1))
        };
        let room = side.abs_diff(size);
        Self {
            size,
            side,
            top: rng.random_range(0..=room),
            left: rng.random_range(0..=room),
        }
    }

    /// The prompt's prefix as the source words it: a shrunk image is "a far away" or
    /// "very small", an enlarged one "zoomed in" or "close up".
    pub fn prefix(&self, rng: &mut impl Rng) -> &'static str {
        if (self.side as f64) < 0.6 * self.size as f64 {
            ["a far away ", "very small "][rng.random_range(0..2)]
        } else if self.side > self.size {
            ["zoomed in ", "close up "][rng.random_range(0..2)]
        } else {
            ""
        }
    }

    /// Pixels `[1, 3, size, size]` in [-1, 1] and mask `[1, 1, size, size]` rescaled and
    /// placed; the mask is also cut to the region the image covers, less one latent cell
    /// (`factor` pixels) at each edge, as the source's valid-region mask.
    pub fn apply(&self, pixels: &Tensor, mask: &Tensor, factor: usize) -> Result<(Tensor, Tensor)> {
        let (size, side) = (self.size, self.side);
        let r = resize_matrix(size, side, pixels.device())?;
        let resized = r.broadcast_matmul(&pixels.to_dtype(DType::F32)?)?;
        let resized = resized
            .broadcast_matmul(&r.t()?)?
            .to_dtype(pixels.dtype())?;
        let mask = crate::model::nn::resize_nearest(mask, side, side)?;
        if side > size {
            let crop = |t: &Tensor| {
                (t.narrow(2, self.top, size)?.narrow(3, self.left, size))?.contiguous()
            };
            return Ok((crop(&resized)?, crop(&mask)?));
        }
        let (bottom, right) = (size - self.top - side, size - self.left - side);
        let place = |t: &Tensor| {
            t.pad_with_zeros(2, self.top, bottom)?
                .pad_with_zeros(3, self.left, right)
        };
        let valid = self.valid_region(factor, mask.device())?;
        Ok((place(&resized)?, place(&mask)?.broadcast_mul(&valid)?))
    }

    /// `[1, 1, size, size]`: ones on the latent cells rows and columns
    /// `top / f + 1 .. (top + side) / f - 1` (the source's slice), at pixel resolution.
    fn valid_region(&self, f: usize, device: &candle_core::Device) -> Result<Tensor> {
        let cells =
            |start: usize| (start / f + 1) * f..((start + self.side) / f).saturating_sub(1) * f;
        let (rows, cols) = (cells(self.top), cells(self.left));
        let n = self.size;
        let v: Vec<f32> = (0..n * n)
            .map(|i| (rows.contains(&(i / n)) && cols.contains(&(i % n))) as u8 as f32)
            .collect();
        Tensor::from_vec(v, (1, 1, n, n), device)
    }
}

/// `[n_out, n_in]`: PIL's bilinear resize along one axis (a triangle filter widened by
/// the downscale factor, so shrinking averages instead of aliasing).
fn resize_matrix(n_in: usize, n_out: usize, device: &candle_core::Device) -> Result<Tensor> {
    let scale = n_in as f64 / n_out as f64;
    let width = scale.max(1.0);
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - width + 0.5).trunc().max(0.0)) as usize;
        let hi = ((center + width + 0.5).trunc() as usize).min(n_in);
        let w: Vec<f64> = (lo..hi)
            .map(|x| (1.0 - ((x as f64 - center + 0.5) / width).abs()).max(0.0))
            .collect();
        let total: f64 = w.iter().sum();
        for (x, wx) in (lo..hi).zip(w) {
            m[o * n_in + x] = (wx / total) as f32;
        }
    }
    Tensor::from_vec(m, (n_out, n_in), device)
}
