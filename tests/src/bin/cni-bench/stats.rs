//! Small statistics over latency samples.

use std::time::Duration;

/// The q-quantile (0..=1) by nearest rank; `None` for no samples.
pub fn quantile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

pub fn median(samples: &[Duration]) -> Option<Duration> {
    quantile(samples, 0.5)
}

/// Mean of the samples at 1-based positions `from..=to` (clamped), pooled
/// over several series indexed alike.
pub fn mean_range(series: &[&[Duration]], from: usize, to: usize) -> Option<Duration> {
    let picked: Vec<Duration> = series
        .iter()
        .flat_map(|s| {
            s.get(from.saturating_sub(1)..to.min(s.len()))
                .unwrap_or(&[])
        })
        .copied()
        .collect();
    if picked.is_empty() {
        return None;
    }
    Some(picked.iter().sum::<Duration>() / picked.len() as u32)
}

/// Least-squares slope of latency (µs) against the number of pods already
/// present (the sample's index), pooled over several series.
pub fn slope_us_per_pod(series: &[&[Duration]]) -> Option<f64> {
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.iter().enumerate())
        .map(|(i, d)| (i as f64, d.as_secs_f64() * 1e6))
        .collect();
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in &points {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    // No slope from fewer than two distinct pod counts.
    (sxx > 0.0).then(|| sxy / sxx)
}

/// "12.34 ms" / "850 µs", right-aligned by the caller.
pub fn fmt(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(1) => format!("{} µs", d.as_micros()),
        Some(d) if d < Duration::from_secs(10) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let s = ms(&[5, 1, 4, 2, 3]);
        assert_eq!(median(&s), Some(Duration::from_millis(3)));
        assert_eq!(quantile(&s, 0.95), Some(Duration::from_millis(5)));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn slope_of_a_line() {
        // 1 ms + 37 µs per existing pod.
        let s: Vec<Duration> = (0..250)
            .map(|k| Duration::from_micros(1000 + 37 * k))
            .collect();
        let slope = slope_us_per_pod(&[&s]).expect("slope");
        assert!((slope - 37.0).abs() < 1e-6, "{slope}");
        assert_eq!(
            mean_range(&[&s], 1, 10),
            Some(Duration::from_nanos(1_166_500))
        );
        assert_eq!(slope_us_per_pod(&[&s[..1]]), None);
    }

    #[test]
    fn pooled_passes_cancel_a_linear_drift() {
        // 20 µs/pod of real growth; load adds 10 µs per elapsed step. The
        // up pass sees +30 µs/pod, the down pass (run later, pod counts in
        // reverse) +10 µs/pod; pooled, the drift cancels.
        let n = 100u64;
        let up: Vec<Duration> = (0..n)
            .map(|k| Duration::from_micros(1000 + 20 * k + 10 * k))
            .collect();
        let down: Vec<Duration> = (0..n)
            .map(|k| Duration::from_micros(1000 + 20 * k + 10 * (2 * n - 1 - k)))
            .collect();
        let slope = slope_us_per_pod(&[&up, &down]).expect("slope");
        assert!((slope - 20.0).abs() < 1e-6, "{slope}");
    }
}
