//! Harness for the CRI shim: the `nodeplane-cri-shim` process in front of a
//! runtime socket, a stand-in node agent that records what the shim (and
//! nodeplane-cni) tell it, raw gRPC calls by path, and a small gRPC server
//! that plays a CRI runtime for the cases containerd 1.6 cannot show
//! (streamed events, metadata and trailers echoed back).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerConfig, ContainerMetadata, ImageSpec, PodSandboxConfig};
use nodeplane_proto::agent::{request::What, PodLifecycle, Reply, Request};
use nodeplane_proto::prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::TempDir;

pub mod raw;
pub mod server;

/// How long the shim gets to create its socket.
const START: Duration = Duration::from_secs(10);

/// For the relays measured in the shim's place (`cri-pump` and the like):
/// the unix path of the shim's `--NAME=unix://PATH` in this process's
/// command line, as `Shim::start` passes it.
pub fn shim_arg(name: &str) -> Option<PathBuf> {
    let prefix = format!("--{name}=unix://");
    std::env::args().find_map(|a| a.strip_prefix(&prefix).map(PathBuf::from))
}

/// Path to the `nodeplane-cri-shim` binary built alongside the running test.
pub fn shim_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NODEPLANE_CRI_SHIM_BIN") {
        return PathBuf::from(p);
    }
    let p = crate::target_dir().join("nodeplane-cri-shim");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p nodeplane-cri-shim` (cargo test --workspace does this)",
        p.display()
    );
    p
}

/// A running `nodeplane-cri-shim`; killed on drop.
#[derive(Debug)]
pub struct Shim {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub metrics_port: u16,
    args: Vec<String>,
}

impl Shim {
    /// Starts the shim relaying to `runtime`, with `extra` flags (e.g.
    /// `--agent-endpoint`, `--runtime-dir`). Injection defaults to a
    /// runtime dir inside the shim's temp dir, never the machine's /run.
    pub fn start(runtime: &Path, extra: &[&str]) -> Shim {
        let dir = TempDir::new("shim");
        let socket = dir.path().join("cri.sock");
        let metrics_port = free_port();
        let mut args = vec![
            format!("--listen=unix://{}", socket.display()),
            format!("--runtime-endpoint=unix://{}", runtime.display()),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
        ];
        if !extra.iter().any(|a| a.starts_with("--log-level")) {
            args.push("--log-level=debug,h2=info,hyper=info".to_string());
        }
        if !extra.iter().any(|a| a.starts_with("--runtime-dir")) {
            args.push(format!(
                "--runtime-dir={}",
                dir.path().join("runtime").display()
            ));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.path().join("shim.log");
        let mut shim = Shim {
            child: None,
            dir,
            socket,
            log,
            metrics_port,
            args,
        };
        shim.spawn();
        shim
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open shim log");
        let mut cmd = Command::new(shim_bin());
        cmd.args(&self.args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl only; the shim dies with a killed test process.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        self.child = Some(cmd.spawn().expect("spawn nodeplane-cri-shim"));
        let deadline = Instant::now() + START;
        while !self.socket.exists() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nodeplane-cri-shim exited during start-up ({st}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "shim socket not created:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9, as a crash would (the socket file stays behind).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its exit status once it has exited (reaped), else `None`.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    /// Starts it again with the same flags on the same socket.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The shim's /metrics text.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// One counter or gauge from /metrics (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// A channel to the shim's socket.
    pub async fn channel(&self) -> Channel {
        crate::containerd::connect_channel(self.socket.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to the shim: {e}\n{}", self.log_text()))
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- nodeplane-cri-shim log ---\n{}", self.log_text());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One request the stand-in agent received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub what: What,
}

/// A stand-in for nodeplane-agent's local API: records every request in
/// arrival order, answers each after `delay`, and can be taken down and
/// brought back on the same socket.
#[derive(Debug, Clone)]
pub struct FakeAgent {
    pub socket: PathBuf,
    pub received: Arc<Mutex<Vec<Received>>>,
    delay_ms: Arc<AtomicU64>,
    up: Arc<AtomicBool>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl FakeAgent {
    /// Listens at `socket` (call inside a tokio runtime).
    pub fn start(socket: PathBuf) -> FakeAgent {
        let a = FakeAgent {
            socket,
            received: Arc::default(),
            delay_ms: Arc::default(),
            up: Arc::default(),
            task: Arc::default(),
        };
        a.up();
        a
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Stops listening and removes the socket (connections then fail).
    pub fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    pub fn up(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener =
            tokio::net::UnixListener::bind(&self.socket).expect("bind fake agent socket");
        self.up.store(true, Ordering::Relaxed);
        let (received, delay) = (self.received.clone(), self.delay_ms.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (received, delay) = (received.clone(), delay.clone());
                tokio::spawn(async move {
                    let Ok(req) = read_delimited::<Request>(&mut s).await else {
                        return;
                    };
                    let d = delay.load(Ordering::Relaxed);
                    if d > 0 {
                        tokio::time::sleep(Duration::from_millis(d)).await;
                    }
                    if let Some(what) = req.what {
                        // Recorded once answered: a late answer the shim
                        // gave up on is not a delivery, and its retry is.
                        let reply = Reply {
                            programmed: true,
                            error: String::new(),
                            generation: 1,
                        };
                        if s.write_all(&reply.encode_length_delimited_to_vec())
                            .await
                            .is_ok()
                        {
                            let _ = s.shutdown().await;
                            received
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Received {
                                    at: Instant::now(),
                                    what,
                                });
                        }
                    }
                });
            }
        });
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Every lifecycle event so far, in arrival order.
    pub fn lifecycle(&self) -> Vec<PodLifecycle> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|r| match &r.what {
                What::Lifecycle(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits until `pred` holds for the lifecycle events, or panics with them.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[PodLifecycle]) -> bool,
    ) -> Vec<PodLifecycle> {
        let deadline = Instant::now() + timeout;
        loop {
            let evs = self.lifecycle();
            if pred(&evs) {
                return evs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; events so far: {:#?}",
                    evs.iter().map(brief).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        // Only the last clone takes the socket down.
        if Arc::strong_count(&self.task) == 1 {
            self.down();
        }
    }
}

/// "KIND pod sandbox container" for failure messages.
pub fn brief(e: &PodLifecycle) -> String {
    format!(
        "{:?} {}/{} sb={} c={} seq={} replayed={}",
        e.kind(),
        e.pod_namespace,
        e.pod_name,
        short(&e.sandbox_id),
        short(&e.container_id),
        e.sequence,
        e.replayed
    )
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

async fn read_delimited<M: Message + Default>(
    s: &mut tokio::net::UnixStream,
) -> std::io::Result<M> {
    let mut len = 0usize;
    for shift in (0..35).step_by(7) {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut buf = vec![0; len];
    s.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(std::io::Error::other)
}

/// A container of [`crate::containerd::APP_IMAGE`] named `name`.
pub fn app_container(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: crate::containerd::APP_IMAGE.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `config` with labels and annotations added.
pub fn with_meta(
    mut config: PodSandboxConfig,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> PodSandboxConfig {
    config
        .labels
        .extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    config.annotations.extend(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    config
}

/// StopContainer (1 s grace) then RemoveContainer, through `cri`.
/// containerd 1.6 sometimes loses a race with the container's own runc
/// shim exiting and answers StopContainer with "failed to kill container:
/// ttrpc: closed" (the task is gone by then); the kubelet retries
/// StopContainer, and so does this, once.
pub async fn stop_and_remove_container(
    cri: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    id: &str,
) {
    use k8s_cri::v1::{RemoveContainerRequest, StopContainerRequest};
    let call = Duration::from_secs(60);
    let stop = StopContainerRequest {
        container_id: id.into(),
        timeout: 1,
    };
    let first = tokio::time::timeout(call, cri.stop_container(stop.clone()))
        .await
        .expect("StopContainer timed out");
    if let Err(e) = first {
        eprintln!("StopContainer {id}: {e}; retrying once");
        tokio::time::timeout(call, cri.stop_container(stop))
            .await
            .expect("StopContainer timed out")
            .unwrap_or_else(|e| panic!("StopContainer {id} (retry): {e}"));
    }
    tokio::time::timeout(
        call,
        cri.remove_container(RemoveContainerRequest {
            container_id: id.into(),
        }),
    )
    .await
    .expect("RemoveContainer timed out")
    .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
}
