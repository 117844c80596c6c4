//! Node service: staging (loop device + mount, or bind of a subvolume),
//! publishing (bind mounts; raw block as a bind of the loop device node),
//! stats and condition, node-side expansion, ephemeral inline volumes.

use std::path::{Path, PathBuf};

use super::{parse_quantity, Driver, EPHEMERAL_KEY};
use crate::backend::image::{grow_fs, grow_fs_offline, mkfs};
use crate::backend::Attached;
use crate::crash;
use crate::model::*;
use crate::service::{Identity, Node};
use crate::store::{BackendKind, Published, Staged, State, VolumeRecord};
use crate::sys::{files, loopdev, mount};
use crate::{Error, Result};

fn mount_parts(c: &Capability) -> (Vec<String>, Option<u32>, String) {
    match &c.access {
        AccessType::Mount {
            mount_flags,
            mount_group,
            fs_type,
        } => (mount_flags.clone(), *mount_group, fs_type.clone()),
        AccessType::Block => (vec![], None, String::new()),
    }
}

/// VOLUME_MOUNT_GROUP / fsGroup: the volume root becomes group `gid`,
/// group-writable, setgid (new files inherit the group).
fn apply_group(root: &Path, gid: Option<u32>) -> Result<()> {
    let Some(gid) = gid else { return Ok(()) };
    std::os::unix::fs::chown(root, None, Some(gid))
        .map_err(|e| Error::io(format!("chown {} to group {gid}", root.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o2775))
        .map_err(|e| Error::io(format!("chmod {}", root.display()), e))
}

impl Driver {
    fn record(&self, id: &str) -> Result<VolumeRecord> {
        self.store()
            .volumes
            .get(id)
            .filter(|v| v.state == State::Ready)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
    }

    /// Makes the staged mount (or, for block, the loop device) exist:
    /// used by NodeStageVolume and by the restart reconcile.
    pub(super) fn ensure_staged(&self, v: &mut VolumeRecord, s: &Staged) -> Result<()> {
        let backend = self.backend_of(v)?;
        let att = backend.attach(v)?;
        if matches!(att, Attached::Device(_)) {
            crash::point("stage:image:after-attach");
        }
        if s.block {
            return Ok(());
        }
        let target = Path::new(&s.path);
        if !target.exists() {
            std::fs::create_dir_all(target)
                .map_err(|e| Error::io(format!("create staging path {}", s.path), e))?;
        }
        if let Some(m) = mount::at(target) {
            let ours = match &att {
                Attached::Device(d) => m.source == d.to_string_lossy(),
                Attached::Dir(_) => m.root.ends_with(&format!("/{}", v.id)),
            };
            if !ours {
                return Err(Error::FailedPrecondition(format!(
                    "staging path {} already has {} mounted (not volume {})",
                    s.path, m.source, v.id
                )));
            }
        } else {
            match &att {
                Attached::Device(dev) => {
                    if v.fs_type.is_empty() {
                        // Created for block access, now mounted: format once.
                        v.fs_type = "ext4".into();
                        mkfs(dev, &v.fs_type)?;
                    }
                    if v.fs_grow_pending {
                        if loopdev::size(dev) < v.capacity {
                            loopdev::refresh_capacity(dev)?;
                        }
                        if grow_fs_offline(&v.fs_type, dev)? {
                            v.fs_grow_pending = false;
                        }
                    }
                    let mut flags = s.mount_flags.clone();
                    if v.fs_type == "xfs" {
                        // Snapshots and clones carry their source's UUID; xfs
                        // refuses a second mount with the same one.
                        flags.push("nouuid".into());
                    }
                    mount::mount_fs(dev, target, &v.fs_type, &flags)?;
                }
                Attached::Dir(dir) => mount::bind(dir, target, false, &s.mount_flags)?,
            }
        }
        if v.fs_grow_pending {
            if let Attached::Device(dev) = &att {
                if loopdev::size(dev) < v.capacity {
                    loopdev::refresh_capacity(dev)?;
                }
                grow_fs(&v.fs_type, dev, target)?;
            }
            v.fs_grow_pending = false;
        }
        apply_group(target, s.mount_group)
    }

    /// Makes the published bind mount at `target` exist.
    pub(super) fn ensure_published(
        &self,
        v: &VolumeRecord,
        target: &str,
        p: &Published,
    ) -> Result<()> {
        let staged = v
            .staged
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {} is not staged", v.id)))?;
        let t = Path::new(target);
        if mount::at(t).is_some() {
            return Ok(());
        }
        if p.block {
            let dev = match self.backend_of(v)?.attach(v)? {
                Attached::Device(d) => d,
                Attached::Dir(_) => {
                    return Err(Error::InvalidArgument(format!(
                        "volume {} has no block device",
                        v.id
                    )))
                }
            };
            if !t.exists() {
                std::fs::File::create(t)
                    .map_err(|e| Error::io(format!("create block target {target}"), e))?;
            }
            mount::bind(&dev, t, p.readonly, &[])
        } else {
            std::fs::create_dir_all(t)
                .map_err(|e| Error::io(format!("create target {target}"), e))?;
            mount::bind(Path::new(&staged.path), t, p.readonly, &p.mount_flags)
        }
    }

    fn ephemeral_publish(&self, r: &Publish) -> Result<()> {
        let id = &r.volume_id;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::InvalidArgument(format!(
                "ephemeral volume id `{id}` must be letters, digits, '-', '_' and '.'"
            )));
        }
        let mut params = r.context.clone();
        params.remove(EPHEMERAL_KEY);
        let size = match params.get("size") {
            None => 0,
            Some(q) => parse_quantity(q).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "volumeAttributes size `{q}` is not a quantity (e.g. 1Gi)"
                ))
            })?,
        };
        let req = CreateVolume {
            name: format!("ephemeral:{id}"),
            capacity: CapacityRange {
                required: size,
                limit: 0,
            },
            capabilities: vec![r.capability.clone()],
            parameters: params,
            source: None,
            requisite: vec![],
            preferred: vec![],
        };
        self.provision(id.clone(), &req, true)?;
        crash::point("ephemeral:after-create");
        self.ephemeral_stage(id, &r.capability)
    }

    /// Stages an ephemeral volume at its private staging path (also when a
    /// NodePublish retry finds it created but not staged, after a crash).
    fn ephemeral_stage(&self, id: &str, cap: &Capability) -> Result<()> {
        let staging = self.cfg.state_dir.join("ephemeral").join(id);
        let (mount_flags, mount_group, _) = mount_parts(cap);
        let s = Staged {
            path: staging.to_string_lossy().into_owned(),
            block: cap.is_block(),
            mount_flags,
            mount_group,
        };
        let mut v = self.record(id)?;
        self.ensure_staged(&mut v, &s)?;
        crash::point("ephemeral:after-stage");
        v.staged = Some(s);
        self.store().put_volume(v)?;
        Ok(())
    }

    fn do_unstage(&self, v: &mut VolumeRecord, staging_path: &str) -> Result<()> {
        mount::unmount(Path::new(staging_path))?;
        crash::point("unstage:after-unmount");
        let backend = self.backend_of(v)?;
        backend.detach(&v.id)?;
        if backend.kind() == BackendKind::Image {
            crash::point("unstage:image:after-detach");
        }
        v.staged = None;
        self.store().put_volume(v.clone())
    }
}

impl Node for Driver {
    fn stage(&self, r: Stage) -> Result<()> {
        let _lock = self.busy(r.volume_id.clone())?;
        let mut v = self.record(&r.volume_id)?;
        let (mount_flags, mount_group, fs) = mount_parts(&r.capability);
        let block = r.capability.is_block();
        if block && v.backend == BackendKind::Btrfs {
            return Err(Error::InvalidArgument(format!(
                "volume {} is a btrfs subvolume and cannot be staged as a block device",
                v.id
            )));
        }
        if !fs.is_empty() && !v.fs_type.is_empty() && fs != v.fs_type {
            return Err(Error::InvalidArgument(format!(
                "volume {} holds {}, the capability asks for {fs}",
                v.id, v.fs_type
            )));
        }
        if !fs.is_empty() && v.fs_type.is_empty() {
            if !matches!(fs.as_str(), "ext4" | "xfs") {
                return Err(Error::InvalidArgument(format!(
                    "fsType {fs} is not supported: use ext4 or xfs"
                )));
            }
            v.fs_type = fs;
        }
        let s = Staged {
            path: r.staging_path.clone(),
            block,
            mount_flags,
            mount_group,
        };
        if let Some(old) = &v.staged {
            if old.path != s.path || old.block != s.block || old.mount_flags != s.mount_flags {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already staged at {} ({}); unstage it first",
                    v.id,
                    old.path,
                    if old.block { "block" } else { "mount" }
                )));
            }
        }
        self.ensure_staged(&mut v, &s)?;
        crash::point("stage:after-mount");
        v.staged = Some(s);
        self.store().put_volume(v)
    }

    fn unstage(&self, id: &str, staging_path: &str) -> Result<()> {
        let _lock = self.busy(id.to_string())?;
        let Some(mut v) = self.store().volumes.get(id).cloned() else {
            // Unknown volume: make sure nothing is left mounted, then OK.
            return mount::unmount(Path::new(staging_path));
        };
        if let Some(t) = v.published.keys().next() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published at {t}: NodeUnpublishVolume first"
            )));
        }
        self.do_unstage(&mut v, staging_path)
    }

    fn publish(&self, r: Publish) -> Result<()> {
        let _lock = self.busy(r.volume_id.clone())?;
        let ephemeral = r.context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true");
        if ephemeral {
            let existing = self.store().volumes.get(&r.volume_id).cloned();
            match existing {
                None => self.ephemeral_publish(&r)?,
                // Created but not staged (a crash in between): finish.
                Some(v) if v.ephemeral && v.state == State::Ready && v.staged.is_none() => {
                    self.ephemeral_stage(&r.volume_id, &r.capability)?
                }
                Some(_) => {}
            }
        }
        let mut v = self.record(&r.volume_id)?;
        let staged = v.staged.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {} is not staged: call NodeStageVolume first",
                v.id
            ))
        })?;
        if !v.ephemeral {
            match &r.staging_path {
                Some(p) if p.trim_end_matches('/') == staged.path.trim_end_matches('/') => {}
                Some(p) => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} is staged at {}, not {p}",
                        v.id, staged.path
                    )))
                }
                None => {
                    return Err(Error::InvalidArgument(
                        "staging_target_path is required (the driver has STAGE_UNSTAGE_VOLUME)"
                            .into(),
                    ))
                }
            }
        }
        let block = r.capability.is_block();
        if block != staged.block {
            return Err(Error::InvalidArgument(format!(
                "volume {} is staged as {}, the capability asks for {}",
                v.id,
                if staged.block { "block" } else { "mount" },
                if block { "block" } else { "mount" }
            )));
        }
        let (mount_flags, _, _) = mount_parts(&r.capability);
        let readonly = r.readonly || r.capability.mode == AccessMode::SingleNodeReaderOnly;
        let p = Published {
            readonly,
            block,
            mount_flags,
            single_writer: r.capability.mode == AccessMode::SingleNodeSingleWriter,
        };
        if let Some(old) = v.published.get(&r.target_path) {
            if old != &p {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already published at {} with different options (readonly {}, flags {:?})",
                    v.id, r.target_path, old.readonly, old.mount_flags
                )));
            }
        } else if let Some((t, _)) = v
            .published
            .iter()
            .find(|(_, o)| o.single_writer || p.single_writer)
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is published at {t} with a single-writer access mode; one target only",
                v.id
            )));
        }
        self.ensure_published(&v, &r.target_path, &p)?;
        crash::point("publish:after-mount");
        v.published.insert(r.target_path.clone(), p);
        self.store().put_volume(v)
    }

    fn unpublish(&self, id: &str, target_path: &str) -> Result<()> {
        let _lock = self.busy(id.to_string())?;
        let t = Path::new(target_path);
        mount::unmount(t)?;
        match std::fs::symlink_metadata(t) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir(t);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(t);
            }
            Err(_) => {}
        }
        crash::point("unpublish:after-unmount");
        let Some(mut v) = self.store().volumes.get(id).cloned() else {
            return Ok(());
        };
        if v.published.remove(target_path).is_some() {
            self.store().put_volume(v.clone())?;
        }
        if v.ephemeral && v.published.is_empty() {
            if let Some(s) = v.staged.clone() {
                self.do_unstage(&mut v, &s.path)?;
                let _ = std::fs::remove_dir(&s.path);
            }
            crash::point("ephemeral:after-unstage");
            v.state = State::Deleting;
            self.store().put_volume(v.clone())?;
            self.backend_of(&v)?.delete(id)?;
            self.store().remove_volume(id)?;
            tracing::info!(volume = %id, "ephemeral volume deleted");
        }
        Ok(())
    }

    fn stats(&self, id: &str, path: &str) -> Result<Stats> {
        let v = self.record(id)?;
        let p = path.trim_end_matches('/');
        let staged = v
            .staged
            .as_ref()
            .filter(|s| s.path.trim_end_matches('/') == p);
        let published = v.published.get(path).or_else(|| v.published.get(p));
        let block = match (staged, published) {
            (Some(s), _) => s.block,
            (_, Some(pb)) => pb.block,
            _ => {
                return Err(Error::NotFound(format!(
                    "volume {id} is neither staged nor published at {path}"
                )))
            }
        };
        if !Path::new(path).exists() {
            return Err(Error::NotFound(format!(
                "volume path {path} does not exist"
            )));
        }
        let backend = self.backend_of(&v)?;
        let mut condition = backend.condition(&v);
        if !condition.abnormal
            && (!block || published.is_some())
            && mount::at(Path::new(path)).is_none()
        {
            condition = Condition::abnormal(format!(
                "{path} is not mounted (the volume's mount was removed)"
            ));
        }
        if !condition.abnormal && v.backend == BackendKind::Image {
            let file = self.pool(Some(&v.pool))?.image.path(&v.id);
            if loopdev::find(&file).is_none() {
                condition = Condition::abnormal(format!(
                    "no loop device is attached to {} (restart the driver to restore it)",
                    file.display()
                ));
            }
        }
        let usage = if block {
            let dev = match backend.attach(&v) {
                Ok(Attached::Device(d)) => loopdev::size(&d),
                _ => v.capacity,
            };
            Usage {
                bytes_total: dev,
                bytes_used: 0,
                bytes_available: 0,
                inodes: None,
            }
        } else {
            let f = files::statvfs(Path::new(path))?;
            if v.backend == BackendKind::Btrfs {
                // df on a subvolume shows the whole pool; the qgroup is the volume.
                let used = backend.used(&v);
                Usage {
                    bytes_total: v.capacity,
                    bytes_used: used,
                    bytes_available: v.capacity.saturating_sub(used).min(f.avail),
                    inodes: Some((f.files, f.files - f.files_free, f.files_free)),
                }
            } else {
                Usage {
                    bytes_total: f.total,
                    bytes_used: f.total - f.free,
                    bytes_available: f.avail,
                    inodes: Some((f.files, f.files - f.files_free, f.files_free)),
                }
            }
        };
        Ok(Stats { usage, condition })
    }

    fn expand(&self, r: NodeExpand) -> Result<u64> {
        let _lock = self.busy(r.volume_id.clone())?;
        let mut v = self.record(&r.volume_id)?;
        if !Path::new(&r.volume_path).exists() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                r.volume_path
            )));
        }
        if r.capacity.required > v.capacity {
            return Err(Error::OutOfRange(format!(
                "volume {} is {} bytes; ControllerExpandVolume it to {} first",
                v.id, v.capacity, r.capacity.required
            )));
        }
        if let Attached::Device(dev) = self.backend_of(&v)?.attach(&v)? {
            if loopdev::size(&dev) < v.capacity {
                loopdev::refresh_capacity(&dev)?;
            }
            crash::point("node-expand:image:after-refresh");
            if let Some(s) = v.staged.clone().filter(|s| !s.block) {
                grow_fs(&v.fs_type, &dev, &PathBuf::from(&s.path))?;
            }
            crash::point("node-expand:image:after-grow");
        }
        if v.fs_grow_pending {
            v.fs_grow_pending = false;
            self.store().put_volume(v.clone())?;
        }
        Ok(v.capacity)
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.cfg.node_id.clone(),
            max_volumes: self.cfg.max_volumes,
            topology: self.segment(),
        }
    }
}

impl Identity for Driver {
    fn plugin_info(&self) -> (String, String) {
        (self.cfg.name.clone(), self.cfg.version.clone())
    }
    fn probe(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
    }
}
