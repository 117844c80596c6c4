//! CSI conformance over the unix socket against the real `nodeplane-agent
//! csi`, on real loop devices, filesystems and mounts (in a private mount
//! namespace; pools are loop-mounted images in temp dirs).

use std::collections::HashMap;

use nodeplane_proto::csi;
use nodeplane_tests::csi::*;
use tonic::Code;

fn stage_req(id: &str, path: &str, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &str,
    target: &str,
    cap: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Stages and publishes `id`; returns (staging, target).
async fn stage_publish(
    w: &CsiWorld,
    c: &mut Clients,
    id: &str,
    cap: csi::VolumeCapability,
) -> (String, String) {
    let staging = w.path(&format!("{id}/staging"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    let staging = staging.to_string_lossy().into_owned();
    let target = w
        .path(&format!("{id}/target"))
        .to_string_lossy()
        .into_owned();
    c.node
        .node_stage_volume(stage_req(id, &staging, cap.clone()))
        .await
        .expect("stage");
    c.node
        .node_publish_volume(publish_req(id, &staging, &target, cap))
        .await
        .expect("publish");
    (staging, target)
}

async fn unpublish_unstage(c: &mut Clients, id: &str, staging: &str, target: &str) {
    c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.into(),
        })
        .await
        .expect("unpublish");
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
        })
        .await
        .expect("unstage");
}

async fn stats(c: &mut Clients, id: &str, path: &str) -> csi::NodeGetVolumeStatsResponse {
    c.node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_node_info_and_capabilities() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let info = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "csi.nodeplane.io");
    let p = c
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(p.ready, Some(true));
    let caps = c
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    assert_eq!(caps.capabilities.len(), 3);
    let cc = c
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .expect("ccaps")
        .into_inner();
    assert!(cc.capabilities.len() >= 10);
    let nc = c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .expect("ncaps")
        .into_inner();
    assert_eq!(nc.capabilities.len(), 6);
    let ni = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("ninfo")
        .into_inner();
    assert_eq!(ni.node_id, w.node_id);
    assert_eq!(
        ni.accessible_topology
            .expect("topology")
            .segments
            .get("topology.nodeplane.io/node"),
        Some(&w.node_id)
    );
}

/// The whole life of an image volume on an xfs pool: idempotent create,
/// stage, publish, size enforcement, stats vs df, online expansion,
/// snapshot → restore and clone preserving data, teardown leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_volume_lifecycle_on_xfs_pool() {
    let w = CsiWorld::start(PoolFs::Xfs, 2048);
    let mut c = w.clients().await;
    let cap = mount_cap("xfs", rw());
    let cap0 = c
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .expect("cap")
        .into_inner();
    let mut ids = vec![];
    for _ in 0..10 {
        let v = c
            .controller
            .create_volume(create_req("pvc-1", 320 * MIB, cap.clone()))
            .await
            .expect("create")
            .into_inner();
        ids.push(v.volume.expect("volume").volume_id);
    }
    assert!(
        ids.iter().all(|i| i == &ids[0]),
        "idempotent create: {ids:?}"
    );
    let id = ids[0].clone();
    let e = c
        .controller
        .create_volume(create_req("pvc-1", 640 * MIB, cap.clone()))
        .await;
    assert_eq!(code(e), Code::AlreadyExists);
    let cap1 = c
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .expect("cap")
        .into_inner();
    assert!(
        cap0.available_capacity - cap1.available_capacity >= 320 * MIB,
        "capacity bookkeeping: {} → {}",
        cap0.available_capacity,
        cap1.available_capacity
    );

    let (staging, target) = stage_publish(&w, &mut c, &id, cap.clone()).await;
    for _ in 0..9 {
        c.node
            .node_stage_volume(stage_req(&id, &staging, cap.clone()))
            .await
            .expect("stage again");
        c.node
            .node_publish_volume(publish_req(&id, &staging, &target, cap.clone()))
            .await
            .expect("publish again");
    }
    // An incompatible re-publish at the same target.
    let mut ro = publish_req(&id, &staging, &target, cap.clone());
    ro.readonly = true;
    assert_eq!(
        code(c.node.node_publish_volume(ro).await),
        Code::AlreadyExists
    );

    // Data and the size limit.
    w.sh_ok(&format!("echo hello > {target}/greeting && sync"));
    let full = w.sh(&format!(
        "dd if=/dev/zero of={target}/big bs=1M count=400 2>&1"
    ));
    assert!(!full.status.success(), "writing past 320 MiB must fail");
    assert!(
        String::from_utf8_lossy(&full.stdout).contains("No space left"),
        "{full:?}"
    );
    w.sh_ok(&format!("rm {target}/big && sync"));

    // Stats match df.
    let s = stats(&mut c, &id, &target).await;
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .expect("bytes");
    let df = w.sh_ok(&format!(
        "df -B1 --output=size,used,avail {target} | tail -1"
    ));
    let df: Vec<i64> = df
        .split_whitespace()
        .map(|x| x.parse().expect("df number"))
        .collect();
    assert_eq!(
        (bytes.total, bytes.used, bytes.available),
        (df[0], df[1], df[2])
    );
    assert!(s
        .usage
        .iter()
        .any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32));
    assert!(!s.volume_condition.expect("condition").abnormal);

    // Online expansion: controller then node; then 100 MiB fits.
    for _ in 0..3 {
        let e = c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 512 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("expand")
            .into_inner();
        assert_eq!(e.capacity_bytes, 512 * MIB);
        assert!(e.node_expansion_required);
        c.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.clone(),
                staging_target_path: staging.clone(),
                ..Default::default()
            })
            .await
            .expect("node expand");
    }
    w.sh_ok(&format!(
        "dd if=/dev/zero of={target}/big bs=1M count=400 2>&1 && sync"
    ));

    // Snapshot (volume mounted: frozen while copied) → restore; clone.
    let snap = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert!(snap.ready_to_use);
    let again = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot again")
        .into_inner();
    assert_eq!(again.snapshot.expect("s").snapshot_id, snap.snapshot_id);
    w.sh_ok(&format!("echo changed > {target}/greeting && sync"));
    let mut from_snap = create_req("pvc-restored", 512 * MIB, cap.clone());
    from_snap.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = c
        .controller
        .create_volume(from_snap)
        .await
        .expect("restore")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (rs, rt) = stage_publish(&w, &mut c, &restored, cap.clone()).await;
    assert_eq!(w.sh_ok(&format!("cat {rt}/greeting")).trim(), "hello");
    let mut clone = create_req("pvc-clone", 512 * MIB, cap.clone());
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.clone(),
            },
        )),
    });
    let cloned = c
        .controller
        .create_volume(clone)
        .await
        .expect("clone")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (cs, ct) = stage_publish(&w, &mut c, &cloned, cap.clone()).await;
    assert_eq!(w.sh_ok(&format!("cat {ct}/greeting")).trim(), "changed");

    // Deleting a staged volume is refused; teardown, repeated, is OK.
    assert_eq!(
        code(
            c.controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::FailedPrecondition
    );
    for (v, s, t) in [
        (&id, &staging, &target),
        (&restored, &rs, &rt),
        (&cloned, &cs, &ct),
    ] {
        for _ in 0..3 {
            unpublish_unstage(&mut c, v, s, t).await;
        }
        for _ in 0..3 {
            c.controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: v.to_string(),
                    ..Default::default()
                })
                .await
                .expect("delete");
        }
    }
    for _ in 0..3 {
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete snapshot");
    }
    assert!(w.mounts().is_empty(), "mounts left: {:?}", w.mounts());
    assert!(
        w.volume_loops().is_empty(),
        "loop devices left: {:?}",
        w.volume_loops()
    );
    let left = w.ls(&w.pool_path().join("images"));
    assert!(left.is_empty(), "images left: {left:?}");
    let cap2 = c
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .expect("cap")
        .into_inner();
    assert!(
        (cap2.available_capacity - cap0.available_capacity).abs() < 16 * MIB,
        "{cap0:?} vs {cap2:?}"
    );
}

/// Missing fields, unknown ids, bad capacities, impossible placements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("", rw());
    let t = w.path("t").to_string_lossy().into_owned();
    // INVALID_ARGUMENT for missing fields.
    assert_eq!(
        code(
            c.controller
                .create_volume(create_req("", MIB, cap.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_caps = create_req("x", MIB, cap.clone());
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(c.controller.create_volume(no_caps).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller
                .delete_volume(csi::DeleteVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_stage_volume(stage_req("", &t, cap.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: "v".into(),
                    staging_target_path: t.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_publish_volume(publish_req("v", &t, "", cap.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: "v".into(),
                    target_path: String::new()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: String::new(),
                    staging_target_path: t.clone()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: "s".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: "v".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: "v".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let mut bad_param = create_req("x", 64 * MIB, cap.clone());
    bad_param.parameters = HashMap::from([("backend".into(), "lvm".into())]);
    assert_eq!(
        code(c.controller.create_volume(bad_param).await),
        Code::InvalidArgument
    );
    let mut multi = create_req(
        "x",
        64 * MIB,
        mount_cap(
            "",
            csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
        ),
    );
    multi.parameters.clear();
    assert_eq!(
        code(c.controller.create_volume(multi).await),
        Code::InvalidArgument
    );
    // NOT_FOUND for unknown volumes, snapshots and sources.
    assert_eq!(
        code(
            c.node
                .node_stage_volume(stage_req("vol-nope", &t, cap.clone()))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.node
                .node_publish_volume(publish_req("vol-nope", &t, &t, cap.clone()))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: "vol-nope".into()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: "vol-nope".into(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: MIB,
                        limit_bytes: 0
                    }),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: "s".into(),
                    source_volume_id: "vol-nope".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    let mut from_nothing = create_req("y", 64 * MIB, cap.clone());
    from_nothing.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "snap-nope".into(),
            },
        )),
    });
    assert_eq!(
        code(c.controller.create_volume(from_nothing).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: "vol-nope".into(),
                    volume_path: t.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    // OK for removing what is not there.
    assert_eq!(
        code(
            c.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: "vol-nope".into(),
                    target_path: t.clone()
                })
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            c.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: "vol-nope".into(),
                    staging_target_path: t.clone()
                })
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            c.controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: "vol-nope".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            c.controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: "snap-nope".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::Ok
    );
    // OUT_OF_RANGE and RESOURCE_EXHAUSTED.
    let mut bad_range = create_req("r", 64 * MIB, cap.clone());
    bad_range.capacity_range = Some(csi::CapacityRange {
        required_bytes: 64 * MIB,
        limit_bytes: 32 * MIB,
    });
    assert_eq!(
        code(c.controller.create_volume(bad_range).await),
        Code::OutOfRange
    );
    let mut tiny_xfs = create_req("r2", 0, mount_cap("xfs", rw()));
    tiny_xfs.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 100 * MIB,
    });
    assert_eq!(
        code(c.controller.create_volume(tiny_xfs).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            c.controller
                .create_volume(create_req("huge", 1 << 40, cap.clone()))
                .await
        ),
        Code::ResourceExhausted
    );
    let mut elsewhere = create_req("topo", 64 * MIB, cap.clone());
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([("topology.nodeplane.io/node".into(), "other-node".into())]),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(c.controller.create_volume(elsewhere).await),
        Code::ResourceExhausted
    );
    // FAILED_PRECONDITION: publish before stage.
    let v = c
        .controller
        .create_volume(create_req("fp", 64 * MIB, cap.clone()))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v");
    let target = w.path("fp-target").to_string_lossy().into_owned();
    assert_eq!(
        code(
            c.node
                .node_publish_volume(publish_req(&v.volume_id, &t, &target, cap.clone()))
                .await
        ),
        Code::FailedPrecondition
    );
    // ABORTED: concurrent operations on one volume name; one volume results.
    let mut tasks = vec![];
    for _ in 0..8 {
        let mut cc = c.controller.clone();
        let req = create_req("race", 64 * MIB, cap.clone());
        tasks.push(tokio::spawn(async move { cc.create_volume(req).await }));
    }
    let mut ok_ids = vec![];
    let mut aborted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => ok_ids.push(r.into_inner().volume.expect("v").volume_id),
            Err(s) if s.code() == Code::Aborted => aborted += 1,
            Err(s) => panic!("concurrent create: {s:?}"),
        }
    }
    ok_ids.dedup();
    assert_eq!(
        ok_ids.len(),
        1,
        "one volume for one name: {ok_ids:?} ({aborted} aborted)"
    );
    let list = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.entries.len(), 2, "fp and race");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_and_capacity() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("", rw());
    let mut ids = vec![];
    for i in 0..5 {
        let v = c
            .controller
            .create_volume(create_req(&format!("p{i}"), 16 * MIB, cap.clone()))
            .await
            .expect("create");
        ids.push(v.into_inner().volume.expect("v").volume_id);
    }
    ids.sort();
    let mut seen = vec![];
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(
            r.entries
                .iter()
                .map(|e| e.volume.as_ref().expect("v").volume_id.clone()),
        );
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);
    assert_eq!(
        code(
            c.controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: "garbage".into()
                })
                .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            c.controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: -1,
                    starting_token: String::new()
                })
                .await
        ),
        Code::InvalidArgument
    );
    // Capacity: what remains plus what was provisioned stays the pool.
    let before = c
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .expect("cap")
        .into_inner();
    c.controller
        .create_volume(create_req("big", 256 * MIB, cap.clone()))
        .await
        .expect("create big");
    let after = c
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .expect("cap")
        .into_inner();
    let d = before.available_capacity - after.available_capacity;
    assert!(
        (256 * MIB..256 * MIB + 8 * MIB).contains(&d),
        "capacity dropped by {d}"
    );
    assert_eq!(after.minimum_volume_size, Some(16 * MIB));
    assert_eq!(after.maximum_volume_size, Some(after.available_capacity));
    let other = c
        .controller
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(
                    "topology.nodeplane.io/node".into(),
                    "elsewhere".into(),
                )]),
            }),
            ..Default::default()
        })
        .await
        .expect("cap")
        .into_inner();
    assert_eq!(other.available_capacity, 0);
}

/// ext4 grows online where the driver has CAP_SYS_RESOURCE; without it
/// (as here) NodeExpandVolume says so and the filesystem grows offline at
/// the next stage. Either way the limit moves only after expansion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_size_limit_and_expansion() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("ext4", rw());
    let id = c
        .controller
        .create_volume(create_req("e4", 64 * MIB, cap.clone()))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (staging, target) = stage_publish(&w, &mut c, &id, cap.clone()).await;
    let full = w.sh(&format!(
        "dd if=/dev/zero of={target}/big bs=1M count=80 2>&1"
    ));
    assert!(
        !full.status.success() && String::from_utf8_lossy(&full.stdout).contains("No space left"),
        "{full:?}"
    );
    w.sh_ok(&format!("rm {target}/big; echo keep > {target}/keep; sync"));
    let e = c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("expand")
        .into_inner();
    assert!(e.node_expansion_required);
    let online = c
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            staging_target_path: staging.clone(),
            ..Default::default()
        })
        .await;
    if let Err(s) = &online {
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("CAP_SYS_RESOURCE"), "{s:?}");
        unpublish_unstage(&mut c, &id, &staging, &target).await;
        stage_publish(&w, &mut c, &id, cap.clone()).await;
    }
    w.sh_ok(&format!(
        "dd if=/dev/zero of={target}/big bs=1M count=80 2>&1 && sync"
    ));
    assert_eq!(w.sh_ok(&format!("cat {target}/keep")).trim(), "keep");
}

/// The kubelet's plugin watcher finds `<registry>/<driver>-reg.sock` and
/// calls GetInfo, then NotifyRegistrationStatus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_plugin_registration() {
    let dir = nodeplane_tests::TempDir::new("csireg");
    let w = CsiWorld::start_with(
        PoolFs::Xfs,
        1024,
        &["--registration-dir", &dir.path().to_string_lossy()],
    );
    w.registered(dir.path()).await;
}
