//! Service invocation across two "nodes": two network namespaces joined by
//! an underlay bridge, an agent in each (the second issues its node
//! certificate from the CA the first generated), pods wired by
//! nodeplane-cni on each node, calls going app → runtime → peer agent
//! (mutual TLS, HTTP/2) → app.

use std::time::{Duration, Instant};

use nodeplane_tests::agent::{in_netns, Agent};
use nodeplane_tests::apps::{pod_yaml, AppPod};
use nodeplane_tests::fixture::Node;
use nodeplane_tests::{prereq, Netns};

const CIDR1: &str = "10.244.1.0/24";
const CIDR2: &str = "10.244.2.0/24";
const UNDERLAY1: &str = "192.168.77.1";
const UNDERLAY2: &str = "192.168.77.2";

/// Joins the two node namespaces with veths to a bridge in a third.
fn underlay(n1: &Netns, n2: &Netns) -> Netns {
    let u = Netns::new("npu");
    u.ip(&["link", "add", "br0", "type", "bridge"]);
    u.ip(&["link", "set", "br0", "up"]);
    for (i, (n, addr)) in [(n1, UNDERLAY1), (n2, UNDERLAY2)].into_iter().enumerate() {
        let (a, b) = (format!("u{i}"), format!("eth-u{i}"));
        u.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        u.ip(&["link", "set", &b, "netns", &n.path().display().to_string()]);
        u.ip(&["link", "set", &a, "master", "br0", "up"]);
        n.ip(&["addr", "add", &format!("{addr}/24"), "dev", &b]);
        n.ip(&["link", "set", &b, "up"]);
    }
    u
}

/// The cluster as both agents see it: front on node 1, back on node 2
/// (addresses and node addresses in status, as the API server has them).
fn cluster(front_ip: &str, back_ip: &str) -> String {
    let status = |node: &str, host: &str, ip: &str| {
        format!("spec: {{nodeName: {node}, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, hostIP: {host}, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n")
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}{}",
        pod_yaml(
            "shop",
            "front",
            Some("front"),
            "",
            &status("node1", UNDERLAY1, front_ip)
        ),
        pod_yaml(
            "shop",
            "back",
            Some("back"),
            "",
            &status("node2", UNDERLAY2, back_ip)
        ),
    )
}

#[test]
fn invocation_across_two_nodes_over_mutual_tls() {
    prereq::require_root();
    let mut node1 = Node::new(&[CIDR1]);
    let mut node2 = Node::new(&[CIDR2]);
    let _u = underlay(&node1.ns, &node2.ns);
    let agent1 = Agent::start(&mut node1, &[CIDR1], &["--node-name", "node1"]);
    // node 2 trusts node 1's generated CA and issues its own certificate.
    let tls = agent1.state.path().join("tls");
    let (ca, ca_key) = (tls.join("ca.pem"), tls.join("ca-key.pem"));
    assert!(
        ca.exists() && ca_key.exists(),
        "agent 1 generated no CA in {}",
        tls.display()
    );
    let (ca, ca_key) = (ca.display().to_string(), ca_key.display().to_string());
    let agent2 = Agent::start(
        &mut node2,
        &[CIDR2],
        &[
            "--node-name",
            "node2",
            "--peer-ca",
            &ca,
            "--peer-ca-key",
            &ca_key,
        ],
    );
    let front = AppPod::add(&node1, "shop", "front");
    let back = AppPod::add(&node2, "shop", "back");
    let c = cluster(&front.ip, &back.ip);
    agent1.apply(&[("cluster.yaml", c.clone())]);
    agent2.apply(&[("cluster.yaml", c)]);

    // front (node 1) → back (node 2).
    let start = Instant::now();
    let r = loop {
        let r = front.call(
            "POST",
            "/v1.0/invoke/back/method/echo/x?q=1",
            &[("x-custom", "v")],
            b"hello",
        );
        if r.status() == 200 || start.elapsed() > Duration::from_secs(20) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        r.status(),
        200,
        "{}\nagent 1:\n{}",
        r.text(),
        agent1.log_text()
    );
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("x-echo-uri"), Some("/echo/x?q=1"));
    assert_eq!(
        r.header("x-echo-caller"),
        Some("front"),
        "the caller's identity crosses the nodes"
    );
    assert_eq!(r.header("x-echo-h-x-custom"), Some("v"));

    // A forged identity header is replaced on node 1, whatever node 2 sees.
    let r = front.call(
        "GET",
        "/v1.0/invoke/back/method/who",
        &[("dapr-caller-app-id", "admin")],
        b"",
    );
    assert_eq!(r.header("x-echo-caller"), Some("front"));

    // Status codes and large bodies, both directions.
    let r = front.call("GET", "/v1.0/invoke/back/method/status/503", &[], b"");
    assert_eq!((r.status(), r.text().as_str()), (503, "status 503"));
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 253) as u8).collect();
    let r = front.call("PUT", "/v1.0/invoke/back/method/big", &[], &big);
    assert!(
        r.status() == 200 && r.body == big,
        "4 MiB across nodes: {} bytes, {}",
        r.body.len(),
        r.status()
    );
    let r = back.call(
        "POST",
        "/v1.0/invoke/front/method/back-to-front",
        &[],
        b"ok",
    );
    assert_eq!((r.status(), r.header("x-echo-caller")), (200, Some("back")));

    // The peer port refuses anyone without a node certificate: plain HTTP
    // gets no HTTP answer.
    let answered = in_netns(&node1.ns.path(), || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect((UNDERLAY2, 3501)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(b"GET /v1.0/invoke/back/method/x HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/"))
    });
    assert!(!answered, "the peer listener answered plain HTTP");
    drop(agent2);
}
