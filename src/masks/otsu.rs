//! Otsu's threshold: the cut of a 256-bin histogram that maximizes the variance between
//! the two classes (equivalently, minimizes the variance within them).

const BINS: usize = 256;

/// The threshold `t` that best splits `values` into `<= t` and `> t`, in the values' own
/// range. Non-finite values are ignored; a constant map gives its value (nothing above).
pub fn otsu_threshold(values: &[f32]) -> f32 {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo >= hi {
        return hi.max(lo.min(0.0));
    }
    let bin = |v: f32| (((v - lo) / (hi - lo)) * (BINS - 1) as f32).round() as usize;
    let mut hist = [0u64; BINS];
    for v in values.iter().copied().filter(|v| v.is_finite()) {
        hist[bin(v)] += 1;
    }
    let total: u64 = hist.iter().sum();
    let sum_all: f64 = (hist.iter().enumerate())
        .map(|(i, &n)| i as f64 * n as f64)
        .sum();
    let (mut below, mut sum_below) = (0u64, 0f64);
    let mut var = [f64::NEG_INFINITY; BINS];
    for (i, &n) in hist.iter().enumerate().take(BINS - 1) {
        below += n;
        sum_below += i as f64 * n as f64;
        let above = total - below;
        if below == 0 || above == 0 {
            continue;
        }
        let (w0, w1) = (below as f64 / total as f64, above as f64 / total as f64);
        let m0 = sum_below / below as f64;
        let m1 = (sum_all - sum_below) / above as f64;
        var[i] = w0 * w1 * (m0 - m1) * (m0 - m1);
    }
    // Every cut inside an empty gap between the classes scores the same: take the
    // middle of that plateau, not its first bin, so the cut sits between the modes.
    let best = var.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let top = |v: &f64| *v >= best * (1.0 - 1e-12);
    let first = var.iter().position(top).unwrap_or(0);
    let run = var[first..].iter().take_while(|v| top(v)).count();
    let cut = first as f32 + run as f32 / 2.0;
    // The cut's position in bins, back in the values' range.
    lo + cut / (BINS - 1) as f32 * (hi - lo)
}

/// ViCo's mask of one attention map: min-max normalised, then cut at the level `t / levels`
/// (t in 0..levels) with the largest between-class variance (the first on ties; a level
/// with an empty class scores nothing), as its authors' `otsu`. A value is kept when above
/// the cut, or equal to a cut above 0 (their code zeroes only what is below and sets what
/// is above, leaving equal values as they are). A constant map keeps everything (their
/// division by zero gives NaN, which they read as true).
pub fn otsu_levels(values: &[f32], levels: usize) -> Vec<bool> {
    let (lo, hi) = values
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    // A constant map (or one with NaN, where no comparison holds).
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![true; values.len()];
    }
    let norm: Vec<f32> = values.iter().map(|&v| (v - lo) / (hi - lo)).collect();
    let n = norm.len() as f64;
    let (mut cut, mut best) = (0f32, 0f64);
    for t in 0..levels {
        let level = t as f32 / levels as f32;
        let (mut n_low, mut s_low, mut s_high) = (0usize, 0f64, 0f64);
        for &v in &norm {
            if v < level {
                (n_low, s_low) = (n_low + 1, s_low + v as f64);
            } else {
                s_high += v as f64;
            }
        }
        let n_high = norm.len() - n_low;
        if n_low == 0 || n_high == 0 {
            continue;
        }
        let (m_low, m_high) = (s_low / n_low as f64, s_high / n_high as f64);
        let g = (n_low as f64 / n) * (n_high as f64 / n) * (m_low - m_high).powi(2);
        if g > best {
            (best, cut) = (g, level);
        }
    }
    norm.iter()
        .map(|&v| v > cut || (v == cut && cut > 0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map with a known split: 30 cells near 0.1, 10 near 0.8 of a [0, 1] range. The
    /// cut falls on a level between them and keeps exactly the 10.
    #[test]
    fn vico_levels_keep_the_high_class() {
        let mut v: Vec<f32> = (0..30).map(|i| 0.1 + (i % 3) as f32 * 0.02).collect();
        v.extend((0..10).map(|i| 0.8 + (i % 2) as f32 * 0.2));
        v[0] = 0.0;
        let keep = otsu_levels(&v, 10);
        assert_eq!(keep.iter().filter(|&&k| k).count(), 10);
        assert!(keep[30..].iter().all(|&k| k));
        // Scaled and shifted: the same cells.
        let scaled: Vec<f32> = v.iter().map(|x| x * 3e-4 + 0.01).collect();
        assert_eq!(otsu_levels(&scaled, 10), keep);
        // A constant map keeps everything.
        assert!(otsu_levels(&[0.5; 7], 10).iter().all(|&k| k));
    }

    /// Between-class variance by hand: for values {0, 0, 1} the levels 0.1..0.9 all give
    /// (2/3)(1/3)(1)^2; the first (0.1) wins, and only the 1 is kept.
    #[test]
    fn vico_levels_take_the_first_best_level() {
        assert_eq!(otsu_levels(&[0.0, 0.0, 1.0], 10), vec![false, false, true]);
        // {0, 0.1, 1}: level 0.1 scores (1/3)(2/3)(0.55)^2, 0.2 scores (2/3)(1/3)(0.95)^2,
        // so the cut is 0.2 and 0.1 falls below it.
        assert_eq!(otsu_levels(&[0.0, 0.1, 1.0], 10), vec![false, false, true]);
        assert_eq!(otsu_levels(&[0.0, 0.9, 1.0], 10), vec![false, true, true]);
    }

    #[test]
    fn a_bimodal_map_splits_between_its_modes() {
        // 300 values near 0.2, 100 near 0.9, in a [0, 1] attention-like range.
        let mut v: Vec<f32> = (0..300).map(|i| 0.2 + (i % 7) as f32 * 0.01).collect();
        v.extend((0..100).map(|i| 0.9 - (i % 5) as f32 * 0.01));
        let t = otsu_threshold(&v);
        assert!((0.27..0.85).contains(&t), "threshold {t}");
        assert_eq!(v.iter().filter(|&&x| x > t).count(), 100);
    }

    #[test]
    fn the_threshold_follows_the_values_range() {
        // The same shape scaled and shifted: the same split.
        let v: Vec<f32> = (0..200)
            .map(|i| {
                if i < 150 {
                    (i % 3) as f32
                } else {
                    10.0 + (i % 2) as f32
                }
            })
            .collect();
        let t = otsu_threshold(&v);
        let scaled: Vec<f32> = v.iter().map(|x| x * 0.001 - 5.0).collect();
        let ts = otsu_threshold(&scaled);
        let above = |v: &[f32], t: f32| v.iter().filter(|&&x| x > t).count();
        assert_eq!(above(&v, t), 50);
        assert_eq!(above(&scaled, ts), 50);
    }

    #[test]
    fn constant_and_non_finite_input_do_not_panic() {
        assert_eq!(otsu_threshold(&[0.5; 10]), 0.5);
        assert!(otsu_threshold(&[]).is_finite());
        let t = otsu_threshold(&[f32::NAN, 0.0, 1.0, f32::INFINITY, 0.0, 1.0]);
        assert!((0.0..1.0).contains(&t));
    }
}
