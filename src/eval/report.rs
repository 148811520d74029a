//! What `eval` writes: `metrics.json` (every score, the aggregates, how they were made),
//! `summary.md` (a table) and `grids/promptNN.png`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::json;

use super::metrics::{ImageScore, Stats, Summary};
use super::{EvalOptions, Prompt};
use crate::error::{Error, Result};
use crate::infer::many::image_file;
use crate::io::png::png_bytes;
use crate::io::write_atomic;
use crate::preview::grid::Grid;

pub struct Context<'a> {
    pub opts: &'a EvalOptions,
    pub prompts: &'a [Prompt],
    pub scores: &'a [ImageScore],
    pub pair: &'a Path,
    pub base_model: &'a str,
    pub reference_masks: bool,
    pub segmentation: &'a str,
    /// Class word -> number of reference images.
    pub reference_counts: BTreeMap<String, usize>,
}

/// Grid cells are shrunk to this size so a 32-seed sheet stays small.
const CELL: u32 = 128;

/// The report files of a segmentation: `metrics.json`, `summary.md` and `grids/` for
/// the default (attention), `metrics-none.json`, ... for another, so that scoring the
/// same images another way never overwrites a report.
pub struct ReportFiles {
    pub metrics: PathBuf,
    pub summary: PathBuf,
    pub grids: PathBuf,
}

impl ReportFiles {
    pub fn new(out: &Path, segmentation: &str) -> Self {
        let tag = match segmentation {
            "attention" => String::new(),
            other => format!("-{other}"),
        };
        Self {
            metrics: out.join(format!("metrics{tag}.json")),
            summary: out.join(format!("summary{tag}.md")),
            grids: out.join(format!("grids{tag}")),
        }
    }
}

/// Writes everything; returns metrics.json's content.
pub fn write(ctx: &Context, out: &Path) -> Result<serde_json::Value> {
    let files = ReportFiles::new(out, ctx.segmentation);
    let metrics = metrics_json(ctx);
    let text = serde_json::to_string_pretty(&metrics)
        .map_err(|e| Error::internal(format!("serializing metrics.json: {e}")))?;
    write_atomic(&files.metrics, text.as_bytes())?;
    write_atomic(&files.summary, summary_md(ctx).as_bytes())?;
    for (i, p) in ctx.prompts.iter().enumerate() {
        grid(ctx, out, &files.grids, i, p)?;
    }
    Ok(metrics)
}

fn of_prompt<'a>(ctx: &'a Context, i: usize) -> impl Iterator<Item = &'a ImageScore> {
    ctx.scores.iter().filter(move |s| s.prompt_index == i)
}

/// The group names in the order they first appear.
fn groups(prompts: &[Prompt]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in prompts {
        if !names.contains(&p.group) {
            names.push(p.group.clone());
        }
    }
    names
}

/// Overall means cover the prompts that name every learned sample (the paper's 20); the
/// decoupled `<v0>` / `<v1>` prompts are reported per prompt and per group only.
fn in_overall(ctx: &Context, p: &Prompt) -> bool {
    ctx.reference_counts.keys().all(|c| p.classes.contains(c))
}

fn metrics_json(ctx: &Context) -> serde_json::Value {
    let o = ctx.opts;
    let s = &o.sampling;
    let prompts: Vec<_> = (ctx.prompts.iter().enumerate())
        .map(|(i, p)| {
            json!({
                "index": i, "prompt": p.text, "class_prompt": p.class_text, "group": p.group,
                "in_overall": in_overall(ctx, p), "summary": Summary::of(of_prompt(ctx, i)),
            })
        })
        .collect();
    let groups: Vec<_> = (groups(ctx.prompts).into_iter())
        .map(|g| {
            let members: Vec<usize> = (0..ctx.prompts.len())
                .filter(|&i| ctx.prompts[i].group == g)
                .collect();
            let scores = ctx
                .scores
                .iter()
                .filter(|s| members.contains(&s.prompt_index));
            json!({"name": g, "prompts": members, "summary": Summary::of(scores)})
        })
        .collect();
    let overall =
        Summary::of((ctx.scores.iter()).filter(|s| in_overall(ctx, &ctx.prompts[s.prompt_index])));
    json!({
        "magictailor_version": env!("CARGO_PKG_VERSION"),
        "model_dir": o.model_dir.display().to_string(),
        "base_model": ctx.base_model,
        "instance_dir": ctx.pair.display().to_string(),
        "models": {"clip": o.clip_model, "dino": o.dino_model},
        "protocol": {
            "prompts_file": super::prompts_source(o.prompts_file.as_deref()), "placeholder": o.placeholder,
            "seeds": o.seeds, "steps": s.steps, "guidance": s.guidance, "width": s.width,
            "height": s.height, "layout_steps": s.layout_steps, "retouch": s.retouch,
            "sampler": "DDIM, eta 0",
        },
        "reference_segmentation": if ctx.reference_masks { "masks" } else { "none" },
        "generated_segmentation": ctx.segmentation,
        "reference_images": ctx.reference_counts,
        "masked_fill": "each model's normalization mean colour (zero after normalization)",
        "std": "population (ddof 0) over images",
        "overall": overall,
        "groups": groups,
        "prompts": prompts,
        "images": ctx.scores,
    })
}

fn cell(s: Option<Stats>) -> String {
    s.map(|s| format!("{:.4} ± {:.4}", s.mean, s.std))
        .unwrap_or_else(|| "–".into())
}

fn row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {} | {} | {} | {} |\n",
        s.images,
        cell(s.clip_t),
        cell(s.clip_i),
        cell(s.dino)
    )
}

fn summary_md(ctx: &Context) -> String {
    let o = ctx.opts;
    let mut md = format!(
        "# magictailor eval: {}\n\n{} seeds x {} prompts, {} DDIM steps, guidance {}, {}x{}, layout steps {}{}.\n\
         CLIP: `{}`; DINO: `{}`. Reference segmentation: {}; generated-image segmentation: {}.\n\
         Mean ± std over images. CLIP-I and DINO: mean over the samples a prompt names.\n\n\
         | | images | CLIP-T | CLIP-I | DINO |\n|---|---|---|---|---|\n",
        o.model_dir.display(),
        o.seeds.len(),
        ctx.prompts.len(),
        o.sampling.steps,
        o.sampling.guidance,
        o.sampling.width,
        o.sampling.height,
        o.sampling.layout_steps,
        match &o.sampling.retouch {
            Some(r) => format!(
                ", retouched (layout keys {} steps, blend from step {}, swap {})",
                r.layout_swap_steps,
                r.blend_from,
                if r.swap { "on" } else { "off" }
            ),
            None => String::new(),
        },
        o.clip_model,
        o.dino_model,
        if ctx.reference_masks { "masks/" } else { "none (whole images)" },
        ctx.segmentation,
    );
    let overall =
        Summary::of((ctx.scores.iter()).filter(|s| in_overall(ctx, &ctx.prompts[s.prompt_index])));
    md.push_str(&row("**overall**", &overall));
    for g in groups(ctx.prompts) {
        let scores = (ctx.scores.iter()).filter(|s| ctx.prompts[s.prompt_index].group == g);
        md.push_str(&row(&format!("*{g}*"), &Summary::of(scores)));
    }
    for (i, p) in ctx.prompts.iter().enumerate() {
        md.push_str(&row(
            &format!("{i:02} {}", p.text.replace('|', "\\|")),
            &Summary::of(of_prompt(ctx, i)),
        ));
    }
    md
}

/// `grids/promptNN.png`: the prompt's images, 8 seeds a row, with its mean scores.
fn grid(ctx: &Context, out: &Path, grids: &Path, i: usize, p: &Prompt) -> Result<()> {
    let seeds = &ctx.opts.seeds;
    let mut cells: Vec<RgbImage> = Vec::new();
    for &s in seeds {
        let file = image_file(out, i, s);
        let img = image::open(&file)
            .map_err(|e| Error::bad_file(&file, format!("cannot read {}: {e}", file.display())))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let scale = (CELL as f64 / w.max(h) as f64).min(1.0);
        let size = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        cells.push(image::imageops::resize(
            &img,
            size.0,
            size.1,
            image::imageops::FilterType::Triangle,
        ));
    }
    let cols = seeds.len().min(8);
    let size = cells[0].dimensions();
    while !cells.len().is_multiple_of(cols) {
        cells.push(RgbImage::from_pixel(
            size.0,
            size.1,
            image::Rgb([255, 255, 255]),
        ));
    }
    let rows: Vec<String> = (seeds.chunks(cols))
        .map(|c| {
            format!(
                "seeds {}",
                c.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let s = Summary::of(of_prompt(ctx, i));
    let mean = |x: Option<Stats>| {
        x.map(|x| format!("{:.3}", x.mean))
            .unwrap_or_else(|| "–".into())
    };
    // Scores first: a narrow sheet (tiny models) cuts the end of the title.
    let title = format!(
        "CLIP-T {} · CLIP-I {} · DINO {} | {}",
        mean(s.clip_t),
        mean(s.clip_i),
        mean(s.dino),
        p.text
    );
    let image = Grid {
        title: &title,
        rows: &rows,
        cols: &vec![String::new(); cols],
        cells: &cells,
    }
    .render()?;
    write_atomic(
        &grids.join(format!("prompt{i:02}.png")),
        &png_bytes(&image)?,
    )
}
