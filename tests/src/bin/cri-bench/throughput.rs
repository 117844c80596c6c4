//! Calls per second with N concurrent clients, Version and a filtered
//! ListContainers alternating. By default each client has a connection of
//! its own (N separate CRI clients, the relay's worst case); with
//! `--connections 1` they share one, as the kubelet's goroutines share its
//! runtime-service connection.
//!
//! Rounds are short and many, and each round times both paths back to back,
//! direct first in odd rounds and the shim first in even ones. This VM's
//! throughput drifts by a fifth within minutes; timed this way the drift
//! falls on both paths alike. The figure is the median of the rounds'
//! ratios; the pooled ratio (every relayed call over every direct call, both
//! paths timed equally long) is printed beside it.

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
async fn rate(socket: &Path, o: &Opts) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..o.connections.clamp(1, o.clients) {
        channels.push(connect_channel(socket.to_path_buf()).await?);
    }
    for i in 0..o.clients {
        let mut c = RuntimeServiceClient::new(channels[i % channels.len()].clone());
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
    tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
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

/// One path's round: calls per second, and busy CPU µs per call of the
/// whole machine, of containerd and of the shim.
#[derive(Clone, Copy)]
struct Round {
    rate: f64,
    machine: f64,
    containerd: f64,
    shim: f64,
}

async fn measured(socket: &Path, o: &Opts, pids: Pids) -> anyhow::Result<Round> {
    use nodeplane_tests::bench::cpu;
    let process = |pid: Option<u32>| {
        pid.and_then(|p| cpu::process_ticks(p).ok())
            .map_or(0, |(user, sys)| user + sys)
    };
    let before = (
        cpu::busy_ticks().unwrap_or(0),
        process(pids.containerd),
        process(pids.shim),
    );
    let (rate, calls) = rate(socket, o).await?;
    let after = (
        cpu::busy_ticks().unwrap_or(0),
        process(pids.containerd),
        process(pids.shim),
    );
    let per_call = |a: u64, b: u64| {
        a.saturating_sub(b) as f64 / cpu::ticks_per_second() * 1e6 / calls.max(1) as f64
    };
    Ok(Round {
        rate,
        machine: per_call(after.0, before.0),
        containerd: per_call(after.1, before.1),
        shim: per_call(after.2, before.2),
    })
}

/// The processes whose CPU the rounds report.
#[derive(Clone, Copy)]
pub struct Pids {
    pub containerd: Option<u32>,
    pub shim: Option<u32>,
}

/// Prints the figures; returns the median of the rounds' shim/direct ratios.
pub async fn run(o: &Opts, direct: PathBuf, shim: PathBuf, pids: Pids) -> anyhow::Result<f64> {
    println!(
        "throughput, {} concurrent clients on {} connections per path, Version + filtered ListContainers alternating ({} s per path x {} rounds; calls/s)",
        o.clients, o.connections.clamp(1, o.clients), o.secs, o.rounds
    );
    println!(
        "  (cpu: busy CPU µs per call in that round: the machine's, containerd's, the shim's)"
    );
    let direct_only = Pids { shim: None, ..pids };
    let (mut ratios, mut d, mut s) = (vec![], vec![], vec![]);
    for r in 0..o.rounds {
        let (dr, sr) = if r % 2 == 0 {
            let dr = measured(&direct, o, direct_only).await?;
            (dr, measured(&shim, o, pids).await?)
        } else {
            let sr = measured(&shim, o, pids).await?;
            (measured(&direct, o, direct_only).await?, sr)
        };
        println!(
            "  round {:>2}: direct {:>6.0} (cpu {:>5.1}, ctd {:>5.1})  shim {:>6.0} (cpu {:>5.1}, ctd {:>5.1}, shim {:>4.1})  ratio {:.3}",
            r + 1,
            dr.rate,
            dr.machine,
            dr.containerd,
            sr.rate,
            sr.machine,
            sr.containerd,
            sr.shim,
            sr.rate / dr.rate
        );
        ratios.push(sr.rate / dr.rate);
        d.push(dr);
        s.push(sr);
    }
    let field = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    let pooled = s.iter().map(|r| r.rate).sum::<f64>() / d.iter().map(|r| r.rate).sum::<f64>();
    let ratio = median(ratios.clone());
    println!(
        "  medians : direct {:>6.0} (cpu {:>5.1}, ctd {:>5.1})  shim {:>6.0} (cpu {:>5.1}, ctd {:>5.1}, shim {:>4.1})",
        field(&d, |r| r.rate),
        field(&d, |r| r.machine),
        field(&d, |r| r.containerd),
        field(&s, |r| r.rate),
        field(&s, |r| r.machine),
        field(&s, |r| r.containerd),
        field(&s, |r| r.shim),
    );
    ratios.sort_by(|a, b| a.total_cmp(b));
    println!(
        "  ratio: median of rounds {ratio:.3} (middle half {:.3}–{:.3}), pooled {pooled:.3}",
        ratios[ratios.len() / 4],
        ratios[(ratios.len() * 3) / 4],
    );
    Ok(ratio)
}
