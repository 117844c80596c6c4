//! The synthetic cluster of the control-plane section: namespaces, pods
//! with varied labels and named ports, and a mix of NetworkPolicies, written
//! as a manifests directory (one file of pods and one of policies per
//! namespace, as `kubectl get -o yaml` per namespace would give), plus the
//! plugin's attachment records for the pods that run on this node.
//!
//! Pod `k` (0-based) lives in namespace `k / pods_per_ns` and is labelled
//! `app=app-<w mod 25>`, `tier=<web|api|db|cache by w mod 4>`,
//! `track=<canary when w mod 10 = 0, else stable>` where `w` is its index in
//! its namespace. Local pods are spread evenly over the pod indexes and get
//! addresses in this node's range; the rest are peers on other nodes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use nodeplane_cni::ipam::Record;
use serde_json::{json, Value};

/// This node's pod range (room for 1,024 local pods).
pub const LOCAL_CIDR: &str = "10.244.0.0/22";
const TIERS: [&str; 4] = ["web", "api", "db", "cache"];

#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<Ipv4Addr>,
    pub local: bool,
    pub tier: &'static str,
}

impl Pod {
    pub fn container_id(&self) -> String {
        format!("bench-{}-{}", self.namespace, self.name)
    }

    /// A host-side interface name like the plugin's (np + 12 hex digits).
    pub fn host_ifname(&self) -> String {
        host_ifname(&self.container_id())
    }

    fn object(&self) -> Value {
        let mut ports = vec![
            json!({"name": "http", "containerPort": 8080, "protocol": "TCP"}),
            json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
        ];
        if self.tier == "db" {
            ports.push(json!({"name": "db", "containerPort": 5432, "protocol": "TCP"}));
        }
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {
                "nodeName": if self.local { crate::agent::NODE_NAME } else { "node-2" },
                "containers": [{"name": "main", "image": "registry.local/app:1", "ports": ports}],
            },
        });
        if let Some(ip) = self.ip {
            pod["status"] = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
        } else {
            pod["status"] = json!({"phase": "Pending"});
        }
        pod
    }
}

pub fn host_ifname(container_id: &str) -> String {
    // FNV-1a of the id, 48 bits: unique enough for a few thousand pods.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("np{:012x}", h & 0xffff_ffff_ffff)
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub namespaces: Vec<String>,
    pub pods: Vec<Pod>,
    /// Pods scheduled here but not started (no address, not attached):
    /// the single-ADD measurement attaches them one at a time.
    pub pending: Vec<Pod>,
    pub policies: Vec<Value>,
}

/// The i-th address of this node's range (skipping .0 and .1).
pub fn local_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 2)) + i as u32)
}

/// The i-th address on the other nodes (10.244.64.0/18).
fn remote_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 64, 2)) + i as u32)
}

impl Workload {
    pub fn new(
        pods: usize,
        namespaces: usize,
        policies_per_ns: usize,
        local: usize,
        pending: usize,
    ) -> Self {
        let per_ns = pods.div_ceil(namespaces);
        let namespaces: Vec<String> = (0..namespaces).map(|i| format!("ns-{i:02}")).collect();
        let local = local.min(pods);
        let (mut n_local, mut n_remote) = (0, 0);
        let mut out = Vec::with_capacity(pods);
        for k in 0..pods {
            // Spread local pods evenly: pod k is local when the running
            // share of locals steps up at k.
            let is_local = (k + 1) * local / pods > k * local / pods;
            let ip = if is_local {
                n_local += 1;
                local_ip(n_local - 1)
            } else {
                n_remote += 1;
                remote_ip(n_remote - 1)
            };
            out.push(pod(
                &namespaces[k / per_ns],
                format!("p-{k:04}"),
                k % per_ns,
                Some(ip),
                is_local,
            ));
        }
        let pending = (0..pending)
            .map(|i| {
                pod(
                    &namespaces[i % namespaces.len()],
                    format!("pending-{i:02}"),
                    i,
                    None,
                    true,
                )
            })
            .collect();
        let mut policies = Vec::new();
        for (i, ns) in namespaces.iter().enumerate() {
            for j in 0..policies_per_ns {
                policies.push(policy(ns, i, j, namespaces.len()));
            }
        }
        Workload {
            namespaces,
            pods: out,
            pending,
            policies,
        }
    }

    pub fn local_count(&self) -> usize {
        self.pods.iter().filter(|p| p.local).count()
    }

    /// Every file of the manifests directory: (name, YAML).
    pub fn files(&self) -> Result<Vec<(String, String)>, String> {
        let mut files = Vec::new();
        let ns: Vec<Value> = self
            .namespaces
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {
                    "team": format!("team-{}", i % 5),
                    "env": if i % 3 == 0 { "staging" } else { "prod" },
                }}})
            })
            .collect();
        files.push(("00-namespaces.yaml".to_string(), yaml(&ns)?));
        for i in 0..self.namespaces.len() {
            files.push(self.pod_file(i)?);
        }
        for n in &self.namespaces {
            let docs: Vec<Value> = self
                .policies
                .iter()
                .filter(|p| p["metadata"]["namespace"] == n.as_str())
                .cloned()
                .collect();
            files.push((format!("policies-{n}.yaml"), yaml(&docs)?));
        }
        Ok(files)
    }

    /// The pods file of namespace `i` (what one label change rewrites).
    pub fn pod_file(&self, i: usize) -> Result<(String, String), String> {
        let n = &self.namespaces[i];
        let docs: Vec<Value> = self
            .pods
            .iter()
            .chain(&self.pending)
            .filter(|p| &p.namespace == n)
            .map(Pod::object)
            .collect();
        Ok((format!("pods-{n}.yaml"), yaml(&docs)?))
    }

    pub fn namespace_index(&self, ns: &str) -> usize {
        self.namespaces.iter().position(|n| n == ns).unwrap_or(0)
    }

    /// The plugin's record of a local pod's attachment.
    pub fn record(pod: &Pod, ip: Ipv4Addr) -> Record {
        Record {
            container_id: pod.container_id(),
            ifname: "eth0".into(),
            ips: vec![IpAddr::V4(ip)],
            host_interface: pod.host_ifname(),
            netns: None,
            pod_namespace: Some(pod.namespace.clone()),
            pod_name: Some(pod.name.clone()),
        }
    }

    /// Writes the attachment records of every local pod into the plugin's
    /// state directory for `network`, as nodeplane-cni's ADD leaves them.
    pub fn write_records(&self, cni_state: &Path) -> Result<(), String> {
        for p in self.pods.iter().filter(|p| p.local) {
            let ip = p.ip.ok_or("local pod without address")?;
            write_record(cni_state, &Workload::record(p, ip))?;
        }
        Ok(())
    }
}

/// Writes one record (atomically: the agent re-reads records every 10 s).
pub fn write_record(cni_state: &Path, r: &Record) -> Result<(), String> {
    let store =
        nodeplane_cni::ipam::Store::open(cni_state, "nodeplane").map_err(|e| e.to_string())?;
    let dir = store.dir().join("attachments");
    // No ':' in the temporary name: the store's scan skips it.
    let tmp = dir.join(format!(".tmp-{}", r.container_id));
    let json = serde_json::to_vec(r).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, json).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(format!("{}:{}", r.container_id, r.ifname)))
        .map_err(|e| format!("rename record: {e}"))
}

pub fn remove_record(cni_state: &Path, r: &Record) {
    let path = cni_state
        .join("nodeplane")
        .join("attachments")
        .join(format!("{}:{}", r.container_id, r.ifname));
    let _ = std::fs::remove_file(path);
}

fn pod(namespace: &str, name: String, w: usize, ip: Option<Ipv4Addr>, local: bool) -> Pod {
    let tier = TIERS[w % 4];
    let labels: BTreeMap<String, String> = [
        ("app", format!("app-{:02}", w % 25)),
        ("tier", tier.to_string()),
        (
            "track",
            if w.is_multiple_of(10) {
                "canary"
            } else {
                "stable"
            }
            .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Pod {
        namespace: namespace.to_string(),
        name,
        labels,
        ip,
        local,
        tier,
    }
}

/// Policy `j` of namespace `i` (of `nns`). The mix, per 25 policies of a
/// namespace: a default deny or allow-same-namespace (j=0), 12 by app from
/// tier=web on 8080 and a named port (1-12), 5 by app from tier=api pods of
/// another team's namespaces on 5432 (13-17), 3 with ipBlocks with an
/// exception on 443/TCP and 8443/UDP (18-20), 2 egress policies to prod
/// namespaces' pods by matchExpressions on a port range plus DNS anywhere
/// (21-22), one from tier=web pods of every namespace on 8080-8090 (23) and
/// one from every pod of the next namespace (24). Beyond 25 the mix repeats.
fn policy(ns: &str, i: usize, j: usize, nns: usize) -> Value {
    let name = format!("np-{j:02}");
    let app = |n: usize| format!("app-{:02}", n % 25);
    let spec = match j % 25 {
        0 if i.is_multiple_of(2) => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        0 => json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        1..=12 => json!({
            "podSelector": {"matchLabels": {"app": app(j)}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                "ports": [{"protocol": "TCP", "port": 8080}, {"port": "metrics"}],
            }],
        }),
        13..=17 => json!({
            "podSelector": {"matchLabels": {"app": app(j)}},
            "ingress": [{
                "from": [{
                    "namespaceSelector": {"matchLabels": {"team": format!("team-{}", (i + j) % 5)}},
                    "podSelector": {"matchLabels": {"tier": "api"}},
                }],
                "ports": [{"protocol": "TCP", "port": 5432}],
            }],
        }),
        18..=20 => json!({
            "podSelector": {"matchLabels": {"app": app(j)}},
            "ingress": [{
                "from": [
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}},
                    {"ipBlock": {"cidr": format!("192.168.{}.0/24", (i * 3 + j) % 256)}},
                ],
                "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 8443}],
            }],
        }),
        21 | 22 => json!({
            "podSelector": {"matchLabels": {"tier": if j % 25 == 21 { "web" } else { "api" }}},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{
                        "namespaceSelector": {"matchLabels": {"env": "prod"}},
                        "podSelector": {"matchExpressions": [{
                            "key": "app", "operator": "In",
                            "values": [app(i), app(i + 1), app(i + 2)],
                        }]},
                    }],
                    "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}],
                },
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
            ],
        }),
        23 => json!({
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api", "db"]}]},
            "ingress": [{
                "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}],
            }],
        }),
        _ => json!({
            "podSelector": {"matchLabels": {"track": "canary"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": format!("ns-{:02}", (i + 1) % nns),
            }}}]}],
        }),
    };
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// Multi-document YAML.
pub fn yaml(docs: &[Value]) -> Result<String, String> {
    serde_saphyr::to_string_multiple(docs).map_err(|e| format!("YAML: {e}"))
}
