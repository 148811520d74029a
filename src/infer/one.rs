//! `infer --prompt`: one prompt's images, from seeded noise or given latents, each PNG
//! carrying what made it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::provenance::Provenance;
use super::sampling::denoising_ticker;
use super::{seeded_latents, Drawn, InferOptions, One, Personalized, Prompted, Sources};
use crate::error::{Error, Result};
use crate::io::leftovers::{remove_orphans, Scope};
use crate::io::{tensors, write_atomic};

/// Refuses an output name whose bytes would not be what it says (before any model loads).
pub(super) fn check_out(one: &One) -> Result<()> {
    let ext = (one.out.extension()).map(|e| e.to_string_lossy().to_lowercase());
    if ext.as_deref() == Some("png") {
        return Ok(());
    }
    Err(Error::usage(format!(
        "--out {}: magictailor writes PNG images (lossless, with their prompt and seed \
         inside); name the file .png.",
        one.out.display()
    )))
}

pub(super) fn draw(
    p: &Personalized,
    opts: &InferOptions,
    one: &One,
    src: &Sources,
) -> Result<Vec<PathBuf>> {
    p.weights().check_prompt(&one.prompt)?;
    let latents = initial_latents(p, opts, one)?;
    let prompted = Prompted::new(p, &one.prompt, &opts.sampling)?;
    let bar = denoising_ticker(prompted.total_steps(), opts.progress);
    let drawn = prompted.draw(latents, || bar.inc(1))?;
    bar.finish();
    if let Some(dir) = one.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        remove_orphans(dir, Scope::Folder);
    }
    let paths = output_paths(&one.out, drawn.images.len());
    for (i, path) in paths.iter().enumerate() {
        let made = Provenance::new(&one.prompt, one.seed + i as u64, opts, src);
        write_drawn(&drawn, i, path, &made, opts.save_masks)?;
    }
    Ok(paths)
}

/// Image `i` of `drawn` at `path`, after its companions (the layout image, the blend
/// mask on request) so that an existing image means a complete set.
pub(super) fn write_drawn(
    drawn: &Drawn,
    i: usize,
    path: &Path,
    made: &Provenance,
    save_masks: bool,
) -> Result<()> {
    let chunks = made.chunks();
    if let Some(layouts) = &drawn.layouts {
        let png = crate::io::png::png_with_text(&layouts[i], &made.layout_chunks())?;
        write_atomic(&companion(path, COMPANION_LAYOUT), &png)?;
    }
    if let (true, Some(masks)) = (save_masks, &drawn.masks) {
        let (w, h) = drawn.images[i].dimensions();
        let preview = crate::preview::mask_image(&masks[i], drawn.mask_size, (w, h));
        write_atomic(
            &companion(path, COMPANION_MASK),
            &crate::io::png::png_bytes(&preview)?,
        )?;
    }
    write_atomic(
        path,
        &crate::io::png::png_with_text(&drawn.images[i], &chunks)?,
    )
}

/// The retouch stage's layout image beside an image (`result-layout.png`).
pub const COMPANION_LAYOUT: &str = "layout";
/// Its blend mask (`--save-masks`).
pub const COMPANION_MASK: &str = "mask";

/// `dir/name-{what}.png` beside `dir/name.png`.
pub fn companion(image: &Path, what: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!("{stem}-{what}.png"))
}

/// Seeded Gaussian latents (image i from seed + i, so each can be drawn again alone with
/// `--seed`), or the `latents` tensor of `--init-latents`.
fn initial_latents(p: &Personalized, opts: &InferOptions, one: &One) -> Result<Tensor> {
    let (c, h, w) = opts.sampling.latent_shape(&p.sd)?;
    let Some(file) = &one.init_latents else {
        let seeds: Vec<u64> = (0..one.num_images as u64).map(|i| one.seed + i).collect();
        return seeded_latents(&seeds, (c, h, w), &opts.device);
    };
    let tensors = tensors::read_floats(file, &opts.device, &[])?;
    let t = tensors.get("latents").ok_or_else(|| {
        Error::usage(format!(
            "{} has no tensor named \"latents\" (it has: {:?}).",
            file.display(),
            tensors.keys().collect::<Vec<_>>()
        ))
    })?;
    let want = [one.num_images, c, h, w];
    if t.dims() != want {
        return Err(Error::usage(format!(
            "{}: latents have shape {:?}, but --num-images {} at {}x{} needs {want:?} (images, latent channels, \
             height / {f}, width / {f}).",
            file.display(),
            t.dims(),
            one.num_images,
            opts.sampling.width,
            opts.sampling.height,
            f = p.sd.vae_factor()
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Numbered files (`name-0.png`, ...) when there are several images.
fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "result".into());
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}
