//! `infer --prompts-file`: every prompt x every seed in one process, the model loaded and
//! each prompt encoded once, images denoised `--batch-size` at a time.
//!
//! Files are `OUT_DIR/promptNN/seedNN.png`; `manifest.jsonl` says how each was made. An
//! image that exists is skipped, so an interrupted run continues where it stopped. Each
//! image is the one `infer --prompt P --seed S` draws alone.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::one::{COMPANION_LAYOUT, COMPANION_MASK};
use super::provenance::Provenance;
use super::{seeded_latents, InferOptions, Personalized, Prompted, Sources};
use crate::error::{Error, Result};
use crate::io::png::png_bytes;
use crate::io::write_atomic;
use crate::preview::grid::Grid;

/// The prompt-list mode's settings.
#[derive(Debug, Clone)]
pub struct Many {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    /// Images denoised together.
    pub batch_size: usize,
    pub out_dir: PathBuf,
    /// A labelled contact sheet per prompt, `promptNN/grid.png`.
    pub grid: bool,
}

impl Many {
    /// `infer --prompts-file`'s defaults for what the file does not say.
    pub fn new(prompts: Vec<String>, seeds: Vec<u64>) -> Self {
        Self {
            prompts,
            seeds,
            batch_size: 4,
            out_dir: PathBuf::from(super::DEFAULT_OUT_DIR),
            grid: false,
        }
    }
}

/// One line of `manifest.jsonl`.
#[derive(Serialize)]
struct Entry<'a> {
    file: String,
    prompt_index: usize,
    prompt: &'a str,
    seed: u64,
    negative_prompt: &'a str,
    model: &'a str,
    lora: Option<String>,
    embeds: Option<String>,
    /// SDXL: the second encoder's rows, when read from a file of their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    embeds_2: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_diffusion: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_delta: Option<String>,
    /// The training checkpoint sampled instead of the final weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<String>,
    steps: usize,
    guidance: f64,
    width: usize,
    height: usize,
    layout_steps: usize,
    /// The retouch stage's settings and the layout image it retouched.
    #[serde(skip_serializing_if = "Option::is_none")]
    retouch: Option<&'a super::retouch::Retouch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
}

/// Where image `seed` of prompt `prompt` goes (eval reads the same names).
pub fn image_file(out: &Path, prompt: usize, seed: u64) -> PathBuf {
    out.join(format!("prompt{prompt:02}"))
        .join(format!("seed{seed:02}.png"))
}

pub(super) fn draw(
    p: &Personalized,
    opts: &InferOptions,
    many: &Many,
    src: &Sources,
) -> Result<Vec<PathBuf>> {
    for prompt in &many.prompts {
        p.weights().check_prompt(prompt)?;
        if opts.sampling.layout_steps > 0 {
            p.class_prompt(prompt)?;
        }
    }
    let shape = opts.sampling.latent_shape(&p.sd)?;
    crate::io::leftovers::remove_orphans(&many.out_dir, crate::io::leftovers::Scope::Folder);
    let todo: Vec<(usize, u64)> = (0..many.prompts.len())
        .flat_map(|i| many.seeds.iter().map(move |&s| (i, s)))
        .filter(|&(i, s)| !image_file(&many.out_dir, i, s).is_file())
        .collect();
    let bar = crate::io::progress::ticker("images", todo.len() as u64, 0, 1, opts.progress);
    for (i, prompt) in many.prompts.iter().enumerate() {
        let seeds: Vec<u64> = todo.iter().filter(|t| t.0 == i).map(|t| t.1).collect();
        if seeds.is_empty() {
            continue;
        }
        let prompted = Prompted::new(p, prompt, &opts.sampling)?;
        for chunk in seeds.chunks(many.batch_size.max(1)) {
            let noise = seeded_latents(chunk, shape, &p.sd.device)?;
            let drawn = prompted.draw(noise, || {})?;
            for (j, &s) in chunk.iter().enumerate() {
                let made = Provenance::new(prompt, s, opts, src);
                let file = image_file(&many.out_dir, i, s);
                super::one::write_drawn(&drawn, j, &file, &made, opts.save_masks)?;
            }
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish();
    write_manifest(opts, many, src)?;
    if many.grid {
        for (i, prompt) in many.prompts.iter().enumerate() {
            contact_sheet(many, i, prompt)?;
        }
    }
    let all = (0..many.prompts.len()).flat_map(|i| many.seeds.iter().map(move |&s| (i, s)));
    Ok(all.map(|(i, s)| image_file(&many.out_dir, i, s)).collect())
}

/// Every image of the run, existing or new, with how it was made.
fn write_manifest(opts: &InferOptions, many: &Many, src: &Sources) -> Result<()> {
    let path_str = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let o = &opts.sampling;
    let mut text = String::new();
    for (i, prompt) in many.prompts.iter().enumerate() {
        for &seed in &many.seeds {
            let entry = Entry {
                file: format!("prompt{i:02}/seed{seed:02}.png"),
                prompt_index: i,
                prompt,
                seed,
                negative_prompt: &o.negative_prompt,
                model: &src.model,
                lora: path_str(&src.lora),
                embeds: path_str(&src.embeds),
                embeds_2: path_str(&src.embeds_2),
                custom_diffusion: path_str(&src.custom_diffusion),
                full_delta: path_str(&src.full_delta),
                checkpoint: src
                    .checkpoint
                    .as_ref()
                    .map(|(f, _)| f.display().to_string()),
                steps: o.steps,
                guidance: o.guidance,
                width: o.width,
                height: o.height,
                layout_steps: o.layout_steps,
                retouch: o.retouch.as_ref(),
                layout: (o.retouch.is_some()).then(|| companion(i, seed, COMPANION_LAYOUT)),
                mask: Some(companion(i, seed, COMPANION_MASK))
                    .filter(|m| opts.save_masks && many.out_dir.join(m).is_file()),
            };
            let line = serde_json::to_string(&entry)
                .map_err(|e| Error::internal(format!("serializing the manifest: {e}")))?;
            text.push_str(&line);
            text.push('\n');
        }
    }
    write_atomic(&many.out_dir.join("manifest.jsonl"), text.as_bytes())
}

/// The manifest's name of image `seed` of prompt `i`'s companion `what`.
fn companion(i: usize, seed: u64, what: &str) -> String {
    format!("prompt{i:02}/seed{seed:02}-{what}.png")
}

/// `promptNN/grid.png`: the prompt's images, 8 seeds a row, labelled.
fn contact_sheet(many: &Many, i: usize, prompt: &str) -> Result<()> {
    let mut cells: Vec<image::RgbImage> = Vec::new();
    for &s in &many.seeds {
        let file = image_file(&many.out_dir, i, s);
        let img = image::open(&file)
            .map_err(|e| Error::bad_file(&file, format!("{}: {e}", file.display())))?;
        cells.push(img.to_rgb8());
    }
    let cols = many.seeds.len().min(8);
    let size = cells[0].dimensions();
    while !cells.len().is_multiple_of(cols) {
        cells.push(image::RgbImage::from_pixel(
            size.0,
            size.1,
            image::Rgb([255, 255, 255]),
        ));
    }
    let rows: Vec<String> = (many.seeds.chunks(cols))
        .map(|c| {
            format!(
                "seeds {}",
                c.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let col_labels = vec![String::new(); cols];
    let grid = Grid {
        title: prompt,
        rows: &rows,
        cols: &col_labels,
        cells: &cells,
    }
    .render()?;
    let file = many.out_dir.join(format!("prompt{i:02}")).join("grid.png");
    write_atomic(&file, &png_bytes(&grid)?)
}
