//! Command line (and environment) of `nodeplane-cri-shim`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::{Error, Result};

/// CRI relay between the kubelet and containerd with lifecycle hooks to the
/// nodeplane agent.
#[derive(Debug, Clone, Parser)]
#[command(name = "nodeplane-cri-shim", version)]
pub struct Args {
    /// Socket the kubelet connects to (its --container-runtime-endpoint).
    #[arg(
        long,
        env = "NODEPLANE_CRI_LISTEN",
        default_value = "unix:///run/nodeplane/cri.sock"
    )]
    pub listen: String,

    /// containerd's CRI socket, where every call is relayed.
    #[arg(
        long,
        env = "NODEPLANE_CRI_RUNTIME_ENDPOINT",
        default_value = "unix:///run/containerd/containerd.sock"
    )]
    pub runtime_endpoint: String,

    /// The node agent's local API socket. Without it no hooks are sent.
    #[arg(long, env = "NODEPLANE_CRI_AGENT_ENDPOINT")]
    pub agent_endpoint: Option<String>,

    /// Longest a relayed call waits for a hook's delivery (RunPodSandbox
    /// waits for its labels to reach the agent, up to this).
    #[arg(long, env = "NODEPLANE_CRI_HOOK_TIMEOUT_MS", default_value_t = 100)]
    pub hook_timeout_ms: u64,

    /// Longest one delivery attempt to the agent may take (in the
    /// background; a slow agent still gets the event).
    #[arg(long, env = "NODEPLANE_CRI_AGENT_TIMEOUT_MS", default_value_t = 2000)]
    pub agent_timeout_ms: u64,

    /// Undelivered events kept for replay; beyond it the oldest are dropped
    /// (and counted).
    #[arg(long, env = "NODEPLANE_CRI_HOOK_QUEUE", default_value_t = 4096)]
    pub hook_queue: usize,

    /// Seconds between re-sends of the running pods to the agent (so a
    /// restarted agent learns them again); 0: only when the agent answers
    /// again after failed deliveries.
    #[arg(long, env = "NODEPLANE_CRI_AGENT_RESYNC_SECS", default_value_t = 60)]
    pub agent_resync_secs: u64,

    /// HTTP/2 connections to the runtime, used round-robin by the h2 relay
    /// and by the shim's own calls (the frame relay gives each kubelet
    /// connection one of its own).
    #[arg(long, env = "NODEPLANE_CRI_RUNTIME_CONNECTIONS", default_value_t = 2)]
    pub runtime_connections: usize,

    /// Host directory holding the node runtime's socket, bind-mounted
    /// (read-only) into every container that does not opt out.
    #[arg(
        long,
        env = "NODEPLANE_CRI_RUNTIME_DIR",
        default_value = "/run/nodeplane/runtime"
    )]
    pub runtime_dir: PathBuf,

    /// Where that directory appears inside containers (default: the same path).
    #[arg(long, env = "NODEPLANE_CRI_RUNTIME_MOUNT")]
    pub runtime_mount: Option<PathBuf>,

    /// File name of the runtime's socket inside the directory.
    #[arg(
        long,
        env = "NODEPLANE_CRI_RUNTIME_SOCKET_NAME",
        default_value = "runtime.sock"
    )]
    pub runtime_socket_name: String,

    /// The app runtime's TCP address as pods reach it (the agent's
    /// --runtime-listen), injected as DAPR_HTTP_ENDPOINT and friends.
    #[arg(
        long,
        env = "NODEPLANE_CRI_RUNTIME_HTTP_ADDRESS",
        default_value = "169.254.1.1:3500"
    )]
    pub runtime_http_address: String,

    /// Turn injection off for every pod.
    #[arg(long, env = "NODEPLANE_CRI_NO_INJECT")]
    pub no_inject: bool,

    /// Address for /metrics and /healthz (e.g. 127.0.0.1:9102); off if unset.
    #[arg(long, env = "NODEPLANE_CRI_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Threads relaying calls: 1 (the default) runs everything on one
    /// thread, with no cross-thread hand-offs per call (half the syscalls
    /// per call of the multi-threaded runtime, measured with strace); 0
    /// means one per CPU.
    #[arg(long, env = "NODEPLANE_CRI_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Scheduler slice, in µs, asked for the shim's threads (Linux 6.12 and
    /// later; by the kernel source older ones ignore it). A woken relay thread then preempts
    /// sooner instead of waiting out a busy CPU's slice, for no larger share
    /// of the CPU: on a saturated machine, a shorter tail for more context
    /// switches (the README's "CRI shim" has the figures). 100 to 100000;
    /// 0, the default, keeps the kernel's.
    #[arg(long, env = "NODEPLANE_CRI_SCHED_SLICE_US", default_value_t = 0)]
    pub sched_slice_us: u64,

    /// How calls are relayed: `frames` forwards the kubelet's HTTP/2 frames
    /// over a containerd connection of its own and reads only the lifecycle
    /// calls (about a fifth of the instructions per call); `h2` ends HTTP/2
    /// on both sides and relays each call (the shim's first relay).
    #[arg(long, env = "NODEPLANE_CRI_RELAY", default_value = "frames", value_parser = ["frames", "h2"])]
    pub relay: String,

    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "NODEPLANE_CRI_LOG_JSON")]
    pub log_json: bool,
}

/// Validated settings the library runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: PathBuf,
    pub runtime: PathBuf,
    pub agent: Option<PathBuf>,
    pub hook_timeout: Duration,
    pub agent_timeout: Duration,
    pub hook_queue: usize,
    pub agent_resync: Duration,
    pub runtime_connections: usize,
    pub inject: Option<Injection>,
    pub metrics_listen: Option<SocketAddr>,
    /// Frame relay (`--relay frames`) rather than HTTP/2 on both sides.
    pub frames: bool,
}

/// What CreateContainer adds to containers of pods that do not opt out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub host_dir: PathBuf,
    pub container_dir: PathBuf,
    pub socket_name: String,
    /// The app runtime's HTTP address as pods reach it (host:port), given
    /// to Dapr SDKs through their environment variables.
    pub http_address: String,
}

impl Injection {
    /// The socket's path as a container sees it.
    pub fn socket_in_container(&self) -> String {
        self.container_dir
            .join(&self.socket_name)
            .display()
            .to_string()
    }
}

impl Args {
    pub fn into_config(self) -> Result<Config> {
        let listen = unix_path("--listen", &self.listen)?;
        let runtime = unix_path("--runtime-endpoint", &self.runtime_endpoint)?;
        if listen == runtime {
            return Err(Error::Config(format!(
                "--listen and --runtime-endpoint are both {}: the shim would relay to itself",
                listen.display()
            )));
        }
        let agent = self
            .agent_endpoint
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| unix_path("--agent-endpoint", s))
            .transpose()?;
        if self.runtime_connections == 0 || self.runtime_connections > 64 {
            return Err(Error::Config(format!(
                "--runtime-connections {} must be between 1 and 64",
                self.runtime_connections
            )));
        }
        if self.hook_queue == 0 {
            return Err(Error::Config("--hook-queue must be at least 1".into()));
        }
        // The kernel clamps a custom slice to 0.1–100 ms; refuse rather than
        // let it quietly differ from what was asked.
        if self.sched_slice_us != 0 && !(100..=100_000).contains(&self.sched_slice_us) {
            return Err(Error::Config(format!(
                "--sched-slice-us {} must be 0 (the kernel's default) or between 100 and 100000",
                self.sched_slice_us
            )));
        }
        if self.agent_timeout_ms == 0 {
            return Err(Error::Config(
                "--agent-timeout-ms must be at least 1".into(),
            ));
        }
        let inject = if self.no_inject {
            None
        } else {
            let container_dir = self
                .runtime_mount
                .unwrap_or_else(|| self.runtime_dir.clone());
            for (flag, p) in [
                ("--runtime-dir", &self.runtime_dir),
                ("--runtime-mount", &container_dir),
            ] {
                if !p.is_absolute() {
                    return Err(Error::Config(format!(
                        "{flag} {} must be an absolute path",
                        p.display()
                    )));
                }
            }
            if self.runtime_socket_name.is_empty() || self.runtime_socket_name.contains('/') {
                return Err(Error::Config(format!(
                    "--runtime-socket-name {:?} must be a plain file name",
                    self.runtime_socket_name
                )));
            }
            if self
                .runtime_http_address
                .parse::<std::net::SocketAddr>()
                .is_err()
            {
                return Err(Error::Config(format!(
                    "--runtime-http-address {:?} must be address:port (e.g. 169.254.1.1:3500)",
                    self.runtime_http_address
                )));
            }
            Some(Injection {
                host_dir: self.runtime_dir,
                container_dir,
                socket_name: self.runtime_socket_name,
                http_address: self.runtime_http_address,
            })
        };
        Ok(Config {
            listen,
            runtime,
            agent,
            hook_timeout: Duration::from_millis(self.hook_timeout_ms),
            agent_timeout: Duration::from_millis(self.agent_timeout_ms),
            hook_queue: self.hook_queue,
            agent_resync: Duration::from_secs(self.agent_resync_secs),
            runtime_connections: self.runtime_connections,
            inject,
            metrics_listen: self.metrics_listen,
            frames: self.relay == "frames",
        })
    }
}

/// `unix:///abs/path` (or a bare absolute path, as crictl accepts) → the path.
pub fn unix_path(flag: &str, endpoint: &str) -> Result<PathBuf> {
    let path = match endpoint.split_once("://") {
        Some(("unix", rest)) => rest,
        Some((scheme, _)) => {
            return Err(Error::Config(format!(
                "{flag} {endpoint:?}: scheme {scheme:?} is not supported, use unix:///path/to.sock"
            )))
        }
        None => endpoint,
    };
    if !Path::new(path).is_absolute() {
        return Err(Error::Config(format!(
            "{flag} {endpoint:?}: needs an absolute socket path, e.g. unix:///run/containerd/containerd.sock"
        )));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config> {
        let mut v = vec!["nodeplane-cri-shim"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
            .map_err(|e| Error::Config(e.to_string()))?
            .into_config()
    }

    #[test]
    fn endpoints_accept_unix_urls_and_bare_paths() {
        assert_eq!(
            unix_path("--x", "unix:///run/a.sock").ok(),
            Some("/run/a.sock".into())
        );
        assert_eq!(
            unix_path("--x", "/run/a.sock").ok(),
            Some("/run/a.sock".into())
        );
    }

    #[test]
    fn endpoints_reject_tcp_and_relative_paths_naming_the_flag() {
        let e = unix_path("--runtime-endpoint", "tcp://127.0.0.1:1")
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("--runtime-endpoint") && e.contains("tcp"), "{e}");
        let e = unix_path("--listen", "unix://run/a.sock")
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn defaults_inject_the_runtime_dir_at_the_same_path() {
        let c = parse(&[
            "--listen",
            "unix:///tmp/s.sock",
            "--runtime-endpoint",
            "/tmp/c.sock",
        ])
        .expect("parse");
        let inj = c.inject.expect("injection on by default");
        assert_eq!(inj.host_dir, PathBuf::from("/run/nodeplane/runtime"));
        assert_eq!(inj.container_dir, inj.host_dir);
        assert_eq!(
            inj.socket_in_container(),
            "/run/nodeplane/runtime/runtime.sock"
        );
        assert_eq!(c.hook_timeout, Duration::from_millis(100));
        assert!(c.agent.is_none());
    }

    #[test]
    fn a_scheduler_slice_outside_the_kernels_range_is_refused() {
        let base = [
            "--listen",
            "/tmp/a.sock",
            "--runtime-endpoint",
            "/tmp/b.sock",
        ];
        for ok in ["0", "100", "100000"] {
            let mut a = base.to_vec();
            a.extend(["--sched-slice-us", ok]);
            assert!(parse(&a).is_ok(), "--sched-slice-us {ok} must be accepted");
        }
        for bad in ["50", "100001"] {
            let mut a = base.to_vec();
            a.extend(["--sched-slice-us", bad]);
            let e = parse(&a).expect_err("must be refused");
            assert!(e.to_string().contains("--sched-slice-us"), "{e}");
        }
    }

    #[test]
    fn bad_combinations_are_refused() {
        let e = parse(&[
            "--listen",
            "/tmp/x.sock",
            "--runtime-endpoint",
            "/tmp/x.sock",
        ])
        .expect_err("must be refused");
        assert!(e.to_string().contains("relay to itself"), "{e}");
        let e = parse(&["--runtime-connections", "0"]).expect_err("must be refused");
        assert!(e.to_string().contains("--runtime-connections"), "{e}");
        let e = parse(&["--runtime-socket-name", "a/b"]).expect_err("must be refused");
        assert!(e.to_string().contains("plain file name"), "{e}");
        let e = parse(&["--runtime-mount", "rel/dir"]).expect_err("must be refused");
        assert!(e.to_string().contains("--runtime-mount"), "{e}");
        let c = parse(&[
            "--no-inject",
            "--agent-endpoint",
            "unix:///run/nodeplane/agent.sock",
        ])
        .expect("parse");
        assert!(c.inject.is_none());
        assert_eq!(c.agent, Some(PathBuf::from("/run/nodeplane/agent.sock")));
    }
}
