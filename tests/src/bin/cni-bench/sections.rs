//! The four sections: each sets up fresh subjects, runs, and prints its
//! table and target verdicts.

use std::time::Duration;

use crate::stats::{fmt, mean_range, median, quantile, slope_us_per_pod};
use crate::subject::{Kind, Subject, V4_CIDR};
use crate::{iperf, latency, Opts};

/// What the run found: errors with the plugins' exact output, and verdicts.
#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub targets: Vec<String>,
}

impl Report {
    /// Prints and records one target. `ratio` is ours / the baseline.
    fn target(&mut self, what: &str, ratio: Option<f64>, pass: impl Fn(f64) -> bool) {
        let line = match ratio {
            Some(r) => format!(
                "{what}: ratio {r:.3} → {}",
                if pass(r) { "PASS" } else { "MISS" }
            ),
            None => format!("{what}: not measured → MISS"),
        };
        println!("  target  {line}");
        self.targets.push(line);
    }
}

fn ratio(ours: Option<Duration>, base: Option<Duration>) -> Option<f64> {
    Some(ours?.as_secs_f64() / base?.as_secs_f64())
}

/// Sets up every requested plugin; a plugin that cannot be set up is
/// reported and left out.
fn subjects(kinds: &[Kind], report: &mut Report) -> Vec<Subject> {
    kinds
        .iter()
        .filter_map(|&k| match Subject::new(k, V4_CIDR) {
            Ok(s) => Some(s),
            Err(e) => {
                println!("  {}: not run: {e}", k.label());
                report.errors.push(format!("{}: {e}", k.label()));
                None
            }
        })
        .collect()
}

/// The result for `kind`, if it was run and succeeded.
fn of<'a, T>(subjects: &[Subject], res: &'a [Result<T, String>], kind: Kind) -> Option<&'a T> {
    let i = subjects.iter().position(|s| s.kind == kind)?;
    res[i].as_ref().ok()
}

pub fn section_add(opts: &Opts, report: &mut Report) {
    println!(
        "\n== 1. single pod: ADD then DEL of the same pod netns, {} times, plugins interleaved ==",
        opts.iterations
    );
    let mut kinds = opts.kinds.clone();
    if kinds.contains(&Kind::Nodeplane) {
        kinds.push(Kind::NodeplaneDual);
    }
    let subjects = subjects(&kinds, report);
    let res = latency::single(&subjects, opts.iterations);
    println!(
        "  {:<26} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "plugin", "ADD median", "ADD p95", "DEL median", "DEL p95", "DEL→torn down"
    );
    for (s, r) in subjects.iter().zip(&res) {
        match r {
            Ok(r) => println!(
                "  {:<26} {:>10} {:>10} {:>10} {:>10} {:>14}",
                s.kind.label(),
                fmt(median(&r.add)),
                fmt(quantile(&r.add, 0.95)),
                fmt(median(&r.del)),
                fmt(quantile(&r.del, 0.95)),
                fmt(median(&r.gone)),
            ),
            Err(e) => failed(report, s.kind, e),
        }
    }
    println!("  (info)  DEL→torn down: from DEL spawn until eth0 has left the pod netns and no");
    println!(
        "          process (e.g. a detached deleter) is left in the node netns; the bench waits"
    );
    println!(
        "          for that, untimed, after every DEL so no deferred work overlaps a timed call"
    );
    let add = |k| of(&subjects, &res, k).and_then(|r| median(&r.add));
    let del = |k| of(&subjects, &res, k).and_then(|r| median(&r.del));
    if let Some(r) = ratio(add(Kind::Nodeplane), add(Kind::Ptp)) {
        let d = ratio(del(Kind::Nodeplane), del(Kind::Ptp)).unwrap_or(f64::NAN);
        println!("  (info)  nodeplane/ptp: ADD median {r:.3}, DEL median {d:.3}");
    }
    if opts.kinds.contains(&Kind::Nodeplane) && opts.kinds.contains(&Kind::Bridge) {
        let r = ratio(add(Kind::Nodeplane), add(Kind::Bridge));
        report.target("ADD median ≤ 1/3 of bridge+host-local's", r, |r| {
            r <= 1.0 / 3.0
        });
        let r = ratio(del(Kind::Nodeplane), del(Kind::Bridge));
        report.target("DEL median ≤ 1/2 of bridge+host-local's", r, |r| r <= 0.5);
    }
}

pub fn section_seq(opts: &Opts, report: &mut Report) {
    let n = opts.seq_pods;
    println!("\n== 2. ADD latency with pods already present: pods 1..{n} added in sequence, then all deleted ==");
    println!(
        "  two passes pooled: up (add pod k+1 to k pods) and down (delete to k pods, add one),"
    );
    println!("  so drift in the machine's load cancels out of the slope; plugins interleaved");
    let subjects = subjects(&opts.kinds, report);
    let res = latency::growth(&subjects, n);
    // The brief's points for 250 pods: 1-10, 120-130, 240-250.
    let mid = n / 2;
    let points = [
        (1, 10.min(n)),
        (mid.saturating_sub(5).max(1), (mid + 5).min(n)),
        (n.saturating_sub(10).max(1), n),
    ];
    let heads: Vec<String> = points
        .iter()
        .map(|(a, b)| format!("pods {a}-{b}"))
        .collect();
    println!(
        "  {:<26} {:>13} {:>13} {:>13} {:>14}   (up / down pass)",
        "plugin (ADD, mean)", heads[0], heads[1], heads[2], "slope µs/pod"
    );
    for (s, r) in subjects.iter().zip(&res) {
        match r {
            Ok(r) => {
                let both: [&[Duration]; 2] = [&r.up, &r.down];
                let at: Vec<String> = points
                    .iter()
                    .map(|&(a, b)| fmt(mean_range(&both, a, b)))
                    .collect();
                let slope = |series: &[&[Duration]]| {
                    slope_us_per_pod(series).map_or("-".into(), |v| format!("{v:+.1}"))
                };
                println!(
                    "  {:<26} {:>13} {:>13} {:>13} {:>14}   ({} / {})",
                    s.kind.label(),
                    at[0],
                    at[1],
                    at[2],
                    slope(&both),
                    slope(&[&r.up]),
                    slope(&[&r.down])
                );
            }
            Err(e) => failed(report, s.kind, e),
        }
    }
    println!(
        "  (info)  goal: nodeplane stays flat; the reference chains grow with every existing pod"
    );
}

pub fn section_concurrent(opts: &Opts, report: &mut Report) {
    println!(
        "\n== 3. burst: {} pods, {} concurrent invocations, wall time of all ADDs then all DELs; median of {} rounds ==",
        opts.pods, opts.concurrency, opts.rounds
    );
    let subjects = subjects(&opts.kinds, report);
    let res = latency::burst(&subjects, opts.pods, opts.concurrency, opts.rounds);
    println!(
        "  {:<26} {:>10} {:>10} {:>14}   per round (ADD / DEL)",
        "plugin", "ADD total", "DEL total", "DEL→torn down"
    );
    for (s, r) in subjects.iter().zip(&res) {
        match r {
            Ok(r) => {
                let rounds: Vec<String> = r
                    .add
                    .iter()
                    .zip(&r.del)
                    .map(|(a, d)| format!("{} / {}", fmt(Some(*a)), fmt(Some(*d))))
                    .collect();
                println!(
                    "  {:<26} {:>10} {:>10} {:>14}   {}",
                    s.kind.label(),
                    fmt(median(&r.add)),
                    fmt(median(&r.del)),
                    fmt(median(&r.gone)),
                    rounds.join(", ")
                );
            }
            Err(e) => failed(report, s.kind, e),
        }
    }
    if opts.kinds.contains(&Kind::Nodeplane) && opts.kinds.contains(&Kind::Bridge) {
        let add = |k| of(&subjects, &res, k).and_then(|r| median(&r.add));
        let r = ratio(add(Kind::Nodeplane), add(Kind::Bridge));
        report.target(
            &format!(
                "{}-pod concurrent ADD total ≤ 1/3 of bridge+host-local's",
                opts.pods
            ),
            r,
            |r| r <= 1.0 / 3.0,
        );
    }
}

pub fn section_iperf(opts: &Opts, report: &mut Report) {
    let pin = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    println!(
        "\n== 4. pod↔pod TCP throughput: iperf3 -t {} between two pods on one node, median of {} runs, paths interleaved ==",
        opts.iperf_secs, opts.iperf_runs
    );
    println!(
        "  one TCP stream, MTU 1500 everywhere; {}",
        if pin {
            "server pinned to CPU 1, client to CPU 0"
        } else {
            "one CPU: no pinning"
        }
    );
    let subjects = subjects(&opts.kinds, report);
    let bare = iperf::BareVeth::new();
    let mut pairs = Vec::new();
    for s in &subjects {
        match iperf::PodPair::new(s) {
            Ok(p) => pairs.push(p),
            Err(e) => failed(report, s.kind, &e),
        }
    }
    let mut paths = vec![(None, Ok(bare.path()))];
    paths.extend(pairs.iter().map(|p| (Some(p.kind()), p.path())));
    let mut results: Vec<Result<Vec<iperf::Transfer>, String>> =
        paths.iter().map(|_| Ok(Vec::new())).collect();
    for run in 0..opts.iperf_runs {
        for j in 0..paths.len() {
            let i = (j + run) % paths.len();
            let (Ok(path), Ok(acc)) = (&paths[i].1, &mut results[i]) else {
                continue;
            };
            match iperf::measure(path, opts.iperf_secs, pin) {
                Ok(t) => acc.push(t),
                Err(e) => results[i] = Err(e),
            }
        }
    }
    let median = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v.get(v.len().saturating_sub(1) / 2).copied()
    };
    let medians = |v: &[iperf::Transfer]| {
        (
            median(v.iter().map(|t| t.bps).collect()),
            median(v.iter().map(|t| t.cpu_ms_per_gb).collect()),
            median(v.iter().filter_map(|t| t.forwarded_per_gb).collect()),
        )
    };
    let (bare_bps, bare_cpu) = match &results[0] {
        Ok(v) => {
            let (b, c, _) = medians(v);
            (b, c)
        }
        Err(_) => (None, None),
    };
    println!(
        "  {:<40} {:>9} {:>12} {:>11} {:>9} {:>11}   runs (Gbit/s)",
        "path", "Gbit/s", "vs bare veth", "CPU ms/GB", "vs bare", "fwd pkt/GB"
    );
    let mut ours = None;
    for ((kind, path), r) in paths.iter().zip(&results) {
        let label = match path {
            Ok(p) => p.label.clone(),
            Err(_) => kind.map_or("?".into(), |k| k.label().to_string()),
        };
        let r = path
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
            .and(r.clone());
        match r {
            Ok(v) => {
                let (m, cpu, fwd) = medians(&v);
                let rel = m.zip(bare_bps).map(|(m, b)| m / b);
                let cpu_rel = cpu.zip(bare_cpu).map(|(c, b)| c / b);
                if *kind == Some(Kind::Nodeplane) {
                    ours = rel;
                }
                let runs: Vec<String> = v.iter().map(|t| format!("{:.2}", t.bps / 1e9)).collect();
                println!(
                    "  {:<40} {:>9} {:>12} {:>11} {:>9} {:>11}   {}",
                    label,
                    m.map_or("-".into(), |m| format!("{:.2}", m / 1e9)),
                    rel.map_or("-".into(), |r| format!("{:.1} %", r * 100.0)),
                    cpu.map_or("-".into(), |c| format!("{c:.0}")),
                    cpu_rel.map_or("-".into(), |r| format!("{r:.3}")),
                    fwd.map_or("-".into(), |f| format!("{f:.0}")),
                    runs.join(" ")
                );
            }
            Err(e) => {
                println!("  {label:<40} FAILED (see errors)");
                report.errors.push(format!("{label}: {e}"));
            }
        }
    }
    println!("  nodeplane-cni carries same-node pod-to-pod TCP on its eBPF fast path (\"fastPath\", on by default);");
    println!("  fwd pkt/GB counts IPv4 packets the node namespace forwarded: near 0 on the fast path (a bridge switches, so 0 too)");
    if opts.kinds.contains(&Kind::Nodeplane) {
        report.target(
            "pod↔pod throughput via nodeplane ≥ 95% of a bare veth pair",
            ours,
            |r| r >= 0.95,
        );
    }
}

fn failed(report: &mut Report, kind: Kind, e: &str) {
    println!("  {:<26} FAILED (see errors)", kind.label());
    report.errors.push(e.to_string());
}
