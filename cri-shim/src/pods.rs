//! What the shim remembers about pods between calls, to give every event
//! its pod's identity: StopPodSandbox and StartContainer carry only ids.
//! Lost on restart (the shim is stateless by design); events for sandboxes
//! it has not seen then carry the ids alone, which the agent keys on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_cri::v1::PodSandboxConfig;
use nodeplane_proto::agent::{pod_lifecycle::Kind, PodLifecycle};

#[derive(Debug, Clone, Default)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

impl Pod {
    pub fn from_config(c: &PodSandboxConfig) -> Self {
        let m = c.metadata.clone().unwrap_or_default();
        Pod {
            namespace: m.namespace,
            name: m.name,
            uid: m.uid,
            labels: c.labels.clone(),
            annotations: c.annotations.clone(),
        }
    }

    /// An event of `kind` for this pod.
    pub fn event(&self, kind: Kind, sandbox_id: &str) -> PodLifecycle {
        PodLifecycle {
            kind: kind as i32,
            pod_namespace: self.namespace.clone(),
            pod_name: self.name.clone(),
            pod_uid: self.uid.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            sandbox_id: sandbox_id.to_string(),
            observed_unix_ms: now_ms(),
            ..Default::default()
        }
    }
}

/// Sandbox id → pod, container id → sandbox id. Each lock is held for a
/// map operation only, never across a call.
#[derive(Debug, Default)]
pub struct Pods {
    sandboxes: Mutex<HashMap<String, Pod>>,
    containers: Mutex<HashMap<String, String>>,
}

impl Pods {
    pub fn add_sandbox(&self, id: &str, pod: Pod) {
        lock(&self.sandboxes).insert(id.to_string(), pod);
    }

    pub fn sandbox(&self, id: &str) -> Pod {
        lock(&self.sandboxes).get(id).cloned().unwrap_or_default()
    }

    pub fn remove_sandbox(&self, id: &str) -> Pod {
        lock(&self.containers).retain(|_, sb| sb != id);
        lock(&self.sandboxes).remove(id).unwrap_or_default()
    }

    pub fn add_container(&self, id: &str, sandbox_id: &str) {
        lock(&self.containers).insert(id.to_string(), sandbox_id.to_string());
    }

    /// The event for a container call: its pod if known.
    pub fn container_event(&self, kind: Kind, container_id: &str, forget: bool) -> PodLifecycle {
        let sandbox_id = {
            let mut c = lock(&self.containers);
            if forget {
                c.remove(container_id)
            } else {
                c.get(container_id).cloned()
            }
        }
        .unwrap_or_default();
        let mut ev = self.sandbox(&sandbox_id).event(kind, &sandbox_id);
        ev.container_id = container_id.to_string();
        ev
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
