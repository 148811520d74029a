//! Reading reference images and masks: any size, JPEG/PNG/WebP/BMP, grayscale, RGBA or
//! 16-bit, EXIF rotation applied; short side resized to the training resolution, then
//! centre-cropped, with the same geometry for image and mask.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder};

use crate::error::{Error, Result};

fn decode(path: &Path) -> Result<DynamicImage> {
    let unreadable = |e: String| {
        Error::usage(format!(
            "cannot read the image {} ({e}). It may be truncated or not an image: re-export it as PNG or JPEG.",
            path.display()
        ))
    };
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    // The JPEG decoder fills a truncated scan with grey instead of failing.
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(&bytes) {
        return Err(unreadable(
            "the JPEG data ends before its end-of-image marker".into(),
        ));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes));
    let mut decoder = reader
        .with_guessed_format()
        .map_err(|e| unreadable(e.to_string()))?
        .into_decoder()
        .map_err(|e| unreadable(e.to_string()))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| unreadable(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| unreadable(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// True when a JPEG's segments and entropy-coded scans run, intact, up to its
/// end-of-image marker. A file cut anywhere before it is incomplete.
fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut pos = 2; // after SOI
    loop {
        // A marker: 0xFF, optional 0xFF fill bytes, then its code.
        if b.get(pos) != Some(&0xFF) {
            return false;
        }
        while b.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&code) = b.get(pos) else {
            return false;
        };
        pos += 1;
        match code {
            0xD9 => return true,            // EOI
            0xD0..=0xD7 | 0x01 => continue, // standalone markers
            _ => {}
        }
        let Some(len) = b
            .get(pos..pos + 2)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            return false;
        };
        if len < 2 || pos + len > b.len() {
            return false;
        }
        pos += len;
        if code == 0xDA {
            // Entropy-coded data runs to the next marker that is neither a stuffed 0xFF00
            // nor a restart marker.
            loop {
                match (b.get(pos), b.get(pos + 1)) {
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => pos += 2,
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => pos += 1,
                    (None, _) => return false,
                }
            }
        }
    }
}

/// Short side to `size` (bilinear with antialiasing, as torchvision's Resize), centre crop.
fn square(img: &DynamicImage, size: usize) -> DynamicImage {
    cover(img, size, size)
}

/// Scaled (bilinear with antialiasing) to cover `width x height`, then centre-cropped to it.
fn cover(img: &DynamicImage, width: usize, height: usize) -> DynamicImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let scale = (width as f64 / w).max(height as f64 / h);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(width as u32),
        ((h * scale).round() as u32).max(height as u32),
    );
    let resized = img.resize_exact(nw, nh, FilterType::Triangle);
    let (x, y) = ((nw - width as u32) / 2, (nh - height as u32) / 2);
    resized.crop_imm(x, y, width as u32, height as u32)
}

/// An image's size after EXIF rotation, as `load_rgb` sees it.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let img = decode(path)?;
    Ok((img.width(), img.height()))
}

/// The centred square of a `w x h` image that `load_rgb` keeps: `(x, y, side)`.
pub fn crop_square(w: u32, h: u32) -> (u32, u32, u32) {
    let side = w.min(h);
    ((w - side) / 2, (h - side) / 2, side)
}

/// `[3, size, size]` in [-1, 1].
pub fn load_rgb(path: &Path, size: usize, device: &Device) -> Result<Tensor> {
    rgb_tensor(&decode(path)?, size, device)
}

/// `[3, height, width]` in [-1, 1]: the image scaled to cover `width x height`, then
/// centre-cropped to it (a square side gives [`load_rgb`]'s pixels).
pub fn load_rgb_sized(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    pixels(&cover(&decode(path)?, width, height), device)
}

/// [`load_rgb`] of an image already in memory.
pub fn rgb_tensor(img: &DynamicImage, size: usize, device: &Device) -> Result<Tensor> {
    pixels(&square(img, size), device)
}

/// `[3, h, w]` in [-1, 1] of an image as it is.
fn pixels(img: &DynamicImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = (img.to_rgb8().into_raw().into_iter())
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// The inverse of [`rgb_tensor`]: `[3, h, w]` in [-1, 1] -> 8-bit RGB.
pub fn rgb_image(t: &Tensor) -> Result<image::RgbImage> {
    let (_, h, w) = t.dims3()?;
    let bytes = ((t.to_dtype(candle_core::DType::F32)? + 1.0)? * 127.5)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(candle_core::DType::U8)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<u8>()?;
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| crate::error::Error::internal("image buffer size"))
}

/// `[1, size, size]` of 0/1 (white, >= 128 after resizing, is the wanted region).
pub fn load_mask(path: &Path, size: usize, device: &Device) -> Result<Tensor> {
    mask_tensor(&decode(path)?, size, device, path)
}

/// [`load_mask`] of a mask already in memory (computed masks take the same path as
/// files); `path` names it in errors.
pub fn mask_tensor(
    mask: &DynamicImage,
    size: usize,
    device: &Device,
    path: &Path,
) -> Result<Tensor> {
    let gray = square(mask, size).to_luma8();
    let data: Vec<f32> = gray
        .into_raw()
        .into_iter()
        .map(|v| if v >= 128 { 1.0 } else { 0.0 })
        .collect();
    if data.iter().all(|&v| v == 0.0) {
        return Err(Error::usage(format!(
            "the mask {} is entirely black: it selects nothing. White marks the region to learn; fix or \
             regenerate the mask.",
            path.display()
        )));
    }
    Ok(Tensor::from_vec(data, (1, size, size), device)?)
}
