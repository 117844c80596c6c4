//! kill -9 of the driver at every crash point the driver has
//! (`nodeplane_csi::crash::POINTS`: between every two consecutive steps of
//! create, restore, clone, delete, expand, node expansion, snapshot,
//! snapshot deletion, stage, unstage, publish, unpublish and ephemeral
//! volumes, for both backends), then a restart: the CO's retry succeeds,
//! nothing is lost (the data is still there) and, after the CO tears
//! everything down, nothing is leaked (files, subvolumes, qgroups, loop
//! devices, mounts, metadata records). The driver SIGKILLs itself at the
//! named point (NODEPLANE_CSI_CRASH_AT). And a node reboot: mounts and loop
//! devices of staged and published volumes come back.

use std::collections::HashMap;

use nodeplane_csi::crash::POINTS;
use nodeplane_proto::csi;
use nodeplane_tests::csi::*;
use tonic::{Response, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Image,
    Btrfs,
}

impl Backend {
    fn param(self) -> &'static str {
        match self {
            Backend::Image => "image",
            Backend::Btrfs => "btrfs",
        }
    }
}

/// The operations the crash points belong to; a point whose operation is
/// not here fails `every_point_has_a_scenario`.
const OPS: &[&str] = &[
    "create",
    "restore",
    "clone",
    "delete",
    "delete-snapshot",
    "expand",
    "node-expand",
    "snapshot",
    "stage",
    "unstage",
    "publish",
    "unpublish",
    "ephemeral",
];

fn op_of(point: &str) -> &str {
    point.split(':').next().unwrap_or_default()
}

/// The backends a point is reached with: the one its name gives, or both.
fn backends_of(point: &str) -> Vec<Backend> {
    match point.split(':').nth(1) {
        Some("image") => vec![Backend::Image],
        Some("btrfs") => vec![Backend::Btrfs],
        _ => vec![Backend::Image, Backend::Btrfs],
    }
}

/// A volume the CO knows, with where it is staged and published.
#[derive(Debug, Default)]
struct Vol {
    id: String,
    staging: Option<String>,
    targets: Vec<String>,
    ephemeral: bool,
}

/// One scenario's volumes and snapshots, torn down at its end.
#[derive(Debug)]
struct Scene {
    b: Backend,
    /// The filesystem of mount volumes ("" on btrfs: the subvolume).
    fs: &'static str,
    bytes: i64,
    vols: Vec<Vol>,
    snaps: Vec<String>,
    seq: usize,
}

impl Scene {
    fn new(b: Backend, point: &str) -> Scene {
        // Node expansion and expansion of a staged image volume grow the
        // filesystem online: xfs can here, ext4 cannot (no
        // CAP_SYS_RESOURCE in this sandbox; see the README).
        let grows = matches!(op_of(point), "expand" | "node-expand");
        let (fs, bytes) = match b {
            Backend::Btrfs => ("", 32 * MIB),
            Backend::Image if grows => ("xfs", 300 * MIB),
            Backend::Image => ("ext4", 32 * MIB),
        };
        Scene {
            b,
            fs,
            bytes,
            vols: vec![],
            snaps: vec![],
            seq: 0,
        }
    }

    fn cap(&self) -> csi::VolumeCapability {
        mount_cap(self.fs, rw())
    }

    fn params(&self) -> HashMap<String, String> {
        HashMap::from([("backend".to_string(), self.b.param().to_string())])
    }

    fn create_req(
        &self,
        name: &str,
        source: Option<csi::VolumeContentSource>,
    ) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![self.cap()],
            parameters: self.params(),
            volume_content_source: source,
            ..Default::default()
        }
    }

    fn vol(&mut self, id: &str) -> &mut Vol {
        let i = self
            .vols
            .iter()
            .position(|v| v.id == id)
            .unwrap_or_else(|| panic!("volume {id} is not tracked"));
        &mut self.vols[i]
    }

    fn staging_req(&mut self, w: &CsiWorld, id: &str) -> csi::NodeStageVolumeRequest {
        self.seq += 1;
        let staging = w.path(&format!("{id}-{}/staging", self.seq));
        std::fs::create_dir_all(&staging).expect("staging dir");
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into_owned(),
            volume_capability: Some(self.cap()),
            ..Default::default()
        }
    }

    fn publish_req(&mut self, w: &CsiWorld, id: &str) -> csi::NodePublishVolumeRequest {
        self.seq += 1;
        let staging = self.vol(id).staging.clone().expect("staged");
        csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging,
            target_path: w
                .path(&format!("{id}-{}/target", self.seq))
                .to_string_lossy()
                .into_owned(),
            volume_capability: Some(self.cap()),
            ..Default::default()
        }
    }

    fn ephemeral_req(&mut self, w: &CsiWorld) -> csi::NodePublishVolumeRequest {
        let mut ctx = self.params();
        ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        ctx.insert("size".into(), format!("{}", self.bytes));
        csi::NodePublishVolumeRequest {
            volume_id: "csi-eph-crash".into(),
            target_path: w.path("eph/target").to_string_lossy().into_owned(),
            volume_capability: Some(self.cap()),
            volume_context: ctx,
            ..Default::default()
        }
    }
}

fn ok<T: std::fmt::Debug>(r: Result<Response<T>, Status>, what: &str, w: &CsiWorld) -> T {
    match r {
        Ok(r) => r.into_inner(),
        Err(e) => panic!("{what}: {e:?}\nlog:\n{}", w.log_text()),
    }
}

async fn create(w: &CsiWorld, c: &mut Clients, s: &mut Scene, name: &str) -> String {
    let r = c.controller.create_volume(s.create_req(name, None)).await;
    let id = ok(r, "create", w).volume.expect("volume").volume_id;
    s.vols.push(Vol {
        id: id.clone(),
        ..Default::default()
    });
    id
}

async fn stage(w: &CsiWorld, c: &mut Clients, s: &mut Scene, id: &str) -> String {
    let r = s.staging_req(w, id);
    ok(c.node.node_stage_volume(r.clone()).await, "stage", w);
    s.vol(id).staging = Some(r.staging_target_path.clone());
    r.staging_target_path
}

async fn publish(w: &CsiWorld, c: &mut Clients, s: &mut Scene, id: &str) -> String {
    let r = s.publish_req(w, id);
    ok(c.node.node_publish_volume(r.clone()).await, "publish", w);
    s.vol(id).targets.push(r.target_path.clone());
    r.target_path
}

/// A volume staged and published with `data` in file `f`; its target.
async fn with_data(
    w: &CsiWorld,
    c: &mut Clients,
    s: &mut Scene,
    name: &str,
    data: &str,
) -> (String, String) {
    let id = create(w, c, s, name).await;
    stage(w, c, s, &id).await;
    let t = publish(w, c, s, &id).await;
    w.sh_ok(&format!("echo {data} > {t}/f && sync"));
    (id, t)
}

async fn snapshot(w: &CsiWorld, c: &mut Clients, s: &mut Scene, vol: &str) -> String {
    let r = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: vol.into(),
            name: "snap".into(),
            ..Default::default()
        })
        .await;
    let snap = ok(r, "snapshot", w).snapshot.expect("snapshot");
    assert!(snap.ready_to_use);
    if !s.snaps.contains(&snap.snapshot_id) {
        s.snaps.push(snap.snapshot_id.clone());
    }
    snap.snapshot_id
}

/// Reads `f` in a volume through a fresh stage and publish.
async fn read_back(w: &CsiWorld, c: &mut Clients, s: &mut Scene, id: &str) -> String {
    stage(w, c, s, id).await;
    let t = publish(w, c, s, id).await;
    w.sh_ok(&format!("cat {t}/f")).trim().to_string()
}

/// Writes through `target` with a deadline: a filesystem left frozen would
/// block the write forever.
fn write_through(w: &CsiWorld, target: &str) {
    let out = w.sh(&format!(
        "timeout 20 sh -c 'echo more > {target}/g && sync'"
    ));
    assert!(
        out.status.success(),
        "write to {target} failed or hung (frozen filesystem?): {out:?}"
    );
}

/// The CO tears everything down (unpublish, unstage, snapshots, volumes);
/// every call must succeed.
async fn teardown(w: &CsiWorld, c: &mut Clients, s: &mut Scene) {
    let vols = std::mem::take(&mut s.vols);
    for v in &vols {
        for t in &v.targets {
            let r = c
                .node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: v.id.clone(),
                    target_path: t.clone(),
                })
                .await;
            ok(r, "teardown unpublish", w);
        }
        if let Some(st) = v.staging.as_ref().filter(|_| !v.ephemeral) {
            let r = c
                .node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: st.clone(),
                })
                .await;
            ok(r, "teardown unstage", w);
        }
    }
    for snap in std::mem::take(&mut s.snaps) {
        let r = c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap,
                ..Default::default()
            })
            .await;
        ok(r, "teardown delete snapshot", w);
    }
    // Ephemeral volumes went with their last unpublish.
    for v in vols.iter().filter(|v| !v.ephemeral) {
        let r = c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await;
        ok(r, "teardown delete", w);
    }
}

/// Nothing left: storage, metadata, qgroups, loop devices, mounts.
fn assert_clean(w: &CsiWorld, label: &str) {
    let pool = w.pool_path();
    for d in ["images", "image-snapshots", "subvolumes", "btrfs-snapshots"] {
        let left = w.ls(&pool.join(d));
        assert!(
            left.is_empty(),
            "{label}: leaked in {d}: {left:?}\n{}",
            w.log_text()
        );
    }
    for d in ["volumes", "snapshots"] {
        let left = w.ls(&w.state.join(d));
        assert!(left.is_empty(), "{label}: metadata left in {d}: {left:?}");
    }
    let eph = w.sh_ok(&format!(
        "ls -A {}/ephemeral 2>/dev/null; true",
        w.state.display()
    ));
    assert!(
        eph.trim().is_empty(),
        "{label}: ephemeral staging left: {eph}"
    );
    // A loop device detached while still mounted (autoclear) goes
    // asynchronously after the last unmount: give the kernel a moment.
    let start = std::time::Instant::now();
    while !w.volume_loops().is_empty() && start.elapsed().as_secs() < 3 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        w.volume_loops().is_empty(),
        "{label}: loop devices left: {:?}",
        w.volume_loops()
    );
    assert!(
        w.mounts().is_empty(),
        "{label}: mounts left: {:?}",
        w.mounts()
    );
    // A deleted subvolume's qgroup goes when the kernel has dropped the
    // subvolume (it removes the qgroup itself then), which DeleteVolume
    // does not wait for: wait here, then nothing may be left.
    let qgroups = w.sh_ok(&format!(
        "btrfs filesystem sync {p} && btrfs subvolume sync {p} >/dev/null && btrfs qgroup show --raw {p}",
        p = pool.display()
    ));
    let stale: Vec<&str> = qgroups
        .lines()
        .filter(|l| l.starts_with("0/") && !l.starts_with("0/5 "))
        .collect();
    assert!(stale.is_empty(), "{label}: qgroups left: {stale:?}");
}

/// Runs the operation a point belongs to: the call that dies the first
/// time and is retried after the restart. Returns an error when the
/// driver died (or refused).
async fn op_call(c: &mut Clients, s: &mut Scene, point: &str, pre: &Pre) -> Result<(), Status> {
    match op_of(point) {
        "create" => c
            .controller
            .create_volume(s.create_req("pvc", None))
            .await
            .map(|r| {
                let id = r.into_inner().volume.expect("volume").volume_id;
                if !s.vols.iter().any(|v| v.id == id) {
                    s.vols.push(Vol {
                        id,
                        ..Default::default()
                    });
                }
            }),
        "restore" | "clone" => {
            let src = if op_of(point) == "restore" {
                csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: pre.snap.clone(),
                    },
                )
            } else {
                csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                    volume_id: pre.vol.clone(),
                })
            };
            let req = s.create_req("copy", Some(csi::VolumeContentSource { r#type: Some(src) }));
            c.controller.create_volume(req).await.map(|r| {
                let id = r.into_inner().volume.expect("volume").volume_id;
                if !s.vols.iter().any(|v| v.id == id) {
                    s.vols.push(Vol {
                        id,
                        ..Default::default()
                    });
                }
            })
        }
        "delete" => c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: pre.vol.clone(),
                ..Default::default()
            })
            .await
            .map(|_| s.vols.retain(|v| v.id != pre.vol)),
        "delete-snapshot" => c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: pre.snap.clone(),
                ..Default::default()
            })
            .await
            .map(|_| s.snaps.retain(|x| *x != pre.snap)),
        "expand" => c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: pre.vol.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: s.bytes + 64 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(s.cap()),
                ..Default::default()
            })
            .await
            .map(|r| assert_eq!(r.into_inner().capacity_bytes, s.bytes + 64 * MIB)),
        "node-expand" => c
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: pre.vol.clone(),
                volume_path: pre.target.clone(),
                staging_target_path: pre.staging.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: s.bytes + 64 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(s.cap()),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "snapshot" => c
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: pre.vol.clone(),
                name: "snap".into(),
                ..Default::default()
            })
            .await
            .map(|r| {
                let snap = r.into_inner().snapshot.expect("snapshot");
                assert!(snap.ready_to_use);
                if !s.snaps.contains(&snap.snapshot_id) {
                    s.snaps.push(snap.snapshot_id);
                }
            }),
        "stage" => {
            let r = pre.stage.clone().expect("stage request");
            c.node.node_stage_volume(r.clone()).await.map(|_| {
                s.vol(&r.volume_id).staging = Some(r.staging_target_path.clone());
            })
        }
        "unstage" => c
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: pre.vol.clone(),
                staging_target_path: pre.staging.clone(),
            })
            .await
            .map(|_| s.vol(&pre.vol).staging = None),
        "publish" => {
            let r = pre.publish.clone().expect("publish request");
            c.node.node_publish_volume(r.clone()).await.map(|_| {
                let v = s.vol(&r.volume_id);
                if !v.targets.contains(&r.target_path) {
                    v.targets.push(r.target_path.clone());
                }
            })
        }
        "unpublish" => c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: pre.vol.clone(),
                target_path: pre.target.clone(),
            })
            .await
            .map(|_| s.vol(&pre.vol).targets.retain(|t| *t != pre.target)),
        "ephemeral" if point == "ephemeral:after-unstage" => c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: pre.vol.clone(),
                target_path: pre.target.clone(),
            })
            .await
            .map(|_| s.vols.retain(|v| v.id != pre.vol)),
        "ephemeral" => {
            let r = pre.publish.clone().expect("ephemeral request");
            c.node.node_publish_volume(r.clone()).await.map(|_| {
                if !s.vols.iter().any(|v| v.id == r.volume_id) {
                    s.vols.push(Vol {
                        id: r.volume_id.clone(),
                        staging: None,
                        targets: vec![r.target_path.clone()],
                        ephemeral: true,
                    });
                }
            })
        }
        other => panic!("crash point {point}: no scenario for operation {other}"),
    }
}

/// What the prelude made for the operation under test.
#[derive(Debug, Default)]
struct Pre {
    vol: String,
    snap: String,
    staging: String,
    target: String,
    stage: Option<csi::NodeStageVolumeRequest>,
    publish: Option<csi::NodePublishVolumeRequest>,
}

/// Makes the state the operation of `point` starts from.
async fn prelude(w: &CsiWorld, c: &mut Clients, s: &mut Scene, point: &str) -> Pre {
    let mut p = Pre::default();
    match op_of(point) {
        "create" => {}
        "restore" => {
            let (id, _) = with_data(w, c, s, "src", "original").await;
            p.snap = snapshot(w, c, s, &id).await;
            p.vol = id;
        }
        "clone" | "snapshot" | "expand" => {
            // Staged and published: clones and snapshots of an image volume
            // freeze it, expansion refreshes its loop device.
            let (id, t) = with_data(w, c, s, "src", "original").await;
            p.vol = id;
            p.target = t;
        }
        "node-expand" => {
            let (id, t) = with_data(w, c, s, "src", "original").await;
            let r = c
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: s.bytes + 64 * MIB,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(s.cap()),
                    ..Default::default()
                })
                .await;
            assert!(ok(r, "controller expand", w).node_expansion_required);
            p.staging = s.vol(&id).staging.clone().expect("staged");
            p.vol = id;
            p.target = t;
        }
        "delete" => p.vol = create(w, c, s, "doomed").await,
        "delete-snapshot" => {
            let id = create(w, c, s, "src").await;
            p.snap = snapshot(w, c, s, &id).await;
            p.vol = id;
        }
        "stage" => {
            let id = create(w, c, s, "v").await;
            p.stage = Some(s.staging_req(w, &id));
            p.vol = id;
        }
        "unstage" => {
            let id = create(w, c, s, "v").await;
            p.staging = stage(w, c, s, &id).await;
            w.sh_ok(&format!("echo original > {}/f && sync", p.staging));
            p.vol = id;
        }
        "publish" => {
            let id = create(w, c, s, "v").await;
            p.staging = stage(w, c, s, &id).await;
            p.publish = Some(s.publish_req(w, &id));
            p.vol = id;
        }
        "unpublish" => {
            let (id, t) = with_data(w, c, s, "v", "original").await;
            p.vol = id;
            p.target = t;
        }
        "ephemeral" => {
            let r = s.ephemeral_req(w);
            if point == "ephemeral:after-unstage" {
                ok(
                    c.node.node_publish_volume(r.clone()).await,
                    "ephemeral publish",
                    w,
                );
                p.vol = r.volume_id.clone();
                p.target = r.target_path.clone();
                s.vols.push(Vol {
                    id: r.volume_id.clone(),
                    staging: None,
                    targets: vec![r.target_path.clone()],
                    ephemeral: true,
                });
            }
            p.publish = Some(r);
        }
        other => panic!("crash point {point}: no scenario for operation {other}"),
    }
    p
}

/// After the retry: the result is there and nothing was lost.
async fn verify(w: &CsiWorld, c: &mut Clients, s: &mut Scene, point: &str, p: &Pre) {
    let label = format!("{point} ({:?})", s.b);
    let list = ok(
        c.controller
            .list_volumes(csi::ListVolumesRequest::default())
            .await,
        "list",
        w,
    );
    let listed = list.entries.len();
    let expected = s.vols.iter().filter(|v| !v.ephemeral).count();
    assert_eq!(listed, expected, "{label}: {list:?}");
    match op_of(point) {
        "restore" | "clone" => {
            let id = s.vols.last().expect("copy").id.clone();
            assert_eq!(read_back(w, c, s, &id).await, "original", "{label}");
            if op_of(point) == "clone" {
                write_through(w, &p.target);
            }
        }
        "snapshot" | "expand" | "unpublish" => {
            if let Some(t) = s.vols[0].targets.first().cloned() {
                assert_eq!(w.sh_ok(&format!("cat {t}/f")).trim(), "original", "{label}");
                write_through(w, &t);
            }
            if op_of(point) == "expand" {
                let g = ok(
                    c.controller
                        .controller_get_volume(csi::ControllerGetVolumeRequest {
                            volume_id: p.vol.clone(),
                        })
                        .await,
                    "get",
                    w,
                );
                assert_eq!(
                    g.volume.expect("v").capacity_bytes,
                    s.bytes + 64 * MIB,
                    "{label}"
                );
            }
            if op_of(point) == "snapshot" {
                let l = ok(
                    c.controller
                        .list_snapshots(csi::ListSnapshotsRequest::default())
                        .await,
                    "list snapshots",
                    w,
                );
                assert_eq!(l.entries.len(), 1, "{label}: {l:?}");
            }
            if op_of(point) == "unpublish" {
                assert_eq!(w.mounts().len(), 1, "{label}: {:?}", w.mounts());
            }
        }
        "node-expand" => {
            let size = w.sh_ok(&format!("df -B1 --output=size {} | tail -1", p.target));
            let size: i64 = size.trim().parse().expect("df");
            // df leaves out xfs's internal log (64 MiB here): 236 MiB of
            // the 300 MiB volume before the growth, 300 of 364 MiB after.
            assert!(
                size >= s.bytes,
                "{label}: filesystem is {size} bytes; log:\n{}",
                w.log_text()
            );
            assert_eq!(
                w.sh_ok(&format!("cat {}/f", p.target)).trim(),
                "original",
                "{label}"
            );
        }
        "stage" => {
            let st = s.vol(&p.vol).staging.clone().expect("staged");
            assert_eq!(w.mounts(), vec![st.clone()], "{label}");
            w.sh_ok(&format!("echo x > {st}/f && sync"));
        }
        "unstage" => {
            assert!(w.mounts().is_empty(), "{label}: {:?}", w.mounts());
            assert!(
                w.volume_loops().is_empty(),
                "{label}: {:?}",
                w.volume_loops()
            );
            assert_eq!(read_back(w, c, s, &p.vol).await, "original", "{label}");
        }
        "publish" => {
            assert_eq!(w.mounts().len(), 2, "{label}: {:?}", w.mounts());
            let t = &p.publish.as_ref().expect("publish").target_path;
            w.sh_ok(&format!("echo x > {t}/f && sync"));
            assert_eq!(
                w.sh_ok(&format!("cat {}/f", p.staging)).trim(),
                "x",
                "{label}"
            );
        }
        "ephemeral" if point != "ephemeral:after-unstage" => {
            let t = &p.publish.as_ref().expect("publish").target_path;
            write_through(w, t);
        }
        _ => {}
    }
}

/// One point, one backend: prelude, crash, restart, retry, verify,
/// teardown, nothing left.
async fn run_point(w: &mut CsiWorld, point: &str, b: Backend) {
    let label = format!("{point} ({b:?})");
    eprintln!("crash point {label}");
    let mut s = Scene::new(b, point);
    let mut c = w.clients().await;
    let pre = prelude(w, &mut c, &mut s, point).await;
    w.set_crash(Some(point));
    w.restart();
    w.set_crash(None);
    let mut c = w.clients().await;
    let r = op_call(&mut c, &mut s, point, &pre).await;
    assert!(r.is_err(), "{label}: the call should have died: {r:?}");
    let log = w.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("crash point reached") && l.contains(point)),
        "{label}: the driver did not reach the point (call: {r:?}); log:\n{log}"
    );
    w.restart();
    let mut c = w.clients().await;
    if let Err(e) = op_call(&mut c, &mut s, point, &pre).await {
        panic!(
            "{label}: retry after the restart: {e:?}\nlog:\n{}",
            w.log_text()
        );
    }
    verify(w, &mut c, &mut s, point, &pre).await;
    teardown(w, &mut c, &mut s).await;
    assert_clean(w, &label);
}

/// Crashes at every point of `ops`, on a btrfs pool (it offers both
/// backends), one world per backend reused across points: each point's
/// end state is checked clean, so the next starts from nothing.
async fn crash_points(ops: &[&str]) {
    for b in [Backend::Image, Backend::Btrfs] {
        let mut w = CsiWorld::start(PoolFs::Btrfs, 1536);
        for point in POINTS.iter().filter(|p| ops.contains(&op_of(p))) {
            if backends_of(point).contains(&b) {
                run_point(&mut w, point, b).await;
            }
        }
    }
}

#[test]
fn every_point_has_a_scenario() {
    for p in POINTS {
        assert!(
            OPS.contains(&op_of(p)),
            "crash point {p}: add its operation to OPS and a scenario"
        );
    }
    // And every operation is run by one of the tests below.
    let covered: Vec<&str> = [CREATE, DELETE_EXPAND_SNAPSHOT, NODE].concat();
    for op in OPS {
        assert!(covered.contains(op), "operation {op} is run by no test");
    }
}

const CREATE: &[&str] = &["create", "restore", "clone"];
const DELETE_EXPAND_SNAPSHOT: &[&str] = &[
    "delete",
    "delete-snapshot",
    "expand",
    "node-expand",
    "snapshot",
];
const NODE: &[&str] = &["stage", "unstage", "publish", "unpublish", "ephemeral"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_point_of_create_restore_clone() {
    crash_points(CREATE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_point_of_delete_expand_snapshot() {
    crash_points(DELETE_EXPAND_SNAPSHOT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_point_of_stage_publish_ephemeral() {
    crash_points(NODE).await;
}

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
