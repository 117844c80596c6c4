//! Prerequisite checks that fail loudly with the fix, instead of skipping.

use std::path::Path;

/// Panics unless running as root (the tests create namespaces and links).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, veths, routes): run the suite as root, e.g. `sudo cargo test --workspace`"
    );
}

/// Panics unless `tool` is found (an absolute path or a name on PATH), naming
/// the Debian package that provides it.
pub fn require_tool(tool: &str, debian_package: &str) -> std::path::PathBuf {
    if tool.starts_with('/') {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install it with `apt-get install {debian_package}`"
        );
        return tool.into();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]) {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("`{tool}` is not installed: install it with `apt-get install {debian_package}`");
}

/// The tools the CSI driver and its tests run (loop devices, mkfs, resize,
/// btrfs, namespaces), each with the Debian package that provides it.
pub fn require_csi_tools() {
    require_root();
    for (tool, package) in [
        ("losetup", "util-linux"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("fsfreeze", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_growfs", "xfsprogs"),
        ("mkfs.btrfs", "btrfs-progs"),
        ("btrfs", "btrfs-progs"),
    ] {
        require_tool(tool, package);
    }
}
