//! Named network namespaces (`ip netns`) owned by a test and deleted on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A named network namespace created with `ip netns add`, removed on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace named `<prefix><pid>x<n>` with loopback up.
    pub fn new(prefix: &str) -> Self {
        crate::require_root();
        crate::require_tool("ip", "iproute2");
        let name = crate::unique(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The path a container runtime would pass as CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Opens the namespace file (for setns in a child before exec).
    pub fn open(&self) -> File {
        File::open(self.path()).expect("open netns file")
    }

    /// A `Command` that runs `program` inside this namespace. The child enters
    /// the namespace between fork and exec, so the test process itself never
    /// changes namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns = self.open();
        let mut cmd = Command::new(program);
        enter_in_child(&mut cmd, ns);
        cmd
    }

    /// Runs `ip ARGS` inside the namespace; panics with stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run_ok(self.command("ip").args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell command inside the namespace and returns its output.
    pub fn sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .output()
            .expect("spawn sh")
    }

    /// Writes a sysctl inside this namespace (e.g. `net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let out = self.sh(&format!("echo {value} > {path}"));
        assert!(out.status.success(), "sysctl {key}={value} failed: {out:?}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Makes `cmd` enter the network namespace `ns` after fork, before exec.
pub fn enter_in_child(cmd: &mut Command, ns: File) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setns is async-signal-safe; the closure only makes that syscall.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a command and panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
