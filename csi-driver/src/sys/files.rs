//! Crash-safe file writes and copies.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// Writes `data` to `path` so that after a crash at any point the file holds
/// either the old or the new contents: temp file, fsync, rename, fsync of the
/// directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Config(format!("{} has no parent", path.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f =
        File::create(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
    sync_dir(dir)
}

/// fsync of a directory, so a create, rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Removes `path` and makes that durable; a missing file is fine.
pub fn remove_durable(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("remove {}", path.display()), e)),
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// How a copy was made (reported in logs and the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    Full,
}

/// Copies `src` to a new file `dst`: a reflink (FICLONE, shares extents,
/// instant) where the filesystem supports it, otherwise a sparse full copy.
/// The copy is fsynced.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CopyKind> {
    let s = File::open(src).map_err(|e| Error::io(format!("open {}", src.display()), e))?;
    let d = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| Error::io(format!("create {}", dst.display()), e))?;
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both fds are open for the duration of the call.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
    let kind = if rc == 0 {
        CopyKind::Reflink
    } else {
        drop(d);
        let _ = std::fs::remove_file(dst);
        let (s, d) = (src.display().to_string(), dst.display().to_string());
        super::cmd::run("cp", &["--sparse=always", "--reflink=never", &s, &d])?;
        CopyKind::Full
    };
    File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dst.display()), e))?;
    Ok(kind)
}

/// A filesystem's size and use (statvfs), in bytes and inodes.
#[derive(Debug, Clone, Copy)]
pub struct Vfs {
    pub total: u64,
    pub free: u64,
    /// Free for unprivileged users.
    pub avail: u64,
    pub files: u64,
    pub files_free: u64,
}

pub fn statvfs(path: &Path) -> Result<Vfs> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
    let f = s.fragment_size();
    Ok(Vfs {
        total: s.blocks() * f,
        free: s.blocks_free() * f,
        avail: s.blocks_available() * f,
        files: s.files(),
        files_free: s.files_free(),
    })
}

/// Bytes actually allocated to a (sparse) file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Is `path` on btrfs?
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}
