//! Section 4: state save / get throughput through the runtime's state API,
//! the embedded store (`statestore`) against Redis (a real redis-server in
//! the node namespace, no persistence), measured in the same run.
//!
//! Closed loop: a few connections from pod A, each sending its next request
//! when the previous answered, for a fixed time per store and operation.
//! Values are 1 KB JSON strings over 1,000 keys, prefilled before timing;
//! every GET checks the value it got back.

use std::time::{Duration, Instant};

use crate::guard::Proc;
use crate::stats::{us, Dist};
use crate::world::{self, spawn_in, World};
use crate::{Opts, Report};

const KEYS: usize = 1000;
const VALUE_LEN: usize = 1024;
const REDIS_PORT: u16 = 6391;

pub fn section(opts: &Opts, report: &mut Report) {
    println!("\n== 4. state throughput: embedded store vs Redis ==");
    if let Err(e) = run(opts, report) {
        println!("  ERROR: {e}");
        report.errors.push(format!("state: {e}"));
    }
}

/// What one store did: (ops/s, latency, errors) per save and get.
#[derive(Debug, Default)]
struct StoreResult {
    save: Option<OpResult>,
    get: Option<OpResult>,
    unavailable: Option<String>,
}

#[derive(Debug)]
struct OpResult {
    ops_per_sec: f64,
    lat: Dist,
    errors: usize,
    error_samples: Vec<String>,
}

fn run(opts: &Opts, report: &mut Report) -> Result<(), String> {
    let manifests = format!(
        "{}{}",
        world::namespace_yaml(),
        world::pod_yaml("a", Some("a"))
    );
    let mut w = World::new(&[("pods.yaml", manifests)])?;
    let a = w.add_pod("a")?;
    w.wait_known(a, "a", &[])?;
    println!(
        "  {} connections from pod A, closed loop, {} s per store and operation, {KEYS} keys, {VALUE_LEN} B values \
         (saves: one item per POST, last-write; gets: GET /v1.0/state/STORE/KEY)",
        opts.state_conns, opts.state_secs
    );
    println!(
        "  the embedded store commits with fsync, on {} (the agent's state directory); Redis runs with --save \"\" --appendonly no (no durability)",
        fs_of(&w.agent.state)
    );
    let embedded = bench_store(&w, a, "statestore", opts);

    let redis = match start_redis(&w, REDIS_PORT) {
        Ok(p) => Some(p),
        Err(e) => {
            println!("  redis: {e}");
            None
        }
    };
    let redis_result = match &redis {
        None => StoreResult {
            unavailable: Some("redis-server did not start".into()),
            ..StoreResult::default()
        },
        Some(_) => {
            let c = format!(
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: redis}}\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - {{name: redisHost, value: \"127.0.0.1:{REDIS_PORT}\"}}\n"
            );
            match w
                .agent
                .write_manifest("redis.yaml", &c)
                .and_then(|()| wait_component(&w, a, "redis"))
            {
                Ok(took) => {
                    println!("  component redis listed by /v1.0/metadata {:.2} s after the file was written", took.as_secs_f64());
                    bench_store(&w, a, "redis", opts)
                }
                Err(e) => StoreResult {
                    unavailable: Some(e),
                    ..StoreResult::default()
                },
            }
        }
    };

    println!(
        "\n  {:<12} {:<5} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "store", "op", "ops/s", "p50", "p99", "max", "errors"
    );
    for (name, r) in [("statestore", &embedded), ("redis", &redis_result)] {
        if let Some(why) = &r.unavailable {
            println!("  {name:<12} not available: {why}");
            report
                .errors
                .push(format!("state {name}: not available: {why}"));
            continue;
        }
        for (op, x) in [("save", &r.save), ("get", &r.get)] {
            let Some(x) = x else { continue };
            println!(
                "  {:<12} {:<5} {:>10.0} {:>10} {:>10} {:>10} {:>7}",
                name,
                op,
                x.ops_per_sec,
                us(x.lat.q(0.5)),
                us(x.lat.q(0.99)),
                us(x.lat.max()),
                x.errors
            );
            if x.errors > 0 {
                for e in &x.error_samples {
                    println!("      {e}");
                }
                report.errors.push(format!(
                    "state {name} {op}: {} errors, e.g. {:?}",
                    x.errors, x.error_samples
                ));
            }
        }
    }
    for (op, e, r) in [
        ("save", embedded.save.as_ref(), redis_result.save.as_ref()),
        ("get", embedded.get.as_ref(), redis_result.get.as_ref()),
    ] {
        if let (Some(e), Some(r)) = (e, r) {
            println!(
                "  {op}: embedded / redis = {:.2}",
                e.ops_per_sec / r.ops_per_sec.max(1e-9)
            );
        }
    }
    drop(redis);
    Ok(())
}

fn fs_of(p: &std::path::Path) -> String {
    std::process::Command::new("df")
        .args(["--output=fstype,source"])
        .arg(p)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "an unknown filesystem".into())
}

/// The value stored under key `k` (a JSON string).
fn value(k: usize) -> String {
    let mut v = format!("k{k}:");
    v.extend((v.len()..VALUE_LEN).map(|i| (b'a' + ((i + k) % 26) as u8) as char));
    format!("\"{v}\"")
}

fn bench_store(w: &World, a: usize, store: &str, opts: &Opts) -> StoreResult {
    let pod = &w.pods[a];
    // Is the store there at all?
    match pod.call("GET", &format!("/v1.0/state/{store}/probe"), b"") {
        Ok(m) if m.status() == 200 || m.status() == 204 => {}
        Ok(m) => {
            let errs = pod
                .call("GET", "/v1.0/metadata", b"")
                .map(|m| m.json()["extended"]["componentErrors"].to_string())
                .unwrap_or_default();
            return StoreResult {
                unavailable: Some(format!(
                    "GET /v1.0/state/{store}/probe answered {} {}; componentErrors {errs}",
                    m.status(),
                    m.text()
                )),
                ..StoreResult::default()
            };
        }
        Err(e) => {
            return StoreResult {
                unavailable: Some(format!("GET /v1.0/state/{store}/probe: {e}")),
                ..StoreResult::default()
            }
        }
    }
    // Prefill in bulk (100 items per POST), untimed.
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
        let items: Vec<String> = chunk
            .iter()
            .map(|k| format!(r#"{{"key":"k{k}","value":{}}}"#, value(*k)))
            .collect();
        let body = format!("[{}]", items.join(","));
        match pod.call("POST", &format!("/v1.0/state/{store}"), body.as_bytes()) {
            Ok(m) if m.status() == 204 => {}
            Ok(m) => {
                return StoreResult {
                    unavailable: Some(format!("prefill: {} {}", m.status(), m.text())),
                    ..StoreResult::default()
                }
            }
            Err(e) => {
                return StoreResult {
                    unavailable: Some(format!("prefill: {e}")),
                    ..StoreResult::default()
                }
            }
        }
    }
    let secs = Duration::from_secs(opts.state_secs);
    StoreResult {
        save: Some(closed_loop(w, a, store, true, opts.state_conns, secs)),
        get: Some(closed_loop(w, a, store, false, opts.state_conns, secs)),
        unavailable: None,
    }
}

fn closed_loop(
    w: &World,
    a: usize,
    store: &str,
    save: bool,
    conns: usize,
    secs: Duration,
) -> OpResult {
    let path = w.pods[a].path();
    let start = Instant::now();
    let deadline = start + secs;
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let store = store.to_string();
            spawn_in(&path, move || {
                let mut lat = Vec::new();
                let mut errors = Vec::new();
                let mut conn = None;
                // A small LCG: keys spread over the key space, no crate.
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1);
                while Instant::now() < deadline {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let k = ((x >> 33) as usize) % KEYS;
                    let Some(cn) = world::runtime_conn(&mut conn, &mut errors) else {
                        continue;
                    };
                    let t = Instant::now();
                    let got = if save {
                        let body = format!(r#"[{{"key":"k{k}","value":{}}}]"#, value(k));
                        cn.request(
                            "POST",
                            &format!("/v1.0/state/{store}"),
                            &[("content-type", "application/json")],
                            body.as_bytes(),
                        )
                    } else {
                        cn.request("GET", &format!("/v1.0/state/{store}/k{k}"), &[], b"")
                    };
                    let took = t.elapsed();
                    match got {
                        Ok(m) if save && m.status() == 204 => lat.push(took),
                        Ok(m) if !save && m.status() == 200 && m.body == value(k).as_bytes() => {
                            lat.push(took)
                        }
                        Ok(m) => errors.push(format!(
                            "{} k{k}: {} {}",
                            if save { "save" } else { "get" },
                            m.status(),
                            m.text().chars().take(120).collect::<String>()
                        )),
                        Err(e) => {
                            conn = None;
                            errors.push(format!("k{k}: {e}"));
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok((l, e)) => {
                lat.extend(l);
                errors.extend(e);
            }
            Err(_) => errors.push("a worker panicked".into()),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let mut samples: Vec<String> = Vec::new();
    for e in &errors {
        if samples.len() < 5 && !samples.contains(e) {
            samples.push(e.clone());
        }
    }
    OpResult {
        ops_per_sec: lat.len() as f64 / wall,
        lat: Dist::new(lat),
        errors: errors.len(),
        error_samples: samples,
    }
}

/// Until pod `a`'s /v1.0/metadata lists component `name`.
fn wait_component(w: &World, a: usize, name: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(m) = w.pods[a].call("GET", "/v1.0/metadata", b"") {
            let v = m.json();
            let listed = v["components"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["name"] == name));
            if listed {
                return Ok(start.elapsed());
            }
            last = v["extended"]["componentErrors"].to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "component {name} not listed by /v1.0/metadata within 10 s; componentErrors {last}"
    ))
}

/// redis-server on 127.0.0.1:REDIS_PORT in the node namespace, where the
/// agent reaches it on its loopback; killed when the Proc drops.
/// redis-server on 127.0.0.1:`port` in the node namespace, without
/// persistence (also the pub/sub section's `pubsub.redis` server).
pub(crate) fn start_redis(w: &World, port: u16) -> Result<Proc, String> {
    let bin = "redis-server";
    if !crate::world::tool(bin) {
        return Err("redis-server not found: install the Debian package redis-server".into());
    }
    let child = nodeplane_tests::apps::redis_command(&w.node.ns, port, &w.agent.state)
        .spawn()
        .map_err(|e| format!("spawn redis-server: {e}"))?;
    let proc = Proc::new(child, Duration::from_secs(3600));
    if !nodeplane_tests::apps::redis_ready(&w.node.ns.path(), port, Duration::from_secs(10)) {
        return Err(format!(
            "redis-server did not answer PING on 127.0.0.1:{port} within 10 s"
        ));
    }
    let version = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("  {version}, on 127.0.0.1:{port} in the node namespace");
    Ok(proc)
}
