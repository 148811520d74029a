//! Synthetic pair folders for tests, benches and examples. A [`PairSpec`] says what each
//! image shows ([`Picture`]), its size and file [`Format`], and which masks exist;
//! [`pair_folder`] writes it in the published layout through the product's writer
//! (`data::synthetic`, which also writes `doctor --estimate`'s pair, the benches' one).
//! Failures panic: this is test code.

use std::path::{Path, PathBuf};

use image::{ImageBuffer, Rgb, RgbImage, Rgba};

use crate::data::synthetic::{self, Disc};

/// What an image shows. Its mask marks the picture's "object".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Picture {
    /// A disc of this colour (radius 5/16 of the short side) on a sky-blue background,
    /// centred but moved right by the image's number (1, 2, ...) so no two are equal.
    /// The object is the disc.
    Disc([u8; 3]),
    /// Left half red, right half blue. The object is the red half.
    RedBlue,
}

impl Picture {
    /// The product's disc for `Disc` (moved 1 px per image number).
    fn disc(colour: [u8; 3]) -> Disc {
        Disc { colour, shift: 1 }
    }

    /// Whether pixel (x, y) of picture number `k` at `size` belongs to its object.
    fn contains(self, k: u32, size: (u32, u32), x: u32, y: u32) -> bool {
        match self {
            Picture::Disc(colour) => Self::disc(colour).contains(k, size, x, y),
            Picture::RedBlue => x < size.0 / 2,
        }
    }

    /// Picture number `k` at `size`.
    fn rgb(self, k: u32, size: (u32, u32)) -> RgbImage {
        match self {
            Picture::Disc(colour) => Self::disc(colour).image(k, size),
            Picture::RedBlue => ImageBuffer::from_fn(size.0, size.1, |x, y| {
                Rgb(if self.contains(k, size, x, y) {
                    [255, 0, 0]
                } else {
                    [0, 0, 255]
                })
            }),
        }
    }
}

/// How an image file is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    Png,
    /// 16-bit RGBA PNG (alpha 30000 of 65535), to check alpha and depth are dropped.
    Png16Rgba,
    Jpeg,
    /// A JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6).
    JpegRotated,
    /// Lossless WebP.
    WebP,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png | Format::Png16Rgba => "png",
            Format::Jpeg | Format::JpegRotated => "jpg",
            Format::WebP => "webp",
        }
    }
}

/// One reference image of a pair folder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairImage {
    pub size: (u32, u32),
    pub format: Format,
    pub picture: Picture,
}

/// A pair folder in the published layout: `{names joined by +}/{s}_{name}{k}.{ext}` for
/// sample `s` and image `k` (from 1), masks as `masks/{s}_{name}{k}.png`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSpec {
    /// Per sample: its `{class}_{id}` name and its images.
    pub samples: Vec<(&'static str, Vec<PairImage>)>,
    /// Write a mask per image (white = the picture's object).
    pub masks: bool,
    /// The masks' size; `None`: each image's own size.
    pub mask_size: Option<(u32, u32)>,
    /// Also write `masks/others/unrelated.png` (all black), which the loader must ignore.
    pub other_masks: bool,
}

impl PairSpec {
    /// person_k+hair_c: `per_sample` discs per sample (skin-coloured person, dark hair),
    /// each with its disc as mask.
    pub fn discs(size: (u32, u32), format: Format, per_sample: usize) -> Self {
        let disc = |colour| PairImage {
            size,
            format,
            picture: Picture::Disc(colour),
        };
        Self {
            samples: vec![
                ("person_k", vec![disc([200, 150, 120]); per_sample]),
                ("hair_c", vec![disc([40, 30, 20]); per_sample]),
            ],
            masks: true,
            mask_size: None,
            other_masks: false,
        }
    }

    /// The training tests' folder (and `examples/step_grads.rs`'s default): 2 + 2 discs,
    /// 80x64 PNG, masked.
    pub fn training() -> Self {
        Self::discs((80, 64), Format::Png, 2)
    }

    /// The file name of image `k` (from 1) of sample `s`, without extension.
    pub fn stem(&self, s: usize, k: usize) -> String {
        synthetic::stem(s, self.samples[s].0, k)
    }
}

/// Writes the pair folder `spec` describes under `root` and returns its path.
pub fn pair_folder(root: &Path, spec: &PairSpec) -> PathBuf {
    let counts: Vec<(&str, usize)> = spec.samples.iter().map(|(n, i)| (*n, i.len())).collect();
    let dir = synthetic::write_folder(root, &counts, spec.masks, |slot| {
        let img = spec.samples[slot.sample].1[slot.k as usize - 1];
        let file = slot.image_path(img.format.extension());
        write_image(&file, img.size, img.format, img.picture, slot.k);
        if spec.masks {
            let (w, h) = spec.mask_size.unwrap_or(img.size);
            write_mask(&slot.mask_path(), w, h, Some((img.picture, slot.k)));
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("writing a pair folder under {}: {e}", root.display()));
    if spec.other_masks {
        let others = dir.join("masks/others");
        std::fs::create_dir_all(&others).unwrap_or_else(|e| panic!("{}: {e}", others.display()));
        write_mask(&others.join("unrelated.png"), 10, 10, None);
    }
    dir
}

/// Writes picture number `k` (from 1) at `size` in `format`.
pub fn write_image(path: &Path, size: (u32, u32), format: Format, picture: Picture, k: u32) {
    let (w, h) = size;
    let rgb = picture.rgb(k, size);
    let written = match format {
        Format::Png | Format::Jpeg | Format::WebP => rgb.save(path),
        Format::Png16Rgba => ImageBuffer::from_fn(w, h, |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0.map(|v| v as u16 * 257);
            Rgba([r, g, b, 30000u16])
        })
        .save(path),
        Format::JpegRotated => {
            std::fs::write(path, exif_rotated_jpeg(rgb)).map_err(image::ImageError::IoError)
        }
    };
    written.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A `w`x`h` mask, white where picture number `k` has its object; all black for `None`.
pub fn write_mask(path: &Path, w: u32, h: u32, object: Option<(Picture, u32)>) {
    synthetic::mask((w, h), |x, y| {
        object.is_some_and(|(p, k)| p.contains(k, (w, h), x, y))
    })
    .save(path)
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The JPEG of `img` with an EXIF APP1 segment saying orientation 6.
fn exif_rotated_jpeg(img: RgbImage) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .expect("encoding a JPEG in memory");
    let mut tiff = b"II*\0\x08\0\0\0\x01\0".to_vec(); // little endian, IFD at 8, one entry
    tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]); // Orientation (0x0112), SHORT, 1, value 6
    tiff.extend([0, 0, 0, 0]); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend([0xFF, 0xE1]);
    out.extend(len.to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}
