//! policy-bench: nodeplane-agent's NetworkPolicy benchmark (issue 3).
//!
//! 1. Control plane: with 1,000 pods and 500 policies, the time from a
//!    change in the source (the manifests directory) to the rules in the
//!    kernel, for a full sync and for one pod-label change, plus one pod
//!    ADD through the agent's socket, and where the time goes.
//! 2. Data plane: pod↔pod TCP throughput with 10,000 allow entries in
//!    place against no policy, for nodeplane's nftables maps and for the
//!    same allows as linear iptables rules, measured in the same run.
//!
//! Not a test: it prints figures, the baselines and ratios, and target
//! verdicts; the exit status is 0 whatever they say. Run as root:
//! `cargo build --release -p nodeplane-agent -p nodeplane-cni &&
//!  cargo run --release -p nodeplane-tests --bin policy-bench`.
//! Everything lives in network namespaces and directories the bench
//! creates and removes, also on panic and on SIGINT/SIGTERM (`guard`).

mod agent;
mod control;
use nodeplane_tests::bench::guard;
mod inproc;
mod stats;
mod throughput;
mod workload;

use std::time::Instant;

const HELP: &str = "\
policy-bench: nodeplane-agent's NetworkPolicy benchmark (issue 3)

usage (as root): cargo run --release -p nodeplane-tests --bin policy-bench -- [options]

  --only SECTION        control or throughput (default: both)
  --local-pods LIST     control: pods attached on this node out of 1,000,
                        one scenario each, comma-separated (default 110,1000)
  --changes N           control: pod-label changes timed per scenario
                        (default 20, or 10 with more than 110 local pods,
                        where one change takes seconds)
  --adds N              control: single pod ADDs timed per scenario
                        (default 10, or 5 with more than 110 local pods)
  --iperf-secs N        throughput: seconds per transfer (default 4)
  --iperf-runs N        throughput: transfers per case, median reported (default 5)
  --iptables LIST       throughput: iptables backends for the linear baseline,
                        nft,legacy or none (default nft,legacy)
  --poll-ms N           how often waits poll the agent's /status (default 1)
  --agent-log-level L   the agents' --log-level (default warn); when set, the
                        control section prints each agent's log at its end
  -h, --help            this text

Binaries come from the bench's own target directory: build them first with
`cargo build --release -p nodeplane-agent -p nodeplane-cni`.
Targets are printed as PASS/MISS; the exit status is 0 whatever they say.
";

#[derive(Debug)]
pub struct Opts {
    pub control: bool,
    pub throughput: bool,
    pub local_pods: Vec<usize>,
    pub changes: Option<usize>,
    pub adds: Option<usize>,
    pub iperf_secs: u64,
    pub iperf_runs: usize,
    pub iptables: Vec<String>,
    pub poll_ms: usize,
    pub agent_log: Option<String>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        control: true,
        throughput: true,
        local_pods: vec![110, 1000],
        changes: None,
        adds: None,
        iperf_secs: 4,
        iperf_runs: 5,
        iptables: vec!["nft".into(), "legacy".into()],
        poll_ms: 1,
        agent_log: None,
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
            "--only" => match value.as_str() {
                "control" => o.throughput = false,
                "throughput" => o.control = false,
                v => return Err(format!("--only {v}: control or throughput")),
            },
            "--local-pods" => {
                o.local_pods = value.split(',').map(num).collect::<Result<_, _>>()?;
                if o.local_pods.iter().any(|&n| n > 1000) {
                    return Err("--local-pods: at most 1000 (the pods there are)".into());
                }
            }
            "--changes" => o.changes = Some(num(&value)?),
            "--adds" => o.adds = Some(num(&value)?),
            "--iperf-secs" => o.iperf_secs = num(&value)? as u64,
            "--iperf-runs" => o.iperf_runs = num(&value)?,
            "--poll-ms" => o.poll_ms = num(&value)?,
            "--agent-log-level" => o.agent_log = Some(value),
            "--iptables" => {
                o.iptables = if value == "none" {
                    Vec::new()
                } else {
                    value.split(',').map(String::from).collect()
                };
                if let Some(b) = o.iptables.iter().find(|b| *b != "nft" && *b != "legacy") {
                    return Err(format!(
                        "--iptables: unknown backend {b:?} (nft, legacy, none)"
                    ));
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

pub use nodeplane_tests::bench::Report;

fn main() {
    guard::install();
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("policy-bench: {e}\n\n{HELP}");
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
    if opts.throughput {
        nodeplane_tests::require_tool("iperf3", "iperf3");
        nodeplane_tests::require_tool("ss", "iproute2");
        nodeplane_tests::require_tool("busybox", "busybox-static");
        for b in &opts.iptables {
            nodeplane_tests::require_tool(&format!("iptables-{b}-restore"), "iptables");
        }
    }
    if let Err(e) = agent::agent_bin() {
        eprintln!("policy-bench: {e}");
        std::process::exit(2);
    }
    agent::set_poll(std::time::Duration::from_millis(opts.poll_ms as u64));
    if let Some(l) = &opts.agent_log {
        agent::set_log_level(l);
    }
    let started = Instant::now();
    header(&opts);
    let mut report = Report::default();
    if opts.control {
        control::section(&opts, &mut report);
    }
    if opts.throughput {
        throughput::section(&opts, &mut report);
    }
    report.print_summary();
    println!(
        "\ntotal bench time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn header(opts: &Opts) {
    let sh = |c: &str| {
        std::process::Command::new("sh")
            .args(["-c", c])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "policy-bench: nodeplane-agent NetworkPolicy benchmark, baselines measured in the same run"
    );
    println!(
        "  machine: {} CPUs, kernel {}, load average at start {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sh("uname -r"),
        sh("cut -d' ' -f1-3 /proc/loadavg"),
    );
    println!(
        "  tools: {}; {}; {}",
        sh("nft --version"),
        sh("iptables-nft --version"),
        sh("iperf3 --version | head -1")
    );
    let bin = nodeplane_tests::target_dir();
    println!(
        "  nodeplane-agent and nodeplane-cni from {}; options: {opts:?}",
        bin.display()
    );
}
