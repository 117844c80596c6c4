//! Pods as the CRI shim reports them (proto `PodLifecycle`): identity,
//! labels, annotations, sandbox, netns, IPs and containers, kept from the
//! kubelet's own calls, so the agent knows a pod's labels before its CNI
//! ADD, even in standalone mode or while the API server is unreachable.
//!
//! This module only records; it programs nothing and never blocks the
//! shim (each event is answered at once). The policy model can consume it
//! through [`Lifecycle::pods`] and wait for changes with
//! [`Lifecycle::subscribe`] (that wiring belongs with the policy loop).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use nodeplane_proto::agent::{pod_lifecycle::Kind, PodLifecycle, Reply};
use tokio::sync::watch;

/// One pod sandbox as last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShimPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// "" until the runtime created it (between STARTING and READY).
    pub sandbox_id: String,
    pub netns_path: String,
    pub ips: Vec<String>,
    pub state: &'static str,
    pub containers: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    /// By pod uid (or "sandbox:<id>" for a sandbox the shim knew no pod of).
    pods: BTreeMap<String, ShimPod>,
    events: BTreeMap<&'static str, u64>,
    replayed: u64,
    last_sequence: u64,
}

#[derive(Debug)]
pub struct Lifecycle {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        }
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Unspecified => "unspecified",
        Kind::SandboxStarting => "sandbox_starting",
        Kind::SandboxReady => "sandbox_ready",
        Kind::SandboxFailed => "sandbox_failed",
        Kind::SandboxStopped => "sandbox_stopped",
        Kind::SandboxRemoved => "sandbox_removed",
        Kind::ContainerCreated => "container_created",
        Kind::ContainerStarted => "container_started",
        Kind::ContainerStopped => "container_stopped",
        Kind::ContainerRemoved => "container_removed",
    }
}

impl Lifecycle {
    /// Records one event and answers the shim.
    pub fn record(&self, ev: &PodLifecycle) -> Reply {
        let kind = ev.kind();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *st.events.entry(kind_name(kind)).or_default() += 1;
        st.replayed += u64::from(ev.replayed);
        st.last_sequence = st.last_sequence.max(ev.sequence);
        let key = st.key(ev);
        match kind {
            Kind::Unspecified => {
                return Reply {
                    programmed: false,
                    error: "lifecycle event without a kind".into(),
                    generation: 0,
                }
            }
            Kind::SandboxStarting | Kind::SandboxReady => {
                let p = st.pods.entry(key).or_default();
                p.namespace.clone_from(&ev.pod_namespace);
                p.name.clone_from(&ev.pod_name);
                p.uid.clone_from(&ev.pod_uid);
                p.labels.clone_from(&ev.labels);
                p.annotations.clone_from(&ev.annotations);
                if kind == Kind::SandboxReady {
                    p.sandbox_id.clone_from(&ev.sandbox_id);
                    p.netns_path.clone_from(&ev.netns_path);
                    p.ips.clone_from(&ev.ips);
                    p.state = "ready";
                } else if p.sandbox_id.is_empty() {
                    p.state = "starting";
                }
            }
            Kind::SandboxFailed => {
                if st.pods.get(&key).is_some_and(|p| p.sandbox_id.is_empty()) {
                    st.pods.remove(&key);
                }
            }
            Kind::SandboxStopped => {
                if let Some(p) = st.pods.get_mut(&key) {
                    p.state = "stopped";
                }
            }
            Kind::SandboxRemoved => {
                st.pods.remove(&key);
            }
            Kind::ContainerCreated => {
                if let Some(p) = st.pods.get_mut(&key) {
                    p.containers.insert(ev.container_id.clone());
                }
            }
            Kind::ContainerStarted | Kind::ContainerStopped => {}
            Kind::ContainerRemoved => {
                for p in st.pods.values_mut() {
                    p.containers.remove(&ev.container_id);
                }
            }
        }
        drop(st);
        self.changed.send_modify(|n| *n += 1);
        Reply {
            programmed: false,
            error: String::new(),
            generation: 0,
        }
    }

    /// Every pod the shim has reported and not removed.
    pub fn pods(&self) -> Vec<ShimPod> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.pods.values().cloned().collect()
    }

    /// Bumped after every recorded event.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// For /status.
    pub fn status_json(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pods: Vec<_> = st
            .pods
            .values()
            .map(|p| {
                serde_json::json!({
                    "namespace": p.namespace, "name": p.name, "uid": p.uid,
                    "labels": p.labels, "annotations": p.annotations,
                    "sandboxId": p.sandbox_id, "netns": p.netns_path, "ips": p.ips,
                    "state": p.state, "containers": p.containers,
                })
            })
            .collect();
        serde_json::json!({ "pods": pods, "events": st.events, "replayed": st.replayed, "lastSequence": st.last_sequence })
    }

    /// For /metrics.
    pub fn metrics(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = String::from("# HELP nodeplane_cri_events_total Lifecycle events received from the CRI shim, by kind.\n# TYPE nodeplane_cri_events_total counter\n");
        for (k, n) in &st.events {
            o.push_str(&format!("nodeplane_cri_events_total{{kind=\"{k}\"}} {n}\n"));
        }
        o.push_str(&format!(
            "# HELP nodeplane_cri_events_replayed_total Events the shim delivered late (replayed).\n# TYPE nodeplane_cri_events_replayed_total counter\nnodeplane_cri_events_replayed_total {}\n# HELP nodeplane_cri_pods Pods known from the CRI shim.\n# TYPE nodeplane_cri_pods gauge\nnodeplane_cri_pods {}\n",
            st.replayed,
            st.pods.len()
        ));
        o
    }
}

impl State {
    /// The pod an event is about: by uid, else by the sandbox it names.
    fn key(&self, ev: &PodLifecycle) -> String {
        if !ev.pod_uid.is_empty() {
            return ev.pod_uid.clone();
        }
        let by_sandbox = |sb: &str| {
            self.pods
                .iter()
                .find(|(_, p)| !sb.is_empty() && p.sandbox_id == sb)
                .map(|(k, _)| k.clone())
        };
        let by_container = || {
            self.pods
                .iter()
                .find(|(_, p)| p.containers.contains(&ev.container_id))
                .map(|(k, _)| k.clone())
        };
        by_sandbox(&ev.sandbox_id)
            .or_else(by_container)
            .unwrap_or_else(|| format!("sandbox:{}", ev.sandbox_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: Kind, uid: &str, sandbox: &str) -> PodLifecycle {
        PodLifecycle {
            kind: kind as i32,
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: uid.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            sandbox_id: sandbox.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_lives_from_starting_to_removed() {
        let l = Lifecycle::default();
        let rx = l.subscribe();
        assert!(l
            .record(&ev(Kind::SandboxStarting, "u1", ""))
            .error
            .is_empty());
        assert_eq!(l.pods()[0].labels["app"], "web");
        assert_eq!(l.pods()[0].state, "starting");
        assert!(rx.has_changed().unwrap_or(false));
        let mut ready = ev(Kind::SandboxReady, "u1", "sb1");
        ready.ips = vec!["10.0.0.2".into()];
        l.record(&ready);
        let mut c = ev(Kind::ContainerCreated, "u1", "sb1");
        c.container_id = "c1".into();
        l.record(&c);
        assert_eq!(l.pods()[0].ips, vec!["10.0.0.2".to_string()]);
        assert!(l.pods()[0].containers.contains("c1"));
        // After a shim restart, events carry only ids.
        let mut rm = PodLifecycle {
            kind: Kind::ContainerRemoved as i32,
            container_id: "c1".into(),
            ..Default::default()
        };
        l.record(&rm);
        assert!(l.pods()[0].containers.is_empty());
        rm.kind = Kind::SandboxStopped as i32;
        rm.sandbox_id = "sb1".into();
        l.record(&rm);
        assert_eq!(l.pods()[0].state, "stopped");
        rm.kind = Kind::SandboxRemoved as i32;
        l.record(&rm);
        assert!(l.pods().is_empty());
        let m = l.metrics();
        assert!(
            m.contains("nodeplane_cri_events_total{kind=\"sandbox_ready\"} 1"),
            "{m}"
        );
    }

    #[test]
    fn a_failed_attempt_is_forgotten_but_not_a_running_sandbox() {
        let l = Lifecycle::default();
        l.record(&ev(Kind::SandboxStarting, "u1", ""));
        l.record(&ev(Kind::SandboxFailed, "u1", ""));
        assert!(l.pods().is_empty());
        l.record(&ev(Kind::SandboxReady, "u2", "sb2"));
        l.record(&ev(Kind::SandboxStarting, "u2", ""));
        l.record(&ev(Kind::SandboxFailed, "u2", ""));
        assert_eq!(l.pods().len(), 1);
        assert!(!l.record(&PodLifecycle::default()).error.is_empty());
    }
}
