//! Calls per second with N concurrent clients (one connection each, as N
//! kubelet-like callers), ContainerStatus and Version alternating, direct
//! then shim, repeated; the median of the rounds is reported.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ListContainersRequest, VersionRequest};
use nodeplane_tests::containerd::connect_channel;

use crate::Opts;

async fn rate(socket: &Path, clients: usize, secs: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut c = RuntimeServiceClient::new(connect_channel(socket.to_path_buf()).await?);
        c.version(VersionRequest::default()).await?;
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ok = if i.is_multiple_of(2) {
                    c.version(VersionRequest::default()).await.is_ok()
                } else {
                    let f = Some(k8s_cri::v1::ContainerFilter {
                        id: "nope".into(),
                        ..Default::default()
                    });
                    c.list_containers(ListContainersRequest { filter: f })
                        .await
                        .is_ok()
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    Ok(n as f64 / elapsed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prints the figures; returns shim/direct.
pub async fn run(o: &Opts, direct: PathBuf, shim: PathBuf) -> anyhow::Result<f64> {
    println!("throughput, {} concurrent clients, Version + filtered ListContainers alternating ({} s x {} rounds; calls/s)", o.clients, o.secs, o.rounds);
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for r in 0..o.rounds {
        let dr = rate(&direct, o.clients, o.secs).await?;
        let sr = rate(&shim, o.clients, o.secs).await?;
        println!(
            "  round {}: direct {dr:>9.0}  shim {sr:>9.0}  ratio {:.3}",
            r + 1,
            sr / dr
        );
        d.push(dr);
        s.push(sr);
    }
    let (dm, sm) = (median(d), median(s));
    println!(
        "  median : direct {dm:>9.0}  shim {sm:>9.0}  ratio {:.3}",
        sm / dm
    );
    Ok(sm / dm)
}
