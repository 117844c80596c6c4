//! Shared harness for nodeplane's integration tests and benchmarks: network
//! namespaces that clean themselves up, a runner that executes a CNI plugin the
//! way a container runtime does, and loud prerequisite checks.
//!
//! Tests here touch real kernel objects, so every object they create lives in a
//! namespace or directory the test owns and is removed on drop, even when the
//! test panics. A missing prerequisite is a failure that names the package to
//! install, never a silent skip.

pub mod agent;
pub mod apps;
pub mod bench;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod csi;
pub mod fixture;
pub mod http1;
pub mod netns;
pub mod policy;
pub mod prereq;

pub use cni::{CniCall, CniOutput, Plugin};
pub use netns::Netns;
pub use prereq::{require_root, require_tool};

use std::path::PathBuf;

/// Directory holding the binaries cargo built for the running test or bench
/// (`target/<profile>`), found from the test executable's own path so debug
/// tests use debug binaries and release benches use release binaries.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path to the `nodeplane-cni` binary built alongside the running test.
/// `NODEPLANE_CNI_BIN` overrides it (for testing an installed copy).
pub fn nodeplane_cni_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NODEPLANE_CNI_BIN") {
        return PathBuf::from(p);
    }
    let p = target_dir().join("nodeplane-cni");
    assert!(
        p.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (cargo test --workspace does this)",
        p.display()
    );
    p
}

/// A unique, short name for kernel objects made by this process (netns names,
/// state dirs). Short because interface names are limited to 15 bytes.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique(&format!("nodeplane-{prefix}-")));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops a child the polite way: SIGTERM (an agent drains and leaves its
/// table), up to `grace` for it to exit, then SIGKILL; reaped either way.
pub fn terminate(child: &mut std::process::Child, grace: std::time::Duration) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let start = std::time::Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}
