//! Capabilities the other CSI suites leave out: single-writer and
//! multi-writer publish semantics, VOLUME_MOUNT_GROUP, the full-copy
//! snapshot/clone fallback on a pool without reflink, the start-up scan for
//! storage with no record, and ABORTED for a call meeting a busy volume.

use nodeplane_proto::csi;
use nodeplane_tests::csi::*;
use tonic::Code;

use csi::volume_capability::access_mode::Mode;

async fn create(c: &mut Clients, r: csi::CreateVolumeRequest) -> String {
    c.controller
        .create_volume(r)
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v")
        .volume_id
}

async fn stage(w: &CsiWorld, c: &mut Clients, id: &str, cap: &csi::VolumeCapability) -> String {
    let staging = w.path(&format!("{id}/staging"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    let staging = staging.to_string_lossy().into_owned();
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("stage");
    staging
}

async fn publish(
    w: &CsiWorld,
    c: &mut Clients,
    id: &str,
    staging: &str,
    name: &str,
    cap: &csi::VolumeCapability,
) -> (
    Result<tonic::Response<csi::NodePublishVolumeResponse>, tonic::Status>,
    String,
) {
    let target = w
        .path(&format!("{id}/{name}"))
        .to_string_lossy()
        .into_owned();
    let r = c
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await;
    (r, target)
}

/// ReadWriteOncePod: a SINGLE_NODE_SINGLE_WRITER volume publishes to one
/// target only (FAILED_PRECONDITION for a second, as the spec's
/// NodePublishVolume table and the hostpath driver have it; the same target
/// again is OK). SINGLE_NODE_MULTI_WRITER publishes to two targets that see
/// each other's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_writer_and_multi_writer() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let single = mount_cap("", Mode::SingleNodeSingleWriter);
    let id = create(&mut c, create_req("once-pod", 64 * MIB, single.clone())).await;
    let staging = stage(&w, &mut c, &id, &single).await;
    let (r, _a) = publish(&w, &mut c, &id, &staging, "a", &single).await;
    r.expect("first publish");
    let (r, _) = publish(&w, &mut c, &id, &staging, "a", &single).await;
    r.expect("same target again is idempotent");
    let (r, b) = publish(&w, &mut c, &id, &staging, "b", &single).await;
    assert_eq!(
        r.expect_err("second target of a single-writer volume")
            .code(),
        Code::FailedPrecondition
    );
    assert!(
        !w.mounts().iter().any(|m| m.contains(&b)),
        "nothing mounted at the refused target"
    );

    let multi = mount_cap("", Mode::SingleNodeMultiWriter);
    let id = create(&mut c, create_req("shared", 64 * MIB, multi.clone())).await;
    let staging = stage(&w, &mut c, &id, &multi).await;
    let (r, a) = publish(&w, &mut c, &id, &staging, "a", &multi).await;
    r.expect("publish a");
    let (r, b) = publish(&w, &mut c, &id, &staging, "b", &multi).await;
    r.expect("publish b");
    w.sh_ok(&format!("echo from-a > {a}/f && sync"));
    assert_eq!(w.sh_ok(&format!("cat {b}/f")).trim(), "from-a");
    // A single-writer publish beside existing multi-writer targets is refused.
    let (r, _) = publish(&w, &mut c, &id, &staging, "c", &single).await;
    assert_eq!(
        r.expect_err("single-writer beside others").code(),
        Code::FailedPrecondition
    );
}

/// VOLUME_MOUNT_GROUP (fsGroup via CSI): the volume's root belongs to the
/// group, setgid, group-writable, so files made there inherit the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_mount_group() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let mut cap = mount_cap("ext4", rw());
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.volume_mount_group = "4321".into();
    }
    let id = create(&mut c, create_req("grp", 64 * MIB, cap.clone())).await;
    let staging = stage(&w, &mut c, &id, &cap).await;
    let (r, t) = publish(&w, &mut c, &id, &staging, "t", &cap).await;
    r.expect("publish");
    assert_eq!(w.sh_ok(&format!("stat -c '%g %a' {t}")).trim(), "4321 2775");
    w.sh_ok(&format!("touch {t}/made-by-root"));
    assert_eq!(
        w.sh_ok(&format!("stat -c '%g' {t}/made-by-root")).trim(),
        "4321"
    );
    // A non-numeric group is a bad argument, named as such.
    let mut bad = cap.clone();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut bad.access_type {
        m.volume_mount_group = "wheel".into();
    }
    let (r, _) = publish(&w, &mut c, &id, &staging, "u", &bad).await;
    let e = r.expect_err("non-numeric group");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("volume_mount_group"),
        "{}",
        e.message()
    );
}

/// An ext4 pool cannot reflink: snapshot, restore and clone take the full
/// (sparse) copy path and still preserve data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_pool_full_copy_snapshot_and_clone() {
    let w = CsiWorld::start(PoolFs::Ext4, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("ext4", rw());
    let id = create(&mut c, create_req("src", 64 * MIB, cap.clone())).await;
    let staging = stage(&w, &mut c, &id, &cap).await;
    let (r, t) = publish(&w, &mut c, &id, &staging, "t", &cap).await;
    r.expect("publish");
    w.sh_ok(&format!("echo original > {t}/greeting && sync"));
    let snap = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "s".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot on ext4 pool")
        .into_inner()
        .snapshot
        .expect("s");
    w.sh_ok(&format!("echo changed > {t}/greeting && sync"));
    let pool = w.pool_path().display().to_string();
    // A full copy owns its blocks: the snapshot image shares no extent
    // with the volume (ext4 has no shared extents at all).
    let snaps = w.sh_ok(&format!("ls {pool}/image-snapshots"));
    assert_eq!(snaps.trim(), format!("{}.img", snap.snapshot_id));

    let mut r = create_req("restored", 64 * MIB, cap.clone());
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let rid = create(&mut c, r).await;
    let rs = stage(&w, &mut c, &rid, &cap).await;
    let (r, rt) = publish(&w, &mut c, &rid, &rs, "t", &cap).await;
    r.expect("publish restored");
    assert_eq!(w.sh_ok(&format!("cat {rt}/greeting")).trim(), "original");

    let mut r = create_req("cloned", 64 * MIB, cap.clone());
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.clone(),
            },
        )),
    });
    let cid = create(&mut c, r).await;
    let cs = stage(&w, &mut c, &cid, &cap).await;
    let (r, ct) = publish(&w, &mut c, &cid, &cs, "t", &cap).await;
    r.expect("publish clone");
    assert_eq!(w.sh_ok(&format!("cat {ct}/greeting")).trim(), "changed");
    // The copies are independent of their source.
    w.sh_ok(&format!("echo third > {t}/greeting && sync"));
    assert_eq!(w.sh_ok(&format!("cat {ct}/greeting")).trim(), "changed");
    assert_eq!(w.sh_ok(&format!("cat {rt}/greeting")).trim(), "original");
}

/// Storage in the pool with no metadata record at all (a crash before the
/// intent was written, or a stray file) is removed at start-up; recorded
/// volumes are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_scan_removes_unrecorded_storage() {
    let mut w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("", rw());
    let id = create(&mut c, create_req("kept", 32 * MIB, cap.clone())).await;
    drop(c);
    w.kill9();
    let pool = w.pool_path().display().to_string();
    w.sh_ok(&format!(
        "truncate -s 32M {pool}/images/pvc-00deadbeef00cafe.img && truncate -s 32M {pool}/image-snapshots/snap-00deadbeef00cafe.img"
    ));
    w.restart();
    let mut c = w.clients().await;
    let images = w.sh_ok(&format!("ls {pool}/images {pool}/image-snapshots"));
    assert!(!images.contains("deadbeef"), "leaks removed: {images}");
    assert!(
        images.contains(&format!("{id}.img")),
        "recorded volume kept: {images}"
    );
    assert!(
        w.log_text().contains("removing storage with no metadata"),
        "the scan says what it removed"
    );
    let list = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.entries.len(), 1);
}

/// ABORTED, deterministically: an operation is held at a pause point (its
/// lock taken) while a second call on the same volume or name arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_for_concurrent_operation_on_one_volume() {
    let mut w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("", rw());
    let id = create(&mut c, create_req("busy", 32 * MIB, cap.clone())).await;
    w.kill9();
    w.set_pause(Some("expand:after-intent"));
    w.restart();
    let mut c = w.clients().await;
    let mut c2 = c.clone();
    let eid = id.clone();
    let expand = tokio::spawn(async move {
        c2.controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: eid,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
    });
    tokio::task::spawn_blocking({
        let log = w.log.clone();
        move || {
            let start = std::time::Instant::now();
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("pause point reached")
            {
                assert!(start.elapsed() < std::time::Duration::from_secs(30));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    })
    .await
    .expect("wait paused");
    let del = c
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    let e = del.expect_err("delete while an expand holds the volume");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    w.release_pause();
    let r = expand.await.expect("task").expect("expand completes");
    assert!(r.into_inner().capacity_bytes >= 64 * MIB);
    // With the volume free again, the same delete succeeds.
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .expect("delete after release");
}
