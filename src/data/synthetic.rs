//! Synthetic pair folders in the published layout (this module's parent): discs on a
//! sky-blue background, each disc its image's mask. `doctor --estimate` (and the benches)
//! train on [`write_pair`]; the test kit (`testkit::pairs`, not shipped) writes its pairs
//! with the same [`write_folder`] and [`Disc`].

use std::path::{Path, PathBuf};

use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};

use crate::error::{Error, IoOp, Result};

/// Around every disc.
pub const BACKGROUND: [u8; 3] = [90, 140, 200];

/// A disc of `colour` whose radius is 5/16 of the picture's short side, centred but moved
/// right by `shift` px per image number (1, 2, ...), so no two images of a sample are equal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Disc {
    pub colour: [u8; 3],
    pub shift: u32,
}

impl Disc {
    /// Whether pixel (x, y) of picture number `k` at `size` (w, h) lies on the disc.
    pub fn contains(self, k: u32, (w, h): (u32, u32), x: u32, y: u32) -> bool {
        let r = (w.min(h) * 5 / 16) as i64;
        let (cx, cy) = ((w / 2 + k * self.shift) as i64, (h / 2) as i64);
        (x as i64 - cx).pow(2) + (y as i64 - cy).pow(2) < r * r
    }

    /// Picture number `k` at `size`: the disc on [`BACKGROUND`].
    pub fn image(self, k: u32, size: (u32, u32)) -> RgbImage {
        ImageBuffer::from_fn(size.0, size.1, |x, y| {
            Rgb(if self.contains(k, size, x, y) {
                self.colour
            } else {
                BACKGROUND
            })
        })
    }

    /// Picture number `k`'s mask at `size`: white on the disc.
    pub fn mask(self, k: u32, size: (u32, u32)) -> GrayImage {
        mask(size, |x, y| self.contains(k, size, x, y))
    }
}

/// A mask of `size` (w, h), white where `white` says, black elsewhere.
pub fn mask((w, h): (u32, u32), white: impl Fn(u32, u32) -> bool) -> GrayImage {
    ImageBuffer::from_fn(w, h, |x, y| Luma([if white(x, y) { 255u8 } else { 0 }]))
}

/// The file name, without extension, of image `k` (from 1) of sample `s` named `name`.
pub fn stem(s: usize, name: &str, k: usize) -> String {
    format!("{s}_{name}{k}")
}

/// One image of a pair folder being written (see [`write_folder`]).
pub struct Slot<'a> {
    /// The pair folder.
    pub dir: &'a Path,
    /// The sample (0: the concept) and the image's number in it (from 1).
    pub sample: usize,
    pub k: u32,
    /// `{s}_{name}{k}`: the image's file name without its extension.
    pub stem: String,
}

impl Slot<'_> {
    /// The image's path with extension `ext`.
    pub fn image_path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.stem))
    }

    /// Its mask's path: `masks/{stem}.png`.
    pub fn mask_path(&self) -> PathBuf {
        self.dir.join(format!("masks/{}.png", self.stem))
    }
}

/// Creates the pair folder `{names joined by '+'}` under `root` (and its `masks/` when
/// `masks`) and calls `write` for each image of each sample (`(name, image count)`), in
/// order; returns the folder.
pub fn write_folder(
    root: &Path,
    samples: &[(&str, usize)],
    masks: bool,
    mut write: impl FnMut(&Slot) -> Result<()>,
) -> Result<PathBuf> {
    let names: Vec<&str> = samples.iter().map(|(name, _)| *name).collect();
    let dir = root.join(names.join("+"));
    let made = if masks {
        dir.join("masks")
    } else {
        dir.clone()
    };
    std::fs::create_dir_all(&made).map_err(|e| Error::io(IoOp::CreateDir, &made, e))?;
    for (s, (name, count)) in samples.iter().enumerate() {
        for k in 1..=*count {
            let stem = stem(s, name, k);
            write(&Slot {
                dir: &dir,
                sample: s,
                k: k as u32,
                stem,
            })?;
        }
    }
    Ok(dir)
}

/// A 3+3 pair folder `person_k+hair_c` under `root` (128 px PNG discs moved 4 px per
/// image, each disc its mask): the training input of `doctor --estimate` and the benches.
pub fn write_pair(root: &Path) -> Result<PathBuf> {
    let discs = [[200, 100, 0], [200, 100, 50]].map(|colour| Disc { colour, shift: 4 });
    let size = (128, 128);
    write_folder(root, &[("person_k", 3), ("hair_c", 3)], true, |slot| {
        let disc = discs[slot.sample];
        disc.image(slot.k, size)
            .save(slot.image_path("png"))
            .and_then(|()| disc.mask(slot.k, size).save(slot.mask_path()))
            .map_err(|e| Error::internal(format!("writing the pair image {}.png: {e}", slot.stem)))
    })
}
