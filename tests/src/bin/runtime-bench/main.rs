//! runtime-bench: the node app runtime's benchmark (issue 6).
//!
//! 1. App A → runtime → app B on one node at a fixed request rate with
//!    1 KB bodies, against A → B directly, the same run: latency quantiles
//!    and the latency the runtime adds.
//! 2. The agent's CPU time per 1,000 requests/s and its memory under (1).
//! 3. The agent's memory with 100 app pods registered against 1.
//! 4. State save/get throughput, the embedded store against Redis.
//! 5. Across two nodes (mTLS): not built yet.
//! 6. Pub/sub publish → deliver latency and throughput per broker
//!    (embedded, Redis, JetStream), against each broker without the
//!    runtime, with the agent's CPU and memory.
//!
//! Not a test: it prints figures, baselines, differences and target
//! verdicts; the exit status is 0 whatever they say. Run as root:
//! `cargo build --release -p nodeplane-agent -p nodeplane-cni -p nodeplane-tests
//!  --bin nodeplane-agent --bin nodeplane-cni --bin np-app --bin runtime-bench`, then
//! `target/x86_64-unknown-linux-gnu/release/runtime-bench`.
//! Every namespace, directory and process the bench makes is removed on
//! exit, on panic and on SIGINT/SIGTERM (`guard`).

mod cross;
use nodeplane_tests::bench::guard;
mod invoke;
mod load;
mod pods;
mod pubsub;
mod state;
mod stats;
mod world;

use std::time::Instant;

const HELP: &str = "\
runtime-bench: nodeplane's node app runtime (Dapr v1.0 HTTP API) benchmark (issue 6)

usage (as root): runtime-bench [options]

  --secs N          invoke: seconds of load per path (1 s blocks, direct and
                    runtime interleaved; default 10)
  --rate N          invoke: requests per second per path (default 1000)
  --conns N         invoke: kept-alive connections per path (default 8)
  --pods N          pods: app pods in the many-pods case (default 100)
  --state-secs N    state: seconds per store and operation (default 4)
  --state-conns N   state: concurrent connections (default 4)
  --pubsub-secs N   pubsub: timed seconds per broker (after 2 s warm-up;
                    default 10)
  --pubsub-rate N   pubsub: messages per second offered (default 1000)
  --pubsub-max N    pubsub: 1 runs a closed-loop max-throughput run per
                    broker too, 0 does not (default 1)
  --only SECTION    invoke (sections 1 and 2), pods, state, cross or pubsub
                    (default: all)
  -h, --help        this text

Binaries (nodeplane-agent, nodeplane-cni, np-app) come from the bench's own
target directory. Targets are printed as PASS/MISS; the exit status is 0
whatever they say.
";

#[derive(Debug)]
pub struct Opts {
    pub secs: u64,
    pub rate: u32,
    pub conns: usize,
    pub pods: usize,
    pub state_secs: u64,
    pub state_conns: usize,
    pub pubsub_secs: u64,
    pub pubsub_rate: u32,
    pub pubsub_max: bool,
    pub only: Option<String>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        secs: 10,
        rate: 1000,
        conns: 8,
        pods: 100,
        state_secs: 4,
        state_conns: 4,
        pubsub_secs: 10,
        pubsub_rate: 1000,
        pubsub_max: true,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<usize, String> {
            match v.parse::<usize>() {
                Ok(0) => Err(format!("{flag} {v}: must be at least 1")),
                Ok(n) => Ok(n),
                Err(e) => Err(format!("{flag} {v}: {e}")),
            }
        };
        match flag.as_str() {
            "--secs" => o.secs = num(&value)? as u64,
            "--rate" => o.rate = u32::try_from(num(&value)?).map_err(|e| e.to_string())?,
            "--conns" => o.conns = num(&value)?,
            "--pods" => {
                o.pods = num(&value)?;
                if o.pods > 200 {
                    return Err("--pods: at most 200 (the /24 pod CIDR)".into());
                }
            }
            "--state-secs" => o.state_secs = num(&value)? as u64,
            "--state-conns" => o.state_conns = num(&value)?,
            "--pubsub-secs" => o.pubsub_secs = num(&value)? as u64,
            "--pubsub-rate" => {
                o.pubsub_rate = u32::try_from(num(&value)?).map_err(|e| e.to_string())?
            }
            "--pubsub-max" => match value.as_str() {
                "0" => o.pubsub_max = false,
                "1" => o.pubsub_max = true,
                v => return Err(format!("--pubsub-max {v}: 0 or 1")),
            },
            "--only" => match value.as_str() {
                "invoke" | "pods" | "state" | "cross" | "pubsub" => o.only = Some(value),
                v => return Err(format!("--only {v}: invoke, pods, state, cross or pubsub")),
            },
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if o.conns as u32 > o.rate {
        return Err(
            "--conns: at most --rate (each connection sends at least once a second)".into(),
        );
    }
    Ok(o)
}

pub use nodeplane_tests::bench::Report;

fn main() {
    guard::install();
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("runtime-bench: {e}\n\n{HELP}");
        std::process::exit(2);
    });
    nodeplane_tests::require_root();
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("conntrack", "conntrack"),
    ] {
        nodeplane_tests::require_tool(tool, pkg);
    }
    for b in ["nodeplane-agent", "nodeplane-cni", "np-app"] {
        if let Err(e) = world::bin(b) {
            eprintln!("runtime-bench: {e}");
            std::process::exit(2);
        }
    }
    let started = Instant::now();
    header(&opts);
    let mut report = Report::default();
    let run = |s: &str| opts.only.as_deref().is_none_or(|o| o == s);
    if run("invoke") {
        invoke::section(&opts, &mut report);
    }
    if run("pods") {
        pods::section(&opts, &mut report);
    }
    if run("state") {
        state::section(&opts, &mut report);
    }
    if run("cross") {
        cross::section(&opts, &mut report);
    }
    if run("pubsub") {
        pubsub::section(&opts, &mut report);
    }
    report.print_summary();
    println!(
        "\ntotal bench time {:.1} s, load average at the end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn header(opts: &Opts) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "runtime-bench: nodeplane node app runtime benchmark, baselines measured in the same run"
    );
    println!(
        "  machine: {} CPUs, kernel {}, load average at start {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        loadavg()
    );
    println!(
        "  binaries from {}; options: {opts:?}",
        nodeplane_tests::target_dir().display()
    );
    println!("  the load generator, np-app and the agent share this machine's CPUs");
}
