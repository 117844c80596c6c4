//! The node app runtime (Dapr v1.0 HTTP API in nodeplane-agent) on real
//! pods: namespaces wired by nodeplane-cni, small HTTP apps (np-app) in
//! them, the agent in its node namespace serving 169.254.1.1:3500 and a
//! unix socket. Invocation, identity from the kernel, access control,
//! state on the embedded store, kill -9 and restart of the agent.

use std::time::{Duration, Instant};

use nodeplane_tests::agent::{in_netns, Agent};
use nodeplane_tests::apps::{self, AppPod, APP_PORT};
use nodeplane_tests::fixture::Node;
use nodeplane_tests::http1::{runtime_in, Conn, Msg, RUNTIME};
use nodeplane_tests::prereq;

const CIDR: &str = "10.244.0.0/24";

type Pod = AppPod;

fn pod_yaml(name: &str, app: Option<&str>, extra_annotations: &str) -> String {
    apps::pod_yaml("shop", name, app, extra_annotations, "")
}

fn add(node: &Node, name: &str) -> Pod {
    AppPod::add(node, "shop", name)
}

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n";

struct World {
    node: Node,
    agent: Agent,
    front: Pod,
    back: Pod,
    anon: Pod,
}

/// front (app front) and back (app back, with `back_annotations`), and
/// anon (no app id), with `extra` manifests.
fn world(back_annotations: &str, extra: &str) -> World {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    let agent = Agent::start(&mut node, &[CIDR], &["--invoke-timeout-ms", "2000"]);
    let cluster = format!(
        "{NS}{}{}{}",
        pod_yaml("front", Some("front"), ""),
        pod_yaml("back", Some("back"), back_annotations),
        pod_yaml("anon", None, "")
    );
    agent.apply(&[("cluster.yaml", cluster), ("extra.yaml", extra.to_string())]);
    let w = World {
        front: add(&node, "front"),
        back: add(&node, "back"),
        anon: add(&node, "anon"),
        node,
        agent,
    };
    w.wait_known();
    w
}

impl World {
    /// Until the runtime knows all three pods as local (their attachments
    /// reached the agent) and its components are loaded.
    fn wait_known(&self) {
        let start = Instant::now();
        loop {
            let m = self.front.call("GET", "/v1.0/metadata", &[], b"");
            let b = self.anon.call("GET", "/v1.0/metadata", &[], b"");
            if m.json()["id"] == "front" && b.json()["extended"]["caller"] == "pod shop/anon" {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the runtime did not learn the pods: {} / {}; agent log:\n{}",
                m.text(),
                b.text(),
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn invocation_between_pods_keeps_method_path_query_headers_status_and_bodies() {
    let w = world("", "");
    let body = vec![b'x'; 1024];
    let r = w.front.call(
        "POST",
        "/v1.0/invoke/back/method/echo/a%20b?q=1&r=two",
        &[
            ("x-custom", "v1"),
            ("content-type", "application/octet-stream"),
        ],
        &body,
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.body, body);
    assert_eq!(r.header("x-echo-method"), Some("POST"));
    assert_eq!(r.header("x-echo-uri"), Some("/echo/a%20b?q=1&r=two"));
    assert_eq!(r.header("x-echo-caller"), Some("front"));
    assert_eq!(r.header("x-echo-h-x-custom"), Some("v1"));
    let tp = r.header("x-echo-traceparent").unwrap_or("-");
    assert!(tp.starts_with("00-") && tp.len() == 55, "traceparent {tp}");

    // A caller's trace id is kept.
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = w.front.call(
        "GET",
        "/v1.0/invoke/back/method/t",
        &[("traceparent", incoming)],
        b"",
    );
    let tp = r.header("x-echo-traceparent").unwrap_or("-");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );

    // Every verb, and the app's status codes, pass through.
    for verb in ["GET", "PUT", "DELETE", "PATCH"] {
        let r = w.back.call(verb, "/v1.0/invoke/front/method/v", &[], b"");
        assert_eq!((r.status(), r.header("x-echo-method")), (200, Some(verb)));
        assert_eq!(r.header("x-echo-caller"), Some("back"));
    }
    let r = w
        .front
        .call("GET", "/v1.0/invoke/back/method/status/418", &[], b"");
    assert_eq!((r.status(), r.text().as_str()), (418, "status 418"));

    // Large payloads, both ways intact (the echo returns the body).
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
    let r = w
        .front
        .call("PUT", "/v1.0/invoke/back/method/big", &[], &big);
    assert_eq!(r.status(), 200);
    assert!(
        r.body == big,
        "8 MiB body changed: {} bytes back",
        r.body.len()
    );

    // app.namespace names the target's namespace.
    let r = w
        .front
        .call("GET", "/v1.0/invoke/back.shop/method/x", &[], b"");
    assert_eq!(r.status(), 200);

    // Unknown app, and an app without a port: Dapr's error body.
    let r = w
        .front
        .call("GET", "/v1.0/invoke/nobody/method/x", &[], b"");
    assert_eq!(r.status(), 500);
    assert_eq!(r.json()["errorCode"], "ERR_DIRECT_INVOKE", "{}", r.text());

    // An app slower than --invoke-timeout-ms (2 s here): 504, no hang.
    let t = Instant::now();
    let r = w
        .front
        .call("GET", "/v1.0/invoke/back/method/slow/4000", &[], b"");
    assert_eq!(r.status(), 504, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_millis(3500),
        "{:?}",
        t.elapsed()
    );

    // Many requests over one kept-alive connection.
    let path = w.front.path();
    let n = in_netns(&path, || {
        let s = std::net::TcpStream::connect(RUNTIME).expect("connect");
        let mut c = Conn::new(s);
        (0..200)
            .filter(|i| {
                c.request(
                    "POST",
                    "/v1.0/invoke/back/method/k",
                    &[],
                    format!("{i}").as_bytes(),
                )
                .is_ok_and(|m| m.status() == 200 && m.text() == format!("{i}"))
            })
            .count()
    });
    assert_eq!(n, 200);

    // The unix socket serves the same API; a process of the node (not in
    // a container) calls as the node, with no app id.
    let sock = w.agent.state.path().join("runtime").join("runtime.sock");
    let s = std::os::unix::net::UnixStream::connect(&sock).expect("connect the runtime socket");
    let r = Conn::new(s)
        .request("GET", "/v1.0/invoke/back.shop/method/u", &[], b"")
        .expect("request over the socket");
    assert_eq!((r.status(), r.header("x-echo-caller")), (200, Some("-")));

    let m = w.agent.get("/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(
        m.contains(r#"nodeplane_runtime_invoke_requests_total{caller="front",target="back",method="POST",status="200"}"#),
        "{m}"
    );
}

#[test]
fn identity_comes_from_the_kernel_not_from_headers_or_forged_addresses() {
    let w = world("", "");
    // A header claiming another app id is dropped; the runtime sets its own.
    let r = w.front.call(
        "GET",
        "/v1.0/invoke/back/method/who",
        &[
            ("dapr-caller-app-id", "back"),
            ("dapr-caller-namespace", "kube-system"),
        ],
        b"",
    );
    assert_eq!(r.header("x-echo-caller"), Some("front"));
    assert_eq!(
        w.front
            .call("GET", "/v1.0/metadata", &[("dapr-app-id", "back")], b"")
            .json()["id"],
        "front"
    );

    // A pod without an app id can call, as nobody ...
    let r = w.anon.call("GET", "/v1.0/invoke/back/method/who", &[], b"");
    assert_eq!((r.status(), r.header("x-echo-caller")), (200, Some("-")));
    // ... but cannot use app-scoped state.
    let r = w.anon.call(
        "POST",
        "/v1.0/state/statestore",
        &[],
        br#"[{"key":"k","value":1}]"#,
    );
    assert_eq!(r.status(), 403, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_PERMISSION_DENIED");
    assert!(
        r.text().contains("dapr.io/app-id"),
        "the message names the fix: {}",
        r.text()
    );

    // anon puts front's address on its interface and calls from it:
    // anti-spoofing drops the packets, so the runtime never sees them.
    let dev = w.anon.ns.ip(&["-o", "link", "show"]);
    let dev = dev
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|d| d.split('@').next().unwrap_or(d))
        .find(|d| *d != "lo")
        .expect("pod interface")
        .to_string();
    w.anon
        .ns
        .ip(&["addr", "add", &format!("{}/32", w.front.ip), "dev", &dev]);
    let front_ip = w.front.ip.clone();
    let forged = in_netns(&w.anon.path(), move || {
        // Bind the forged source, then connect (std cannot bind first).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let src: std::net::Ipv4Addr = front_ip.parse().expect("ip");
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(src).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let bound = unsafe { libc::bind(fd, std::ptr::addr_of!(sa).cast(), len) };
        assert_eq!(bound, 0, "bind the forged source");
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 3500u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::new(169, 254, 1, 1)).to_be(),
            },
            sin_zero: [0; 8],
        };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let r = unsafe { libc::connect(fd, std::ptr::addr_of!(dst).cast(), len) };
        unsafe { libc::close(fd) };
        r == 0
    });
    assert!(
        !forged,
        "a connection from a forged source address reached the runtime"
    );
    // anon's own address still works, and still as anon.
    assert_eq!(
        w.anon.call("GET", "/v1.0/metadata", &[], b"").json()["extended"]["caller"],
        "pod shop/anon"
    );
    drop(w.node);
}

const ACL: &str = "apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata: {name: back-acl, namespace: shop}
spec:
  accessControl:
    defaultAction: deny
    trustDomain: public
    policies:
    - appId: front
      defaultAction: deny
      namespace: shop
      operations:
      - {name: /orders/**, httpVerb: [GET], action: allow}
      - {name: /orders/secret, httpVerb: ['*'], action: deny}
";

#[test]
fn access_control_allows_and_denies_by_caller_verb_and_path() {
    let w = world("dapr.io/config: back-acl", ACL);
    let start = Instant::now();
    while w.front.call("GET", "/v1.0/metadata", &[], b"").json()["extended"]["configurations"][0]
        != "back-acl"
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "Configuration back-acl not loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = w
        .front
        .call("GET", "/v1.0/invoke/back/method/orders/17", &[], b"");
    assert_eq!(r.status(), 200, "{}", r.text());
    for (who, verb, path) in [
        (&w.front, "POST", "/v1.0/invoke/back/method/orders/17"),
        (&w.front, "GET", "/v1.0/invoke/back/method/orders/secret"),
        (&w.front, "GET", "/v1.0/invoke/back/method/other"),
        (&w.anon, "GET", "/v1.0/invoke/back/method/orders/17"),
    ] {
        let r = who.call(verb, path, &[], b"");
        assert_eq!(
            r.status(),
            403,
            "{verb} {path} from {}: {}",
            who.ns.name,
            r.text()
        );
        assert_eq!(r.json()["errorCode"], "ERR_DIRECT_INVOKE");
    }
    // back has no ACL of its own target: front → back ACL does not apply
    // to calls to front.
    let r = w
        .back
        .call("POST", "/v1.0/invoke/front/method/anything", &[], b"");
    assert_eq!(r.status(), 200);
}

#[test]
fn pods_reach_the_runtime_under_an_egress_default_deny() {
    let deny = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
";
    let w = world("", deny);
    let r = w.front.call("GET", "/v1.0/metadata", &[], b"");
    assert_eq!(r.json()["id"], "front");
    // The policy still holds between the pods themselves.
    let back_ip = w.back.ip.clone();
    let direct = in_netns(&w.front.path(), move || {
        std::net::TcpStream::connect_timeout(
            &format!("{back_ip}:{APP_PORT}").parse().expect("addr"),
            Duration::from_millis(500),
        )
        .is_ok()
    });
    assert!(!direct, "deny-all must still drop front → back directly");
}

fn save(p: &Pod, body: &str) -> Msg {
    p.call(
        "POST",
        "/v1.0/state/statestore",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
}

#[test]
fn state_on_the_embedded_store_with_etags_scoping_transactions_bulk_and_ttl() {
    let w = world("", "");
    let r = save(
        &w.front,
        r#"[{"key":"k1","value":{"b":1,"a":2}},{"key":"k2","value":"two"}]"#,
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let r = w.front.call("GET", "/v1.0/state/statestore/k1", &[], b"");
    assert_eq!((r.status(), r.text().as_str()), (200, r#"{"b":1,"a":2}"#));
    let etag = r.header("etag").expect("etag").to_string();

    // Keys are per app id: back does not see front's k1.
    assert_eq!(
        w.back
            .call("GET", "/v1.0/state/statestore/k1", &[], b"")
            .status(),
        204
    );

    // First-write with a stale etag loses; the right etag wins.
    let stale = format!(
        r#"[{{"key":"k1","value":3,"etag":"{etag}","options":{{"concurrency":"first-write"}}}}]"#
    );
    assert_eq!(save(&w.front, &stale).status(), 204);
    let r = save(&w.front, &stale);
    assert_eq!(r.status(), 409, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_STATE_SAVE");

    // Two concurrent first-write writers with the same etag: one wins.
    let etag = w
        .front
        .call("GET", "/v1.0/state/statestore/k1", &[], b"")
        .header("etag")
        .unwrap_or("")
        .to_string();
    let body = format!(
        r#"[{{"key":"k1","value":"w","etag":"{etag}","options":{{"concurrency":"first-write"}}}}]"#
    );
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (p, b) = (w.front.path(), body.clone());
            std::thread::spawn(move || {
                runtime_in(&p, "POST", "/v1.0/state/statestore", &[], b.as_bytes())
                    .map(|m| m.status())
            })
        })
        .collect();
    let mut codes: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("writer").expect("request"))
        .collect();
    codes.sort();
    assert_eq!(codes, [204, 409]);

    // Delete with a wrong If-Match: 409, nothing deleted.
    let r = w.front.call(
        "DELETE",
        "/v1.0/state/statestore/k2",
        &[("if-match", "999999")],
        b"",
    );
    assert_eq!(r.status(), 409, "{}", r.text());
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/statestore/k2", &[], b"")
            .text(),
        r#""two""#
    );

    // Bulk get, in order, missing keys without data.
    let r = w.front.call(
        "POST",
        "/v1.0/state/statestore/bulk",
        &[],
        br#"{"keys":["k2","nope","k1"]}"#,
    );
    let v = r.json();
    assert_eq!(v[0]["data"], "two");
    assert_eq!(v[1]["key"], "nope");
    assert!(v[1].get("data").is_none());
    assert_eq!(v[2]["data"], "w");

    // A transaction with one bad etag changes nothing; a good one all.
    let bad = r#"{"operations":[{"operation":"upsert","request":{"key":"t1","value":1}},{"operation":"delete","request":{"key":"k2","etag":"424242","options":{"concurrency":"first-write"}}}]}"#;
    let r = w.front.call(
        "POST",
        "/v1.0/state/statestore/transaction",
        &[],
        bad.as_bytes(),
    );
    assert_eq!(r.status(), 500, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_STATE_TRANSACTION");
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/statestore/t1", &[], b"")
            .status(),
        204
    );
    let good = r#"{"operations":[{"operation":"upsert","request":{"key":"t1","value":1}},{"operation":"delete","request":{"key":"k2"}}]}"#;
    assert_eq!(
        w.front
            .call(
                "POST",
                "/v1.0/state/statestore/transaction",
                &[],
                good.as_bytes()
            )
            .status(),
        204
    );
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/statestore/t1", &[], b"")
            .text(),
        "1"
    );
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/statestore/k2", &[], b"")
            .status(),
        204
    );

    // TTL: gone after it expires.
    assert_eq!(
        save(
            &w.front,
            r#"[{"key":"tmp","value":1,"metadata":{"ttlInSeconds":"1"}}]"#
        )
        .status(),
        204
    );
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/statestore/tmp", &[], b"")
            .status(),
        200
    );
    let start = Instant::now();
    while w
        .front
        .call("GET", "/v1.0/state/statestore/tmp", &[], b"")
        .status()
        != 204
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ttl 1 s: still there after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Errors: unknown store, malformed body, bad ttl.
    let r = w.front.call(
        "POST",
        "/v1.0/state/nostore",
        &[],
        br#"[{"key":"k","value":1}]"#,
    );
    assert_eq!(
        (r.status(), r.json()["errorCode"].as_str()),
        (400, Some("ERR_STATE_STORE_NOT_FOUND"))
    );
    let r = save(&w.front, "{not json");
    assert_eq!(
        (r.status(), r.json()["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
    let r = save(
        &w.front,
        r#"[{"key":"k","value":1,"metadata":{"ttlInSeconds":"soon"}}]"#,
    );
    assert_eq!(r.status(), 400);

    // The demo app keeps its counter through the runtime (invoked by front).
    for want in 1..=3 {
        let r = w
            .front
            .call("POST", "/v1.0/invoke/back/method/count", &[], b"");
        assert_eq!((r.status(), r.text()), (200, want.to_string()));
    }
}

#[test]
fn agent_kill9_loses_no_acknowledged_state_and_inflight_invocations_end_cleanly() {
    let mut w = world("", "");
    let mut acked = Vec::new();
    for i in 0..50 {
        let r = save(&w.front, &format!(r#"[{{"key":"d{i}","value":{i}}}]"#));
        assert_eq!(r.status(), 204);
        acked.push(i);
    }
    // An invocation in flight when the agent dies ends with an error, not
    // a hang.
    let p = w.front.path();
    let inflight = std::thread::spawn(move || {
        let start = Instant::now();
        let r = runtime_in(&p, "GET", "/v1.0/invoke/back/method/slow/5000", &[], b"");
        (r.map(|m| m.status()).ok(), start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    w.agent.kill9();
    let (status, took) = inflight.join().expect("in-flight caller");
    assert!(
        status.is_none() || status != Some(200),
        "in flight across kill -9: {status:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the in-flight call hung for {took:?}"
    );
    w.agent.restart(&w.node.ns);
    w.wait_known();
    for i in acked {
        let r = w
            .front
            .call("GET", &format!("/v1.0/state/statestore/d{i}"), &[], b"");
        assert_eq!(
            (r.status(), r.text()),
            (200, i.to_string()),
            "key d{i} after kill -9"
        );
    }
    let r = w
        .front
        .call("GET", "/v1.0/invoke/back/method/after", &[], b"");
    assert_eq!(r.status(), 200);
}

/// redis-server in the node's namespace (the agent reaches it on its own
/// loopback), killed on drop.
struct NodeRedis {
    child: std::process::Child,
    port: u16,
    _dir: nodeplane_tests::TempDir,
}

impl Drop for NodeRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_redis(node: &Node) -> NodeRedis {
    prereq::require_tool("redis-server", "redis-server");
    let dir = nodeplane_tests::TempDir::new("redis");
    let port = 16379;
    let child = apps::redis_command(&node.ns, port, dir.path())
        .spawn()
        .expect("spawn redis-server");
    let r = NodeRedis {
        child,
        port,
        _dir: dir,
    };
    assert!(
        apps::redis_ready(&node.ns.path(), port, Duration::from_secs(10)),
        "redis-server did not answer PING"
    );
    r
}

#[test]
fn state_on_a_redis_component_hot_loaded_with_app_scoped_keys() {
    let w = world("", "");
    let redis = node_redis(&w.node);
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: cache}}\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - {{name: redisHost, value: \"127.0.0.1:{}\"}}\n",
        redis.port
    );
    std::fs::write(w.agent.manifests.path().join("cache.yaml"), component)
        .expect("write component");
    let start = Instant::now();
    loop {
        let m = w.front.call("GET", "/v1.0/metadata", &[], b"").json();
        let names: Vec<String> = m["components"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        if names.iter().any(|n| n == "cache") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "component cache not loaded: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let save = |p: &Pod, body: &str| {
        p.call("POST", "/v1.0/state/cache", &[], body.as_bytes())
            .status()
    };
    assert_eq!(save(&w.front, r#"[{"key":"k","value":"from-front"}]"#), 204);
    assert_eq!(save(&w.back, r#"[{"key":"k","value":"from-back"}]"#), 204);
    let r = w.front.call("GET", "/v1.0/state/cache/k", &[], b"");
    assert_eq!((r.status(), r.text().as_str()), (200, r#""from-front""#));
    let etag = r.header("etag").expect("etag").to_string();
    assert_eq!(
        w.back.call("GET", "/v1.0/state/cache/k", &[], b"").text(),
        r#""from-back""#
    );
    // Dapr's key layout in Redis: app-id||key.
    let out = w.node.ns.sh(&format!(
        "redis-cli -p {} --raw hget 'front||k' data",
        redis.port
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#""from-front""#
    );
    // Etags and transactions on this engine too.
    let stale = format!(r#"[{{"key":"k","value":1,"etag":"{etag}"}}]"#);
    assert_eq!(save(&w.front, &stale), 204);
    assert_eq!(save(&w.front, &stale), 409);
    let tx = r#"{"operations":[{"operation":"upsert","request":{"key":"a","value":1}},{"operation":"delete","request":{"key":"k","etag":"0"}}]}"#;
    let r = w
        .front
        .call("POST", "/v1.0/state/cache/transaction", &[], tx.as_bytes());
    assert_eq!(r.status(), 500, "{}", r.text());
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/cache/a", &[], b"")
            .status(),
        204
    );
    let r = w.front.call("GET", "/v1.0/healthz/outbound", &[], b"");
    assert_eq!(r.status(), 204);

    // A broken component is reported (naming the field), the others stay.
    let broken = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: broken}\nspec: {type: state.redis, version: v1}\n";
    std::fs::write(w.agent.manifests.path().join("broken.yaml"), broken).expect("write component");
    let start = Instant::now();
    loop {
        let m = w.front.call("GET", "/v1.0/metadata", &[], b"").json();
        let errors = m["extended"]["componentErrors"].to_string();
        if errors.contains("broken") {
            assert!(errors.contains("redisHost"), "{errors}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no error for component broken: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        w.front
            .call("GET", "/v1.0/state/cache/k", &[], b"")
            .status(),
        200
    );
}

/// A cgroup (in the cpu hierarchy) named like a container, removed on drop.
struct FakeContainerCgroup(std::path::PathBuf);

impl Drop for FakeContainerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[test]
fn a_unix_socket_caller_is_the_pod_whose_container_holds_the_process() {
    use nodeplane_proto::agent::{pod_lifecycle::Kind, request::What, PodLifecycle, Request};
    let w = world("", "");
    // A process in a cgroup whose path names container `id`, as runc puts
    // a container's processes; the CRI shim reported `id` as pod
    // shop/front's sandbox.
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xfeed);
    let root = std::path::Path::new("/sys/fs/cgroup/cpu");
    assert!(
        root.join("cgroup.procs").exists(),
        "no cgroup v1 cpu hierarchy at {}",
        root.display()
    );
    let dir = root
        .join(format!("nodeplane-test-{}", std::process::id()))
        .join(&id);
    std::fs::create_dir_all(&dir).expect("create the test cgroup");
    let _cg = FakeContainerCgroup(dir.clone());
    let reply = w.agent.request(Request {
        what: Some(What::Lifecycle(PodLifecycle {
            kind: Kind::SandboxReady as i32,
            pod_namespace: "shop".into(),
            pod_name: "front".into(),
            pod_uid: "uid-front".into(),
            sandbox_id: id.clone(),
            ..Default::default()
        })),
    });
    assert!(reply.error.is_empty(), "lifecycle refused: {}", reply.error);
    let sock = w.agent.state.path().join("runtime").join("runtime.sock");
    let call = |in_cgroup: bool| {
        let script = format!(
            "{}exec {} call GET unix:{}:/v1.0/metadata",
            if in_cgroup {
                format!("echo $$ > {}/cgroup.procs && ", dir.display())
            } else {
                String::new()
            },
            apps::np_app_bin().display(),
            sock.display()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let inside = call(true);
    assert!(inside.starts_with("200 "), "{inside}");
    let v: serde_json::Value = serde_json::from_str(inside[4..].trim()).expect("metadata JSON");
    assert_eq!(v["id"], "front", "{inside}");
    assert_eq!(v["extended"]["caller"], "pod shop/front");
    // The same call from a process in no container is the node's.
    let outside = call(false);
    let v: serde_json::Value = serde_json::from_str(outside[4..].trim()).expect("metadata JSON");
    assert_eq!(
        (v["id"].as_str(), v["extended"]["caller"].as_str()),
        (Some(""), Some("a process of the node"))
    );
}

/// The runtime keeps its connections to an app: many invocations over
/// one kept-alive caller connection reuse a few upstream connections
/// (counted as established TCP connections to the app's port in the
/// node namespace) instead of opening one per request.
#[test]
fn invocations_reuse_pooled_connections_to_the_app() {
    let w = world("", "");
    let path = w.front.path();
    let ok = in_netns(&path, || {
        let s = std::net::TcpStream::connect(RUNTIME).expect("connect");
        let mut c = Conn::new(s);
        (0..300)
            .filter(|_| {
                c.request("POST", "/v1.0/invoke/back/method/p", &[], &[b'x'; 1024])
                    .is_ok_and(|m| m.status() == 200 && m.body.len() == 1024)
            })
            .count()
    });
    assert_eq!(ok, 300);
    // Connections the agent opened to back:8080 (any state: a closed one
    // lingers in TIME-WAIT on the agent's side).
    let out = w.node.ns.sh(&format!(
        "ss -tan 'dst {}:{APP_PORT}' | tail -n +2 | wc -l",
        w.back.ip
    ));
    let n: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(usize::MAX);
    assert!(
        n <= 4,
        "300 sequential invocations used {n} connections to the app"
    );
}

/// A runtime listener that cannot be opened degrades the runtime, never
/// the agent: policy is still programmed, /status names the problem.
#[test]
fn an_unusable_runtime_address_leaves_the_agent_running() {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    // Someone else holds the address the runtime is told to use.
    let busy = "127.0.0.1:3599";
    let _held = in_netns(&node.ns.path(), move || {
        std::net::TcpListener::bind(busy).expect("hold the port")
    });
    let agent = Agent::start(&mut node, &[CIDR], &["--runtime-listen", busy]);
    let st = agent.status();
    assert_eq!(st["programmed"], true, "{st}");
    let problems = st["runtime"]["problems"].to_string();
    assert!(
        problems.contains("no TCP listener") && problems.contains(busy),
        "{st}"
    );
}
