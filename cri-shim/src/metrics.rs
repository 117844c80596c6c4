//! Per-method call counters and latency (to the runtime's response
//! headers), shim-made errors and hook outcomes, as Prometheus text on an
//! optional HTTP listener. Lock-free: one fixed row per CRI v1 method, one
//! shared row for paths outside it (so a client cannot grow the table).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::deliver::Hooks;
use crate::{Error, Result};

/// Every method of CRI v1 RuntimeService and ImageService (api.proto).
const METHODS: &[&str] = &[
    "Attach",
    "CheckpointContainer",
    "ContainerStats",
    "ContainerStatus",
    "CreateContainer",
    "Exec",
    "ExecSync",
    "GetContainerEvents",
    "ImageFsInfo",
    "ImageStatus",
    "ListContainerStats",
    "ListContainers",
    "ListImages",
    "ListMetricDescriptors",
    "ListPodSandbox",
    "ListPodSandboxMetrics",
    "ListPodSandboxStats",
    "PodSandboxStats",
    "PodSandboxStatus",
    "PortForward",
    "PullImage",
    "RemoveContainer",
    "RemoveImage",
    "RemovePodSandbox",
    "ReopenContainerLog",
    "RunPodSandbox",
    "RuntimeConfig",
    "StartContainer",
    "Status",
    "StopContainer",
    "StopPodSandbox",
    "UpdateContainerResources",
    "UpdatePodSandboxResources",
    "UpdateRuntimeConfig",
    "Version",
];

#[derive(Debug, Default)]
struct Row {
    calls: AtomicU64,
    micros: AtomicU64,
    shim_errors: AtomicU64,
}

#[derive(Debug)]
pub struct Metrics {
    rows: Vec<Row>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rows: (0..=METHODS.len()).map(|_| Row::default()).collect(),
        }
    }
}

impl Metrics {
    fn row(&self, path: &str) -> &Row {
        let i = method_name(path)
            .and_then(|m| METHODS.binary_search(&m).ok())
            .unwrap_or(METHODS.len());
        &self.rows[i]
    }

    pub fn call(&self, path: &str, took: Duration, shim_error: bool) {
        let r = self.row(path);
        r.calls.fetch_add(1, Ordering::Relaxed);
        r.micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if shim_error {
            r.shim_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn render(&self, hooks: Option<&Hooks>) -> String {
        let mut o = String::new();
        let names = METHODS.iter().copied().chain(["other"]);
        let mut family = |name: &str, kind: &str, help: &str, get: &dyn Fn(&Row) -> String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (m, r) in names.clone().zip(&self.rows) {
                if r.calls.load(Ordering::Relaxed) > 0 {
                    let _ = writeln!(o, "{name}{{method=\"{m}\"}} {}", get(r));
                }
            }
        };
        family(
            "nodeplane_cri_calls_total",
            "counter",
            "Calls relayed, by CRI method (other: paths outside CRI v1).",
            &|r| r.calls.load(Ordering::Relaxed).to_string(),
        );
        family(
            "nodeplane_cri_call_seconds_sum",
            "counter",
            "Time from request to the runtime's response headers.",
            &|r| (r.micros.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
        );
        family(
            "nodeplane_cri_shim_errors_total",
            "counter",
            "Calls the shim answered itself (runtime unreachable, body unreadable).",
            &|r| r.shim_errors.load(Ordering::Relaxed).to_string(),
        );
        if let Some(h) = hooks {
            let s = &h.stats;
            for (name, help, v) in [
                ("nodeplane_cri_hook_delivered_total", "Lifecycle events the agent took.", &s.delivered),
                ("nodeplane_cri_hook_replayed_total", "Events delivered after the agent was unreachable.", &s.replayed),
                ("nodeplane_cri_hook_failed_attempts_total", "Delivery attempts that failed (agent down, slow or broken).", &s.failed_attempts),
                ("nodeplane_cri_hook_late_total", "Calls relayed before their hook was delivered (time box expired or agent down).", &s.late),
                ("nodeplane_cri_hook_dropped_total", "Undelivered events dropped because the queue was full.", &s.dropped),
                ("nodeplane_cri_hook_rejected_total", "Events the agent answered with an error.", &s.rejected),
            ] {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
            }
            let _ = writeln!(o, "# HELP nodeplane_cri_hook_queue Events waiting for delivery.\n# TYPE nodeplane_cri_hook_queue gauge\nnodeplane_cri_hook_queue {}", s.queued.load(Ordering::Relaxed));
            let _ = writeln!(o, "# HELP nodeplane_cri_agent_up 1 while the last delivery attempt succeeded.\n# TYPE nodeplane_cri_agent_up gauge\nnodeplane_cri_agent_up {}", u8::from(h.agent_up()));
        }
        o
    }
}

/// A CRI v1 method with one request and one answer (all but
/// GetContainerEvents); unknown methods are not assumed unary.
pub fn is_unary(path: &str) -> bool {
    method_name(path)
        .is_some_and(|m| m != "GetContainerEvents" && METHODS.binary_search(&m).is_ok())
}

/// "Version" from "/runtime.v1.RuntimeService/Version" (CRI v1 only).
pub fn method_name(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/runtime.v1.RuntimeService/")
        .or_else(|| path.strip_prefix("/runtime.v1.ImageService/"))?;
    Some(rest)
}

/// Serves /metrics and /healthz over HTTP/1.1 until the process ends.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    hooks: Option<Arc<Hooks>>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("listen on {listen} (--metrics-listen)"), e))?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, hooks) = (metrics.clone(), hooks.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (status, text) = match req.uri().path() {
                        "/metrics" => (200, metrics.render(hooks.as_deref())),
                        "/healthz" => (200, "ok\n".to_string()),
                        _ => (404, "not found: try /metrics or /healthz\n".to_string()),
                    };
                    let mut r = http::Response::new(Full::new(Bytes::from(text)));
                    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_sorted_for_binary_search() {
        assert!(METHODS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn only_known_unary_methods_are_buffered() {
        assert!(is_unary("/runtime.v1.RuntimeService/Version"));
        assert!(is_unary("/runtime.v1.ImageService/PullImage"));
        assert!(!is_unary("/runtime.v1.RuntimeService/GetContainerEvents"));
        assert!(!is_unary("/runtime.v1.RuntimeService/FutureStream"));
        assert!(!is_unary("/runtime.v1alpha2.RuntimeService/Version"));
    }

    #[test]
    fn unknown_paths_share_one_row() {
        let m = Metrics::default();
        m.call(
            "/runtime.v1.RuntimeService/Version",
            Duration::from_millis(1),
            false,
        );
        m.call(
            "/runtime.v1.RuntimeService/FutureMethod",
            Duration::from_millis(1),
            true,
        );
        m.call("/anything/else", Duration::from_millis(1), false);
        let t = m.render(None);
        assert!(
            t.contains("nodeplane_cri_calls_total{method=\"Version\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("nodeplane_cri_calls_total{method=\"other\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("nodeplane_cri_shim_errors_total{method=\"other\"} 1"),
            "{t}"
        );
    }
}
