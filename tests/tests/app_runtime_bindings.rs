//! Bindings through the node app runtime on real pods:
//! `bindings.http` against another np-app pod (which echoes what it got),
//! `bindings.redis` against a real redis-server, and `bindings.cron`
//! firing to the apps its scopes name (np-app records `POST /cron/...`
//! in `/deliveries`), with a failed firing retried and schedules started
//! and stopped as components change.

use std::time::{Duration, Instant};

use nodeplane_tests::agent::Agent;
use nodeplane_tests::apps::{self, AppPod, NodeRedis, APP_PORT};
use nodeplane_tests::fixture::Node;
use nodeplane_tests::http1::Msg;
use nodeplane_tests::prereq;
use serde_json::{json, Value};

const CIDR: &str = "10.244.0.0/24";
const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n";

struct World {
    node: Node,
    agent: Agent,
    pods: Vec<(String, AppPod)>,
    cluster: String,
}

/// A node with an agent and one np-app pod per (name, app id) in
/// namespace `shop`; components come later ([`World::components`]), once
/// the pods' addresses are known.
fn world(pods: &[(&str, &str)]) -> World {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    let agent = Agent::start(&mut node, &[CIDR], &[]);
    let mut cluster = NS.to_string();
    for (name, app) in pods {
        cluster.push_str(&apps::pod_yaml("shop", name, Some(app), "", ""));
    }
    agent.apply(&[("cluster.yaml", cluster.clone())]);
    let pods = pods
        .iter()
        .map(|(name, _)| (name.to_string(), AppPod::add(&node, "shop", name)))
        .collect();
    let w = World {
        node,
        agent,
        pods,
        cluster,
    };
    for (name, p) in &w.pods {
        p.wait_known("shop", name, Duration::from_secs(20), || w.agent.log_text());
    }
    w
}

impl World {
    fn pod(&self, name: &str) -> &AppPod {
        &self
            .pods
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
            .1
    }

    /// Puts `components` in force, with the pods' manifests.
    fn components(&self, components: &str) {
        self.agent.apply(&[
            ("cluster.yaml", self.cluster.clone()),
            ("components.yaml", components.to_string()),
        ]);
    }

    /// Until `pod` sees a component `name` in its metadata.
    fn wait_component(&self, pod: &str, name: &str) {
        self.pod(pod)
            .wait_component(name, Duration::from_secs(30), || self.agent.log_text());
    }

    /// Waits until `pred` holds for `pod`'s recorded firings; returns them.
    fn wait_firings(&self, pod: &str, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let d = firings(self.pod(pod));
            if pred(&d) {
                return d;
            }
            assert!(
                start.elapsed() < Duration::from_secs(45),
                "{what}: firings to {pod} are {d:#?}; agent log:\n{}",
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn component(name: &str, kind: &str, metadata: &[(&str, &str)], scopes: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n  version: v1\n  metadata:{}\n",
        if metadata.is_empty() { " []" } else { "" }
    );
    for (k, v) in metadata {
        s.push_str(&format!("  - {{name: {k}, value: {}}}\n", json!(v)));
    }
    if !scopes.is_empty() {
        s.push_str(&format!("scopes: [{}]\n", scopes.join(", ")));
    }
    s.push_str("---\n");
    s
}

/// What np-app in `p` recorded under `/cron/`.
fn firings(p: &AppPod) -> Vec<Value> {
    p.deliveries()
        .into_iter()
        .filter(|d| d["path"].as_str().is_some_and(|p| p.starts_with("/cron/")))
        .collect()
}

fn invoke(p: &AppPod, binding: &str, body: Value) -> Msg {
    p.call(
        "POST",
        &format!("/v1.0/bindings/{binding}"),
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// `r` is a Dapr error answer with this status and code, whose message
/// holds `says`.
fn assert_error(r: &Msg, status: u16, code: &str, says: &str) {
    let j = r.json();
    assert_eq!(
        (r.status(), j["errorCode"].clone()),
        (status, json!(code)),
        "{}",
        r.text()
    );
    assert!(
        j["message"].as_str().is_some_and(|m| m.contains(says)),
        "message should say {says:?}: {}",
        r.text()
    );
}

#[test]
fn http_binding_sends_method_path_headers_and_body_and_reports_the_target_status() {
    let w = world(&[("front", "front"), ("target", "target")]);
    let url = format!("http://{}:{APP_PORT}", w.pod("target").ip);
    w.components(&format!(
        "{}{}",
        component("web", "bindings.http", &[("url", &url)], &[]),
        component("private", "bindings.http", &[("url", &url)], &["target"]),
    ));
    w.wait_component("front", "web");
    let front = w.pod("front");

    // POST: the data as JSON, path appended, capitalised metadata as
    // headers; the target's answer with its status and headers as
    // metadata.* headers.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = front.call(
        "POST",
        "/v1.0/bindings/web",
        &[("content-type", "application/json"), ("traceparent", tp)],
        json!({"operation": "post", "data": {"order": 7},
               "metadata": {"path": "/orders/7?full=1", "X-Custom": "yes", "x-lower": "no"}})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.json(), json!({"order": 7}));
    let md = |k: &str| r.header(&format!("metadata.{k}")).map(str::to_string);
    assert_eq!(md("statusCode").as_deref(), Some("200"), "{r:?}");
    assert_eq!(md("status").as_deref(), Some("200 OK"));
    assert_eq!(md("X-Echo-Method").as_deref(), Some("POST"));
    assert_eq!(md("X-Echo-Uri").as_deref(), Some("/orders/7?full=1"));
    assert_eq!(md("X-Echo-H-X-Custom").as_deref(), Some("yes"));
    assert_eq!(
        md("X-Echo-H-X-Lower"),
        None,
        "lower-case metadata is no header"
    );
    assert!(
        md("X-Echo-Traceparent")
            .is_some_and(|t| t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")),
        "{r:?}"
    );

    // create is POST; GET sends no body.
    let r = invoke(front, "web", json!({"operation": "create", "data": "hi"}));
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.header("metadata.X-Echo-Method"), Some("POST"));
    assert_eq!(r.text(), "\"hi\"");
    let r = invoke(
        front,
        "web",
        json!({"operation": "get", "data": {"ignored": true}, "metadata": {"path": "x"}}),
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(
        (
            r.header("metadata.X-Echo-Method"),
            r.header("metadata.X-Echo-Uri")
        ),
        (Some("GET"), Some("/x"))
    );
    assert_eq!(r.text(), "");

    // A 404 target: Dapr's error, naming the status, with the metadata;
    // unless errorIfNot2XX is false.
    let r = invoke(
        front,
        "web",
        json!({"operation": "get", "metadata": {"path": "/status/404"}}),
    );
    assert_error(
        &r,
        500,
        "ERR_INVOKE_OUTPUT_BINDING",
        "received status code 404",
    );
    assert_eq!(r.header("metadata.statusCode"), Some("404"));
    let r = invoke(
        front,
        "web",
        json!({"operation": "get", "metadata": {"path": "/status/404", "errorIfNot2XX": "false"}}),
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.header("metadata.statusCode"), Some("404"));
    assert_eq!(r.text(), "status 404");

    // Errors: unsupported operation, unknown or out-of-scope binding,
    // malformed body.
    let r = invoke(front, "web", json!({"operation": "fly"}));
    assert_error(
        &r,
        500,
        "ERR_INVOKE_OUTPUT_BINDING",
        "supported operations: create get head post put patch delete options trace",
    );
    let r = invoke(front, "web", json!({"data": 1}));
    assert_error(&r, 500, "ERR_INVOKE_OUTPUT_BINDING", "operation");
    let r = invoke(front, "nope", json!({"operation": "get"}));
    assert_error(
        &r,
        500,
        "ERR_INVOKE_OUTPUT_BINDING",
        "couldn't find output binding nope",
    );
    let r = invoke(front, "private", json!({"operation": "get"}));
    assert_error(
        &r,
        500,
        "ERR_INVOKE_OUTPUT_BINDING",
        "couldn't find output binding private",
    );
    let r = invoke(w.pod("target"), "private", json!({"operation": "get"}));
    assert_eq!(r.status(), 200, "scoped to target: {}", r.text());
    let r = front.call("POST", "/v1.0/bindings/web", &[], b"{not json");
    assert_error(&r, 400, "ERR_MALFORMED_REQUEST", "");
}

#[test]
fn redis_binding_creates_gets_increments_and_deletes_keys() {
    let w = world(&[("front", "front")]);
    let redis = NodeRedis::start(&w.node.ns, 16391);
    let host = format!("127.0.0.1:{}", redis.port);
    w.components(&format!(
        "{}{}",
        component("cache", "bindings.redis", &[("redisHost", &host)], &[]),
        component("broken", "bindings.redis", &[], &[]),
    ));
    w.wait_component("front", "cache");
    let front = w.pod("front");

    let r = invoke(
        front,
        "cache",
        json!({"operation": "create", "data": {"v": 1}, "metadata": {"key": "k1"}}),
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let r = invoke(
        front,
        "cache",
        json!({"operation": "get", "metadata": {"key": "k1"}}),
    );
    assert_eq!(
        (r.status(), r.json()),
        (200, json!({"v": 1})),
        "{}",
        r.text()
    );
    // A string keeps its JSON quotes, as in Dapr.
    invoke(
        front,
        "cache",
        json!({"operation": "create", "data": "hi", "metadata": {"key": "k2", "ttlInSeconds": "600"}}),
    );
    let r = invoke(
        front,
        "cache",
        json!({"operation": "get", "metadata": {"key": "k2"}}),
    );
    assert_eq!(r.text(), "\"hi\"");
    // Plain string keys any client reads; the TTL is set.
    let cli = |args: &[&str]| -> String {
        let bin = prereq::require_tool("redis-cli", "redis-tools");
        let out = w
            .node
            .ns
            .command(bin)
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["GET", "k1"]), r#"{"v":1}"#);
    let ttl: u64 = cli(&["TTL", "k2"]).parse().expect("TTL is a number");
    assert!((1..=600).contains(&ttl), "TTL of k2: {ttl}");
    assert_eq!(cli(&["TTL", "k1"]), "-1", "no ttlInSeconds: no expiry");
    for _ in 0..2 {
        let r = invoke(
            front,
            "cache",
            json!({"operation": "increment", "metadata": {"key": "n"}}),
        );
        assert_eq!(r.status(), 204, "{}", r.text());
    }
    let r = invoke(
        front,
        "cache",
        json!({"operation": "get", "metadata": {"key": "n"}}),
    );
    assert_eq!(r.text(), "2");
    let r = invoke(
        front,
        "cache",
        json!({"operation": "delete", "metadata": {"key": "k1"}}),
    );
    assert_eq!(r.status(), 204, "{}", r.text());
    let r = invoke(
        front,
        "cache",
        json!({"operation": "get", "metadata": {"key": "k1"}}),
    );
    assert_eq!((r.status(), r.text()), (200, String::new()), "absent key");

    // Errors name what is missing.
    let r = invoke(front, "cache", json!({"operation": "create", "data": 1}));
    assert_error(&r, 500, "ERR_INVOKE_OUTPUT_BINDING", "missing key");
    let r = invoke(
        front,
        "cache",
        json!({"operation": "post", "metadata": {"key": "k"}}),
    );
    assert_error(
        &r,
        500,
        "ERR_INVOKE_OUTPUT_BINDING",
        "supported operations: create get delete increment",
    );
    let m = front.call("GET", "/v1.0/metadata", &[], b"").json();
    let errors = m["extended"]["componentErrors"].to_string();
    assert!(
        errors.contains("broken") && errors.contains("redisHost"),
        "{errors}"
    );
    drop(redis);
}

#[test]
fn cron_fires_to_the_scoped_apps_retries_failures_and_follows_component_changes() {
    let w = world(&[("tick", "tick"), ("other", "other"), ("flaky", "flaky")]);
    let fast = [
        ("schedule", "@every 1s"),
        ("retryInitialInterval", "100ms"),
        ("retryMaxInterval", "200ms"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        fast.iter().copied().chain(extra.iter().copied()).collect()
    };
    let ticker = component(
        "ticker",
        "bindings.cron",
        &with(&[("route", "/cron/tick")]),
        &["tick"],
    );
    let flaky = component(
        "flaky",
        "bindings.cron",
        &with(&[("route", "/cron/fail-first/x")]),
        &["flaky"],
    );
    // np-app answers OPTIONS /status/404 with 404: it does not listen.
    let silent = component(
        "silent",
        "bindings.cron",
        &with(&[("route", "/status/404")]),
        &["other"],
    );
    w.components(&format!("{ticker}{flaky}{silent}"));

    // The scoped app gets firings, each one POST with Dapr's cron metadata.
    let d = w.wait_firings("tick", "two firings", |d| d.len() >= 2);
    for f in &d {
        assert_eq!(f["path"], "/cron/tick", "{f}");
        assert_eq!(f["contentType"], "application/json", "{f}");
        assert_eq!(f["timeZone"], "UTC", "{f}");
        assert!(
            f["readTimeUTC"]
                .as_str()
                .is_some_and(|t| t.ends_with(" +0000 UTC")),
            "{f}"
        );
        assert_eq!(f["body"], "", "{f}");
    }
    // A failed firing is delivered again: the same firing time twice.
    w.wait_firings("flaky", "the failed firing retried", |d| {
        let first = d.iter().find(|f| f["n"] == 1);
        first.is_some_and(|f1| {
            d.iter()
                .any(|f| f["n"] != 1 && f["readTimeUTC"] == f1["readTimeUTC"])
        })
    });
    // The app out of scope gets none; the one that does not listen on the
    // route is asked once and then left alone.
    assert!(firings(w.pod("other")).is_empty());
    let start = Instant::now();
    while !w
        .agent
        .log_text()
        .contains("the app does not listen on the input binding's route")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no OPTIONS verdict for silent; agent log:\n{}",
            w.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Removing a component stops its schedule; a new one starts.
    let late = component(
        "late",
        "bindings.cron",
        &with(&[("route", "/cron/late")]),
        &["other"],
    );
    w.components(&format!("{flaky}{late}"));
    w.wait_firings("other", "the new component fires", |d| !d.is_empty());
    let start = Instant::now();
    while !w.agent.log_text().contains("input binding stopped") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ticker not stopped; agent log:\n{}",
            w.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = firings(w.pod("tick")).len();
    std::thread::sleep(Duration::from_millis(2500));
    let after = firings(w.pod("tick")).len();
    // One already sent when the stop came may still land.
    assert!(
        after <= before + 1,
        "ticker still fires: {before} then {after}"
    );
}

/// The UTC time now as a firing's `readTimeUTC` starts (`YYYY-MM-DD
/// HH:MM:SS`), so that the two compare as strings.
fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn cron_firings_waiting_for_the_app_survive_an_agent_kill9() {
    let mut w = world(&[("tick", "tick")]);
    let ticker = component(
        "ticker",
        "bindings.cron",
        &[
            ("schedule", "@every 1s"),
            ("route", "/cron/tick"),
            ("maxDeliveryAttempts", "1000"),
            ("retryInitialInterval", "100ms"),
            ("retryMaxInterval", "300ms"),
        ],
        &["tick"],
    );
    w.components(&ticker);
    w.wait_firings("tick", "a first firing", |d| !d.is_empty());
    // The app stops answering: the next firings wait in the log, retried.
    w.pods[0].1.stop_app();
    std::thread::sleep(Duration::from_millis(2500));
    let killed = utc_now();
    w.agent.kill9();
    w.pods[0].1.start_app();
    w.agent.restart(&w.node.ns);
    // Firings due before the kill reach the app after the restart.
    let d = w.wait_firings("tick", "a firing from before the kill", |d| {
        d.iter().any(|f| {
            f["readTimeUTC"]
                .as_str()
                .is_some_and(|t| t < killed.as_str())
        })
    });
    assert!(d.iter().all(|f| f["path"] == "/cron/tick"), "{d:#?}");
}
