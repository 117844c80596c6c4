//! A `nodeplane-agent csi` under test: its own pool (a loop-mounted xfs,
//! btrfs or ext4 image in a temp dir), its own state dir and socket, all in a
//! private mount namespace held by a `sleep` process, so no mount is ever
//! visible on the host. kill -9 of the agent keeps the namespace (and its
//! mounts); `reboot()` drops the namespace, detaches every loop device and
//! starts over, as a node reboot would. Drop cleans everything up, even when
//! the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use nodeplane_proto::csi;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::TempDir;

pub use csi::controller_client::ControllerClient;
pub use csi::identity_client::IdentityClient;
pub use csi::node_client::NodeClient;
pub use nodeplane_proto::pluginregistration::registration_client::RegistrationClient;

/// A mount namespace kept alive by a sleeping process.
#[derive(Debug)]
struct MountNs {
    holder: Child,
}

impl MountNs {
    fn new() -> MountNs {
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux)");
        // Wait until the child is in its own namespace.
        let me = std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns");
        let start = Instant::now();
        loop {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/mnt", holder.id())) {
                if ns != me {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "unshare did not make a mount namespace"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        MountNs { holder }
    }

    fn pid(&self) -> u32 {
        self.holder.id()
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid().to_string())
            .arg("-m")
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// How the world's driver runs.
#[derive(Debug)]
enum Mode {
    /// `nodeplane-agent csi ...`: the standalone driver.
    Standalone,
    /// The normal agent (standalone source: a manifests directory) serving
    /// CSI beside its other work (`--csi-pool`, `--csi-endpoint`,
    /// `--csi-registration-dir`), in its own network namespace so its
    /// nftables table and HTTP port stay private.
    Agent {
        netns: crate::Netns,
        port: u16,
        /// Wait for the CSI socket at start.
        wait: bool,
    },
}

/// Pool filesystem of a test world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFs {
    Xfs,
    Btrfs,
    Ext4,
}

#[derive(Debug)]
pub struct CsiWorld {
    pub dir: TempDir,
    pub pool: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub node_id: String,
    pub fs: PoolFs,
    pool_image: PathBuf,
    pool_dev: String,
    ns: Option<MountNs>,
    agent: Option<Child>,
    extra: Vec<String>,
    crash_at: Option<String>,
    pause_at: Option<String>,
    mode: Mode,
}

fn must(o: std::io::Result<Output>, what: &str) -> String {
    let o = o.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Checks every tool the CSI tests and the driver use, naming the package.
pub fn require_tools() {
    crate::prereq::require_csi_tools();
}

impl CsiWorld {
    /// A pool of `mib` MiB on `fs`, and the agent serving it.
    pub fn start(fs: PoolFs, mib: u64) -> CsiWorld {
        Self::start_with(fs, mib, &[])
    }

    pub fn start_with(fs: PoolFs, mib: u64, extra: &[&str]) -> CsiWorld {
        Self::start_mode(fs, mib, extra, Mode::Standalone)
    }

    /// Like [`CsiWorld::start`], but the normal `nodeplane-agent` serves
    /// CSI (with its plugin registration in [`CsiWorld::registry`]).
    pub fn start_agent(fs: PoolFs, mib: u64) -> CsiWorld {
        Self::start_agent_with(fs, mib, &[], true)
    }

    /// The normal agent with `extra` flags; with `wait` false, does not
    /// wait for the CSI socket (a driver that is meant not to start).
    pub fn start_agent_with(fs: PoolFs, mib: u64, extra: &[&str], wait: bool) -> CsiWorld {
        crate::prereq::require_tool("nft", "nftables");
        let netns = crate::Netns::new("csiag");
        let port = 20000 + ((std::process::id() + 7919) % 20000) as u16;
        Self::start_mode(fs, mib, extra, Mode::Agent { netns, port, wait })
    }

    fn start_mode(fs: PoolFs, mib: u64, extra: &[&str], mode: Mode) -> CsiWorld {
        require_tools();
        let dir = TempDir::new("csi");
        let pool_image = dir.path().join("pool.img");
        let pool = dir.path().join("pool");
        let state = match mode {
            Mode::Standalone => dir.path().join("state"),
            // The agent keeps CSI state in <state-dir>/csi.
            Mode::Agent { .. } => dir.path().join("state").join("csi"),
        };
        std::fs::create_dir_all(&pool).expect("mkdir pool");
        let f = std::fs::File::create(&pool_image).expect("pool image");
        f.set_len(mib << 20).expect("size pool image");
        drop(f);
        let img = pool_image.to_string_lossy().into_owned();
        match fs {
            PoolFs::Xfs => must(
                Command::new("mkfs.xfs").args(["-q", "-f", &img]).output(),
                "mkfs.xfs pool",
            ),
            PoolFs::Btrfs => must(
                Command::new("mkfs.btrfs").args(["-q", "-f", &img]).output(),
                "mkfs.btrfs pool",
            ),
            PoolFs::Ext4 => must(
                Command::new("mkfs.ext4").args(["-q", "-F", &img]).output(),
                "mkfs.ext4 pool",
            ),
        };
        let pool_dev = must(
            Command::new("losetup")
                .args(["--find", "--show", &img])
                .output(),
            "losetup pool",
        )
        .trim()
        .to_string();
        let socket = dir.path().join("csi.sock");
        let log = dir.path().join("agent.log");
        let node_id = crate::unique("node");
        let mut w = CsiWorld {
            dir,
            pool,
            state,
            socket,
            log,
            node_id,
            fs,
            pool_image,
            pool_dev,
            ns: None,
            agent: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            crash_at: None,
            pause_at: None,
            mode,
        };
        w.boot();
        w
    }

    /// A fresh mount namespace with the pool mounted, and the agent.
    fn boot(&mut self) {
        let ns = MountNs::new();
        must(
            ns.command("mount")
                .arg(&self.pool_dev)
                .arg(&self.pool)
                .output(),
            "mount pool",
        );
        self.ns = Some(ns);
        self.spawn();
    }

    fn ns(&self) -> &MountNs {
        self.ns.as_ref().expect("namespace")
    }

    /// Starts the agent (in the world's mount namespace) and waits for its socket.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let endpoint = format!("unix://{}", self.socket.display());
        let mut cmd = self.ns().command(crate::agent::agent_bin());
        match &self.mode {
            Mode::Standalone => {
                cmd.arg("csi")
                    .arg("--endpoint")
                    .arg(&endpoint)
                    .arg("--node-id")
                    .arg(&self.node_id)
                    .arg("--state-dir")
                    .arg(&self.state)
                    .arg("--pool")
                    .arg(&self.pool);
            }
            Mode::Agent { netns, port, .. } => {
                let d = self.dir.path();
                for sub in ["manifests", "cni"] {
                    std::fs::create_dir_all(d.join(sub)).expect("mkdir");
                }
                // nsenter enters the mount namespace; the network namespace
                // is entered before it runs and carries over.
                crate::netns::enter_in_child(&mut cmd, netns.open());
                cmd.arg("--node-name")
                    .arg(&self.node_id)
                    .arg("--manifests-dir")
                    .arg(d.join("manifests"))
                    .arg("--state-dir")
                    .arg(d.join("state"))
                    .arg("--cni-state-dir")
                    .arg(d.join("cni"))
                    .arg("--socket")
                    .arg(d.join("agent.sock"))
                    .arg("--runtime-dir")
                    .arg(d.join("runtime"))
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--log-level")
                    .arg("info")
                    .arg("--csi-pool")
                    .arg(&self.pool)
                    .arg("--csi-endpoint")
                    .arg(&endpoint)
                    .arg("--csi-registration-dir")
                    .arg(self.registry());
            }
        }
        let child = cmd
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .env(
                "NODEPLANE_CSI_CRASH_AT",
                self.crash_at.clone().unwrap_or_default(),
            )
            .env(
                "NODEPLANE_CSI_PAUSE_AT",
                self.pause_at.clone().unwrap_or_default(),
            )
            .env("NODEPLANE_CSI_PAUSE_RELEASE", self.pause_release())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn nodeplane-agent");
        self.agent = Some(child);
        if matches!(self.mode, Mode::Agent { wait: false, .. }) {
            return;
        }
        let start = Instant::now();
        while !self.socket.exists() {
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nodeplane-agent csi exited ({st}); log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no CSI socket within 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The kubelet plugin-registration directory (agent mode).
    pub fn registry(&self) -> PathBuf {
        self.dir.path().join("plugins_registry")
    }

    /// GET `path` from the agent's HTTP endpoint (agent mode): (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let Mode::Agent { netns, port, .. } = &self.mode else {
            panic!("http_get: the standalone driver has no HTTP endpoint");
        };
        crate::agent::http_get_in(&netns.path(), *port, path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9 of the agent (mounts and loop devices stay, as after a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// From the next (re)start on, the driver SIGKILLs itself at `step`
    /// (see the driver's crash points); `None` disarms.
    pub fn set_crash(&mut self, step: Option<&str>) {
        self.crash_at = step.map(str::to_string);
    }

    /// From the next start, operations reaching `step` wait there (volume
    /// lock held) until [`CsiWorld::release_pause`].
    pub fn set_pause(&mut self, step: Option<&str>) {
        let _ = std::fs::remove_file(self.pause_release());
        self.pause_at = step.map(str::to_string);
    }

    fn pause_release(&self) -> PathBuf {
        self.dir.path().join("pause-release")
    }

    /// Lets paused operations go on.
    pub fn release_pause(&self) {
        std::fs::write(self.pause_release(), b"").expect("pause release file");
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A node reboot: the agent dies, every mount goes (the namespace is
    /// dropped), every loop device of the pool is detached; then the pool is
    /// mounted again and the agent starts.
    pub fn reboot(&mut self) {
        self.kill9();
        // Unmount everything first, as a shutdown does, so loop devices are free.
        self.unmount_all();
        self.detach_volume_loops();
        self.ns = None;
        self.detach_volume_loops();
        self.boot();
    }

    /// Unmounts every mount under the world's directory but the pool,
    /// deepest first (mountinfo lists a mount after its parent). A frozen
    /// filesystem (a test that failed mid-snapshot) is thawed first: a
    /// frozen superblock outlives its mounts and would pin the pool.
    fn unmount_all(&self) {
        let mut ms = self.mounts();
        ms.reverse();
        for m in ms {
            let _ = self.sh(&format!(
                "fsfreeze --unfreeze {m} 2>/dev/null; umount {m} 2>/dev/null || umount -l {m} 2>/dev/null; true"
            ));
        }
    }

    /// Detaches every loop device whose backing file lives on the pool:
    /// by path while the namespace holding the pool mount exists, and by
    /// the backing file's device number (its path loses the pool prefix
    /// once the namespace is gone; this finds only xfs and ext4 pools,
    /// whose files carry the pool device's number, not btrfs's anonymous one).
    fn detach_volume_loops(&self) {
        let prefix = format!("{}/", self.pool.display());
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                    if b.starts_with(&prefix) {
                        let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                        let _ = Command::new("losetup")
                            .args(["-d", &dev])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
        let pool_dev = std::fs::read_to_string(format!(
            "/sys/block/{}/dev",
            self.pool_dev.trim_start_matches("/dev/")
        ))
        .unwrap_or_default()
        .trim()
        .to_string();
        let Ok(out) = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "NAME,BACK-MAJ:MIN"])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 2 && f[1] == pool_dev && !pool_dev.is_empty() {
                let _ = Command::new("losetup").args(["-d", f[0]]).status();
            }
        }
    }

    /// Loop devices backed by files in this world's pool.
    pub fn volume_loops(&self) -> Vec<String> {
        let prefix = format!("{}/", self.pool.display());
        let mut out = vec![];
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                    if b.starts_with(&prefix) {
                        out.push(b.trim().to_string());
                    }
                }
            }
        }
        out
    }

    /// Runs `script` with sh inside the world's mount namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.ns()
            .command("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("nsenter sh")
    }

    /// Like `sh` but panics on failure; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        must(Ok(self.sh(script)), script)
    }

    /// Mount points (inside the namespace) under the world's directory.
    pub fn mounts(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        self.sh_ok("cat /proc/self/mountinfo")
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix) && *m != self.pool.to_string_lossy())
            .collect()
    }

    /// A directory under the world's temp dir (a CO's staging/target parent).
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("kubelet").join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        p
    }

    /// A channel to the driver, retried while the socket is being set up.
    pub async fn channel(&self) -> Channel {
        self.unix_channel(&self.socket, "the CSI socket").await
    }

    /// A channel over the unix socket `path`, retried for 20 s while it is
    /// being set up.
    async fn unix_channel(&self, path: &Path, what: &str) -> Channel {
        let start = Instant::now();
        loop {
            let socket = path.to_path_buf();
            let r = Endpoint::from_static("http://localhost")
                .timeout(Duration::from_secs(120))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(s))
                    }
                }))
                .await;
            match r {
                Ok(ch) => return ch,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    panic!(
                        "connect to {what} {}: {e}; log:\n{}",
                        path.display(),
                        self.log_text()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Does what the kubelet's plugin watcher does with the registration
    /// socket the driver made in `dir`: GetInfo must name the driver, its
    /// endpoint and version 1.0.0, and NotifyRegistrationStatus
    /// (registered) must be accepted. Returns the client for more calls.
    pub async fn registered(&self, dir: &Path) -> RegistrationClient<Channel> {
        use nodeplane_proto::pluginregistration as reg;
        let sock = dir.join("csi.nodeplane.io-reg.sock");
        let mut c =
            RegistrationClient::new(self.unix_channel(&sock, "the registration socket").await);
        let info = c
            .get_info(reg::InfoRequest {})
            .await
            .expect("GetInfo")
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.nodeplane.io");
        assert_eq!(info.endpoint, self.socket.to_string_lossy());
        assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);
        c.notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .expect("NotifyRegistrationStatus");
        c
    }

    /// Names in a directory as seen inside the world's mount namespace.
    pub fn ls(&self, dir: &Path) -> Vec<String> {
        self.sh_ok(&format!("ls -A {}", dir.display()))
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub async fn clients(&self) -> Clients {
        let ch = self.channel().await;
        Clients {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        }
    }

    pub fn pool_path(&self) -> &Path {
        &self.pool
    }
}

impl Drop for CsiWorld {
    fn drop(&mut self) {
        self.kill9();
        if self.ns.is_some() {
            self.unmount_all();
        }
        self.detach_volume_loops();
        self.ns = None;
        // The pool's superblock goes when the namespace is gone and no loop
        // device holds a file on it; detach the pool's device then.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            self.detach_volume_loops();
            let _ = Command::new("losetup")
                .args(["-d", &self.pool_dev])
                .stderr(Stdio::null())
                .status();
            let name = self.pool_dev.trim_start_matches("/dev/");
            if !Path::new(&format!("/sys/block/{name}/loop")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&self.pool_image);
    }
}

#[derive(Debug, Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// CreateVolume of `name` with `bytes` required and one capability.
pub fn create_req(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// A mount capability with `fs` ("" = driver default) and `mode`.
pub fn mount_cap(
    fs: &str,
    mode: csi::volume_capability::access_mode::Mode,
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn rw() -> csi::volume_capability::access_mode::Mode {
    csi::volume_capability::access_mode::Mode::SingleNodeWriter
}

pub const MIB: i64 = 1 << 20;
