//! The `image` backend: `<pool>/images/<id>.img`, a sparse file per volume,
//! formatted ext4 or xfs, attached to a loop device when staged. The file
//! size is the hard limit: a write past it fails with ENOSPC inside the
//! volume. Snapshots are `<pool>/image-snapshots/<id>.img`, reflinked where
//! the pool filesystem supports it (xfs, btrfs), fully copied otherwise.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::{Attached, Backend, MIB};
use crate::crash;
use crate::model::Condition;
use crate::store::{BackendKind, SnapshotRecord, VolumeRecord};
use crate::sys::{cmd, files, loopdev};
use crate::{Error, Result};

#[derive(Debug)]
pub struct Image {
    images: PathBuf,
    snapshots: PathBuf,
}

impl Image {
    pub fn open(pool: &Path) -> Result<Image> {
        let images = pool.join("images");
        let snapshots = pool.join("image-snapshots");
        for d in [&images, &snapshots] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        }
        Ok(Image { images, snapshots })
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.images.join(format!("{id}.img"))
    }

    fn snap_path(&self, id: &str) -> PathBuf {
        self.snapshots.join(format!("{id}.img"))
    }

    fn remove_stale(&self, path: &Path) -> Result<()> {
        if let Some(dev) = loopdev::find(path) {
            loopdev::detach(&dev)?;
        }
        files::remove_durable(path)
    }

    fn set_len(path: &Path, bytes: u64) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        f.set_len(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("resize {} to {bytes} bytes", path.display()), e))
    }
}

/// Formats `dev` (a file or device) with `fs`. No discard: the file is new
/// and sparse already. ext4 reserves no blocks for root, so the volume's
/// users get all of it.
pub fn mkfs(dev: &Path, fs: &str) -> Result<()> {
    let d = dev.to_string_lossy();
    match fs {
        "ext4" => cmd::run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                &d,
            ],
        ),
        // 4 KiB sectors: with direct I/O the loop device takes the pool's
        // logical block size (4 KiB on xfs/btrfs/ext4 pools), and xfs refuses
        // to mount a 512-byte-sector filesystem on such a device.
        "xfs" => cmd::run("mkfs.xfs", &["-q", "-f", "-K", "-s", "size=4096", &d]),
        other => Err(Error::InvalidArgument(format!(
            "fsType `{other}` is not supported by the image backend: use ext4 or xfs"
        ))),
    }
    .map(|_| ())
}

/// Grows the filesystem mounted at `mount` (on `dev`) to the device size.
/// Online ext4 growth needs CAP_SYS_RESOURCE (the kernel's rule for
/// EXT4_IOC_RESIZE_FS); without it the error says so, and the filesystem
/// grows offline at the next stage (`grow_fs_offline`).
pub fn grow_fs(fs: &str, dev: &Path, mount: &Path) -> Result<()> {
    match fs {
        "ext4" => match cmd::run("resize2fs", &[&dev.to_string_lossy()]) {
            Err(Error::Command { message, .. }) if message.contains("Permission denied") => {
                Err(Error::FailedPrecondition(format!(
                    "online ext4 resize of {} needs CAP_SYS_RESOURCE, which this process lacks: \
                     run the driver with it, or unstage and stage the volume (it grows offline then), \
                     or use fsType xfs",
                    dev.display()
                )))
            }
            r => r.map(|_| ()),
        },
        "xfs" => cmd::run("xfs_growfs", &[&mount.to_string_lossy()]).map(|_| ()),
        _ => Ok(()),
    }
}

/// Grows an unmounted filesystem on `dev` to the device size (ext4 only;
/// xfs can only grow mounted).
pub fn grow_fs_offline(fs: &str, dev: &Path) -> Result<bool> {
    if fs != "ext4" {
        return Ok(false);
    }
    let d = dev.to_string_lossy();
    // resize2fs insists on a freshly checked filesystem; -p fixes only what
    // is safe to fix unattended. Exit 1 means "errors corrected".
    match cmd::run("e2fsck", &["-f", "-p", &d]) {
        Ok(_) => {}
        Err(Error::Command { message, .. }) if message.starts_with("exit status: 1") => {}
        Err(e) => return Err(e),
    }
    cmd::run("resize2fs", &[&d])?;
    Ok(true)
}

/// Runs `f` with the filesystem at `mount` frozen (consistent copies of a
/// mounted volume); thaws even when `f` fails.
pub fn frozen<T>(mount: Option<&Path>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(m) = mount else { return f() };
    let m = m.to_string_lossy().into_owned();
    cmd::run("fsfreeze", &["--freeze", &m])?;
    let r = f();
    let thaw = cmd::run("fsfreeze", &["--unfreeze", &m]);
    let v = r?;
    thaw?;
    Ok(v)
}

/// Thaws the filesystem at `mount` if it is frozen: a kill -9 between
/// `fsfreeze --freeze` and `--unfreeze` (a snapshot or clone of a staged
/// volume) leaves it frozen, and every write in the pod would hang.
/// Not frozen is fine (fsfreeze then fails with EINVAL, ignored).
pub fn thaw(mount: &Path) {
    if cmd::run("fsfreeze", &["--unfreeze", &mount.to_string_lossy()]).is_ok() {
        tracing::warn!(mount = %mount.display(), "thawed a filesystem left frozen by an interrupted snapshot or clone");
    }
}

impl Backend for Image {
    fn kind(&self) -> BackendKind {
        BackendKind::Image
    }
    fn default_fs(&self) -> &'static str {
        "ext4"
    }
    fn supports_fs(&self, fs: &str) -> bool {
        matches!(fs, "" | "ext4" | "xfs")
    }
    fn supports_block(&self) -> bool {
        true
    }
    fn min_size(&self, fs: &str) -> u64 {
        match fs {
            "xfs" => 300 * MIB,
            "ext4" => 16 * MIB,
            _ => MIB,
        }
    }

    fn create(&self, v: &VolumeRecord) -> Result<()> {
        let path = self.path(&v.id);
        self.remove_stale(&path)?;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        f.set_len(v.capacity)
            .map_err(|e| Error::io(format!("size {}", path.display()), e))?;
        drop(f);
        crash::point("create:image:after-file");
        if !v.fs_type.is_empty() {
            mkfs(&path, &v.fs_type)?;
        }
        crash::point("create:image:after-mkfs");
        Self::set_len(&path, v.capacity)?;
        files::sync_dir(&self.images)
    }

    fn restore(&self, v: &VolumeRecord, s: &SnapshotRecord) -> Result<()> {
        let path = self.path(&v.id);
        self.remove_stale(&path)?;
        files::clone_file(&self.snap_path(&s.id), &path)?;
        crash::point("restore:image:after-copy");
        if v.capacity > s.size {
            Self::set_len(&path, v.capacity)?;
        }
        files::sync_dir(&self.images)
    }

    fn clone_from(&self, v: &VolumeRecord, src: &VolumeRecord, mount: Option<&Path>) -> Result<()> {
        let path = self.path(&v.id);
        self.remove_stale(&path)?;
        frozen(mount, || {
            crash::point("clone:image:after-freeze");
            let kind = files::clone_file(&self.path(&src.id), &path)?;
            crash::point("clone:image:after-copy");
            Ok(kind)
        })?;
        if v.capacity > src.capacity {
            Self::set_len(&path, v.capacity)?;
        }
        files::sync_dir(&self.images)
    }

    fn delete(&self, id: &str) -> Result<()> {
        self.remove_stale(&self.path(id))
    }

    fn expand(&self, v: &VolumeRecord, bytes: u64) -> Result<()> {
        let path = self.path(&v.id);
        let cur = std::fs::metadata(&path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        if bytes > cur {
            Self::set_len(&path, bytes)?;
        }
        crash::point("expand:image:after-truncate");
        if let Some(dev) = loopdev::find(&path) {
            if loopdev::size(&dev) < bytes {
                loopdev::refresh_capacity(&dev)?;
            }
        }
        Ok(())
    }

    fn snapshot(&self, v: &VolumeRecord, s: &SnapshotRecord, mount: Option<&Path>) -> Result<()> {
        let dst = self.snap_path(&s.id);
        files::remove_durable(&dst)?;
        let kind = frozen(mount, || {
            crash::point("snapshot:image:after-freeze");
            let kind = files::clone_file(&self.path(&v.id), &dst)?;
            crash::point("snapshot:image:after-copy");
            Ok(kind)
        })?;
        tracing::debug!(snapshot = %s.id, ?kind, "image snapshot copied");
        files::sync_dir(&self.snapshots)
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        files::remove_durable(&self.snap_path(id))
    }

    fn attach(&self, v: &VolumeRecord) -> Result<Attached> {
        let path = self.path(&v.id);
        if !path.exists() {
            return Err(Error::FailedPrecondition(format!(
                "volume {}: backing file {} is missing",
                v.id,
                path.display()
            )));
        }
        loopdev::attach(&path).map(Attached::Device)
    }

    fn detach(&self, id: &str) -> Result<()> {
        match loopdev::find(&self.path(id)) {
            Some(dev) => loopdev::detach(&dev),
            None => Ok(()),
        }
    }

    fn used(&self, v: &VolumeRecord) -> u64 {
        files::allocated(&self.path(&v.id))
    }

    fn usage(&self) -> std::collections::HashMap<String, u64> {
        self.on_disk()
            .0
            .into_iter()
            .map(|id| {
                let used = files::allocated(&self.path(&id));
                (id, used)
            })
            .collect()
    }

    fn condition(&self, v: &VolumeRecord) -> Condition {
        let path = self.path(&v.id);
        match std::fs::metadata(&path) {
            Err(_) => {
                // A loop device keeps a deleted file alive: say so.
                let attached = loopdev::under(&self.images)
                    .into_iter()
                    .any(|(_, b)| b.starts_with(&*path.to_string_lossy()));
                Condition::abnormal(format!(
                    "backing file {} is missing{}",
                    path.display(),
                    if attached {
                        " (deleted while attached; data is lost at detach)"
                    } else {
                        ""
                    }
                ))
            }
            Ok(m) if m.len() < v.capacity => Condition::abnormal(format!(
                "backing file {} is {} bytes, smaller than the volume's {}",
                path.display(),
                m.len(),
                v.capacity
            )),
            Ok(_) => Condition::ok(),
        }
    }

    fn on_disk(&self) -> (Vec<String>, Vec<String>) {
        let ids = |d: &Path| -> Vec<String> {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .strip_suffix(".img")
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        (ids(&self.images), ids(&self.snapshots))
    }
}
