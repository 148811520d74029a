//! Pair folders: the published layout, image normalization, and every bad folder the
//! training issue lists, each refused with the file named.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp};
use common::*;
use magictailor::data::{load_rgb, MaskPolicy, PairDataset};

/// person_k+hair_c with 2 + 1 images of mixed kinds (a 60x40 PNG, an EXIF-rotated 40x20
/// JPEG, a 16-bit RGBA PNG), each red on its left half, blue on its right; 60x40 masks
/// (left half white), so masks need not match their image's size; and an unrelated mask
/// in masks/others/ that must never be read.
fn pair(root: &Path) -> PathBuf {
    let img = |size, format| PairImage {
        size,
        format,
        picture: Picture::RedBlue,
    };
    let spec = PairSpec {
        samples: vec![
            (
                "person_k",
                vec![
                    img((60, 40), Format::Png),
                    img((40, 20), Format::JpegRotated),
                ],
            ),
            ("hair_c", vec![img((30, 30), Format::Png16Rgba)]),
        ],
        masks: true,
        mask_size: Some((60, 40)),
        other_masks: true,
    };
    pair_folder(root, &spec)
}

/// A `w`x`h` mask, white on its left half.
fn half_mask(path: &Path, w: u32, h: u32) {
    write_mask(path, w, h, Some((Picture::RedBlue, 1)));
}

#[test]
fn reads_the_published_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pair(tmp.path());
    let ds = PairDataset::load(
        &dir,
        16,
        MaskPolicy::Required {
            model: "tiny-random".into(),
        },
        &Device::Cpu,
    )
    .unwrap();
    let words: Vec<&str> = ds.samples.iter().map(|s| s.class_word.as_str()).collect();
    assert_eq!(words, ["person", "hair"]);
    assert_eq!(ds.samples[0].images.len(), 2);
    assert_eq!(ds.samples[1].images.len(), 1);
    assert_eq!(ds.num_images(), 3);
    for (_, im) in ds.images() {
        assert_eq!(im.pixels.dims(), [3, 16, 16]);
        assert_eq!(im.mask.dims(), [1, 16, 16]);
        let v = im.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        let m = im.mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(m.iter().all(|x| *x == 0.0 || *x == 1.0));
    }
    // 60x40 -> 24x16 -> centre crop: the red/blue edge sits at column 8 of 16.
    let p = &ds.samples[0].images[0].pixels;
    let red = |t: &candle_core::Tensor, y: usize, x: usize| {
        t.i((0, y, x)).unwrap().to_scalar::<f32>().unwrap()
    };
    assert!(red(p, 8, 6) > 0.9 && red(p, 8, 10) < -0.9);
    // EXIF orientation 6: the red left half of the stored 40x20 image ends up on top.
    let r = &ds.samples[0].images[1].pixels;
    assert!(
        red(r, 2, 8) > 0.8 && red(r, 13, 8) < -0.8,
        "EXIF rotation applied"
    );
    // 16-bit RGBA (red on the left) becomes plain RGB.
    assert!(red(&ds.samples[1].images[0].pixels, 5, 5) > 0.99);
}

#[test]
fn no_masks_uses_whole_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pair(tmp.path());
    std::fs::remove_dir_all(dir.join("masks")).unwrap();
    assert!(PairDataset::load(
        &dir,
        16,
        MaskPolicy::Required {
            model: "tiny-random".into()
        },
        &Device::Cpu
    )
    .unwrap_err()
    .to_string()
    .contains("--no-masks"));
    let ds = PairDataset::load(&dir, 16, MaskPolicy::WholeImage, &Device::Cpu).unwrap();
    let m = ds.samples[1].images[0]
        .mask
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(m, 256.0);
}

fn refused(dir: &Path, needle: &str) {
    let err = PairDataset::load(
        dir,
        16,
        MaskPolicy::Required {
            model: "tiny-random".into(),
        },
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn bad_folders_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();

    let plain = tmp.path().join("person_k");
    std::fs::create_dir(&plain).unwrap();
    refused(&plain, "person_k+hair_c");

    let dir = pair(&tmp.path().join("a"));
    std::fs::remove_file(dir.join("1_hair_c1.png")).unwrap();
    std::fs::remove_file(dir.join("masks/1_hair_c1.png")).unwrap();
    refused(&dir, "sample 1 (hair) has no images");

    let dir = pair(&tmp.path().join("b"));
    std::fs::write(dir.join("0_person_k1.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    refused(&dir, "0_person_k1.png");

    let dir = pair(&tmp.path().join("c"));
    half_mask(&dir.join("masks/0_person_k9.png"), 8, 8);
    refused(&dir, "masks/0_person_k9.png has no reference image");

    let dir = pair(&tmp.path().join("d"));
    std::fs::remove_file(dir.join("masks/0_person_k2.png")).unwrap();
    refused(&dir, "but not for 0_person_k2");

    let dir = pair(&tmp.path().join("e"));
    write_mask(&dir.join("masks/1_hair_c1.png"), 8, 8, None);
    refused(&dir, "1_hair_c1.png is entirely black");

    let dir = pair(&tmp.path().join("f"));
    write_image(
        &dir.join("2_ears_x1.png"),
        (8, 8),
        Format::Png,
        Picture::RedBlue,
        1,
    );
    refused(&dir, "2_ears_x1.png belongs to sample 2");
}

/// A cut image is refused with its file named, never trained on as partial or grey
/// pixels. The JPEG decoder fills a truncated scan with grey instead of failing, so a
/// JPEG missing only its 2-byte end-of-image marker is the subtle case; PNG and lossless
/// WebP cut in half must fail too. The uncut JPEG loads (the check is not "any JPEG").
#[test]
fn truncated_images_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let write = |name: &str, format| {
        let p = tmp.path().join(name);
        write_image(&p, (64, 48), format, Picture::Disc([200, 150, 120]), 1);
        p
    };
    let whole = write("whole.jpg", Format::Jpeg);
    assert!(
        read_bytes(&whole).ends_with(&[0xFF, 0xD9]),
        "the image crate's JPEG ends with its EOI marker"
    );
    assert_eq!(load_rgb(&whole, 16, &dev).unwrap().dims(), [3, 16, 16]);

    // (file name, format, how many of its n bytes to keep)
    type Case = (&'static str, Format, fn(usize) -> usize);
    let cases: [Case; 4] = [
        ("jpeg_third.jpg", Format::Jpeg, |n| n / 3),
        ("jpeg_no_eoi.jpg", Format::Jpeg, |n| n - 2),
        ("png_half.png", Format::Png, |n| n / 2),
        ("webp_half.webp", Format::WebP, |n| n / 2),
    ];
    for (name, format, keep) in cases {
        let p = write(name, format);
        if format == Format::WebP {
            // The image crate's WebP encoder is lossless: a VP8L chunk.
            assert_eq!(&read_bytes(&p)[12..16], b"VP8L", "{name}");
        }
        truncate_file(&p, keep(read_bytes(&p).len()));
        let err = load_rgb(&p, 16, &dev)
            .err()
            .unwrap_or_else(|| panic!("{name}: a truncated image loaded"))
            .to_string();
        assert!(err.contains(name), "{name} not named in: {err}");
        assert!(
            err.contains("truncated"),
            "{name}: the likely cause is said: {err}"
        );
    }

    // The same through a whole pair folder of JPEGs: the cut file is named.
    let dir = pair_folder(
        &tmp.path().join("jpegs"),
        &PairSpec::discs((64, 48), Format::Jpeg, 1),
    );
    let cut = dir.join("1_hair_c1.jpg");
    truncate_file(&cut, read_bytes(&cut).len() - 2);
    refused(&dir, "1_hair_c1.jpg");
}
