//! A real CRI client drives a real containerd (Debian's 1.6) whose CRI plugin
//! uses nodeplane-cni as its network: the pod sandbox must get its addresses
//! from nodeplane, be reachable from the node, and leave nothing behind once
//! it is stopped and removed.
//!
//! The same lifecycle also runs against the reference ptp + host-local
//! plugins, so a failure in the nodeplane test alone points at nodeplane-cni
//! rather than at this harness or containerd.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    PodSandboxState, PodSandboxStatusRequest, PodSandboxStatusResponse, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest,
};
use nodeplane_tests::containerd::{CniNetwork, Containerd};
use tonic::transport::Channel;

const POD_CIDR_V4: &str = "10.244.0.0/24";
const POD_CIDR_V6: &str = "fd00:10:244::/64";
/// Bound for each CRI call, generous for a loaded 2-core machine.
const CALL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pod_sandbox_gets_dual_stack_network_from_nodeplane() {
    let ctd = Containerd::start(CniNetwork::nodeplane(&[POD_CIDR_V4, POD_CIDR_V6]));
    pod_lifecycle(&ctd, &[POD_CIDR_V4, POD_CIDR_V6]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pod_sandbox_baseline_with_reference_ptp() {
    let ctd = Containerd::start(CniNetwork::reference_ptp(POD_CIDR_V4));
    pod_lifecycle(&ctd, &[POD_CIDR_V4]).await;
}

/// RunPodSandbox, check the network, StopPodSandbox, check teardown,
/// RemovePodSandbox, check nothing is left.
async fn pod_lifecycle(ctd: &Containerd, cidrs: &[&str]) {
    let mut cri = ctd.connect().await;
    let config = ctd.sandbox_config("web-0");

    let t = Instant::now();
    let run = RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    };
    let id = call(ctd, "RunPodSandbox", cri.run_pod_sandbox(run))
        .await
        .pod_sandbox_id;
    println!("RunPodSandbox took {:?}", t.elapsed());

    // --- running: addresses from the pod CIDRs, wired into the node ---
    let status = sandbox_status(ctd, &mut cri, &id).await;
    let state = status.status.as_ref().map(|s| s.state);
    assert_eq!(
        state,
        Some(PodSandboxState::SandboxReady as i32),
        "sandbox not ready: {status:?}"
    );
    let ips = pod_ips(&status);
    assert_eq!(
        ips.len(),
        cidrs.len(),
        "expected one address per pod CIDR {cidrs:?}: {status:?}"
    );
    for cidr in cidrs {
        assert!(
            ips.iter().any(|ip| in_cidr(*ip, cidr)),
            "no sandbox address in {cidr}: {ips:?}"
        );
    }

    let netns = sandbox_netns(&status);
    assert!(
        netns.starts_with(ctd.dir()) && netns.exists(),
        "pod netns {} should be a mount below {}",
        netns.display(),
        ctd.dir().display()
    );
    let pod_addrs = in_pod(&netns, &["-o", "addr", "show", "dev", "eth0"]);
    for ip in &ips {
        assert!(
            pod_addrs.contains(&format!(" {ip}/")),
            "pod eth0 lacks {ip}:\n{pod_addrs}"
        );
    }

    let veths = ctd.host_veths();
    assert_eq!(
        veths.len(),
        1,
        "expected exactly one host veth for the pod: {veths:?}"
    );
    for ip in &ips {
        let route = ctd.node().ip(&["route", "get", &ip.to_string()]);
        assert!(
            route.contains(&format!("dev {} ", veths[0])),
            "node routes {ip} via {route:?}, not via the pod's veth {}",
            veths[0]
        );
        ping_from_node(ctd, *ip);
    }
    assert!(
        !ctd.leftover_allocations().is_empty(),
        "the running pod's allocation should be on disk under {}",
        ctd.cni_state_dir().display()
    );

    // --- stopped: the network is gone (StopPodSandbox must reclaim it) ---
    let t = Instant::now();
    let stop = StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    };
    call(ctd, "StopPodSandbox", cri.stop_pod_sandbox(stop)).await;
    println!("StopPodSandbox took {:?}", t.elapsed());
    let status = sandbox_status(ctd, &mut cri, &id).await;
    let state = status.status.as_ref().map(|s| s.state);
    assert_eq!(
        state,
        Some(PodSandboxState::SandboxNotready as i32),
        "after stop: {status:?}"
    );
    assert_network_gone(ctd, &ips, &netns);

    // --- removed: nothing of the pod is left anywhere ---
    let t = Instant::now();
    let remove = RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    };
    call(ctd, "RemovePodSandbox", cri.remove_pod_sandbox(remove)).await;
    println!("RemovePodSandbox took {:?}", t.elapsed());
    let gone = cri.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: id.clone(),
        verbose: false,
    });
    let gone = tokio::time::timeout(CALL, gone)
        .await
        .expect("PodSandboxStatus timed out");
    assert_eq!(
        gone.as_ref().err().map(|s| s.code()),
        Some(tonic::Code::NotFound),
        "removed sandbox still has a status: {gone:?}"
    );
    assert_network_gone(ctd, &ips, &netns);
    let cache = ctd.cni_cache_entries(&id);
    assert!(
        cache.is_empty(),
        "libcni result cache left behind: {cache:?}"
    );
}

/// No host veth, no route to a pod address, no allocation file, no netns.
fn assert_network_gone(ctd: &Containerd, ips: &[IpAddr], netns: &Path) {
    let veths = ctd.host_veths();
    assert!(veths.is_empty(), "host veths left behind: {veths:?}");
    for family in ["-4", "-6"] {
        let routes = ctd.node().ip(&[family, "route", "show", "table", "all"]);
        for ip in ips {
            let dst = |l: &&str| {
                let first = l.split_whitespace().next().unwrap_or_default();
                first == ip.to_string() || first.starts_with(&format!("{ip}/"))
            };
            let left: Vec<&str> = routes.lines().filter(dst).collect();
            assert!(
                left.is_empty(),
                "route for pod address {ip} left behind: {left:?}"
            );
        }
    }
    let allocations = ctd.leftover_allocations();
    assert!(
        allocations.is_empty(),
        "IPAM allocations left behind: {allocations:?}"
    );
    assert!(!netns.exists(), "pod netns {} left behind", netns.display());
    let leftover = ctd.leftover_netns();
    assert!(
        leftover.is_empty(),
        "pod netns mounts left behind: {leftover:?}"
    );
}

/// Awaits a CRI call with a bound, failing with containerd's log.
async fn call<T>(
    ctd: &Containerd,
    what: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> T {
    match tokio::time::timeout(CALL, fut).await {
        Ok(Ok(resp)) => resp.into_inner(),
        Ok(Err(status)) => ctd.fail(&format!("{what} failed: {status}")),
        Err(_) => ctd.fail(&format!("{what} timed out after {CALL:?}")),
    }
}

async fn sandbox_status(
    ctd: &Containerd,
    cri: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> PodSandboxStatusResponse {
    let req = PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: true,
    };
    call(ctd, "PodSandboxStatus", cri.pod_sandbox_status(req)).await
}

fn pod_ips(status: &PodSandboxStatusResponse) -> Vec<IpAddr> {
    let net = status.status.as_ref().and_then(|s| s.network.as_ref());
    let net = net.unwrap_or_else(|| panic!("sandbox status has no network: {status:?}"));
    std::iter::once(net.ip.as_str())
        .chain(net.additional_ips.iter().map(|p| p.ip.as_str()))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| panic!("bad pod IP {s:?}: {e}"))
        })
        .collect()
}

/// The pod's network namespace path from containerd's verbose status (the
/// OCI runtime spec it ran the sandbox with).
fn sandbox_netns(status: &PodSandboxStatusResponse) -> PathBuf {
    let info = status
        .info
        .get("info")
        .unwrap_or_else(|| panic!("no verbose info: {status:?}"));
    let info: serde_json::Value = serde_json::from_str(info).expect("verbose info is JSON");
    let namespaces = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .cloned();
    namespaces
        .unwrap_or_default()
        .iter()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no network namespace path in the sandbox spec: {info}"))
}

/// Runs `ip ARGS` inside the pod's network namespace.
fn in_pod(netns: &Path, args: &[&str]) -> String {
    let ns = std::fs::File::open(netns).expect("open pod netns");
    let mut cmd = std::process::Command::new("ip");
    nodeplane_tests::netns::enter_in_child(&mut cmd, ns);
    let out = nodeplane_tests::netns::run_ok(cmd.args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pings `ip` from the node namespace, retrying briefly: an IPv6 address may
/// still be tentative (DAD) right after ADD.
fn ping_from_node(ctd: &Containerd, ip: IpAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ctd
            .node()
            .command("/bin/busybox")
            .args(["ping", "-c", "1", "-W", "1", &ip.to_string()])
            .output()
            .expect("spawn busybox ping");
        if out.status.success() {
            return;
        }
        if Instant::now() > deadline {
            let routes = ctd.node().ip(&["route", "show", "table", "all"]);
            panic!(
                "pod address {ip} unreachable from the node: {}{}\nnode routes:\n{routes}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("CIDR has a prefix length");
    let len: u32 = len.parse().expect("prefix length");
    match (ip, net.parse::<IpAddr>().expect("CIDR address")) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The harness's Drop must leave nothing behind when a test panics with a pod
/// still running: no shim, no containerd files or mounts, no pod netns, no
/// cgroup, no libcni cache entry, no node namespace.
#[test]
fn harness_cleans_up_after_a_panicking_test() {
    panic_with_a_running_pod(false);
}

/// The same when containerd itself has died: Drop must kill the shims and
/// pods and unmount everything without containerd's help.
#[test]
fn harness_cleans_up_after_containerd_dies() {
    panic_with_a_running_pod(true);
}

fn panic_with_a_running_pod(kill_containerd: bool) {
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        rt.block_on(async {
            let mut ctd = Containerd::start(CniNetwork::reference_ptp(POD_CIDR_V4));
            let mut cri = ctd.connect().await;
            let config = ctd.sandbox_config("doomed");
            let parent = config
                .linux
                .as_ref()
                .map(|l| l.cgroup_parent.clone())
                .unwrap_or_default();
            let cgroup = Path::new("/sys/fs/cgroup/pids").join(parent.trim_start_matches('/'));
            let run = RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            };
            let id = call(&ctd, "RunPodSandbox", cri.run_pod_sandbox(run))
                .await
                .pod_sandbox_id;
            let status = sandbox_status(&ctd, &mut cri, &id).await;
            let shims = ctd.shim_pids();
            assert_eq!(shims.len(), 1, "one shim should serve the sandbox");
            assert!(
                cgroup.exists(),
                "the sandbox should run in {}",
                cgroup.display()
            );
            *seen.lock().expect("lock") = Some(Seen {
                dir: ctd.dir().to_path_buf(),
                node: ctd.node().path(),
                netns: sandbox_netns(&status),
                cgroup,
                shims,
                cache: ctd.cni_cache_entries(&id),
            });
            if kill_containerd {
                ctd.kill();
            }
            panic!("deliberate panic with sandbox {id} running");
        })
    }));
    assert!(result.is_err(), "the test body should have panicked");
    let seen = seen
        .into_inner()
        .expect("lock")
        .expect("the sandbox ran before the panic");
    assert!(
        !seen.cache.is_empty(),
        "libcni should have cached the ADD result"
    );
    for path in [&seen.dir, &seen.node, &seen.netns, &seen.cgroup]
        .into_iter()
        .chain(&seen.cache)
    {
        assert!(!path.exists(), "{} left behind", path.display());
    }
    for pid in seen.shims {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state
            .rsplit_once(')')
            .is_some_and(|(_, s)| !s.trim_start().starts_with('Z'));
        assert!(!running, "shim {pid} still running: {state}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = seen.dir.display().to_string();
    assert!(
        !mounts.contains(&dir),
        "mounts below {dir} left behind:\n{mounts}"
    );
}

#[derive(Debug)]
struct Seen {
    dir: PathBuf,
    node: PathBuf,
    netns: PathBuf,
    cgroup: PathBuf,
    shims: Vec<i32>,
    cache: Vec<PathBuf>,
}
