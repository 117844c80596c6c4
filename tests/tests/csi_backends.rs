//! The btrfs backend, raw block volumes, volume condition and ephemeral
//! inline volumes, over the socket against the real driver.

use std::collections::HashMap;

use nodeplane_proto::csi;
use nodeplane_tests::csi::*;

fn req(
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
    params: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

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
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("stage");
    c.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .expect("publish");
    (staging, target)
}

async fn teardown(c: &mut Clients, id: &str, staging: &str, target: &str) {
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
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
}

fn content(kind: csi::volume_content_source::Type) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource { r#type: Some(kind) })
}

/// Subvolume + qgroup: EDQUOT past the size, expansion lifts it, snapshot →
/// restore and clone keep data, stats report the qgroup not the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_backend_limit_expand_snapshot_clone() {
    let w = CsiWorld::start(PoolFs::Btrfs, 2048);
    let mut c = w.clients().await;
    let cap = mount_cap("", rw());
    let v = c
        .controller
        .create_volume(req("b1", 64 * MIB, cap.clone(), &[]))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v");
    assert_eq!(
        v.volume_context.get("backend").map(String::as_str),
        Some("btrfs")
    );
    let id = v.volume_id;
    let (staging, target) = stage_publish(&w, &mut c, &id, cap.clone()).await;
    w.sh_ok(&format!("echo hello > {target}/greeting && sync"));
    let full = w.sh(&format!(
        "dd if=/dev/zero of={target}/big bs=1M count=100 2>&1; sync"
    ));
    let out = String::from_utf8_lossy(&full.stdout);
    assert!(
        out.contains("Disk quota exceeded"),
        "writing past 64 MiB: {out}"
    );
    w.sh_ok(&format!("rm -f {target}/big && sync"));
    let s = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .expect("bytes");
    assert_eq!(bytes.total, 64 * MIB);
    let e = c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 256 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("expand")
        .into_inner();
    assert!(!e.node_expansion_required);
    w.sh_ok(&format!(
        "dd if=/dev/zero of={target}/big bs=1M count=100 2>&1 && sync && rm {target}/big"
    ));
    let snap = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "bs".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("s");
    w.sh_ok(&format!("echo changed > {target}/greeting && sync"));
    let mut r = req("b-restore", 256 * MIB, cap.clone(), &[]);
    r.volume_content_source = content(csi::volume_content_source::Type::Snapshot(
        csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        },
    ));
    let rid = c
        .controller
        .create_volume(r)
        .await
        .expect("restore")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (rs, rt) = stage_publish(&w, &mut c, &rid, cap.clone()).await;
    assert_eq!(w.sh_ok(&format!("cat {rt}/greeting")).trim(), "hello");
    let mut cl = req("b-clone", 256 * MIB, cap.clone(), &[]);
    cl.volume_content_source = content(csi::volume_content_source::Type::Volume(
        csi::volume_content_source::VolumeSource {
            volume_id: id.clone(),
        },
    ));
    let cid = c
        .controller
        .create_volume(cl)
        .await
        .expect("clone")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (cs, ct) = stage_publish(&w, &mut c, &cid, cap.clone()).await;
    assert_eq!(w.sh_ok(&format!("cat {ct}/greeting")).trim(), "changed");
    let list = c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("list snapshots")
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    for (v, s, t) in [(&id, &staging, &target), (&rid, &rs, &rt), (&cid, &cs, &ct)] {
        teardown(&mut c, v, s, t).await;
    }
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .expect("delete snap");
    assert!(w.ls(&w.pool_path().join("subvolumes")).is_empty());
    assert!(w.ls(&w.pool_path().join("btrfs-snapshots")).is_empty());
    assert!(w.mounts().is_empty(), "{:?}", w.mounts());
    // Block volumes cannot be btrfs subvolumes; the image backend on the same pool can.
    let code = c
        .controller
        .create_volume(req("blk", 64 * MIB, block_cap(), &[]))
        .await
        .expect_err("block on btrfs")
        .code();
    assert_eq!(code, tonic::Code::InvalidArgument);
    c.controller
        .create_volume(req("blk", 64 * MIB, block_cap(), &[("backend", "image")]))
        .await
        .expect("block on image backend");
}

/// A raw block volume: the loop device at the target path, readable and
/// writable through it, sized as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_volume() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let id = c
        .controller
        .create_volume(req("blk", 32 * MIB, block_cap(), &[]))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (staging, target) = stage_publish(&w, &mut c, &id, block_cap()).await;
    assert_eq!(
        w.sh_ok(&format!("blockdev --getsize64 {target}")).trim(),
        (32 * MIB).to_string()
    );
    w.sh_ok(&format!(
        "printf 'raw block data' | dd of={target} bs=512 seek=100 conv=fsync 2>/dev/null"
    ));
    let back = w.sh_ok(&format!(
        "dd if={target} bs=512 skip=100 count=1 2>/dev/null | head -c 14"
    ));
    assert_eq!(back, "raw block data");
    let s = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(s.usage[0].total, 32 * MIB);
    teardown(&mut c, &id, &staging, &target).await;
    assert!(w.volume_loops().is_empty());
}

/// Deleting the backing file under a staged volume: stats and
/// ControllerGetVolume report the volume abnormal, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_backing_file_is_abnormal() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let cap = mount_cap("ext4", rw());
    let id = c
        .controller
        .create_volume(req("br", 32 * MIB, cap.clone(), &[]))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    let (_staging, target) = stage_publish(&w, &mut c, &id, cap.clone()).await;
    let get = c
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        !get.status
            .expect("status")
            .volume_condition
            .expect("cond")
            .abnormal
    );
    w.sh_ok(&format!("rm {}/images/{id}.img", w.pool_path().display()));
    let s = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    let cond = s.volume_condition.expect("cond");
    assert!(cond.abnormal && cond.message.contains(".img"), "{cond:?}");
    let get = c
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        get.status
            .expect("status")
            .volume_condition
            .expect("cond")
            .abnormal
    );
}

/// An ephemeral inline volume: made by NodePublish, gone at NodeUnpublish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_inline_volume() {
    let w = CsiWorld::start(PoolFs::Xfs, 1024);
    let mut c = w.clients().await;
    let target = w.path("eph/target").to_string_lossy().into_owned();
    let ctx = HashMap::from([
        (
            "csi.storage.k8s.io/ephemeral".to_string(),
            "true".to_string(),
        ),
        ("size".to_string(), "48Mi".to_string()),
    ]);
    for _ in 0..3 {
        c.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: "csi-eph-1".into(),
                target_path: target.clone(),
                volume_capability: Some(mount_cap("", rw())),
                volume_context: ctx.clone(),
                ..Default::default()
            })
            .await
            .expect("ephemeral publish");
    }
    w.sh_ok(&format!("echo x > {target}/f && sync"));
    let size = w.sh_ok(&format!("df -B1 --output=size {target} | tail -1"));
    let size: i64 = size.trim().parse().expect("df");
    assert!(size > 36 * MIB && size <= 48 * MIB, "ephemeral size {size}");
    for _ in 0..3 {
        c.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: "csi-eph-1".into(),
                target_path: target.clone(),
            })
            .await
            .expect("ephemeral unpublish");
    }
    let list = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(list.entries.is_empty(), "{list:?}");
    assert!(w.mounts().is_empty(), "{:?}", w.mounts());
    assert!(w.volume_loops().is_empty());
}
