//! Domain types: what the driver works with, free of protobuf. `convert`
//! maps the wire messages onto these (checking REQUIRED fields there).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A topology segment map (`topology.nodeplane.io/node` → node id).
pub type Topology = BTreeMap<String, String>;

/// How a workload reaches the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessType {
    /// A filesystem mounted at the target path.
    Mount {
        /// Empty: the pool's default (ext4 for `image`, btrfs for `btrfs`).
        fs_type: String,
        mount_flags: Vec<String>,
        /// VOLUME_MOUNT_GROUP: the volume's root is made group-owned and
        /// group-writable (setgid) by this gid.
        mount_group: Option<u32>,
    },
    /// The raw block device at the target path.
    Block,
}

/// CSI access modes (VolumeCapability.AccessMode.Mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Node-local volumes can be offered only in single-node modes.
    pub fn single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access, AccessType::Block)
    }
}

/// Requested bytes; 0 means "not set" in both fields, as on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    pub required: u64,
    pub limit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    pub requisite: Vec<Topology>,
    pub preferred: Vec<Topology>,
}

/// A provisioned volume as the CO sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: String,
    pub capacity: u64,
    pub context: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    pub topology: Topology,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub source_volume: String,
    pub size: u64,
    pub created_unix_nanos: i128,
    pub ready: bool,
}

#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    pub name: String,
    pub source_volume: String,
    pub parameters: BTreeMap<String, String>,
}

/// A page of a list and the token of the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub entries: Vec<T>,
    pub next_token: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub max_entries: usize,
    pub starting_token: Option<String>,
    pub source_volume: Option<String>,
    pub snapshot_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    pub fn ok() -> Condition {
        Condition {
            abnormal: false,
            message: "volume is healthy".into(),
        }
    }
    pub fn abnormal(message: impl Into<String>) -> Condition {
        Condition {
            abnormal: true,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VolumeStatus {
    pub volume: VolumeInfo,
    pub published_nodes: Vec<String>,
    pub condition: Condition,
}

#[derive(Debug, Clone, Default)]
pub struct CapacityQuery {
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    pub topology: Option<Topology>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub available: u64,
    pub maximum_volume_size: u64,
    pub minimum_volume_size: u64,
}

#[derive(Debug, Clone)]
pub struct Expand {
    pub volume_id: String,
    pub capacity: CapacityRange,
    pub capability: Option<Capability>,
}

#[derive(Debug, Clone)]
pub struct Expanded {
    pub capacity: u64,
    pub node_expansion_required: bool,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub volume_id: String,
    pub staging_path: String,
    pub capability: Capability,
    pub context: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Publish {
    pub volume_id: String,
    pub staging_path: Option<String>,
    pub target_path: String,
    pub capability: Capability,
    pub readonly: bool,
    pub context: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct NodeExpand {
    pub volume_id: String,
    pub volume_path: String,
    pub capacity: CapacityRange,
    pub staging_path: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_used: u64,
    pub bytes_available: u64,
    /// None for raw block volumes (no inodes).
    pub inodes: Option<(u64, u64, u64)>,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub usage: Usage,
    pub condition: Condition,
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_volumes: u64,
    pub topology: Topology,
}
