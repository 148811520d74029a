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

#[cfg(test)]
mod tests {
    use super::*;

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
