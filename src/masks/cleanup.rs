//! Clean-up of a thresholded map: close small gaps, keep the main region(s), fill holes.
//! An attention map thresholded at a quarter of the image's resolution leaves ragged
//! edges, specks on textured background and holes where the object is plain.

use std::collections::VecDeque;

/// A binary mask, row-major, `true` inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    pub width: usize,
    pub height: usize,
    pub bits: Vec<bool>,
}

/// Regions smaller than this share of the largest one are specks.
const MIN_SHARE: f64 = 0.2;
/// The closing's square radius, as a share of the shorter side (at least 1 pixel).
const CLOSE_SHARE: f64 = 0.02;

impl Binary {
    fn at(&self, x: usize, y: usize) -> bool {
        self.bits[y * self.width + x]
    }

    pub fn area(&self) -> usize {
        self.bits.iter().filter(|&&b| b).count()
    }

    /// Inside `self` and outside `other` (same size).
    pub fn minus(&self, other: &Binary) -> Binary {
        Binary {
            bits: self
                .bits
                .iter()
                .zip(&other.bits)
                .map(|(&a, &b)| a && !b)
                .collect(),
            ..self.clone()
        }
    }

    /// Inside either (same size).
    pub fn union(&self, other: &Binary) -> Binary {
        Binary {
            bits: self
                .bits
                .iter()
                .zip(&other.bits)
                .map(|(&a, &b)| a || b)
                .collect(),
            ..self.clone()
        }
    }

    /// Without its 4-connected regions of fewer than `min_area` pixels.
    pub fn without_regions_below(&self, min_area: usize) -> Binary {
        let mut bits = self.bits.clone();
        for region in self.regions(true).iter().filter(|g| g.len() < min_area) {
            region.iter().for_each(|&i| bits[i] = false);
        }
        Binary {
            bits,
            ..self.clone()
        }
    }

    /// Intersection over union with `other` (same size); 1 for two empty masks.
    pub fn iou(&self, other: &Binary) -> f64 {
        let both = self.bits.iter().zip(&other.bits);
        let (mut inter, mut union) = (0usize, 0usize);
        for (&a, &b) in both {
            inter += (a && b) as usize;
            union += (a || b) as usize;
        }
        if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        }
    }

    /// Every pixel within `r` (a square) of an inside pixel (`grow`), or only pixels
    /// whose whole square is inside (`!grow`).
    fn morph(&self, r: usize, grow: bool) -> Binary {
        let (w, h) = (self.width, self.height);
        let mut rows = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                let (a, b) = (x.saturating_sub(r), (x + r).min(w - 1));
                let mut span = (a..=b).map(|i| self.at(i, y));
                rows[y * w + x] = if grow {
                    span.any(|v| v)
                } else {
                    span.all(|v| v)
                };
            }
        }
        let mut out = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                let (a, b) = (y.saturating_sub(r), (y + r).min(h - 1));
                let mut span = (a..=b).map(|j| rows[j * w + x]);
                out[y * w + x] = if grow {
                    span.any(|v| v)
                } else {
                    span.all(|v| v)
                };
            }
        }
        Binary { bits: out, ..*self }
    }

    /// 4-connected regions of pixels equal to `value`, as lists of indices.
    fn regions(&self, value: bool) -> Vec<Vec<usize>> {
        let (w, h) = (self.width, self.height);
        let mut seen = vec![false; w * h];
        let mut out = Vec::new();
        for start in 0..w * h {
            if seen[start] || self.bits[start] != value {
                continue;
            }
            let mut region = Vec::new();
            let mut queue = VecDeque::from([start]);
            seen[start] = true;
            while let Some(i) = queue.pop_front() {
                region.push(i);
                let (x, y) = (i % w, i / w);
                let near = [
                    (x > 0).then(|| i - 1),
                    (x + 1 < w).then(|| i + 1),
                    (y > 0).then(|| i - w),
                    (y + 1 < h).then(|| i + w),
                ];
                for j in near.into_iter().flatten() {
                    if !seen[j] && self.bits[j] == value {
                        seen[j] = true;
                        queue.push_back(j);
                    }
                }
            }
            out.push(region);
        }
        out
    }
}

/// Closes gaps narrower than about 2% of the image, keeps the regions at least a fifth
/// the size of the largest, and fills holes (background not connected to the border).
pub fn clean(mask: &Binary) -> Binary {
    if mask.width == 0 || mask.height == 0 || mask.area() == 0 {
        return mask.clone();
    }
    let r = ((mask.width.min(mask.height) as f64 * CLOSE_SHARE).round() as usize).max(1);
    // A closing near the border must not eat into a region that touches it: pad first.
    let closed = crop(&pad(mask, r).morph(r, true).morph(r, false), r);
    let regions = closed.regions(true);
    let largest = regions.iter().map(Vec::len).max().unwrap_or(0);
    let mut kept = vec![false; mask.width * mask.height];
    for region in regions
        .iter()
        .filter(|g| g.len() as f64 >= MIN_SHARE * largest as f64)
    {
        for &i in region {
            kept[i] = true;
        }
    }
    let kept = Binary {
        bits: kept,
        ..*mask
    };
    fill_holes(&kept)
}

/// Background regions that do not touch the border are holes.
fn fill_holes(mask: &Binary) -> Binary {
    let (w, h) = (mask.width, mask.height);
    let mut out = mask.clone();
    for region in mask.regions(false) {
        let touches = region
            .iter()
            .any(|&i| i % w == 0 || i % w == w - 1 || i / w == 0 || i / w == h - 1);
        if !touches {
            for i in region {
                out.bits[i] = true;
            }
        }
    }
    out
}

fn pad(m: &Binary, r: usize) -> Binary {
    let (w, h) = (m.width + 2 * r, m.height + 2 * r);
    let mut bits = vec![false; w * h];
    for y in 0..m.height {
        for x in 0..m.width {
            bits[(y + r) * w + x + r] = m.at(x, y);
        }
    }
    Binary {
        width: w,
        height: h,
        bits,
    }
}

fn crop(m: &Binary, r: usize) -> Binary {
    let (w, h) = (m.width - 2 * r, m.height - 2 * r);
    let bits = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| m.at(x + r, y + r))
        .collect();
    Binary {
        width: w,
        height: h,
        bits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_fn(w: usize, h: usize, f: impl Fn(usize, usize) -> bool) -> Binary {
        let bits = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| f(x, y))
            .collect();
        Binary {
            width: w,
            height: h,
            bits,
        }
    }

    fn disc(x: usize, y: usize, cx: f64, cy: f64, r: f64) -> bool {
        (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2) <= r * r
    }

    #[test]
    fn specks_go_holes_fill_and_the_object_stays() {
        let want = from_fn(100, 100, |x, y| disc(x, y, 50.0, 50.0, 30.0));
        let noisy = from_fn(100, 100, |x, y| {
            let hole = disc(x, y, 50.0, 50.0, 8.0);
            let speck = disc(x, y, 90.0, 10.0, 2.0);
            (disc(x, y, 50.0, 50.0, 30.0) && !hole) || speck
        });
        let got = clean(&noisy);
        let wrong = got
            .bits
            .iter()
            .zip(&want.bits)
            .filter(|(a, b)| a != b)
            .count();
        assert!(wrong <= 8, "{wrong} pixels differ from the clean disc");
        assert!(!got.at(90, 10), "the speck is gone");
        assert!(got.at(50, 50), "the hole is filled");
    }

    #[test]
    fn a_thin_gap_closes_but_two_real_objects_stay_apart() {
        // Two halves split by a 1-pixel line: one object again.
        let split = from_fn(100, 60, |x, y| {
            (20..80).contains(&x) && (10..50).contains(&y) && x != 50
        });
        assert_eq!(clean(&split).regions(true).len(), 1);
        // Two objects 20 pixels apart, both large: both kept, still two.
        let two = from_fn(100, 60, |x, y| {
            disc(x, y, 25.0, 30.0, 12.0) || disc(x, y, 75.0, 30.0, 10.0)
        });
        let got = clean(&two);
        assert_eq!(got.regions(true).len(), 2);
        assert!(got.at(25, 30) && got.at(75, 30));
    }

    #[test]
    fn objects_touching_the_border_keep_their_edge() {
        let edge = from_fn(40, 40, |x, _| x < 15);
        assert_eq!(clean(&edge), edge);
        let empty = from_fn(10, 10, |_, _| false);
        assert_eq!(clean(&empty), empty);
    }

    #[test]
    fn binarize_recovers_a_soft_blob() {
        // An object of radius 12 with a soft edge (a sigmoid over ~1 pixel), on a weak
        // noisy floor, as an upsampled attention map looks.
        let map: Vec<f32> = (0..64 * 64)
            .map(|i| {
                let (x, y) = ((i % 64) as f32, (i / 64) as f32);
                let d = ((x - 30.0).powi(2) + (y - 34.0).powi(2)).sqrt();
                let object = 1.0 / (1.0 + ((d - 12.0) / 0.5).exp());
                0.8 * object + 0.1 * ((i * 7919 % 13) as f32 / 13.0)
            })
            .collect();
        let got = super::super::binarize(&map, 64, 64);
        let want = from_fn(64, 64, |x, y| disc(x, y, 30.0, 34.0, 12.0));
        let iou = got.iou(&want);
        assert!(iou >= 0.9, "IoU {iou}");
    }
}
