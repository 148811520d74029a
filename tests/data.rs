//! Pair folders: the published layout, image normalization, and every bad folder the
//! training issue lists, each refused with the file named.

use std::path::Path;

use candle_core::{Device, IndexOp};
use image::{ImageBuffer, Luma, Rgb, Rgba};
use magictailor::data::{MaskPolicy, PairDataset};

fn rgb(path: &Path, w: u32, h: u32) {
    ImageBuffer::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgb([255u8, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    })
    .save(path)
    .unwrap();
}

fn mask(path: &Path, w: u32, h: u32, white: bool) {
    ImageBuffer::from_fn(w, h, |x, _| {
        Luma([if white && x < w / 2 { 255u8 } else { 0 }])
    })
    .save(path)
    .unwrap();
}

/// A JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6).
fn rotated_jpeg(path: &Path, w: u32, h: u32) {
    let img = ImageBuffer::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgb([255u8, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
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
    std::fs::write(path, out).unwrap();
}

/// person_k+hair_c with 2 + 1 images of mixed kinds and a mask each.
fn pair(root: &Path) -> std::path::PathBuf {
    let dir = root.join("person_k+hair_c");
    std::fs::create_dir_all(dir.join("masks/others")).unwrap();
    rgb(&dir.join("0_person_k1.png"), 60, 40);
    rotated_jpeg(&dir.join("0_person_k2.jpg"), 40, 20);
    // 16-bit RGBA component image.
    ImageBuffer::from_fn(30, 30, |_, _| Rgba([65535u16, 0, 0, 30000]))
        .save(dir.join("1_hair_c1.png"))
        .unwrap();
    for s in ["0_person_k1", "0_person_k2", "1_hair_c1"] {
        mask(&dir.join(format!("masks/{s}.png")), 60, 40, true);
    }
    mask(&dir.join("masks/others/unrelated.png"), 10, 10, false); // never read
    dir
}

#[test]
fn reads_the_published_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pair(tmp.path());
    let ds = PairDataset::load(&dir, 16, MaskPolicy::Required, &Device::Cpu).unwrap();
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
    // 16-bit RGBA becomes plain RGB.
    assert!(red(&ds.samples[1].images[0].pixels, 5, 5) > 0.99);
}

#[test]
fn no_masks_uses_whole_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pair(tmp.path());
    std::fs::remove_dir_all(dir.join("masks")).unwrap();
    assert!(
        PairDataset::load(&dir, 16, MaskPolicy::Required, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("--no-masks")
    );
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
    let err = PairDataset::load(dir, 16, MaskPolicy::Required, &Device::Cpu)
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
    mask(&dir.join("masks/0_person_k9.png"), 8, 8, true);
    refused(&dir, "masks/0_person_k9.png has no reference image");

    let dir = pair(&tmp.path().join("d"));
    std::fs::remove_file(dir.join("masks/0_person_k2.png")).unwrap();
    refused(&dir, "0_person_k2.jpg has no mask");

    let dir = pair(&tmp.path().join("e"));
    mask(&dir.join("masks/1_hair_c1.png"), 8, 8, false);
    refused(&dir, "1_hair_c1.png is entirely black");

    let dir = pair(&tmp.path().join("f"));
    rgb(&dir.join("2_ears_x1.png"), 8, 8);
    refused(&dir, "2_ears_x1.png belongs to sample 2");
}
