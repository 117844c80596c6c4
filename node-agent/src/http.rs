//! /healthz, /readyz, /metrics (Prometheus text) and /status (JSON).

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::agent::SharedStatus;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct Ctx {
    status: SharedStatus,
    table: String,
    lifecycle: std::sync::Arc<crate::lifecycle::Lifecycle>,
    /// The CSI driver serves (true when the agent serves none).
    csi_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    runtime: Option<std::sync::Arc<nodeplane_runtime::Runtime>>,
}

/// Serves until the process ends.
pub async fn serve(
    listen: SocketAddr,
    status: SharedStatus,
    table: String,
    lifecycle: std::sync::Arc<crate::lifecycle::Lifecycle>,
    csi_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    runtime: Option<std::sync::Arc<nodeplane_runtime::Runtime>>,
) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .with_state(Ctx {
            status,
            table,
            lifecycle,
            csi_ready,
            runtime,
        });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("listen on {listen}"), e))?;
    axum::serve(listener, app)
        .await
        .map_err(|e| Error::io("HTTP server", e))
}

fn snapshot(ctx: &Ctx) -> crate::agent::Status {
    ctx.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Ready once every source has synced, the kernel holds the rules and the
/// CSI driver (when configured) serves.
async fn readyz(State(ctx): State<Ctx>) -> (StatusCode, String) {
    let s = snapshot(&ctx);
    if s.draining {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    if !ctx.csi_ready.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the CSI driver (its start-up error, if any, is in the log)\n".into(),
        );
    }
    if s.synced && s.programmed {
        (StatusCode::OK, "ready\n".into())
    } else if !s.synced {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the sources to sync\n".into(),
        )
    } else {
        let why = s.last_error.unwrap_or_default();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("rules not programmed: {why}\n"),
        )
    }
}

async fn status_json(State(ctx): State<Ctx>) -> String {
    let s = snapshot(&ctx);
    serde_json::json!({
        "synced": s.synced,
        "programmed": s.programmed,
        "generation": s.generation,
        "revision": s.revision,
        "flowsRevision": s.flows_revision,
        "pods": s.pods,
        "policies": s.policies,
        "groups": s.groups,
        "elements": s.elements,
        "lastError": s.last_error,
        "criShim": ctx.lifecycle.status_json(),
        "csiReady": ctx.csi_ready.load(std::sync::atomic::Ordering::SeqCst),
        "runtime": ctx.runtime.as_ref().map(|rt| serde_json::json!({
            "ready": rt.is_ready(),
            "pods": rt.directory().len(),
            "stores": rt.registry().stores.keys().collect::<Vec<_>>(),
            "componentErrors": rt.registry().errors,
            "problems": rt.problems(),
        })),
    })
    .to_string()
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    let s = snapshot(&ctx);
    let table = ctx.table.clone();
    let counters = tokio::task::spawn_blocking(move || crate::nft::counters(&table))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    metric(
        "nodeplane_ready",
        "gauge",
        "1 when every source has synced and the rules are programmed.",
        &one(u8::from(s.synced && s.programmed).to_string()),
    );
    metric(
        "nodeplane_rule_generation",
        "counter",
        "Successful programming transactions.",
        &one(s.generation.to_string()),
    );
    metric(
        "nodeplane_reconcile_duration_seconds_sum",
        "counter",
        "Time spent compiling and programming.",
        &one(s.reconcile_seconds_sum.to_string()),
    );
    metric(
        "nodeplane_reconcile_duration_seconds_count",
        "counter",
        "Reconciles (compile + program).",
        &one(s.reconciles.to_string()),
    );
    metric(
        "nodeplane_reconcile_last_duration_seconds",
        "gauge",
        "Duration of the last reconcile.",
        &one(s.last_reconcile_seconds.to_string()),
    );
    metric(
        "nodeplane_reconcile_errors_total",
        "counter",
        "Reconciles that failed.",
        &one(s.errors.to_string()),
    );
    metric(
        "nodeplane_pods",
        "gauge",
        "Pod interfaces programmed on this node.",
        &one(s.pods.to_string()),
    );
    metric(
        "nodeplane_policies",
        "gauge",
        "NetworkPolicies known.",
        &one(s.policies.to_string()),
    );
    metric(
        "nodeplane_rule_groups",
        "gauge",
        "Distinct compiled rule groups (nftables chains).",
        &one(s.groups.to_string()),
    );
    metric(
        "nodeplane_rule_elements",
        "gauge",
        "Elements in the rule groups' maps.",
        &one(s.elements.to_string()),
    );
    metric(
        "nodeplane_conntrack_cut_total",
        "counter",
        "Connections cut because a change denied them.",
        &one(s.conntrack_cut.to_string()),
    );
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut drops = Vec::new();
    for (name, (p, b)) in &counters {
        if let Some(policy) = s.counters.get(name) {
            let (ns, n) = policy.split_once('/').unwrap_or(("", policy));
            let l = format!("{{namespace=\"{}\",policy=\"{}\"}}", esc(ns), esc(n));
            packets.push((l.clone(), p.to_string()));
            bytes.push((l, b.to_string()));
        } else if crate::nft::DROP_COUNTERS.contains(&name.as_str()) {
            drops.push((format!("{{reason=\"{name}\"}}"), p.to_string()));
        }
    }
    metric(
        "nodeplane_policy_allowed_packets_total",
        "counter",
        "Packets that opened a connection a policy allowed (first packet of each connection).",
        &packets,
    );
    metric(
        "nodeplane_policy_allowed_bytes_total",
        "counter",
        "Bytes of those packets.",
        &bytes,
    );
    metric(
        "nodeplane_dropped_packets_total",
        "counter",
        "Packets dropped, by reason.",
        &drops,
    );
    o.push_str(&ctx.lifecycle.metrics());
    if let Some(rt) = &ctx.runtime {
        o.push_str(&rt.metrics.render());
    }
    o
}
