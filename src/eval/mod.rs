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
//!
//! Here: the protocol (prompts, drawing or reusing the images); `score` scores them,
//! `report` writes the files. May import `infer` (to draw), `masks` (attention
//! segmentation), `data`, `model`, `io` and `preview`; nothing but the CLI imports it.

pub mod clip;
pub mod compare;
pub mod dino;
pub mod hub;
pub mod metrics;
pub mod preprocess;
mod report;
pub use report::ReportFiles;
mod score;
pub mod segment;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::data::{MaskPolicy, PairDataset};
use crate::error::{Error, Result};
use crate::infer::many::{image_file, Many};
use crate::infer::prompts::{self, PLACEHOLDER};
use crate::infer::{self, InferOptions, Mode, Sampling};
use crate::io::run;
use crate::model::loader::SingleFileOptions;
use crate::model::tokenizer::pseudo_words_in;
use segment::Segmenter;

/// The reference images are read at the paper's training resolution.
const REFERENCE_SIZE: usize = 512;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model_dir: PathBuf,
    /// Replaces the base model the folder names (it moved).
    pub model: Option<String>,
    /// What a single-file `model` needs beside its weights.
    pub single_file: SingleFileOptions,
    /// The pair folder; default: the one magictailor.json records.
    pub instance_dir: Option<PathBuf>,
    /// `None`: the paper's prompts ([`PAPER_PROMPTS`]).
    pub prompts_file: Option<PathBuf>,
    pub placeholder: String,
    pub seeds: Vec<u64>,
    pub sampling: Sampling,
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
    /// The paper's protocol (32 seeds, SD's usual sampling) on the default run folder.
    pub fn new(device: Device) -> Self {
        Self {
            model_dir: PathBuf::from(run::DEFAULT_DIR),
            model: None,
            single_file: SingleFileOptions::default(),
            instance_dir: None,
            prompts_file: None,
            placeholder: PLACEHOLDER.into(),
            seeds: (0..32).collect(),
            sampling: Sampling::default(),
            batch_size: 8,
            out_dir: None,
            clip_model: clip::DEFAULT_MODEL.into(),
            dino_model: dino::DEFAULT_MODEL.into(),
            device,
            dtype: DType::F32,
            progress: true,
        }
    }

    pub fn out_dir(&self) -> PathBuf {
        (self.out_dir.clone()).unwrap_or_else(|| {
            let retouched = if self.sampling.retouch.is_some() {
                "-retouch"
            } else {
                ""
            };
            let name = format!("k{}{retouched}", self.sampling.layout_steps);
            (self.model_dir.join("eval")).join(name)
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
    let (model, single_file) = base_model(opts, &record);
    Ok(segment::Attention::new(
        &model,
        single_file,
        record.tokens,
        &opts.device,
        opts.dtype,
    ))
}

/// The base model of the run `opts` scores (`opts.model` where given) and what a single
/// file of it needs.
fn base_model(opts: &EvalOptions, record: &run::RunRecord) -> (String, SingleFileOptions) {
    match &opts.model {
        Some(m) => (m.clone(), opts.single_file.clone()),
        None => (record.base_model.clone(), record.single_file.clone()),
    }
}

/// The image side of the run's base model, from its configs ([`crate::model::loader::native_side`]).
pub fn native_side(opts: &EvalOptions) -> Result<usize> {
    let record = run::open(&opts.model_dir)?.record;
    let (model, single_file) = base_model(opts, &record);
    crate::model::loader::native_side(&model, &single_file)
}

pub fn evaluate(opts: &EvalOptions, segmenter: &dyn Segmenter) -> Result<Outcome> {
    opts.sampling.check()?;
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
    let generated = generate(opts, &prompts, &out, &pair)?;
    let masks_used = pair.join("masks").is_dir();
    let models = score::Models {
        clip: &clip,
        dino: &dino,
        batch: opts.batch_size.max(1),
    };
    let references = score::reference_features(&models, &refs, masks_used)?;
    let scores = score::score_all(&models, opts, &prompts, &references, &out, segmenter)?;
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
        Some(f) => prompts::read_grouped_prompts(f, placeholder, "--prompts")?,
        None => prompts::parse_grouped_prompts(PAPER_PROMPTS, placeholder, &what)?,
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

/// A manifest's retouch settings against the asked ones, leaving out the key cache's size
/// (memory, not what is drawn).
fn same_retouch(
    recorded: &serde_json::Value,
    asked: Option<&crate::infer::retouch::Retouch>,
) -> bool {
    let without_cache = |v: serde_json::Value| match v {
        serde_json::Value::Object(mut m) => {
            m.remove("kv_cache_mb");
            serde_json::Value::Object(m)
        }
        other => other,
    };
    without_cache(recorded.clone()) == without_cache(serde_json::json!(asked))
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
        let o = &opts.sampling;
        let same = e["prompt"] == prompts[i].text.as_str()
            && e["steps"] == o.steps
            && e["guidance"] == o.guidance
            && e["width"] == o.width
            && e["height"] == o.height
            && e["layout_steps"] == o.layout_steps
            && same_retouch(&e["retouch"], o.retouch.as_ref());
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
fn generate(opts: &EvalOptions, prompts: &[Prompt], out: &Path, pair: &Path) -> Result<usize> {
    let missing = (0..prompts.len())
        .flat_map(|i| opts.seeds.iter().map(move |&s| (i, s)))
        .filter(|&(i, s)| !image_file(out, i, s).is_file())
        .count();
    if missing == 0 {
        return Ok(0);
    }
    let infer_opts = InferOptions {
        sampling: opts.sampling.clone(),
        model_dir: Some(opts.model_dir.clone()),
        model: opts.model.clone(),
        single_file: opts.single_file.clone(),
        lora: None,
        embeds: None,
        custom_diffusion: None,
        full_delta: None,
        vico_blocks: None,
        // The retouch stage's references: the first image of each sample of the pair scored.
        references: match opts.sampling.retouch {
            Some(_) => crate::data::first_images(pair)?,
            None => Vec::new(),
        },
        checkpoint: None,
        device: opts.device.clone(),
        dtype: opts.dtype,
        progress: opts.progress,
        save_masks: false,
        mode: Mode::Many(Many {
            batch_size: opts.batch_size.max(1),
            out_dir: out.to_path_buf(),
            ..Many::new(
                prompts.iter().map(|p| p.text.clone()).collect(),
                opts.seeds.clone(),
            )
        }),
    };
    infer::infer(&infer_opts)?;
    Ok(missing)
}
