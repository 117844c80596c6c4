//! The plugin's side of the same-node fast path (crate `nodeplane-fastpath`):
//! ADD attaches the network's program to the new host veth and records the
//! pod's addresses; DEL and GC forget them.
//!
//! The fast path is an optimisation, so its failures never fail a verb: the
//! pod then simply takes the routed path, and the plugin's log line says why.
//!
//! Whether a pod may skip netfilter is not the plugin's to know when a policy
//! agent runs: nodeplane-agent marks the network as policed (a file in its
//! state directory, [`policed_marker`]) before it programs any policy, and
//! from then on the plugin records pods without the fast flag and the agent
//! sets it for pods no policy applies to. An agent socket that exists
//! without the marker counts as policed as well (see [`policed`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nodeplane_fastpath::{Instance, PodEntry};

use crate::config::NetConf;

/// The file nodeplane-agent leaves in a network's state directory once it
/// enforces NetworkPolicy there. It is never removed by a stopping agent: the
/// policy table outlives the agent's process, and so must the marker.
pub fn policed_marker(state_dir: &Path, network: &str) -> PathBuf {
    state_dir.join(network).join("policed-by-agent")
}

/// Whether an agent may be enforcing policy on this network, so that new
/// pods must not skip netfilter until it says so. The marker is the rule; an
/// agent socket without the marker is an agent that predates the fast path
/// (or has not started programming yet), and it gets the safe answer too:
/// it would never clear a flag it does not know about.
fn policed(conf: &NetConf) -> bool {
    policed_marker(&conf.state_dir, &conf.name).exists()
        || (!conf.agent_socket.as_os_str().is_empty() && conf.agent_socket.exists())
}

fn dir(conf: &NetConf) -> PathBuf {
    conf.state_dir.join(&conf.name)
}

/// After a successful wiring: attach and record. Returns a note for the log
/// when the fast path could not be set up.
pub fn attach(conf: &NetConf, ifindex: u32, ips: &[IpAddr], mac: [u8; 6]) -> Option<String> {
    if !conf.fast_path {
        return None;
    }
    if conf.bandwidth_limited {
        // Not attached at all: the bandwidth plugin adds its own ingress
        // qdisc to this veth (and refuses to share one), and packets to a
        // pod not in the pods map take the routed path, through its shaping.
        return Some("bandwidth limits requested: the pod uses the routed path".into());
    }
    let fast = !policed(conf);
    let done = Instance::find_or_create(&dir(conf)).and_then(|i| {
        // Addresses first: a packet the program takes must find both ends.
        for ip in ips {
            i.put_pod(*ip, PodEntry { ifindex, mac, fast })?;
        }
        i.attach(ifindex)
    });
    done.err()
        .map(|e| format!("{e}; the pod uses the routed path"))
}

/// After the host routes are gone (DEL, GC): forget the pod's addresses, so
/// no packet is handed to it any more.
pub fn detach(conf: &NetConf, ifindex: Option<u32>, ips: &[IpAddr]) -> Option<String> {
    let ifindex = ifindex?;
    let done = Instance::find(&dir(conf)).and_then(|found| {
        let Some(i) = found else { return Ok(()) };
        ips.iter().try_for_each(|ip| i.remove_pod(*ip, ifindex))
    });
    done.err().map(|e| e.to_string())
}
