//! Pub/sub through the node app runtime on real pods: np-app publishes
//! through the runtime and, in subscriber pods, answers `/dapr/subscribe`
//! (NP_APP_SUBSCRIBE) and records deliveries (`/deliveries`), answering
//! each as the message asks (SUCCESS, RETRY, DROP, status codes, slow).
//! The embedded broker, a redis-server for `pubsub.redis`, agent kill -9.

use std::time::{Duration, Instant};

use nodeplane_tests::agent::Agent;
use nodeplane_tests::apps::{self, AppPod, NodeNats, NodeRedis};
use nodeplane_tests::fixture::Node;
use nodeplane_tests::http1::Msg;
use nodeplane_tests::{prereq, Netns};
use serde_json::{json, Value};

const CIDR: &str = "10.244.0.0/24";
const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n";

/// A pub/sub with a short retry budget and quick retries, so that the
/// retry and dead-letter paths finish fast.
const FAST: &str = "apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: fast}
spec:
  type: pubsub.embedded
  version: v1
  metadata:
  - {name: maxDeliveryAttempts, value: \"3\"}
  - {name: retryInitialInterval, value: 100ms}
  - {name: retryMaxInterval, value: 200ms}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: scoped}
spec:
  type: pubsub.embedded
  version: v1
  metadata:
  - {name: allowedTopics, value: only}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: private}
spec: {type: pubsub.embedded, version: v1}
scopes: [sub]
---
";

/// A pod of `app` (None: no app id) whose np-app subscribes with `subs`
/// (Dapr's `/dapr/subscribe` JSON; empty: none).
struct Spec<'a> {
    name: &'a str,
    app: Option<&'a str>,
    subs: Value,
}

struct World {
    node: Node,
    agent: Agent,
    pods: Vec<AppPod>,
    names: Vec<String>,
    /// The pods' manifests, for applying changed components.
    cluster: String,
}

fn world(specs: &[Spec<'_>], extra: &str, agent_args: &[&str]) -> World {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    let agent = Agent::start(&mut node, &[CIDR], agent_args);
    let mut cluster = NS.to_string();
    for s in specs {
        cluster.push_str(&apps::pod_yaml("shop", s.name, s.app, "", ""));
    }
    agent.apply(&[
        ("cluster.yaml", cluster.clone()),
        ("extra.yaml", extra.to_string()),
    ]);
    let pods = specs
        .iter()
        .map(|s| {
            let subs = s.subs.to_string();
            if s.subs.is_null() {
                AppPod::add(&node, "shop", s.name)
            } else {
                AppPod::add_with(&node, "shop", s.name, &[("NP_APP_SUBSCRIBE", &subs)])
            }
        })
        .collect();
    let names = specs.iter().map(|s| s.name.to_string()).collect();
    let w = World {
        node,
        agent,
        pods,
        names,
        cluster,
    };
    w.wait_known(specs);
    w
}

impl World {
    fn pod(&self, name: &str) -> &AppPod {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        &self.pods[i]
    }

    /// Until the runtime knows every pod by its address.
    fn wait_known(&self, specs: &[Spec<'_>]) {
        let start = Instant::now();
        for (s, p) in specs.iter().zip(&self.pods) {
            loop {
                let m = p.call("GET", "/v1.0/metadata", &[], b"");
                if m.json()["extended"]["caller"] == format!("pod shop/{}", s.name) {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "the runtime did not learn pod {}: {}; agent log:\n{}",
                    s.name,
                    m.text(),
                    self.agent.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Until `pod`'s metadata lists `n` subscriptions joined at the
    /// broker; returns them.
    fn wait_subscribed(&self, pod: &str, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let m = self.pod(pod).call("GET", "/v1.0/metadata", &[], b"");
            let subs = m.json()["subscriptions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if subs.len() == n {
                return subs;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "pod {pod} has not {n} subscriptions: {}; agent log:\n{}",
                m.text(),
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn publish(p: &AppPod, path: &str, ctype: &str, body: &[u8]) -> Msg {
    p.call("POST", path, &[("content-type", ctype)], body)
}

fn publish_ok(p: &AppPod, pubsub: &str, topic: &str, msg: Value) {
    let r = publish(
        p,
        &format!("/v1.0/publish/{pubsub}/{topic}"),
        "application/json",
        msg.to_string().as_bytes(),
    );
    assert_eq!(r.status(), 204, "publish to {pubsub}/{topic}: {}", r.text());
}

/// Waits until `pred` holds for `p`'s deliveries; returns them.
fn wait_deliveries(
    w: &World,
    p: &AppPod,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let d = p.deliveries();
        if pred(&d) {
            return d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: deliveries to {} are {d:#?}; agent log:\n{}",
            p.ns.name,
            w.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn of<'a>(d: &'a [Value], path: &str, key: &str) -> Vec<&'a Value> {
    d.iter()
        .filter(|v| v["path"] == path && v["key"] == key)
        .collect()
}

/// `r` is a Dapr error answer with this status and error code.
fn assert_error(r: &Msg, status: u16, code: &str) {
    assert_eq!(
        (r.status(), r.json()["errorCode"].clone()),
        (status, json!(code)),
        "{}",
        r.text()
    );
}

fn body_json(v: &Value) -> Value {
    serde_json::from_str(v["body"].as_str().unwrap_or("")).unwrap_or(Value::Null)
}

#[test]
fn publish_delivers_cloudevents_to_programmatic_and_declarative_subscribers() {
    let subs = json!([
        {"pubsubname": "fast", "topic": "orders", "route": "/sub/orders"},
        {"pubsubname": "fast", "topic": "raw", "route": "/sub/raw", "metadata": {"rawPayload": "true"}},
    ]);
    let declared = "apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata: {name: dec-orders}
spec:
  pubsubname: fast
  topic: orders
  routes:
    rules:
    - {match: 'event.type == \"com.dapr.event.sent\"', path: /sub/typed}
    default: /sub/dec
scopes: [dec]
---
apiVersion: dapr.io/v1alpha1
kind: Subscription
metadata: {name: dec-old}
spec: {pubsubname: fast, topic: legacy, route: /sub/legacy}
scopes: [dec]
---
";
    let w = world(
        &[
            Spec {
                name: "pub",
                app: Some("pub"),
                subs: Value::Null,
            },
            Spec {
                name: "sub",
                app: Some("sub"),
                subs,
            },
            Spec {
                name: "dec",
                app: Some("dec"),
                subs: Value::Null,
            },
            Spec {
                name: "anon",
                app: None,
                subs: Value::Null,
            },
        ],
        &format!("{FAST}{declared}"),
        &[],
    );
    let got = w.wait_subscribed("sub", 2);
    assert!(got.iter().all(|s| s["type"] == "PROGRAMMATIC"), "{got:?}");
    let got = w.wait_subscribed("dec", 2);
    assert!(got.iter().all(|s| s["type"] == "DECLARATIVE"), "{got:?}");
    let orders = got
        .iter()
        .find(|s| s["topic"] == "orders")
        .expect("dec's orders subscription");
    assert_eq!(
        orders["rules"],
        json!([
            {"match": "event.type == \"com.dapr.event.sent\"", "path": "/sub/typed"},
            {"match": "", "path": "/sub/dec"},
        ]),
        "{orders}"
    );
    let (publisher, sub, dec) = (w.pod("pub"), w.pod("sub"), w.pod("dec"));

    // Metadata lists the default and the configured pub/subs.
    let m = publisher.call("GET", "/v1.0/metadata", &[], b"").json();
    let names: Vec<&str> = m["components"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"].as_str().unwrap_or("").starts_with("pubsub."))
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["fast", "pubsub", "scoped"], "{m}");

    // JSON: a CloudEvent with the data as JSON, to both apps.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = publisher.call(
        "POST",
        "/v1.0/publish/fast/orders",
        &[("content-type", "application/json"), ("traceparent", tp)],
        br#"{"key":"o1","n":1}"#,
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let d = wait_deliveries(&w, sub, "o1 to sub", |d| {
        !of(d, "/sub/orders", "o1").is_empty()
    });
    let first = of(&d, "/sub/orders", "o1")[0];
    assert_eq!(first["contentType"], "application/cloudevents+json");
    let ev = body_json(first);
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["type"], "com.dapr.event.sent");
    assert_eq!(ev["source"], "pub");
    assert_eq!(ev["topic"], "orders");
    assert_eq!(ev["pubsubname"], "fast");
    assert_eq!(ev["datacontenttype"], "application/json");
    assert_eq!(ev["data"], json!({"key": "o1", "n": 1}));
    assert_eq!(ev["id"].as_str().map(str::len), Some(36), "{ev}");
    assert!(
        ev["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")),
        "{ev}"
    );
    // The declarative subscriber's rule matched the type.
    wait_deliveries(&w, dec, "o1 to dec", |d| {
        of(d, "/sub/typed", "o1").len() == 1
    });

    // A CloudEvent the app sent keeps its type: the rule does not match,
    // the default route takes it.
    let ce = json!({"specversion": "1.0", "id": "ce-1", "type": "shop.custom", "source": "x",
                    "datacontenttype": "application/json", "data": {"key": "c1"}});
    let r = publish(
        publisher,
        "/v1.0/publish/fast/orders",
        "application/cloudevents+json",
        ce.to_string().as_bytes(),
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let d = wait_deliveries(&w, dec, "c1 to dec", |d| of(d, "/sub/dec", "c1").len() == 1);
    let ev = body_json(of(&d, "/sub/dec", "c1")[0]);
    assert_eq!(
        (ev["id"].clone(), ev["type"].clone()),
        (json!("ce-1"), json!("shop.custom"))
    );

    // v1alpha1 Subscription with a single route.
    publish_ok(publisher, "fast", "legacy", json!({"key": "l1"}));
    wait_deliveries(&w, dec, "l1 to dec", |d| {
        of(d, "/sub/legacy", "l1").len() == 1
    });

    // Text: data as a string; binary: data_base64.
    let r = publish(
        publisher,
        "/v1.0/publish/fast/orders",
        "text/plain",
        b"hello",
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let r = publish(
        publisher,
        "/v1.0/publish/fast/orders",
        "application/octet-stream",
        &[0, 1, 2, 255],
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let d = wait_deliveries(&w, sub, "text and binary", |d| {
        of(d, "/sub/orders", "").len() == 2
    });
    let evs: Vec<Value> = of(&d, "/sub/orders", "")
        .into_iter()
        .map(body_json)
        .collect();
    assert!(
        evs.iter()
            .any(|e| e["data"] == "hello" && e["datacontenttype"] == "text/plain"),
        "{evs:?}"
    );
    assert!(
        evs.iter().any(|e| e["data_base64"] == "AAEC/w=="),
        "{evs:?}"
    );

    // Raw payload: the exact bytes to a raw subscriber; wrapped in a
    // CloudEvent for one that takes CloudEvents.
    let raw = br#"{"key":"r1","x":[1,2]}"#;
    let r = publish(
        publisher,
        "/v1.0/publish/fast/raw?metadata.rawPayload=true",
        "application/json",
        raw,
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let d = wait_deliveries(&w, sub, "raw", |d| of(d, "/sub/raw", "r1").len() == 1);
    let got = of(&d, "/sub/raw", "r1")[0];
    assert_eq!(got["body"].as_str().map(str::as_bytes), Some(&raw[..]));
    assert_eq!(got["contentType"], "application/json");
    let r = publish(
        publisher,
        "/v1.0/publish/fast/orders?metadata.rawPayload=true",
        "application/json",
        br#"{"key":"r2"}"#,
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let d = wait_deliveries(&w, sub, "raw wrapped", |d| {
        of(d, "/sub/orders", "r2").len() == 1
    });
    let ev = body_json(of(&d, "/sub/orders", "r2")[0]);
    assert_eq!(ev["data"]["key"], "r2", "{ev}");

    // Bulk publish (alpha API): every entry, JSON or CloudEvent.
    let entries = json!([
        {"entryId": "1", "event": {"key": "bulk1"}, "contentType": "application/json"},
        {"entryId": "2", "event": {"key": "bulk2"}, "contentType": "application/json",
         "metadata": {"x": "y"}},
        {"entryId": "3", "contentType": "application/cloudevents+json",
         "event": {"specversion": "1.0", "id": "bulk-ce", "type": "shop.bulk", "source": "s",
                   "datacontenttype": "application/json", "data": {"key": "bulk3"}}},
    ]);
    let r = publish(
        publisher,
        "/v1.0-alpha1/publish/bulk/fast/orders",
        "application/json",
        entries.to_string().as_bytes(),
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    wait_deliveries(&w, sub, "bulk to sub", |d| {
        ["bulk1", "bulk2", "bulk3"]
            .iter()
            .all(|k| of(d, "/sub/orders", k).len() == 1)
    });
    wait_deliveries(&w, dec, "bulk to dec", |d| {
        of(d, "/sub/typed", "bulk1").len() == 1
            && of(d, "/sub/typed", "bulk2").len() == 1
            && of(d, "/sub/dec", "bulk3").len() == 1
    });
    let dup = json!([{"entryId": "1", "event": 1}, {"entryId": "1", "event": 2}]);
    let r = publish(
        publisher,
        "/v1.0-alpha1/publish/bulk/fast/orders",
        "application/json",
        dup.to_string().as_bytes(),
    );
    assert_error(&r, 400, "ERR_PUBSUB_EVENTS_SER");

    // Errors with Dapr's codes and statuses.
    let r = publish(
        publisher,
        "/v1.0/publish/nope/orders",
        "application/json",
        b"{}",
    );
    assert_error(&r, 400, "ERR_PUBSUB_NOT_FOUND");
    // A component scoped to other apps is not there for this one.
    let r = publish(
        publisher,
        "/v1.0/publish/private/orders",
        "application/json",
        b"{}",
    );
    assert_error(&r, 400, "ERR_PUBSUB_NOT_FOUND");
    let r = publish(
        publisher,
        "/v1.0/publish/scoped/other",
        "application/json",
        b"{}",
    );
    assert_error(&r, 403, "ERR_PUBSUB_FORBIDDEN");
    let r = publish(
        publisher,
        "/v1.0/publish/scoped/only",
        "application/json",
        b"{}",
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let r = publish(publisher, "/v1.0/publish/fast/", "application/json", b"{}");
    assert_error(&r, 404, "ERR_TOPIC_EMPTY");
    // A pod without an app id may not publish.
    let r = publish(
        w.pod("anon"),
        "/v1.0/publish/fast/orders",
        "application/json",
        b"{}",
    );
    assert_error(&r, 403, "ERR_PERMISSION_DENIED");
    assert!(r.text().contains("dapr.io/app-id"), "{}", r.text());

    // Nothing was delivered twice.
    for p in [sub, dec] {
        for v in p.deliveries().iter().filter(|v| v["key"] != "") {
            assert_eq!(v["n"], 1, "{v}");
        }
    }
}

#[test]
fn retry_drop_and_dead_letter_follow_the_apps_answers() {
    let subs = json!([
        {"pubsubname": "fast", "topic": "work", "route": "/sub/work", "deadLetterTopic": "dead"},
        {"pubsubname": "fast", "topic": "dead", "route": "/sub/ok/dead"},
        {"pubsubname": "fast", "topic": "nodl", "route": "/sub/nodl"},
    ]);
    let w = world(
        &[
            Spec {
                name: "pub",
                app: Some("pub"),
                subs: Value::Null,
            },
            Spec {
                name: "sub",
                app: Some("sub"),
                subs,
            },
        ],
        FAST,
        &[],
    );
    w.wait_subscribed("sub", 3);
    let (publisher, sub) = (w.pod("pub"), w.pod("sub"));
    let cases = [
        ("retry-once", json!(["RETRY", "SUCCESS"])),
        ("retry-500", json!(["500", "empty"])),
        ("drop", json!(["DROP"])),
        ("gone", json!(["404"])),
        ("always-retry", json!(["RETRY"])),
        ("always-500", json!(["500"])),
    ];
    for (k, a) in &cases {
        publish_ok(publisher, "fast", "work", json!({"key": k, "answer": a}));
    }
    publish_ok(
        publisher,
        "fast",
        "nodl",
        json!({"key": "lost", "answer": ["RETRY"]}),
    );
    // Settled once the dead letters are in and the budget is spent
    // everywhere.
    wait_deliveries(&w, sub, "dead letters", |d| {
        ["drop", "gone", "always-retry", "always-500"]
            .iter()
            .all(|k| of(d, "/sub/ok/dead", k).len() == 1)
            && of(d, "/sub/nodl", "lost").len() == 3
            && of(d, "/sub/work", "retry-once").len() == 2
            && of(d, "/sub/work", "retry-500").len() == 2
    });
    // Whatever could still come would come within a few retry intervals
    // (100-200 ms): wait well past them before counting.
    std::thread::sleep(Duration::from_secs(2));
    let d = sub.deliveries();
    let count = |path, k| of(&d, path, k).len();
    // RETRY (or 500) then success: delivered twice, attempt 2 taken.
    assert_eq!(count("/sub/work", "retry-once"), 2, "{d:#?}");
    assert_eq!(count("/sub/work", "retry-500"), 2, "{d:#?}");
    // DROP and 404: once, forwarded to the dead-letter topic.
    assert_eq!(count("/sub/work", "drop"), 1, "{d:#?}");
    assert_eq!(count("/sub/work", "gone"), 1, "{d:#?}");
    // The retry budget (3 deliveries), then the dead-letter topic.
    assert_eq!(count("/sub/work", "always-retry"), 3, "{d:#?}");
    assert_eq!(count("/sub/work", "always-500"), 3, "{d:#?}");
    for k in ["drop", "gone", "always-retry", "always-500"] {
        assert_eq!(count("/sub/ok/dead", k), 1, "{k}: {d:#?}");
    }
    for k in ["retry-once", "retry-500"] {
        assert_eq!(count("/sub/ok/dead", k), 0, "{k}: {d:#?}");
    }
    // Without a dead-letter topic the budget ends it.
    assert_eq!(count("/sub/nodl", "lost"), 3, "{d:#?}");
    // The dead letter is the original CloudEvent.
    let dl = body_json(of(&d, "/sub/ok/dead", "drop")[0]);
    assert_eq!(
        (dl["topic"].clone(), dl["source"].clone()),
        (json!("work"), json!("pub")),
        "{dl}"
    );
    // The agent's metrics count the publishes and every delivery's outcome.
    let m = w.agent.get("/metrics").map(|(_, b)| b).unwrap_or_default();
    for line in [
        r#"nodeplane_runtime_pubsub_published_total{app="pub",pubsub="fast",topic="work",status="204"} 6"#,
        r#"nodeplane_runtime_pubsub_deliveries_total{app="sub",pubsub="fast",topic="work",outcome="success"} 2"#,
        r#"nodeplane_runtime_pubsub_deliveries_total{app="sub",pubsub="fast",topic="work",outcome="retry"} 8"#,
        r#"nodeplane_runtime_pubsub_deliveries_total{app="sub",pubsub="fast",topic="work",outcome="drop"} 2"#,
        r#"nodeplane_runtime_pubsub_delivery_duration_seconds_count{app="sub",pubsub="fast",topic="work"} 12"#,
    ] {
        assert!(m.contains(line), "{line} not in the metrics:\n{m}");
    }
}

#[test]
fn pods_of_one_app_id_share_its_messages_each_message_once_per_app() {
    let subs = json!([{"pubsubname": "pubsub", "topic": "fan", "route": "/sub/fan"}]);
    let w = world(
        &[
            Spec {
                name: "pub",
                app: Some("pub"),
                subs: Value::Null,
            },
            Spec {
                name: "pair1",
                app: Some("pair"),
                subs: subs.clone(),
            },
            Spec {
                name: "pair2",
                app: Some("pair"),
                subs: subs.clone(),
            },
            Spec {
                name: "solo",
                app: Some("solo"),
                subs,
            },
        ],
        "",
        &[],
    );
    for p in ["pair1", "pair2", "solo"] {
        w.wait_subscribed(p, 1);
    }
    let n = 20;
    for i in 0..n {
        publish_ok(
            w.pod("pub"),
            "pubsub",
            "fan",
            json!({"key": format!("m{i}")}),
        );
    }
    let keys = |d: &[Value]| -> Vec<String> {
        let mut k: Vec<String> = d
            .iter()
            .filter_map(|v| v["key"].as_str().map(str::to_string))
            .collect();
        k.sort();
        k
    };
    let solo = wait_deliveries(&w, w.pod("solo"), "solo gets all", |d| d.len() == n);
    let start = Instant::now();
    let (a, b) = loop {
        let (a, b) = (w.pod("pair1").deliveries(), w.pod("pair2").deliveries());
        if a.len() + b.len() >= n {
            break (a, b);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pair: {a:?} {b:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let (a2, b2) = (w.pod("pair1").deliveries(), w.pod("pair2").deliveries());
    assert_eq!(
        (a2.len(), b2.len()),
        (a.len(), b.len()),
        "more deliveries came"
    );
    let mut all = keys(&a);
    all.extend(keys(&b));
    all.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(all, want, "each message once to the app");
    assert_eq!(keys(&solo), want, "and once to the other app");
    // Round robin over the node's pods of the app: an even share.
    assert!(
        a.len().abs_diff(b.len()) <= 2,
        "both pods of the app get a share: {} / {}",
        a.len(),
        b.len()
    );
}

#[test]
fn agent_kill9_between_accept_and_delivery_loses_no_message() {
    // `patient`: retries for a long time, so a subscriber that is down
    // only delays its messages.
    let patient = "apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: patient}
spec:
  type: pubsub.embedded
  version: v1
  metadata:
  - {name: maxDeliveryAttempts, value: \"1000\"}
  - {name: retryInitialInterval, value: 100ms}
  - {name: retryMaxInterval, value: 500ms}
---
";
    let subs = json!([
        {"pubsubname": "patient", "topic": "slow", "route": "/sub/slow"},
        {"pubsubname": "patient", "topic": "later", "route": "/sub/later"},
    ]);
    let mut w = world(
        &[
            Spec {
                name: "pub",
                app: Some("pub"),
                subs: Value::Null,
            },
            Spec {
                name: "sub",
                app: Some("sub"),
                subs,
            },
        ],
        patient,
        &[],
    );
    w.wait_subscribed("sub", 2);
    // 1. The app is taking the delivery (slowly) when the agent dies.
    publish_ok(
        w.pod("pub"),
        "patient",
        "slow",
        json!({"key": "s1", "answer": ["slow:60000", "SUCCESS"]}),
    );
    wait_deliveries(&w, w.pod("sub"), "s1 in the app", |d| {
        of(d, "/sub/slow", "s1").len() == 1
    });
    w.agent.kill9();
    w.agent.restart(&w.node.ns);
    let d = wait_deliveries(&w, w.pod("sub"), "s1 again after the restart", |d| {
        of(d, "/sub/slow", "s1").len() == 2
    });
    assert_eq!(of(&d, "/sub/slow", "s1")[1]["n"], 2);

    // 2. Accepted while the app is down, then the agent dies: delivered
    // once the app is back, after the restart.
    w.pods[1].stop_app();
    for i in 0..10 {
        publish_ok(
            w.pod("pub"),
            "patient",
            "later",
            json!({"key": format!("l{i}")}),
        );
    }
    w.agent.kill9();
    w.pods[1].start_app();
    w.agent.restart(&w.node.ns);
    wait_deliveries(&w, w.pod("sub"), "every accepted message", |d| {
        (0..10).all(|i| !of(d, "/sub/later", &format!("l{i}")).is_empty())
    });
}

/// A shared broker on the node: `bus` of `kind` with `metadata` (YAML
/// list entries, each `{name: .., value: ..}`), the runtime's retry keys
/// added.
fn bus_component(kind: &str, metadata: &[String]) -> String {
    let mut m = metadata.to_vec();
    m.extend(
        [
            "{name: maxDeliveryAttempts, value: \"5\"}",
            "{name: retryInitialInterval, value: 100ms}",
            "{name: retryMaxInterval, value: 200ms}",
        ]
        .map(str::to_string),
    );
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: bus}}\nspec:\n  type: {kind}\n  version: v1\n  metadata:\n{}",
        m.iter().map(|e| format!("  - {e}\n")).collect::<String>()
    )
}

#[test]
fn redis_streams_broker_delivers_retries_and_keeps_messages_across_a_restart() {
    prereq::require_root();
    let node = Node::new(&[CIDR]);
    let redis = NodeRedis::start(&node.ns, 16380);
    let bus = bus_component(
        "pubsub.redis",
        &[
            format!("{{name: redisHost, value: \"127.0.0.1:{}\"}}", redis.port),
            "{name: redeliverInterval, value: 200ms}".into(),
            "{name: processingTimeout, value: 2s}".into(),
        ],
    );
    shared_broker_delivers_retries_and_survives_a_kill9(node, bus);
    drop(redis);
}

#[test]
fn jetstream_broker_delivers_retries_and_keeps_messages_across_a_restart() {
    prereq::require_root();
    let node = Node::new(&[CIDR]);
    let nats = NodeNats::start(&node.ns, 14222);
    let bus = bus_component(
        "pubsub.jetstream",
        &[
            format!(
                "{{name: natsURL, value: \"nats://127.0.0.1:{}\"}}",
                nats.port
            ),
            "{name: ackWait, value: 2s}".into(),
        ],
    );
    shared_broker_delivers_retries_and_survives_a_kill9(node, bus);
    drop(nats);
}

/// Delivery, RETRY then SUCCESS, and messages accepted while the app is
/// down kept across an agent kill -9, on the `bus` component.
fn shared_broker_delivers_retries_and_survives_a_kill9(mut node: Node, bus: String) {
    let subs = json!([{"pubsubname": "bus", "topic": "rtopic", "route": "/sub/r"}]);
    let agent = Agent::start(&mut node, &[CIDR], &[]);
    let specs = [
        Spec {
            name: "pub",
            app: Some("pub"),
            subs: Value::Null,
        },
        Spec {
            name: "sub",
            app: Some("sub"),
            subs: subs.clone(),
        },
    ];
    let mut cluster = NS.to_string();
    for s in &specs {
        cluster.push_str(&apps::pod_yaml("shop", s.name, s.app, "", ""));
    }
    agent.apply(&[("cluster.yaml", cluster), ("bus.yaml", bus)]);
    let pods = vec![
        AppPod::add(&node, "shop", "pub"),
        AppPod::add_with(
            &node,
            "shop",
            "sub",
            &[("NP_APP_SUBSCRIBE", &subs.to_string())],
        ),
    ];
    let mut w = World {
        node,
        agent,
        pods,
        names: vec!["pub".into(), "sub".into()],
        cluster: String::new(),
    };
    w.wait_known(&specs);
    w.wait_subscribed("sub", 1);
    for i in 0..5 {
        publish_ok(
            w.pod("pub"),
            "bus",
            "rtopic",
            json!({"key": format!("k{i}")}),
        );
    }
    publish_ok(
        w.pod("pub"),
        "bus",
        "rtopic",
        json!({"key": "again", "answer": ["RETRY", "SUCCESS"]}),
    );
    let d = wait_deliveries(&w, w.pod("sub"), "redis deliveries", |d| {
        (0..5).all(|i| of(d, "/sub/r", &format!("k{i}")).len() == 1)
            && of(d, "/sub/r", "again").len() == 2
    });
    assert_eq!(body_json(of(&d, "/sub/r", "k0")[0])["pubsubname"], "bus");
    // The stream keeps what the agent accepted while the app was down,
    // across an agent kill -9.
    w.pods[1].stop_app();
    for i in 0..5 {
        publish_ok(
            w.pod("pub"),
            "bus",
            "rtopic",
            json!({"key": format!("d{i}")}),
        );
    }
    w.agent.kill9();
    w.pods[1].start_app();
    w.agent.restart(&w.node.ns);
    wait_deliveries(&w, w.pod("sub"), "accepted before the crash", |d| {
        (0..5).all(|i| !of(d, "/sub/r", &format!("d{i}")).is_empty())
    });
}

/// Joins two node namespaces with veths to a bridge in a third (as in
/// app_runtime_nodes.rs).
fn underlay(n1: &Netns, n2: &Netns, addrs: [&str; 2]) -> Netns {
    let u = Netns::new("npu");
    u.ip(&["link", "add", "br0", "type", "bridge"]);
    u.ip(&["link", "set", "br0", "up"]);
    for (i, (n, addr)) in [(n1, addrs[0]), (n2, addrs[1])].into_iter().enumerate() {
        let (a, b) = (format!("u{i}"), format!("eth-u{i}"));
        u.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        u.ip(&["link", "set", &b, "netns", &n.path().display().to_string()]);
        u.ip(&["link", "set", &a, "master", "br0", "up"]);
        n.ip(&["addr", "add", &format!("{addr}/24"), "dev", &b]);
        n.ip(&["link", "set", &b, "up"]);
    }
    u
}

#[test]
fn pods_of_one_app_on_two_nodes_compete_through_a_shared_redis() {
    prereq::require_root();
    const CIDR1: &str = "10.244.1.0/24";
    const CIDR2: &str = "10.244.2.0/24";
    const U1: &str = "192.168.78.1";
    const U2: &str = "192.168.78.2";
    let mut node1 = Node::new(&[CIDR1]);
    let mut node2 = Node::new(&[CIDR2]);
    let _u = underlay(&node1.ns, &node2.ns, [U1, U2]);
    // One redis for both nodes, on node 1's underlay address.
    let redis = NodeRedis::start_on(&node1.ns, U1, 16382);
    let agent1 = Agent::start(&mut node1, &[CIDR1], &["--node-name", "node1"]);
    let agent2 = Agent::start(&mut node2, &[CIDR2], &["--node-name", "node2"]);
    let subs = json!([{"pubsubname": "bus", "topic": "jobs", "route": "/sub/jobs"}]);
    let env = [("NP_APP_SUBSCRIBE", subs.to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let publisher = AppPod::add(&node1, "shop", "pub");
    let w1 = AppPod::add_with(&node1, "shop", "w1", &env);
    let w2 = AppPod::add_with(&node2, "shop", "w2", &env);
    // Another app on node 2: it gets every message.
    let audit = AppPod::add_with(&node2, "shop", "audit", &env);
    let status = |node: &str, host: &str, ip: &str| {
        format!("spec: {{nodeName: {node}, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, hostIP: {host}, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n")
    };
    let cluster = format!(
        "{NS}{}{}{}{}",
        apps::pod_yaml(
            "shop",
            "audit",
            Some("audit"),
            "",
            &status("node2", U2, &audit.ip)
        ),
        apps::pod_yaml(
            "shop",
            "pub",
            Some("pub"),
            "",
            &status("node1", U1, &publisher.ip)
        ),
        apps::pod_yaml(
            "shop",
            "w1",
            Some("workers"),
            "",
            &status("node1", U1, &w1.ip)
        ),
        apps::pod_yaml(
            "shop",
            "w2",
            Some("workers"),
            "",
            &status("node2", U2, &w2.ip)
        ),
    );
    let bus = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: bus}}\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n  - {{name: redisHost, value: \"{U1}:{}\"}}\n  - {{name: queueDepth, value: \"1\"}}\n",
        redis.port
    );
    agent1.apply(&[("cluster.yaml", cluster.clone()), ("bus.yaml", bus.clone())]);
    agent2.apply(&[("cluster.yaml", cluster), ("bus.yaml", bus)]);
    let start = Instant::now();
    for (p, agent) in [(&w1, &agent1), (&w2, &agent2), (&audit, &agent2)] {
        loop {
            let m = p.call("GET", "/v1.0/metadata", &[], b"").json();
            if m["subscriptions"].as_array().is_some_and(|s| s.len() == 1) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} not subscribed: {m}; agent log:\n{}",
                p.ns.name,
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let n = 40;
    let start = Instant::now();
    for i in 0..n {
        loop {
            let r = publish(
                &publisher,
                "/v1.0/publish/bus/jobs",
                "application/json",
                json!({"key": format!("j{i}")}).to_string().as_bytes(),
            );
            if r.status() == 204 {
                break;
            }
            // The publisher's pod may not be known yet right after apply.
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "publish: {}",
                r.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let start = Instant::now();
    let (a, b) = loop {
        let (a, b) = (w1.deliveries(), w2.deliveries());
        if a.len() + b.len() >= n {
            break (a, b);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} + {} of {n} delivered; agent 1 log:\n{}\nagent 2 log:\n{}",
            a.len(),
            b.len(),
            agent1.log_text(),
            agent2.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let (a2, b2) = (w1.deliveries(), w2.deliveries());
    assert_eq!(
        (a2.len(), b2.len()),
        (a.len(), b.len()),
        "more deliveries came"
    );
    let mut keys: Vec<String> = a
        .iter()
        .chain(&b)
        .filter_map(|v| v["key"].as_str().map(str::to_string))
        .collect();
    keys.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("j{i}")).collect();
    want.sort();
    assert_eq!(
        keys, want,
        "each message once to the app, across both nodes"
    );
    let start = Instant::now();
    let audited = loop {
        let d = audit.deliveries();
        if d.len() >= n {
            break d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "audit got {} of {n}",
            d.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut audited: Vec<String> = audited
        .iter()
        .filter_map(|v| v["key"].as_str().map(str::to_string))
        .collect();
    audited.sort();
    assert_eq!(audited, want, "every message to the other app on node 2");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both nodes' pods get some: {} on node 1, {} on node 2",
        a.len(),
        b.len()
    );
    drop((agent1, agent2, redis));
}

#[test]
fn a_changed_component_is_reopened_and_a_removed_subscription_or_pod_stops_delivery() {
    let subs = json!([{"pubsubname": "fast", "topic": "a", "route": "/sub/a"}]);
    let declared = "apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata: {name: dsub}
spec: {pubsubname: fast, topic: b, routes: {default: /sub/b}}
scopes: [dec]
---
";
    let w = world(
        &[
            Spec {
                name: "pub",
                app: Some("pub"),
                subs: Value::Null,
            },
            Spec {
                name: "sub",
                app: Some("sub"),
                subs,
            },
            Spec {
                name: "dec",
                app: Some("dec"),
                subs: Value::Null,
            },
        ],
        &format!("{FAST}{declared}"),
        &[],
    );
    w.wait_subscribed("sub", 1);
    w.wait_subscribed("dec", 1);
    publish_ok(w.pod("pub"), "fast", "a", json!({"key": "a1"}));
    publish_ok(w.pod("pub"), "fast", "b", json!({"key": "b1"}));
    wait_deliveries(&w, w.pod("sub"), "a1", |d| of(d, "/sub/a", "a1").len() == 1);
    wait_deliveries(&w, w.pod("dec"), "b1", |d| of(d, "/sub/b", "b1").len() == 1);

    // `fast` changes (the embedded log is reopened, its groups kept) and
    // the declarative subscription goes.
    let changed = FAST.replace("value: \"3\"", "value: \"4\"");
    assert_ne!(changed, FAST);
    w.agent
        .apply(&[("cluster.yaml", w.cluster.clone()), ("extra.yaml", changed)]);
    w.wait_subscribed("dec", 0);
    let start = Instant::now();
    loop {
        let r = publish(
            w.pod("pub"),
            "/v1.0/publish/fast/a",
            "application/json",
            br#"{"key":"a2"}"#,
        );
        if r.status() == 204 {
            break;
        }
        // While the changed component is being reopened it is not found.
        assert_eq!(
            r.json()["errorCode"],
            "ERR_PUBSUB_NOT_FOUND",
            "{}",
            r.text()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fast not reopened: {}; agent log:\n{}",
            r.text(),
            w.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_deliveries(&w, w.pod("sub"), "a2 after the reopen", |d| {
        of(d, "/sub/a", "a2").len() == 1
    });
    publish_ok(w.pod("pub"), "fast", "b", json!({"key": "b2"}));
    // The app that no longer subscribes gets nothing: wait well past a
    // delivery (a2 took milliseconds) before looking.
    std::thread::sleep(Duration::from_secs(1));
    let d = w.pod("dec").deliveries();
    assert!(of(&d, "/sub/b", "b2").is_empty(), "{d:#?}");
    assert_eq!(of(&w.pod("sub").deliveries(), "/sub/a", "a1").len(), 1);

    // The app's last pod goes from the cluster: its subscription stops.
    // The group stays at the broker, so what is published meanwhile
    // reaches the app when a pod of it is back.
    let without_sub: String = w
        .cluster
        .split_inclusive("---\n")
        .filter(|d| !d.contains("name: sub,"))
        .collect();
    assert_ne!(without_sub, w.cluster);
    let changed = FAST.replace("value: \"3\"", "value: \"4\"");
    w.agent.apply(&[
        ("cluster.yaml", without_sub),
        ("extra.yaml", changed.clone()),
    ]);
    let start = Instant::now();
    while w.pod("sub").call("GET", "/v1.0/metadata", &[], b"").json()["extended"]["caller"]
        == "pod shop/sub"
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "pod sub still known"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    publish_ok(w.pod("pub"), "fast", "a", json!({"key": "a3"}));
    std::thread::sleep(Duration::from_secs(1));
    let d = w.pod("sub").deliveries();
    assert!(
        of(&d, "/sub/a", "a3").is_empty(),
        "delivered to a pod that is gone: {d:#?}"
    );
    w.agent
        .apply(&[("cluster.yaml", w.cluster.clone()), ("extra.yaml", changed)]);
    wait_deliveries(&w, w.pod("sub"), "a3 once the pod is back", |d| {
        of(d, "/sub/a", "a3").len() == 1
    });
}
