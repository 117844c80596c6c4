//! Section 3: the agent's memory with 100 app pods registered against 1.
//!
//! The pods are real: each has its namespace, is ADDed through
//! nodeplane-cni (so the agent learns its address as for any local pod),
//! runs np-app, and is named in the manifests with its own app id. Every
//! app is invoked from pod A over a few concurrent connections before the
//! memory is read, so the runtime holds a pooled connection set per app.

use std::time::Instant;

use crate::stats::mib;
use crate::world::{self, spawn_in, World};
use crate::{Opts, Report};

const TARGET_RSS_KIB: u64 = 40 * 1024;
/// Concurrent callers in A (each with its kept-alive connection).
const CALLERS: usize = 4;
/// Invocations of each app per caller.
const PER_APP: usize = 5;

pub fn section(opts: &Opts, report: &mut Report) {
    println!("\n== 3. agent memory with {} app pods vs 1 ==", opts.pods);
    if let Err(e) = run(opts, report) {
        println!("  ERROR: {e}");
        report.errors.push(format!("pods: {e}"));
    }
}

fn app(i: usize) -> String {
    format!("p{i:03}")
}

fn manifests(apps: usize) -> String {
    let mut m = world::namespace_yaml();
    m.push_str(&world::pod_yaml("a", Some("a")));
    for i in 0..apps {
        m.push_str(&world::pod_yaml(&app(i), Some(&app(i))));
    }
    m
}

fn run(opts: &Opts, report: &mut Report) -> Result<(), String> {
    let mut w = World::new(&[("pods.yaml", manifests(1))])?;
    let start = w.agent.sample()?;
    println!("  agent just started, no pods: {}", start.describe());
    let a = w.add_pod("a")?;
    w.add_pod(&app(0))?;
    w.wait_known(a, "a", &[&app(0)])?;
    let errors1 = invoke_all(&w, a, 1);
    let one = w.agent.sample()?;
    println!(
        "  1 app pod (+ caller A), {} invocations: {}",
        CALLERS * PER_APP,
        one.describe()
    );

    let t = Instant::now();
    w.agent.apply(&[("pods.yaml", manifests(opts.pods))])?;
    for i in 1..opts.pods {
        w.add_pod(&app(i))?;
    }
    let added = t.elapsed();
    let last = app(opts.pods - 1);
    w.wait_known(a, "a", &[&last])?;
    println!(
        "  {} more pods made (netns, CNI ADD, np-app) in {:.1} s",
        opts.pods - 1,
        added.as_secs_f64()
    );
    let errors = invoke_all(&w, a, opts.pods);
    let many = w.agent.sample()?;
    println!(
        "  {} app pods (+ caller A), {} invocations ({} per app): {}",
        opts.pods,
        opts.pods * CALLERS * PER_APP,
        CALLERS * PER_APP,
        many.describe()
    );
    println!(
        "  VmRSS {} pods − 1 pod: {} ({:.1} KiB per added pod)",
        opts.pods,
        mib(many.rss_kib.saturating_sub(one.rss_kib)),
        many.rss_kib.saturating_sub(one.rss_kib) as f64 / (opts.pods - 1).max(1) as f64
    );
    for (label, e) in [("1 pod", errors1), ("many pods", errors)] {
        if !e.is_empty() {
            println!("  invocation errors with {label} ({}):", e.len());
            for x in e.iter().take(5) {
                println!("    {x}");
            }
            report
                .errors
                .push(format!("pods ({label}): {} invocation errors", e.len()));
        }
    }
    report.target(
        &format!("agent VmRSS with {} app pods ≤ 40 MB", opts.pods),
        format!("{} (1 pod: {})", mib(many.rss_kib), mib(one.rss_kib)),
        many.rss_kib <= TARGET_RSS_KIB,
    );
    Ok(())
}

/// Invokes apps p000..p{n-1} PER_APP times from each of CALLERS
/// connections in pod `a`; returns the errors.
fn invoke_all(w: &World, a: usize, n: usize) -> Vec<String> {
    let path = w.pods[a].path();
    let handles: Vec<_> = (0..CALLERS)
        .map(|_| {
            spawn_in(&path, move || {
                let mut errors = Vec::new();
                let mut conn = None;
                let body = vec![b'x'; 1024];
                for _ in 0..PER_APP {
                    for i in 0..n {
                        let Some(c) = world::runtime_conn(&mut conn, &mut errors) else {
                            continue;
                        };
                        let uri = format!("/v1.0/invoke/{}/method/echo", app(i));
                        match c.request("POST", &uri, &[], &body) {
                            Ok(m) if m.status() == 200 && m.body == body => {}
                            Ok(m) => errors.push(format!("{uri}: {} {}", m.status(), m.text())),
                            Err(e) => {
                                conn = None;
                                errors.push(format!("{uri}: {e}"));
                            }
                        }
                    }
                }
                errors
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_else(|_| vec!["caller panicked".into()]))
        .collect()
}
