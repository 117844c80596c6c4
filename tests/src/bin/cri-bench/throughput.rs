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

/// Calls per second over the timed window, and every call completed
/// (those still in flight when it closed included).
async fn rate(socket: &Path, clients: usize, secs: u64) -> anyhow::Result<(f64, u64)> {
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
    Ok((n as f64 / elapsed, done.load(Ordering::Relaxed)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Calls per second, and CPU µs per call of the whole machine and of the
/// shim (`shim_pid`) while they ran.
async fn measured(
    socket: &Path,
    o: &Opts,
    shim_pid: Option<u32>,
) -> anyhow::Result<(f64, f64, f64)> {
    use nodeplane_tests::bench::cpu;
    let process = |pid: Option<u32>| {
        pid.and_then(|p| cpu::process_ticks(p).ok())
            .map_or(0, |(user, sys)| user + sys)
    };
    let (m0, p0) = (cpu::busy_ticks().unwrap_or(0), process(shim_pid));
    let (rate, calls) = rate(socket, o.clients, o.secs).await?;
    let (m1, p1) = (cpu::busy_ticks().unwrap_or(0), process(shim_pid));
    let per_call = |ticks: u64| ticks as f64 / cpu::ticks_per_second() * 1e6 / calls.max(1) as f64;
    Ok((
        rate,
        per_call(m1.saturating_sub(m0)),
        per_call(p1.saturating_sub(p0)),
    ))
}

/// Prints the figures; returns shim/direct.
pub async fn run(
    o: &Opts,
    direct: PathBuf,
    shim: PathBuf,
    shim_pid: Option<u32>,
) -> anyhow::Result<f64> {
    println!("throughput, {} concurrent clients, Version + filtered ListContainers alternating ({} s x {} rounds; calls/s)", o.clients, o.secs, o.rounds);
    println!("  (cpu: the machine's busy CPU µs per call in that round; the shim's own share after the slash)");
    let (mut d, mut s, mut dc, mut sc, mut own) = (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..o.rounds {
        let (dr, dcpu, _) = measured(&direct, o, None).await?;
        let (sr, scpu, shim_cpu) = measured(&shim, o, shim_pid).await?;
        println!(
            "  round {}: direct {dr:>9.0} (cpu {dcpu:>5.1})  shim {sr:>9.0} (cpu {scpu:>5.1} / {shim_cpu:>4.1})  ratio {:.3}",
            r + 1,
            sr / dr
        );
        d.push(dr);
        s.push(sr);
        dc.push(dcpu);
        sc.push(scpu);
        own.push(shim_cpu);
    }
    let (dm, sm) = (median(d), median(s));
    let (dcm, scm, ownm) = (median(dc), median(sc), median(own));
    println!(
        "  median : direct {dm:>9.0} (cpu {dcm:>5.1})  shim {sm:>9.0} (cpu {scm:>5.1} / {ownm:>4.1})  ratio {:.3}",
        sm / dm
    );
    Ok(sm / dm)
}
