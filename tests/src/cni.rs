//! Runs CNI plugins exactly as a container runtime does: environment
//! variables, the network configuration on stdin, the result on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Netns;

/// A CNI plugin executable, run inside a "node" namespace.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub bin: PathBuf,
    /// CNI_PATH handed to the plugin (for delegation and chaining).
    pub cni_path: String,
}

/// One invocation's parameters.
#[derive(Debug, Clone, Default)]
pub struct CniCall<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub args: &'a str,
    pub config: &'a str,
}

/// What the plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct CniOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    /// Parses stdout as JSON, panicking with the whole output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
    /// The CNI error code from the error object on stdout.
    pub fn error_code(&self) -> u64 {
        assert!(!self.success(), "expected an error, got success: {self:?}");
        self.json()["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no numeric code in error: {self:?}"))
    }
    /// Panics with the full output unless the call succeeded.
    pub fn expect_ok(self) -> Self {
        assert!(self.success(), "plugin failed: {self:?}");
        self
    }
}

impl Plugin {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        let bin = bin.into();
        let dir = bin
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Plugin {
            bin,
            cni_path: format!("{dir}:/usr/lib/cni"),
        }
    }

    /// nodeplane-cni as built with the running test.
    pub fn nodeplane() -> Self {
        Plugin::new(crate::nodeplane_cni_bin())
    }

    /// A reference plugin from Debian's containernetworking-plugins.
    pub fn reference(name: &str) -> Self {
        let p = format!("/usr/lib/cni/{name}");
        crate::require_tool(&p, "containernetworking-plugins");
        Plugin::new(p)
    }

    /// Builds the command without running it (benchmarks time the spawn too).
    pub fn command(&self, node: &Netns, call: &CniCall<'_>) -> Command {
        let mut cmd = node.command(&self.bin);
        cmd.env_clear()
            .env("CNI_COMMAND", call.command)
            .env("CNI_PATH", &self.cni_path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        if !call.container_id.is_empty() {
            cmd.env("CNI_CONTAINERID", call.container_id);
        }
        if let Some(ns) = call.netns {
            cmd.env("CNI_NETNS", ns);
        }
        if !call.ifname.is_empty() {
            cmd.env("CNI_IFNAME", call.ifname);
        }
        if !call.args.is_empty() {
            cmd.env("CNI_ARGS", call.args);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs one invocation inside `node` and collects its output.
    pub fn run(&self, node: &Netns, call: &CniCall<'_>) -> CniOutput {
        let mut child = self.command(node, call).spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(call.config.as_bytes())
            .expect("write config");
        let out = child.wait_with_output().expect("wait plugin");
        CniOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
