//! Scores per image and their means and standard deviations per prompt, per group and
//! overall. Aggregates do not depend on the order images were scored in: values are
//! sorted by (prompt, seed) and summed in f64.

use std::collections::BTreeMap;

use serde::Serialize;

/// Cosine similarity; 0 for a zero vector.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        (dot / (na * nb)) as f32
    }
}

/// The scores of one generated image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageScore {
    pub file: String,
    pub prompt_index: usize,
    pub seed: u64,
    /// Image vs the prompt with class words.
    pub clip_t: f32,
    /// Per class word present in the prompt: mean similarity to that sample's references.
    pub clip_i: BTreeMap<String, f32>,
    pub dino: BTreeMap<String, f32>,
}

impl ImageScore {
    /// The image's CLIP-I: the mean over the samples its prompt names.
    pub fn clip_i_mean(&self) -> Option<f32> {
        mean_of(self.clip_i.values())
    }
    pub fn dino_mean(&self) -> Option<f32> {
        mean_of(self.dino.values())
    }
}

fn mean_of<'a>(v: impl Iterator<Item = &'a f32>) -> Option<f32> {
    let v: Vec<f64> = v.map(|x| *x as f64).collect();
    (!v.is_empty()).then(|| (v.iter().sum::<f64>() / v.len() as f64) as f32)
}

/// Mean and standard deviation (ddof 0, numpy's default) of `n` values.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(values: &[f32]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|v| (*v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        Some(Stats {
            mean,
            std: var.sqrt(),
            n: values.len(),
        })
    }
}

/// The aggregate of a set of images.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub images: usize,
    pub clip_t: Option<Stats>,
    /// Per image, the mean over the samples its prompt names.
    pub clip_i: Option<Stats>,
    pub dino: Option<Stats>,
    /// Per class word.
    pub clip_i_per_sample: BTreeMap<String, Stats>,
    pub dino_per_sample: BTreeMap<String, Stats>,
}

impl Summary {
    /// Over `scores` (any order).
    pub fn of<'a>(scores: impl IntoIterator<Item = &'a ImageScore>) -> Summary {
        let mut s: Vec<&ImageScore> = scores.into_iter().collect();
        s.sort_by_key(|x| (x.prompt_index, x.seed));
        let col = |f: &dyn Fn(&ImageScore) -> Option<f32>| -> Option<Stats> {
            Stats::of(&s.iter().filter_map(|x| f(x)).collect::<Vec<_>>())
        };
        let per_sample = |pick: &dyn Fn(&ImageScore) -> &BTreeMap<String, f32>| {
            let mut by: BTreeMap<String, Vec<f32>> = BTreeMap::new();
            for x in &s {
                for (k, v) in pick(x) {
                    by.entry(k.clone()).or_default().push(*v);
                }
            }
            (by.into_iter())
                .filter_map(|(k, v)| Some((k, Stats::of(&v)?)))
                .collect()
        };
        Summary {
            images: s.len(),
            clip_t: col(&|x| Some(x.clip_t)),
            clip_i: col(&|x| x.clip_i_mean()),
            dino: col(&|x| x.dino_mean()),
            clip_i_per_sample: per_sample(&|x| &x.clip_i),
            dino_per_sample: per_sample(&|x| &x.dino),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(p: usize, seed: u64, t: f32, i: f32) -> ImageScore {
        ImageScore {
            file: format!("prompt{p:02}/seed{seed:02}.png"),
            prompt_index: p,
            seed,
            clip_t: t,
            clip_i: [("hair".to_string(), i), ("person".to_string(), i / 2.0)].into(),
            dino: [("person".to_string(), i)].into(),
        }
    }

    #[test]
    fn cosine_of_a_vector_with_itself_and_its_opposite() {
        let a = [0.3, -1.2, 4.0];
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-7);
        assert!((cosine(&a, &a.map(|x| -2.0 * x)) + 1.0).abs() < 1e-7);
        assert_eq!(cosine(&a, &[0.0; 3]), 0.0);
    }

    #[test]
    fn stats_are_numpy_mean_and_population_std() {
        let s = Stats::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.mean, 2.5);
        assert!((s.std - 1.118033988749895).abs() < 1e-12);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn summaries_do_not_depend_on_image_order() {
        let scores: Vec<ImageScore> = (0..7)
            .map(|k| {
                score(
                    k % 3,
                    k as u64,
                    0.1 + k as f32 * 0.013,
                    0.7 - k as f32 * 0.031,
                )
            })
            .collect();
        let mut reversed = scores.clone();
        reversed.reverse();
        reversed.swap(1, 4);
        assert_eq!(Summary::of(&scores), Summary::of(&reversed));
        let s = Summary::of(&scores);
        assert_eq!(s.images, 7);
        assert_eq!(s.clip_i_per_sample["hair"].n, 7);
        // Per image CLIP-I is the mean over its samples: (i + i/2) / 2.
        let first = Stats::of(&[0.7 * 0.75]).unwrap().mean;
        assert!((scores[0].clip_i_mean().unwrap() as f64 - first).abs() < 1e-6);
    }
}
