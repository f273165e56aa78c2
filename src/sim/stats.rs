//! Statistics over seeds: means with Student-t 95% intervals, and paired
//! differences (the same seed gives the same trace to every policy, so the
//! per-seed difference removes the trace's own variance).

/// Two-sided 95% Student t quantiles for 1..=30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

fn t95(df: usize) -> f64 {
    T95.get(df.wrapping_sub(1)).copied().unwrap_or(1.96)
}

/// Mean and half-width of its 95% interval. NaN mean for no values; an
/// infinite value makes the mean infinite and the half-width 0.
pub fn mean_ci(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 || !mean.is_finite() {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, t95(v.len() - 1) * (var / n).sqrt())
}

/// Mean and 95% half-width of the per-seed difference `a - b` (seeds in
/// the same order).
pub fn paired_diff(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    mean_ci(&d)
}

/// Mean and 95% half-width of the per-seed ratio `a / b`; NaN when some
/// `b` is 0.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> (f64, f64) {
    if b.iter().any(|y| *y <= 0.0) {
        return (f64::NAN, 0.0);
    }
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    mean_ci(&r)
}

/// "m ± h" with `digits` decimals; "-" for NaN, "inf" for infinite.
pub fn fmt_ci((m, h): (f64, f64), digits: usize) -> String {
    if m.is_nan() {
        "-".into()
    } else if !m.is_finite() {
        "inf".into()
    } else if h == 0.0 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ± {h:.digits$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_uses_student_t() {
        let (m, h) = mean_ci(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        // sd 1, n 3, t(2) = 4.303.
        assert!((h - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(mean_ci(&[5.0]), (5.0, 0.0));
        assert!(mean_ci(&[]).0.is_nan());
    }

    #[test]
    fn paired_difference_removes_the_shared_variance() {
        // Widely spread seeds, constant difference: a zero-width interval.
        let a = [10.0, 20.0, 40.0];
        let b = [9.0, 19.0, 39.0];
        assert_eq!(paired_diff(&a, &b), (1.0, 0.0));
        assert!(mean_ci(&a).1 > 10.0);
        assert!(paired_ratio(&a, &[0.0, 1.0, 1.0]).0.is_nan());
    }
}
