//! `infer --prompts-file`: every prompt x every seed in one process, the model loaded and
//! each prompt encoded once, images denoised `--batch-size` at a time.
//!
//! Files are `OUT_DIR/promptNN/seedNN.png`; `manifest.jsonl` says how each was made. An
//! image that exists is skipped, so an interrupted run continues where it stopped. Each
//! image is the one `infer --prompt P --seed S` draws alone.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use super::{
    conditions, decode, denoise_with, progress_bar, to_images, InferOptions, Personalized, Sources,
};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::preview::{grid::Grid, png_bytes};
use crate::rng::seeded_normal;

/// The prompt-list mode's settings.
#[derive(Debug, Clone)]
pub struct Many {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub batch_size: usize,
    pub out_dir: PathBuf,
    /// A labelled contact sheet per prompt, `promptNN/grid.png`.
    pub grid: bool,
}

/// One prompt per non-blank line of `file` (`#` starts a comment line); `{}` stands for
/// `placeholder`. `flag` names the option in the error for an empty file.
pub fn read_prompts(file: &Path, placeholder: &str, flag: &str) -> Result<Vec<String>> {
    Ok(read_grouped_prompts(file, placeholder, flag)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

/// [`read_prompts`], each prompt with the group a `# group: NAME` line above it names
/// ("ungrouped" before any).
pub fn read_grouped_prompts(
    file: &Path,
    placeholder: &str,
    flag: &str,
) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::read(file, e))?;
    parse_grouped_prompts(&text, placeholder, &format!("{flag} {}", file.display()))
}

/// [`read_grouped_prompts`] on the text of a prompts file, which `what` names.
pub fn parse_grouped_prompts(
    text: &str,
    placeholder: &str,
    what: &str,
) -> Result<Vec<(String, String)>> {
    let mut group = "ungrouped".to_string();
    let mut prompts = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(g) = comment.trim().strip_prefix("group:") {
                group = g.trim().to_string();
            }
        } else if !line.is_empty() {
            prompts.push((group.clone(), line.replace("{}", placeholder)));
        }
    }
    if prompts.is_empty() {
        return Err(Error::usage(format!(
            "{what}: the file has no prompts (one per line)."
        )));
    }
    Ok(prompts)
}

/// More numbers than this is a typo, not a protocol (the paper uses 32 seeds).
const MAX_SEEDS: u64 = 100_000;

/// `values` as a list flag shows them: `0,1`.
pub fn list_spec(values: &[impl ToString]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn too_many(spec: &str) -> Error {
    Error::usage(format!(
        "--seeds {spec}: more than {MAX_SEEDS} seeds; the paper's protocol uses 32 (0..31)."
    ))
}

/// `0..31` (inclusive, as the paper counts its 32 seeds), `3,5,8`, or a mix: `0..3,10`.
pub fn parse_seeds(spec: &str) -> Result<Vec<u64>> {
    parse_list(spec, "--seeds")
}

/// A list of whole numbers as every list flag takes them: `0..31` (inclusive), `3,5,8`,
/// or a mix; `flag` names it in errors.
pub fn parse_list(spec: &str, flag: &str) -> Result<Vec<u64>> {
    let bad = || {
        Error::usage(format!(
            "{flag} {spec:?}: expected numbers like 0..31 (inclusive) or 0,4,7."
        ))
    };
    let mut seeds = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b): (u64, u64) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                if b - a >= MAX_SEEDS - seeds.len().min(MAX_SEEDS as usize) as u64 {
                    return Err(too_many(spec));
                }
                seeds.extend(a..=b);
            }
            None if seeds.len() as u64 >= MAX_SEEDS => return Err(too_many(spec)),
            None => seeds.push(part.parse().map_err(|_| bad())?),
        }
    }
    if seeds.is_empty() {
        return Err(bad());
    }
    Ok(seeds)
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
    steps: usize,
    guidance: f64,
    width: usize,
    height: usize,
    layout_steps: usize,
}

/// Where image `seed` of prompt `prompt` goes (eval reads the same names).
pub fn image_file(out: &Path, prompt: usize, seed: u64) -> PathBuf {
    out.join(format!("prompt{prompt:02}"))
        .join(format!("seed{seed:02}.png"))
}

pub fn run(
    p: &Personalized,
    opts: &InferOptions,
    many: &Many,
    src: &Sources,
) -> Result<Vec<PathBuf>> {
    let w = p.weights();
    for prompt in &many.prompts {
        w.check_prompt(prompt)?;
        if opts.layout_steps > 0 {
            p.class_prompt(prompt)?;
        }
    }
    let (c, h, wd) = super::latent_shape(p, opts)?;
    crate::io::leftovers::remove_orphans(&many.out_dir, crate::io::leftovers::Scope::Folder);
    let todo: Vec<(usize, u64)> = (0..many.prompts.len())
        .flat_map(|i| many.seeds.iter().map(move |&s| (i, s)))
        .filter(|&(i, s)| !image_file(&many.out_dir, i, s).is_file())
        .collect();
    let bar = progress_bar(todo.len() as u64, "images", opts.progress);
    for (i, prompt) in many.prompts.iter().enumerate() {
        let seeds: Vec<u64> = todo.iter().filter(|t| t.0 == i).map(|t| t.1).collect();
        if seeds.is_empty() {
            continue;
        }
        let (main, layout) = conditions(p, prompt, &opts.negative_prompt, opts)?;
        for chunk in seeds.chunks(many.batch_size.max(1)) {
            let noise = (chunk.iter())
                .map(|&s| seeded_normal(s, (1, c, h, wd), &p.sd.device))
                .collect::<Result<Vec<_>>>()?;
            let x = denoise_with(&main, &layout, Tensor::cat(&noise, 0)?, opts.steps, || {})?;
            for (img, &s) in to_images(&decode(w, &x)?)?.iter().zip(chunk) {
                let made = super::provenance::Provenance {
                    prompt,
                    seed: s,
                    opts,
                    model: &src.model,
                    lora: src.lora.as_deref(),
                    embeds: src.embeds.as_deref(),
                };
                let png = crate::preview::png_with_text(img, &made.chunks())?;
                write_atomic(&image_file(&many.out_dir, i, s), &png)?;
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
    let mut text = String::new();
    for (i, prompt) in many.prompts.iter().enumerate() {
        for &seed in &many.seeds {
            let entry = Entry {
                file: format!("prompt{i:02}/seed{seed:02}.png"),
                prompt_index: i,
                prompt,
                seed,
                negative_prompt: &opts.negative_prompt,
                model: &src.model,
                lora: path_str(&src.lora),
                embeds: path_str(&src.embeds),
                steps: opts.steps,
                guidance: opts.guidance,
                width: opts.width,
                height: opts.height,
                layout_steps: opts.layout_steps,
            };
            let line = serde_json::to_string(&entry)
                .map_err(|e| Error::internal(format!("serializing the manifest: {e}")))?;
            text.push_str(&line);
            text.push('\n');
        }
    }
    write_atomic(&many.out_dir.join("manifest.jsonl"), text.as_bytes())
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
