//! Controller service: provisioning, snapshots, expansion, listing, capacity.

use std::collections::BTreeMap;

use super::{now_nanos, Driver};
use crate::crash;
use crate::model::*;
use crate::service::Controller;
use crate::store::{SnapshotRecord, State, VolumeRecord};
use crate::{Error, Result};

impl Driver {
    fn info(&self, v: &VolumeRecord) -> VolumeInfo {
        let mut context = BTreeMap::new();
        context.insert("pool".to_string(), v.pool.clone());
        context.insert("backend".to_string(), v.backend.as_str().to_string());
        if !v.fs_type.is_empty() {
            context.insert("fsType".to_string(), v.fs_type.clone());
        }
        VolumeInfo {
            id: v.id.clone(),
            capacity: v.capacity,
            context,
            source: v.source.clone(),
            topology: self.segment(),
        }
    }

    fn snap_info(s: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            id: s.id.clone(),
            source_volume: s.source_volume.clone(),
            size: s.size,
            created_unix_nanos: i128::from(s.created_unix_nanos),
            ready: s.state == State::Ready,
        }
    }

    fn status(&self, v: &VolumeRecord) -> VolumeStatus {
        let condition = match self.backend_of(v) {
            Ok(b) => b.condition(v),
            Err(e) => Condition::abnormal(e.to_string()),
        };
        let published = !v.published.is_empty() || v.staged.is_some();
        VolumeStatus {
            volume: self.info(v),
            published_nodes: if published {
                vec![self.cfg.node_id.clone()]
            } else {
                vec![]
            },
            condition,
        }
    }

    /// Creates volume `id` for `r` (the caller holds the name's lock).
    pub(super) fn provision(
        &self,
        id: String,
        r: &CreateVolume,
        ephemeral: bool,
    ) -> Result<VolumeInfo> {
        let (pool, backend, fs) = self.placement(&r.parameters, &r.capabilities)?;
        let min = backend.min_size(&fs);
        // Topology: the volume can only be on this node.
        let seg = self.segment();
        if !r.requisite.is_empty()
            && !r
                .requisite
                .iter()
                .any(|t| t.iter().all(|(k, v)| seg.get(k) == Some(v)))
        {
            return Err(Error::ResourceExhausted(format!(
                "accessibility requirements exclude node {}: volumes are created only on the node that serves them ({}={})",
                self.cfg.node_id, super::TOPOLOGY_KEY, self.cfg.node_id
            )));
        }
        // The source, if any, decides the smallest size.
        let mut src_vol = None;
        let mut src_snap = None;
        let mut at_least = 0;
        {
            let st = self.store();
            match &r.source {
                None => {}
                Some(ContentSource::Snapshot(sid)) => {
                    let s = st
                        .snapshots
                        .get(sid)
                        .filter(|s| s.state == State::Ready)
                        .ok_or_else(|| {
                            Error::NotFound(format!("source snapshot {sid} does not exist"))
                        })?;
                    if s.pool != pool.name || s.backend != backend.kind() {
                        return Err(Error::InvalidArgument(format!(
                            "snapshot {sid} is in pool {} backend {}; the new volume must be there too",
                            s.pool,
                            s.backend.as_str()
                        )));
                    }
                    at_least = s.size;
                    src_snap = Some(s.clone());
                }
                Some(ContentSource::Volume(vid)) => {
                    let v = st
                        .volumes
                        .get(vid)
                        .filter(|v| v.state == State::Ready)
                        .ok_or_else(|| {
                            Error::NotFound(format!("source volume {vid} does not exist"))
                        })?;
                    if v.pool != pool.name || v.backend != backend.kind() {
                        return Err(Error::InvalidArgument(format!(
                            "volume {vid} is in pool {} backend {}; a clone must be there too",
                            v.pool,
                            v.backend.as_str()
                        )));
                    }
                    at_least = v.capacity;
                    src_vol = Some(v.clone());
                }
            }
        }
        if at_least != 0 && r.capacity.limit != 0 && r.capacity.limit < at_least {
            return Err(Error::OutOfRange(format!(
                "the source is {at_least} bytes, more than limit_bytes {}",
                r.capacity.limit
            )));
        }
        let size = self.size_for(r.capacity, min, at_least)?;
        let fs_type = match (&src_snap, &src_vol) {
            (Some(s), _) => s.fs_type.clone(),
            (_, Some(v)) => v.fs_type.clone(),
            _ => fs.clone(),
        };
        if !fs.is_empty() && !fs_type.is_empty() && fs != fs_type {
            return Err(Error::InvalidArgument(format!(
                "the source holds a {fs_type} filesystem, the request asks for {fs}"
            )));
        }
        let rec = VolumeRecord {
            id: id.clone(),
            name: r.name.clone(),
            pool: pool.name.clone(),
            backend: backend.kind(),
            fs_type,
            capacity: size,
            parameters: r.parameters.clone(),
            source: r.source.clone(),
            state: State::Creating,
            created_unix_nanos: now_nanos(),
            expanding_to: None,
            fs_grow_pending: at_least != 0 && size > at_least,
            ephemeral,
            staged: None,
            published: BTreeMap::new(),
        };
        {
            // Check and reserve under one lock: two creates cannot both take
            // the last free bytes.
            let mut st = self.store();
            let avail = self.available(&st, pool, backend)?;
            if size > avail {
                return Err(Error::ResourceExhausted(format!(
                    "pool {} has {avail} bytes available, the volume needs {size}",
                    pool.name
                )));
            }
            st.put_volume(rec.clone())?;
        }
        crash::point("create:after-intent");
        let made = match (&src_snap, &src_vol) {
            (Some(s), _) => backend.restore(&rec, s),
            (_, Some(v)) => {
                let _src_lock = self.busy(v.id.clone())?;
                let mount = v
                    .staged
                    .as_ref()
                    .filter(|s| !s.block)
                    .map(|s| std::path::PathBuf::from(&s.path));
                backend.clone_from(&rec, v, mount.as_deref())
            }
            _ => backend.create(&rec),
        };
        if let Err(e) = made {
            let _ = backend.delete(&rec.id);
            let _ = self.store().remove_volume(&rec.id);
            return Err(e);
        }
        crash::point("create:after-storage");
        let mut ready = rec;
        ready.state = State::Ready;
        self.store().put_volume(ready.clone())?;
        tracing::info!(volume = %ready.id, name = %ready.name, pool = %ready.pool, backend = ready.backend.as_str(), bytes = ready.capacity, "volume created");
        Ok(self.info(&ready))
    }

    /// Whether an existing volume satisfies a repeated CreateVolume.
    fn compatible(&self, v: &VolumeRecord, r: &CreateVolume) -> Result<()> {
        let (pool, backend, fs) = self.placement(&r.parameters, &r.capabilities)?;
        let range_ok = (r.capacity.required == 0 || v.capacity >= r.capacity.required)
            && (r.capacity.limit == 0 || v.capacity <= r.capacity.limit);
        let fs_ok = fs.is_empty() || v.fs_type.is_empty() || v.fs_type == fs;
        if !range_ok
            || pool.name != v.pool
            || backend.kind() != v.backend
            || !fs_ok
            || v.source != r.source
        {
            return Err(Error::AlreadyExists(format!(
                "volume name {} exists as {} ({} bytes, pool {}, backend {}, fs {}) and does not match this request",
                r.name,
                v.id,
                v.capacity,
                v.pool,
                v.backend.as_str(),
                if v.fs_type.is_empty() { "none" } else { &v.fs_type }
            )));
        }
        Ok(())
    }
}

/// Pagination: entries in id order; a token is "after:<id>" naming the first
/// entry of the next page (stable when entries are added or removed).
fn page<T: Clone>(items: Vec<(String, T)>, f: &ListFilter) -> Result<Page<T>> {
    let start = match &f.starting_token {
        None => 0,
        Some(t) => {
            let id = t.strip_prefix("after:").ok_or_else(|| {
                Error::Aborted(format!(
                    "starting_token `{t}` was not returned by this driver; list again from the start"
                ))
            })?;
            items
                .iter()
                .position(|(i, _)| i.as_str() >= id)
                .unwrap_or(items.len())
        }
    };
    let rest = &items[start..];
    let n = if f.max_entries == 0 {
        rest.len()
    } else {
        f.max_entries.min(rest.len())
    };
    Ok(Page {
        entries: rest[..n].iter().map(|(_, t)| t.clone()).collect(),
        next_token: rest.get(n).map(|(id, _)| format!("after:{id}")),
    })
}

impl Controller for Driver {
    fn create_volume(&self, r: CreateVolume) -> Result<VolumeInfo> {
        if r.capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let _lock = self.busy(format!("volume name {}", r.name))?;
        let existing = self.store().volume_by_name(&r.name).cloned();
        if let Some(v) = existing {
            self.compatible(&v, &r)?;
            if v.state == State::Ready {
                return Ok(self.info(&v));
            }
            // A leftover of an interrupted attempt: make it again.
            let b = self.backend_of(&v)?;
            b.delete(&v.id)?;
            self.store().remove_volume(&v.id)?;
        }
        self.provision(Driver::new_id("vol-"), &r, false)
    }

    fn delete_volume(&self, id: &str) -> Result<()> {
        let _lock = self.busy(id.to_string())?;
        let Some(mut v) = self.store().volumes.get(id).cloned() else {
            return Ok(());
        };
        if let Some(s) = &v.staged {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still staged at {}: NodeUnstageVolume first",
                s.path
            )));
        }
        v.state = State::Deleting;
        self.store().put_volume(v.clone())?;
        crash::point("delete:after-intent");
        self.backend_of(&v)?.delete(id)?;
        crash::point("delete:after-storage");
        self.store().remove_volume(id)?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    fn validate_capabilities(
        &self,
        id: &str,
        _context: &BTreeMap<String, String>,
        caps: &[Capability],
        params: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        if caps.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let v = self
            .store()
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let mut params = params.clone();
        params.entry("pool".into()).or_insert(v.pool.clone());
        params
            .entry("backend".into())
            .or_insert(v.backend.as_str().into());
        match self.placement(&params, caps) {
            Ok((_, _, fs)) if fs.is_empty() || v.fs_type.is_empty() || fs == v.fs_type => Ok(None),
            Ok((_, _, fs)) => Ok(Some(format!("volume {id} holds {}, not {fs}", v.fs_type))),
            Err(Error::InvalidArgument(m)) => Ok(Some(m)),
            Err(e) => Err(e),
        }
    }

    fn list_volumes(&self, f: ListFilter) -> Result<Page<VolumeStatus>> {
        let vols: Vec<VolumeRecord> = self
            .store()
            .volumes
            .values()
            // Ephemeral inline volumes belong to a pod, not to the CO's list.
            .filter(|v| v.state == State::Ready && !v.ephemeral)
            .cloned()
            .collect();
        let items = vols.iter().map(|v| (v.id.clone(), v.clone())).collect();
        let p = page(items, &f)?;
        Ok(Page {
            entries: p.entries.iter().map(|v| self.status(v)).collect(),
            next_token: p.next_token,
        })
    }

    fn get_volume(&self, id: &str) -> Result<VolumeStatus> {
        let v = self
            .store()
            .volumes
            .get(id)
            .filter(|v| v.state == State::Ready)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        Ok(self.status(&v))
    }

    fn capacity(&self, q: CapacityQuery) -> Result<Capacity> {
        if let Some(t) = &q.topology {
            let seg = self.segment();
            if !t.iter().all(|(k, v)| seg.get(k) == Some(v)) {
                return Ok(Capacity {
                    available: 0,
                    maximum_volume_size: 0,
                    minimum_volume_size: 0,
                });
            }
        }
        let (pool, backend, fs) = self.placement(&q.parameters, &q.capabilities)?;
        let st = self.store();
        let available = self.available(&st, pool, backend)?;
        let min = backend.min_size(if fs.is_empty() {
            backend.default_fs()
        } else {
            &fs
        });
        Ok(Capacity {
            available: available / super::MIB * super::MIB,
            maximum_volume_size: available / super::MIB * super::MIB,
            minimum_volume_size: min,
        })
    }

    fn create_snapshot(&self, r: CreateSnapshot) -> Result<SnapshotInfo> {
        let _lock = self.busy(format!("snapshot name {}", r.name))?;
        if let Some(s) = self.store().snapshot_by_name(&r.name).cloned() {
            if s.source_volume != r.source_volume {
                return Err(Error::AlreadyExists(format!(
                    "snapshot name {} exists for volume {}, not {}",
                    r.name, s.source_volume, r.source_volume
                )));
            }
            if s.state == State::Ready {
                return Ok(Self::snap_info(&s));
            }
            let b = self.pool(Some(&s.pool))?.backend(s.backend);
            if let Some(b) = b {
                b.delete_snapshot(&s.id)?;
            }
            self.store().remove_snapshot(&s.id)?;
        }
        let _vol_lock = self.busy(r.source_volume.clone())?;
        let v = self
            .store()
            .volumes
            .get(&r.source_volume)
            .filter(|v| v.state == State::Ready)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("source volume {} does not exist", r.source_volume))
            })?;
        let backend = self.backend_of(&v)?;
        let rec = SnapshotRecord {
            id: Driver::new_id("snap-"),
            name: r.name.clone(),
            source_volume: v.id.clone(),
            pool: v.pool.clone(),
            backend: v.backend,
            fs_type: v.fs_type.clone(),
            size: v.capacity,
            created_unix_nanos: now_nanos(),
            state: State::Creating,
        };
        self.store().put_snapshot(rec.clone())?;
        crash::point("snapshot:after-intent");
        let mount = v
            .staged
            .as_ref()
            .filter(|s| !s.block)
            .map(|s| std::path::PathBuf::from(&s.path));
        if let Err(e) = backend.snapshot(&v, &rec, mount.as_deref()) {
            let _ = backend.delete_snapshot(&rec.id);
            let _ = self.store().remove_snapshot(&rec.id);
            return Err(e);
        }
        crash::point("snapshot:after-storage");
        let mut ready = rec;
        ready.state = State::Ready;
        self.store().put_snapshot(ready.clone())?;
        tracing::info!(snapshot = %ready.id, volume = %v.id, "snapshot created");
        Ok(Self::snap_info(&ready))
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _lock = self.busy(id.to_string())?;
        let Some(mut s) = self.store().snapshots.get(id).cloned() else {
            return Ok(());
        };
        s.state = State::Deleting;
        self.store().put_snapshot(s.clone())?;
        crash::point("delete-snapshot:after-intent");
        if let Some(b) = self.pool(Some(&s.pool))?.backend(s.backend) {
            b.delete_snapshot(id)?;
        }
        crash::point("delete-snapshot:after-storage");
        self.store().remove_snapshot(id)
    }

    fn list_snapshots(&self, f: ListFilter) -> Result<Page<SnapshotInfo>> {
        let snaps: Vec<(String, SnapshotInfo)> = self
            .store()
            .snapshots
            .values()
            .filter(|s| s.state == State::Ready)
            .filter(|s| f.snapshot_id.as_ref().is_none_or(|id| &s.id == id))
            .filter(|s| {
                f.source_volume
                    .as_ref()
                    .is_none_or(|v| &s.source_volume == v)
            })
            .map(|s| (s.id.clone(), Self::snap_info(s)))
            .collect();
        page(snaps, &f)
    }

    fn expand_volume(&self, r: Expand) -> Result<Expanded> {
        let _lock = self.busy(r.volume_id.clone())?;
        let mut v = self
            .store()
            .volumes
            .get(&r.volume_id)
            .filter(|v| v.state == State::Ready)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("volume {} does not exist", r.volume_id)))?;
        let block = r.capability.as_ref().is_some_and(|c| c.is_block()) || v.fs_type.is_empty();
        let node_needed =
            |v: &VolumeRecord| !block && v.backend == crate::store::BackendKind::Image;
        let size = self.size_for(r.capacity, 0, 0)?;
        if size <= v.capacity {
            return Ok(Expanded {
                capacity: v.capacity,
                node_expansion_required: node_needed(&v),
            });
        }
        let backend = self.backend_of(&v)?;
        {
            let mut st = self.store();
            let pool = self.pool(Some(&v.pool))?;
            let avail = self.available(&st, pool, backend)?;
            if size - v.capacity > avail {
                return Err(Error::ResourceExhausted(format!(
                    "pool {} has {avail} bytes available, growing {} needs {}",
                    v.pool,
                    v.id,
                    size - v.capacity
                )));
            }
            v.expanding_to = Some(size);
            st.put_volume(v.clone())?;
        }
        crash::point("expand:after-intent");
        backend.expand(&v, size)?;
        crash::point("expand:after-storage");
        v.capacity = size;
        v.expanding_to = None;
        v.fs_grow_pending = node_needed(&v);
        self.store().put_volume(v.clone())?;
        tracing::info!(volume = %v.id, bytes = size, "volume expanded");
        Ok(Expanded {
            capacity: size,
            node_expansion_required: node_needed(&v),
        })
    }
}
