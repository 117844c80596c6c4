//! The CRI shim and the real nodeplane-agent: the lifecycle events of a pod
//! started through the shim on a real containerd land in the agent's
//! `lifecycle` store, visible in its /status (`criShim`) and /metrics.

use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CreateContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use nodeplane_tests::agent::Agent;
use nodeplane_tests::containerd::{CniNetwork, Containerd};
use nodeplane_tests::cri::{app_container, stop_and_remove_container, with_meta, Shim};
use nodeplane_tests::fixture::Node;
use serde_json::Value;

const V4: &str = "10.247.0.0/24";

fn wait_status(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agent.status();
        if pred(&s["criShim"]) {
            return s["criShim"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "agent never showed {what}: {s:#}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_events_reach_the_real_agent() {
    let mut node = Node::new(&[V4]);
    let agent = Agent::start(&mut node, &[V4], &[]);
    let ctd = Containerd::start(CniNetwork::nodeplane(&[V4]));
    ctd.import_app_image();
    let shim = Shim::start(
        &ctd.socket(),
        &[&format!(
            "--agent-endpoint=unix://{}",
            agent.socket.display()
        )],
    );
    ctd.connect().await;
    let mut cri = RuntimeServiceClient::new(shim.channel().await);

    let config = with_meta(
        ctd.sandbox_config("api-0"),
        &[("app", "api")],
        &[("team", "core")],
    );
    let run = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    let sb = cri
        .run_pod_sandbox(run)
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let create = CreateContainerRequest {
        pod_sandbox_id: sb.clone(),
        config: Some(app_container("api")),
        sandbox_config: Some(config),
    };
    let c = cri
        .create_container(create)
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("StartContainer");

    let a = tokio::task::block_in_place(|| {
        wait_status(&agent, "the pod with its container", |s| {
            s["pods"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p["containers"].as_array().is_some_and(|c| !c.is_empty()))
            })
        })
    });
    let pod = &a["pods"][0];
    assert_eq!(pod["name"], "api-0");
    assert_eq!(pod["namespace"], "default");
    assert_eq!(pod["labels"]["app"], "api");
    assert_eq!(pod["annotations"]["team"], "core");
    assert_eq!(pod["sandboxId"], sb.as_str());
    assert_eq!(pod["state"], "ready");
    assert_eq!(pod["containers"][0], c.as_str());
    assert!(
        pod["ips"][0]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.247.0.")),
        "{pod}"
    );
    assert!(
        pod["netns"]
            .as_str()
            .is_some_and(|n| n.starts_with(&ctd.netns_dir().display().to_string())),
        "{pod}"
    );
    let metrics = agent.get("/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(
        metrics.contains("nodeplane_cri_events_total{kind=\"sandbox_starting\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("nodeplane_cri_pods 1"), "{metrics}");

    stop_and_remove_container(&mut cri, &c).await;
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .expect("StopPodSandbox");
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: sb })
        .await
        .expect("RemovePodSandbox");
    let a = tokio::task::block_in_place(|| {
        wait_status(&agent, "no pods", |s| {
            s["pods"].as_array().is_some_and(|p| p.is_empty())
        })
    });
    assert_eq!(a["events"]["sandbox_removed"], 1, "{a:#}");
    assert_eq!(shim.metric("nodeplane_cri_hook_rejected_total"), 0.0);
}
