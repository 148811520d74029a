//! Layout-and-Retouch's adaptive blend mask (seed 002, §3.2.2): where the retouched
//! image keeps its own self-attention output and where it takes the layout image's.
//!
//! The subject's cross-attention mask OR a segmenter's mask of the layout image, specks
//! removed, then a Euclidean distance transform scaled to [0.5, 1] inside (soft near the
//! edge, whole in the middle), and the attention mask's own pixels set to 1. Outside is 0:
//! the layout's output there.

use super::cleanup::Binary;

/// Regions smaller than this share of the image are specks (the paper's threshold is not
/// given; this is ours).
pub const MIN_REGION_SHARE: f64 = 0.01;

/// The soft blend mask, row-major in [0, 1], of the attention mask `attention` and
/// optionally a segmenter's `segment` (same size).
pub fn adaptive(attention: &Binary, segment: Option<&Binary>) -> Vec<f32> {
    let either = match segment {
        Some(s) => attention.union(s),
        None => attention.clone(),
    };
    let min_area = (MIN_REGION_SHARE * (either.width * either.height) as f64).ceil() as usize;
    let kept = either.without_regions_below(min_area);
    let mut soft = scaled_inside(&kept, &distance_transform(&kept));
    for (i, v) in soft.iter_mut().enumerate() {
        if kept.bits[i] && attention.bits[i] {
            *v = 1.0;
        }
    }
    soft
}

/// Inside pixels' distances scaled to [0.5, 1] (nearest the edge 0.5, farthest 1); 0
/// outside. A mask whose pixels are all equally far (or with no outside at all) is 1.
fn scaled_inside(mask: &Binary, dist: &[f32]) -> Vec<f32> {
    let inside = || (0..dist.len()).filter(|&i| mask.bits[i]).map(|i| dist[i]);
    let lo = inside().fold(f32::INFINITY, f32::min);
    let hi = inside().fold(f32::NEG_INFINITY, f32::max);
    (0..dist.len())
        .map(|i| match mask.bits[i] {
            false => 0.0,
            true if hi > lo && hi.is_finite() => 0.5 + 0.5 * (dist[i] - lo) / (hi - lo),
            true => 1.0,
        })
        .collect()
}

/// Each pixel's Euclidean distance to the nearest outside pixel (0 outside; infinity
/// when the mask has no outside pixel). Beyond the border counts as neither, as in
/// OpenCV's `distanceTransform`. Exact: Felzenszwalb and Huttenlocher's lower envelope
/// of parabolas, down the columns, then along the rows.
pub fn distance_transform(mask: &Binary) -> Vec<f32> {
    let (w, h) = (mask.width, mask.height);
    let far = f64::INFINITY;
    let mut sq: Vec<f64> = (mask.bits.iter())
        .map(|&b| if b { far } else { 0.0 })
        .collect();
    let mut line = Vec::new();
    for x in 0..w {
        line.clear();
        line.extend((0..h).map(|y| sq[y * w + x]));
        for (y, v) in squared_1d(&line).into_iter().enumerate() {
            sq[y * w + x] = v;
        }
    }
    for y in 0..h {
        let row = squared_1d(&sq[y * w..(y + 1) * w]);
        sq[y * w..(y + 1) * w].copy_from_slice(&row);
    }
    sq.into_iter().map(|v| v.sqrt() as f32).collect()
}

/// The 1-D squared distance transform of `f` (0 at sources, infinity elsewhere, or the
/// previous pass's squared distances): `min_q (p - q)^2 + f(q)`.
fn squared_1d(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let sources: Vec<usize> = (0..n).filter(|&q| f[q].is_finite()).collect();
    if sources.is_empty() {
        return vec![f64::INFINITY; n];
    }
    // The parabolas of the lower envelope (by their vertex) and where each takes over.
    let mut v: Vec<usize> = Vec::with_capacity(sources.len());
    let mut z: Vec<f64> = Vec::with_capacity(sources.len() + 1);
    let meet = |q: usize, p: usize| {
        let (q2, p2) = ((q * q) as f64, (p * p) as f64);
        ((f[q] + q2) - (f[p] + p2)) / (2.0 * (q as f64 - p as f64))
    };
    for &q in &sources {
        while let Some(&p) = v.last() {
            if meet(q, p) <= z[z.len() - 1] {
                v.pop();
                z.pop();
            } else {
                break;
            }
        }
        z.push(match v.last() {
            Some(&p) => meet(q, p),
            None => f64::NEG_INFINITY,
        });
        v.push(q);
    }
    z.push(f64::INFINITY);
    let mut k = 0;
    (0..n)
        .map(|p| {
            while z[k + 1] < p as f64 {
                k += 1;
            }
            let d = p as f64 - v[k] as f64;
            d * d + f[v[k]]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(rows: &[&str]) -> Binary {
        Binary {
            width: rows[0].len(),
            height: rows.len(),
            bits: rows
                .iter()
                .flat_map(|r| r.chars().map(|c| c == '#'))
                .collect(),
        }
    }

    /// The distance to the nearest outside pixel, by brute force.
    fn brute(mask: &Binary) -> Vec<f32> {
        let (w, h) = (mask.width, mask.height);
        (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f64, (i / w) as f64);
                (0..w * h)
                    .filter(|&j| !mask.bits[j])
                    .map(|j| ((j % w) as f64 - x).hypot((j / w) as f64 - y))
                    .fold(f64::INFINITY, f64::min) as f32
            })
            .collect()
    }

    #[test]
    fn distance_transform_is_exact_euclidean() {
        let m = binary(&[
            ".........",
            ".#######.",
            ".#######.",
            ".###.###.",
            ".#######.",
            "..######.",
            ".........",
        ]);
        assert_eq!(distance_transform(&m), brute(&m));
        // A pseudo-random blob, with the border counting as neither inside nor outside.
        let mut state = 7u64;
        let bits = (0..23 * 17)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 60) > 3
            })
            .collect();
        let m = Binary {
            width: 23,
            height: 17,
            bits,
        };
        assert_eq!(distance_transform(&m), brute(&m));
        let all = binary(&["##", "##"]);
        assert!(distance_transform(&all).iter().all(|d| d.is_infinite()));
    }

    #[test]
    fn blend_mask_has_known_values() {
        // A 5x5 square in a 9x9 image: distances 1 (ring), 2, 3 (centre) -> 0.5, 0.75, 1.
        let square = binary(&[
            ".........",
            ".........",
            "..#####..",
            "..#####..",
            "..#####..",
            "..#####..",
            "..#####..",
            ".........",
            ".........",
        ]);
        let none = binary(&["........."; 9]);
        let m = adaptive(&none, Some(&square));
        assert_eq!(m[4 * 9 + 4], 1.0);
        assert_eq!(m[4 * 9 + 3], 0.75);
        assert_eq!(m[2 * 9 + 2], 0.5);
        assert_eq!(m[0], 0.0);
        // The attention mask's own pixels are whole; OR adds them to the segment.
        let mut att = none.clone();
        att.bits[2 * 9 + 2] = true;
        let m = adaptive(&att, Some(&square));
        assert_eq!(m[2 * 9 + 2], 1.0);
        assert_eq!(m[2 * 9 + 3], 0.5);
        // A lone attention pixel (1 of 81 pixels, 1.2% >= 1%) survives; OR keeps it.
        let mut speck = none.clone();
        speck.bits[8] = true;
        let m = adaptive(&speck, Some(&square));
        assert_eq!(m[8], 1.0);
    }

    #[test]
    fn specks_below_the_share_are_dropped() {
        // 200x1: a 1-pixel speck is 0.5% of the image, a 10-pixel run 5%.
        let mut bits = vec![false; 200];
        bits[3] = true;
        bits[100..110].iter_mut().for_each(|b| *b = true);
        let m = adaptive(
            &Binary {
                width: 200,
                height: 1,
                bits,
            },
            None,
        );
        assert_eq!(m[3], 0.0);
        assert!(m[100..110].iter().all(|&v| v == 1.0));
        assert_eq!(m.iter().filter(|&&v| v > 0.0).count(), 10);
    }
}
