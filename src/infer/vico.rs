//! `infer --reference`: ViCo's visual condition at sampling time. Each sample's reference
//! image goes through the VAE (a posterior sample, from a fixed seed) once per command and
//! sampling size; at every step its clean latent runs through the U-Net before the images
//! (the reference pass), at the step's timestep, once per text context (the prompt's, and
//! the negative prompt's under guidance) for the whole batch, not per image.
//!
//! A prompt's references are those of the pseudo-words it names, in order, each masked by
//! its word's attention; a prompt that names none sees every reference, masked by its
//! end-of-text token. The negative prompt sees the same references, masked by its own
//! end-of-text token (the authors' code reads the prompt's word position there, which for
//! SD 1.x's end-of-text padding is the same token).

use std::path::PathBuf;

use candle_core::Tensor;

use super::references::References;
use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;
use crate::model::nn::AddedCond;
use crate::model::tokenizer::pseudo_words_in;
use crate::model::vico::{Blocks, Routing};

/// What the references' U-Net call at one step reads: their clean latents, text context,
/// SDXL's added conditioning, and which references each drawn row sees.
pub struct ReferencePass {
    pub latents: Tensor,
    pub context: Tensor,
    pub added: Option<AddedCond>,
    pub routing: Routing,
}

/// The blocks and each sample's reference image, in sample order (`<v0>`'s first).
pub struct Visual {
    pub blocks: Blocks,
    /// Encoded once for every batch and prompt of a command.
    pub references: References,
}

impl Visual {
    /// Sampling with `blocks` (read frozen: no graph through them) and `references`.
    pub fn new(blocks: &Blocks, references: Vec<PathBuf>) -> Self {
        Self {
            blocks: blocks.frozen(),
            references: References::new(references),
        }
    }
}

/// One prompt's references: per row of the prompt's branch, the sample and the position
/// whose attention masks it; and the rows' text context `[cond refs + uncond refs, ...]`
/// (and SDXL's pooled projections, in the same order).
pub struct VisualRows {
    cond: Vec<(usize, usize)>,
    uncond: Vec<(usize, usize)>,
    context: Tensor,
    pooled: Option<Tensor>,
}

/// A prompt's text features `[1, tokens, hidden]` and (SDXL) pooled projection `[1, pooled]`.
pub type Features<'a> = (&'a Tensor, Option<&'a Tensor>);

impl Visual {
    /// The references `prompt` (and, under guidance, `negative`) sees, with their text
    /// context, from each prompt's features.
    pub fn rows(
        &self,
        sd: &StableDiffusion,
        (prompt, cond): (&str, Features),
        negative: Option<(&str, Features)>,
    ) -> Result<VisualRows> {
        let tok = &sd.tokenizer;
        let ids = tok.encode(prompt)?;
        let words = pseudo_words_in(prompt);
        let mut cond_rows = Vec::new();
        for word in &words {
            let sample = sample_of(word)?;
            if sample >= self.references.len() {
                return Err(Error::usage(format!(
                    "the prompt names {word}, but there are {} reference image(s): give one \
                     --reference per pseudo-word, in order.",
                    self.references.len()
                )));
            }
            let id = tok.encode(word)?[1];
            let pos = ids.iter().position(|&i| i == id).ok_or_else(|| {
                Error::internal(format!("{word} is not among the prompt's tokens"))
            })?;
            if !cond_rows.iter().any(|&(s, _)| s == sample) {
                cond_rows.push((sample, pos));
            }
        }
        if cond_rows.is_empty() {
            let pos = (tok.end_of_text(&ids))
                .ok_or_else(|| Error::internal("a prompt without end-of-text"))?;
            cond_rows = (0..self.references.len()).map(|s| (s, pos)).collect();
        }
        let k = cond_rows.len();
        let (mut context, mut pooled) = (vec![cond.0.repeat((k, 1, 1))?], vec![cond.1]);
        let uncond_rows = match negative {
            Some((text, features)) => {
                let pos = (tok.end_of_text(&tok.encode(text)?))
                    .ok_or_else(|| Error::internal("a negative prompt without end-of-text"))?;
                context.push(features.0.repeat((k, 1, 1))?);
                pooled.push(features.1);
                cond_rows.iter().map(|&(s, _)| (s, pos)).collect()
            }
            None => Vec::new(),
        };
        let pooled = match pooled.into_iter().collect::<Option<Vec<_>>>() {
            Some(p) => Some(Tensor::cat(
                &(p.iter().map(|t| t.repeat((k, 1)))).collect::<candle_core::Result<Vec<_>>>()?,
                0,
            )?),
            None => None,
        };
        Ok(VisualRows {
            cond: cond_rows,
            uncond: uncond_rows,
            context: Tensor::cat(&context, 0)?,
            pooled,
        })
    }

    /// The reference rows' latents `[refs, c, h, w]` at the sampling size of `x: [n, c, h,
    /// w]`, in `rows`' order, their text context (and SDXL's added conditioning), and the
    /// routing of `n` images (`[uncond x n, cond x n]` rows under guidance, else `[cond x n]`).
    pub fn step_rows(
        &self,
        sd: &StableDiffusion,
        rows: &VisualRows,
        x: &Tensor,
    ) -> Result<ReferencePass> {
        let (n, _, h, w) = x.dims4()?;
        let f = sd.vae_factor();
        let mut latents = Vec::new();
        for (s, _) in rows.cond.iter().chain(&rows.uncond) {
            latents.push(self.references.latent(sd, *s, (h * f, w * f))?);
        }
        let (rc, ru) = (rows.cond.len(), rows.uncond.len());
        let guided = ru > 0;
        let cond_refs: Vec<usize> = (0..rc).collect();
        let uncond_refs: Vec<usize> = (rc..rc + ru).collect();
        let mut refs_of = Vec::new();
        if guided {
            refs_of.extend(std::iter::repeat_n(uncond_refs, n));
        }
        refs_of.extend(std::iter::repeat_n(cond_refs, n));
        let routing = Routing {
            refs_of,
            mask_token: rows
                .cond
                .iter()
                .chain(&rows.uncond)
                .map(|&(_, p)| p)
                .collect(),
            reg_eot: None,
        };
        let latents = Tensor::cat(&latents, 0)?.to_dtype(sd.dtype)?;
        let added = (rows.pooled.clone())
            .map(|p| AddedCond::uncropped(p, (h * f, w * f)))
            .transpose()?;
        Ok(ReferencePass {
            latents,
            context: rows.context.clone(),
            added,
            routing,
        })
    }
}

/// `<vN>` -> N.
pub(super) fn sample_of(word: &str) -> Result<usize> {
    (word.strip_prefix("<v").and_then(|w| w.strip_suffix('>')))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::internal(format!("{word} is not a pseudo-word")))
}
