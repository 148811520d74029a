//! What transformers' PIL image processors (`CLIPImageProcessorPil`, `BitImageProcessorPil`
//! for DINOv2) do to a picture, reproduced to the byte: shortest side resized with PIL's
//! bicubic filter, centre crop, rescale to [0, 1], normalize by mean and std.
//!
//! The resize is written out because the `image` crate's bicubic differs from PIL's by a
//! level here and there (another pass order, no 8-bit rounding between the passes), and a
//! level is 0.015 after normalization: far above the 1e-4 the parity tests hold.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};
use serde::Deserialize;

use crate::error::{Error, Result};

/// How one model wants its pictures.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// The shortest side after resizing.
    pub shortest_edge: u32,
    /// The square centre crop the model sees.
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The fields of a `preprocessor_config.json` we read; sizes are a number or an object.
#[derive(Deserialize)]
struct ProcessorFile {
    size: Option<serde_json::Value>,
    crop_size: Option<serde_json::Value>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
}

/// OpenAI CLIP's normalization, written as transformers' configs write it.
#[allow(clippy::excessive_precision)]
pub const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// PIL's bicubic, the only resampling these processors use for CLIP and DINOv2.
const PIL_BICUBIC: u32 = 3;

impl Preprocess {
    /// `dir/preprocessor_config.json` when there is one, else `fallback`.
    pub fn read(dir: &Path, fallback: Preprocess) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(fallback);
        }
        let f: ProcessorFile = crate::model::config::read_json(&path)?;
        if f.resample.is_some_and(|r| r != PIL_BICUBIC) || f.do_center_crop == Some(false) {
            return Err(Error::unsupported(
                &path,
                "a resampling other than bicubic (3) or no centre crop".into(),
            ));
        }
        let edge = |v: &Option<serde_json::Value>, keys: &[&str]| -> Option<u32> {
            let v = v.as_ref()?;
            v.as_u64()
                .or_else(|| keys.iter().find_map(|k| v.get(k)?.as_u64()))
                .map(|x| x as u32)
        };
        let triple = |v: Option<Vec<f32>>, d: [f32; 3]| -> Result<[f32; 3]> {
            match v {
                None => Ok(d),
                Some(v) => <[f32; 3]>::try_from(v.as_slice()).map_err(|_| Error::BadConfig {
                    path: path.clone(),
                    msg: "image_mean and image_std need 3 values".into(),
                }),
            }
        };
        let p = Preprocess {
            shortest_edge: edge(&f.size, &["shortest_edge", "height"])
                .unwrap_or(fallback.shortest_edge),
            crop: edge(&f.crop_size, &["height"]).unwrap_or(fallback.crop),
            mean: triple(f.image_mean, fallback.mean)?,
            std: triple(f.image_std, fallback.std)?,
        };
        if p.crop == 0 || p.shortest_edge < p.crop || p.std.contains(&0.0) {
            return Err(Error::unsupported(
                &path,
                format!(
                    "a crop of {} from a shortest side of {} (the crop must fit, std must not be 0)",
                    p.crop, p.shortest_edge
                ),
            ));
        }
        Ok(p)
    }

    /// The colour that normalizes to zero: what masked-out pixels become, so they feed the
    /// model nothing but its biases.
    pub fn fill(&self) -> [u8; 3] {
        self.mean
            .map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8)
    }

    /// `[3, crop, crop]` for the model; pixels outside `mask` (0 there) get [`Self::fill`].
    pub fn tensor(
        &self,
        img: &RgbImage,
        mask: Option<&GrayImage>,
        device: &Device,
    ) -> Result<Tensor> {
        let filled;
        let img = match mask {
            Some(m) => {
                filled = fill_outside(img, m, self.fill())?;
                &filled
            }
            None => img,
        };
        let (w, h) = img.dimensions();
        let (nw, nh) = shortest_edge_size(w, h, self.shortest_edge);
        let resized = resize_bicubic(img, nw, nh);
        let c = self.crop;
        let (left, top) = ((nw - c) / 2, (nh - c) / 2);
        let mut data = vec![0f32; (3 * c * c) as usize];
        for ch in 0..3 {
            let (mean, std) = (self.mean[ch] as f64, self.std[ch] as f64);
            for y in 0..c {
                for x in 0..c {
                    let v = resized.get_pixel(left + x, top + y)[ch] as f64 / 255.0;
                    data[(ch as u32 * c * c + y * c + x) as usize] = ((v - mean) / std) as f32;
                }
            }
        }
        Ok(Tensor::from_vec(data, (3, c as usize, c as usize), device)?)
    }
}

/// transformers' `get_resize_output_image_size` with `default_to_square=False`: the short
/// side becomes `edge`, the long side `int(edge * long / short)`.
pub fn shortest_edge_size(w: u32, h: u32, edge: u32) -> (u32, u32) {
    let (short, long) = (w.min(h) as u64, w.max(h) as u64);
    let new_long = ((edge as u64 * long) as f64 / short as f64) as u32;
    if w <= h {
        (edge, new_long)
    } else {
        (new_long, edge)
    }
}

fn fill_outside(img: &RgbImage, mask: &GrayImage, colour: [u8; 3]) -> Result<RgbImage> {
    if img.dimensions() != mask.dimensions() {
        return Err(Error::internal(format!(
            "a {:?} mask for a {:?} image",
            mask.dimensions(),
            img.dimensions()
        )));
    }
    let mut out = img.clone();
    for (p, m) in out.pixels_mut().zip(mask.pixels()) {
        if m[0] < 128 {
            p.0 = colour;
        }
    }
    Ok(out)
}

// ---- PIL's resampling (Pillow `Resample.c`, 8 bits per channel) ------------------------

/// Fixed-point bits of PIL's 8-bit coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input pixel and fixed-point weights of the inputs it reads.
/// The support widens with the downscale factor (PIL's antialiasing).
fn coefficients(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // Truncation toward zero, then clamping, as the C code's casts do.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1i64 << PRECISION_BITS) as f64;
            let fixed = (w.iter())
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i64
                    } else {
                        (0.5 + k * one) as i64
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// A weighted sum in fixed point, rounded and clamped to 8 bits as PIL does.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL `Image.resize((w, h), BICUBIC)` of an RGB image: a horizontal pass to 8 bits, then a
/// vertical one; a pass whose size does not change is skipped.
pub fn resize_bicubic(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut cur = img.clone();
    if w != cur.width() {
        let coef = coefficients(cur.width(), w);
        let src = &cur;
        cur = RgbImage::from_fn(w, src.height(), |x, y| {
            let (start, k) = &coef[x as usize];
            let mut acc = [half; 3];
            for (i, &wt) in k.iter().enumerate() {
                let p = src.get_pixel((start + i) as u32, y);
                for c in 0..3 {
                    acc[c] += p[c] as i64 * wt;
                }
            }
            image::Rgb(acc.map(clip8))
        });
    }
    if h != cur.height() {
        let coef = coefficients(cur.height(), h);
        let src = &cur;
        cur = RgbImage::from_fn(src.width(), h, |x, y| {
            let (start, k) = &coef[y as usize];
            let mut acc = [half; 3];
            for (i, &wt) in k.iter().enumerate() {
                let p = src.get_pixel(x, (start + i) as u32);
                for c in 0..3 {
                    acc[c] += p[c] as i64 * wt;
                }
            }
            image::Rgb(acc.map(clip8))
        });
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_follow_transformers() {
        assert_eq!(shortest_edge_size(48, 40, 32), (38, 32));
        assert_eq!(shortest_edge_size(37, 53, 32), (32, 45));
        assert_eq!(shortest_edge_size(512, 512, 224), (224, 224));
        assert_eq!(shortest_edge_size(640, 480, 256), (341, 256));
    }

    #[test]
    fn resizing_a_flat_image_keeps_its_colour() {
        let img = RgbImage::from_pixel(50, 30, image::Rgb([10, 128, 250]));
        let out = resize_bicubic(&img, 17, 41);
        assert_eq!(out.dimensions(), (17, 41));
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }

    #[test]
    fn masked_out_pixels_normalize_to_about_zero() {
        let p = Preprocess {
            shortest_edge: 8,
            crop: 8,
            mean: OPENAI_MEAN,
            std: OPENAI_STD,
        };
        let img = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]));
        let mask = GrayImage::new(8, 8);
        let t = p.tensor(&img, Some(&mask), &Device::Cpu).unwrap();
        let max = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Half a level of rounding of the mean colour, after dividing by std.
        assert!(max < 0.5 / 255.0 / 0.26, "{max}");
    }
}
