//! csi-bench: CreateVolume → NodeStage → NodePublish → NodeUnpublish →
//! NodeUnstage → DeleteVolume through the real driver, per backend, against
//! the same steps by hand (truncate + mkfs.ext4 + losetup + mount + bind,
//! then the reverse) in the same run and mount namespace; then 100 volumes
//! created with 8 concurrent requests, with GetCapacity checked throughout.
//!
//! Run: `cargo run --release -p nodeplane-tests --bin csi-bench -- [ITERATIONS]`

use std::time::{Duration, Instant};

use nodeplane_proto::csi;
use nodeplane_tests::csi::*;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

async fn driver_cycle(
    w: &CsiWorld,
    c: &mut Clients,
    i: usize,
    params: &[(&str, &str)],
) -> Duration {
    let cap = mount_cap("", rw());
    let staging = w.path(&format!("b{i}/s"));
    std::fs::create_dir_all(&staging).expect("mkdir");
    let staging = staging.to_string_lossy().into_owned();
    let target = w.path(&format!("b{i}/t")).to_string_lossy().into_owned();
    let t = Instant::now();
    let id = c
        .controller
        .create_volume(csi::CreateVolumeRequest {
            name: format!("bench-{i}"),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v")
        .volume_id;
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("stage");
    c.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .expect("publish");
    c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target,
        })
        .await
        .expect("unpublish");
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging,
        })
        .await
        .expect("unstage");
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .expect("delete");
    t.elapsed()
}

fn by_hand(w: &CsiWorld, i: usize) -> Duration {
    let d = w.path(&format!("h{i}"));
    std::fs::create_dir_all(&d).expect("mkdir");
    let (img, d) = (
        w.pool_path().join(format!("hand-{i}.img")),
        d.display().to_string(),
    );
    let script = format!(
        "set -e; truncate -s 64M {img}; mkfs.ext4 -q -F -m 0 -E nodiscard {img}; L=$(losetup --find --show --direct-io=on {img}); \
         mkdir -p {d}/s {d}/t; mount $L {d}/s; mount --bind {d}/s {d}/t; umount {d}/t; umount {d}/s; losetup -d $L; rm {img}",
        img = img.display()
    );
    let t = Instant::now();
    w.sh_ok(&script);
    t.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    println!(
        "csi-bench: {n} lifecycles per subject, 64 MiB volumes, ext4 (image) / btrfs subvolume"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>14}",
        "subject", "median ms", "p95 ms", "ratio (median)"
    );
    for (fs, label, params) in [
        (PoolFs::Xfs, "image (xfs pool)", vec![]),
        (PoolFs::Btrfs, "btrfs subvolume", vec![("backend", "btrfs")]),
    ] {
        let w = CsiWorld::start(fs, 4096);
        let mut c = w.clients().await;
        let mut drv = vec![];
        let mut hand = vec![];
        for i in 0..n {
            drv.push(driver_cycle(&w, &mut c, i, &params).await);
            hand.push(by_hand(&w, i));
        }
        let (dm, dp) = (pct(&mut drv, 0.5), pct(&mut drv, 0.95));
        let (hm, hp) = (pct(&mut hand, 0.5), pct(&mut hand, 0.95));
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>14.2}",
            format!("driver, {label}"),
            dm,
            dp,
            dm / hm
        );
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>14}",
            "by hand (ext4 image)", hm, hp, "1.00"
        );

        // 100 volumes, 8 at a time; capacity must fall by what was provisioned.
        let cap0 = c
            .controller
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .expect("cap")
            .into_inner()
            .available_capacity;
        let t = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let mut tasks = vec![];
        for i in 0..100 {
            let mut cc = c.controller.clone();
            let sem = sem.clone();
            let params: std::collections::HashMap<String, String> = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("sem");
                cc.create_volume(csi::CreateVolumeRequest {
                    name: format!("many-{i}"),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 16 * MIB,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_cap("", rw())],
                    parameters: params,
                    ..Default::default()
                })
                .await
                .expect("create")
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let took = t.elapsed();
        let cap1 = c
            .controller
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .expect("cap")
            .into_inner()
            .available_capacity;
        let dropped = (cap0 - cap1) as f64 / MIB as f64;
        println!(
            "{:<28} {:>10.0} ms total, {:.1} volumes/s; capacity fell {:.0} MiB for 1600 MiB provisioned ({})",
            format!("100 creates, 8 concurrent"),
            took.as_secs_f64() * 1e3,
            100.0 / took.as_secs_f64(),
            dropped,
            if (dropped - 1600.0).abs() <= 16.0 { "within 1%" } else { "WRONG" }
        );
    }
}
