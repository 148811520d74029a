//! Where a personalized model's weights come from (a trained folder, one of its
//! checkpoints, or a base model with adapter files) and loading them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::InferOptions;
use crate::error::{Error, Result};
use crate::io::{run, tensors};
use crate::model::loader::{SingleFileOptions, StableDiffusion};
use crate::model::lora::LoraSet;
use crate::model::tokenizer::pseudo_word;
use crate::model::tuned::TunedSet;

/// Where a personalized model's weights come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Hub id, local diffusers folder, `tiny-random`, or a single `.safetensors` file.
    pub model: String,
    /// What a single-file `model` needs beside its weights.
    pub single_file: SingleFileOptions,
    pub lora: Option<PathBuf>,
    pub embeds: Option<PathBuf>,
    /// SDXL: a trained folder's rows of the same words in the second text encoder.
    pub embeds_2: Option<PathBuf>,
    /// The whole trained token-embedding table (`--released-script` runs).
    pub token_table: Option<PathBuf>,
    /// SDXL: the second encoder's table (beside the first in a released-script run).
    pub token_table_2: Option<PathBuf>,
    /// Custom Diffusion's tuned key and value matrices.
    pub custom_diffusion: Option<PathBuf>,
    /// A full fine-tune's changes to the base U-Net and text encoder (Break-A-Scene).
    pub full_delta: Option<PathBuf>,
    /// Pseudo-word -> class word, from a trained folder's record (for `--layout-steps`).
    pub class_words: std::collections::BTreeMap<String, String>,
    /// Words that stand for other text in prompts, from the record (DreamBooth's
    /// `<v0>` -> "sks person").
    pub aliases: std::collections::BTreeMap<String, String>,
    /// A training checkpoint holding the adapters and pseudo-word rows (in place of
    /// `lora` and `embeds`), and the adapters' `alpha / rank`.
    pub checkpoint: Option<(PathBuf, f64)>,
    /// ViCo's image cross-attention blocks (a checkpoint holds its own).
    pub vico_blocks: Option<PathBuf>,
    /// The reference image of each sample, in order (ViCo's, or the retouch stage's).
    pub references: Vec<PathBuf>,
    /// The references feed `--retouch` (not only ViCo's blocks).
    pub retouch: bool,
}

/// A model ready to sample: base weights, optional adapters, added pseudo-words.
pub struct Personalized {
    pub sd: StableDiffusion,
    pub lora: Option<LoraSet>,
    /// Embedding rows of the pseudo-words, `[k, hidden]`, in tokenizer order.
    pub extra_rows: Option<Tensor>,
    /// Their rows in SDXL's second text encoder, `[k, hidden_2]`.
    pub extra_rows_2: Option<Tensor>,
    /// The file those second rows came from, when not from the `--embeds` file itself
    /// (diffusers' SDXL pair): for the record.
    pub embeds_2: Option<PathBuf>,
    /// Replace the text encoders' token tables (`--released-script` runs).
    pub token_table: Option<Tensor>,
    pub token_table_2: Option<Tensor>,
    /// Whole matrices in place of base weights (Custom Diffusion).
    pub tuned: Option<TunedSet>,
    /// Pseudo-word -> class word, when known (a trained folder).
    pub class_words: std::collections::BTreeMap<String, String>,
    /// ViCo's blocks and references.
    pub vico: Option<super::vico::Visual>,
    /// The retouch stage's references and segmenter (`infer` sets it).
    pub retouch: Option<super::retouch::Stage>,
}

impl Personalized {
    pub fn load(src: &Sources, device: &Device, dtype: DType) -> Result<Self> {
        let mut sd = StableDiffusion::load_with(&src.model, &src.single_file, device, dtype)?;
        let aliases: Vec<(String, String)> = src.aliases.clone().into_iter().collect();
        sd.tokenizer.add_aliases(&aliases)?;
        if let Some((_, tok_2)) = &mut sd.text_encoder_2 {
            tok_2.add_aliases(&aliases)?;
        }
        if let Some((file, scale)) = &src.checkpoint {
            return from_checkpoint(sd, file, *scale, src, device);
        }
        if let Some(f) = &src.full_delta {
            crate::model::full::apply_delta(&mut sd, f)?;
        }
        let lora = match &src.lora {
            Some(f) => Some(LoraSet::load(f, &sd.unet.lora_targets(), device)?),
            None => None,
        };
        let token_table = match &src.token_table {
            Some(f) => Some(load_token_table(f, sd.text_encoder.token_table(), device)?),
            None => None,
        };
        if let Some(f) = src.token_table.as_ref().or(src.token_table_2.as_ref()) {
            let (first, second) = (src.token_table.is_some(), src.token_table_2.is_some());
            token_tables_fit(&sd, first, second, f)?;
        }
        let token_table_2 = match (&src.token_table_2, &sd.text_encoder_2) {
            (Some(f), Some((te, _))) => Some(load_token_table(f, te.token_table(), device)?),
            _ => None,
        };
        let tuned = match &src.custom_diffusion {
            Some(f) => Some(TunedSet::load_custom_diffusion(
                f,
                &sd.unet.lora_targets(),
                device,
            )?),
            None => None,
        };
        let (extra_rows, extra_rows_2, embeds_2) = match &src.embeds {
            Some(f) => load_embeds(&mut sd, f, src.embeds_2.as_deref(), device)?,
            None => (None, None, None),
        };
        let vico = match &src.vico_blocks {
            Some(f) => {
                let t = tensors::read_floats(f, device, &[])?;
                Some(visual(&sd, t, f, src, device)?)
            }
            None => {
                check_references(src, 0)?;
                None
            }
        };
        Ok(Self {
            sd,
            lora,
            extra_rows,
            extra_rows_2,
            embeds_2,
            token_table,
            token_table_2,
            tuned,
            class_words: src.class_words.clone(),
            vico,
            retouch: None,
        })
    }

    /// `prompt` with each pseudo-word replaced by its class word ("<v0> with <v1>" ->
    /// "person with hair"): what the base model draws in a step blend's layout stage.
    pub fn class_prompt(&self, prompt: &str) -> Result<String> {
        let mut out = prompt.to_string();
        for word in crate::model::tokenizer::pseudo_words_in(prompt) {
            let class = self.class_words.get(&word).ok_or_else(|| {
                Error::usage(format!(
                    "--layout-steps needs the class word of {word}, which a trained folder's \
                     magictailor.json records: use --model-dir."
                ))
            })?;
            out = out.replace(&word, class);
        }
        Ok(out)
    }

    pub fn weights(&self) -> super::Weights<'_> {
        super::Weights {
            sd: &self.sd,
            lora: self.lora.as_ref(),
            tuned: self.tuned.as_ref(),
            extra_rows: self.extra_rows.as_ref(),
            extra_rows_2: self.extra_rows_2.as_ref(),
            token_table: self.token_table.as_ref(),
            token_table_2: self.token_table_2.as_ref(),
            vico: self.vico.as_ref(),
        }
    }
}

/// The pseudo-words of the embeddings file `f`, added to `sd`'s tokenizers, and their rows
/// (in each text encoder, for SDXL: from an SDXL embedding, or `f` and its second file
/// `f_2`: a trained folder's, or the one beside `f`), with the second file read.
fn load_embeds(
    sd: &mut StableDiffusion,
    f: &Path,
    f_2: Option<&Path>,
    device: &Device,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<PathBuf>)> {
    let hidden = sd.text_encoder.config.hidden_size;
    let beside = (sd.text_encoder_2.is_some() && f_2.is_none())
        .then(|| second_of_pair(f))
        .flatten();
    if let (Some((te_2, tok_2)), Some(f_2)) = (&mut sd.text_encoder_2, f_2.or(beside.as_deref())) {
        let (list, list_2) = (
            crate::io::embeds::load(f, hidden, device)?,
            crate::io::embeds::load(f_2, te_2.config.hidden_size, device)?,
        );
        let words: Vec<String> = list.iter().map(|(w, _)| w.clone()).collect();
        if list_2.iter().map(|(w, _)| w).ne(words.iter()) {
            return Err(Error::mismatch(
                f_2,
                format!(
                    "{} names other words than {} (from another run?).",
                    f_2.display(),
                    f.display()
                ),
            ));
        }
        sd.tokenizer.add_pseudo_words(&words)?;
        tok_2.add_pseudo_words(&words)?;
        let stack = |l: Vec<(String, Tensor)>| -> Result<Tensor> {
            let rows: Vec<Tensor> = l.into_iter().map(|(_, v)| v).collect();
            Ok(Tensor::stack(&rows, 0)?)
        };
        return Ok((
            Some(stack(list)?),
            Some(stack(list_2)?),
            Some(f_2.to_path_buf()),
        ));
    }
    if let Some((te_2, tok_2)) = &mut sd.text_encoder_2 {
        let widths = (hidden, te_2.config.hidden_size);
        let (word, l, g) = crate::io::embeds::load_sdxl(f, widths, device)?;
        sd.tokenizer.add_pseudo_words(std::slice::from_ref(&word))?;
        tok_2.add_pseudo_words(&[word])?;
        return Ok((Some(l.unsqueeze(0)?), Some(g.unsqueeze(0)?), None));
    }
    if let Some(f_2) = f_2 {
        return Err(second_encoder_rows_without_one(sd, f_2));
    }
    let list = crate::io::embeds::load(f, hidden, device)?;
    let words: Vec<String> = list.iter().map(|(w, _)| w.clone()).collect();
    sd.tokenizer.add_pseudo_words(&words)?;
    let rows: Vec<Tensor> = list.into_iter().map(|(_, v)| v).collect();
    Ok((Some(Tensor::stack(&rows, 0)?), None, None))
}

/// `file` holds words' rows for SDXL's second text encoder, which `sd` lacks: SD 1.x's
/// encoder and SDXL's first take rows of one width, so the first file alone would load
/// and the second would be dropped.
fn second_encoder_rows_without_one(sd: &StableDiffusion, file: &Path) -> Error {
    Error::mismatch(
        file,
        format!(
            "{}: rows for SDXL's second text encoder, but {} has one text encoder. Infer \
             with the SDXL model the run trained on.",
            file.display(),
            sd.source
        ),
    )
}

/// SDXL: the second file of diffusers' pair (`learned_embeds.safetensors` beside
/// `learned_embeds_2.safetensors`, or `learned_embeds-steps-N` beside
/// `learned_embeds_2-steps-N`, as its SDXL textual-inversion script and `train` write them)
/// when `f` holds words rather than an A1111 file's `clip_l` and `clip_g`. A file that is
/// not safetensors is left to the embeddings reader, whose message says so.
fn second_of_pair(f: &Path) -> Option<PathBuf> {
    let header = crate::io::tensors::header(f).ok()?;
    if header.get("clip_l").is_some() {
        return None;
    }
    let (stem, ext) = (f.file_stem()?.to_str()?, f.extension()?.to_str()?);
    let name = match stem.split_once("-steps-") {
        Some((head, steps)) => format!("{head}_2-steps-{steps}.{ext}"),
        None => format!("{stem}_2.{ext}"),
    };
    let second = f.with_file_name(name);
    second.is_file().then_some(second)
}

/// The weights a training checkpoint holds, as a trained folder's files would give them.
fn from_checkpoint(
    mut sd: StableDiffusion,
    file: &Path,
    scale: f64,
    src: &Sources,
    device: &Device,
) -> Result<Personalized> {
    let mut t = crate::io::checkpoint::load(file, device)?;
    // The layers the run adapted: all (MagicTailor), some (DreamBooth) or none (TI).
    let adapted: std::collections::HashSet<String> = (t.keys())
        .filter_map(|k| {
            k.strip_prefix("lora.")?
                .strip_suffix(".A")
                .map(String::from)
        })
        .collect();
    let has_lora = !adapted.is_empty();
    let mut take = |name: &str| {
        t.remove(name).ok_or_else(|| {
            Error::bad_file(
                file,
                format!("the checkpoint {} lacks {name}.", file.display()),
            )
        })
    };
    let mut lora = LoraSet::default();
    for target in (sd.unet.lora_targets().into_iter()).filter(|t| adapted.contains(&t.path)) {
        let (a, b) = (
            take(&format!("lora.{}.A", target.path))?,
            take(&format!("lora.{}.B", target.path))?,
        );
        lora.insert(
            target.path.clone(),
            crate::model::lora::LoraWeights { a, b, scale },
        );
    }
    // A method that names samples by aliases trains no rows.
    let rows = match src.aliases.is_empty() {
        true => Some(take("rows")?),
        false => None,
    };
    // SDXL runs have the words' rows in the second text encoder too.
    let rows_2 = take("rows_2").ok();
    if rows_2.is_some() && sd.text_encoder_2.is_none() {
        return Err(second_encoder_rows_without_one(&sd, file));
    }
    if let Some(rows) = &rows {
        let words: Vec<String> = (0..rows.dim(0)?).map(pseudo_word).collect();
        sd.tokenizer.add_pseudo_words(&words)?;
        if let (Some((_, tok_2)), Some(_)) = (&mut sd.text_encoder_2, &rows_2) {
            tok_2.add_pseudo_words(&words)?;
        }
    }
    let (token_table, token_table_2) = (take("table").ok(), take("table_2").ok());
    token_tables_fit(&sd, token_table.is_some(), token_table_2.is_some(), file)?;
    let tuned = TunedSet::from_checkpoint(&mut t)?;
    // A full fine-tune's checkpoint holds its whole U-Net and text encoder(s).
    let mut full: std::collections::HashMap<String, Tensor> = (t.iter())
        .filter_map(|(k, v)| Some((k.strip_prefix("full.")?.to_string(), v.clone())))
        .collect();
    if !full.is_empty() {
        let weights = crate::model::full::FullWeights::of(&sd)?;
        weights.restore(&mut full)?;
        sd.unet = weights.unet(sd.dtype, false)?;
        sd.text_encoder = weights.text_encoder(sd.dtype, false)?;
        if let (Some(te), Some((base, _))) = (
            weights.text_encoder_2(sd.dtype, false)?,
            &mut sd.text_encoder_2,
        ) {
            *base = te;
        }
    }
    let blocks: std::collections::HashMap<String, Tensor> = (t.iter())
        .filter_map(|(k, v)| Some((k.strip_prefix("vico.")?.to_string(), v.clone())))
        .collect();
    let vico = match blocks.is_empty() {
        true if !src.references.is_empty() && !src.retouch => {
            return Err(Error::usage(format!(
                "--reference conditions ViCo's image cross-attention blocks, and {} holds none \
                 (it is not a ViCo run's).",
                file.display()
            )))
        }
        true => None,
        false => Some(visual(&sd, blocks, file, src, device)?),
    };
    Ok(Personalized {
        sd,
        lora: has_lora.then_some(lora),
        extra_rows: rows,
        extra_rows_2: rows_2,
        embeds_2: None,
        token_table,
        token_table_2,
        tuned,
        class_words: src.class_words.clone(),
        vico,
        retouch: None,
    })
}

/// ViCo's blocks from `tensors` (read from `file`) at this U-Net's sites, with the
/// references of `src`.
fn visual(
    sd: &StableDiffusion,
    tensors: std::collections::HashMap<String, Tensor>,
    file: &Path,
    src: &Sources,
    device: &Device,
) -> Result<super::vico::Visual> {
    let sites = crate::model::vico::sites(&sd.unet);
    let blocks = crate::model::vico::Blocks::from_tensors(&tensors, file, &sites, device)?;
    if src.references.is_empty() {
        return Err(Error::usage(
            "ViCo's blocks need a reference image per sample: pass --reference IMAGE (one per \
             pseudo-word, in order), or sample a trained folder whose images are still where it \
             was trained.",
        ));
    }
    // The words an embeddings file brought are known only now.
    check_references(src, sd.tokenizer.pseudo_words().len())?;
    Ok(super::vico::Visual::new(&blocks, src.references.clone()))
}

/// `src`'s references as far as they can be checked without the model (`sources` calls
/// this before anything loads): each file exists, no more of them than `words` pseudo-words
/// (where known, else 0), and blocks (or a checkpoint, which may hold some) to condition.
fn check_references(src: &Sources, words: usize) -> Result<()> {
    let refs = &src.references;
    if let Some(missing) = refs.iter().find(|p| !p.is_file()) {
        return Err(Error::usage(format!(
            "the reference image {} does not exist.",
            missing.display()
        )));
    }
    if words > 0 && refs.len() > words {
        return Err(Error::usage(format!(
            "{} reference images for {words} pseudo-words: give one --reference per word, in \
             order (<v0>'s first).",
            refs.len()
        )));
    }
    if src.retouch && src.vico_blocks.is_some() {
        return Err(Error::usage(
            "--retouch on ViCo's image cross-attention blocks is not built: retouch a run of \
             another method.",
        ));
    }
    if !refs.is_empty() && src.vico_blocks.is_none() && src.checkpoint.is_none() && !src.retouch {
        return Err(Error::usage(
            "--reference conditions ViCo's image cross-attention blocks, and this model has \
             none: sample a ViCo run (--model-dir) or pass --vico-blocks.",
        ));
    }
    Ok(())
}

/// A trained table must have the base table's shape: same vocabulary, same width.
/// A released-script run trains one token table per text encoder: two on SDXL, one
/// elsewhere. Tables (`file`: one of them, or the checkpoint holding them) from another
/// model are refused, since SD 1.x's encoder and SDXL's first have tables of one shape.
fn token_tables_fit(sd: &StableDiffusion, first: bool, second: bool, file: &Path) -> Result<()> {
    let other_model = "Infer with the base model the run trained on.";
    let (what, fix) = match (sd.text_encoder_2.is_some(), first, second) {
        (true, true, false) => (
            "one text encoder's token table, but the model is SDXL (two encoders)",
            other_model,
        ),
        (false, _, true) => (
            "SDXL's two text encoders' token tables, but the model has one encoder",
            other_model,
        ),
        (true, false, true) => (
            "SDXL's two text encoders' token tables, but the first is missing",
            "Put back the run's token_embedding.safetensors.",
        ),
        _ => return Ok(()),
    };
    Err(Error::mismatch(
        file,
        format!(
            "{}: the run trained {what} ({}). {fix}",
            file.display(),
            sd.source
        ),
    ))
}

fn load_token_table(file: &Path, base: &Tensor, device: &Device) -> Result<Tensor> {
    let t = tensors::read_floats(file, device, &[])?
        .remove(run::TOKEN_TABLE_KEY)
        .ok_or_else(|| {
            Error::bad_file(
                file,
                format!(
                    "{} has no tensor {:?}.",
                    file.display(),
                    run::TOKEN_TABLE_KEY
                ),
            )
        })?;
    if t.dims() != base.dims() {
        return Err(Error::mismatch(
            file,
            format!(
                "{}: the token table is {:?} but this text encoder's is {:?} (trained on another base \
                 model?).",
                file.display(),
                t.dims(),
                base.dims()
            ),
        ));
    }
    Ok(t.to_dtype(base.dtype())?)
}

/// Where the weights come from: a trained folder (whose base model `--model` may
/// replace), or `--model` alone; `--lora`/`--embeds` override the folder's files.
pub fn sources(opts: &InferOptions) -> Result<Sources> {
    let src = sources_unchecked(opts)?;
    // A weights file named wrong fails here, before the base model loads.
    let files = [
        &src.lora,
        &src.embeds,
        &src.embeds_2,
        &src.custom_diffusion,
        &src.full_delta,
        &src.vico_blocks,
    ];
    for f in files.into_iter().flatten() {
        tensors::require_file(f)?;
    }
    // A trained folder's record names its words; an embeddings file's are read at load.
    check_references(&src, src.class_words.len())?;
    Ok(src)
}

fn sources_unchecked(opts: &InferOptions) -> Result<Sources> {
    let dir = match (&opts.model_dir, &opts.model) {
        (Some(dir), _) => dir.clone(),
        (None, Some(model)) => {
            if opts.checkpoint.is_some() {
                return Err(Error::usage(
                    "--checkpoint samples a checkpoint of a run: pass the run with --model-dir.",
                ));
            }
            return Ok(Sources {
                model: model.clone(),
                single_file: opts.single_file.clone(),
                lora: opts.lora.clone(),
                embeds: opts.embeds.clone(),
                embeds_2: None,
                token_table: None,
                token_table_2: None,
                custom_diffusion: opts.custom_diffusion.clone(),
                full_delta: opts.full_delta.clone(),
                class_words: Default::default(),
                aliases: Default::default(),
                checkpoint: None,
                vico_blocks: opts.vico_blocks.clone(),
                references: opts.references.clone(),
                retouch: opts.sampling.retouch.is_some(),
            });
        }
        (None, None) => PathBuf::from(run::DEFAULT_DIR),
    };
    if let Some(which) = &opts.checkpoint {
        return checkpoint_sources(&dir, which, opts);
    }
    let folder = run::open(&dir)?;
    let (model, single_file) = match &opts.model {
        Some(m) => (m.clone(), opts.single_file.clone()),
        None => (folder.record.base_model, folder.record.single_file),
    };
    Ok(Sources {
        model,
        single_file,
        lora: opts.lora.clone().or(folder.lora),
        embeds: opts.embeds.clone().or(folder.embeds),
        // The folder's second file goes with its first.
        embeds_2: folder.embeds_2.filter(|_| opts.embeds.is_none()),
        token_table: folder.token_table,
        token_table_2: folder.token_table_2,
        custom_diffusion: opts.custom_diffusion.clone().or(folder.custom_diffusion),
        full_delta: opts.full_delta.clone().or(folder.full_delta),
        class_words: folder.record.tokens,
        aliases: folder.record.aliases,
        checkpoint: None,
        vico_blocks: opts.vico_blocks.clone().or(folder.vico_blocks),
        references: references(opts, &folder.record.config)?,
        retouch: opts.sampling.retouch.is_some(),
    })
}

/// The references (ViCo's, or the retouch stage's): `--reference`, else the first image of
/// each sample of the folder the run trained on (none if the settings name no folder that
/// still exists).
fn references(opts: &InferOptions, settings: &serde_json::Value) -> Result<Vec<PathBuf>> {
    if !opts.references.is_empty() {
        return Ok(opts.references.clone());
    }
    let wanted = settings["method"] == "vico" || opts.sampling.retouch.is_some();
    match settings["instance_dir"].as_str().map(PathBuf::from) {
        Some(dir) if dir.is_dir() && wanted => crate::data::first_images(&dir),
        _ => Ok(Vec::new()),
    }
}

/// What a checkpoint's settings say a single-file base model needs.
fn recorded_single_file(settings: &serde_json::Value) -> SingleFileOptions {
    serde_json::from_value(settings.clone()).unwrap_or_default()
}

/// A checkpoint of the run in `dir` (finished or not): its file, and from the settings it
/// records, the base model and the adapters' scale.
fn checkpoint_sources(dir: &Path, which: &str, opts: &InferOptions) -> Result<Sources> {
    if opts.lora.is_some()
        || opts.embeds.is_some()
        || opts.custom_diffusion.is_some()
        || opts.full_delta.is_some()
        || opts.vico_blocks.is_some()
    {
        return Err(Error::usage(
            "--checkpoint brings its own trained weights and pseudo-words: drop --lora, --embeds, \
             --custom-diffusion, --full-delta and --vico-blocks.",
        ));
    }
    let step = which.trim_start_matches("step-").parse::<usize>().ok();
    let file = match step {
        Some(s) => crate::io::checkpoint::file(dir, s),
        None => PathBuf::from(which),
    };
    if !file.is_file() {
        let have = crate::io::checkpoint::steps(dir).unwrap_or_default();
        return Err(Error::usage(format!(
            "--checkpoint {which}: {} does not exist; the run in {} has checkpoints at steps {}.",
            file.display(),
            dir.display(),
            if have.is_empty() {
                "(none)".into()
            } else {
                format!("{have:?}")
            }
        )));
    }
    let settings = tensors::metadata(&file, crate::io::checkpoint::SETTINGS_KEY)?;
    let settings: serde_json::Value = settings
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| {
            Error::bad_file(
                &file,
                format!(
                    "{} records no settings (a checkpoint of an older version): sample the \
                     finished run instead.",
                    file.display()
                ),
            )
        })?;
    let rank = settings["lora_rank"].as_f64().unwrap_or(1.0).max(1.0);
    let alpha = settings["lora_alpha"].as_f64().unwrap_or(rank);
    let model = match (&opts.model, settings["model"].as_str()) {
        (Some(m), _) => (m.clone(), opts.single_file.clone()),
        (None, Some(m)) => (m.to_string(), recorded_single_file(&settings)),
        (None, None) => {
            return Err(Error::bad_file(
                &file,
                format!("{}: no base model recorded.", file.display()),
            ))
        }
    };
    let record = run::open(dir).map(|f| f.record).ok();
    let (class_words, mut aliases) = record.map(|r| (r.tokens, r.aliases)).unwrap_or_default();
    // An unfinished run has no record yet: its checkpoints carry the aliases.
    if let Some(text) = tensors::metadata(&file, crate::io::checkpoint::ALIASES_KEY)? {
        aliases = serde_json::from_str(&text).map_err(|e| {
            Error::bad_file(
                &file,
                format!("{}: unreadable aliases: {e}", file.display()),
            )
        })?;
    }
    let (model, single_file) = model;
    let references = references(opts, &settings)?;
    Ok(Sources {
        model,
        single_file,
        lora: None,
        embeds: None,
        embeds_2: None,
        token_table: None,
        token_table_2: None,
        custom_diffusion: None,
        full_delta: None,
        class_words,
        aliases,
        checkpoint: Some((file, alpha / rank)),
        vico_blocks: None,
        references,
        retouch: opts.sampling.retouch.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::second_of_pair;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    /// diffusers' pair is found beside its first file, for the final save and for a step's
    /// save; an A1111 file (`clip_l`, `clip_g`), a lone first file and a file that is not
    /// safetensors have none.
    #[test]
    fn the_second_file_of_a_pair_is_found_beside_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let row = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let write = |name: &str, key: &str| {
            let path = dir.path().join(name);
            let t = HashMap::from([(key.to_string(), row.clone())]);
            crate::io::tensors::write(&path, &t, None).unwrap();
            path
        };
        for (first, second) in [
            ("learned_embeds.safetensors", "learned_embeds_2.safetensors"),
            (
                "learned_embeds-steps-500.safetensors",
                "learned_embeds_2-steps-500.safetensors",
            ),
        ] {
            let f = write(first, "<v0>");
            assert_eq!(second_of_pair(&f), None, "{first} alone");
            let s = write(second, "<v0>");
            assert_eq!(second_of_pair(&f), Some(s), "{first}");
        }
        let a1111 = write("v0.safetensors", "clip_l");
        write("v0_2.safetensors", "<v0>");
        assert_eq!(second_of_pair(&a1111), None);
        let pickle = dir.path().join("words.bin");
        std::fs::write(&pickle, b"not safetensors").unwrap();
        assert_eq!(second_of_pair(&pickle), None);
    }
}
