//! Scoring drawn images: CLIP-T against the class-word prompt, CLIP-I and DINO of each
//! sample's segment against the reference images' segments.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};

use super::metrics::{cosine, ImageScore};
use super::segment::{self, Generated, Segmenter};
use super::{clip, dino, preprocess, EvalOptions, Prompt};
use crate::data::PairDataset;
use crate::error::{Error, Result};
use crate::infer::many::image_file;
use crate::model::tokenizer::pseudo_words_in;

pub(super) struct Models<'a> {
    pub clip: &'a clip::Clip,
    pub dino: &'a dino::Dino,
    pub batch: usize,
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
pub(super) struct Reference {
    pub class: String,
    pub clip: Vec<Vec<f32>>,
    dino: Vec<Vec<f32>>,
}

/// Each reference image cut out by its mask (the published concept masks already leave
/// out the component), or whole when the pair folder has no masks/.
pub(super) fn reference_features(
    m: &Models,
    refs: &PairDataset,
    masks: bool,
) -> Result<Vec<Reference>> {
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

pub(super) fn score_all(
    m: &Models,
    opts: &EvalOptions,
    prompts: &[Prompt],
    refs: &[Reference],
    out: &Path,
    segmenter: &dyn Segmenter,
) -> Result<Vec<ImageScore>> {
    let total = (prompts.len() * opts.seeds.len()) as u64;
    let bar = crate::io::progress::ticker("scoring", total, 0, 1, opts.progress);
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
