//! The CSI services as domain traits: plain Rust types in, `Result` out,
//! blocking (they run mkfs, losetup and mount). `grpc` adapts any
//! implementation to the generated tonic services.

use std::collections::BTreeMap;

use crate::model::*;
use crate::Result;

pub trait Identity {
    /// (driver name, version)
    fn plugin_info(&self) -> (String, String);
    /// Ready once the restart reconcile has finished.
    fn probe(&self) -> bool;
}

pub trait Controller {
    fn create_volume(&self, r: CreateVolume) -> Result<VolumeInfo>;
    /// Unknown or already deleted: Ok.
    fn delete_volume(&self, id: &str) -> Result<()>;
    /// `Ok(None)`: confirmed; `Ok(Some(why))`: not confirmed.
    fn validate_capabilities(
        &self,
        id: &str,
        context: &BTreeMap<String, String>,
        caps: &[Capability],
        params: &BTreeMap<String, String>,
    ) -> Result<Option<String>>;
    fn list_volumes(&self, f: ListFilter) -> Result<Page<VolumeStatus>>;
    fn get_volume(&self, id: &str) -> Result<VolumeStatus>;
    fn capacity(&self, q: CapacityQuery) -> Result<Capacity>;
    fn create_snapshot(&self, r: CreateSnapshot) -> Result<SnapshotInfo>;
    /// Unknown or already deleted: Ok.
    fn delete_snapshot(&self, id: &str) -> Result<()>;
    fn list_snapshots(&self, f: ListFilter) -> Result<Page<SnapshotInfo>>;
    fn expand_volume(&self, r: Expand) -> Result<Expanded>;
}

pub trait Node {
    fn stage(&self, r: Stage) -> Result<()>;
    /// Unknown volume or not staged: Ok.
    fn unstage(&self, id: &str, staging_path: &str) -> Result<()>;
    fn publish(&self, r: Publish) -> Result<()>;
    /// Unknown volume or not published: Ok.
    fn unpublish(&self, id: &str, target_path: &str) -> Result<()>;
    fn stats(&self, id: &str, path: &str) -> Result<Stats>;
    fn expand(&self, r: NodeExpand) -> Result<u64>;
    fn info(&self) -> NodeInfo;
}
