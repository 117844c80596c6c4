//! The normal `nodeplane-agent` run (standalone source: a manifests
//! directory) serving CSI beside its other work: `--csi-pool` on a temp
//! pool, `--csi-endpoint` and `--csi-registration-dir` in temp dirs. The
//! kubelet's view: plugin registration, Identity, and a full volume
//! lifecycle over the endpoint; then kill -9 and restart of the agent.

use nodeplane_proto::csi;
use nodeplane_proto::pluginregistration as reg;
use nodeplane_tests::csi::*;

/// /readyz answers 200 (the agent's sources synced, rules programmed).
fn wait_ready(w: &CsiWorld) {
    let start = std::time::Instant::now();
    loop {
        let r = w.http_get("/readyz");
        if matches!(r, Some((200, _))) {
            return;
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "agent /readyz not 200 within 20 s ({r:?}); log:\n{}",
            w.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

async fn round_trip(w: &CsiWorld, c: &mut Clients, name: &str) {
    let cap = mount_cap("ext4", rw());
    let v = c
        .controller
        .create_volume(csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(v.capacity_bytes, 32 * MIB);
    assert_eq!(
        v.accessible_topology[0].segments["topology.nodeplane.io/node"],
        w.node_id
    );
    let id = v.volume_id;
    let staging = w.path(&format!("{name}/staging"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    let staging = staging.to_string_lossy().into_owned();
    let target = w
        .path(&format!("{name}/target"))
        .to_string_lossy()
        .into_owned();
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("NodeStageVolume");
    c.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume");
    w.sh_ok(&format!("echo hello > {target}/f && sync"));
    assert_eq!(w.sh_ok(&format!("cat {staging}/f")).trim(), "hello");
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            staging_target_path: staging.clone(),
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner();
    assert!(!stats.usage.is_empty());
    assert!(!stats.volume_condition.expect("condition").abnormal);
    assert_eq!(w.mounts().len(), 2, "{:?}", w.mounts());
    c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.clone(),
        })
        .await
        .expect("NodeUnpublishVolume");
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
        })
        .await
        .expect("NodeUnstageVolume");
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    assert!(w.mounts().is_empty(), "{:?}", w.mounts());
    assert!(w.volume_loops().is_empty(), "{:?}", w.volume_loops());
    assert!(w.ls(&w.pool_path().join("images")).is_empty());
    assert!(w.ls(&w.state.join("volumes")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_csi_registration_and_volumes() {
    let mut w = CsiWorld::start_agent(PoolFs::Xfs, 1024);
    assert!(
        w.socket.starts_with(w.dir.path()),
        "the endpoint is the temp path given by --csi-endpoint"
    );
    wait_ready(&w);
    let status = w.http_get("/status").expect("/status").1;
    assert!(status.contains("\"csiReady\":true"), "{status}");

    // The kubelet's plugin watcher: GetInfo names the driver and our
    // endpoint; the verdict is accepted.
    let mut r = w.registered(&w.registry()).await;
    r.notify_registration_status(reg::RegistrationStatus {
        plugin_registered: false,
        error: "test: kubelet refused".into(),
    })
    .await
    .expect("NotifyRegistrationStatus (refused)");

    // Identity over the endpoint.
    let mut c = w.clients().await;
    let probe = c
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .expect("Probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let pi = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(pi.name, "csi.nodeplane.io");
    assert!(!pi.vendor_version.is_empty());
    let ni = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(ni.node_id, w.node_id, "the agent's --node-name");

    round_trip(&w, &mut c, "pvc-a").await;

    // kill -9 of the agent and a restart: CSI is served again on the same
    // endpoint, registration too, and a new lifecycle works.
    w.restart();
    wait_ready(&w);
    w.registered(&w.registry()).await;
    let mut c = w.clients().await;
    round_trip(&w, &mut c, "pvc-b").await;
    assert!(
        w.log_text().contains("CSI driver serving"),
        "log:\n{}",
        w.log_text()
    );
}

/// A CSI driver that cannot start (a pool that does not exist) holds the
/// agent's /readyz: a DaemonSet pod must not go Ready without its CSI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_csi_driver() {
    let missing = "/nonexistent/nodeplane-csi-pool";
    let w = CsiWorld::start_agent_with(PoolFs::Xfs, 512, &["--csi-pool", missing], false);
    let start = std::time::Instant::now();
    while w.http_get("/healthz").is_none() {
        assert!(
            start.elapsed().as_secs() < 20,
            "agent HTTP endpoint never came up; log:\n{}",
            w.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Wait until the driver has given up, then readiness must still hold.
    while !w.log_text().contains("CSI driver stopped") {
        assert!(
            start.elapsed().as_secs() < 20,
            "the CSI driver did not fail; log:\n{}",
            w.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(w.log_text().contains(missing), "the error names the pool");
    let (code, body) = w.http_get("/readyz").expect("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("CSI"), "{body}");
    assert_eq!(w.http_get("/healthz").map(|r| r.0), Some(200));
    let status = w.http_get("/status").expect("/status").1;
    assert!(status.contains("\"csiReady\":false"), "{status}");
    assert!(!w.socket.exists());
}
