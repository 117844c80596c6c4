//! cni-bench: nodeplane-cni against the reference CNI plugins
//! (bridge + host-local, ptp + host-local from Debian's
//! containernetworking-plugins), measured in the same run and reported as
//! ratios, because absolute times on a shared 2-core machine are noisy.
//!
//! Run as root: `cargo run --release -p nodeplane-tests --bin cni-bench`
//! (`-- --help` for the options). All load stays inside network namespaces
//! the bench creates; everything it creates is removed at the end, on panic
//! and on SIGINT/SIGTERM (see `guard`).

use nodeplane_tests::bench::guard;
mod iperf;
mod latency;
mod sections;
mod stats;
mod subject;

use std::time::Instant;

use sections::Report;
use subject::{Kind, V4_CIDR};

const HELP: &str = "\
cni-bench: nodeplane-cni vs the reference CNI plugins, same run, with ratios

usage (as root): cargo run --release -p nodeplane-tests --bin cni-bench -- [options]

  --only LIST           sections to run, comma-separated (default: all)
                          add         single pod ADD then DEL, repeated
                          seq         ADD of pods 1..N in sequence (latency growth)
                          concurrent  a burst of pods with concurrent invocations
                          iperf       pod<->pod TCP throughput vs a bare veth pair
  --plugins LIST        bridge,ptp,nodeplane (default: all three)
  --iterations N        add: ADD/DEL pairs per plugin (default 200)
  --seq-pods N          seq: pods added in sequence (default 250)
  --pods N              concurrent: pods per burst (default 100)
  --concurrency N       concurrent: parallel invocations (default 8)
  --rounds N            concurrent: bursts per plugin, median reported (default 3)
  --iperf-secs N        iperf: seconds per transfer (default 5)
  --iperf-runs N        iperf: transfers per path, median reported (default 9)
  --nice N              run the bench, the plugins and iperf3 at this nice
                        value, e.g. -10 so other work on a shared machine
                        disturbs the figures less (default 0: unchanged)
  -h, --help            this text

nodeplane-cni is taken from the bench's own target directory (build it with
`cargo build --release -p nodeplane-cni`) or from $NODEPLANE_CNI_BIN;
NODEPLANE_FAST_PATH=off runs it with \"fastPath\": false.
Targets are printed as PASS/MISS; the exit status is 0 whatever they say.
";

#[derive(Debug)]
pub struct Opts {
    pub sections: Vec<String>,
    pub kinds: Vec<Kind>,
    pub iterations: usize,
    pub seq_pods: usize,
    pub pods: usize,
    pub concurrency: usize,
    pub rounds: usize,
    pub iperf_secs: u64,
    pub iperf_runs: usize,
    pub nice: i32,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        sections: ["add", "seq", "concurrent", "iperf"]
            .map(String::from)
            .to_vec(),
        kinds: vec![Kind::Bridge, Kind::Ptp, Kind::Nodeplane],
        iterations: 200,
        seq_pods: 250,
        pods: 100,
        concurrency: 8,
        rounds: 3,
        iperf_secs: 5,
        iperf_runs: 9,
        nice: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
                .and_then(positive)
        };
        match flag.as_str() {
            "--only" => {
                o.sections = value.split(',').map(String::from).collect();
                if let Some(s) = o
                    .sections
                    .iter()
                    .find(|s| !["add", "seq", "concurrent", "iperf"].contains(&s.as_str()))
                {
                    return Err(format!("unknown section {s:?}"));
                }
            }
            "--plugins" => {
                o.kinds = value
                    .split(',')
                    .map(|p| match p {
                        "bridge" => Ok(Kind::Bridge),
                        "ptp" => Ok(Kind::Ptp),
                        "nodeplane" => Ok(Kind::Nodeplane),
                        _ => Err(format!("unknown plugin {p:?}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--iterations" => o.iterations = num()?,
            "--seq-pods" => o.seq_pods = num()?,
            "--pods" => o.pods = num()?,
            "--concurrency" => o.concurrency = num()?,
            "--rounds" => o.rounds = num()?,
            "--iperf-secs" => o.iperf_secs = num()? as u64,
            "--iperf-runs" => o.iperf_runs = num()?,
            "--nice" => o.nice = value.parse().map_err(|e| format!("--nice {value}: {e}"))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

fn positive(n: usize) -> Result<usize, String> {
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn main() {
    guard::install();
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("cni-bench: {e}\n\n{HELP}");
        std::process::exit(2);
    });
    nodeplane_tests::require_root();
    if opts.nice != 0 {
        // Per thread on Linux; set before any worker starts so every thread
        // and every child (plugins, iperf3) inherits it.
        // SAFETY: setpriority has no memory-safety preconditions.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, opts.nice) } != 0 {
            eprintln!(
                "cni-bench: --nice {}: {}",
                opts.nice,
                std::io::Error::last_os_error()
            );
        }
    }
    nodeplane_tests::require_tool("ip", "iproute2");
    if opts.sections.iter().any(|s| s == "iperf") {
        nodeplane_tests::require_tool("iperf3", "iperf3");
        nodeplane_tests::require_tool("ss", "iproute2");
    }
    let started = Instant::now();
    header(&opts);
    let mut report = Report::default();
    let has = |s: &str| opts.sections.iter().any(|x| x == s);
    if has("add") {
        sections::section_add(&opts, &mut report);
    }
    if has("seq") {
        sections::section_seq(&opts, &mut report);
    }
    if has("concurrent") {
        sections::section_concurrent(&opts, &mut report);
    }
    if has("iperf") {
        sections::section_iperf(&opts, &mut report);
    }
    println!("\n== summary ==");
    for t in &report.targets {
        println!("  {t}");
    }
    if !report.errors.is_empty() {
        println!("\n== errors (exact plugin output) ==");
        for e in &report.errors {
            println!("{e}\n");
        }
    }
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
    println!("cni-bench: nodeplane-cni vs reference CNI plugins, measured in the same run");
    println!(
        "  machine: {} CPUs, kernel {}, load average at start {}, bench nice {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sh("uname -r"),
        sh("cut -d' ' -f1-3 /proc/loadavg"),
        opts.nice
    );
    println!(
        "  reference: /usr/lib/cni from containernetworking-plugins {}",
        sh("dpkg-query -W -f='${Version}' containernetworking-plugins")
    );
    if opts.kinds.contains(&Kind::Nodeplane) {
        let bin = std::env::var("NODEPLANE_CNI_BIN").unwrap_or_else(|_| {
            nodeplane_tests::target_dir()
                .join("nodeplane-cni")
                .display()
                .to_string()
        });
        println!("  nodeplane-cni: {bin}");
    }
    println!("  each plugin runs in its own fresh node netns per section; pods are netns made before timing");
    println!("  latency sections: IPv4 {V4_CIDR} for every plugin; one call = spawn to exit of the plugin");
}
