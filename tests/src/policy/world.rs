//! The e2e pod world on real network namespaces: nine pods (x, y, z × a, b,
//! c), each wired by some CNI attach step, each running a probe server.

use std::net::Ipv4Addr;
use std::path::Path;

use super::matrix::SERVED_PORTS;
use super::oracle::{Cluster, PodRef};
use super::probe::{ProbePod, ProbeServer};
use crate::fixture::{ip_of, Node};
use crate::Netns;

/// One wired pod: its identity, its namespace (deleted on drop), its IPv4.
#[derive(Debug)]
pub struct PodNet {
    pub pod: PodRef,
    pub netns: Netns,
    pub ip: Ipv4Addr,
}

/// The nine e2e pods on real namespaces, with the matching [`Cluster`].
/// Dropping it stops the probe servers, then deletes the namespaces.
#[derive(Debug)]
pub struct World {
    /// The cluster facts (labels, ports, the real pod IPs). Scenario label
    /// changes are applied to a copy ([`super::scenarios::Scenario::cluster_after`]).
    pub cluster: Cluster,
    pub pods: Vec<PodNet>,
    servers: Vec<ProbeServer>,
}

impl World {
    /// Creates a namespace per pod and wires it with `attach`, which
    /// returns the pod's IPv4 address (e.g. a CNI ADD). Pods are created
    /// in matrix order: x/a, x/b, x/c, y/a, ...
    pub fn create(mut attach: impl FnMut(&PodRef, &Netns) -> Ipv4Addr) -> World {
        let mut pods = Vec::new();
        for r in Cluster::xyz_synthetic().pod_refs() {
            let netns = Netns::new(&format!("np{}{}", r.namespace, r.name));
            let ip = attach(&r, &netns);
            pods.push(PodNet { pod: r, netns, ip });
        }
        let cluster = Cluster::xyz(|r| {
            pods.iter()
                .find(|p| &p.pod == r)
                .map(|p| p.ip)
                .expect("every pod was wired")
        });
        World {
            cluster,
            pods,
            servers: Vec::new(),
        }
    }

    /// The world wired by nodeplane-cni on `node` (container IDs
    /// `pod-<ns>-<name>`; give the node a pod CIDR such as 10.244.0.0/24).
    pub fn on_node(node: &Node) -> World {
        World::create(|r, ns| {
            let res = node.add(&container_id(r), ns);
            ip_of(&res, 0)
                .parse()
                .unwrap_or_else(|e| panic!("pod {r}: IPv4 address from {res}: {e}"))
        })
    }

    /// Starts `np-probe-server` (path `bin`) in every pod on TCP and UDP
    /// ports 80 and 81, returning once all of them listen.
    pub fn start_servers(&mut self, bin: &Path) {
        self.start_servers_on(bin, &SERVED_PORTS);
    }

    /// Like [`World::start_servers`] on other ports.
    pub fn start_servers_on(&mut self, bin: &Path, ports: &[u16]) {
        for p in &self.pods {
            let s = ProbeServer::start(bin, &p.netns.path(), &p.pod.to_string(), ports)
                .unwrap_or_else(|e| panic!("probe server in {}: {e}", p.pod));
            self.servers.push(s);
        }
    }

    /// What the prober needs.
    pub fn probe_pods(&self) -> Vec<ProbePod> {
        self.pods
            .iter()
            .map(|p| ProbePod {
                pod: p.pod.clone(),
                netns: p.netns.path(),
                ip: p.ip,
            })
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Servers first, so nothing runs in a namespace being deleted.
        self.servers.clear();
    }
}

/// The container ID [`World::on_node`] uses for a pod.
pub fn container_id(r: &PodRef) -> String {
    format!("pod-{}-{}", r.namespace, r.name)
}
