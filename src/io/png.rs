//! Images as PNG files' bytes: plain (masks, grids, plots), or carrying text chunks
//! (what made a generated image), for `write_atomic` to put on disk.

use crate::error::{Error, Result};

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

/// An RGB image as PNG bytes carrying `text` chunks `(keyword, text)`: tEXt where the
/// text is Latin-1 (what most readers expect), iTXt (UTF-8) otherwise.
pub fn png_with_text(img: &image::RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
    let fail = |e: png::EncodingError| Error::internal(format!("encoding a PNG: {e}"));
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        if value.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(key.clone(), value.clone())
                .map_err(fail)?;
        } else {
            enc.add_itxt_chunk(key.clone(), value.clone())
                .map_err(fail)?;
        }
    }
    let mut w = enc.write_header().map_err(fail)?;
    w.write_image_data(img.as_raw()).map_err(fail)?;
    w.finish().map_err(fail)?;
    Ok(bytes)
}
