//! Loop devices, found from the kernel's view (/sys/block/loop*/loop) so a
//! restarted driver finds the devices it attached before.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The loop device currently backed by `file`, if any. A device whose file
/// was deleted (sysfs shows " (deleted)") does not count.
pub fn find(file: &Path) -> Option<PathBuf> {
    let want = file.to_string_lossy();
    let dir = std::fs::read_dir("/sys/block").ok()?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if b.trim_end_matches('\n') == want {
            return Some(PathBuf::from(format!("/dev/{name}")));
        }
    }
    None
}

/// Every loop device whose backing file is under `dir` (`(device, file)`),
/// including ones whose file was deleted.
pub fn under(dir: &Path) -> Vec<(PathBuf, String)> {
    let want = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir("/sys/block") {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                let b = b.trim_end_matches('\n').to_string();
                if b.starts_with(&want) {
                    out.push((PathBuf::from(format!("/dev/{name}")), b));
                }
            }
        }
    }
    out
}

/// The backing file of `dev` as sysfs reports it (" (deleted)" included).
pub fn backing_file(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Attaches `file` to a free loop device (or returns the one it already has).
/// Direct I/O avoids caching every block twice (in the volume's page cache
/// and the image file's).
pub fn attach(file: &Path) -> Result<PathBuf> {
    if let Some(d) = find(file) {
        return Ok(d);
    }
    let f = file.to_string_lossy();
    let out = super::cmd::run("losetup", &["--find", "--show", "--direct-io=on", &f])?;
    let dev = out.trim();
    if dev.is_empty() {
        return Err(Error::Command {
            command: format!("losetup --find --show {f}"),
            message: "printed no device".into(),
        });
    }
    Ok(PathBuf::from(dev))
}

/// Detaches `dev`; already detached is fine.
pub fn detach(dev: &Path) -> Result<()> {
    if backing_file(dev).is_none() {
        return Ok(());
    }
    super::cmd::run("losetup", &["--detach", &dev.to_string_lossy()]).map(|_| ())
}

/// Re-reads the backing file's size (after the image grew).
pub fn refresh_capacity(dev: &Path) -> Result<()> {
    super::cmd::run("losetup", &["--set-capacity", &dev.to_string_lossy()]).map(|_| ())
}

/// Size of a block device in bytes.
pub fn size(dev: &Path) -> u64 {
    let Some(name) = dev.file_name() else {
        return 0;
    };
    std::fs::read_to_string(format!("/sys/block/{}/size", name.to_string_lossy()))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .unwrap_or(0)
}
