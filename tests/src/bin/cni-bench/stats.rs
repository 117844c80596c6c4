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

/// Mean of the samples at 1-based positions `from..=to` (clamped).
pub fn mean_range(samples: &[Duration], from: usize, to: usize) -> Option<Duration> {
    let to = to.min(samples.len());
    let slice = samples.get(from.saturating_sub(1)..to)?;
    if slice.is_empty() {
        return None;
    }
    Some(slice.iter().sum::<Duration>() / slice.len() as u32)
}

/// Least-squares slope of latency (µs) against the number of pods already
/// present (the sample's index).
pub fn slope_us_per_pod(samples: &[Duration]) -> Option<f64> {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return None;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = samples.iter().map(|d| d.as_secs_f64() * 1e6).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, d) in samples.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (d.as_secs_f64() * 1e6 - mean_y);
        sxx += dx * dx;
    }
    Some(sxy / sxx)
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
        let slope = slope_us_per_pod(&s).expect("slope");
        assert!((slope - 37.0).abs() < 1e-6, "{slope}");
        assert_eq!(mean_range(&s, 1, 10), Some(Duration::from_nanos(1_166_500)));
    }
}
