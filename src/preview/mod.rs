//! Pictures a person looks at instead of numbers: labelled sample grids, the loss plot,
//! and TensorBoard event files.

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

/// An image (RGB, or grey for masks) as PNG bytes.
pub fn png_bytes<P>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::internal(format!("encoding a PNG: {e}")))?;
    Ok(bytes)
}
