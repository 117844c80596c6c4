//! Volume backends: where a volume's bytes live and how they are limited.
//!
//! `image`: a sparse file per volume, formatted ext4 or xfs, reached through
//! a loop device; the file size is the hard limit. `btrfs`: a subvolume per
//! volume limited by a qgroup. Both make snapshots and clones as
//! copy-on-write copies where the pool can (reflink, btrfs snapshot).

pub mod btrfs;
pub mod image;

use std::path::{Path, PathBuf};

use crate::model::Condition;
use crate::store::{BackendKind, SnapshotRecord, VolumeRecord};
use crate::Result;

/// What staging mounts: a block device (format + mount) or a directory
/// (bind mount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    Device(PathBuf),
    Dir(PathBuf),
}

pub const MIB: u64 = 1 << 20;

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;
    /// The filesystem a mount volume gets when the CO names none.
    fn default_fs(&self) -> &'static str;
    /// Whether `fs` ("" = block only) can be provisioned here.
    fn supports_fs(&self, fs: &str) -> bool;
    fn supports_block(&self) -> bool;
    /// Smallest volume for `fs` (mkfs.xfs refuses below 300 MiB).
    fn min_size(&self, fs: &str) -> u64;
    /// Makes the backing storage of `v` (formatted when `v.fs_type` is set).
    /// Anything left by an interrupted earlier attempt is replaced.
    fn create(&self, v: &VolumeRecord) -> Result<()>;
    /// Makes `v` as a copy of snapshot `s` (then grows it to `v.capacity`).
    fn restore(&self, v: &VolumeRecord, s: &SnapshotRecord) -> Result<()>;
    /// Makes `v` as a copy of volume `src`; `src_mount` is where `src` is
    /// mounted, if it is (it is frozen during the copy).
    fn clone_from(
        &self,
        v: &VolumeRecord,
        src: &VolumeRecord,
        src_mount: Option<&Path>,
    ) -> Result<()>;
    /// Removes the backing storage of volume `id`; already gone is fine.
    fn delete(&self, id: &str) -> Result<()>;
    /// Grows the backing storage to `bytes` (the filesystem is grown on the
    /// node, see `grow_fs`).
    fn expand(&self, v: &VolumeRecord, bytes: u64) -> Result<()>;
    fn snapshot(&self, v: &VolumeRecord, s: &SnapshotRecord, mount: Option<&Path>) -> Result<()>;
    fn delete_snapshot(&self, id: &str) -> Result<()>;
    /// Makes the volume reachable for staging (attaches the loop device).
    fn attach(&self, v: &VolumeRecord) -> Result<Attached>;
    /// Undoes `attach`; not attached is fine.
    fn detach(&self, id: &str) -> Result<()>;
    /// Bytes the volume occupies in the pool now.
    fn used(&self, v: &VolumeRecord) -> u64;
    /// Whether the backing storage is intact.
    fn condition(&self, v: &VolumeRecord) -> Condition;
    /// Bytes used by every volume on disk, by id (one pass, for capacity).
    fn usage(&self) -> std::collections::HashMap<String, u64>;
    /// Ids of the volumes and snapshots present on disk (for leak checks).
    fn on_disk(&self) -> (Vec<String>, Vec<String>);
}

/// A configured pool: a directory and the backends it offers (`image`
/// always; `btrfs` when the directory is on btrfs).
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub dir: PathBuf,
    pub image: image::Image,
    pub btrfs: Option<btrfs::Btrfs>,
}

impl Pool {
    pub fn open(name: &str, dir: &Path) -> Result<Pool> {
        let image = image::Image::open(dir)?;
        let btrfs = if crate::sys::files::is_btrfs(dir) {
            Some(btrfs::Btrfs::open(dir)?)
        } else {
            None
        };
        Ok(Pool {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            image,
            btrfs,
        })
    }

    /// The pool's default backend: btrfs where it can, else image.
    pub fn default_backend(&self) -> BackendKind {
        if self.btrfs.is_some() {
            BackendKind::Btrfs
        } else {
            BackendKind::Image
        }
    }

    pub fn backend(&self, kind: BackendKind) -> Option<&dyn Backend> {
        match kind {
            BackendKind::Image => Some(&self.image),
            BackendKind::Btrfs => self.btrfs.as_ref().map(|b| b as &dyn Backend),
        }
    }
}
