//! Publish→deliver latency of each broker: one publisher at a fixed rate
//! (publishes are not awaited one by one, so a slow publish ack does not
//! lower the rate), one subscriber that acks every delivery. Prints
//! p50/p90/p99/max of publish→deliver and of publish→`Ok`, the achieved
//! rate and the process's CPU time, with an in-process tokio channel hop as
//! the floor measured the same way. Stops by itself.
//!
//! `pubsub-bench [--seconds 10] [--rate 1000] [--size 1024] [--only embedded|redis|jetstream]`
//!
//! redis-server and nats-server (Debian packages of those names) are
//! started on free 127.0.0.1 ports in temp dirs when present; a missing
//! one is reported and its row skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodeplane_pubsub::{Broker, ComponentSpec, Message};

struct Opts {
    seconds: u64,
    rate: u64,
    size: usize,
    only: Option<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        seconds: 10,
        rate: 1000,
        size: 1024,
        only: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--seconds" => o.seconds = v.parse().expect("--seconds N"),
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--size" => o.size = v.parse().expect("--size BYTES"),
            "--only" => o.only = Some(v.to_owned()),
            other => panic!("unknown argument {other}; see the doc comment"),
        }
    }
    o
}

/// A server child process and its temp dir, both gone on drop.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn temp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pubsub-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn start(
    bin: &str,
    package: &str,
    args: impl Fn(u16, &Path) -> Vec<String>,
) -> Option<(Server, u16)> {
    if !Path::new(bin).exists() {
        println!("{bin} missing: install the Debian package {package}; row skipped");
        return None;
    }
    let dir = temp(package);
    let port = free_port();
    let child = Command::new(bin)
        .args(args(port, &dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let server = Server(child, dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{bin} not listening after 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((server, port))
}

fn spec(kind: &str, metadata: &[(&str, String)]) -> ComponentSpec {
    ComponentSpec {
        name: "bench".into(),
        kind: kind.into(),
        version: "v1".into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

/// utime + stime of this process, from /proc (clock ticks of 10 ms).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

struct Row {
    name: String,
    deliver: Vec<u64>,
    publish: Vec<u64>,
    rate: f64,
    cpu: Duration,
}

fn stamp(base: Instant, size: usize) -> Bytes {
    let mut data = vec![b'x'; size.max(8)];
    data[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
    Bytes::from(data)
}

fn since(base: Instant, data: &[u8]) -> u64 {
    let sent = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    (base.elapsed().as_nanos() as u64).saturating_sub(sent)
}

async fn run_broker(name: &str, b: Arc<dyn Broker>, o: &Opts) -> Row {
    let topic = "bench";
    let mut sub = b.subscribe(topic, "bench-app").await.expect("subscribe");
    let total = o.seconds * o.rate;
    let base = Instant::now();
    let cpu0 = cpu();
    let publish_lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let (b2, pl, size) = (b.clone(), publish_lat.clone(), o.size);
    let period = Duration::from_nanos(1_000_000_000 / o.rate.max(1));
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        for i in 0..total {
            tick.tick().await;
            let (b, pl) = (b2.clone(), pl.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let msg = Message {
                    id: format!("m{i}"),
                    topic: "bench".into(),
                    data: stamp(base, size),
                    content_type: "application/octet-stream".into(),
                    metadata: BTreeMap::new(),
                };
                b.publish(msg).await.expect("publish");
                pl.lock().expect("lock").push(t.elapsed().as_nanos() as u64);
            });
        }
    });
    let mut deliver = Vec::with_capacity(total as usize);
    let first = Instant::now();
    while (deliver.len() as u64) < total {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(d)) => {
                deliver.push(since(base, &d.msg.data));
                tokio::spawn(d.token.ack());
            }
            Ok(Err(e)) => panic!("{name}: next: {e}"),
            Err(_) => {
                println!(
                    "{name}: nothing delivered for 10 s; stopping at {}",
                    deliver.len()
                );
                break;
            }
        }
    }
    let elapsed = first.elapsed();
    let _ = publisher.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let publish = std::mem::take(&mut *publish_lat.lock().expect("lock"));
    let _ = sub.close().await;
    Row {
        name: name.into(),
        rate: deliver.len() as f64 / elapsed.as_secs_f64(),
        deliver,
        publish,
        cpu: cpu() - cpu0,
    }
}

/// The floor: the same paced publisher and stamp through a tokio channel.
async fn run_channel(o: &Opts) -> Row {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let total = o.seconds * o.rate;
    let base = Instant::now();
    let cpu0 = cpu();
    let (size, period) = (o.size, Duration::from_nanos(1_000_000_000 / o.rate.max(1)));
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        for _ in 0..total {
            tick.tick().await;
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(stamp(base, size)) });
        }
    });
    let first = Instant::now();
    let mut deliver = Vec::new();
    while let Some(d) = rx.recv().await {
        deliver.push(since(base, &d));
        if deliver.len() as u64 == total {
            break;
        }
    }
    let elapsed = first.elapsed();
    let _ = publisher.await;
    Row {
        name: "tokio channel (floor)".into(),
        rate: deliver.len() as f64 / elapsed.as_secs_f64(),
        deliver,
        publish: Vec::new(),
        cpu: cpu() - cpu0,
    }
}

fn print(rows: &mut [Row], o: &Opts) {
    println!(
        "\n{} B messages, {} msg/s offered for {} s, one subscriber acking (ms):",
        o.size, o.rate, o.seconds
    );
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>8} | {:>9} {:>9} | {:>9} {:>8}",
        "backend", "p50", "p90", "p99", "max", "pub p50", "pub p99", "msg/s", "cpu s"
    );
    let floor = rows.first().map(|r| {
        let mut d = r.deliver.clone();
        d.sort_unstable();
        pct(&d, 0.99)
    });
    for r in rows.iter_mut() {
        r.deliver.sort_unstable();
        r.publish.sort_unstable();
        let d = &r.deliver;
        println!(
            "{:<24} {:>8.3} {:>8.3} {:>8.3} {:>8.3} | {:>9.3} {:>9.3} | {:>9.0} {:>8.2}{}",
            r.name,
            pct(d, 0.5),
            pct(d, 0.9),
            pct(d, 0.99),
            pct(d, 1.0),
            pct(&r.publish, 0.5),
            pct(&r.publish, 0.99),
            r.rate,
            r.cpu.as_secs_f64(),
            match floor {
                Some(f) if f > 0.0 && !r.name.contains("floor") =>
                    format!("   p99 = {:.1}× floor", pct(d, 0.99) / f),
                _ => String::new(),
            }
        );
    }
}

#[tokio::main]
async fn main() {
    let o = opts();
    let want = |n: &str| o.only.as_deref().is_none_or(|x| x == n);
    let mut rows = vec![run_channel(&o).await];
    let state = temp("embedded");
    if want("embedded") {
        let b = nodeplane_pubsub::open(&spec("pubsub.embedded", &[]), &state)
            .await
            .expect("open embedded");
        rows.push(run_broker("embedded", b, &o).await);
    }
    if want("redis") {
        if let Some((_s, port)) = start("/usr/bin/redis-server", "redis-server", |p, d| {
            [
                "--port",
                &p.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([d.display().to_string()])
            .collect()
        }) {
            let b = nodeplane_pubsub::open(
                &spec(
                    "pubsub.redis",
                    &[("redisHost", format!("127.0.0.1:{port}"))],
                ),
                &state,
            )
            .await
            .expect("open redis");
            rows.push(run_broker("redis (no AOF)", b, &o).await);
        }
    }
    if want("jetstream") {
        if let Some((_s, port)) = start("/usr/sbin/nats-server", "nats-server", |p, d| {
            ["-js", "-a", "127.0.0.1", "-p", &p.to_string(), "-sd"]
                .iter()
                .map(|s| s.to_string())
                .chain([d.display().to_string()])
                .collect()
        }) {
            // JetStream needs a moment after the port opens.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let b = nodeplane_pubsub::open(
                &spec(
                    "pubsub.jetstream",
                    &[("natsURL", format!("nats://127.0.0.1:{port}"))],
                ),
                &state,
            )
            .await
            .expect("open jetstream");
            rows.push(run_broker("jetstream (file)", b, &o).await);
        }
    }
    let _ = std::fs::remove_dir_all(&state);
    print(&mut rows, &o);
}
