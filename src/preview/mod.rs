//! Pictures a person looks at instead of numbers: labelled sample grids, the loss plot,
//! and TensorBoard event files.
//!
//! May import `io` and `error`; `train`, `infer`, `eval` and `masks` draw through it.

pub mod grid;
pub mod plot;
pub mod tensorboard;

use crate::error::{Error, Result};

/// DejaVu Sans (free license in `assets/fonts/`), built in: no system fonts needed.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub(crate) const FONT_FAMILY: &str = "magictailor-sans";

/// Registers the built-in font with plotters once per process.
pub(crate) fn font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, plotters::style::FontStyle::Normal, FONT)
            .is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| Error::internal("the built-in font does not parse"))
}

/// A soft mask in [0, 1] on a `(h, w)` grid (row-major) as a grey image of `(width,
/// height)` pixels, each pixel its cell's value (nearest): white keeps the image's own,
/// black takes the layout's.
pub fn mask_image(
    mask: &[f32],
    (h, w): (usize, usize),
    (width, height): (u32, u32),
) -> image::GrayImage {
    image::GrayImage::from_fn(width, height, |x, y| {
        let (cy, cx) = (
            y as usize * h / height as usize,
            x as usize * w / width as usize,
        );
        let v = mask.get(cy * w + cx).copied().unwrap_or(0.0);
        image::Luma([(v.clamp(0.0, 1.0) * 255.0).round() as u8])
    })
}
