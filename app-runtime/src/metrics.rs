//! Prometheus metrics of service invocation: requests per (caller app id,
//! target app id, method, status) and latency histograms per (caller,
//! target, method). The HTTP verb stands for "method" here: a path label
//! would let any caller create unbounded series.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Series kept at most; later label sets are counted under `other`.
const MAX_SERIES: usize = 2000;

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, String, String, u16), u64>,
    latency: BTreeMap<(String, String, String), Histogram>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn invoke(&self, caller: &str, target: &str, verb: &str, status: u16, took: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let over = m.requests.len() >= MAX_SERIES;
        let label = |s: &str| {
            if over {
                "other".to_string()
            } else {
                s.to_string()
            }
        };
        let (c, t, v) = (label(caller), label(target), label(verb));
        *m.requests
            .entry((c.clone(), t.clone(), v.clone(), status))
            .or_default() += 1;
        let h = m.latency.entry((c, t, v)).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        out.push_str("# HELP nodeplane_runtime_invoke_requests_total Service invocations through the node runtime.\n");
        out.push_str("# TYPE nodeplane_runtime_invoke_requests_total counter\n");
        for ((c, t, v, s), n) in &m.requests {
            let _ = writeln!(
                out,
                "nodeplane_runtime_invoke_requests_total{{caller=\"{}\",target=\"{}\",method=\"{}\",status=\"{s}\"}} {n}",
                esc(c),
                esc(t),
                esc(v)
            );
        }
        out.push_str("# HELP nodeplane_runtime_invoke_duration_seconds Time from request to response headers.\n");
        out.push_str("# TYPE nodeplane_runtime_invoke_duration_seconds histogram\n");
        for ((c, t, v), h) in &m.latency {
            let l = format!(
                "caller=\"{}\",target=\"{}\",method=\"{}\"",
                esc(c),
                esc(t),
                esc(v)
            );
            for (b, n) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    out,
                    "nodeplane_runtime_invoke_duration_seconds_bucket{{{l},le=\"{b}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "nodeplane_runtime_invoke_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "nodeplane_runtime_invoke_duration_seconds_sum{{{l}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "nodeplane_runtime_invoke_duration_seconds_count{{{l}}} {}",
                h.count
            );
        }
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets() {
        let m = Metrics::default();
        m.invoke("a", "b", "GET", 200, Duration::from_micros(300));
        m.invoke("a", "b", "GET", 200, Duration::from_millis(3));
        m.invoke("a", "b", "GET", 500, Duration::from_millis(3));
        let t = m.render();
        assert!(t.contains(r#"nodeplane_runtime_invoke_requests_total{caller="a",target="b",method="GET",status="200"} 2"#), "{t}");
        assert!(t.contains(r#"nodeplane_runtime_invoke_duration_seconds_bucket{caller="a",target="b",method="GET",le="0.0005"} 1"#), "{t}");
        assert!(t.contains(r#"nodeplane_runtime_invoke_duration_seconds_count{caller="a",target="b",method="GET"} 3"#), "{t}");
    }
}
