//! `infer --retouch`: Layout-and-Retouch's second stage (seed 002, §3.2.2). The layout
//! image (stage 1, `--layout-steps`) is redrawn with the subjects' details from their
//! reference images while keeping its structure and background.
//!
//! Three paths run over the same DDIM steps, batched into one U-Net call per step:
//! - the layout path: the layout latent's DDIM inversion, read back step by step;
//! - each named pseudo-word's reference path: its reference image's inversion, likewise
//!   (computed once per command, whatever the prompts and seeds);
//! - the target path: from the layout's inverted noise, the personalized model on the
//!   prompt with guidance.
//!
//! The target's self-attention reads the layout path's keys and values for the first
//! `layout_swap_steps` steps and every reference's after (`model::swap`); from
//! `blend_from` on, each self-attention output is blended with the layout path's by the
//! adaptive mask (`masks::blend`) of the subjects, made from the target's cross-attention
//! on their words at the previous step and, with a SAM model, the layout image's segments.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::references::References;
use super::sampling::{invert_path, Conditioning};
use super::vico::sample_of;
use super::weights::Personalized;
use crate::error::{Error, Result};
use crate::masks::attention::bilinear;
use crate::masks::cleanup::Binary;
use crate::masks::sam::Refiner;
use crate::model::loader::StableDiffusion;
use crate::model::nn::{AddedCond, Ctx};
use crate::model::probe::{AttnProbe, BlockKind};
use crate::model::scheduler::Ddim;
use crate::model::swap::{swap_layers, KeysValues, Source, Swap};
use crate::model::tokenizer::{pseudo_word, pseudo_words_in};

/// The retouch stage's settings (recorded in every image it draws).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retouch {
    /// Whether the target's self-attention reads other paths' keys and values at all.
    pub swap: bool,
    /// The first steps, in which it reads the layout path's; after, the references'.
    pub layout_swap_steps: usize,
    /// The step from which the target's self-attention outputs are blended with the
    /// layout path's (`steps`: never).
    pub blend_from: usize,
    /// Segment Anything weights for the layout image's segment masks (None: the
    /// attention masks alone).
    pub sam_model: Option<String>,
    /// Memory for the references' keys and values per step, kept for every image of the
    /// command (MiB; 0: none, the references ride in every step's batch).
    pub kv_cache_mb: usize,
}

/// [`Retouch::kv_cache_mb`]'s default: SD 2.x at 512 px keeps about 24 MiB per reference
/// and step in bf16 (47 in f32), so one reference's 40 steps fit in bf16; SDXL at 1024 px
/// about 63 MB, so 34 of one reference's 40.
pub const KV_CACHE_MB: usize = 2048;

impl Retouch {
    /// Our defaults for `steps` DDIM steps (the paper's values did not survive
    /// extraction): the layout's keys and values for the first fifth, the blend from
    /// there on (from step 1 at least: the mask reads the previous step's attention).
    pub fn defaults(steps: usize) -> Self {
        Self {
            swap: true,
            layout_swap_steps: steps / 5,
            blend_from: (steps / 5).max(1),
            sam_model: None,
            kv_cache_mb: KV_CACHE_MB,
        }
    }

    /// Refuses settings that cannot run on `steps` DDIM steps at `(width, height)`.
    pub fn check(&self, steps: usize, (width, height): (usize, usize)) -> Result<()> {
        if self.sam_model.is_some() && width != height {
            return Err(Error::usage(format!(
                "--refine sam segments square images (SAM's input), and this one is \
                 {width}x{height}: drop --refine, or make --width and --height equal."
            )));
        }
        if self.sam_model.is_some() && self.blend_from >= steps {
            return Err(Error::usage(format!(
                "--refine sam segments the layout image for the blend mask, and nothing is \
                 blended (--blend-from {} of --steps {steps}): drop --refine, or blend earlier.",
                self.blend_from
            )));
        }
        if self.blend_from == 0 {
            return Err(Error::usage(
                "--blend-from 0: the blend mask comes from the previous step's attention, so the \
                 blend starts at step 1 at the earliest.",
            ));
        }
        for (flag, v) in [
            ("--swap-layout-steps", self.layout_swap_steps),
            ("--blend-from", self.blend_from),
        ] {
            if v > steps {
                return Err(Error::usage(format!(
                    "{flag} {v} is more than --steps {steps}."
                )));
            }
        }
        Ok(())
    }
}

/// What retouching reads that no prompt changes, built once per command: the references,
/// their inverted paths, and SAM.
pub struct Stage {
    references: References,
    sam: Option<Refiner>,
    paths: RefCell<HashMap<PathKey, Rc<Vec<Tensor>>>>,
    kv: RefCell<KvCache>,
}

/// A reference path: (sample, latent height, latent width, steps).
type PathKey = (usize, usize, usize, usize);

/// The references' self-attention keys and values at the swap layers, per sampling size
/// and step, within a memory limit.
struct KvCache {
    limit: usize,
    used: usize,
    /// By (latent height, latent width, steps).
    steps: HashMap<(usize, usize, usize), Kept>,
}

/// Per step, every reference's keys and values (`[refs, n, dim]` per layer, in sample
/// order; None: not kept).
type Kept = Rc<Vec<Option<KeysValues>>>;

impl Stage {
    /// `kv_cache_mb`: see [`Retouch::kv_cache_mb`].
    pub fn new(
        references: Vec<std::path::PathBuf>,
        sam: Option<Refiner>,
        kv_cache_mb: usize,
    ) -> Self {
        Self {
            references: References::new(references),
            sam,
            paths: Default::default(),
            kv: RefCell::new(KvCache {
                limit: kv_cache_mb << 20,
                used: 0,
                steps: HashMap::new(),
            }),
        }
    }
}

/// Refuses, before any model loads, prompts the stage cannot retouch with `references`:
/// one that names no pseudo-word, or one without its reference image.
pub fn check_prompts<'p>(
    prompts: impl IntoIterator<Item = &'p str>,
    references: &[std::path::PathBuf],
) -> Result<()> {
    if references.is_empty() {
        return Err(Error::usage(
            "--retouch needs a reference image per pseudo-word: pass --reference IMAGE (one per \
             word, in order), or sample a trained folder whose images are still where it was \
             trained.",
        ));
    }
    for prompt in prompts {
        let words = pseudo_words_in(prompt);
        if words.is_empty() {
            return Err(Error::usage(format!(
                "--retouch redraws the subjects of the prompt's pseudo-words, and {prompt:?} \
                 names none."
            )));
        }
        for word in words {
            let Ok(sample) = sample_of(&word) else {
                return Err(Error::usage(format!(
                    "{prompt:?} names {word}, which is not a pseudo-word (<v0>, <v1>, ...)."
                )));
            };
            if sample >= references.len() {
                return Err(Error::usage(format!(
                    "{prompt:?} names {word}, but there are {} reference image(s): give one \
                     --reference per pseudo-word, in order (<v0>'s first).",
                    references.len()
                )));
            }
        }
    }
    Ok(())
}

/// The retouch stage of `p` (loaded from `src`): its references, and SAM when `r` names a
/// model. Refuses what it cannot retouch.
pub fn stage(
    p: &Personalized,
    src: &super::Sources,
    r: &Retouch,
    steps: usize,
    device: &candle_core::Device,
) -> Result<Stage> {
    if p.vico.is_some() {
        return Err(Error::usage(
            "--retouch on ViCo's image cross-attention blocks is not built: retouch a run of \
             another method.",
        ));
    }
    let blends = r.blend_from < steps;
    let sam = match &r.sam_model {
        Some(spec) if blends => Some(Refiner::load(spec, device)?),
        Some(_) => None,
        None if !blends => None,
        None => {
            crate::io::console::note(format_args!(
                "warning: --retouch without --refine sam: the blend masks come from attention alone."
            ));
            None
        }
    };
    // Each reference's path is conditioned on its own pseudo-word.
    let tok = &p.sd.tokenizer;
    if let Some(s) =
        (0..src.references.len()).find(|&s| !tok.unknown_pseudo_words(&pseudo_word(s)).is_empty())
    {
        return Err(Error::usage(format!(
            "{} reference images, and this model has no {}: give one --reference per pseudo-word, \
             in order (<v0>'s first).",
            src.references.len(),
            pseudo_word(s)
        )));
    }
    Ok(Stage::new(src.references.clone(), sam, r.kv_cache_mb))
}

/// A pseudo-word the prompt names: its sample and its tokens' positions in the prompt.
struct Word {
    sample: usize,
    positions: Vec<usize>,
}

/// One prompt's retouch: the layout path's conditioning (the personalized model on the
/// prompt, unguided, so that the inversion reads back) and the named words.
pub(super) struct Prompt<'a> {
    stage: &'a Stage,
    opts: Retouch,
    layout: Conditioning<'a>,
    words: Vec<Word>,
    /// Every reference path's conditioning ("a photo of <vN>"), in sample order.
    ref_conds: Vec<Conditioning<'a>>,
}

/// The retouched latents and, per image, the last blend mask at the latent's size (None
/// when nothing was blended).
pub(super) struct Retouched {
    pub latents: Tensor,
    pub masks: Option<Vec<Vec<f32>>>,
}

impl<'a> Prompt<'a> {
    pub fn new(p: &'a Personalized, prompt: &str, opts: &Retouch) -> Result<Self> {
        let stage = p
            .retouch
            .as_ref()
            .ok_or_else(|| Error::internal("--retouch without its references loaded"))?;
        let w = p.weights();
        let tok = &p.sd.tokenizer;
        let mut words = Vec::new();
        for word in pseudo_words_in(prompt) {
            let sample = sample_of(&word)?;
            if sample >= stage.references.len() {
                return Err(Error::internal(format!("{word} has no reference image")));
            }
            if words.iter().any(|w: &Word| w.sample == sample) {
                continue;
            }
            let at = prompt.find(&word).unwrap_or(0);
            let positions = tok
                .word_positions(prompt[..at].trim_end(), &word)?
                .ok_or_else(|| Error::internal(format!("{word} has no tokens in {prompt:?}")))?;
            words.push(Word { sample, positions });
        }
        if words.is_empty() {
            return Err(Error::internal(format!("{prompt:?} names no pseudo-word")));
        }
        let ref_conds = (0..stage.references.len())
            .map(|s| w.condition(&format!("a photo of {}", pseudo_word(s)), "", 1.0))
            .collect::<Result<_>>()?;
        Ok(Self {
            stage,
            opts: opts.clone(),
            layout: w.condition(prompt, "", 1.0)?,
            words,
            ref_conds,
        })
    }

    /// Retouches the layout latents `z: [n, c, h, w]` with `main` (the prompt's guided
    /// conditioning); `layout_pixels` (`[n, 3, H, W]` u8) feed SAM. `on_step` runs after
    /// every step.
    pub fn retouch(
        &self,
        main: &Conditioning,
        z: &Tensor,
        layout_pixels: &Tensor,
        steps: usize,
        mut on_step: impl FnMut(),
    ) -> Result<Retouched> {
        let sd = main.weights.sd;
        let ddim =
            Ddim::new(&sd.schedule, steps).map_err(|e| Error::usage(format!("--steps: {e}")))?;
        let (n, _, h, w) = z.dims4()?;
        let paths = self.paths(main, z, steps, &mut on_step)?;
        let guided = main.uncond.is_some();
        let grids = grids(&sd.unet, (h, w));
        let map_grid = grids[2.min(grids.len() - 1)];
        let mut x = paths.layout[0].clone();
        let mut maps: Option<Vec<Vec<Vec<f32>>>> = None;
        let mut segments: Option<Vec<Vec<Option<Binary>>>> = None;
        let mut last_masks = None;
        for (i, &t) in ddim.timesteps().iter().enumerate() {
            let masks = match (i >= self.opts.blend_from, &maps) {
                (true, Some(m)) => {
                    if segments.is_none() {
                        segments = Some(self.segments(m, layout_pixels, (h, w), map_grid)?);
                    }
                    Some(self.blend_masks(m, segments.as_deref(), (h, w), map_grid))
                }
                _ => None,
            };
            let blend = match &masks {
                Some(m) => Some(per_grid(m, (h, w), &grids, guided, sd)?),
                None => None,
            };
            let step = paths.step(i, &x, self.source_at(i), blend)?;
            // The maps feed the next step's mask: read only from the step before the blend.
            let probe = (i + 1 >= self.opts.blend_from)
                .then(|| AttnProbe::for_queries(&[map_grid.0 * map_grid.1], &[BlockKind::Up]));
            let eps = step.eps(main, t, probe.as_ref())?;
            x = ddim.step(&eps, t, &x)?;
            if let Some(probe) = probe {
                maps = Some(self.word_maps(probe.take(), step.sources + step.targets - n, n)?);
            }
            last_masks = masks.or(last_masks);
            on_step();
        }
        Ok(Retouched {
            latents: x,
            masks: last_masks,
        })
    }

    /// Whose keys and values the target reads at step `i`.
    fn source_at(&self, i: usize) -> Option<Source> {
        match (self.opts.swap, i < self.opts.layout_swap_steps) {
            (false, _) => None,
            (true, true) => Some(Source::Layout),
            (true, false) => Some(Source::References),
        }
    }

    /// The sources of retouching `z`: the layout's inversion path, and (when the swap
    /// reads them) the references' paths and kept keys and values.
    fn paths(
        &self,
        main: &'a Conditioning,
        z: &Tensor,
        steps: usize,
        on_step: impl FnMut(),
    ) -> Result<Paths<'a>> {
        let sd = main.weights.sd;
        let (n, _, h, w) = z.dims4()?;
        let layout = sampling_order(invert_path(&self.layout, z.clone(), steps, on_step)?);
        let reads_refs = self.opts.swap && self.opts.layout_swap_steps < steps;
        let (refs, kv) = match reads_refs {
            true => {
                let all = (0..self.ref_conds.len())
                    .map(|s| self.reference_path(sd, s, (h, w), steps))
                    .collect::<Result<Vec<_>>>()?;
                let kv = self.reference_kv(main, &all, (h, w), steps)?;
                let named = self.words.iter().map(|w| all[w.sample].clone()).collect();
                (named, Some(kv))
            }
            false => (Vec::new(), None),
        };
        let one = z.narrow(0, 0, 1)?;
        Ok(Paths {
            sd,
            layout,
            refs,
            kv,
            samples: self.words.iter().map(|w| w.sample).collect(),
            layout_context: self.layout.cond.repeat((n, 1, 1))?,
            ref_contexts: (self.words.iter())
                .map(|w| self.ref_conds[w.sample].cond.clone())
                .collect(),
            target_context: main.context(n)?,
            layout_added: self.layout.added(z)?,
            ref_added: (self.words.iter())
                .map(|w| self.ref_conds[w.sample].added(&one))
                .collect::<Result<_>>()?,
            target_added: main.added(z)?,
            layers: swap_layers(&sd.unet),
            n,
            targets: if main.uncond.is_some() { 2 * n } else { n },
        })
    }

    /// Every reference's keys and values at the swap layers, per step of the swap's second
    /// part, kept for the command: from the references' own pass through the U-Net (all of
    /// them, with `main`'s adapters), a step kept only when they fit in the cache, so that
    /// what is kept depends neither on the batch nor on the prompt that asked first.
    fn reference_kv(
        &self,
        main: &Conditioning,
        paths: &[Rc<Vec<Tensor>>],
        (h, w): (usize, usize),
        steps: usize,
    ) -> Result<Kept> {
        let key = (h, w, steps);
        if let Some(kept) = self.stage.kv.borrow().steps.get(&key) {
            return Ok(kept.clone());
        }
        let sd = main.weights.sd;
        let ddim =
            Ddim::new(&sd.schedule, steps).map_err(|e| Error::usage(format!("--steps: {e}")))?;
        let layers = swap_layers(&sd.unet);
        let mut kept = vec![None; steps];
        let added = self.references_added(&paths[0][0])?;
        let mut cache = self.stage.kv.borrow_mut();
        // Every step costs the same: known after the first.
        let mut per_step = 0;
        let timesteps = ddim.timesteps().iter().enumerate();
        for (i, &t) in timesteps.skip(self.opts.layout_swap_steps) {
            if cache.used + per_step > cache.limit {
                break;
            }
            // Every reference in one call: the same batch whichever prompt asks.
            let rows = paths.iter().map(|p| p[i].clone()).collect::<Vec<_>>();
            let contexts = self
                .ref_conds
                .iter()
                .map(|c| c.cond.clone())
                .collect::<Vec<_>>();
            let swap = Swap::capturing(layers.clone());
            let ctx = Ctx {
                lora: main.weights.lora,
                tuned: main.weights.tuned,
                swap: Some(&swap),
                added: added.as_ref(),
                ..Ctx::default()
            };
            let ts = Tensor::from_vec(vec![t as f32; rows.len()], rows.len(), &sd.device)?;
            let context = Tensor::cat(&contexts, 0)?.to_dtype(sd.dtype)?;
            let rows = Tensor::cat(&rows, 0)?.to_dtype(sd.dtype)?;
            (sd.unet).forward(&rows, &ts, &context, ctx)?;
            let step = swap.take_captured();
            per_step = (step.values())
                .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
                .sum();
            if cache.used + per_step > cache.limit {
                break;
            }
            cache.used += per_step;
            kept[i] = Some(step);
        }
        let kept = Rc::new(kept);
        cache.steps.insert(key, kept.clone());
        Ok(kept)
    }

    /// SDXL's added conditioning of every reference row, in sample order, for latents
    /// like `x: [1, c, h, w]` (None on other bases).
    fn references_added(&self, x: &Tensor) -> Result<Option<AddedCond>> {
        let each = (self.ref_conds.iter())
            .map(|c| c.added(x))
            .collect::<Result<Option<Vec<_>>>>()?;
        Ok((each.map(|a| AddedCond::cat(&a.iter().collect::<Vec<_>>()))).transpose()?)
    }

    /// The reference path of sample `s` at latent size `(h, w)`: its clean latent's
    /// inversion with the personalized model on "a photo of <vN>", kept for the command.
    fn reference_path(
        &self,
        sd: &StableDiffusion,
        s: usize,
        (h, w): (usize, usize),
        steps: usize,
    ) -> Result<Rc<Vec<Tensor>>> {
        let key = (s, h, w, steps);
        if let Some(p) = self.stage.paths.borrow().get(&key) {
            return Ok(p.clone());
        }
        let f = sd.vae_factor();
        let z = (self.stage.references).latent(sd, s, (h * f, w * f))?;
        let path = invert_path(&self.ref_conds[s], z, steps, || {})?;
        let path = Rc::new(sampling_order(path));
        self.stage.paths.borrow_mut().insert(key, path.clone());
        Ok(path)
    }

    /// Per image, per word: its cross-attention map (queries of the recorded grid), the
    /// probabilities on its tokens averaged over them and over the recorded layers, from
    /// the conditional target rows (`first` to `first + n`); one read to the host.
    fn word_maps(
        &self,
        recorded: Vec<(String, Tensor)>,
        first: usize,
        n: usize,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if recorded.is_empty() {
            return Err(Error::usage(
                "--retouch reads the subjects' cross-attention in the decoder at a quarter of the \
                 latent's size, and this U-Net has none there.",
            ));
        }
        let rows = (recorded.iter())
            .map(|(_, probs)| Ok(probs.narrow(0, first, n)?.to_dtype(DType::F32)?))
            .collect::<Result<Vec<_>>>()?;
        let mean = (Tensor::stack(&rows, 0)?.mean(0))?; // [n, queries, tokens]
        let words = (self.words.iter())
            .map(|w| {
                let idx: Vec<u32> = w.positions.iter().map(|&p| p as u32).collect();
                let idx = Tensor::new(idx.as_slice(), mean.device())?;
                Ok(mean.index_select(&idx, 2)?.mean(2)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&words, 1)?.to_vec3::<f32>()?) // [n, words, queries]
    }

    /// Per image, per word: SAM's segment of the layout image, prompted by the word's
    /// attention mask (None without a SAM model).
    fn segments(
        &self,
        maps: &[Vec<Vec<f32>>],
        layout_pixels: &Tensor,
        (h, w): (usize, usize),
        grid: (usize, usize),
    ) -> Result<Vec<Vec<Option<Binary>>>> {
        let Some(sam) = &self.stage.sam else {
            return Ok(vec![vec![None; self.words.len()]; maps.len()]);
        };
        let (_, _, ph, pw) = layout_pixels.dims4()?;
        let mut out = Vec::new();
        for (j, per_word) in maps.iter().enumerate() {
            let pixels = ((layout_pixels.get(j)?.to_dtype(DType::F32)? / 127.5)? - 1.0)?;
            let mut row = Vec::new();
            for map in per_word {
                let soft = bilinear(map, grid, (ph, pw));
                let attention = crate::masks::binarize(&soft, pw, ph);
                if attention.area() == 0 {
                    row.push(None);
                    continue;
                }
                let (bbox, points) = crate::masks::sam::prompts(&attention, &soft);
                let (proposals, scores) = sam.proposals(&pixels, bbox, &points)?;
                let chosen = crate::masks::sam::choose(&proposals, &scores, &attention);
                row.push(chosen.map(|i| shrink_binary(&proposals[i], (h, w))));
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Per image, the adaptive blend mask at latent size: each word's (its attention map
    /// thresholded by Otsu and cleaned, OR its segment), the largest value over words.
    fn blend_masks(
        &self,
        maps: &[Vec<Vec<f32>>],
        segments: Option<&[Vec<Option<Binary>>]>,
        (h, w): (usize, usize),
        grid: (usize, usize),
    ) -> Vec<Vec<f32>> {
        (maps.iter().enumerate())
            .map(|(j, per_word)| {
                let mut mask = vec![0f32; h * w];
                for (i, map) in per_word.iter().enumerate() {
                    let attention = crate::masks::binarize(&bilinear(map, grid, (h, w)), w, h);
                    let segment = segments.and_then(|s| s[j][i].as_ref());
                    let soft = crate::masks::blend::adaptive(&attention, segment);
                    mask.iter_mut().zip(soft).for_each(|(m, v)| *m = m.max(v));
                }
                mask
            })
            .collect()
    }
}

/// What every step of one batch's retouch reads besides the targets: the source paths
/// (latents in sampling order), the references' kept keys and values, the contexts.
struct Paths<'a> {
    sd: &'a StableDiffusion,
    layout: Vec<Tensor>,
    /// The named words' reference paths, and their samples.
    refs: Vec<Rc<Vec<Tensor>>>,
    samples: Vec<usize>,
    kv: Option<Kept>,
    layout_context: Tensor,
    ref_contexts: Vec<Tensor>,
    target_context: Tensor,
    /// SDXL's added conditioning of the layout, reference and target rows (None on
    /// other bases).
    layout_added: Option<AddedCond>,
    ref_added: Vec<Option<AddedCond>>,
    target_added: Option<AddedCond>,
    layers: HashSet<String>,
    /// Images, and target rows (`2 n` under guidance).
    n: usize,
    targets: usize,
}

/// One step's U-Net call: the source rows it reads, then the targets (`x` once, or
/// unconditional and conditional), and the attention control.
struct Step<'p> {
    paths: &'p Paths<'p>,
    rows: Tensor,
    context: Tensor,
    added: Option<AddedCond>,
    swap: Swap,
    /// Leading source rows; the control is off when there are none and nothing is kept.
    sources: usize,
    targets: usize,
    active: bool,
}

impl Paths<'_> {
    /// Step `i` for targets at `x`, reading `source`, blending by `blend` (per query count):
    /// only the source rows the step reads ride along; none at all is the target path
    /// alone, call for call.
    fn step(
        &self,
        i: usize,
        x: &Tensor,
        source: Option<Source>,
        blend: Option<HashMap<usize, Tensor>>,
    ) -> Result<Step<'_>> {
        let (mut rows, mut contexts, mut added) = (Vec::new(), Vec::new(), Vec::new());
        let with_layout = blend.is_some() || source == Some(Source::Layout);
        if with_layout {
            rows.push(self.layout[i].clone());
            contexts.push(self.layout_context.clone());
            added.extend(self.layout_added.as_ref());
        }
        let first_ref = if with_layout { self.n } else { 0 };
        let kept = match source {
            Some(Source::References) => match &self.kv {
                Some(kv) => side_by_side(kv[i].as_ref(), &self.samples)?,
                None => None,
            },
            _ => None,
        };
        let ref_rows = source == Some(Source::References) && kept.is_none();
        if ref_rows {
            rows.extend(self.refs.iter().map(|r| r[i].clone()));
            contexts.extend(self.ref_contexts.iter().cloned());
            added.extend(self.ref_added.iter().flatten());
        }
        let sources = first_ref + if ref_rows { self.refs.len() } else { 0 };
        let layout_of: Vec<u32> = match with_layout {
            true => (0..self.targets).map(|j| (j % self.n) as u32).collect(),
            false => Vec::new(),
        };
        let active = sources > 0 || kept.is_some();
        let mut swap = Swap::new(
            sources,
            layout_of,
            (first_ref..sources).map(|r| r as u32).collect(),
        )
        .swapping(source, self.layers.clone())
        .with_cached(kept.unwrap_or_default());
        if let Some(b) = blend {
            swap = swap.blending(b);
        }
        rows.extend(std::iter::repeat_n(x.clone(), self.targets / self.n));
        contexts.push(self.target_context.clone());
        added.extend(self.target_added.as_ref());
        Ok(Step {
            paths: self,
            rows: Tensor::cat(&rows, 0)?.to_dtype(self.sd.dtype)?,
            context: Tensor::cat(&contexts, 0)?.to_dtype(self.sd.dtype)?,
            added: match self.target_added {
                Some(_) => Some(AddedCond::cat(&added)?),
                None => None,
            },
            swap,
            sources,
            targets: self.targets,
            active,
        })
    }
}

impl Step<'_> {
    /// The targets' guided noise prediction at timestep `t`, `probe` recording.
    fn eps(&self, main: &Conditioning, t: usize, probe: Option<&AttnProbe>) -> Result<Tensor> {
        let sd = self.paths.sd;
        let b = self.rows.dim(0)?;
        let ts = Tensor::from_vec(vec![t as f32; b], b, &sd.device)?;
        let ctx = Ctx {
            lora: main.weights.lora,
            tuned: main.weights.tuned,
            probe,
            swap: self.active.then_some(&self.swap),
            added: self.added.as_ref(),
            ..Ctx::default()
        };
        let eps = (sd.unet.forward(&self.rows, &ts, &self.context, ctx)?).to_dtype(DType::F32)?;
        let eps = eps.narrow(0, self.sources, self.targets)?;
        let n = self.paths.n;
        if main.uncond.is_none() {
            return Ok(eps);
        }
        let (u, c) = (eps.narrow(0, 0, n)?, eps.narrow(0, n, n)?);
        Ok((&u + ((c - &u)? * main.guidance)?)?)
    }
}

/// A step's kept keys and values of the references of `samples`, side by side per layer
/// (`[1, refs * n, dim]`: a view when they are all the references in order), or None when
/// the step has none kept.
fn side_by_side(step: Option<&KeysValues>, samples: &[usize]) -> Result<Option<KeysValues>> {
    let Some(step) = step else {
        return Ok(None);
    };
    let pick = |t: &Tensor| -> Result<Tensor> {
        let (refs, n, d) = t.dims3()?;
        let t = match samples.iter().copied().eq(0..refs) {
            true => t.clone(),
            false => {
                let idx: Vec<u32> = samples.iter().map(|&s| s as u32).collect();
                t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)?
            }
        };
        Ok(t.reshape((1, samples.len() * n, d))?)
    };
    let kept = (step.iter())
        .map(|(path, (k, v))| Ok((path.clone(), (pick(k)?, pick(v)?))))
        .collect::<Result<KeysValues>>()?;
    Ok(Some(kept))
}

/// Every sampling timestep's latent of an inversion path (ascending timesteps): the path
/// in the sampler's order.
fn sampling_order(mut path: Vec<Tensor>) -> Vec<Tensor> {
    path.reverse();
    path
}

/// The query grids `(h, w)` of the U-Net's levels for latents `(h, w)`, finest first.
fn grids(unet: &crate::model::unet::UNet, (h, w): (usize, usize)) -> Vec<(usize, usize)> {
    let levels = unet.config.block_out_channels.len();
    let mut out = vec![(h, w)];
    for _ in 1..levels {
        let (a, b) = out[out.len() - 1];
        out.push((a.div_ceil(2), b.div_ceil(2)));
    }
    out
}

/// Masks at latent size `(h, w)` -> per grid's query count, `[targets, queries, 1]`
/// (each image's mask for its unconditional and conditional rows).
fn per_grid(
    masks: &[Vec<f32>],
    (h, w): (usize, usize),
    grids: &[(usize, usize)],
    guided: bool,
    sd: &StableDiffusion,
) -> Result<HashMap<usize, Tensor>> {
    let mut out = HashMap::new();
    for &g in grids {
        let mut rows: Vec<f32> = Vec::new();
        let copies = if guided { 2 } else { 1 };
        for _ in 0..copies {
            for m in masks {
                rows.extend(area_average(m, (h, w), g));
            }
        }
        let t = Tensor::from_vec(rows, (copies * masks.len(), g.0 * g.1, 1), &sd.device)?;
        out.insert(g.0 * g.1, t);
    }
    Ok(out)
}

/// `src` (`from` rows x cols) averaged over the cells of a `to` grid.
fn area_average(src: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let mut sum = vec![0f32; to.0 * to.1];
    let mut count = vec![0f32; to.0 * to.1];
    for y in 0..from.0 {
        for x in 0..from.1 {
            let cell = (y * to.0 / from.0) * to.1 + x * to.1 / from.1;
            sum[cell] += src[y * from.1 + x];
            count[cell] += 1.0;
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, c)| s / c.max(1.0))
        .collect()
}

/// A pixel-size mask at latent size: a cell is inside when most of its pixels are.
fn shrink_binary(m: &Binary, (h, w): (usize, usize)) -> Binary {
    let soft: Vec<f32> = m.bits.iter().map(|&b| b as u8 as f32).collect();
    let avg = area_average(&soft, (m.height, m.width), (h, w));
    Binary {
        width: w,
        height: h,
        bits: avg.iter().map(|&v| v >= 0.5).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_average_and_bilinear_keep_constants_and_means() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(
            area_average(&src, (4, 4), (2, 2)),
            vec![2.5, 4.5, 10.5, 12.5]
        );
        assert_eq!(area_average(&src, (4, 4), (4, 4)), src);
        assert!(bilinear(&[0.25; 6], (2, 3), (5, 7))
            .iter()
            .all(|&v| v == 0.25));
        assert_eq!(
            bilinear(&[0.0, 1.0], (1, 2), (1, 4)),
            vec![0.0, 0.25, 0.75, 1.0]
        );
    }
}
