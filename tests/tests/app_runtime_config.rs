//! The configuration API through the node app runtime on real pods:
//! `configuration.redis` on a real redis-server (keyspace notifications
//! for change pushes) and `configuration.file`; get, subscribe (changes
//! POSTed to the subscribing pod's np-app, which records them),
//! unsubscribe, scoping and the errors.

use std::time::{Duration, Instant};

use nodeplane_tests::agent::Agent;
use nodeplane_tests::apps::{self, AppPod, NodeRedis};
use nodeplane_tests::fixture::Node;
use nodeplane_tests::{prereq, TempDir};
use serde_json::Value;

const CIDR: &str = "10.244.0.0/24";
const REDIS_PORT: u16 = 6390;
/// A second server that publishes no keyspace notifications.
const QUIET_PORT: u16 = 6391;

struct World {
    node: Node,
    agent: Agent,
    sub: AppPod,
    other: AppPod,
    _redis: NodeRedis,
    _quiet: NodeRedis,
    dir: TempDir,
}

fn components(dir: &TempDir) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: configstore}}
spec:
  type: configuration.redis
  version: v1
  metadata:
  - {{name: redisHost, value: \"127.0.0.1:{REDIS_PORT}\"}}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: quiet}}
spec:
  type: configuration.redis
  metadata:
  - {{name: redisHost, value: \"127.0.0.1:{QUIET_PORT}\"}}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: files}}
spec:
  type: configuration.file
  metadata:
  - {{name: path, value: {}}}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: private}}
spec:
  type: configuration.file
  metadata:
  - {{name: path, value: {}}}
scopes: [other]
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: nohost}}
spec: {{type: configuration.redis}}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: relative}}
spec:
  type: configuration.file
  metadata:
  - {{name: path, value: conf.yaml}}
---
",
        dir.path().join("conf.yaml").display(),
        dir.path().join("private.yaml").display(),
    )
}

fn world() -> World {
    prereq::require_root();
    prereq::require_tool("redis-cli", "redis-tools");
    let mut node = Node::new(&[CIDR]);
    let redis = NodeRedis::start(&node.ns, REDIS_PORT);
    let quiet = NodeRedis::start(&node.ns, QUIET_PORT);
    let agent = Agent::start(&mut node, &[CIDR], &[]);
    let dir = TempDir::new("config");
    std::fs::write(dir.path().join("conf.yaml"), "a: one\n").expect("write conf");
    std::fs::write(dir.path().join("private.yaml"), "p: secret-ish\n").expect("write conf");
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n".to_string();
    cluster.push_str(&apps::pod_yaml("shop", "sub", Some("sub"), "", ""));
    cluster.push_str(&apps::pod_yaml("shop", "other", Some("other"), "", ""));
    agent.apply(&[
        ("cluster.yaml", cluster),
        ("components.yaml", components(&dir)),
    ]);
    let sub = AppPod::add(&node, "shop", "sub");
    let other = AppPod::add(&node, "shop", "other");
    sub.wait_known("shop", "sub", Duration::from_secs(20), || agent.log_text());
    other.wait_known("shop", "other", Duration::from_secs(20), || {
        agent.log_text()
    });
    let w = World {
        node,
        agent,
        sub,
        other,
        _redis: redis,
        _quiet: quiet,
        dir,
    };
    // The runtime reads the components a moment after they appear.
    w.sub
        .wait_component("configstore", Duration::from_secs(20), || {
            w.agent.log_text()
        });
    w.redis(REDIS_PORT, "config set notify-keyspace-events KA");
    w.redis(REDIS_PORT, "mset orderId1 '101||1' orderId2 '102||1'");
    w
}

impl World {
    fn redis(&self, port: u16, cmd: &str) -> String {
        let out = self.node.ns.sh(&format!("redis-cli -p {port} --raw {cmd}"));
        assert!(out.status.success(), "redis-cli {cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until `p` has recorded a push to `path` whose item `key` has
    /// `value`; returns every push to `path` so far.
    fn wait_push(&self, p: &AppPod, path: &str, key: &str, value: &str) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let pushes: Vec<Value> = p
                .deliveries()
                .into_iter()
                .filter(|d| d["path"] == path)
                .collect();
            let seen = pushes.iter().any(|d| {
                let body: Value =
                    serde_json::from_str(d["body"].as_str().unwrap_or("")).unwrap_or_default();
                body["items"][key]["value"] == value
            });
            if seen {
                return pushes;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no push of {key}={value:?} to {path}: {pushes:#?}; agent log:\n{}",
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn body(d: &Value) -> Value {
    serde_json::from_str(d["body"].as_str().unwrap_or("")).unwrap_or_default()
}

#[test]
fn redis_configuration_get_subscribe_and_unsubscribe() {
    let w = world();
    let r = w.sub.call(
        "GET",
        "/v1.0/configuration/configstore?key=orderId1",
        &[],
        b"",
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["orderId1"]["value"], "101");
    assert_eq!(j["orderId1"]["version"], "1");
    assert!(j.get("orderId2").is_none(), "{j}");
    // No key: every item; the alpha path answers the same.
    let all = w
        .sub
        .call("GET", "/v1.0-alpha1/configuration/configstore", &[], b"")
        .json();
    assert_eq!(all["orderId2"]["value"], "102", "{all}");

    let r = w.sub.call(
        "GET",
        "/v1.0/configuration/configstore/subscribe?key=orderId1",
        &[],
        b"",
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_string();
    // A key outside the subscription changes first, then the subscribed one.
    w.redis(REDIS_PORT, "set orderId2 '999||9'");
    w.redis(REDIS_PORT, "set orderId1 '103||2'");
    let path = "/configuration/configstore/orderId1";
    let pushes = w.wait_push(&w.sub, path, "orderId1", "103");
    let b = body(pushes.last().expect("push"));
    assert_eq!(b["id"], id.as_str());
    assert_eq!(b["items"]["orderId1"]["version"], "2");
    assert!(
        w.sub
            .deliveries()
            .iter()
            .all(|d| !d["path"].as_str().unwrap_or("").ends_with("orderId2")),
        "a key not subscribed to was pushed"
    );
    // A deletion is pushed as an empty item.
    w.redis(REDIS_PORT, "del orderId1");
    w.wait_push(&w.sub, path, "orderId1", "");

    // Only the subscribing pod can end it.
    let bad = w.other.call(
        "GET",
        &format!("/v1.0/configuration/configstore/{id}/unsubscribe"),
        &[],
        b"",
    );
    assert_eq!(bad.status(), 500, "{}", bad.text());
    assert_eq!(bad.json()["errorCode"], "ERR_CONFIGURATION_UNSUBSCRIBE");
    let ok = w.sub.call(
        "GET",
        &format!("/v1.0/configuration/configstore/{id}/unsubscribe"),
        &[],
        b"",
    );
    assert_eq!(ok.status(), 200, "{}", ok.text());
    assert_eq!(ok.json()["ok"], true);
    let before = w.sub.deliveries().len();
    // After it, changes are not pushed: a new subscription's push arrives
    // and the ended one's does not.
    let r = w.sub.call(
        "GET",
        "/v1.0/configuration/configstore/subscribe?key=marker",
        &[],
        b"",
    );
    assert_eq!(r.status(), 200, "{}", r.text());
    w.redis(REDIS_PORT, "set orderId1 '104||3'");
    w.redis(REDIS_PORT, "set marker 'm||1'");
    w.wait_push(&w.sub, "/configuration/configstore/marker", "marker", "m");
    let after: Vec<Value> = w.sub.deliveries().into_iter().skip(before).collect();
    assert!(
        after.iter().all(|d| d["path"] != path),
        "pushed after unsubscribe: {after:#?}"
    );
    // Unsubscribing twice is an error naming the subscription.
    let again = w.sub.call(
        "GET",
        &format!("/v1.0/configuration/configstore/{id}/unsubscribe"),
        &[],
        b"",
    );
    assert_eq!(again.status(), 500);
    assert!(again.text().contains(&id), "{}", again.text());
}

#[test]
fn file_configuration_pushes_changes_and_errors_name_the_fix() {
    let w = world();
    let r = w.sub.call("GET", "/v1.0/configuration/files", &[], b"");
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.json()["a"]["value"], "one");
    let r = w
        .sub
        .call("GET", "/v1.0/configuration/files/subscribe", &[], b"");
    assert_eq!(r.status(), 200, "{}", r.text());
    std::fs::write(
        w.dir.path().join("conf.yaml"),
        "a: two\nb: {value: new, version: \"7\"}\n",
    )
    .expect("rewrite conf");
    w.wait_push(&w.sub, "/configuration/files/a", "a", "two");
    let pushes = w.wait_push(&w.sub, "/configuration/files/b", "b", "new");
    assert_eq!(body(&pushes[0])["items"]["b"]["version"], "7");

    // Scopes: only app `other` sees `private`.
    let r = w.sub.call("GET", "/v1.0/configuration/private", &[], b"");
    assert_eq!(r.status(), 400, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_CONFIGURATION_STORE_NOT_FOUND");
    let r = w.other.call("GET", "/v1.0/configuration/private", &[], b"");
    assert_eq!(r.json()["p"]["value"], "secret-ish", "{}", r.text());
    let r = w.sub.call("GET", "/v1.0/configuration/nope", &[], b"");
    assert_eq!(r.json()["errorCode"], "ERR_CONFIGURATION_STORE_NOT_FOUND");
    let r = w.sub.call("POST", "/v1.0/configuration/files", &[], b"");
    assert_eq!(r.status(), 405);

    // A server without keyspace notifications: subscribing says how to
    // turn them on; getting still works.
    w.redis(QUIET_PORT, "config set notify-keyspace-events \"\"");
    w.redis(QUIET_PORT, "set k v");
    let r = w
        .sub
        .call("GET", "/v1.0/configuration/quiet/subscribe?key=k", &[], b"");
    assert_eq!(r.status(), 500, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_CONFIGURATION_SUBSCRIBE");
    assert!(r.text().contains("notify-keyspace-events"), "{}", r.text());
    let r = w
        .sub
        .call("GET", "/v1.0/configuration/quiet?key=k", &[], b"");
    assert_eq!(r.json()["k"]["value"], "v", "{}", r.text());

    // Broken components are listed with what to fix.
    let m = w.sub.call("GET", "/v1.0/metadata", &[], b"").json();
    let errors = m["extended"]["componentErrors"].to_string();
    assert!(
        errors.contains("nohost") && errors.contains("redisHost"),
        "{errors}"
    );
    assert!(
        errors.contains("relative") && errors.contains("absolute path"),
        "{errors}"
    );
    let listed: Vec<&str> = m["components"]
        .as_array()
        .expect("components")
        .iter()
        .filter(|c| {
            c["type"]
                .as_str()
                .unwrap_or("")
                .starts_with("configuration.")
        })
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(listed, vec!["configstore", "files", "quiet"], "{m}");
}
