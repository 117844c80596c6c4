//! `nodeplane-agent csi ...`: the flags of the standalone CSI driver (also
//! used when the agent serves CSI beside its other work).

use std::path::PathBuf;

use crate::driver::{parse_quantity, DriverConfig, GIB};
use crate::{Error, Result};

pub const DEFAULT_DRIVER: &str = "csi.nodeplane.io";

/// Flags of `nodeplane-agent csi`.
#[derive(Debug, Clone, clap::Args)]
pub struct CsiArgs {
    /// The CSI endpoint, `unix:///PATH` (default
    /// unix:///var/lib/kubelet/plugins/<driver-name>/csi.sock).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,
    /// This node's id (NodeGetInfo, topology); default: the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_id: Option<String>,
    /// Where volume and snapshot metadata live.
    #[arg(
        long,
        env = "NODEPLANE_CSI_STATE_DIR",
        default_value = "/var/lib/nodeplane/csi"
    )]
    pub state_dir: PathBuf,
    /// A volume pool: `DIR` or `NAME=DIR` (repeatable; the first is the
    /// default). On btrfs it offers backends btrfs and image, elsewhere image.
    #[arg(
        long = "pool",
        env = "NODEPLANE_CSI_POOLS",
        value_delimiter = ',',
        required = true
    )]
    pub pools: Vec<String>,
    /// The driver name (GetPluginInfo, the StorageClass provisioner).
    #[arg(long, env = "NODEPLANE_CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER)]
    pub driver_name: String,
    /// Serve kubelet plugin registration in this directory
    /// (e.g. /var/lib/kubelet/plugins_registry); off when unset.
    #[arg(long, env = "NODEPLANE_CSI_REGISTRATION_DIR")]
    pub registration_dir: Option<PathBuf>,
    /// Size of a volume whose request names none (a quantity, e.g. 1Gi).
    #[arg(long, default_value = "1Gi")]
    pub default_size: String,
    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_volumes: u64,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct CsiConfig {
    pub socket: PathBuf,
    pub registration_socket: Option<PathBuf>,
    pub driver: DriverConfig,
}

impl CsiArgs {
    pub fn resolve(self) -> Result<CsiConfig> {
        let socket = match &self.endpoint {
            None => PathBuf::from(format!(
                "/var/lib/kubelet/plugins/{}/csi.sock",
                self.driver_name
            )),
            Some(e) => PathBuf::from(e.strip_prefix("unix://").ok_or_else(|| {
                Error::Config(format!(
                    "--endpoint `{e}`: only unix sockets are served, write unix:///path/csi.sock"
                ))
            })?),
        };
        if !socket.is_absolute() {
            return Err(Error::Config(format!(
                "--endpoint: {} is not absolute (unix:///abs/path)",
                socket.display()
            )));
        }
        let node_id = self
            .node_id
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        let mut pools = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            let (name, dir) = match p.split_once('=') {
                Some((n, d)) => (n.to_string(), PathBuf::from(d)),
                None if i == 0 => ("default".to_string(), PathBuf::from(p)),
                None => (
                    PathBuf::from(p)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| format!("pool{i}")),
                    PathBuf::from(p),
                ),
            };
            if pools.iter().any(|(n, _): &(String, PathBuf)| *n == name) {
                return Err(Error::Config(format!("--pool: two pools are named {name}")));
            }
            pools.push((name, dir));
        }
        let default_size = parse_quantity(&self.default_size).ok_or_else(|| {
            Error::Config(format!(
                "--default-size `{}` is not a quantity (e.g. 1Gi)",
                self.default_size
            ))
        })?;
        let registration_socket = self
            .registration_dir
            .map(|d| d.join(format!("{}-reg.sock", self.driver_name)));
        Ok(CsiConfig {
            socket,
            registration_socket,
            driver: DriverConfig {
                name: self.driver_name,
                version: env!("CARGO_PKG_VERSION").to_string(),
                node_id,
                state_dir: self.state_dir,
                pools,
                default_size: if default_size == 0 { GIB } else { default_size },
                max_volumes: self.max_volumes,
            },
        })
    }
}
