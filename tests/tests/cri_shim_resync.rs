//! Two orderings the agent relies on, through nodeplane-cri-shim on a real
//! containerd 1.6: a StopPodSandbox sent the moment RunPodSandbox returns
//! is reported after that sandbox's READY (READY's place in the hook queue
//! is taken before the answer goes back), and an agent that restarts with
//! empty state learns the running pods again — from the periodic resync,
//! and from the resync that follows failed deliveries.

use std::time::Duration;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    PodSandboxConfig, RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use nodeplane_proto::agent::pod_lifecycle::Kind;
use nodeplane_proto::agent::PodLifecycle;
use nodeplane_tests::containerd::{CniNetwork, Containerd};
use nodeplane_tests::cri::{brief, FakeAgent, Shim};
use nodeplane_tests::TempDir;
use tonic::transport::Channel;

const V4: &str = "10.246.4.0/24";
const CALL: Duration = Duration::from_secs(60);
const EVENTS: Duration = Duration::from_secs(30);

type Cri = RuntimeServiceClient<Channel>;

async fn run_sandbox(cri: &mut Cri, config: &PodSandboxConfig) -> String {
    let req = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    tokio::time::timeout(CALL, cri.run_pod_sandbox(req))
        .await
        .expect("RunPodSandbox timed out")
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

async fn stop_sandbox(cri: &mut Cri, id: &str) {
    let req = StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    };
    tokio::time::timeout(CALL, cri.stop_pod_sandbox(req))
        .await
        .expect("StopPodSandbox timed out")
        .expect("StopPodSandbox");
}

async fn remove_sandbox(cri: &mut Cri, id: &str) {
    stop_sandbox(cri, id).await;
    let req = RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    };
    tokio::time::timeout(CALL, cri.remove_pod_sandbox(req))
        .await
        .expect("RemovePodSandbox timed out")
        .expect("RemovePodSandbox");
}

fn kinds_of(evs: &[PodLifecycle], sandbox: &str) -> Vec<Kind> {
    evs.iter()
        .filter(|e| e.sandbox_id == sandbox)
        .map(|e| e.kind())
        .collect()
}

fn shim_args(agent: &FakeAgent, resync_secs: u64) -> Vec<String> {
    vec![
        format!("--agent-endpoint=unix://{}", agent.socket.display()),
        "--no-inject".into(),
        "--agent-timeout-ms=1000".into(),
        format!("--agent-resync-secs={resync_secs}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_reports_stop_after_ready_even_when_sent_at_once() {
    let dir = TempDir::new("criorder");
    let agent = FakeAgent::start(dir.path().join("agent.sock"));
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let args = shim_args(&agent, 0);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shim = Shim::start(&ctd.socket(), &args);
    ctd.connect().await;
    // Several pods at once, each stopped the instant its Run returns, so
    // READY's own status call competes with the Stop on a loaded runtime.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut cri = RuntimeServiceClient::new(shim.channel().await);
        let config = ctd.sandbox_config(&format!("order-{i}"));
        tasks.push(tokio::spawn(async move {
            let id = run_sandbox(&mut cri, &config).await;
            stop_sandbox(&mut cri, &id).await;
            id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("pod task"));
    }
    let evs = agent
        .wait_for("a STOPPED for every pod", EVENTS, |e| {
            ids.iter()
                .all(|id| kinds_of(e, id).contains(&Kind::SandboxStopped))
        })
        .await;
    for id in &ids {
        assert_eq!(
            kinds_of(&evs, id),
            [Kind::SandboxReady, Kind::SandboxStopped],
            "sandbox {id}: READY must reach the agent before STOPPED: {:#?}",
            evs.iter().map(brief).collect::<Vec<_>>()
        );
        let ready = evs
            .iter()
            .find(|e| e.sandbox_id == *id && e.kind() == Kind::SandboxReady)
            .expect("READY");
        assert!(
            !ready.netns_path.is_empty() && !ready.ips.is_empty(),
            "READY still carries netns and IPs: {}",
            brief(ready)
        );
    }
    let mut cri = RuntimeServiceClient::new(shim.channel().await);
    for id in &ids {
        remove_sandbox(&mut cri, id).await;
    }
    drop(shim);
    drop(ctd);
}

/// Waits until a fresh agent has been told about `sandbox` again.
async fn relearned(agent: &FakeAgent, what: &str, sandbox: &str, uid: &str) -> PodLifecycle {
    let evs = agent
        .wait_for(what, EVENTS, |e| {
            e.iter()
                .any(|e| e.sandbox_id == sandbox && e.kind() == Kind::SandboxReady)
        })
        .await;
    let ev = evs
        .into_iter()
        .find(|e| e.sandbox_id == sandbox && e.kind() == Kind::SandboxReady)
        .expect("READY");
    assert_eq!(ev.pod_uid, uid, "{}", brief(&ev));
    assert!(ev.replayed, "a re-sent READY is flagged: {}", brief(&ev));
    assert!(
        !ev.netns_path.is_empty() && !ev.ips.is_empty(),
        "{}",
        brief(&ev)
    );
    assert_eq!(ev.labels.get("app").map(String::as_str), Some("web"));
    ev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_resends_running_pods_to_a_restarted_agent() {
    let dir = TempDir::new("criresync");
    let sock = dir.path().join("agent.sock");
    let first = FakeAgent::start(sock.clone());
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    let args = shim_args(&first, 1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shim = Shim::start(&ctd.socket(), &args);
    ctd.connect().await;
    let mut cri = RuntimeServiceClient::new(shim.channel().await);
    let mut config = ctd.sandbox_config("resync-0");
    config.labels.insert("app".into(), "web".into());
    let uid = config.metadata.clone().unwrap_or_default().uid;
    let sb = run_sandbox(&mut cri, &config).await;
    first
        .wait_for("the first agent's READY", EVENTS, |e| {
            kinds_of(e, &sb).contains(&Kind::SandboxReady)
        })
        .await;

    // The agent restarts with nothing in memory, and no CRI call happens:
    // the periodic resync (1 s here) tells the new process.
    first.down();
    let second = FakeAgent::start(sock.clone());
    relearned(&second, "the periodic resync", &sb, &uid).await;

    // A stopped sandbox is not announced again.
    let other = ctd.sandbox_config("resync-stopped");
    let stopped = run_sandbox(&mut cri, &other).await;
    stop_sandbox(&mut cri, &stopped).await;
    second
        .wait_for("STOPPED", EVENTS, |e| {
            kinds_of(e, &stopped).contains(&Kind::SandboxStopped)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let evs = second.lifecycle();
    let after_stop = kinds_of(&evs, &stopped);
    assert_eq!(
        after_stop.last(),
        Some(&Kind::SandboxStopped),
        "no READY after STOPPED: {:#?}",
        evs.iter().map(brief).collect::<Vec<_>>()
    );
    remove_sandbox(&mut cri, &stopped).await;
    drop(second);
    drop(first);
    drop(shim);

    // Without the periodic resync: deliveries fail while the agent is
    // away, and the first one that succeeds again brings a resync.
    let third_sock = dir.path().join("agent3.sock");
    let third = FakeAgent::start(third_sock);
    let args = shim_args(&third, 0);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shim = Shim::start(&ctd.socket(), &args);
    let mut cri = RuntimeServiceClient::new(shim.channel().await);
    third.down();
    let later = ctd.sandbox_config("resync-later");
    let later_sb = run_sandbox(&mut cri, &later).await;
    let fourth = FakeAgent::start(third.socket.clone());
    let ev = relearned(&fourth, "the resync after recovery", &sb, &uid).await;
    assert!(ev.sequence > 0);
    fourth
        .wait_for("the queued events of the later pod", EVENTS, |e| {
            kinds_of(e, &later_sb).contains(&Kind::SandboxReady)
        })
        .await;
    remove_sandbox(&mut cri, &later_sb).await;
    remove_sandbox(&mut cri, &sb).await;
    drop(fourth);
    drop(third);
    drop(shim);
    drop(ctd);
}
