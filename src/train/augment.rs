//! The released script's augmentation, as tensor ops on the training device.
//!
//! The script applies torchvision's `ColorJitter(0.1, 0.1, 0.1)` to the whole batch
//! tensor, so one set of factors is drawn per step for every image, and the three ops run
//! in an order drawn per step. Each op blends with a reference image and clamps to
//! [0, 1], as torchvision does: brightness with black, contrast with the image's mean
//! grey level, saturation with its grey image. Then the whole batch is flipped
//! horizontally with probability 1/2, masks with it.

use candle_core::{Result, Tensor};
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
    /// Factors uniform in [1 - s, 1 + s] and a uniformly random order.
    pub fn draw(rng: &mut impl Rng, strength: f64) -> Self {
        let s = strength as f32;
        let mut factor = || rng.random_range(1.0 - s..=1.0 + s);
        let (brightness, contrast, saturation) = (factor(), factor(), factor());
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
