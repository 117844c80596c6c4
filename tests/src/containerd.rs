//! A private containerd (Debian's 1.6) whose CRI plugin uses a CNI network
//! under test, for tests that drive a CNI plugin through a real container
//! runtime with a real CRI client.
//!
//! containerd runs as a child process inside its own "node" network namespace,
//! so every veth and route the CNI plugin makes lands there and never on the
//! machine running the tests. Its root, state, sockets, runc state, pod network
//! namespace mounts, CNI configuration and plugin state all live under one
//! temporary directory. A few paths are hard-coded by containerd 1.6 and cannot
//! be moved: shim sockets in /run/containerd/s, libcni's result cache in
//! /var/lib/cni/results and the pods' cgroups. Drop removes those too, after
//! tearing down any pod sandbox still running, so a panicking test leaves
//! nothing behind.
//!
//! There is no registry: the sandbox ("pause") image is built here as an OCI
//! image layout holding only a static busybox, and imported with `ctr`.

use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, StatusRequest, StopPodSandboxRequest,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{Netns, TempDir};

/// The sandbox image every pod of the private containerd runs.
pub const PAUSE_IMAGE: &str = "nodeplane.test/pause:1";
/// An application image (static busybox, sleeping) for CreateContainer;
/// import it with [`Containerd::import_app_image`].
pub const APP_IMAGE: &str = "nodeplane.test/app:1";
/// The containerd namespace the CRI plugin keeps its pods in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The node's own addresses in its namespace (private ranges that never
/// clash with the pod CIDRs).
pub const NODE_IPV4: &str = "10.10.0.10/32";
pub const NODE_IPV6: &str = "fd00:10:10::10/128";
/// Placeholder in a conflist for the directory the plugins keep state in.
pub const STATE_PLACEHOLDER: &str = "@CNI_STATE_DIR@";

/// How long containerd gets to come up, and each CRI call to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Which IPAM keeps allocations, so leftovers can be found after teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipam {
    /// nodeplane-cni's own store: one file per allocation under
    /// `<stateDir>/<network>/ips` and `<stateDir>/<network>/attachments`.
    Nodeplane,
    /// The reference host-local plugin: one file per allocated address under
    /// `<dataDir>/<network>`, next to a lock file and last-reserved markers.
    HostLocal,
}

/// The CNI network the CRI plugin is configured with.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    /// The conflist's `name` (also the directory IPAM state is kept under).
    pub name: String,
    /// Executables exposed in containerd's CNI bin_dir, as (name, target).
    /// `loopback` is always added: containerd sets up `lo` with it.
    pub plugins: Vec<(String, PathBuf)>,
    /// The conflist; [`STATE_PLACEHOLDER`] is replaced by the state dir.
    pub conflist: String,
    /// Prefix of the host-side veth names the main plugin creates.
    pub host_veth_prefix: String,
    /// Where allocations are recorded.
    pub ipam: Ipam,
}

impl CniNetwork {
    /// nodeplane-cni (as built with the running test) chained with portmap,
    /// allocating from `pod_cidrs` (one per address family).
    pub fn nodeplane(pod_cidrs: &[&str]) -> Self {
        let name = "nodeplane";
        let conflist = serde_json::json!({
            // containerd 1.6's go-cni does not know CNI 1.1.0 yet.
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "nodeplane-cni",
                    "podCIDRs": pod_cidrs,
                    "stateDir": STATE_PLACEHOLDER,
                    "mtu": 1500
                },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ]
        });
        CniNetwork {
            name: name.into(),
            plugins: vec![
                ("nodeplane-cni".into(), crate::nodeplane_cni_bin()),
                ("portmap".into(), reference_plugin("portmap")),
            ],
            conflist: conflist.to_string(),
            host_veth_prefix: "np".into(),
            ipam: Ipam::Nodeplane,
        }
    }

    /// The reference ptp + host-local plugins: a baseline that tells a broken
    /// harness from a broken nodeplane-cni.
    pub fn reference_ptp(subnet: &str) -> Self {
        let name = "nodeplane";
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "ptp",
                    "ipam": { "type": "host-local", "subnet": subnet, "dataDir": STATE_PLACEHOLDER }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ]
        });
        CniNetwork {
            name: name.into(),
            plugins: ["ptp", "host-local", "portmap"]
                .into_iter()
                .map(|p| (p.to_string(), reference_plugin(p)))
                .collect(),
            conflist: conflist.to_string(),
            host_veth_prefix: "veth".into(),
            ipam: Ipam::HostLocal,
        }
    }
}

fn reference_plugin(name: &str) -> PathBuf {
    crate::require_tool(
        &format!("/usr/lib/cni/{name}"),
        "containernetworking-plugins",
    )
}

/// A running private containerd; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    network: CniNetwork,
    cgroup_parent: String,
    // Dropped after Drop::drop has stopped containerd and unmounted
    // everything below `dir`: first the temp dir, then the node namespace.
    dir: TempDir,
    node: Netns,
}

impl Containerd {
    /// Starts containerd in a fresh node namespace with `network` as its CNI
    /// network and the pause image imported. Panics (naming the Debian
    /// package) when a prerequisite is missing, and with containerd's log when
    /// it does not come up.
    ///
    /// Call it on the thread that keeps the handle (the test's own thread,
    /// not `spawn_blocking`): containerd is killed when that thread exits, so
    /// a killed test process does not leave it running.
    pub fn start(network: CniNetwork) -> Self {
        crate::require_root();
        for tool in ["containerd", "containerd-shim-runc-v2", "ctr"] {
            crate::require_tool(tool, "containerd");
        }
        crate::require_tool("runc", "runc");
        crate::require_tool("/bin/busybox", "busybox-static");
        reference_plugin("loopback");

        let node = Netns::new("npctd");
        // Forwarding only inside the node namespace: pods route through it.
        node.sysctl("net.ipv4.ip_forward", "1");
        // A real node has an address of its own; without one it has no
        // source address to reach a pod from (plugins that route pods via a
        // link-local gateway put no address on the host-side veth). On `lo`
        // because this kernel has no dummy links.
        node.ip(&["addr", "add", NODE_IPV4, "dev", "lo"]);
        node.ip(&["addr", "add", NODE_IPV6, "dev", "lo"]);
        let dir = TempDir::new("ctd");
        let cgroup_parent = format!("/{}", crate::unique("nodeplane-ctd-"));
        // Built before anything can fail so that Drop cleans up after a
        // failed start too.
        let mut ctd = Containerd {
            child: None,
            network,
            cgroup_parent,
            dir,
            node,
        };

        ctd.write_cni_config();
        ctd.write_config();
        ctd.spawn();
        ctd.import_pause_image();
        ctd
    }

    /// containerd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node namespace containerd and the CNI plugins run in.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The CNI network containerd was configured with.
    pub fn network(&self) -> &CniNetwork {
        &self.network
    }

    /// The temporary directory holding all of this containerd's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC (CRI) socket.
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// Where the CNI plugins keep their state (`stateDir` / `dataDir`).
    pub fn cni_state_dir(&self) -> PathBuf {
        self.dir().join("cni-state")
    }

    /// containerd's own state directory (its `state` setting).
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// Where the CRI plugin bind-mounts pod network namespaces
    /// (`netns_mounts_under_state_dir`), instead of the machine's /run/netns.
    pub fn netns_dir(&self) -> PathBuf {
        self.state_dir()
            .join("io.containerd.grpc.v1.cri")
            .join("netns")
    }

    /// containerd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("containerd.log")
    }

    /// containerd's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// A pod sandbox config with the metadata the kubelet would send and a
    /// cgroup parent this harness removes on drop.
    pub fn sandbox_config(&self, name: &str) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: crate::unique(&format!("{name}-uid-")),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Connects a CRI runtime client and waits until containerd reports both
    /// the runtime and the network ready.
    pub async fn connect(&self) -> RuntimeServiceClient<Channel> {
        let channel = tokio::time::timeout(START_TIMEOUT, connect_channel(self.socket()))
            .await
            .unwrap_or_else(|_| self.fail("timed out connecting to the CRI socket"))
            .unwrap_or_else(|e| self.fail(&format!("connecting to the CRI socket: {e}")));
        let mut client = RuntimeServiceClient::new(channel);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = tokio::time::timeout(
                CALL_TIMEOUT,
                client.status(StatusRequest { verbose: false }),
            )
            .await
            .unwrap_or_else(|_| self.fail("CRI Status timed out"))
            .unwrap_or_else(|e| self.fail(&format!("CRI Status: {e}")))
            .into_inner();
            let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
            let ready = |t: &str| conditions.iter().any(|c| c.r#type == t && c.status);
            if ready("RuntimeReady") && ready("NetworkReady") {
                return client;
            }
            if Instant::now() > deadline {
                self.fail(&format!("containerd not ready: {conditions:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills containerd (SIGKILL) and starts it again on the same root,
    /// state and socket, as a crash and a supervisor restart would; pods
    /// and containers keep running in their shims.
    pub fn restart(&mut self) {
        self.kill();
        // containerd refuses to start while its old socket file is there
        // only on some versions; remove it so the wait below sees the new one.
        let _ = fs::remove_file(self.socket());
        self.spawn();
    }

    /// Starts containerd again after [`Containerd::kill`].
    pub fn start_again(&mut self) {
        let _ = fs::remove_file(self.socket());
        self.spawn();
    }

    /// Waits until containerd (e.g. after [`Containerd::restart`]) accepts
    /// connections and its CRI plugin answers Status with the runtime and
    /// network ready; errors while it initialises ("server is not
    /// initialized yet", a socket not yet listening) are retried.
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(ch) = connect_channel(self.socket()).await {
                let mut c = RuntimeServiceClient::new(ch);
                match c.status(StatusRequest { verbose: false }).await {
                    Ok(r) => {
                        let conds = r
                            .into_inner()
                            .status
                            .map(|s| s.conditions)
                            .unwrap_or_default();
                        if conds.iter().filter(|c| c.status).count() >= 2 {
                            return;
                        }
                        last = format!("{conds:?}");
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.fail(&format!("containerd not serving after restart: {last}"));
    }

    /// Imports [`APP_IMAGE`] (busybox whose entrypoint sleeps forever;
    /// `/bin/busybox <applet>` runs anything else).
    pub fn import_app_image(&self) {
        let tar = self.dir().join("app.tar");
        write_busybox_image(&tar, APP_IMAGE, &["/bin/busybox", "sleep", "2147483647"]);
        self.import_image(&tar);
    }

    /// Kills containerd outright (SIGKILL), as a crash would, leaving its
    /// shims and pods running; Drop then cleans up without its help.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Host-side links in the node namespace named like the plugin's veths.
    pub fn host_veths(&self) -> Vec<String> {
        self.node
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|name| {
                name.trim()
                    .split('@')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            // Leaves out nodeplane's fast-path holder pair (npfp…/npfq…,
            // not hex after "np"), which outlives the pods by design.
            .filter(|name| {
                name.starts_with(&self.network.host_veth_prefix)
                    && !name.starts_with("npfp")
                    && !name.starts_with("npfq")
            })
            .collect()
    }

    /// Files recording an IP allocation that are still in the IPAM state.
    pub fn leftover_allocations(&self) -> Vec<PathBuf> {
        let net = self.cni_state_dir().join(&self.network.name);
        match self.network.ipam {
            Ipam::Nodeplane => [net.join("ips"), net.join("attachments")]
                .iter()
                .flat_map(|d| files_under(d))
                .collect(),
            Ipam::HostLocal => files_under(&net)
                .into_iter()
                .filter(|f| {
                    let name = f.file_name().unwrap_or_default().to_string_lossy();
                    name != "lock" && !name.starts_with("last_reserved_ip")
                })
                .collect(),
        }
    }

    /// Pod network namespaces the CRI plugin still has mounted.
    pub fn leftover_netns(&self) -> Vec<PathBuf> {
        files_under(&self.netns_dir())
    }

    /// libcni's cached results for a sandbox, for our network and for the
    /// loopback network containerd adds (containerd 1.6 keeps them in the
    /// machine-wide default /var/lib/cni/results).
    pub fn cni_cache_entries(&self, sandbox_id: &str) -> Vec<PathBuf> {
        let prefixes = [
            format!("{}-{sandbox_id}-", self.network.name),
            format!("cni-loopback-{sandbox_id}-"),
        ];
        files_under(Path::new(LIBCNI_RESULTS))
            .into_iter()
            .filter(|f| {
                let name = f.file_name().unwrap_or_default().to_string_lossy();
                prefixes.iter().any(|p| name.starts_with(p.as_str()))
            })
            .collect()
    }

    /// Panics with `msg`; Drop then prints containerd's log.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg} (containerd's log is printed below)")
    }

    fn write_cni_config(&self) {
        let bin = self.dir().join("cni-bin");
        let conf = self.dir().join("cni-conf");
        fs::create_dir_all(&bin).expect("create CNI bin dir");
        fs::create_dir_all(&conf).expect("create CNI conf dir");
        fs::create_dir_all(self.cni_state_dir()).expect("create CNI state dir");
        let loopback = ("loopback".to_string(), reference_plugin("loopback"));
        for (name, target) in self.network.plugins.iter().chain([&loopback]) {
            std::os::unix::fs::symlink(target, bin.join(name))
                .unwrap_or_else(|e| panic!("symlink {name} -> {}: {e}", target.display()));
        }
        let conflist = self.network.conflist.replace(
            STATE_PLACEHOLDER,
            &self.cni_state_dir().display().to_string(),
        );
        fs::write(conf.join("10-nodeplane.conflist"), conflist).expect("write conflist");
    }

    fn write_config(&self) {
        let d = self.dir().display().to_string();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Keep containerd's plugin-installation dir out of the machine's /opt.
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
  level = "debug"
[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root lacks CAP_SYS_RESOURCE here: without this every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Pod netns mounts go below our state dir, not the machine's /run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroup v1, no systemd.
        SystemdCgroup = false
        # runc's state would otherwise go to the machine's /run/containerd/runc.
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"#
        );
        fs::write(self.dir().join("config.toml"), config).expect("write containerd config");
    }

    fn spawn(&mut self) {
        let log = fs::File::create(self.log_path()).expect("create containerd log");
        let log2 = log.try_clone().expect("dup log fd");
        let mut cmd = self.node.command("containerd");
        cmd.arg("--config")
            .arg(self.dir().join("config.toml"))
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; the closure makes only that
            // syscall. If the test process is killed outright (no Drop),
            // containerd dies with it instead of running on.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn containerd");
        self.child = Some(child);

        let socket = self.socket();
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.fail(&format!("containerd exited during start-up: {status}"));
            }
            if Instant::now() > deadline {
                self.fail("containerd did not create its socket in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn import_pause_image(&self) {
        let tar = self.dir().join("pause.tar");
        write_pause_image(&tar);
        self.import_image(&tar);
    }

    /// Imports an OCI image-layout tarball into the CRI namespace.
    pub fn import_image(&self, tar: &Path) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", CRI_NAMESPACE, "images", "import"])
            .arg(tar)
            .output()
            .expect("spawn ctr");
        if !out.status.success() {
            self.fail(&format!(
                "ctr images import failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }

    /// Stops and removes every pod sandbox through the CRI, so the CNI
    /// plugin gets its DEL exactly as it would from the kubelet.
    fn remove_sandboxes(&self) {
        let socket = self.socket();
        // Drop may run inside the test's tokio runtime, where blocking on
        // another runtime panics: use a thread of our own.
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let cleanup = async {
                    let mut cri = RuntimeServiceClient::new(connect_channel(socket).await?);
                    let list = cri
                        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                        .await?;
                    for sandbox in list.into_inner().items {
                        let id = sandbox.id;
                        let stop = StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        };
                        if let Err(e) = cri.stop_pod_sandbox(stop).await {
                            eprintln!("cleanup: StopPodSandbox {id}: {e}");
                        }
                        let remove = RemovePodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        };
                        if let Err(e) = cri.remove_pod_sandbox(remove).await {
                            eprintln!("cleanup: RemovePodSandbox {id}: {e}");
                        }
                    }
                    anyhow::Ok(())
                };
                tokio::time::timeout(CALL_TIMEOUT, cleanup)
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out"))?
            })
        });
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup: removing pod sandboxes through the CRI: {e}"),
            Err(_) => eprintln!("cleanup: the CRI cleanup thread panicked"),
        }
    }

    fn stop_containerd(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our
        // child, not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The runc shims serving this containerd's tasks (found by the
    /// `-address <our socket>` they are started with).
    pub fn shim_pids(&self) -> Vec<libc::pid_t> {
        let socket = self.socket().into_os_string().into_encoded_bytes();
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_shim = args.first().is_some_and(|a| {
                Path::new(std::ffi::OsStr::from_bytes(a))
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim"))
            });
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == socket.as_slice());
            if is_shim && ours && !is_zombie(pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Shims outlive containerd by design: kill the containers they run
    /// (through runc, which also removes their cgroups), then the shims, and
    /// remove their sockets from /run/containerd/s.
    fn kill_shims(&self) {
        let tasks = self.state_dir().join("io.containerd.runtime.v2.task");
        for ns in subdirs(&tasks) {
            let runc_root = self
                .dir()
                .join("runc")
                .join(ns.file_name().unwrap_or_default());
            for bundle in subdirs(&ns) {
                let id = bundle.file_name().unwrap_or_default().to_owned();
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force"])
                    .arg(&id)
                    .output();
                if let Ok(address) = fs::read_to_string(bundle.join("address")) {
                    let path = address.trim().trim_start_matches("unix://");
                    if path.starts_with("/run/containerd/s/") {
                        let _ = fs::remove_file(path);
                    }
                }
                for entry in self.cni_cache_entries(&id.to_string_lossy()) {
                    let _ = fs::remove_file(entry);
                }
            }
        }
        for pid in self.shim_pids() {
            // SAFETY: no memory-safety preconditions; `pid` was just seen
            // running one of our shims.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Removes libcni's cached results for sandboxes containerd still knew.
    fn remove_cni_cache(&self) {
        let cri = "io.containerd.grpc.v1.cri";
        let dirs = [
            self.dir().join("root").join(cri),
            self.state_dir().join(cri),
        ];
        for sandbox in dirs.iter().flat_map(|d| subdirs(&d.join("sandboxes"))) {
            let id = sandbox
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            for entry in self.cni_cache_entries(&id) {
                let _ = fs::remove_file(entry);
            }
        }
    }

    /// Detaches every mount below the temp dir (rootfs overlays, /dev/shm
    /// tmpfs, netns bind mounts), deepest first.
    fn unmount_all(&self) {
        let root = format!("{}/", self.dir().display());
        for _ in 0..5 {
            let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(unescape_mountinfo)
                .filter(|m| m.starts_with(&root))
                .collect();
            if mounts.is_empty() {
                return;
            }
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                if let Ok(c) = std::ffi::CString::new(m) {
                    // SAFETY: `c` is a valid NUL-terminated path.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }

    /// runc removes each pod's cgroup but not the parent we asked for.
    fn remove_cgroups(&self) {
        let rel = self.cgroup_parent.trim_start_matches('/');
        for hierarchy in subdirs(Path::new("/sys/fs/cgroup")) {
            remove_cgroup_tree(&hierarchy.join(rel));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_sandboxes();
        }
        self.stop_containerd();
        self.kill_shims();
        self.remove_cni_cache();
        self.unmount_all();
        self.remove_cgroups();
        if std::thread::panicking() {
            eprintln!(
                "--- containerd log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        // The temp dir and the node namespace go with the fields.
    }
}

const LIBCNI_RESULTS: &str = "/var/lib/cni/results";

/// A tonic channel over a unix socket (containerd's, or anything speaking
/// gRPC there).
pub async fn connect_channel(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
    // The URI is required by the API but unused: the connector ignores it.
    Endpoint::from_static("http://localhost")
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Writes an OCI image-layout tarball of [`PAUSE_IMAGE`]: one layer with a
/// static busybox whose entrypoint sleeps forever.
pub fn write_pause_image(path: &Path) {
    write_busybox_image(path, PAUSE_IMAGE, &["/bin/busybox", "sleep", "2147483647"]);
}

/// Writes an OCI image-layout tarball named `name` (`repo:tag`): one layer
/// with a static busybox, `entrypoint` as its entrypoint.
pub fn write_busybox_image(path: &Path, name: &str, entrypoint: &[&str]) {
    let busybox = fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");

    let mut layer = tar::Builder::new(Vec::new());
    // Mount points runc expects; the sandbox rootfs may be read-only.
    for dir in ["bin/", "dev/", "etc/", "proc/", "sys/", "tmp/"] {
        append(&mut layer, dir, &[], tar::EntryType::Directory, 0o755);
    }
    append(
        &mut layer,
        "bin/busybox",
        &busybox,
        tar::EntryType::Regular,
        0o755,
    );
    let layer = layer.into_inner().expect("finish layer tar");
    let layer_digest = sha256(&layer);

    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Entrypoint": entrypoint },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] }
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len()
        }]
    })
    .to_string()
    .into_bytes();
    let tag = name.rsplit(':').next().unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag
            }
        }]
    })
    .to_string()
    .into_bytes();

    let mut image = tar::Builder::new(Vec::new());
    append(
        &mut image,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        tar::EntryType::Regular,
        0o644,
    );
    append(
        &mut image,
        "index.json",
        &index,
        tar::EntryType::Regular,
        0o644,
    );
    for dir in ["blobs/", "blobs/sha256/"] {
        append(&mut image, dir, &[], tar::EntryType::Directory, 0o755);
    }
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &sha256(blob)["sha256:".len()..]);
        append(&mut image, &name, blob, tar::EntryType::Regular, 0o644);
    }
    let image = image.into_inner().expect("finish image tar");
    let mut f = fs::File::create(path).expect("create image tar");
    f.write_all(&image).expect("write image tar");
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    data: &[u8],
    kind: tar::EntryType,
    mode: u32,
) {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_mtime(0);
    tar.append_data(&mut header, path, data)
        .expect("append to tar");
}

/// `sha256:<hex>` of `data`, as OCI descriptors spell digests.
fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Every non-directory below `dir` (recursively); empty if it is missing.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&path)),
            _ => out.push(path),
        }
    }
    out
}

/// A zombie has exited; only its parent (not us, for a daemonized shim) can
/// reap it.
fn is_zombie(pid: libc::pid_t) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may hold spaces.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

fn remove_cgroup_tree(dir: &Path) {
    for child in subdirs(dir) {
        remove_cgroup_tree(&child);
    }
    // rmdir works on a cgroup holding only its control files.
    let _ = fs::remove_dir(dir);
}

/// Mount points in /proc/self/mountinfo escape space, tab, newline and
/// backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
