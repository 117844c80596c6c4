//! Quantiles over latency samples.

use std::time::Duration;

/// The q-quantile (0..=1) by nearest rank of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A 90 % bootstrap interval, in ms, of p99(`s`) − p99(`d`): both sample
/// sets are resampled with replacement `rounds` times. The p99 of a call
/// with a heavy tail (ListContainers: about 3 % of calls take 1–6 ms in
/// containerd itself) falls where few samples are, so the difference of two
/// p99s moves a lot from run to run; the interval says how much.
pub fn p99_added_interval(d: &[Duration], s: &[Duration], rounds: usize) -> (f64, f64) {
    // xorshift64: a fixed seed keeps the interval the same for the same
    // samples, and the bench needs no random-number crate.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut pick = move |len: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % len as u64) as usize
    };
    let mut buf = Vec::with_capacity(d.len().max(s.len()));
    let mut p99 = |v: &[Duration], pick: &mut dyn FnMut(usize) -> usize| {
        buf.clear();
        buf.extend((0..v.len()).map(|_| v[pick(v.len())]));
        // The nearest-rank p99 of `quantile`, without sorting everything.
        let rank = ((0.99 * buf.len() as f64).ceil() as usize).clamp(1, buf.len());
        ms(*buf.select_nth_unstable(rank - 1).1)
    };
    let mut diffs: Vec<f64> = (0..rounds)
        .map(|_| p99(s, &mut pick) - p99(d, &mut pick))
        .collect();
    if diffs.is_empty() {
        return (0.0, 0.0);
    }
    diffs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| diffs[((q * diffs.len() as f64) as usize).min(diffs.len() - 1)];
    (at(0.05), at(0.95))
}
