//! Mounts, read back from /proc/self/mountinfo (the truth after a crash or
//! restart) and made with mount(2) directly.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::{Error, Result};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem's device.
    pub dev: String,
    /// The mounted subtree of that filesystem ("/" unless a bind of a subdir).
    pub root: String,
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    pub options: String,
}

impl MountEntry {
    pub fn readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        out.push(MountEntry {
            dev: l[2].to_string(),
            root: unescape(l[3]),
            mount_point: unescape(l[4]),
            options: l[5].to_string(),
            fs_type: r[0].to_string(),
            source: unescape(r[1]),
        });
    }
    out
}

/// All mounts of this process's mount namespace.
pub fn table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The top-most mount at `path`, if `path` is a mount point.
pub fn at(path: &Path) -> Option<MountEntry> {
    let p = path.to_string_lossy();
    let p = p.trim_end_matches('/');
    table().into_iter().rev().find(|m| m.mount_point == p)
}

/// Splits CSI mount flags into mount(2) flags and filesystem options.
pub fn split_flags(flags: &[String]) -> (MsFlags, String) {
    let mut ms = MsFlags::empty();
    let mut data = Vec::new();
    for f in flags.iter().flat_map(|f| f.split(',')) {
        match f.trim() {
            "" | "rw" | "defaults" => {}
            "ro" => ms |= MsFlags::MS_RDONLY,
            "noatime" => ms |= MsFlags::MS_NOATIME,
            "nodiratime" => ms |= MsFlags::MS_NODIRATIME,
            "relatime" => ms |= MsFlags::MS_RELATIME,
            "strictatime" => ms |= MsFlags::MS_STRICTATIME,
            "nosuid" => ms |= MsFlags::MS_NOSUID,
            "nodev" => ms |= MsFlags::MS_NODEV,
            "noexec" => ms |= MsFlags::MS_NOEXEC,
            "sync" => ms |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => ms |= MsFlags::MS_DIRSYNC,
            other => data.push(other.to_string()),
        }
    }
    (ms, data.join(","))
}

/// Mounts the filesystem on `dev` at `target`.
pub fn mount_fs(dev: &Path, target: &Path, fs_type: &str, flags: &[String]) -> Result<()> {
    let (ms, data) = split_flags(flags);
    let data = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(Some(dev), target, Some(fs_type), ms, data).map_err(|e| {
        Error::io(
            format!(
                "mount {} ({fs_type}) at {}",
                dev.display(),
                target.display()
            ),
            e.into(),
        )
    })
}

/// Bind-mounts `src` at `target`, read-only if asked (a bind takes the
/// read-only flag only on a remount).
pub fn bind(src: &Path, target: &Path, readonly: bool, flags: &[String]) -> Result<()> {
    let ctx = || format!("bind {} at {}", src.display(), target.display());
    nix::mount::mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Error::io(ctx(), e.into()))?;
    let (extra, _) = split_flags(flags);
    let mut ms = extra;
    if readonly {
        ms |= MsFlags::MS_RDONLY;
    }
    if !ms.is_empty() {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ms,
            None::<&str>,
        )
        .map_err(|e| {
            let _ = nix::mount::umount2(target, MntFlags::empty());
            Error::io(format!("{} (remount with flags)", ctx()), e.into())
        })?;
    }
    Ok(())
}

/// Unmounts everything stacked at `target`; not mounted is fine.
pub fn unmount(target: &Path) -> Result<()> {
    for _ in 0..16 {
        if at(target).is_none() {
            return Ok(());
        }
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "unmount {} (is a process still using it?)",
                        target.display()
                    ),
                    e.into(),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n";
        let m = parse(t);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, "/mnt/a b");
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert!(!m[0].readonly());
    }

    #[test]
    fn splits_flags() {
        let (ms, data) = split_flags(&["noatime,discard".into(), "ro".into()]);
        assert!(ms.contains(MsFlags::MS_NOATIME) && ms.contains(MsFlags::MS_RDONLY));
        assert_eq!(data, "discard");
    }
}
