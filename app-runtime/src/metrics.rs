//! Prometheus metrics of the node runtime:
//!
//! - service invocation: requests per (caller app id, target app id,
//!   method, status) and latency histograms per (caller, target, method).
//!   The HTTP verb stands for "method" here: a path label would let any
//!   caller create unbounded series;
//! - pub/sub: messages published per (app, pubsub, topic, status),
//!   deliveries per (app, pubsub, topic, outcome), and the app's time to
//!   answer a delivery per (app, pubsub, topic).
//!
//! Every family keeps at most [`MAX_SERIES`] label sets; later ones are
//! counted under `other`, so no caller can grow the agent's memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Series kept at most per family.
const MAX_SERIES: usize = 2000;

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, took: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }
}

/// One metric family: its name, help, label names and series.
#[derive(Debug)]
struct Family<T> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: BTreeMap<Vec<String>, T>,
}

impl<T: Default> Family<T> {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Family {
            name,
            help,
            labels,
            series: BTreeMap::new(),
        }
    }

    /// The series of `values` (one per label), or `other` for every label
    /// once the family is full.
    fn at(&mut self, values: &[&str]) -> &mut T {
        let full = self.series.len() >= MAX_SERIES;
        let key: Vec<String> = values
            .iter()
            .map(|v| if full { "other".into() } else { v.to_string() })
            .collect();
        self.series.entry(key).or_default()
    }

    fn label_text(&self, values: &[String]) -> String {
        self.labels
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn header(&self, out: &mut String, kind: &str) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
    }
}

impl Family<u64> {
    fn render(&self, out: &mut String) {
        self.header(out, "counter");
        for (values, n) in &self.series {
            let _ = writeln!(out, "{}{{{}}} {n}", self.name, self.label_text(values));
        }
    }
}

impl Family<Histogram> {
    fn render(&self, out: &mut String) {
        self.header(out, "histogram");
        let name = self.name;
        for (values, h) in &self.series {
            let l = self.label_text(values);
            for (b, n) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{b}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
        }
    }
}

#[derive(Debug)]
struct Inner {
    requests: Family<u64>,
    latency: Family<Histogram>,
    published: Family<u64>,
    deliveries: Family<u64>,
    delivery_latency: Family<Histogram>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            requests: Family::new(
                "nodeplane_runtime_invoke_requests_total",
                "Service invocations through the node runtime.",
                &["caller", "target", "method", "status"],
            ),
            latency: Family::new(
                "nodeplane_runtime_invoke_duration_seconds",
                "Time from request to response headers.",
                &["caller", "target", "method"],
            ),
            published: Family::new(
                "nodeplane_runtime_pubsub_published_total",
                "Messages apps published through the node runtime, by the HTTP status answered.",
                &["app", "pubsub", "topic", "status"],
            ),
            deliveries: Family::new(
                "nodeplane_runtime_pubsub_deliveries_total",
                "Deliveries to subscribed apps, by outcome (success, retry, drop, error).",
                &["app", "pubsub", "topic", "outcome"],
            ),
            delivery_latency: Family::new(
                "nodeplane_runtime_pubsub_delivery_duration_seconds",
                "Time the subscribed app took to answer a delivery.",
                &["app", "pubsub", "topic"],
            ),
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn invoke(&self, caller: &str, target: &str, verb: &str, status: u16, took: Duration) {
        let mut m = self.lock();
        *m.requests.at(&[caller, target, verb, &status.to_string()]) += 1;
        m.latency.at(&[caller, target, verb]).observe(took);
    }

    /// One message published by `app` (empty: none) and answered `status`.
    pub fn published(&self, app: &str, pubsub: &str, topic: &str, status: u16) {
        *self
            .lock()
            .published
            .at(&[app, pubsub, topic, &status.to_string()]) += 1;
    }

    /// One delivery to `app` with its `outcome`, answered after `took`.
    pub fn delivered(&self, app: &str, pubsub: &str, topic: &str, outcome: &str, took: Duration) {
        let mut m = self.lock();
        *m.deliveries.at(&[app, pubsub, topic, outcome]) += 1;
        m.delivery_latency.at(&[app, pubsub, topic]).observe(took);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        m.requests.render(&mut out);
        m.latency.render(&mut out);
        m.published.render(&mut out);
        m.deliveries.render(&mut out);
        m.delivery_latency.render(&mut out);
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

    #[test]
    fn pubsub_series_and_the_series_cap() {
        let m = Metrics::default();
        m.published("pub", "pubsub", "orders", 204);
        m.delivered(
            "sub",
            "pubsub",
            "orders",
            "success",
            Duration::from_millis(2),
        );
        m.delivered("sub", "pubsub", "orders", "retry", Duration::from_millis(2));
        let t = m.render();
        assert!(t.contains(r#"nodeplane_runtime_pubsub_published_total{app="pub",pubsub="pubsub",topic="orders",status="204"} 1"#), "{t}");
        assert!(t.contains(r#"nodeplane_runtime_pubsub_deliveries_total{app="sub",pubsub="pubsub",topic="orders",outcome="retry"} 1"#), "{t}");
        assert!(t.contains(r#"nodeplane_runtime_pubsub_delivery_duration_seconds_count{app="sub",pubsub="pubsub",topic="orders"} 2"#), "{t}");
        for i in 0..MAX_SERIES + 5 {
            m.published("pub", "pubsub", &format!("t{i}"), 204);
        }
        let t = m.render();
        assert!(t.contains(r#"topic="other",status="other"} 6"#), "{t}");
    }
}
