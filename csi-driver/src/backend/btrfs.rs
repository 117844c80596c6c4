//! The `btrfs` backend: `<pool>/subvolumes/<id>`, a subvolume per volume,
//! limited by a qgroup (a write past the limit fails with EDQUOT); no loop
//! device. Snapshots (`<pool>/btrfs-snapshots/<id>`, read-only) and clones
//! are btrfs snapshots: instant and copy-on-write.

use std::path::{Path, PathBuf};

use super::{Attached, Backend, MIB};
use crate::crash;
use crate::model::Condition;
use crate::store::{BackendKind, SnapshotRecord, VolumeRecord};
use crate::sys::{cmd, files};
use crate::{Error, Result};

#[derive(Debug)]
pub struct Btrfs {
    pool: PathBuf,
    subvolumes: PathBuf,
    snapshots: PathBuf,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Btrfs {
    /// Opens a btrfs pool and turns quotas on (idempotent; needed for the
    /// size limits).
    pub fn open(pool: &Path) -> Result<Btrfs> {
        let subvolumes = pool.join("subvolumes");
        let snapshots = pool.join("btrfs-snapshots");
        for d in [&subvolumes, &snapshots] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        }
        cmd::run("btrfs", &["quota", "enable", &s(pool)])?;
        Ok(Btrfs {
            pool: pool.to_path_buf(),
            subvolumes,
            snapshots,
        })
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.subvolumes.join(id)
    }

    fn snap_path(&self, id: &str) -> PathBuf {
        self.snapshots.join(id)
    }

    /// Deletes the subvolume at `path` and its qgroup; absent is fine.
    /// The qgroup can only go once the kernel has dropped the subvolume:
    /// until then destroy says EBUSY and the qgroup stays behind as
    /// `<stale>` (seen on this project's 6.18 kernel, which removes it by
    /// itself only some of the time). So the deletion is committed and
    /// waited for first; that also makes the pool's free space (GetCapacity)
    /// include the volume's bytes when DeleteVolume returns. `after_delete`
    /// is the crash point between the two steps.
    fn delete_subvolume(&self, path: &Path, after_delete: impl FnOnce()) -> Result<()> {
        if !path.exists() {
            return Ok(());
        }
        let rootid = cmd::run("btrfs", &["inspect-internal", "rootid", &s(path)])
            .ok()
            .map(|o| o.trim().to_string());
        cmd::run(
            "btrfs",
            &["subvolume", "delete", "--commit-after", &s(path)],
        )?;
        after_delete();
        if let Some(id) = rootid {
            cmd::run("btrfs", &["subvolume", "sync", &s(&self.pool), &id])?;
            // Already removed by the kernel is fine.
            let _ = cmd::run(
                "btrfs",
                &["qgroup", "destroy", &format!("0/{id}"), &s(&self.pool)],
            );
        }
        files::sync_dir(path.parent().unwrap_or(&self.pool))
    }

    /// Removes qgroups whose subvolume is gone (left by a crash between a
    /// subvolume's deletion and its qgroup's), at start. Only when there
    /// are some does it wait for the kernel to finish dropping deleted
    /// subvolumes (their qgroups cannot go before).
    pub fn clear_stale_qgroups(&self) -> Result<()> {
        let pool = s(&self.pool);
        let shown = cmd::run("btrfs", &["qgroup", "show", "--raw", &pool])?;
        if !shown.contains("<stale>") {
            return Ok(());
        }
        tracing::warn!(pool = %pool, "removing qgroups of deleted subvolumes");
        cmd::run("btrfs", &["filesystem", "sync", &pool])?;
        cmd::run("btrfs", &["subvolume", "sync", &pool])?;
        if let Err(e) = cmd::run("btrfs", &["qgroup", "clear-stale", &pool]) {
            // Exit 1 when one could not go yet: it goes at the next start.
            tracing::warn!(pool = %pool, error = %e, "some stale qgroups remain");
        }
        Ok(())
    }

    fn limit(path: &Path, bytes: u64) -> Result<()> {
        cmd::run("btrfs", &["qgroup", "limit", &bytes.to_string(), &s(path)]).map(|_| ())
    }

    /// Bytes referenced by the subvolume at `path` (its qgroup's count).
    pub fn referenced(path: &Path) -> Option<u64> {
        let out = cmd::run("btrfs", &["qgroup", "show", "--raw", "-r", "-f", &s(path)]).ok()?;
        out.lines()
            .find(|l| l.starts_with("0/"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Backend for Btrfs {
    fn kind(&self) -> BackendKind {
        BackendKind::Btrfs
    }
    fn default_fs(&self) -> &'static str {
        "btrfs"
    }
    fn supports_fs(&self, fs: &str) -> bool {
        fs == "btrfs"
    }
    fn supports_block(&self) -> bool {
        false
    }
    fn min_size(&self, _fs: &str) -> u64 {
        MIB
    }

    fn create(&self, v: &VolumeRecord) -> Result<()> {
        let p = self.path(&v.id);
        self.delete_subvolume(&p, || {})?;
        cmd::run("btrfs", &["subvolume", "create", &s(&p)])?;
        crash::point("create:btrfs:after-subvolume");
        Self::limit(&p, v.capacity)?;
        files::sync_dir(&self.subvolumes)
    }

    fn restore(&self, v: &VolumeRecord, snap: &SnapshotRecord) -> Result<()> {
        let p = self.path(&v.id);
        self.delete_subvolume(&p, || {})?;
        cmd::run(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                &s(&self.snap_path(&snap.id)),
                &s(&p),
            ],
        )?;
        crash::point("restore:btrfs:after-snapshot");
        Self::limit(&p, v.capacity)?;
        files::sync_dir(&self.subvolumes)
    }

    fn clone_from(
        &self,
        v: &VolumeRecord,
        src: &VolumeRecord,
        _mount: Option<&Path>,
    ) -> Result<()> {
        let p = self.path(&v.id);
        self.delete_subvolume(&p, || {})?;
        cmd::run(
            "btrfs",
            &["subvolume", "snapshot", &s(&self.path(&src.id)), &s(&p)],
        )?;
        crash::point("clone:btrfs:after-snapshot");
        Self::limit(&p, v.capacity)?;
        files::sync_dir(&self.subvolumes)
    }

    fn delete(&self, id: &str) -> Result<()> {
        self.delete_subvolume(&self.path(id), || {
            crash::point("delete:btrfs:after-subvolume-delete")
        })
    }

    fn expand(&self, v: &VolumeRecord, bytes: u64) -> Result<()> {
        Self::limit(&self.path(&v.id), bytes)
    }

    fn snapshot(&self, v: &VolumeRecord, snap: &SnapshotRecord, _m: Option<&Path>) -> Result<()> {
        let dst = self.snap_path(&snap.id);
        self.delete_subvolume(&dst, || {})?;
        cmd::run(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                "-r",
                &s(&self.path(&v.id)),
                &s(&dst),
            ],
        )?;
        files::sync_dir(&self.snapshots)
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.delete_subvolume(&self.snap_path(id), || {
            crash::point("delete-snapshot:btrfs:after-subvolume-delete")
        })
    }

    fn attach(&self, v: &VolumeRecord) -> Result<Attached> {
        let p = self.path(&v.id);
        if !p.is_dir() {
            return Err(Error::FailedPrecondition(format!(
                "volume {}: subvolume {} is missing",
                v.id,
                p.display()
            )));
        }
        Ok(Attached::Dir(p))
    }

    fn detach(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    fn used(&self, v: &VolumeRecord) -> u64 {
        Self::referenced(&self.path(&v.id)).unwrap_or(0)
    }

    fn usage(&self) -> std::collections::HashMap<String, u64> {
        // One `qgroup show` for the whole pool: its Path column names the
        // subvolume ("subvolumes/<id>").
        let mut out = std::collections::HashMap::new();
        if let Ok(text) = cmd::run("btrfs", &["qgroup", "show", "--raw", "-r", &s(&self.pool)]) {
            for l in text.lines().filter(|l| l.starts_with("0/")) {
                let f: Vec<&str> = l.split_whitespace().collect();
                if let (Some(r), Some(p)) = (f.get(1), f.last()) {
                    if let (Ok(r), Some(id)) = (r.parse::<u64>(), p.strip_prefix("subvolumes/")) {
                        out.insert(id.to_string(), r);
                    }
                }
            }
        }
        out
    }

    fn condition(&self, v: &VolumeRecord) -> Condition {
        let p = self.path(&v.id);
        if p.is_dir() {
            Condition::ok()
        } else {
            Condition::abnormal(format!("subvolume {} is missing", p.display()))
        }
    }

    fn on_disk(&self) -> (Vec<String>, Vec<String>) {
        let ids = |d: &Path| -> Vec<String> {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        (ids(&self.subvolumes), ids(&self.snapshots))
    }
}
