//! Masks for every reference image of a pair folder, from the base model's attention.
//!
//! The concept's map is read on "a photo of a {concept}"; each component's on "a photo of
//! a {concept} with {component}", because a component (hair) mostly appears on the
//! concept. As in the published dataset, a concept mask leaves out its components.

use std::path::PathBuf;

use candle_core::Tensor;

use super::attention::{
    encode_prompt, noise_image, word_maps, AttentionOptions, EncodedPrompt, NoisedImage, SoftMap,
    WordAt,
};
use super::{binarize, Binary};
use crate::data::PairDataset;
use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;

/// One reference image's mask over the `resolution` square that `train` crops.
#[derive(Debug, Clone)]
pub struct ImageMask {
    pub image: PathBuf,
    pub sample: usize,
    pub class_word: String,
    /// The final mask: `word` less `exclude`.
    pub crop: Binary,
    /// The class word's own thresholded map, and the soft map (`--refine sam` reads both).
    pub word: Binary,
    pub map: Vec<f32>,
    /// For a concept image, its components' region, left out of the mask.
    pub exclude: Option<Binary>,
}

/// The two prompts, encoded once: "a photo of a {concept}" (reads the concept) and
/// "a photo of a {concept} with {component} [and ...]" (reads each component).
struct Prompts {
    concept: EncodedPrompt,
    /// `None` with no components.
    all: Option<EncodedPrompt>,
}

/// The prompts' texts and where each class word sits in them.
struct PromptTexts {
    concept: (String, WordAt),
    all: (String, Vec<WordAt>),
}

fn prompts(words: &[String]) -> PromptTexts {
    let head = "a photo of a".to_string();
    let at = |before: &str, word: &str| WordAt {
        before: before.to_string(),
        word: word.to_string(),
    };
    let concept = format!("{head} {}", words[0]);
    let mut all = concept.clone();
    let mut parts = Vec::new();
    for (k, w) in words.iter().enumerate().skip(1) {
        all.push_str(if k == 1 { " with" } else { " and" });
        parts.push(at(&all, w));
        all = format!("{all} {w}");
    }
    PromptTexts {
        concept: (concept, at(&head, &words[0])),
        all: (all, parts),
    }
}

impl Prompts {
    /// `words`: the concept's class word first, then the components'.
    fn new(sd: &StableDiffusion, words: &[String]) -> Result<Self> {
        let PromptTexts {
            concept: (concept, at),
            all: (all, parts),
        } = prompts(words);
        Ok(Self {
            concept: encode_prompt(sd, &concept, std::slice::from_ref(&at))?,
            all: if parts.is_empty() {
                None
            } else {
                Some(encode_prompt(sd, &all, &parts)?)
            },
        })
    }

    /// The concept's map and the components' maps on one image (noised once).
    fn maps(&self, sd: &StableDiffusion, image: &NoisedImage) -> Result<(SoftMap, Vec<SoftMap>)> {
        let concept = word_maps(sd, image, &self.concept)?
            .pop()
            .ok_or_else(|| Error::internal("no concept map"))?;
        Ok((concept, self.part_maps(sd, image)?))
    }

    fn part_maps(&self, sd: &StableDiffusion, image: &NoisedImage) -> Result<Vec<SoftMap>> {
        match &self.all {
            Some(all) => word_maps(sd, image, all),
            None => Ok(Vec::new()),
        }
    }
}

/// The attention masks of all images of `data` (loaded at `opts.resolution`), calling
/// `done` after each.
pub fn attention_masks(
    sd: &StableDiffusion,
    data: &PairDataset,
    opts: &AttentionOptions,
    mut done: impl FnMut(&ImageMask),
) -> Result<Vec<ImageMask>> {
    let words: Vec<String> = data.samples.iter().map(|s| s.class_word.clone()).collect();
    let p = Prompts::new(sd, &words)?;
    let mut out = Vec::with_capacity(data.num_images());
    for (sample, im) in data.images() {
        let image = noise_image(sd, &im.pixels, opts)?;
        // A component image needs only the components' prompt.
        let (map, exclude) = if sample == 0 {
            let (concept, parts) = p.maps(sd, &image)?;
            (Some(concept), union_of(&parts))
        } else {
            (p.part_maps(sd, &image)?.into_iter().nth(sample - 1), None)
        };
        let map = map.ok_or_else(|| Error::internal("a sample without its attention map"))?;
        let word = binarize(&map.values, map.side, map.side);
        let m = ImageMask {
            image: im.path.clone(),
            sample,
            class_word: words[sample].clone(),
            crop: match &exclude {
                Some(parts) => word.minus(parts),
                None => word.clone(),
            },
            word,
            map: map.values,
            exclude,
        };
        check_not_empty(&m)?;
        done(&m);
        out.push(m);
    }
    Ok(out)
}

fn union_of(maps: &[SoftMap]) -> Option<Binary> {
    maps.iter()
        .map(|m| binarize(&m.values, m.side, m.side))
        .reduce(|a, b| a.union(&b))
}

/// Each class word's own region on one image that shows them all (a generated image, for
/// evaluation), read as references are: the first word on "a photo of a {word}", the
/// others on the prompt naming all. Nothing is subtracted. `pixels` is `[3, R, R]` in
/// [-1, 1].
pub fn word_regions(
    sd: &StableDiffusion,
    pixels: &Tensor,
    class_words: &[String],
    opts: &AttentionOptions,
) -> Result<Vec<Binary>> {
    if class_words.is_empty() {
        return Ok(Vec::new()); // a prompt naming no learned word has nothing to segment
    }
    let p = Prompts::new(sd, class_words)?;
    let (concept, parts) = p.maps(sd, &noise_image(sd, pixels, opts)?)?;
    Ok(std::iter::once(&concept)
        .chain(&parts)
        .map(|m| binarize(&m.values, m.side, m.side))
        .collect())
}

fn check_not_empty(m: &ImageMask) -> Result<()> {
    if m.crop.area() > 0 {
        return Ok(());
    }
    Err(Error::usage(format!(
        "the attention map of {:?} on {} selects nothing{}: the base model does not see a {} there. \
         Check the image and the folder name, or draw this mask yourself (masks/{}.png, white = \
         the region to learn).",
        m.class_word,
        m.image.display(),
        if m.sample == 0 { " once its components are removed" } else { "" },
        m.class_word,
        m.image.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_name_the_concept_then_its_components() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = prompts(&w(&["person", "hair"]));
        assert_eq!(p.concept.0, "a photo of a person");
        assert_eq!(p.concept.1.before, "a photo of a");
        assert_eq!(p.all.0, "a photo of a person with hair");
        assert_eq!(p.all.1[0].before, "a photo of a person with");
        let p = prompts(&w(&["dog", "ear", "teddy bear"]));
        assert_eq!(p.all.0, "a photo of a dog with ear and teddy bear");
        assert_eq!(p.all.1[1].before, "a photo of a dog with ear and");
        assert_eq!(p.all.1[1].word, "teddy bear");
    }
}
