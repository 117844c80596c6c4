//! cri-bench: the latency nodeplane-cri-shim adds to CRI calls, measured
//! against containerd directly in the same run (interleaved call by call,
//! so both see the same machine load), and throughput with concurrent
//! clients, shim vs direct, with ratios.
//!
//! Run as root: `cargo run --release -p nodeplane-tests --bin cri-bench`
//! (`-- --help` for options). It starts a private containerd (the tests'
//! harness: own netns, root, state and socket), creates one sandbox with
//! 100 containers for ListContainers, and removes everything at the end.

mod latency;
mod profile;
mod stats;
mod throughput;

use std::time::Duration;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{CreateContainerRequest, RunPodSandboxRequest};
use nodeplane_tests::containerd::{connect_channel, CniNetwork, Containerd};
use nodeplane_tests::cri::{app_container, Shim};

const HELP: &str = "\
cri-bench: CRI calls through nodeplane-cri-shim vs directly to containerd, same run

usage (as root): cargo run --release -p nodeplane-tests --bin cri-bench -- [options]

  --iterations N   latency: calls per method and path (default 20000: with
                   fewer, ListContainers' p99 moves by ±0.3 ms run to run)
  --containers N   containers in the sandbox ListContainers lists (default 100)
  --clients N      throughput: concurrent clients (default 16)
  --connections N  throughput: connections per path the clients share, round-robin
                   (default: one per client; 1 is the kubelet's layout)
  --secs S         throughput: seconds per path and round (default 1; 0.5 is fine)
  --rounds N       throughput: rounds, each timing both paths back to back in
                   alternating order; the median ratio is reported (default 15)
  --shim-threads N the shim's --worker-threads (default: the shim's own, 1;
                   0 is one per CPU)
  --profile N      instead of timing: N calls of each method through the shim
                   only, then SIGTERM to the shim (it exits cleanly); for
                   load-independent counts:
  --strace         with --profile: the shim's syscalls per call (strace -c -f)
  -h, --help       this text

The shim is taken from the bench's own target directory (build it with
`cargo build --release -p nodeplane-cri-shim`) or $NODEPLANE_CRI_SHIM_BIN.
Instructions per call: run the shim under callgrind with --profile N and
--profile 0 and subtract (NODEPLANE_CRI_SHIM_BIN naming a script that does
`exec valgrind --tool=callgrind --callgrind-out-file=F /path/nodeplane-cri-shim \"$@\"`).
Targets (p99 added <= 0.2 ms per unary call; throughput >= 90% of direct)
are printed as PASS/MISS; the exit status is 0 whatever they say.
";

#[derive(Debug)]
pub struct Opts {
    pub iterations: usize,
    pub containers: usize,
    pub clients: usize,
    pub connections: usize,
    pub secs: f64,
    pub rounds: usize,
    pub shim_threads: Option<usize>,
    pub profile: Option<usize>,
    pub strace: bool,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        iterations: 20_000,
        containers: 100,
        clients: 16,
        connections: usize::MAX,
        secs: 1.0,
        rounds: 15,
        shim_threads: None,
        profile: None,
        strace: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> anyhow::Result<usize> {
            let v = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| anyhow::anyhow!("{name} {v:?}: not a number"))
        };
        match a.as_str() {
            "--iterations" => o.iterations = num("--iterations")?,
            "--containers" => o.containers = num("--containers")?,
            "--clients" => o.clients = num("--clients")?,
            "--connections" => o.connections = num("--connections")?,
            "--secs" => {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--secs needs a value"))?;
                o.secs = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| anyhow::anyhow!("--secs {v:?}: not a positive number"))?;
            }
            "--rounds" => o.rounds = num("--rounds")?,
            "--shim-threads" => o.shim_threads = Some(num("--shim-threads")?),
            "--profile" => o.profile = Some(num("--profile")?),
            "--strace" => o.strace = true,
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown option {other:?}\n\n{HELP}"),
        }
    }
    anyhow::ensure!(o.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(o.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(o.connections >= 1, "--connections must be at least 1");
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let o = opts()?;
    // containerd is tied to this thread (see Containerd::start).
    let ctd = Containerd::start(CniNetwork::nodeplane(&["10.248.0.0/22"]));
    ctd.import_app_image();
    let mut flags = vec!["--no-inject".to_string(), "--log-level=warn".to_string()];
    if let Some(n) = o.shim_threads {
        flags.push(format!("--worker-threads={n}"));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut shim = Shim::start(&ctd.socket(), &flags);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut direct = ctd.connect().await;
        let sandbox = ctd.sandbox_config("bench-0");
        let run = RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        };
        let sb = direct
            .run_pod_sandbox(run)
            .await?
            .into_inner()
            .pod_sandbox_id;
        let mut first = String::new();
        for i in 0..o.containers {
            let req = CreateContainerRequest {
                pod_sandbox_id: sb.clone(),
                config: Some(app_container(&format!("c{i}"))),
                sandbox_config: Some(sandbox.clone()),
            };
            let id = direct
                .create_container(req)
                .await?
                .into_inner()
                .container_id;
            if first.is_empty() {
                first = id;
            }
        }
        let direct_ch = connect_channel(ctd.socket()).await?;
        let shim_ch = shim.channel().await;
        // Let both paths open their connections before timing.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(n) = o.profile {
            let pid = shim
                .pid()
                .ok_or_else(|| anyhow::anyhow!("shim not running"))?;
            profile::run(n, o.strace, shim_ch, pid, &first).await?;
            return anyhow::Ok(());
        }
        println!(
            "cri-bench: containerd 1.6 + runc, {} containers in one sandbox; shim {}",
            o.containers,
            nodeplane_tests::cri::shim_bin().display()
        );
        println!("load average before: {}", loadavg());
        println!();
        let lat = latency::run(&o, direct_ch.clone(), shim_ch.clone(), &first).await?;
        println!();
        let pids = throughput::Pids {
            containerd: ctd.pid(),
            shim: shim.pid(),
        };
        let thr = throughput::run(&o, ctd.socket(), shim.socket.clone(), pids).await?;
        println!();
        println!("load average after: {}", loadavg());
        println!("targets:");
        println!(
            "  p99 added <= 0.2 ms on every unary call: {} (worst {:.3} ms)",
            pass(lat <= 0.2),
            lat
        );
        println!(
            "  throughput >= 90% of direct ({} clients, {} connections): {} ({:.1}%)",
            o.clients,
            o.connections.clamp(1, o.clients),
            pass(thr >= 0.9),
            thr * 100.0
        );
        drop(RuntimeServiceClient::new(shim_ch));
        anyhow::Ok(())
    })?;
    if o.profile.is_some() {
        stop(&mut shim);
    }
    drop(shim);
    drop(ctd);
    Ok(())
}

/// SIGTERM, and wait (up to 60 s, the shim may run under valgrind) for the
/// clean exit that lets a profiler write its output.
fn stop(shim: &mut Shim) {
    let Some(pid) = shim.pid() else { return };
    // SAFETY: signalling the shim this process started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while shim.try_wait().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// /proc/loadavg's 1, 5 and 15 minute figures: the machine is shared, and
/// a figure means little without the load it was taken under.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}
