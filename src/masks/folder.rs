//! A masks folder is replaced as a whole: every mask and the preview are written into a
//! staging folder beside it, which then takes the folder's name. A failure on the way
//! leaves the old folder (or none) and a staging folder that names itself, never a mix.

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};

use crate::data::PREVIEW_STEM;
use crate::error::{Error, IoOp, Result};
use crate::io::png::png_bytes;
use crate::io::write_atomic;

const MASK_EXTS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The mask files `target` already holds for any of `stems`.
pub fn existing(target: &Path, stems: &[String]) -> Vec<PathBuf> {
    stems
        .iter()
        .flat_map(|s| MASK_EXTS.map(|e| target.join(format!("{s}.{e}"))))
        .filter(|p| p.is_file())
        .collect()
}

/// Refuses a target that exists but is not a folder.
pub fn check_target(target: &Path) -> Result<()> {
    if target.exists() && !target.is_dir() {
        return Err(Error::usage(format!(
            "{} is a file, not a folder: pass --out with a folder for the masks.",
            target.display()
        )));
    }
    Ok(())
}

/// Writes `masks` (`{stem}.png`) and `preview.png` into `target` in one change, keeping
/// whatever else it held (e.g. `others/`). Returns the masks' paths.
pub fn write(
    target: &Path,
    masks: &[(String, GrayImage)],
    preview: &RgbImage,
) -> Result<Vec<PathBuf>> {
    check_target(target)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "masks".into());
    let parent = target.parent().unwrap_or(Path::new("."));
    let staging = parent.join(crate::io::leftovers::temp_name(&name, "partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(IoOp::CreateDir, &staging, e))?;
    let mut written = Vec::with_capacity(masks.len());
    for (stem, mask) in masks {
        let file = format!("{stem}.png");
        write_atomic(&staging.join(&file), &png_bytes(mask)?)?;
        written.push(target.join(file));
    }
    let preview_file = format!("{PREVIEW_STEM}.png");
    write_atomic(&staging.join(&preview_file), &png_bytes(preview)?)?;
    carry_over(target, &staging, masks)?;
    let old = parent.join(crate::io::leftovers::temp_name(&name, "old"));
    swap_in(&staging, target, old)?;
    Ok(written)
}

/// Moves the entries of `target` that the new masks do not replace into `staging`.
fn carry_over(target: &Path, staging: &Path, masks: &[(String, GrayImage)]) -> Result<()> {
    if !target.is_dir() {
        return Ok(());
    }
    let replaced = |p: &Path| {
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
        let is_mask_file = p.is_file()
            && p.extension()
                .is_some_and(|e| MASK_EXTS.contains(&e.to_string_lossy().to_lowercase().as_str()));
        is_mask_file
            && stem.is_some_and(|s| s == PREVIEW_STEM || masks.iter().any(|(m, _)| *m == s))
    };
    for entry in std::fs::read_dir(target).map_err(|e| Error::io(IoOp::List, target, e))? {
        let path = entry.map_err(|e| Error::io(IoOp::List, target, e))?.path();
        if replaced(&path) {
            continue;
        }
        if let Some(n) = path.file_name() {
            let to = staging.join(n);
            std::fs::rename(&path, &to).map_err(|e| Error::io(IoOp::Rename, &to, e))?;
        }
    }
    Ok(())
}

/// `staging` becomes `target`; an old `target` is moved aside first and then removed.
fn swap_in(staging: &Path, target: &Path, aside: PathBuf) -> Result<()> {
    let had_old = target.exists();
    if had_old {
        std::fs::rename(target, &aside).map_err(|e| Error::io(IoOp::Rename, &aside, e))?;
    }
    if let Err(e) = std::fs::rename(staging, target) {
        if had_old {
            let _ = std::fs::rename(&aside, target);
        }
        return Err(Error::io(IoOp::Rename, target, e));
    }
    if had_old {
        std::fs::remove_dir_all(&aside).map_err(|e| Error::io(IoOp::Write, &aside, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_masks_keeps_the_rest_and_leaves_no_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("masks");
        std::fs::create_dir_all(target.join("others")).unwrap();
        std::fs::write(target.join("others/x.png"), b"keep").unwrap();
        std::fs::write(target.join("0_a.png"), b"old").unwrap();
        std::fs::write(target.join("0_a.jpg"), b"old jpg").unwrap();
        let m = GrayImage::from_pixel(4, 4, image::Luma([255]));
        let preview = RgbImage::new(2, 2);
        let written = write(&target, &[("0_a".into(), m.clone())], &preview).unwrap();
        assert_eq!(written, [target.join("0_a.png")]);
        assert_eq!(std::fs::read(target.join("others/x.png")).unwrap(), b"keep");
        assert!(
            !target.join("0_a.jpg").exists(),
            "a stale mask of another format stays"
        );
        assert_eq!(image::open(target.join("0_a.png")).unwrap().to_luma8(), m);
        assert!(target.join("preview.png").is_file());
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["masks"], "staging or old folders left behind");
    }

    #[test]
    fn existing_finds_masks_of_any_format() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("0_a.jpg"), b"x").unwrap();
        let found = existing(tmp.path(), &["0_a".into(), "1_b".into()]);
        assert_eq!(found, [tmp.path().join("0_a.jpg")]);
    }
}
