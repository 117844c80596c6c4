//! Re-delivery of the running pods to the agent.
//!
//! The agent keeps its pods in memory: a restarted agent knows none of the
//! pods already running, and no CRI call will tell it again. So the shim
//! re-sends a READY (identity, labels, netns, IPs; flagged `replayed`) for
//! every ready sandbox containerd reports — when the agent answers again
//! after failed deliveries, and every `--agent-resync-secs` for a restart
//! no delivery noticed. READY is an upsert in the agent, so repeating it
//! changes nothing for an agent that already knew.
//!
//! Order is kept as for any READY: each place is reserved in the hook
//! queue before the sandbox's status is read, so a StopPodSandbox that
//! returns meanwhile is reported after it, and a sandbox found gone or not
//! ready is withdrawn, never announced.

use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use nodeplane_proto::agent::pod_lifecycle::Kind;

use crate::deliver::Hooks;
use crate::pods::Pod;
use crate::relay::{Relay, STATUS_HOLD};

/// Runs forever: a resync after each recovery of the agent and every
/// `interval` (never, if zero).
pub async fn run(relay: Arc<Relay>, hooks: Arc<Hooks>, interval: Duration) {
    loop {
        if interval.is_zero() {
            hooks.recovered.notified().await;
        } else {
            tokio::select! {
                _ = hooks.recovered.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        match once(&relay, &hooks).await {
            Ok(n) => tracing::debug!(sandboxes = n, "running pods re-sent to the agent"),
            Err(e) => tracing::warn!(error = %e, "resync of running pods to the agent failed"),
        }
    }
}

/// One resync; returns how many sandboxes were re-announced.
pub async fn once(relay: &Relay, hooks: &Hooks) -> crate::Result<usize> {
    let list: cri::ListPodSandboxResponse = relay
        .unary(
            "ListPodSandbox",
            cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            },
        )
        .await?;
    // All places first, then the statuses: the queue stays in call order.
    let reserved: Vec<_> = list
        .items
        .into_iter()
        .map(|sb| {
            let m = sb.metadata.unwrap_or_default();
            let pod = Pod {
                namespace: m.namespace,
                name: m.name,
                uid: m.uid,
                labels: sb.labels,
                annotations: sb.annotations,
            };
            let mut ev = pod.event(Kind::SandboxReady, &sb.id);
            ev.replayed = true;
            (hooks.reserve(ev.clone(), STATUS_HOLD), sb.id, ev)
        })
        .collect();
    let mut sent = 0;
    for (sequence, id, mut ev) in reserved {
        match relay.sandbox_status(id.clone()).await {
            Ok(s) if s.ready => {
                ev.netns_path = s.netns;
                ev.ips = s.ips;
                hooks.fill(sequence, Some(ev));
                sent += 1;
            }
            Ok(_) => hooks.fill(sequence, None),
            Err(e) => {
                // Without its status the event would blank the netns and
                // IPs an agent has: better not sent; the next resync retries.
                tracing::debug!(sandbox = %id, error = %e, "sandbox gone or unreadable during resync");
                hooks.fill(sequence, None);
            }
        }
    }
    Ok(sent)
}
