//! Small statistics over latency samples, and formatting.

use std::time::Duration;

/// Quantiles of one set of samples, sorted once.
#[derive(Debug, Clone)]
pub struct Dist {
    sorted: Vec<Duration>,
}

impl Dist {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Dist { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The q-quantile (0..=1) by nearest rank; `None` for no samples.
    pub fn q(&self, q: f64) -> Option<Duration> {
        let n = self.sorted.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.sorted[rank - 1])
    }

    pub fn max(&self) -> Option<Duration> {
        self.sorted.last().copied()
    }

    /// How many samples exceed `d` (for outlier counts).
    pub fn above(&self, d: Duration) -> usize {
        self.sorted.len() - self.sorted.partition_point(|s| *s <= d)
    }
}

/// Microseconds with one decimal ("123.4 µs"), or ms above 10 ms.
pub fn us(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.1} µs", d.as_secs_f64() * 1e6),
        Some(d) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
    }
}

/// A signed difference b − a in µs ("+123.4 µs" / "-5.0 µs").
pub fn diff_us(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.1} µs", (b.as_secs_f64() - a.as_secs_f64()) * 1e6),
        _ => "-".into(),
    }
}

/// b − a in seconds (may be negative).
pub fn diff_secs(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(b?.as_secs_f64() - a?.as_secs_f64())
}

/// Bytes as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let d = Dist::new([5, 1, 4, 2, 3].map(Duration::from_millis).to_vec());
        assert_eq!(d.q(0.5), Some(Duration::from_millis(3)));
        assert_eq!(d.q(0.99), Some(Duration::from_millis(5)));
        assert_eq!(d.above(Duration::from_millis(3)), 2);
        assert_eq!(Dist::new(Vec::new()).q(0.5), None);
    }
}
