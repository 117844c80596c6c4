//! The app runtime (nodeplane-runtime) inside the agent: its pod directory
//! built from the agent's model, its listeners, and the container → pod
//! map from the CRI shim's reports.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nodeplane_runtime::directory::{AppPod, Directory};
use nodeplane_runtime::{Options, Runtime};
use tokio::sync::watch;

use crate::config::RuntimeConfig;
use crate::lifecycle::Lifecycle;
use crate::model::{Model, PodKey};
use crate::{Error, Result};

/// The link that carries the runtime's address when no other link of the
/// node has it (this kernel has no dummy links; `lo` works everywhere).
pub const LINK: &str = "lo";

/// Local pods (attached on this node) and their addresses, from the CNI
/// plugin's reports.
pub fn local_pods(model: &Model) -> BTreeMap<PodKey, Vec<IpAddr>> {
    let mut out: BTreeMap<PodKey, Vec<IpAddr>> = BTreeMap::new();
    for a in model.attachments.values() {
        if let Some(k) = &a.pod {
            out.entry(k.clone())
                .or_default()
                .extend(a.ips.iter().copied());
        }
    }
    out
}

/// The runtime's directory: every pod the model knows, local ones with the
/// addresses the plugin gave them.
pub fn directory(
    model: &Model,
    local: &BTreeMap<PodKey, Vec<IpAddr>>,
    shim: Option<&Lifecycle>,
) -> Directory {
    let mut containers: BTreeMap<PodKey, Vec<String>> = BTreeMap::new();
    if let Some(shim) = shim {
        for p in shim.pods() {
            let v = containers
                .entry((p.namespace.clone(), p.name.clone()))
                .or_default();
            v.extend(p.containers.iter().cloned());
            if !p.sandbox_id.is_empty() {
                v.push(p.sandbox_id.clone());
            }
        }
    }
    let pods = model
        .apps
        .iter()
        .map(|(key, meta)| {
            let local_ips = local.get(key);
            AppPod {
                namespace: key.0.clone(),
                name: key.1.clone(),
                ips: local_ips.cloned().unwrap_or_else(|| meta.ips.clone()),
                ready: meta.ready,
                local: local_ips.is_some(),
                host_ip: meta.host_ip,
                containers: containers.remove(key).unwrap_or_default(),
                ..AppPod::default()
            }
            .with_annotations(&meta.annotations)
        })
        .collect();
    Directory::new(pods)
}

/// Answers the runtime's container lookups from the shim's reports.
#[derive(Debug)]
struct ShimContainers(Arc<Lifecycle>);

impl nodeplane_runtime::Containers for ShimContainers {
    fn pod_of(&self, id: &str) -> Option<(String, String)> {
        self.0
            .pods()
            .into_iter()
            .find(|p| p.sandbox_id == id || p.containers.contains(id))
            .map(|p| (p.namespace, p.name))
    }
}

/// Starts the runtime's listeners and component reader, with the
/// components of `cfg.components_dir` and, given a client (source `kube`),
/// of the API's `dapr.io` objects. Nothing here can
/// stop the agent: policy enforcement does not depend on the runtime, so a
/// listener that cannot be opened (or TLS material that cannot be read) is
/// logged, shown in /status (`runtime.problems`), and left out.
pub async fn start(
    cfg: &RuntimeConfig,
    state_dir: &std::path::Path,
    directory: watch::Receiver<Arc<Directory>>,
    shim: Arc<Lifecycle>,
    node_name: &str,
    api: Option<kube::Client>,
    secrets: Arc<dyn nodeplane_runtime::Secrets>,
) -> Arc<Runtime> {
    let connect_timeout = Duration::from_secs(2);
    let mut problems = Vec::new();
    let tls = match cfg.peer_listen {
        Some(_) => nodeplane_runtime::mesh::tls(&cfg.tls, &state_dir.join("tls"), node_name)
            .map_err(|e| problems.push(format!("no cross-node invocation: {e}")))
            .ok(),
        None => None,
    };
    let peers = match (&tls, cfg.peer_listen) {
        (Some(t), Some(l)) => Some(nodeplane_runtime::mesh::Peers::new(
            t,
            l.port(),
            connect_timeout,
        )),
        _ => None,
    };
    let rt = Runtime::new(
        Options {
            components_dir: cfg.components_dir.clone(),
            state_dir: state_dir.join("runtime"),
            invoke_timeout: cfg.invoke_timeout,
            connect_timeout,
        },
        directory,
        Some(Arc::new(ShimContainers(shim))),
        peers,
    );
    rt.set_secrets(secrets);
    let api = api.map(|client| {
        let (tx, rx) = watch::channel(Default::default());
        tokio::spawn(crate::source::dapr::run(client, tx));
        rx
    });
    let from_api = api.is_some();
    rt.start_components(Duration::from_millis(500), api).await;
    let sock = cfg.dir.join(nodeplane_runtime::SOCKET_NAME);
    match nodeplane_runtime::server::bind_unix(&sock) {
        Ok(unix) => {
            tokio::spawn(log_end(
                "app runtime socket",
                nodeplane_runtime::server::serve_unix(rt.clone(), unix),
            ));
        }
        Err(e) => problems.push(format!("no unix socket: {e}")),
    }
    if let Some(addr) = cfg.listen {
        match bind_tcp(addr).await {
            Ok(tcp) => {
                tokio::spawn(log_end(
                    "app runtime TCP listener",
                    nodeplane_runtime::server::serve_tcp(rt.clone(), tcp),
                ));
            }
            Err(e) => problems.push(format!("no TCP listener: {e}")),
        }
    }
    if let (Some(addr), Some(tls)) = (cfg.peer_listen, tls) {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tokio::spawn(log_end(
                    "app runtime peer listener",
                    nodeplane_runtime::mesh::serve(rt.clone(), l, tls),
                ));
            }
            Err(e) => problems.push(format!("no peer listener on {addr} (--peer-listen): {e}")),
        }
    }
    for p in problems {
        tracing::error!(problem = %p, "app runtime degraded");
        rt.report_problem(p);
    }
    let components_dir = cfg.components_dir.as_ref().map(|d| d.display().to_string());
    tracing::info!(socket = %sock.display(), listen = ?cfg.listen, peers = ?cfg.peer_listen, components_dir = components_dir.as_deref().unwrap_or("none"), components_from_api = from_api, "app runtime serving");
    rt
}

async fn log_end(
    what: &'static str,
    f: impl std::future::Future<Output = nodeplane_runtime::Result<()>>,
) {
    if let Err(e) = f.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

/// Binds `addr`; when no link of the node has the address yet, it is put
/// on `lo` first (the pods' gateway address is on no host link: the
/// plugin's host veths are unnumbered). A /32 (/128) on `lo` is local to
/// the node only; packets a pod sends to it through its veth are
/// delivered to this listener.
async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => return Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {}
        Err(e) => return Err(Error::io(format!("app runtime: listen on {addr}"), e)),
    }
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let cidr = format!("{}/{prefix}", addr.ip());
    let out = tokio::process::Command::new("ip")
        .args(["addr", "replace", &cidr, "dev", LINK])
        .output()
        .await
        .map_err(|e| Error::io("run ip (iproute2)", e))?;
    if !out.status.success() {
        return Err(Error::Config(format!(
            "app runtime: `ip addr replace {cidr} dev {LINK}` failed: {} (or pass --runtime-listen off)",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("app runtime: listen on {addr} (on {LINK})"), e))
}
