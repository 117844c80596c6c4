//! The driver: the pools, the metadata store and the per-volume operation
//! locks behind the Controller, Node and Identity services.

mod controller;
mod node;
mod reconcile;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};

use crate::backend::{Backend, Pool, MIB};
use crate::model::{AccessType, Capability, CapacityRange, Topology};
use crate::store::{BackendKind, State, Store, VolumeRecord};
use crate::{Error, Result};

/// The topology key this driver reports: volumes live on one node.
pub const TOPOLOGY_KEY: &str = "topology.nodeplane.io/node";
/// Volume context key kubelet sets for ephemeral inline volumes.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
pub const GIB: u64 = 1 << 30;

/// What the driver needs to know about where it runs.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub name: String,
    pub version: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    /// (name, directory); the first is the default pool.
    pub pools: Vec<(String, PathBuf)>,
    /// Size of a volume whose request names none.
    pub default_size: u64,
    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    pub max_volumes: u64,
}

#[derive(Debug)]
pub struct Driver {
    cfg: DriverConfig,
    pools: Vec<Pool>,
    store: Mutex<Store>,
    busy: Mutex<HashSet<String>>,
    ready: AtomicBool,
}

/// Held while an operation runs on one volume (or name); a second operation
/// on the same key gets ABORTED, as the spec asks.
#[derive(Debug)]
struct Busy<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// StorageClass parameters this driver reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Params {
    pool: Option<String>,
    backend: Option<BackendKind>,
    fs_type: Option<String>,
}

fn parse_params(p: &BTreeMap<String, String>) -> Result<Params> {
    let mut out = Params {
        pool: None,
        backend: None,
        fs_type: None,
    };
    for (k, v) in p {
        match k.as_str() {
            "pool" => out.pool = Some(v.clone()),
            "backend" => {
                out.backend = Some(match v.as_str() {
                    "image" => BackendKind::Image,
                    "btrfs" => BackendKind::Btrfs,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "parameter backend: `{other}` is not a backend (use image or btrfs)"
                        )))
                    }
                })
            }
            "fsType" | "csi.storage.k8s.io/fstype" => out.fs_type = Some(v.clone()),
            // Keys the provisioner and kubelet add (pvc name, pod info, ...).
            k if k.starts_with("csi.storage.k8s.io/") => {}
            // Ephemeral volume attributes reuse the parameter names.
            "size" => {}
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown parameter `{other}`: this driver takes pool, backend and fsType"
                )))
            }
        }
    }
    Ok(out)
}

/// Rounds up to whole MiB (loop devices and filesystems want aligned sizes).
fn round_up(b: u64) -> u64 {
    b.div_ceil(MIB) * MIB
}

/// Parses a Kubernetes quantity ("1Gi", "500M", "1073741824").
pub fn parse_quantity(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let m: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(m)
}

impl Driver {
    /// Opens the pools and the store and reconciles them with the kernel
    /// (finishing or undoing interrupted operations, restoring mounts).
    pub fn open(cfg: DriverConfig) -> Result<Driver> {
        if cfg.pools.is_empty() {
            return Err(Error::Config(
                "no pool: pass --pool DIR (a directory on xfs, btrfs or ext4)".into(),
            ));
        }
        let mut pools = Vec::new();
        for (name, dir) in &cfg.pools {
            if !dir.is_dir() {
                return Err(Error::Config(format!(
                    "pool {name}: {} is not a directory",
                    dir.display()
                )));
            }
            pools.push(Pool::open(name, dir)?);
        }
        let store = Store::open(&cfg.state_dir)?;
        let d = Driver {
            cfg,
            pools,
            store: Mutex::new(store),
            busy: Mutex::new(HashSet::new()),
            ready: AtomicBool::new(false),
        };
        d.reconcile()?;
        d.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(d)
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn busy(&self, key: String) -> Result<Busy<'_>> {
        let mut set = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(key.clone()) {
            return Err(Error::Aborted(format!(
                "an operation on {key} is already in progress; retry later"
            )));
        }
        Ok(Busy {
            set: &self.busy,
            key,
        })
    }

    fn pool(&self, name: Option<&str>) -> Result<&Pool> {
        match name {
            None => Ok(&self.pools[0]),
            Some(n) => self.pools.iter().find(|p| p.name == n).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "parameter pool: no pool `{n}` on this node (pools: {})",
                    self.pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
        }
    }

    fn backend_of(&self, v: &VolumeRecord) -> Result<&dyn Backend> {
        self.pool(Some(&v.pool))?.backend(v.backend).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {}: pool {} no longer offers backend {}",
                v.id,
                v.pool,
                v.backend.as_str()
            ))
        })
    }

    /// Resolves pool, backend and filesystem for a request.
    fn placement(
        &self,
        params: &BTreeMap<String, String>,
        caps: &[Capability],
    ) -> Result<(&Pool, &dyn Backend, String)> {
        let p = parse_params(params)?;
        let pool = self.pool(p.pool.as_deref())?;
        let kind = p.backend.unwrap_or_else(|| pool.default_backend());
        let backend = pool.backend(kind).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "backend {} needs a pool on btrfs; pool {} ({}) is not",
                kind.as_str(),
                pool.name,
                pool.dir.display()
            ))
        })?;
        let mut fs: Option<String> = p.fs_type.filter(|f| !f.is_empty());
        let mut block = false;
        for c in caps {
            if !c.mode.single_node() {
                return Err(Error::InvalidArgument(format!(
                    "access mode {:?} is not supported: volumes are node-local (use a SINGLE_NODE_* mode)",
                    c.mode
                )));
            }
            match &c.access {
                AccessType::Block => block = true,
                AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => {
                    if let Some(f) = &fs {
                        if f != fs_type {
                            return Err(Error::InvalidArgument(format!(
                                "capabilities ask for filesystems {f} and {fs_type}; a volume has one"
                            )));
                        }
                    }
                    fs = Some(fs_type.clone());
                }
                AccessType::Mount { .. } => {
                    fs.get_or_insert_with(|| backend.default_fs().to_string());
                }
            }
        }
        if block && !backend.supports_block() {
            return Err(Error::InvalidArgument(format!(
                "backend {} cannot provide raw block volumes: use backend image",
                kind.as_str()
            )));
        }
        // No mount capability named a filesystem (or none was given, as in
        // GetCapacity): the backend's default, unless the volume is block only.
        let fs = match fs {
            Some(f) => f,
            None if block => String::new(),
            None => backend.default_fs().to_string(),
        };
        if !backend.supports_fs(&fs) {
            return Err(Error::InvalidArgument(format!(
                "backend {} cannot provide fsType {fs}",
                kind.as_str()
            )));
        }
        Ok((pool, backend, fs))
    }

    /// The size to provision for `range`, or OUT_OF_RANGE.
    fn size_for(&self, range: CapacityRange, min: u64, at_least: u64) -> Result<u64> {
        let (req, lim) = (range.required, range.limit);
        if lim != 0 && req > lim {
            return Err(Error::OutOfRange(format!(
                "required_bytes {req} exceeds limit_bytes {lim}"
            )));
        }
        let want = if req != 0 {
            req
        } else if at_least != 0 {
            at_least
        } else if lim != 0 {
            lim.min(self.cfg.default_size)
        } else {
            self.cfg.default_size
        };
        let size = round_up(want.max(min).max(at_least));
        if lim != 0 && size > lim {
            return Err(Error::OutOfRange(format!(
                "the smallest volume this driver can make here is {size} bytes (minimum {min}, whole MiB), above limit_bytes {lim}"
            )));
        }
        Ok(size)
    }

    /// Bytes a new volume in `pool`/`backend` may still take: the pool's free
    /// space less what existing volumes may still write (their capacity
    /// minus what they use), so thin images cannot be overcommitted.
    fn available(&self, store: &Store, pool: &Pool, backend: &dyn Backend) -> Result<u64> {
        let vfs = crate::sys::files::statvfs(&pool.dir)?;
        let usage = backend.usage();
        let owed: u64 = store
            .volumes
            .values()
            .filter(|v| v.pool == pool.name && v.state != State::Deleting)
            .map(|v| {
                v.capacity
                    .saturating_sub(usage.get(&v.id).copied().unwrap_or(0))
            })
            .sum();
        Ok(vfs.avail.saturating_sub(owed))
    }

    fn segment(&self) -> Topology {
        BTreeMap::from([(TOPOLOGY_KEY.to_string(), self.cfg.node_id.clone())])
    }

    /// A new random id with `prefix`.
    fn new_id(prefix: &str) -> String {
        let mut b = [0u8; 8];
        // SAFETY: getrandom writes at most b.len() bytes into b.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            b = (t ^ u64::from(std::process::id())).to_le_bytes();
        }
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("{prefix}{hex}")
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1Gi"), Some(GIB));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("4096"), Some(4096));
        assert_eq!(parse_quantity("1.5Gi"), None);
    }

    #[test]
    fn params_reject_unknown_keys_and_backends() {
        let p = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(parse_params(&p("poool", "x")).is_err());
        assert!(parse_params(&p("backend", "lvm")).is_err());
        assert!(parse_params(&p("csi.storage.k8s.io/pvc/name", "x")).is_ok());
        assert_eq!(
            parse_params(&p("backend", "btrfs"))
                .ok()
                .and_then(|p| p.backend),
            Some(BackendKind::Btrfs)
        );
    }
}
