//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_sd() -> String {
    fixtures().join("tiny-sd").to_string_lossy().into_owned()
}

pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("parity.safetensors"), &Device::Cpu)
        .expect("parity fixture")
}

/// Largest |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    max_abs(&(a - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// Largest |x| over all elements (to show a difference is small relative to the values).
pub fn max_abs(a: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().abs().unwrap();
    a.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magictailor"))
}

pub fn read_png(path: &std::path::Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// Largest per-channel difference between two images of the same size.
pub fn png_max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}
