//! Small statistics over samples.

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

/// Median of throughput samples (lower median for an even count).
pub fn median_f64(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// "12.34 ms" / "850 µs" / "1.23 s".
pub fn fmt(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(1) => format!("{} µs", d.as_micros()),
        Some(d) if d < Duration::from_secs(10) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

pub fn ms(d: Duration) -> String {
    fmt(Some(d))
}

/// Median and p95 of `samples`, formatted.
pub fn summary(samples: &[Duration]) -> String {
    format!(
        "median {}, p95 {}, min {}, max {} (n={})",
        fmt(median(samples)),
        fmt(quantile(samples, 0.95)),
        fmt(samples.iter().min().copied()),
        fmt(samples.iter().max().copied()),
        samples.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let s: Vec<Duration> = [5, 1, 4, 2, 3].map(Duration::from_millis).to_vec();
        assert_eq!(median(&s), Some(Duration::from_millis(3)));
        assert_eq!(quantile(&s, 0.95), Some(Duration::from_millis(5)));
        assert_eq!(median(&[]), None);
        assert_eq!(median_f64(&[3.0, 1.0, 2.0, 4.0]), Some(2.0));
    }
}
