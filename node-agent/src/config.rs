//! Agent configuration: a YAML (or JSON) file, then environment variables,
//! then flags, each overriding the one before.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::nft::FailMode;
use crate::{Error, Result};

/// Command line and environment (every flag has a NODEPLANE_* variable).
#[derive(Debug, Parser, Default)]
#[command(name = "nodeplane-agent", version, about = "The nodeplane node agent")]
pub struct Args {
    /// `csi`: serve only the CSI driver (see the README's "CSI driver").
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (YAML or JSON, camelCase keys as in the README).
    #[arg(long, env = "NODEPLANE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (the Node whose podCIDRs are used).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where desired state comes from: `manifests` (standalone) or `kube`.
    #[arg(long, env = "NODEPLANE_SOURCE")]
    pub source: Option<SourceKind>,
    /// The manifests directory (source `manifests`).
    #[arg(long, env = "NODEPLANE_MANIFESTS_DIR")]
    pub manifests_dir: Option<PathBuf>,
    /// API server URL (source `kube`); default: in-cluster or kubeconfig.
    #[arg(long, env = "NODEPLANE_KUBE_API")]
    pub kube_api: Option<String>,
    /// The agent's own state directory.
    #[arg(long, env = "NODEPLANE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The local API socket the CNI plugin talks to.
    #[arg(long, env = "NODEPLANE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Address of /healthz, /readyz, /metrics and /status.
    #[arg(long, env = "NODEPLANE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The CNI plugin's state directory (its `stateDir`).
    #[arg(long, env = "NODEPLANE_CNI_STATE_DIR")]
    pub cni_state_dir: Option<PathBuf>,
    /// CNI network names whose attachments the agent reconciles.
    #[arg(long = "network", env = "NODEPLANE_NETWORKS", value_delimiter = ',')]
    pub networks: Vec<String>,
    /// The node's pod CIDRs, when no Node object supplies them.
    #[arg(long = "pod-cidr", env = "NODEPLANE_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<String>,
    /// `isolate` (default) or `open`: what a pod not yet programmed gets.
    #[arg(long, env = "NODEPLANE_FAIL_MODE")]
    pub fail_mode: Option<FailModeArg>,
    /// The nftables table (family inet) the agent owns.
    #[arg(long, env = "NODEPLANE_TABLE")]
    pub table: Option<String>,
    /// Host-side pod interface prefix (the plugin's hostInterfacePrefix).
    #[arg(long, env = "NODEPLANE_IFACE_PREFIX")]
    pub iface_prefix: Option<String>,
    /// `human` or `json`.
    #[arg(long, env = "NODEPLANE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// A tracing filter, e.g. `info` or `nodeplane_agent=debug`.
    #[arg(long, env = "NODEPLANE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Worker threads of the agent's async runtime (default 1). One worker
    /// keeps a proxied invocation's tasks on one thread: with two, the
    /// cross-thread wake-ups cost 10-25% more CPU per request (measured
    /// with runtime-bench). Raise it on nodes that proxy more than a core's
    /// worth of requests (about 10,000/s).
    #[arg(long, env = "NODEPLANE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Also serve the CSI driver with these pools (`DIR` or `NAME=DIR`),
    /// with state in <state-dir>/csi (see `csi --help`).
    #[arg(
        long = "csi-pool",
        env = "NODEPLANE_AGENT_CSI_POOLS",
        value_delimiter = ','
    )]
    pub csi_pools: Vec<String>,
    /// With --csi-pool: the kubelet plugin-registration directory.
    #[arg(long, env = "NODEPLANE_AGENT_CSI_REGISTRATION_DIR")]
    pub csi_registration_dir: Option<PathBuf>,
    /// With --csi-pool: the CSI endpoint, `unix:///PATH` (default
    /// unix:///var/lib/kubelet/plugins/csi.nodeplane.io/csi.sock).
    #[arg(long, env = "NODEPLANE_AGENT_CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// The app runtime's TCP address, which pods reach through their own
    /// veth (default 169.254.1.1:3500, the pods' IPv4 gateway, put on
    /// `lo` when no link has it); `off` for the unix socket only.
    #[arg(long, env = "NODEPLANE_RUNTIME_LISTEN")]
    pub runtime_listen: Option<String>,
    /// Directory of the app runtime's socket (`runtime.sock`), the one the
    /// CRI shim mounts into containers.
    #[arg(long, env = "NODEPLANE_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// A directory of Dapr Component and Configuration manifests. Default
    /// with source `manifests`: the manifests directory; with source
    /// `kube`: none (components come from the API's dapr.io objects; given,
    /// the directory is read too, and its definitions come first).
    #[arg(long, env = "NODEPLANE_COMPONENTS_DIR")]
    pub components_dir: Option<PathBuf>,
    /// Do not serve the app runtime at all.
    #[arg(long, env = "NODEPLANE_NO_RUNTIME")]
    pub no_runtime: bool,
    /// Where other nodes' agents reach this one for cross-node invocation
    /// (mutual TLS; default 0.0.0.0:3501); `off` for same-node only.
    #[arg(long, env = "NODEPLANE_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// The cluster CA certificate (PEM) that node certificates chain to
    /// (default: one generated in <state-dir>/tls on first start).
    #[arg(long, env = "NODEPLANE_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// The CA's key: the agent issues its own node certificate from it.
    #[arg(long, env = "NODEPLANE_PEER_CA_KEY")]
    pub peer_ca_key: Option<PathBuf>,
    /// How long an invocation waits for the target app's response headers.
    #[arg(long, env = "NODEPLANE_INVOKE_TIMEOUT_MS")]
    pub invoke_timeout_ms: Option<u64>,
    /// This node's certificate and key (PEM), issued by --peer-ca.
    #[arg(long, env = "NODEPLANE_PEER_CERT")]
    pub peer_cert: Option<PathBuf>,
    #[arg(long, env = "NODEPLANE_PEER_KEY")]
    pub peer_key: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve only the CSI driver (node-local volumes) on a unix socket.
    Csi(nodeplane_csi::CsiArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Manifests,
    Kube,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailModeArg {
    Isolate,
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// The file's keys: the same settings, camelCase.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    node_name: Option<String>,
    source: Option<SourceKind>,
    manifests_dir: Option<PathBuf>,
    kube_api: Option<String>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    cni_state_dir: Option<PathBuf>,
    networks: Option<Vec<String>>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
    fail_mode: Option<FailModeArg>,
    table: Option<String>,
    iface_prefix: Option<String>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    worker_threads: Option<usize>,
    runtime_listen: Option<String>,
    runtime_dir: Option<PathBuf>,
    components_dir: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub source: SourceKind,
    pub manifests_dir: PathBuf,
    pub kube_api: Option<String>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: SocketAddr,
    pub cni_state_dir: PathBuf,
    pub networks: Vec<String>,
    pub pod_cidrs: Vec<ipnetwork::IpNetwork>,
    pub fail_mode: FailMode,
    pub table: String,
    pub iface_prefix: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub worker_threads: usize,
    /// Serve CSI beside the agent's other work (empty: off).
    pub csi_pools: Vec<String>,
    pub csi_registration_dir: Option<PathBuf>,
    /// None: the kubelet's default path for the driver.
    pub csi_endpoint: Option<String>,
    /// The app runtime (None: not served).
    pub runtime: Option<RuntimeConfig>,
}

/// Where the app runtime serves and reads its components.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// None: unix socket only.
    pub listen: Option<SocketAddr>,
    pub dir: PathBuf,
    /// Manifests read besides (source `kube`) or instead of (source
    /// `manifests`) the API's; None: none.
    pub components_dir: Option<PathBuf>,
    /// Agent-to-agent listener (None: no cross-node invocation).
    pub peer_listen: Option<SocketAddr>,
    pub invoke_timeout: std::time::Duration,
    pub tls: nodeplane_runtime::mesh::TlsSources,
}

/// The pods' IPv4 gateway (the CNI plugin's default) on Dapr's port.
pub const DEFAULT_RUNTIME_LISTEN: &str = "169.254.1.1:3500";

impl Config {
    /// Resolves flags and environment over the file named by `--config`.
    pub fn resolve(args: Args) -> Result<Config> {
        let file: File = match &args.config {
            None => File::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::io(format!("read config {}", path.display()), e))?;
                serde_saphyr::from_str(&text).map_err(|e| {
                    Error::Config(format!(
                        "{}: {e} (keys are camelCase, see the README)",
                        path.display()
                    ))
                })?
            }
        };
        let node_name = args
            .node_name
            .or(file.node_name)
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        let pick_vec = |a: Vec<String>, f: Option<Vec<String>>| {
            if a.is_empty() {
                f.unwrap_or_default()
            } else {
                a
            }
        };
        let pod_cidrs = pick_vec(args.pod_cidrs, file.pod_cidrs)
            .iter()
            .map(|c| {
                c.parse::<ipnetwork::IpNetwork>().map_err(|e| {
                    Error::Config(format!(
                        "podCIDRs: `{c}` is not a CIDR ({e}); write e.g. 10.244.0.0/24"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut networks = pick_vec(args.networks, file.networks);
        if networks.is_empty() {
            networks.push("nodeplane".into());
        }
        let table = args
            .table
            .or(file.table)
            .unwrap_or_else(|| "nodeplane".into());
        if table.is_empty()
            || !table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::Config(format!(
                "table `{table}`: use letters, digits, `_` and `-` only"
            )));
        }
        let iface_prefix = args
            .iface_prefix
            .or(file.iface_prefix)
            .unwrap_or_else(|| "np".into());
        if iface_prefix.is_empty() || iface_prefix.len() > 3 || iface_prefix.contains(['"', '*']) {
            return Err(Error::Config(format!(
                "ifacePrefix `{iface_prefix}`: 1 to 3 characters, the same as the plugin's hostInterfacePrefix"
            )));
        }
        let source = args.source.or(file.source).unwrap_or(SourceKind::Manifests);
        let manifests_dir = args
            .manifests_dir
            .or(file.manifests_dir)
            .unwrap_or_else(|| "/etc/nodeplane/manifests".into());
        let runtime = if args.no_runtime {
            None
        } else {
            let listen = args
                .runtime_listen
                .or(file.runtime_listen)
                .unwrap_or_else(|| DEFAULT_RUNTIME_LISTEN.into());
            let listen = match listen.trim() {
                "off" => None,
                l => Some(l.parse::<SocketAddr>().map_err(|e| {
                    Error::Config(format!(
                        "runtimeListen `{l}` is not an address:port ({e}); e.g. {DEFAULT_RUNTIME_LISTEN}, or `off`"
                    ))
                })?),
            };
            let peer_listen = match args.peer_listen.as_deref().map(str::trim) {
                Some("off") => None,
                None => Some(SocketAddr::from((
                    [0, 0, 0, 0],
                    nodeplane_runtime::mesh::DEFAULT_PEER_PORT,
                ))),
                Some(l) => Some(l.parse::<SocketAddr>().map_err(|e| {
                    Error::Config(format!(
                        "--peer-listen `{l}` is not an address:port ({e}); e.g. 0.0.0.0:3501, or `off`"
                    ))
                })?),
            };
            let invoke_timeout = match args.invoke_timeout_ms {
                Some(0) => {
                    return Err(Error::Config(
                        "--invoke-timeout-ms must be at least 1".into(),
                    ))
                }
                Some(ms) => std::time::Duration::from_millis(ms),
                None => std::time::Duration::from_secs(60),
            };
            Some(RuntimeConfig {
                peer_listen,
                invoke_timeout,
                tls: nodeplane_runtime::mesh::TlsSources {
                    ca_cert: args.peer_ca,
                    ca_key: args.peer_ca_key,
                    cert: args.peer_cert,
                    key: args.peer_key,
                },
                listen,
                dir: args
                    .runtime_dir
                    .or(file.runtime_dir)
                    .unwrap_or_else(|| "/run/nodeplane/runtime".into()),
                components_dir: args
                    .components_dir
                    .or(file.components_dir)
                    .or_else(|| (source == SourceKind::Manifests).then(|| manifests_dir.clone())),
            })
        };
        let worker_threads = match args.worker_threads.or(file.worker_threads) {
            Some(0) => {
                return Err(Error::Config(
                    "workerThreads (--worker-threads) must be at least 1".into(),
                ))
            }
            Some(n) => n,
            None => 1,
        };
        Ok(Config {
            node_name,
            source,
            manifests_dir,
            kube_api: args.kube_api.or(file.kube_api),
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/nodeplane/agent".into()),
            socket: args
                .socket
                .or(file.socket)
                .unwrap_or_else(|| "/run/nodeplane/agent.sock".into()),
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9650))),
            cni_state_dir: args
                .cni_state_dir
                .or(file.cni_state_dir)
                .unwrap_or_else(|| "/var/lib/nodeplane/cni".into()),
            networks,
            pod_cidrs,
            fail_mode: match args.fail_mode.or(file.fail_mode) {
                Some(FailModeArg::Open) => FailMode::Open,
                _ => FailMode::Isolate,
            },
            table,
            iface_prefix,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            log_level: args
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            worker_threads,
            csi_pools: args.csi_pools,
            csi_registration_dir: args.csi_registration_dir,
            csi_endpoint: args.csi_endpoint,
            runtime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_flags_are_checked_and_errors_name_the_flag() {
        let bad = |args: Args, want: &str| {
            let e = Config::resolve(args).expect_err("must be refused");
            assert!(e.to_string().contains(want), "{e}");
        };
        bad(
            Args {
                runtime_listen: Some("169.254.1.1".into()),
                ..Args::default()
            },
            "runtimeListen `169.254.1.1`",
        );
        bad(
            Args {
                peer_listen: Some("everywhere".into()),
                ..Args::default()
            },
            "--peer-listen `everywhere`",
        );
        bad(
            Args {
                invoke_timeout_ms: Some(0),
                ..Args::default()
            },
            "--invoke-timeout-ms",
        );
        bad(
            Args {
                worker_threads: Some(0),
                ..Args::default()
            },
            "--worker-threads",
        );
        let off = Config::resolve(Args {
            runtime_listen: Some("off".into()),
            peer_listen: Some("off".into()),
            ..Args::default()
        })
        .expect("off is allowed");
        let rt = off.runtime.expect("runtime still on (socket only)");
        assert_eq!((rt.listen, rt.peer_listen), (None, None));
        let none = Config::resolve(Args {
            no_runtime: true,
            ..Args::default()
        })
        .expect("no runtime");
        assert!(none.runtime.is_none());
    }

    #[test]
    fn components_dir_defaults_to_the_manifests_only_in_manifests_mode() {
        let dir_of = |args: Args| {
            Config::resolve(args)
                .expect("resolves")
                .runtime
                .expect("runtime on")
                .components_dir
        };
        assert_eq!(
            dir_of(Args {
                manifests_dir: Some("/m".into()),
                ..Args::default()
            }),
            Some(PathBuf::from("/m"))
        );
        assert_eq!(
            dir_of(Args {
                source: Some(SourceKind::Kube),
                manifests_dir: Some("/m".into()),
                ..Args::default()
            }),
            None
        );
        assert_eq!(
            dir_of(Args {
                source: Some(SourceKind::Kube),
                components_dir: Some("/c".into()),
                ..Args::default()
            }),
            Some(PathBuf::from("/c"))
        );
    }

    #[test]
    fn flags_override_file_and_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("np-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("c.yaml");
        std::fs::write(
            &path,
            "nodeName: n1\ntable: t1\npodCIDRs: [10.1.0.0/24]\nfailMode: open\n",
        )
        .expect("write");
        let c = Config::resolve(Args {
            config: Some(path.clone()),
            table: Some("t2".into()),
            ..Args::default()
        })
        .expect("resolves");
        assert_eq!((c.node_name.as_str(), c.table.as_str()), ("n1", "t2"));
        assert_eq!(c.fail_mode, FailMode::Open);
        assert_eq!(c.pod_cidrs.len(), 1);
        std::fs::write(&path, "tabel: x\n").expect("write");
        let e = Config::resolve(Args {
            config: Some(path.clone()),
            ..Args::default()
        })
        .expect_err("typo");
        assert!(e.to_string().contains("tabel"), "{e}");
        std::fs::write(&path, "podCIDRs: [10.1.0.0/33]\n").expect("write");
        let e = Config::resolve(Args {
            config: Some(path),
            ..Args::default()
        })
        .expect_err("bad cidr");
        assert!(e.to_string().contains("10.1.0.0/33"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
