//! nodeplane-cri-shim between a real CRI client and a real containerd 1.6
//! (runc, nodeplane-cni as the network): a pod's whole life through the
//! shim with injection checked from inside the container, hooks reaching a
//! stand-in agent before the CNI ADD, faithful relay of methods and errors
//! the shim does not know, 50 sandboxes at once, and the shim, the agent
//! and containerd each failing while pods run.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerState, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    GetEventsRequest, ImageSpec, ImageStatusRequest, ListPodSandboxRequest, PodSandboxConfig,
    PodSandboxState, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use nodeplane_proto::agent::pod_lifecycle::Kind;
use nodeplane_proto::agent::request::What;
use nodeplane_proto::agent::PodLifecycle;
use nodeplane_proto::prost::Message;
use nodeplane_tests::containerd::{connect_channel, CniNetwork, Containerd, PAUSE_IMAGE};
use nodeplane_tests::cri::{
    app_container, brief, raw, stop_and_remove_container, with_meta, FakeAgent, Shim,
};
use nodeplane_tests::TempDir;
use tonic::transport::Channel;

const V4: &str = "10.246.0.0/24";
const CALL: Duration = Duration::from_secs(60);
const EVENTS: Duration = Duration::from_secs(30);

type Cri = RuntimeServiceClient<Channel>;

/// nodeplane-cni told to notify `agent` (so the stand-in agent sees the
/// CNI ADD and DEL in the same order as the shim's events).
fn network_with_agent(agent: &Path) -> CniNetwork {
    let mut net = CniNetwork::nodeplane(&[V4]);
    let mut conf: serde_json::Value = serde_json::from_str(&net.conflist).expect("conflist");
    conf["plugins"][0]["agentSocket"] = agent.display().to_string().into();
    conf["plugins"][0]["agentTimeoutMs"] = 300.into();
    net.conflist = conf.to_string();
    net
}

async fn within<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> T {
    tokio::time::timeout(CALL, f)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .into_inner()
}

async fn run_sandbox(cri: &mut Cri, config: &PodSandboxConfig) -> String {
    let req = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    within("RunPodSandbox", cri.run_pod_sandbox(req))
        .await
        .pod_sandbox_id
}

async fn remove_sandbox(cri: &mut Cri, id: &str) {
    within(
        "StopPodSandbox",
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await;
    within(
        "RemovePodSandbox",
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await;
}

async fn start_container(
    cri: &mut Cri,
    sandbox: &str,
    config: &PodSandboxConfig,
    name: &str,
) -> String {
    let req = CreateContainerRequest {
        pod_sandbox_id: sandbox.into(),
        config: Some(app_container(name)),
        sandbox_config: Some(config.clone()),
    };
    let id = within("CreateContainer", cri.create_container(req))
        .await
        .container_id;
    within(
        "StartContainer",
        cri.start_container(StartContainerRequest {
            container_id: id.clone(),
        }),
    )
    .await;
    id
}

async fn exec(cri: &mut Cri, id: &str, cmd: &[&str]) -> (i32, String) {
    let req = ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 20,
    };
    let r = within("ExecSync", cri.exec_sync(req)).await;
    (
        r.exit_code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ),
    )
}

async fn remove_container(cri: &mut Cri, id: &str) {
    stop_and_remove_container(cri, id).await;
}

/// Without the READYs the shim's resync re-sends for pods already
/// announced (the same READY again, flagged replayed).
fn firsts(evs: &[PodLifecycle]) -> Vec<PodLifecycle> {
    let mut ready = HashSet::new();
    evs.iter()
        .filter(|e| e.kind() != Kind::SandboxReady || ready.insert(e.sandbox_id.clone()))
        .cloned()
        .collect()
}

fn kinds_for(evs: &[PodLifecycle], uid: &str, sandbox: &str) -> Vec<Kind> {
    firsts(evs)
        .iter()
        .filter(|e| e.pod_uid == uid || (!sandbox.is_empty() && e.sandbox_id == sandbox))
        .map(|e| e.kind())
        .collect()
}

fn assert_nothing_left(ctd: &Containerd, sandboxes: &[String]) {
    assert!(
        ctd.leftover_allocations().is_empty(),
        "IPAM still holds {:?}",
        ctd.leftover_allocations()
    );
    assert!(
        ctd.host_veths().is_empty(),
        "host veths left: {:?}",
        ctd.host_veths()
    );
    assert!(
        ctd.leftover_netns().is_empty(),
        "pod netns left: {:?}",
        ctd.leftover_netns()
    );
    for id in sandboxes {
        assert!(
            ctd.cni_cache_entries(id).is_empty(),
            "libcni cache left for {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_pod_lifecycle_hooks_and_injection() {
    pod_lifecycle_hooks_and_injection("--relay=frames").await
}

/// The same through the h2 relay (`--relay h2`, also the fallback for a
/// kubelet connection made while containerd is unreachable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_h2_relay_pod_lifecycle_hooks_and_injection() {
    pod_lifecycle_hooks_and_injection("--relay=h2").await
}

async fn pod_lifecycle_hooks_and_injection(relay: &str) {
    let dir = TempDir::new("crilife");
    let agent = FakeAgent::start(dir.path().join("agent.sock"));
    let ctd = Containerd::start(network_with_agent(&agent.socket));
    ctd.import_app_image();
    // The node runtime's socket directory, with a live socket in it.
    let runtime_dir = dir.path().join("runtime");
    std::fs::create_dir_all(&runtime_dir).expect("runtime dir");
    let _runtime = std::os::unix::net::UnixListener::bind(runtime_dir.join("runtime.sock"))
        .expect("runtime socket");
    let shim = Shim::start(
        &ctd.socket(),
        &[
            &format!("--agent-endpoint=unix://{}", agent.socket.display()),
            &format!("--runtime-dir={}", runtime_dir.display()),
            "--runtime-mount=/var/run/nodeplane",
            relay,
        ],
    );
    ctd.connect().await;
    let mut cri = RuntimeServiceClient::new(shim.channel().await);

    // --- RunPodSandbox: labels reach the agent before the CNI ADD ---
    let config = with_meta(
        ctd.sandbox_config("web-0"),
        &[("app", "web"), ("tier", "front")],
        &[("dapr.io/app-id", "cart")],
    );
    let uid = config
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    let sb = run_sandbox(&mut cri, &config).await;
    let received = agent.received.lock().expect("lock").clone();
    let starting = received.iter().position(|r| matches!(&r.what, What::Lifecycle(l) if l.kind() == Kind::SandboxStarting && l.pod_uid == uid));
    let add = received
        .iter()
        .position(|r| matches!(&r.what, What::Attached(a) if a.container_id == sb));
    let (Some(starting), Some(add)) = (starting, add) else {
        panic!("expected the shim's SANDBOX_STARTING and the plugin's ADD: {received:#?}");
    };
    assert!(
        starting < add,
        "labels must reach the agent before the CNI ADD: {received:#?}"
    );
    let What::Lifecycle(st) = &received[starting].what else {
        unreachable!()
    };
    assert_eq!(
        (st.pod_namespace.as_str(), st.pod_name.as_str()),
        ("default", "web-0")
    );
    assert_eq!(st.labels.get("tier").map(String::as_str), Some("front"));
    assert_eq!(
        st.annotations.get("dapr.io/app-id").map(String::as_str),
        Some("cart")
    );

    let evs = agent
        .wait_for("SANDBOX_READY", EVENTS, |e| {
            e.iter().any(|e| e.kind() == Kind::SandboxReady)
        })
        .await;
    let ready = evs
        .iter()
        .find(|e| e.kind() == Kind::SandboxReady)
        .expect("ready");
    assert_eq!(ready.sandbox_id, sb);
    assert_eq!(ready.ips.len(), 1, "{ready:?}");
    assert!(ready.ips[0].starts_with("10.246.0."), "{ready:?}");
    assert!(
        Path::new(&ready.netns_path).starts_with(ctd.netns_dir()),
        "netns {:?} not under {}",
        ready.netns_path,
        ctd.netns_dir().display()
    );

    // --- a container sees the runtime socket and its identity ---
    let c = start_container(&mut cri, &sb, &config, "app").await;
    let (code, env) = exec(&mut cri, &c, &["/bin/busybox", "env"]).await;
    assert_eq!(code, 0, "{env}");
    for want in [
        "NODEPLANE_RUNTIME_SOCKET=/var/run/nodeplane/runtime.sock".to_string(),
        "NODEPLANE_POD_NAMESPACE=default".to_string(),
        "NODEPLANE_POD_NAME=web-0".to_string(),
        format!("NODEPLANE_POD_UID={uid}"),
        "NODEPLANE_APP_ID=cart".to_string(),
        // What Dapr SDKs read to find the node runtime.
        "DAPR_HTTP_ENDPOINT=http://169.254.1.1:3500".to_string(),
        "DAPR_HTTP_PORT=3500".to_string(),
        "APP_ID=cart".to_string(),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from the container's environment:\n{env}"
        );
    }
    let (code, out) = exec(
        &mut cri,
        &c,
        &[
            "/bin/busybox",
            "test",
            "-S",
            "/var/run/nodeplane/runtime.sock",
        ],
    )
    .await;
    assert_eq!(
        code, 0,
        "the runtime socket is not a socket inside the container: {out}"
    );
    let (code, out) = exec(
        &mut cri,
        &c,
        &["/bin/busybox", "touch", "/var/run/nodeplane/x"],
    )
    .await;
    assert_ne!(
        code, 0,
        "the runtime dir must be read-only inside the container: {out}"
    );

    // --- a pod that opts out gets nothing ---
    let plain = with_meta(
        ctd.sandbox_config("plain-0"),
        &[("app", "plain")],
        &[("nodeplane.io/inject", "false")],
    );
    let sb2 = run_sandbox(&mut cri, &plain).await;
    let c2 = start_container(&mut cri, &sb2, &plain, "app").await;
    let (_, env2) = exec(&mut cri, &c2, &["/bin/busybox", "env"]).await;
    assert!(
        !env2.contains("NODEPLANE_"),
        "opted-out pod got injected:\n{env2}"
    );
    let (code, _) = exec(
        &mut cri,
        &c2,
        &["/bin/busybox", "test", "-e", "/var/run/nodeplane"],
    )
    .await;
    assert_ne!(code, 0, "opted-out pod has the runtime mount");
    remove_container(&mut cri, &c2).await;
    remove_sandbox(&mut cri, &sb2).await;

    // --- stop and remove: every event in order, the CNI DEL, nothing left ---
    remove_container(&mut cri, &c).await;
    remove_sandbox(&mut cri, &sb).await;
    let want = [
        Kind::SandboxStarting,
        Kind::SandboxReady,
        Kind::ContainerCreated,
        Kind::ContainerStarted,
        Kind::ContainerStopped,
        Kind::ContainerRemoved,
        Kind::SandboxStopped,
        Kind::SandboxRemoved,
    ];
    let evs = agent
        .wait_for("the pod's whole lifecycle", EVENTS, |e| {
            kinds_for(e, &uid, &sb).len() >= want.len()
        })
        .await;
    assert_eq!(
        kinds_for(&evs, &uid, &sb),
        want,
        "{:#?}",
        evs.iter().map(brief).collect::<Vec<_>>()
    );
    let created = evs
        .iter()
        .find(|e| e.kind() == Kind::ContainerCreated && e.sandbox_id == sb)
        .expect("created");
    assert_eq!(
        (
            created.container_id.as_str(),
            created.container_name.as_str(),
            created.pod_name.as_str()
        ),
        (c.as_str(), "app", "web-0")
    );
    assert!(
        evs.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "events delivered out of order"
    );
    assert!(evs.iter().all(|e| !e.replayed));
    let received = agent.received.lock().expect("lock").clone();
    for id in [&sb, &sb2] {
        assert!(
            received
                .iter()
                .any(|r| matches!(&r.what, What::Detached(d) if &d.container_id == id)),
            "no CNI DEL reached the agent for {id}"
        );
    }
    assert_nothing_left(&ctd, &[sb, sb2]);
    let m = shim.metrics();
    assert!(
        m.contains("nodeplane_cri_calls_total{method=\"ExecSync\"} 5"),
        "{m}"
    );
    assert_eq!(shim.metric("nodeplane_cri_hook_late_total"), 0.0, "{m}");
}

/// Code and message of a failed call, or the response bytes.
fn outcome(
    r: Result<tonic::Response<Bytes>, tonic::Status>,
) -> Result<Bytes, (tonic::Code, String)> {
    r.map(|r| r.into_inner())
        .map_err(|s| (s.code(), s.message().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_relays_unknown_methods_and_runtime_errors_unchanged() {
    relays_unknown_methods_and_runtime_errors_unchanged("--relay=frames").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_h2_relay_relays_unknown_methods_and_runtime_errors_unchanged() {
    relays_unknown_methods_and_runtime_errors_unchanged("--relay=h2").await
}

async fn relays_unknown_methods_and_runtime_errors_unchanged(relay: &str) {
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let shim = Shim::start(&ctd.socket(), &[relay]);
    ctd.connect().await;
    let direct = connect_channel(ctd.socket())
        .await
        .expect("connect containerd");
    let via = shim.channel().await;

    let version = VersionRequest {
        version: "0.1.0".into(),
    }
    .encode_to_vec();
    let image = ImageStatusRequest {
        image: Some(ImageSpec {
            image: PAUSE_IMAGE.into(),
            ..Default::default()
        }),
        verbose: false,
    }
    .encode_to_vec();
    let missing = ContainerStatusRequest {
        container_id: "no-such-container".into(),
        verbose: false,
    }
    .encode_to_vec();
    let cases: [(&str, &[u8]); 6] = [
        // CRI v1alpha2: not in the shim's compiled proto, served by containerd 1.6.
        ("/runtime.v1alpha2.RuntimeService/Version", &version),
        ("/runtime.v1alpha2.ImageService/ImageStatus", &image),
        ("/runtime.v1.RuntimeService/Version", &version),
        // Errors: a method nobody knows, and NOT_FOUND with containerd's message.
        ("/runtime.v1.RuntimeService/NodeplaneNoSuchMethod", &version),
        ("/runtime.v1.RuntimeService/ContainerStatus", &missing),
        ("/runtime.v1.RuntimeService/RunPodSandbox", b"\xff\xff\xff"),
    ];
    for (path, msg) in cases {
        let d = outcome(
            raw::unary(
                direct.clone(),
                path,
                tonic::Request::new(Bytes::copy_from_slice(msg)),
            )
            .await,
        );
        let s = outcome(
            raw::unary(
                via.clone(),
                path,
                tonic::Request::new(Bytes::copy_from_slice(msg)),
            )
            .await,
        );
        println!("{path}: {:?}", s.as_ref().map(|b| b.len()));
        assert_eq!(s, d, "{path}: through the shim vs direct");
    }
    assert!(outcome(
        raw::unary(
            via.clone(),
            "/runtime.v1alpha2.RuntimeService/Version",
            tonic::Request::new(Bytes::from(version.clone()))
        )
        .await
    )
    .is_ok());

    // containerd 1.6 answers GetContainerEvents with UNIMPLEMENTED: the
    // client must get exactly that, through the shim's stream path.
    let events = |ch: Channel| async move {
        let mut c = RuntimeServiceClient::new(ch);
        match c.get_container_events(GetEventsRequest {}).await {
            Err(s) => (s.code(), s.message().to_string()),
            Ok(r) => match r.into_inner().message().await {
                Err(s) => (s.code(), s.message().to_string()),
                Ok(m) => panic!("containerd 1.6 streamed an event: {m:?}"),
            },
        }
    };
    let d = events(direct.clone()).await;
    let s = events(via.clone()).await;
    println!("GetContainerEvents: {s:?}");
    assert_eq!(d.0, tonic::Code::Unimplemented, "{d:?}");
    assert_eq!(s, d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_runs_50_sandboxes_in_parallel() {
    const N: usize = 50;
    let dir = TempDir::new("cri50");
    let agent = FakeAgent::start(dir.path().join("agent.sock"));
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let shim = Shim::start(
        &ctd.socket(),
        &[&format!(
            "--agent-endpoint=unix://{}",
            agent.socket.display()
        )],
    );
    ctd.connect().await;
    let channel = shim.channel().await;
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut cri = RuntimeServiceClient::new(channel.clone());
        let config = with_meta(
            ctd.sandbox_config(&format!("par-{i}")),
            &[("app", "par")],
            &[],
        );
        set.spawn(async move { run_sandbox(&mut cri, &config).await });
    }
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        ids.push(r.expect("sandbox task"));
    }
    println!(
        "{N} RunPodSandbox in parallel through the shim: {:?}",
        t.elapsed()
    );
    let evs = agent
        .wait_for("50 SANDBOX_READY", Duration::from_secs(60), |e| {
            firsts(e)
                .iter()
                .filter(|e| e.kind() == Kind::SandboxReady)
                .count()
                == N
        })
        .await;
    let evs = firsts(&evs);
    let ips: HashSet<String> = evs
        .iter()
        .filter(|e| e.kind() == Kind::SandboxReady)
        .flat_map(|e| e.ips.clone())
        .collect();
    assert_eq!(ips.len(), N, "each sandbox its own address");
    let ready: HashSet<&str> = evs
        .iter()
        .filter(|e| e.kind() == Kind::SandboxReady)
        .map(|e| e.sandbox_id.as_str())
        .collect();
    assert_eq!(
        ready,
        ids.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    let mut cri = RuntimeServiceClient::new(channel.clone());
    let list = within(
        "ListPodSandbox",
        cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
    )
    .await;
    assert_eq!(
        list.items
            .iter()
            .filter(|s| s.state == PodSandboxState::SandboxReady as i32)
            .count(),
        N
    );
    let mut set = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let mut cri = RuntimeServiceClient::new(channel.clone());
        set.spawn(async move { remove_sandbox(&mut cri, &id).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("remove task");
    }
    agent
        .wait_for("50 SANDBOX_REMOVED", Duration::from_secs(60), |e| {
            e.iter()
                .filter(|e| e.kind() == Kind::SandboxRemoved)
                .count()
                == N
        })
        .await;
    assert_nothing_left(&ctd, &ids);
}

/// Calls Version through `cri` until it answers, or panics after `timeout`.
async fn until_version(cri: &mut Cri, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut failures = 0;
    loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            cri.version(VersionRequest::default()),
        )
        .await
        {
            Ok(Ok(_)) => return failures,
            Ok(Err(_)) | Err(_) => failures += 1,
        }
        assert!(
            Instant::now() < deadline,
            "Version never answered again ({failures} failures)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn container_started_at(direct: &mut Cri, id: &str) -> (i32, i64) {
    let st = within(
        "ContainerStatus",
        direct.container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        }),
    )
    .await
    .status
    .expect("status");
    (st.state, st.started_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_restart_affects_no_container_and_clients_reconnect() {
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    ctd.import_app_image();
    let mut shim = Shim::start(&ctd.socket(), &[]);
    let mut direct = ctd.connect().await;
    // One client channel kept across the restart, as the kubelet keeps its.
    let mut cri = RuntimeServiceClient::new(shim.channel().await);
    let config = ctd.sandbox_config("keep-0");
    let sb = run_sandbox(&mut cri, &config).await;
    let c = start_container(&mut cri, &sb, &config, "app").await;
    let before = container_started_at(&mut direct, &c).await;
    assert_eq!(before.0, ContainerState::ContainerRunning as i32);

    shim.kill9();
    let down = tokio::time::timeout(
        Duration::from_secs(5),
        cri.version(VersionRequest::default()),
    )
    .await;
    assert!(
        !matches!(down, Ok(Ok(_))),
        "a killed shim answered: {down:?}"
    );
    shim.restart();
    let failures = until_version(&mut cri, Duration::from_secs(20)).await;
    println!("the old client channel answered again after {failures} failed attempts");

    // The container ran on untouched, and the new shim serves it.
    assert_eq!(
        container_started_at(&mut direct, &c).await,
        before,
        "the container was restarted or stopped"
    );
    let (code, out) = exec(&mut cri, &c, &["/bin/busybox", "true"]).await;
    assert_eq!(code, 0, "{out}");
    let st = within(
        "PodSandboxStatus",
        cri.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sb.clone(),
            verbose: false,
        }),
    )
    .await;
    assert_eq!(
        st.status.map(|s| s.state),
        Some(PodSandboxState::SandboxReady as i32)
    );
    remove_container(&mut cri, &c).await;
    remove_sandbox(&mut cri, &sb).await;
    assert_nothing_left(&ctd, &[sb]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_fails_open_when_the_agent_is_down_or_slow_and_replays() {
    let dir = TempDir::new("criagent");
    let agent = FakeAgent::start(dir.path().join("agent.sock"));
    agent.down();
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let shim = Shim::start(
        &ctd.socket(),
        &[
            &format!("--agent-endpoint=unix://{}", agent.socket.display()),
            "--hook-timeout-ms=100",
            "--agent-timeout-ms=3000",
        ],
    );
    ctd.connect().await;
    let mut cri = RuntimeServiceClient::new(shim.channel().await);

    // Agent down: the pod starts; its events wait in the queue.
    let a = ctd.sandbox_config("down-0");
    let a_uid = a
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    let t = Instant::now();
    let sa = run_sandbox(&mut cri, &a).await;
    println!("RunPodSandbox with the agent down: {:?}", t.elapsed());
    let deadline = Instant::now() + EVENTS;
    while shim.metric("nodeplane_cri_hook_queue") < 2.0 {
        assert!(
            Instant::now() < deadline,
            "STARTING and READY not queued:\n{}",
            shim.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        shim.metric("nodeplane_cri_hook_failed_attempts_total") >= 1.0,
        "{}",
        shim.metrics()
    );
    assert!(
        shim.metric("nodeplane_cri_hook_late_total") >= 1.0,
        "{}",
        shim.metrics()
    );
    assert_eq!(shim.metric("nodeplane_cri_agent_up"), 0.0);
    assert!(
        shim.log_text().contains("cannot deliver lifecycle events"),
        "{}",
        shim.log_text()
    );
    assert!(agent.lifecycle().is_empty());

    // Agent back but slow (each answer 600 ms, over the 100 ms time box):
    // the queue drains in order, flagged as replayed...
    agent.set_delay(Duration::from_millis(600));
    agent.up();
    agent.wait_for("the replay", EVENTS, |e| e.len() >= 2).await;
    // ...and a new pod's call does not wait for the slow agent beyond the
    // time box; its events still arrive, on the first attempt.
    let b = ctd.sandbox_config("slow-0");
    let b_uid = b
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    let late_before = shim.metric("nodeplane_cri_hook_late_total");
    let t = Instant::now();
    let sb = run_sandbox(&mut cri, &b).await;
    println!("RunPodSandbox with the agent slow: {:?}", t.elapsed());
    let evs = agent
        .wait_for("all four sandbox events", EVENTS, |e| {
            firsts(e)
                .iter()
                .filter(|e| matches!(e.kind(), Kind::SandboxStarting | Kind::SandboxReady))
                .count()
                >= 4
        })
        .await;
    // The resync after the agent's return may repeat a's READY: first
    // occurrences only.
    let evs: Vec<PodLifecycle> = firsts(&evs)
        .into_iter()
        .filter(|e| matches!(e.kind(), Kind::SandboxStarting | Kind::SandboxReady))
        .collect();
    assert!(
        shim.metric("nodeplane_cri_hook_late_total") > late_before,
        "the slow agent's hook should have missed its time box:\n{}",
        shim.metrics()
    );
    let order: Vec<(Kind, bool, bool)> = evs
        .iter()
        .map(|e| (e.kind(), e.pod_uid == a_uid, e.replayed))
        .collect();
    assert_eq!(
        order,
        [
            (Kind::SandboxStarting, true, true),
            (Kind::SandboxReady, true, true),
            (Kind::SandboxStarting, false, false),
            (Kind::SandboxReady, false, false),
        ],
        "replay first, in order, flagged; then the new pod: {:#?}",
        evs.iter().map(brief).collect::<Vec<_>>()
    );
    assert_eq!(evs[3].pod_uid, b_uid);
    assert_eq!(evs[1].sandbox_id, sa);
    assert!(
        shim.metric("nodeplane_cri_hook_replayed_total") >= 2.0,
        "{}",
        shim.metrics()
    );
    assert_eq!(shim.metric("nodeplane_cri_agent_up"), 1.0);

    agent.set_delay(Duration::ZERO);
    remove_sandbox(&mut cri, &sa).await;
    remove_sandbox(&mut cri, &sb).await;
    agent
        .wait_for("both removals", EVENTS, |e| {
            e.iter()
                .filter(|e| e.kind() == Kind::SandboxRemoved)
                .count()
                == 2
        })
        .await;
    assert_eq!(shim.metric("nodeplane_cri_hook_dropped_total"), 0.0);
    assert_nothing_left(&ctd, &[sa, sb]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_reconnects_after_containerd_restarts() {
    let mut ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let shim = Shim::start(&ctd.socket(), &["--runtime-connections=2"]);
    ctd.connect().await;
    let mut cri = RuntimeServiceClient::new(shim.channel().await);
    let sb = run_sandbox(&mut cri, &ctd.sandbox_config("survivor-0")).await;
    // Both pooled connections are in use before the restart.
    for _ in 0..4 {
        within("Version", cri.version(VersionRequest::default())).await;
    }

    ctd.restart();
    ctd.wait_serving().await;
    let failures = until_version(&mut cri, Duration::from_secs(30)).await;
    println!("Version through the shim answered {failures} failures after containerd restarted");
    // Every later call works: each pooled connection was re-dialled.
    for _ in 0..10 {
        within(
            "Version after restart",
            cri.version(VersionRequest::default()),
        )
        .await;
    }
    let list = within(
        "ListPodSandbox",
        cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
    )
    .await;
    assert!(
        list.items
            .iter()
            .any(|s| s.id == sb && s.state == PodSandboxState::SandboxReady as i32),
        "{list:?}"
    );
    assert!(
        shim.log_text().contains("runtime connection closed"),
        "{}",
        shim.log_text()
    );
    remove_sandbox(&mut cri, &sb).await;
    assert_nothing_left(&ctd, &[sb]);
}

/// A kubelet connection made while containerd is down gets the h2 relay,
/// which answers UNAVAILABLE naming the runtime; once containerd is back
/// the shim closes that connection gracefully and the client's next one
/// is frame-relayed. No call hangs and none is answered wrongly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_connection_made_while_containerd_is_down_recovers() {
    let mut ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let shim = Shim::start(&ctd.socket(), &[]);
    ctd.connect().await;
    ctd.kill();
    let _ = std::fs::remove_file(ctd.socket());
    let mut cri = RuntimeServiceClient::new(shim.channel().await);
    let err = tokio::time::timeout(CALL, cri.version(VersionRequest::default()))
        .await
        .expect("Version while containerd is down timed out")
        .expect_err("containerd is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("nodeplane-cri-shim")
            && err.message().contains(&ctd.socket().display().to_string()),
        "the error names the shim and the runtime socket: {err:?}"
    );
    assert!(
        shim.log_text().contains("runtime unreachable"),
        "{}",
        shim.log_text()
    );

    ctd.start_again();
    ctd.wait_serving().await;
    let failures = until_version(&mut cri, Duration::from_secs(30)).await;
    println!("{failures} failed calls after containerd came back");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shim.log_text().contains("runtime reachable again") {
        assert!(Instant::now() < deadline, "{}", shim.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client's next connection (after the GOAWAY) is frame-relayed.
    for _ in 0..5 {
        within(
            "Version after containerd is back",
            cri.version(VersionRequest::default()),
        )
        .await;
    }
}
