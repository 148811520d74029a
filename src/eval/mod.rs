//! `magictailor eval`: the paper's evaluation of a trained folder.
//!
//! Draws (or reuses) the protocol's images through `infer --prompts-file`, then scores:
//! - CLIP-T: each image against its prompt with the pseudo-words replaced by their class
//!   words ("person with hair, in the snow"), as the paper does;
//! - CLIP-I and DINO: per concept and per component, the generated image's segment of that
//!   sample against each reference image's segment (reference masks from `masks/`; the
//!   concept's segment without the component), averaged over the references.
//!
//! Writes `metrics.json`, `summary.md` and a grid per prompt into the output folder
//! (default `MODEL_DIR/eval/k{layout_steps}/`, so `--layout-steps` variants sit side by
//! side over the same seeds).

pub mod clip;
pub mod dino;
pub mod hub;
pub mod metrics;
pub mod preprocess;
mod report;
pub use report::ReportFiles;
pub mod segment;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

use crate::data::{MaskPolicy, PairDataset};
use crate::error::{Error, Result};
use crate::infer::many::image_file;
use crate::infer::{self, many, InferOptions};
use crate::io::run;
use crate::model::tokenizer::pseudo_words_in;
use metrics::{cosine, ImageScore};
use segment::{Generated, Segmenter};

/// The reference images are read at the paper's training resolution.
const REFERENCE_SIZE: usize = 512;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model_dir: PathBuf,
    /// Replaces the base model the folder names (it moved).
    pub model: Option<String>,
    /// The pair folder; default: the one magictailor.json records.
    pub instance_dir: Option<PathBuf>,
    /// `None`: the paper's prompts ([`PAPER_PROMPTS`]).
    pub prompts_file: Option<PathBuf>,
    pub placeholder: String,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub layout_steps: usize,
    /// Images denoised, and images scored, together.
    pub batch_size: usize,
    /// Default `MODEL_DIR/eval/k{layout_steps}`.
    pub out_dir: Option<PathBuf>,
    pub clip_model: String,
    pub dino_model: String,
    pub device: Device,
    pub dtype: DType,
    pub progress: bool,
}

impl EvalOptions {
    pub fn out_dir(&self) -> PathBuf {
        (self.out_dir.clone()).unwrap_or_else(|| {
            (self.model_dir.join("eval")).join(format!("k{}", self.layout_steps))
        })
    }
}

/// One evaluation prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    /// Pseudo-words replaced by class words: what CLIP-T reads.
    pub class_text: String,
    /// From `# group: NAME` lines of the prompts file.
    pub group: String,
    /// The class words of the samples it names, in prompt order.
    pub classes: Vec<String>,
}

/// What `run` wrote.
pub struct Outcome {
    pub out_dir: PathBuf,
    /// How the generated images were segmented (names the report files).
    pub segmentation: String,
    pub metrics: serde_json::Value,
    pub generated: usize,
}

/// The attention segmenter for the run `opts` scores: its base model and pseudo-words.
pub fn attention_segmenter(opts: &EvalOptions) -> Result<segment::Attention> {
    let record = run::open(&opts.model_dir)?.record;
    let model = opts.model.clone().unwrap_or(record.base_model);
    Ok(segment::Attention::new(
        &model,
        record.tokens,
        &opts.device,
        opts.dtype,
    ))
}

pub fn run(opts: &EvalOptions, segmenter: &dyn Segmenter) -> Result<Outcome> {
    infer::check_sampling(opts.guidance, opts.steps, opts.layout_steps)?;
    let folder = run::open(&opts.model_dir)?;
    let tokens = &folder.record.tokens;
    let prompts = read_prompts(opts.prompts_file.as_deref(), &opts.placeholder, tokens)?;
    let pair = pair_folder(opts, &folder.record)?;
    let refs = PairDataset::load(&pair, REFERENCE_SIZE, MaskPolicy::WholeImage, &Device::Cpu)?;
    check_classes(tokens, &refs, &pair)?;
    // The scoring models load before any image is drawn: a missing one fails at once.
    let clip = clip::Clip::load(
        &hub::resolve(&opts.clip_model, &clip::WANTED)?,
        &opts.device,
    )?;
    let dino = dino::Dino::load(
        &hub::resolve(&opts.dino_model, &dino::WANTED)?,
        &opts.device,
    )?;
    let out = opts.out_dir();
    crate::io::leftovers::remove_orphans(&out, crate::io::leftovers::Scope::Run);
    check_existing(&out, opts, &prompts)?;
    let generated = generate(opts, &prompts, &out)?;
    let masks_used = pair.join("masks").is_dir();
    let models = Models {
        clip: &clip,
        dino: &dino,
        batch: opts.batch_size.max(1),
    };
    let references = reference_features(&models, &refs, masks_used)?;
    let scores = score_all(&models, opts, &prompts, &references, &out, segmenter)?;
    let ctx = report::Context {
        opts,
        prompts: &prompts,
        scores: &scores,
        pair: &pair,
        base_model: opts.model.as_deref().unwrap_or(&folder.record.base_model),
        reference_masks: masks_used,
        segmentation: segmenter.name(),
        reference_counts: (references.iter())
            .map(|r| (r.class.clone(), r.clip.len()))
            .collect(),
    };
    let metrics = report::write(&ctx, &out)?;
    Ok(Outcome {
        segmentation: segmenter.name().to_string(),
        out_dir: out,
        metrics,
        generated,
    })
}

/// The paper's evaluation prompts (Table 5, and the two decoupled ones), built in so
/// that `eval` works from any directory; `--prompts FILE` replaces them.
pub const PAPER_PROMPTS: &str = include_str!("../../assets/eval_prompts.txt");

/// What names the prompts in messages and the metrics: the file, or the built-in set.
pub fn prompts_source(file: Option<&Path>) -> String {
    match file {
        Some(f) => f.display().to_string(),
        None => "built-in (the paper's, assets/eval_prompts.txt)".into(),
    }
}

/// One prompt per line as `infer --prompts-file` reads them; `# group: NAME` comment
/// lines name the group of the prompts below them. Pseudo-words must be the run's.
pub fn read_prompts(
    file: Option<&Path>,
    placeholder: &str,
    tokens: &BTreeMap<String, String>,
) -> Result<Vec<Prompt>> {
    let what = format!("--prompts {}", prompts_source(file));
    let grouped = match file {
        Some(f) => many::read_grouped_prompts(f, placeholder, "--prompts")?,
        None => many::parse_grouped_prompts(PAPER_PROMPTS, placeholder, &what)?,
    };
    grouped
        .into_iter()
        .map(|(group, text)| {
            let mut class_text = text.clone();
            let mut classes = Vec::new();
            for w in pseudo_words_in(&text) {
                let class = tokens.get(&w).ok_or_else(|| {
                    Error::usage(format!(
                        "{what}: {text:?} uses {w}, which this run did not learn (it knows: {}).",
                        tokens.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                class_text = class_text.replace(&w, class);
                classes.push(class.clone());
            }
            Ok(Prompt {
                text,
                class_text,
                group,
                classes,
            })
        })
        .collect()
}

/// `--instance-dir`, else the pair folder the run's magictailor.json records.
fn pair_folder(opts: &EvalOptions, record: &run::RunRecord) -> Result<PathBuf> {
    let recorded = (record.config.get("instance_dir"))
        .and_then(|v| v.as_str())
        .map(PathBuf::from);
    let dir = opts.instance_dir.clone().or(recorded).ok_or_else(|| {
        Error::usage(format!(
            "{} does not record its pair folder: pass --instance-dir with the reference images.",
            opts.model_dir.join(run::RECORD).display()
        ))
    })?;
    if !dir.is_dir() {
        return Err(Error::usage(format!(
            "the pair folder {} does not exist (moved?): pass --instance-dir with the reference images.",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Every class word the run learned has reference images in the pair folder.
fn check_classes(tokens: &BTreeMap<String, String>, refs: &PairDataset, pair: &Path) -> Result<()> {
    for (word, class) in tokens {
        if !refs.samples.iter().any(|s| &s.class_word == class) {
            return Err(Error::usage(format!(
                "the run learned {word} as {class:?}, but {} has no {class:?} sample (it has: {}): pass \
                 the pair folder the run was trained on with --instance-dir.",
                pair.display(),
                (refs.samples.iter().map(|s| s.class_word.as_str())).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

/// Existing images are reused only if the manifest says they were drawn as asked.
fn check_existing(out: &Path, opts: &EvalOptions, prompts: &[Prompt]) -> Result<()> {
    let manifest = out.join("manifest.jsonl");
    let Ok(text) = std::fs::read_to_string(&manifest) else {
        return Ok(());
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(i) = e["prompt_index"].as_u64().map(|i| i as usize) else {
            continue;
        };
        let Some(seed) = e["seed"].as_u64() else {
            continue;
        };
        if i >= prompts.len() || !image_file(out, i, seed).is_file() {
            continue;
        }
        let same = e["prompt"] == prompts[i].text.as_str()
            && e["steps"] == opts.steps
            && e["guidance"] == opts.guidance
            && e["width"] == opts.width
            && e["height"] == opts.height
            && e["layout_steps"] == opts.layout_steps;
        if !same {
            return Err(Error::usage(format!(
                "{} holds images drawn with other settings ({line}); they would be scored as if drawn \
                 now. Pass another --out-dir, or delete that folder's images to draw them again.",
                out.display()
            )));
        }
    }
    Ok(())
}

/// Draws the missing images with `infer --prompts-file`'s code; returns how many.
fn generate(opts: &EvalOptions, prompts: &[Prompt], out: &Path) -> Result<usize> {
    let missing = (0..prompts.len())
        .flat_map(|i| opts.seeds.iter().map(move |&s| (i, s)))
        .filter(|&(i, s)| !image_file(out, i, s).is_file())
        .count();
    if missing == 0 {
        return Ok(0);
    }
    let infer_opts = InferOptions {
        prompt: String::new(),
        negative_prompt: String::new(),
        num_images: 1,
        steps: opts.steps,
        guidance: opts.guidance,
        seed: 0,
        width: opts.width,
        height: opts.height,
        out: out.join("unused.png"),
        model_dir: Some(opts.model_dir.clone()),
        model: opts.model.clone(),
        lora: None,
        embeds: None,
        init_latents: None,
        checkpoint: None,
        device: opts.device.clone(),
        dtype: opts.dtype,
        progress: opts.progress,
        layout_steps: opts.layout_steps,
        many: Some(many::Many {
            prompts: prompts.iter().map(|p| p.text.clone()).collect(),
            seeds: opts.seeds.clone(),
            batch_size: opts.batch_size.max(1),
            out_dir: out.to_path_buf(),
            grid: false,
        }),
    };
    infer::run(&infer_opts)?;
    Ok(missing)
}

struct Models<'a> {
    clip: &'a clip::Clip,
    dino: &'a dino::Dino,
    batch: usize,
}

/// Unit-length features of one picture under both models.
#[derive(Clone)]
struct Features {
    clip: Vec<f32>,
    dino: Vec<f32>,
}

impl Models<'_> {
    /// Features of each (image, mask) view, `batch` at a time.
    fn features(&self, views: &[(&RgbImage, Option<&GrayImage>)]) -> Result<Vec<Features>> {
        let mut out = Vec::with_capacity(views.len());
        for chunk in views.chunks(self.batch) {
            let stack = |p: &preprocess::Preprocess, dev: &Device| -> Result<Tensor> {
                let t: Vec<Tensor> = (chunk.iter())
                    .map(|(img, m)| p.tensor(img, *m, dev))
                    .collect::<Result<_>>()?;
                Ok(Tensor::stack(&t, 0)?)
            };
            let c = (self
                .clip
                .image_features(&stack(&self.clip.preprocess, &self.clip.device)?)?)
            .to_vec2::<f32>()?;
            let d = (self
                .dino
                .features(&stack(&self.dino.preprocess, &self.dino.device)?)?)
            .to_vec2::<f32>()?;
            out.extend(
                c.into_iter()
                    .zip(d)
                    .map(|(clip, dino)| Features { clip, dino }),
            );
        }
        Ok(out)
    }
}

/// One sample's reference features.
struct Reference {
    class: String,
    clip: Vec<Vec<f32>>,
    dino: Vec<Vec<f32>>,
}

/// Each reference image cut out by its mask (the published concept masks already leave
/// out the component), or whole when the pair folder has no masks/.
fn reference_features(m: &Models, refs: &PairDataset, masks: bool) -> Result<Vec<Reference>> {
    let mut out = Vec::new();
    for s in &refs.samples {
        let imgs: Vec<(RgbImage, GrayImage)> = (s.images.iter())
            .map(|r| Ok((crate::data::rgb_image(&r.pixels)?, to_gray(&r.mask)?)))
            .collect::<Result<_>>()?;
        let views: Vec<(&RgbImage, Option<&GrayImage>)> =
            imgs.iter().map(|(i, k)| (i, masks.then_some(k))).collect();
        let f = m.features(&views)?;
        out.push(Reference {
            class: s.class_word.clone(),
            clip: f.iter().map(|x| x.clip.clone()).collect(),
            dino: f.iter().map(|x| x.dino.clone()).collect(),
        });
    }
    Ok(out)
}

/// `[3, h, w]` in [-1, 1] -> 8-bit RGB.
/// `[1, h, w]` of 0/1 -> 0/255.
fn to_gray(t: &Tensor) -> Result<GrayImage> {
    let (_, h, w) = t.dims3()?;
    let px = t.flatten_all()?.to_vec1::<f32>()?;
    GrayImage::from_raw(
        w as u32,
        h as u32,
        px.iter().map(|&v| if v >= 0.5 { 255 } else { 0 }).collect(),
    )
    .ok_or_else(|| Error::internal("reference mask buffer size"))
}

fn score_all(
    m: &Models,
    opts: &EvalOptions,
    prompts: &[Prompt],
    refs: &[Reference],
    out: &Path,
    segmenter: &dyn Segmenter,
) -> Result<Vec<ImageScore>> {
    let bar = infer::progress_bar(
        (prompts.len() * opts.seeds.len()) as u64,
        "scoring",
        opts.progress,
    );
    let mut scores = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let text = m
            .clip
            .text_features(&p.class_text)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for seeds in opts.seeds.chunks(m.batch) {
            scores.extend(score_images(m, i, p, seeds, &text, refs, out, segmenter)?);
            bar.inc(seeds.len() as u64);
        }
    }
    bar.finish();
    Ok(scores)
}

/// Views of one generated image: the whole image, then one per class word of its prompt.
struct Views {
    image: RgbImage,
    masks: Vec<Option<GrayImage>>,
}

fn views_of(
    file: &Path,
    p: &Prompt,
    seed: u64,
    concept: &str,
    segmenter: &dyn Segmenter,
) -> Result<Views> {
    let image = image::open(file)
        .map_err(|e| Error::bad_file(file, format!("cannot read {}: {e}", file.display())))?
        .to_rgb8();
    let g = Generated {
        image: &image,
        file,
        prompt: &p.text,
        seed,
    };
    let words = pseudo_words_in(&p.text);
    let masks = match segmenter.segment(&g, &words)? {
        None => vec![None; p.classes.len()],
        Some(found) => {
            if found.len() != words.len()
                || found.iter().any(|m| m.dimensions() != image.dimensions())
            {
                return Err(Error::internal(format!(
                    "the {} segmenter returned {} masks for {} words of {}",
                    segmenter.name(),
                    found.len(),
                    words.len(),
                    file.display()
                )));
            }
            // The concept loses every component's region, as in training.
            (0..found.len())
                .map(|k| {
                    if p.classes[k] == concept {
                        let others: Vec<&GrayImage> = (found.iter().enumerate())
                            .filter(|(j, _)| *j != k)
                            .map(|(_, m)| m)
                            .collect();
                        segment::without(&found[k], &others).0
                    } else {
                        Some(found[k].clone()).filter(|m| !segment::is_empty(m))
                    }
                })
                .collect()
        }
    };
    Ok(Views { image, masks })
}

#[allow(clippy::too_many_arguments)]
fn score_images(
    m: &Models,
    index: usize,
    p: &Prompt,
    seeds: &[u64],
    text: &[f32],
    refs: &[Reference],
    out: &Path,
    segmenter: &dyn Segmenter,
) -> Result<Vec<ImageScore>> {
    let views: Vec<Views> = (seeds.iter())
        .map(|&s| views_of(&image_file(out, index, s), p, s, &refs[0].class, segmenter))
        .collect::<Result<_>>()?;
    // Whole images first, then each segment that is not the whole image.
    let mut list: Vec<(&RgbImage, Option<&GrayImage>)> =
        views.iter().map(|v| (&v.image, None)).collect();
    let mut at = Vec::new();
    for (k, v) in views.iter().enumerate() {
        let idx: Vec<usize> = (v.masks.iter())
            .map(|mask| match mask {
                None => k,
                Some(mk) => {
                    list.push((&v.image, Some(mk)));
                    list.len() - 1
                }
            })
            .collect();
        at.push(idx);
    }
    let f = m.features(&list)?;
    let mean_sim = |a: &[f32], rs: &[Vec<f32>]| -> f32 {
        rs.iter().map(|r| cosine(a, r)).sum::<f32>() / rs.len().max(1) as f32
    };
    let mut scores = Vec::new();
    for (k, &seed) in seeds.iter().enumerate() {
        let mut clip_i = BTreeMap::new();
        let mut dino = BTreeMap::new();
        for (class, &j) in p.classes.iter().zip(&at[k]) {
            let r = refs
                .iter()
                .find(|r| &r.class == class)
                .ok_or_else(|| Error::internal(format!("no reference features for {class}")))?;
            clip_i.insert(class.clone(), mean_sim(&f[j].clip, &r.clip));
            dino.insert(class.clone(), mean_sim(&f[j].dino, &r.dino));
        }
        scores.push(ImageScore {
            file: format!("prompt{index:02}/seed{seed:02}.png"),
            prompt_index: index,
            seed,
            clip_t: cosine(&f[k].clip, text),
            clip_i,
            dino,
        });
    }
    Ok(scores)
}
