//! Restart reconcile: metadata against what is on disk and in the kernel.
//!
//! - `Creating` records (a kill -9 between the intent and completion): the
//!   partial storage and the record are removed; the CO's retry makes the
//!   volume again.
//! - `Deleting` records: the deletion is finished.
//! - An interrupted expansion (`expanding_to`) is redone (it is idempotent).
//! - Storage on disk with no record at all is removed (a leak).
//! - Staged and published volumes get their loop device and mounts back
//!   (after a reboot, or after someone unmounted them).
//! - Loop devices on pool images that no staged volume needs are detached.
//! - Staged filesystems left frozen by an interrupted snapshot or clone are
//!   thawed.
//! - btrfs qgroups left by a deletion interrupted before its qgroup went
//!   are cleared.

use super::Driver;
use crate::store::State;
use crate::Result;

impl Driver {
    pub(super) fn reconcile(&self) -> Result<()> {
        let vols: Vec<_> = self.store().volumes.values().cloned().collect();
        for mut v in vols {
            let backend = self.backend_of(&v)?;
            if let Some(s) = v.staged.as_ref().filter(|s| !s.block) {
                let p = std::path::Path::new(&s.path);
                if v.backend == crate::store::BackendKind::Image
                    && crate::sys::mount::at(p).is_some()
                {
                    crate::backend::image::thaw(p);
                }
            }
            match v.state {
                State::Creating | State::Deleting => {
                    tracing::warn!(volume = %v.id, state = ?v.state, "finishing an interrupted create/delete: removing its storage");
                    backend.delete(&v.id)?;
                    self.store().remove_volume(&v.id)?;
                    continue;
                }
                State::Ready => {}
            }
            if let Some(n) = v.expanding_to {
                tracing::warn!(volume = %v.id, bytes = n, "finishing an interrupted expansion");
                backend.expand(&v, n)?;
                v.capacity = n;
                v.expanding_to = None;
                v.fs_grow_pending =
                    !v.fs_type.is_empty() && v.backend == crate::store::BackendKind::Image;
                self.store().put_volume(v.clone())?;
            }
            if let Some(s) = v.staged.clone() {
                let before = v.clone();
                if let Err(e) = self.ensure_staged(&mut v, &s) {
                    tracing::error!(volume = %v.id, error = %e, "cannot restore the staged mount");
                    continue;
                }
                if v != before {
                    self.store().put_volume(v.clone())?;
                }
                for (t, p) in v.published.clone() {
                    if let Err(e) = self.ensure_published(&v, &t, &p) {
                        tracing::error!(volume = %v.id, target = %t, error = %e, "cannot restore a published mount");
                    }
                }
            }
        }
        let snaps: Vec<_> = self.store().snapshots.values().cloned().collect();
        for s in snaps {
            if s.state != State::Ready {
                tracing::warn!(snapshot = %s.id, "removing an interrupted snapshot");
                if let Some(b) = self.pool(Some(&s.pool))?.backend(s.backend) {
                    b.delete_snapshot(&s.id)?;
                }
                self.store().remove_snapshot(&s.id)?;
            }
        }
        // Leaks: storage with no record.
        for pool in &self.pools {
            if let Some(b) = &pool.btrfs {
                b.clear_stale_qgroups()?;
            }
            for kind in [
                crate::store::BackendKind::Image,
                crate::store::BackendKind::Btrfs,
            ] {
                let Some(b) = pool.backend(kind) else {
                    continue;
                };
                let (vols, snaps) = b.on_disk();
                let st = self.store();
                let leaked_v: Vec<_> = vols
                    .into_iter()
                    .filter(|id| !st.volumes.contains_key(id))
                    .collect();
                let leaked_s: Vec<_> = snaps
                    .into_iter()
                    .filter(|id| !st.snapshots.contains_key(id))
                    .collect();
                drop(st);
                for id in leaked_v {
                    tracing::warn!(pool = %pool.name, volume = %id, "removing storage with no metadata");
                    b.delete(&id)?;
                }
                for id in leaked_s {
                    tracing::warn!(pool = %pool.name, snapshot = %id, "removing a snapshot with no metadata");
                    b.delete_snapshot(&id)?;
                }
            }
            // Loop devices nobody needs (a crash between attach and record).
            let st = self.store();
            let needed: Vec<String> = st
                .volumes
                .values()
                .filter(|v| v.staged.is_some() && v.pool == pool.name)
                .map(|v| pool.image.path(&v.id).to_string_lossy().into_owned())
                .collect();
            drop(st);
            for (dev, file) in crate::sys::loopdev::under(&pool.dir.join("images")) {
                if !needed.contains(&file) {
                    tracing::warn!(device = %dev.display(), file = %file, "detaching a loop device no staged volume uses");
                    let _ = crate::sys::loopdev::detach(&dev);
                }
            }
        }
        Ok(())
    }
}
