//! Durable metadata: one JSON file per volume and per snapshot under
//! `<state-dir>/volumes` and `<state-dir>/snapshots`, each written atomically.
//!
//! A record is written in state `Creating` (the intent) before any backing
//! storage exists and becomes `Ready` only after it is complete; deletion
//! writes `Deleting` first. A restart finishes or undoes whatever a kill -9
//! interrupted (see `driver::reconcile`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::ContentSource;
use crate::sys::files;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Image,
    Btrfs,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Image => "image",
            BackendKind::Btrfs => "btrfs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Intent recorded; backing storage may be partly made.
    Creating,
    Ready,
    /// Deletion started; backing storage may be partly gone.
    Deleting,
}

/// Where and how a volume is staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub path: String,
    pub block: bool,
    pub mount_flags: Vec<String>,
    #[serde(default)]
    pub mount_group: Option<u32>,
}

/// One published target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub readonly: bool,
    pub block: bool,
    pub mount_flags: Vec<String>,
    /// Published with SINGLE_NODE_SINGLE_WRITER: no second target allowed.
    #[serde(default)]
    pub single_writer: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub pool: String,
    pub backend: BackendKind,
    /// "" while unformatted (created for block access only).
    pub fs_type: String,
    pub capacity: u64,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    pub state: State,
    pub created_unix_nanos: u64,
    /// Set before the backing storage grows, cleared after.
    #[serde(default)]
    pub expanding_to: Option<u64>,
    /// The filesystem is smaller than the device (restored or expanded):
    /// grow it when next mounted.
    #[serde(default)]
    pub fs_grow_pending: bool,
    /// An ephemeral inline volume: deleted at NodeUnpublish.
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default)]
    pub staged: Option<Staged>,
    #[serde(default)]
    pub published: BTreeMap<String, Published>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub source_volume: String,
    pub pool: String,
    pub backend: BackendKind,
    pub fs_type: String,
    pub size: u64,
    pub created_unix_nanos: u64,
    pub state: State,
}

/// The in-memory index over the files, kept equal to them.
#[derive(Debug)]
pub struct Store {
    vol_dir: PathBuf,
    snap_dir: PathBuf,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub snapshots: BTreeMap<String, SnapshotRecord>,
}

fn load<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            // A write interrupted before its rename: the old file (if any) is intact.
            let _ = std::fs::remove_file(&p);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .map_err(|e| Error::io(format!("read {}", p.display()), e))?;
        out.push(serde_json::from_str(&text).map_err(|e| Error::Metadata {
            path: p.display().to_string(),
            message: format!("{e} (the file was not written by this driver version?)"),
        })?);
    }
    Ok(out)
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store> {
        let vol_dir = state_dir.join("volumes");
        let snap_dir = state_dir.join("snapshots");
        for d in [&vol_dir, &snap_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        }
        let volumes = load::<VolumeRecord>(&vol_dir)?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let snapshots = load::<SnapshotRecord>(&snap_dir)?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        Ok(Store {
            vol_dir,
            snap_dir,
            volumes,
            snapshots,
        })
    }

    pub fn put_volume(&mut self, v: VolumeRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(&v).map_err(|e| Error::Metadata {
            path: v.id.clone(),
            message: e.to_string(),
        })?;
        files::write_atomic(&self.vol_dir.join(format!("{}.json", v.id)), &data)?;
        self.volumes.insert(v.id.clone(), v);
        Ok(())
    }

    pub fn remove_volume(&mut self, id: &str) -> Result<()> {
        files::remove_durable(&self.vol_dir.join(format!("{id}.json")))?;
        self.volumes.remove(id);
        Ok(())
    }

    pub fn put_snapshot(&mut self, s: SnapshotRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(&s).map_err(|e| Error::Metadata {
            path: s.id.clone(),
            message: e.to_string(),
        })?;
        files::write_atomic(&self.snap_dir.join(format!("{}.json", s.id)), &data)?;
        self.snapshots.insert(s.id.clone(), s);
        Ok(())
    }

    pub fn remove_snapshot(&mut self, id: &str) -> Result<()> {
        files::remove_durable(&self.snap_dir.join(format!("{id}.json")))?;
        self.snapshots.remove(id);
        Ok(())
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.name == name)
    }

    pub fn snapshot_by_name(&self, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.values().find(|s| s.name == name)
    }
}
