//! `masks/preview.png`: each reference image beside its mask and the mask's overlay,
//! labelled with the class word, so a person checks every mask at a glance.

use candle_core::Tensor;
use image::imageops::FilterType;
use image::{GrayImage, Rgb, RgbImage};

use super::pair::ImageMask;
use super::Binary;
use crate::error::Result;
use crate::preview::grid::Grid;

/// The thumbnails' side.
const THUMB: u32 = 192;
/// The overlay's tint on the region to learn, and how much of it.
const TINT: [f32; 3] = [255.0, 40.0, 40.0];
const TINT_SHARE: f32 = 0.45;

/// The sheet for `masks`, whose crops (`[3, R, R]` in [-1, 1]) are `pixels`.
pub fn sheet(masks: &[ImageMask], pixels: &[&Tensor], title: &str) -> Result<RgbImage> {
    let mut rows = Vec::with_capacity(masks.len());
    let mut cells = Vec::with_capacity(3 * masks.len());
    for (m, px) in masks.iter().zip(pixels) {
        let name = m
            .image
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        rows.push(format!("{name}: {}", m.class_word));
        let image = thumbnail(&crate::data::rgb_image(px)?);
        let mask = thumbnail_mask(&m.crop);
        cells.push(overlay(&image, &mask));
        cells.push(image::DynamicImage::ImageLuma8(mask).to_rgb8());
        cells.push(image);
    }
    let cols = ["overlay (red = learned)", "mask", "image"].map(String::from);
    Grid {
        title,
        rows: &rows,
        cols: &cols,
        cells: &cells,
    }
    .render()
}

fn thumbnail(img: &RgbImage) -> RgbImage {
    image::imageops::resize(img, THUMB, THUMB, FilterType::Triangle)
}

fn thumbnail_mask(m: &Binary) -> GrayImage {
    let full = GrayImage::from_fn(m.width as u32, m.height as u32, |x, y| {
        image::Luma([if m.bits[y as usize * m.width + x as usize] {
            255
        } else {
            0
        }])
    });
    image::imageops::resize(&full, THUMB, THUMB, FilterType::Nearest)
}

/// Tints the masked region and darkens the rest, so both the kept and the dropped parts
/// stay recognisable.
fn overlay(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let inside = mask.get_pixel(x, y).0[0] >= 128;
        Rgb(std::array::from_fn(|c| {
            let v = p[c] as f32;
            let out = if inside {
                v * (1.0 - TINT_SHARE) + TINT[c] * TINT_SHARE
            } else {
                v * 0.5
            };
            out.round().clamp(0.0, 255.0) as u8
        }))
    })
}
