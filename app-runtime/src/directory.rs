//! Which pods run which app: the runtime's view of the agent's pod model,
//! published as an immutable snapshot whenever pods change.
//!
//! Identity comes only from here: a caller is the local pod whose address
//! the connection came from (anti-spoofing makes that unforgeable on the
//! pod's own veth) or whose container holds the socket's peer process.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Pod annotations the runtime reads (Dapr's keys, so existing manifests work).
pub const ANNOTATION_APP_ID: &str = "dapr.io/app-id";
pub const ANNOTATION_APP_PORT: &str = "dapr.io/app-port";
pub const ANNOTATION_CONFIG: &str = "dapr.io/config";

/// A pod as the runtime sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppPod {
    pub namespace: String,
    pub name: String,
    /// `dapr.io/app-id`; a pod without one can call but cannot be called,
    /// and cannot use app-scoped state.
    pub app_id: Option<String>,
    /// `dapr.io/app-port`: where the app listens for invocations.
    pub app_port: Option<u16>,
    /// `dapr.io/config`: the Configuration (access control) of this app.
    pub config: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Running and not reported unready.
    pub ready: bool,
    /// Attached on this node (the CNI plugin reported its interface).
    pub local: bool,
    /// The node's address (status.hostIP), for cross-node invocation.
    pub host_ip: Option<IpAddr>,
    /// Its sandbox and container ids (unix-socket callers are matched by
    /// the container id in their cgroup path).
    pub containers: Vec<String>,
}

impl AppPod {
    /// `namespace/name`, for messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Reads app id, port and configuration from annotations.
    pub fn with_annotations(mut self, annotations: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| {
            annotations
                .get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        self.app_id = get(ANNOTATION_APP_ID);
        self.app_port = get(ANNOTATION_APP_PORT).and_then(|p| p.parse().ok());
        self.config = get(ANNOTATION_CONFIG);
        self
    }
}

/// An immutable snapshot of the pods, indexed for the lookups per request.
#[derive(Debug, Default)]
pub struct Directory {
    pods: Vec<Arc<AppPod>>,
    /// Local pods by address (identity).
    by_ip: HashMap<IpAddr, usize>,
    /// Local pods by sandbox/container id (identity on the unix socket).
    by_container: HashMap<String, usize>,
    /// Local pods by (namespace, name).
    by_key: HashMap<(String, String), usize>,
    /// Ready, callable pods by (namespace, app id).
    by_app: HashMap<(String, String), Vec<usize>>,
    /// Round-robin position per app (shared by all snapshots would be
    /// nicer; per snapshot is enough to spread load).
    next: HashMap<(String, String), AtomicUsize>,
}

impl Directory {
    pub fn new(pods: Vec<AppPod>) -> Self {
        let mut d = Directory::default();
        for (i, p) in pods.into_iter().enumerate() {
            if p.local {
                for ip in &p.ips {
                    d.by_ip.insert(*ip, i);
                }
                for c in &p.containers {
                    d.by_container.insert(c.clone(), i);
                }
                d.by_key.insert((p.namespace.clone(), p.name.clone()), i);
            }
            if let (Some(app), true, Some(_)) = (&p.app_id, p.ready, p.app_port) {
                if !p.ips.is_empty() {
                    let key = (p.namespace.clone(), app.clone());
                    d.by_app.entry(key.clone()).or_default().push(i);
                    d.next.entry(key).or_insert_with(|| AtomicUsize::new(0));
                }
            }
            d.pods.push(Arc::new(p));
        }
        d
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The local pod that owns `ip`.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<AppPod>> {
        self.by_ip.get(&canonical(ip)).map(|&i| &self.pods[i])
    }

    /// The local pod that runs container (or sandbox) `id`.
    pub fn by_container(&self, id: &str) -> Option<&Arc<AppPod>> {
        self.by_container.get(id).map(|&i| &self.pods[i])
    }

    /// The local pod `namespace/name`.
    pub fn by_key(&self, namespace: &str, name: &str) -> Option<&Arc<AppPod>> {
        self.by_key
            .get(&(namespace.to_string(), name.to_string()))
            .map(|&i| &self.pods[i])
    }

    /// Every ready pod of `app` in `namespace`, starting at the next
    /// round-robin position (so callers that try them in order spread load
    /// and fail over).
    pub fn endpoints(&self, namespace: &str, app: &str) -> Vec<Arc<AppPod>> {
        let key = (namespace.to_string(), app.to_string());
        let Some(list) = self.by_app.get(&key) else {
            return Vec::new();
        };
        let start = self
            .next
            .get(&key)
            .map_or(0, |n| n.fetch_add(1, Ordering::Relaxed));
        (0..list.len())
            .map(|k| self.pods[list[(start + k) % list.len()]].clone())
            .collect()
    }

    /// Does any pod (ready or not) carry `app` in `namespace`?
    pub fn knows_app(&self, namespace: &str, app: &str) -> bool {
        self.pods
            .iter()
            .any(|p| p.namespace == namespace && p.app_id.as_deref() == Some(app))
    }

    /// Namespaces where `app` has ready pods.
    pub fn namespaces_of(&self, app: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_app
            .keys()
            .filter(|(_, a)| a == app)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    pub fn pods(&self) -> &[Arc<AppPod>] {
        &self.pods
    }
}

/// An IPv4 address as itself even when it arrived as IPv4-mapped IPv6
/// (a dual-stack listener reports v4 peers that way).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: Option<&str>, ip: &str, local: bool) -> AppPod {
        AppPod {
            namespace: "default".into(),
            name: name.into(),
            app_id: app.map(str::to_string),
            app_port: Some(8080),
            ips: vec![ip.parse().expect("ip")],
            ready: true,
            local,
            ..AppPod::default()
        }
    }

    #[test]
    fn identity_only_for_local_pods_and_round_robin_over_ready_ones() {
        let mut unready = pod("b3", Some("b"), "10.0.0.4", true);
        unready.ready = false;
        let d = Directory::new(vec![
            pod("a", Some("a"), "10.0.0.1", true),
            pod("b1", Some("b"), "10.0.0.2", true),
            pod("b2", Some("b"), "10.0.1.2", false),
            unready,
        ]);
        assert_eq!(
            d.by_ip("10.0.0.1".parse().expect("ip"))
                .map(|p| p.name.as_str()),
            Some("a")
        );
        // A remote pod's address is no identity here.
        assert!(d.by_ip("10.0.1.2".parse().expect("ip")).is_none());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert!(d.by_ip(mapped).is_some());
        let first: Vec<String> = d
            .endpoints("default", "b")
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let second: Vec<String> = d
            .endpoints("default", "b")
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(first.len(), 2);
        assert_ne!(first[0], second[0]);
        assert!(d.endpoints("other", "b").is_empty());
        assert!(d.knows_app("default", "b"));
    }

    #[test]
    fn annotations_give_app_id_port_and_config() {
        let a: BTreeMap<String, String> = [
            (ANNOTATION_APP_ID, "orders"),
            (ANNOTATION_APP_PORT, "8080"),
            (ANNOTATION_CONFIG, "acl"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let p = AppPod::default().with_annotations(&a);
        assert_eq!(p.app_id.as_deref(), Some("orders"));
        assert_eq!(p.app_port, Some(8080));
        assert_eq!(p.config.as_deref(), Some("acl"));
    }
}
