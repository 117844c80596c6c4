//! kill -9 of the driver between the steps of create, delete, expand,
//! snapshot, stage and publish (the driver SIGKILLs itself at the named
//! step, NODEPLANE_CSI_CRASH_AT), then a restart: the CO's retry succeeds
//! and nothing is leaked or lost. And a node reboot: mounts and loop
//! devices of staged and published volumes come back.

use nodeplane_proto::csi;
use nodeplane_tests::csi::*;

fn req(name: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4", rw())],
        ..Default::default()
    }
}

/// Starts a world whose driver dies at `step`.
fn crashing(step: &str) -> CsiWorld {
    let mut w = CsiWorld::start(PoolFs::Xfs, 1024);
    w.set_crash(Some(step));
    w.restart();
    w.set_crash(None);
    w
}

async fn on_disk(w: &CsiWorld) -> (Vec<String>, Vec<String>) {
    (
        w.ls(&w.pool_path().join("images")),
        w.ls(&w.pool_path().join("image-snapshots")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_create_leaks_nothing() {
    for step in ["create:after-intent", "create:after-storage"] {
        let mut w = crashing(step);
        let mut c = w.clients().await;
        assert!(
            c.controller.create_volume(req("pvc")).await.is_err(),
            "{step}: the driver should have died"
        );
        w.restart();
        let (imgs, _) = on_disk(&w).await;
        assert!(imgs.is_empty(), "{step}: leaked {imgs:?}");
        let mut c = w.clients().await;
        let v = c
            .controller
            .create_volume(req("pvc"))
            .await
            .expect("retry")
            .into_inner()
            .volume
            .expect("v");
        let list = c
            .controller
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.entries.len(), 1, "{step}");
        assert_eq!(
            on_disk(&w).await.0,
            vec![format!("{}.img", v.volume_id)],
            "{step}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_delete_expand_snapshot() {
    for step in [
        "delete:after-intent",
        "delete:after-storage",
        "expand:after-intent",
        "expand:after-storage",
        "snapshot:after-intent",
        "snapshot:after-copy",
    ] {
        let mut w = CsiWorld::start(PoolFs::Xfs, 1024);
        let mut c = w.clients().await;
        let id = c
            .controller
            .create_volume(req("pvc"))
            .await
            .expect("create")
            .into_inner()
            .volume
            .expect("v")
            .volume_id;
        // Restart with the crash armed, then make the call that dies.
        w.set_crash(Some(step));
        w.restart();
        w.set_crash(None);
        let mut c = w.clients().await;
        let r = match step.split(':').next() {
            Some("delete") => c
                .controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            Some("expand") => c
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 64 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            _ => c
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: id.clone(),
                    name: "s".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        };
        assert!(r.is_err(), "{step}: the driver should have died");
        w.restart();
        let mut c = w.clients().await;
        let (imgs, snaps) = on_disk(&w).await;
        match step.split(':').next() {
            Some("delete") => {
                // The delete finished at restart; a retry is OK.
                assert!(imgs.is_empty(), "{step}: {imgs:?}");
                c.controller
                    .delete_volume(csi::DeleteVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("retry delete");
            }
            Some("expand") => {
                assert_eq!(imgs.len(), 1);
                let e = c
                    .controller
                    .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                        volume_id: id.clone(),
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: 64 * MIB,
                            limit_bytes: 0,
                        }),
                        ..Default::default()
                    })
                    .await
                    .expect("retry expand")
                    .into_inner();
                assert_eq!(e.capacity_bytes, 64 * MIB, "{step}");
                let g = c
                    .controller
                    .controller_get_volume(csi::ControllerGetVolumeRequest {
                        volume_id: id.clone(),
                    })
                    .await
                    .expect("get")
                    .into_inner();
                assert_eq!(g.volume.expect("v").capacity_bytes, 64 * MIB, "{step}");
            }
            _ => {
                assert!(
                    snaps.is_empty(),
                    "{step}: interrupted snapshot left {snaps:?}"
                );
                c.controller
                    .create_snapshot(csi::CreateSnapshotRequest {
                        source_volume_id: id.clone(),
                        name: "s".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("retry snapshot");
                assert_eq!(on_disk(&w).await.1.len(), 1, "{step}");
            }
        }
    }
}

/// Stage and publish, crash right after each mount, restart, retry: OK and
/// one mount each. Then a reboot: mounts and loop devices restored, data
/// intact, teardown clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_stage_publish_and_reboot_restores_mounts() {
    let mut w = crashing("stage:after-mount");
    let mut c = w.clients().await;
    let cap = mount_cap("ext4", rw());
    let id = c
        .controller
        .create_volume(req("pvc"))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let staging = w.path("s");
    std::fs::create_dir_all(&staging).expect("mkdir");
    let staging = staging.to_string_lossy().into_owned();
    let target = w.path("t").to_string_lossy().into_owned();
    let stage = csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let publish = csi::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    assert!(c.node.node_stage_volume(stage.clone()).await.is_err());
    w.set_crash(Some("publish:after-mount"));
    w.restart();
    w.set_crash(None);
    let mut c = w.clients().await;
    c.node
        .node_stage_volume(stage.clone())
        .await
        .expect("stage retry");
    assert!(c.node.node_publish_volume(publish.clone()).await.is_err());
    w.restart();
    let mut c = w.clients().await;
    c.node
        .node_publish_volume(publish.clone())
        .await
        .expect("publish retry");
    assert_eq!(w.mounts().len(), 2, "{:?}", w.mounts());
    w.sh_ok(&format!("echo survives > {target}/f && sync"));

    w.reboot();
    assert_eq!(
        w.mounts().len(),
        2,
        "restored after reboot: {:?}\n{}",
        w.mounts(),
        w.log_text()
    );
    assert_eq!(w.sh_ok(&format!("cat {target}/f")).trim(), "survives");
    let mut c = w.clients().await;
    c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.clone(),
        })
        .await
        .expect("unpublish");
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
        })
        .await
        .expect("unstage");
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert!(w.mounts().is_empty());
    assert!(w.volume_loops().is_empty());
}
