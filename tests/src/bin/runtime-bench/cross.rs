//! Section 5: invocation across two nodes. Two bench nodes joined by a
//! veth pair (the underlay), each routing the other's pod CIDR over it;
//! node 2's agent issues its certificate from the CA node 1's agent
//! generated. Pod A on node 1 sends to B on node 2: directly (pod IP,
//! routed across the underlay) and through the runtime (A → node 1's
//! runtime → mutual TLS, HTTP/2 → node 2's agent → B), interleaved as in
//! section 1.

use std::time::Duration;

use crate::invoke::{compare, per_pair};
use crate::load::{self, Plan, Target};
use crate::stats::diff_secs;
use crate::world::{self, World, APP_PORT, K8S_NS};
use crate::{Opts, Report};

/// Added p99 across nodes (issue 6).
const TARGET_ADDED_P99: f64 = 1e-3;
const CIDR1: &str = "10.244.1.0/24";
const CIDR2: &str = "10.244.2.0/24";
const UNDER1: &str = "192.168.78.1";
const UNDER2: &str = "192.168.78.2";

pub fn section(opts: &Opts, report: &mut Report) {
    println!("\n== 5. invoke across two nodes: A (node 1) → runtime → mTLS → runtime → B (node 2) vs A → B directly ==");
    if let Err(e) = run(opts, report) {
        println!("  ERROR: {e}");
        report.errors.push(format!("cross-node: {e}"));
    }
}

/// A pod on the other node, as the API server would show it.
fn remote_pod(name: &str, host: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {K8S_NS}, annotations: {{dapr.io/app-id: {name}, dapr.io/app-port: \"{APP_PORT}\"}}}}\n\
         spec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, hostIP: {host}, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n---\n"
    )
}

fn run(opts: &Opts, report: &mut Report) -> Result<(), String> {
    let mut n1 = World::with(CIDR1, &[], &[("ns.yaml", world::namespace_yaml())])?;
    let tls = n1.agent.state.join("tls");
    let peer = [
        "--peer-ca".to_string(),
        tls.join("ca.pem").display().to_string(),
        "--peer-ca-key".into(),
        tls.join("ca-key.pem").display().to_string(),
    ];
    let mut n2 = World::with(CIDR2, &peer, &[("ns.yaml", world::namespace_yaml())])?;
    // The underlay: one veth pair, each node routing the other's pods.
    let ns2 = n2.node.ns.path();
    n1.node.ns.ip(&[
        "link", "add", "under", "type", "veth", "peer", "name", "under2",
    ]);
    n1.node
        .ns
        .ip(&["link", "set", "under2", "netns", &ns2.display().to_string()]);
    for (ns, addr, other_cidr, via) in [
        (&n1.node.ns, UNDER1, CIDR2, UNDER2),
        (&n2.node.ns, UNDER2, CIDR1, UNDER1),
    ] {
        let dev = if addr == UNDER1 { "under" } else { "under2" };
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["route", "add", other_cidr, "via", via]);
        ns.sysctl("net.ipv4.ip_forward", "1");
    }
    let a = n1.add_pod("a")?;
    let b = n2.add_pod("b")?;
    let (a_ip, b_ip) = (n1.pods[a].ip.clone(), n2.pods[b].ip.clone());
    n1.agent.apply(&[
        ("ns.yaml", world::namespace_yaml()),
        (
            "pods.yaml",
            world::pod_yaml("a", Some("a")) + &remote_pod("b", UNDER2, &b_ip),
        ),
    ])?;
    n2.agent.apply(&[
        ("ns.yaml", world::namespace_yaml()),
        (
            "pods.yaml",
            world::pod_yaml("b", Some("b")) + &remote_pod("a", UNDER1, &a_ip),
        ),
    ])?;
    n1.wait_known(a, "a", &["b"])?;
    let plan = Plan {
        rate: opts.rate,
        blocks: opts.secs.max(1) as usize,
        block: Duration::from_secs(1),
        gap: Duration::from_millis(50),
        conns: opts.conns,
        body_len: 1024,
        warmup: 50,
    };
    let targets = [
        Target {
            label: "direct".into(),
            addr: format!("{b_ip}:{APP_PORT}"),
            uri: "/echo".into(),
        },
        Target {
            label: "runtime".into(),
            addr: world::runtime_addr().into(),
            uri: "/v1.0/invoke/b/method/echo".into(),
        },
    ];
    println!(
        "  node 1 {UNDER1} (pods {CIDR1}), node 2 {UNDER2} (pods {CIDR2}), one veth pair between them; \
         same load as section 1: {} req/s per path, {} B bodies, {} connections, {} blocks of 1 s interleaved",
        plan.rate, plan.body_len, plan.conns, plan.blocks
    );
    println!("  direct: {a_ip} → {b_ip}:{APP_PORT}/echo (routed across the nodes)   runtime: {a_ip} → {}/v1.0/invoke/b/method/echo", world::runtime_addr());
    let out = load::run(&n1.pods[a].path(), targets, &plan, n1.agent.pid);
    let [direct, runtime] = &out;
    println!("\n  latency from the scheduled send instant to the end of the response:");
    let (d, r) = compare(direct, runtime, |p| &p.from_schedule);
    per_pair(direct, runtime);
    for (label, x) in [("direct", direct), ("runtime", runtime)] {
        if x.errors > 0 {
            println!("  {label} errors ({}): {:?}", x.errors, x.error_samples);
            report.errors.push(format!(
                "cross-node {label}: {} errors, e.g. {:?}",
                x.errors, x.error_samples
            ));
        }
    }
    let n = runtime.from_schedule.len().max(1) as f64;
    println!(
        "  node 1's agent during the runtime blocks: {:.3} vCPU, {:.1} µs CPU per request (node 2's agent also works on every request)",
        runtime.agent_cpu / runtime.agent_wall.max(1e-9),
        runtime.agent_cpu / n * 1e6
    );
    let added = diff_secs(d.q(0.99), r.q(0.99));
    report.target(
        "across nodes (mTLS): added p99 ≤ 1 ms",
        added.map_or("-".into(), |a| format!("{:.3} ms", a * 1e3)),
        added.is_some_and(|a| a <= TARGET_ADDED_P99) && runtime.errors == 0,
    );
    drop(n2);
    drop(n1);
    Ok(())
}
