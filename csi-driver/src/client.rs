//! `nodeplane-csictl`: a small CSI client for the quick start and manual
//! checks. Each subcommand is one CSI call over the driver's unix socket, as
//! the external-provisioner and the kubelet would make it; it prints the
//! answer on stdout and exits non-zero with the gRPC code on an error.
//!
//! It is not a CO: it keeps no state between calls (pass the volume id
//! CreateVolume printed to the later calls).

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::driver::parse_quantity;
use crate::{Error, Result};
use nodeplane_proto::csi as pb;
use pb::volume_capability::access_mode::Mode;

/// Flags of `nodeplane-csictl`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "nodeplane-csictl",
    about = "Make one CSI call to a nodeplane CSI driver"
)]
pub struct CtlArgs {
    /// The driver's endpoint, `unix:///PATH`.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/kubelet/plugins/csi.nodeplane.io/csi.sock"
    )]
    pub endpoint: String,
    #[command(subcommand)]
    pub call: Call,
}

/// Volume capability flags shared by the calls that take one.
#[derive(Debug, Clone, clap::Args)]
pub struct CapArgs {
    /// Filesystem of a mount volume ("" = the driver's default).
    #[arg(long, default_value = "")]
    pub fs_type: String,
    /// Access mode: single-node-writer, single-node-single-writer,
    /// single-node-multi-writer, single-node-reader-only.
    #[arg(long, default_value = "single-node-writer")]
    pub access_mode: String,
    /// A raw block volume instead of a mount.
    #[arg(long)]
    pub block: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Call {
    /// CreateVolume; prints the volume id.
    Create {
        name: String,
        /// Requested capacity (a quantity: 64Mi, 1Gi).
        #[arg(long, default_value = "1Gi")]
        size: String,
        /// StorageClass parameters, KEY=VALUE (repeatable), e.g. backend=image.
        #[arg(long = "param")]
        params: Vec<String>,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeStageVolume.
    Stage {
        volume_id: String,
        staging_path: PathBuf,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodePublishVolume.
    Publish {
        volume_id: String,
        staging_path: PathBuf,
        target_path: PathBuf,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeGetVolumeStats: bytes, inodes and the volume condition.
    Stats {
        volume_id: String,
        volume_path: PathBuf,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        volume_id: String,
        target_path: PathBuf,
    },
    /// NodeUnstageVolume.
    Unstage {
        volume_id: String,
        staging_path: PathBuf,
    },
    /// DeleteVolume.
    Delete { volume_id: String },
    /// GetCapacity of the default pool.
    Capacity,
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Rpc {
        call,
        code: format!("{:?}", s.code()),
        message: s.message().to_string(),
    }
}

/// Connects to a `unix://` endpoint.
pub async fn connect(endpoint: &str) -> Result<Channel> {
    let path = PathBuf::from(endpoint.strip_prefix("unix://").ok_or_else(|| {
        Error::Config(format!(
            "--endpoint `{endpoint}`: write unix:///path/csi.sock"
        ))
    })?);
    let ch = Endpoint::from_static("http://localhost")
        .timeout(Duration::from_secs(120))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| {
            Error::Config(format!(
                "connect to {endpoint}: {e} (is the driver running?)"
            ))
        })?;
    Ok(ch)
}

fn mode(s: &str) -> Result<Mode> {
    Ok(match s {
        "single-node-writer" => Mode::SingleNodeWriter,
        "single-node-single-writer" => Mode::SingleNodeSingleWriter,
        "single-node-multi-writer" => Mode::SingleNodeMultiWriter,
        "single-node-reader-only" => Mode::SingleNodeReaderOnly,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "--access-mode `{s}`: one of single-node-writer, single-node-single-writer, single-node-multi-writer, single-node-reader-only"
            )))
        }
    })
}

impl CapArgs {
    fn capability(&self) -> Result<pb::VolumeCapability> {
        use pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })
        };
        Ok(pb::VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(AccessMode {
                mode: mode(&self.access_mode)? as i32,
            }),
        })
    }
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Makes the call and returns what to print.
pub async fn run(args: CtlArgs) -> Result<String> {
    let ch = connect(&args.endpoint).await?;
    let mut ctl = pb::controller_client::ControllerClient::new(ch.clone());
    let mut node = pb::node_client::NodeClient::new(ch);
    Ok(match args.call {
        Call::Create {
            name,
            size,
            params,
            cap,
        } => {
            let bytes = parse_quantity(&size).ok_or_else(|| {
                Error::InvalidArgument(format!("--size `{size}` is not a quantity (e.g. 64Mi)"))
            })?;
            let mut parameters = std::collections::HashMap::new();
            for p in params {
                let (k, v) = p.split_once('=').ok_or_else(|| {
                    Error::InvalidArgument(format!("--param `{p}`: write KEY=VALUE"))
                })?;
                parameters.insert(k.to_string(), v.to_string());
            }
            let r = ctl
                .create_volume(pb::CreateVolumeRequest {
                    name,
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: bytes as i64,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap.capability()?],
                    parameters,
                    ..Default::default()
                })
                .await
                .map_err(rpc("CreateVolume"))?
                .into_inner();
            let v = r.volume.unwrap_or_default();
            format!("{}\t{} bytes", v.volume_id, v.capacity_bytes)
        }
        Call::Stage {
            volume_id,
            staging_path,
            cap,
        } => {
            node.node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id,
                staging_target_path: path(&staging_path),
                volume_capability: Some(cap.capability()?),
                ..Default::default()
            })
            .await
            .map_err(rpc("NodeStageVolume"))?;
            format!("staged at {}", staging_path.display())
        }
        Call::Publish {
            volume_id,
            staging_path,
            target_path,
            readonly,
            cap,
        } => {
            node.node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id,
                staging_target_path: path(&staging_path),
                target_path: path(&target_path),
                volume_capability: Some(cap.capability()?),
                readonly,
                ..Default::default()
            })
            .await
            .map_err(rpc("NodePublishVolume"))?;
            format!("published at {}", target_path.display())
        }
        Call::Stats {
            volume_id,
            volume_path,
        } => {
            let r = node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path(&volume_path),
                    staging_target_path: String::new(),
                })
                .await
                .map_err(rpc("NodeGetVolumeStats"))?
                .into_inner();
            let mut out = String::new();
            for u in &r.usage {
                let unit = match pb::volume_usage::Unit::try_from(u.unit) {
                    Ok(pb::volume_usage::Unit::Bytes) => "bytes",
                    Ok(pb::volume_usage::Unit::Inodes) => "inodes",
                    _ => "unknown",
                };
                out.push_str(&format!(
                    "{unit:<7} total {:>10}  used {:>10}  available {:>10}\n",
                    u.total, u.used, u.available
                ));
            }
            match r.volume_condition {
                Some(c) if c.abnormal => {
                    out.push_str(&format!("condition: ABNORMAL: {}", c.message))
                }
                Some(c) => out.push_str(&format!("condition: normal {}", c.message)),
                None => out.push_str("condition: not reported"),
            }
            out.trim_end().to_string()
        }
        Call::Unpublish {
            volume_id,
            target_path,
        } => {
            node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id,
                target_path: path(&target_path),
            })
            .await
            .map_err(rpc("NodeUnpublishVolume"))?;
            format!("unpublished {}", target_path.display())
        }
        Call::Unstage {
            volume_id,
            staging_path,
        } => {
            node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id,
                staging_target_path: path(&staging_path),
            })
            .await
            .map_err(rpc("NodeUnstageVolume"))?;
            format!("unstaged {}", staging_path.display())
        }
        Call::Delete { volume_id } => {
            ctl.delete_volume(pb::DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                secrets: Default::default(),
            })
            .await
            .map_err(rpc("DeleteVolume"))?;
            format!("deleted {volume_id}")
        }
        Call::Capacity => {
            let r = ctl
                .get_capacity(pb::GetCapacityRequest::default())
                .await
                .map_err(rpc("GetCapacity"))?
                .into_inner();
            format!("available {} bytes", r.available_capacity)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_modes_parse_and_bad_ones_are_named() {
        assert_eq!(
            mode("single-node-writer").expect("ok"),
            Mode::SingleNodeWriter
        );
        assert_eq!(
            mode("single-node-single-writer").expect("ok"),
            Mode::SingleNodeSingleWriter
        );
        let e = mode("rwx").expect_err("an error").to_string();
        assert!(e.contains("--access-mode `rwx`"), "{e}");
    }

    #[test]
    fn capability_mount_or_block() {
        let cap = CapArgs {
            fs_type: "ext4".into(),
            access_mode: "single-node-multi-writer".into(),
            block: false,
        }
        .capability()
        .expect("ok");
        match cap.access_type {
            Some(pb::volume_capability::AccessType::Mount(m)) => assert_eq!(m.fs_type, "ext4"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            cap.access_mode.expect("ok").mode,
            Mode::SingleNodeMultiWriter as i32
        );
        let cap = CapArgs {
            fs_type: String::new(),
            access_mode: "single-node-writer".into(),
            block: true,
        }
        .capability()
        .expect("ok");
        assert!(matches!(
            cap.access_type,
            Some(pb::volume_capability::AccessType::Block(_))
        ));
    }

    #[tokio::test]
    async fn endpoint_must_be_unix() {
        let e = connect("tcp://127.0.0.1:1")
            .await
            .expect_err("an error")
            .to_string();
        assert!(e.contains("unix:///"), "{e}");
    }
}
