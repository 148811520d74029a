//! Setup, the one path `train` and `batch` both take from settings to a [`Trainer`]:
//! every check of the settings and inputs, the pair folder's images and masks, the base
//! model, masks a folder lacks, and the trainable weights' first values. Nothing is
//! written here.

use candle_core::{DType, Device, Tensor, Var};

use super::config::TrainConfig;
use super::method::{Recipe, RowInit};
use super::noise::NoiseAhead;
use super::objective::Pool;
use super::trainer::{optimizer, Trainer};
use crate::data::{MaskPolicy, PairDataset};
use crate::error::{Error, Result};
use crate::io::progress::Progress;
use crate::masks::{self, auto::AutoMasks};
use crate::model::clip::ClipTextModel;
use crate::model::loader::StableDiffusion;
use crate::model::lora::TrainableLora;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::tokenizer::{pseudo_word, pseudo_words_in};
use crate::model::tuned::TrainableTuned;
use crate::model::vico;

/// A setup that failed, with the base model when it was loaded and survived, for the
/// next pair.
pub struct SetupError {
    pub error: Error,
    pub model: Option<StableDiffusion>,
}

impl Trainer {
    /// [`Trainer::setup`] with a model of its own.
    pub fn new(cfg: TrainConfig, device: &Device, progress: Progress) -> Result<Self> {
        Self::setup(cfg, device, progress, None).map_err(|e| e.error)
    }

    /// Checks the settings, loads the pair folder (where bad input shows up, before the
    /// model loads), then the base model unless `model` is it already, makes the masks
    /// the folder lacks, and builds the trainer.
    pub fn setup(
        cfg: TrainConfig,
        device: &Device,
        progress: Progress,
        model: Option<StableDiffusion>,
    ) -> std::result::Result<Self, Box<SetupError>> {
        let fail = |error, model| Box::new(SetupError { error, model });
        let checked = cfg.validate();
        let mut data = match checked.and_then(|()| load_pair(&cfg, device)) {
            Ok(data) => data,
            Err(e) => return Err(fail(e, model)),
        };
        let cfg = one_sample_prompts(cfg, data.samples.len());
        if let Err(e) = check_against_pair(&cfg, &data) {
            return Err(fail(e, model));
        }
        let sd = match model {
            Some(sd) => sd,
            None => load_model(&cfg, device).map_err(|e| fail(e, None))?,
        };
        let auto = match make_masks(&cfg, &sd, &mut data, progress) {
            Ok(auto) => auto,
            Err(e) => return Err(fail(e, Some(sd))),
        };
        let mut t = Self::with_model(cfg, sd, &data).map_err(|e| fail(e, None))?;
        if let Err(e) = super::prior::check(&t) {
            return Err(fail(e, Some(t.into_model())));
        }
        t.auto_masks = auto;
        Ok(t)
    }

    /// A trainer on the loaded model and pair `data` (`cfg.instance_dir`).
    fn with_model(cfg: TrainConfig, mut sd: StableDiffusion, data: &PairDataset) -> Result<Self> {
        let device = &sd.device.clone();
        // A model reused from the previous pair (`batch`) forgets that pair's words.
        sd.tokenizer.reset();
        if let Some((_, tok_2)) = &mut sd.text_encoder_2 {
            tok_2.reset();
        }
        let recipe = Recipe::new(&cfg, data.num_images());
        let class_words: Vec<String> = data.samples.iter().map(|s| s.class_word.clone()).collect();
        let words: Vec<String> = (0..class_words.len()).map(pseudo_word).collect();
        name_samples(&mut sd, &recipe, &words, &class_words)?;
        if cfg.sample_every != Some(0) {
            for p in &cfg.sample_prompts {
                if let Some(w) = sd.tokenizer.check_length(p, "the sample prompt")? {
                    crate::io::console::note(format_args!("warning: {w}"));
                }
            }
        }
        let init = recipe.trains.row_init;
        let rows = init_rows((&sd.text_encoder, &sd.tokenizer), init, &class_words)?;
        let rows_2 = (sd.text_encoder_2.as_ref())
            .map(|(te, tok)| init_rows((te, tok), init, &class_words))
            .transpose()?;
        let mut pool = Pool::new(&sd, data, recipe.draw.prompts)?;
        // Class images (prior preservation) join the batch later, encoded each step.
        if recipe.class_images.is_none() {
            pool.cache_posteriors(&sd, &recipe.draw, cfg.dtype)?;
        }
        let last = recipe.total_steps();
        let per_step = recipe.max_images_per_step(data.num_images(), data.samples.len());
        // A CLiC step also encodes each image's masked copy, prior preservation as many
        // class images, ViCo each image's reference.
        let doubled =
            recipe.draw.roi.is_some() || recipe.class_images.is_some() || recipe.draw.reference;
        let encoded = per_step * if doubled { 2 } else { 1 };
        let noise = NoiseAhead::new(cfg.seed, pool.noise_sizes(&sd, encoded)?, last);
        let lora = match &recipe.trains.lora {
            Some(shape) => TrainableLora::new(
                &lora_targets(&sd, shape.only),
                shape.rank,
                shape.alpha,
                cfg.seed,
                device,
                DType::F32,
            )?,
            None => TrainableLora::none(),
        };
        let tuned = match recipe.trains.tuned {
            Some(only) => {
                let paths: Vec<String> = (lora_targets(&sd, Some(only)).into_iter())
                    .map(|t| t.path)
                    .collect();
                TrainableTuned::new(sd.unet.base_weights(&paths), true, DType::F32)?
            }
            None => TrainableTuned::none(),
        };
        // Released-script mode trains each text encoder's whole table.
        let trained_table = |table: &Tensor| -> Result<Option<Var>> {
            match recipe.trains.token_table {
                true => Ok(Some(Var::from_tensor(
                    &table.to_dtype(DType::F32)?.copy()?,
                )?)),
                false => Ok(None),
            }
        };
        let table = trained_table(sd.text_encoder.token_table())?;
        let table_2 = match &sd.text_encoder_2 {
            Some((te, _)) => trained_table(te.token_table())?,
            None => None,
        };
        let vico = match recipe.trains.vico_blocks {
            Some(_) => Some(vico::Blocks::init(
                &vico::sites(&sd.unet),
                cfg.seed,
                device,
                DType::F32,
            )?),
            None => None,
        };
        let weight_decay = recipe.trains.weight_decay;
        let mut t = Self {
            cfg,
            recipe,
            sd,
            pool,
            noise,
            lora,
            tuned,
            vico,
            rows,
            rows_2,
            table,
            table_2,
            full: None,
            momentum: None,
            opt: optimizer(Vec::new(), weight_decay)?,
            step: 0,
            class_words,
            skipped_in_a_row: 0,
            auto_masks: None,
        };
        t.opt = t.optimizer_for(1)?;
        Ok(t)
    }

    /// A new optimizer over what step `d` trains (ViCo's blocks at their own rate).
    pub(super) fn optimizer_for(&self, d: usize) -> Result<super::optim::AdamW> {
        let mut opt = optimizer(self.opt_vars(d), self.recipe.trains.weight_decay)?;
        if let (Some(blocks), Some(lr)) = (&self.vico, self.recipe.trains.vico_blocks) {
            opt.fix_lr(&blocks.vars(), lr);
        }
        Ok(opt)
    }
}

/// Names each sample in prompts: a pseudo-word with a trained row, or (DreamBooth) an
/// alias for its identifier and class word (`<v0>` -> "sks person").
fn name_samples(
    sd: &mut StableDiffusion,
    recipe: &Recipe,
    words: &[String],
    class_words: &[String],
) -> Result<()> {
    let Some(ids) = recipe.identifiers else {
        sd.tokenizer.add_pseudo_words(words)?;
        if let Some((_, tok_2)) = &mut sd.text_encoder_2 {
            tok_2.add_pseudo_words(words)?;
        }
        return Ok(());
    };
    let aliases: Vec<(String, String)> = (words.iter().zip(ids).zip(class_words))
        .map(|((w, id), class)| (w.clone(), format!("{id} {class}")))
        .collect();
    if let Some((_, tok_2)) = &mut sd.text_encoder_2 {
        tok_2.add_aliases(&aliases)?;
    }
    sd.tokenizer.add_aliases(&aliases)
}

/// The U-Net's adaptable layers, or those whose names end in one of `only`.
pub fn lora_targets(
    sd: &StableDiffusion,
    only: Option<&[&str]>,
) -> Vec<crate::model::lora::LoraTarget> {
    let keep = |path: &str| only.is_none_or(|o| o.iter().any(|s| path.ends_with(&format!(".{s}"))));
    (sd.unet.lora_targets().into_iter())
        .filter(|t| keep(&t.path))
        .collect()
}

/// Loads the base model the settings name, refusing a resolution its VAE cannot take.
fn load_model(cfg: &TrainConfig, device: &Device) -> Result<StableDiffusion> {
    let sd = StableDiffusion::load_with(&cfg.model, &cfg.single_file, device, cfg.dtype)?;
    let f = sd.vae_factor();
    crate::model::loader::check_side("--resolution", cfg.resolution, f, f)?;
    Ok(sd)
}

/// The reference images and masks of `cfg.instance_dir`: where bad input shows up.
/// A folder without masks loads with whole images; [`make_masks`] then replaces them.
pub fn load_pair(cfg: &TrainConfig, device: &Device) -> Result<PairDataset> {
    let whole = cfg.no_masks || !cfg.method.reads_masks();
    let policy = if whole || masks::auto::needed(&cfg.instance_dir, cfg.no_masks)? {
        MaskPolicy::WholeImage
    } else {
        MaskPolicy::Required {
            model: cfg.model.clone(),
        }
    };
    PairDataset::load(&cfg.instance_dir, cfg.resolution, policy, device)
}

/// The masks of a pair folder that has none, from the base model's attention.
fn make_masks(
    cfg: &TrainConfig,
    sd: &StableDiffusion,
    data: &mut PairDataset,
    progress: Progress,
) -> Result<Option<AutoMasks>> {
    if !cfg.method.reads_masks() || !masks::auto::needed(&cfg.instance_dir, cfg.no_masks)? {
        return Ok(None);
    }
    masks::auto::apply(sd, data, progress == Progress::Bar).map(Some)
}

/// A folder of one sample samples the default prompts that name only `<v0>`.
fn one_sample_prompts(mut cfg: TrainConfig, n_samples: usize) -> TrainConfig {
    if n_samples == 1 && cfg.sample_prompts == TrainConfig::default().sample_prompts {
        cfg.sample_prompts.retain(|p| !p.contains("<v1>"));
    }
    cfg
}

/// The settings' checks that need the pair, before the model loads: sample prompts
/// naming a word the pair lacks, and more samples than the method has identifiers.
fn check_against_pair(cfg: &TrainConfig, data: &PairDataset) -> Result<()> {
    let n = data.samples.len();
    if n < 2 && cfg.method == crate::train::method::Method::MagicTailor {
        return Err(Error::usage(format!(
            "{} holds one sample; MagicTailor learns a concept and a component. Name the pair \
             folder {{concept}}_{{id}}+{{component}}_{{id}}, or train one sample with another \
             --method (ti, dreambooth, custom-diffusion, clic, vico).",
            cfg.instance_dir.display()
        )));
    }
    check_sample_prompts(cfg, n)?;
    let recipe = Recipe::new(cfg, data.num_images());
    let words = match (recipe.identifiers, recipe.trains.row_init) {
        (Some(ids), _) => Some(("identifiers", ids)),
        (None, RowInit::Words(w)) if recipe.trains.rows => Some(("initial words", w)),
        _ => None,
    };
    match words {
        Some((what, w)) if n > w.len() => Err(Error::usage(format!(
            "--method {} names at most {} samples ({what} {}), but {} has {n}.",
            recipe.method.name(),
            w.len(),
            w.join(", "),
            cfg.instance_dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Refuses, before training starts, a sample prompt naming a pseudo-word this pair lacks.
fn check_sample_prompts(cfg: &TrainConfig, n_samples: usize) -> Result<()> {
    if cfg.sample_every == Some(0) {
        return Ok(());
    }
    let words: Vec<String> = (0..n_samples).map(pseudo_word).collect();
    for prompt in &cfg.sample_prompts {
        let unknown: Vec<String> = (pseudo_words_in(prompt).into_iter())
            .filter(|w| !words.contains(w))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::usage(format!(
                "the sample prompt {prompt:?} uses {}, but this pair trains only {}. Fix \
                 --sample-prompts.",
                unknown.join(", "),
                words.join(", ")
            )));
        }
    }
    Ok(())
}

/// Pseudo-word rows of the text encoder `te` (with its tokenizer `tok`) start as the
/// embedding of the first token of their class word, or of the recipe's words. SDXL's
/// second encoder starts its rows alike, from its own table.
fn init_rows(
    (te, tok): (&ClipTextModel, &ClipTokenizer),
    init: RowInit,
    class_words: &[String],
) -> Result<Var> {
    let mut rows = Vec::new();
    for (s, class) in class_words.iter().enumerate() {
        let word = match init {
            RowInit::ClassWord => class.as_str(),
            RowInit::Words(w) => w[s],
        };
        // ids[0] is BOS; ids[1] the first token of the word.
        rows.push(te.token_row(tok.encode(word)?[1])?);
    }
    Ok(Var::from_tensor(
        &Tensor::stack(&rows, 0)?.to_dtype(DType::F32)?,
    )?)
}
