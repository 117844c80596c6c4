//! Distributed locks and secrets through the node app runtime on real
//! pods: lock contention between pods and apps over `lock.embedded` and
//! `lock.redis` (a real redis-server), Kubernetes Secrets scoped to the
//! caller's namespace (standalone: `kind: Secret` manifests), the local
//! file store, and components whose metadata comes from `secretKeyRef`.

use std::time::{Duration, Instant};

use nodeplane_tests::agent::Agent;
use nodeplane_tests::apps::{self, AppPod, NodeRedis};
use nodeplane_tests::fixture::Node;
use nodeplane_tests::http1::{Conn, Msg};
use nodeplane_tests::prereq;
use serde_json::{json, Value};

const CIDR: &str = "10.244.0.0/24";
const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n";

struct World {
    _node: Node,
    agent: Agent,
    pods: Vec<(String, AppPod)>,
}

/// A node with an agent whose manifests are the namespaces, a pod per
/// `(namespace, name, app)` (with the pod annotations `annotations` gives
/// by pod name) and `files`; waits until the runtime knows every pod.
fn world(
    pods: &[(&str, &str, &str)],
    annotations: &[(&str, &str)],
    files: &[(&str, String)],
) -> World {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    let agent = Agent::start(&mut node, &[CIDR], &[]);
    let mut cluster = NAMESPACES.to_string();
    for (ns, name, app) in pods {
        let ann = annotations
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, a)| a);
        cluster.push_str(&apps::pod_yaml(ns, name, Some(app), ann, ""));
    }
    let mut all = vec![("cluster.yaml", cluster)];
    all.extend(files.iter().map(|(n, t)| (*n, t.clone())));
    agent.apply(&all);
    let added: Vec<(String, AppPod)> = pods
        .iter()
        .map(|(ns, name, _)| (name.to_string(), AppPod::add(&node, ns, name)))
        .collect();
    let w = World {
        _node: node,
        agent,
        pods: added,
    };
    wait_known(&w, pods);
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
}

fn post(p: &AppPod, path: &str, body: Value) -> Msg {
    p.call(
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn lock(p: &AppPod, store: &str, resource: &str, owner: &str, expiry: i64) -> bool {
    let r = post(
        p,
        &format!("/v1.0-alpha1/lock/{store}"),
        json!({"resourceId": resource, "lockOwner": owner, "expiryInSeconds": expiry}),
    );
    assert_eq!(r.status(), 200, "lock {store}/{resource}: {}", r.text());
    r.json()["success"]
        .as_bool()
        .unwrap_or_else(|| panic!("no success in {}", r.text()))
}

fn unlock(p: &AppPod, store: &str, resource: &str, owner: &str) -> i64 {
    let r = post(
        p,
        &format!("/v1.0-alpha1/unlock/{store}"),
        json!({"resourceId": resource, "lockOwner": owner}),
    );
    assert_eq!(r.status(), 200, "unlock {store}/{resource}: {}", r.text());
    r.json()["status"]
        .as_i64()
        .unwrap_or_else(|| panic!("no status in {}", r.text()))
}

fn assert_error(r: &Msg, status: u16, code: &str, mentions: &str) {
    assert_eq!(r.status(), status, "{}", r.text());
    let j = r.json();
    assert_eq!(j["errorCode"], code, "{}", r.text());
    assert!(
        j["message"].as_str().is_some_and(|m| m.contains(mentions)),
        "{} should mention {mentions}",
        r.text()
    );
}

/// Dapr's lock semantics on `store`: pods a1 and a2 are two pods of app
/// `a`, pod b is app `b`.
fn lock_semantics(w: &World, store: &str) {
    let (a1, a2, b) = (w.pod("a1"), w.pod("a2"), w.pod("b"));
    assert!(lock(a1, store, "r1", "o1", 60), "a free lock is taken");
    assert!(
        !lock(a2, store, "r1", "o2", 60),
        "held by another pod of the app"
    );
    assert!(!lock(a1, store, "r1", "o1", 60), "not re-entrant");
    assert!(
        lock(b, store, "r1", "o2", 60),
        "another app's r1 is another lock"
    );
    assert_eq!(unlock(a2, store, "r1", "o2"), 2, "LOCK_BELONGS_TO_OTHERS");
    assert_eq!(unlock(a1, store, "r1", "o1"), 0, "SUCCESS");
    assert_eq!(unlock(a1, store, "r1", "o1"), 1, "LOCK_DOES_NOT_EXIST");
    assert!(lock(a2, store, "r1", "o2", 60), "free again");
    assert_eq!(unlock(b, store, "r1", "o2"), 0);

    // Expiry: once the 1 s lock has expired, another owner takes it and
    // the first owner no longer holds it.
    assert!(lock(a1, store, "r2", "o1", 1));
    let start = Instant::now();
    while !lock(a2, store, "r2", "o2", 60) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the lock never expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(unlock(a1, store, "r2", "o1"), 2);
    assert_eq!(unlock(a2, store, "r2", "o2"), 0);

    // Bad requests name the field.
    let path = format!("/v1.0-alpha1/lock/{store}");
    let r = post(a1, &path, json!({"lockOwner": "o", "expiryInSeconds": 5}));
    assert_error(&r, 400, "ERR_MALFORMED_REQUEST", "ResourceId");
    let r = post(a1, &path, json!({"resourceId": "r", "expiryInSeconds": 5}));
    assert_error(&r, 400, "ERR_MALFORMED_REQUEST", "LockOwner");
    let r = post(
        a1,
        &path,
        json!({"resourceId": "r", "lockOwner": "o", "expiryInSeconds": 0}),
    );
    assert_error(&r, 400, "ERR_MALFORMED_REQUEST", "ExpiryInSeconds");
    let r = post(
        a1,
        &format!("/v1.0-alpha1/unlock/{store}"),
        json!({"resourceId": "r"}),
    );
    assert_error(&r, 400, "ERR_MALFORMED_REQUEST", "LockOwner");
}

fn lock_component(name: &str, kind: &str, metadata: &str) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n  version: v1\n  metadata: [{metadata}]\n---\n"
    )
}

const LOCK_PODS: &[(&str, &str, &str)] =
    &[("shop", "a1", "a"), ("shop", "a2", "a"), ("shop", "b", "b")];

#[test]
fn embedded_locks_are_exclusive_per_app_and_expire() {
    let w = world(
        LOCK_PODS,
        &[],
        &[(
            "locks.yaml",
            lock_component("locks", "lock.embedded", "")
                + &lock_component("shared", "lock.embedded", "{name: keyPrefix, value: name}"),
        )],
    );
    wait_component(&w, "a1", "locks");
    wait_component(&w, "a1", "shared");
    lock_semantics(&w, "locks");
    // keyPrefix name: one lock space for every app.
    assert!(lock(w.pod("a1"), "shared", "r", "o1", 60));
    assert!(!lock(w.pod("b"), "shared", "r", "o2", 60));
    assert_eq!(unlock(w.pod("b"), "shared", "r", "o2"), 2);
    let r = post(
        w.pod("a1"),
        "/v1.0-alpha1/lock/nope",
        json!({"resourceId": "r", "lockOwner": "o", "expiryInSeconds": 5}),
    );
    assert_error(&r, 400, "ERR_LOCK_STORE_NOT_FOUND", "nope");
    let names: Vec<Value> = w.pod("a1").call("GET", "/v1.0/metadata", &[], b"").json()
        ["components"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["type"] == "lock.embedded")
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, [json!("locks"), json!("shared")]);
    drop(w.agent);
}

#[test]
fn redis_locks_are_exclusive_per_app_and_expire() {
    prereq::require_root();
    let w = world_with_redis(16390);
    lock_semantics(&w.0, "rlocks");
    drop(w);
}

/// A [`World`] with a `lock.redis` component `rlocks` on a redis-server
/// of the node; the server is dropped after the world.
fn world_with_redis(port: u16) -> (World, NodeRedis) {
    // The redis-server runs in the node's namespace, which the world
    // creates: make the node first, then the server, then the rest.
    let mut node = Node::new(&[CIDR]);
    let redis = NodeRedis::start(&node.ns, port);
    let agent = Agent::start(&mut node, &[CIDR], &[]);
    let mut cluster = NAMESPACES.to_string();
    for (ns, name, app) in LOCK_PODS {
        cluster.push_str(&apps::pod_yaml(ns, name, Some(app), "", ""));
    }
    agent.apply(&[
        ("cluster.yaml", cluster),
        (
            "locks.yaml",
            lock_component(
                "rlocks",
                "lock.redis",
                &format!("{{name: redisHost, value: \"127.0.0.1:{port}\"}}"),
            ),
        ),
    ]);
    let pods: Vec<(String, AppPod)> = LOCK_PODS
        .iter()
        .map(|(ns, name, _)| (name.to_string(), AppPod::add(&node, ns, name)))
        .collect();
    let w = World {
        _node: node,
        agent,
        pods,
    };
    wait_known(&w, LOCK_PODS);
    wait_component(&w, "a1", "rlocks");
    (w, redis)
}

fn wait_known(w: &World, pods: &[(&str, &str, &str)]) {
    for (ns, name, _) in pods {
        w.pod(name)
            .wait_known(ns, name, Duration::from_secs(20), || w.agent.log_text());
    }
}

/// Until `pod`'s metadata lists component `name`.
fn wait_component(w: &World, pod: &str, name: &str) {
    w.pod(pod)
        .wait_component(name, Duration::from_secs(20), || w.agent.log_text());
}

fn secret_yaml(ns: &str, name: &str, string_data: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData: {{{string_data}}}\n---\n"
    )
}

const SECRET_STORES: &str = "apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: kube}
spec: {type: secretstores.kubernetes, version: v1}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: files}
spec:
  type: secretstores.local.file
  version: v1
  metadata:
  - {name: secretsFile, value: local-secrets.txt}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: multi}
spec:
  type: secretstores.local.file
  version: v1
  metadata:
  - {name: secretsFile, value: local-secrets.txt}
  - {name: multiValued, value: \"true\"}
---
";

/// The local file store's file: not `.json` or `.yaml`, since the
/// manifests directory (here also the components directory) reads those.
const LOCAL: &str = r#"{"token": "t0", "db": {"user": "u", "pass": {"current": "p1"}}}"#;

fn get(p: &AppPod, path: &str) -> Msg {
    p.call("GET", path, &[], b"")
}

#[test]
fn kubernetes_secrets_are_the_callers_namespace_only_and_files_are_flattened() {
    let secrets = secret_yaml("shop", "db", "password: shop-pw, user: s")
        + &secret_yaml("default", "db", "password: default-pw")
        + &secret_yaml("default", "only-default", "k: v")
        // data is base64: "hunter2".
        + "apiVersion: v1\nkind: Secret\nmetadata: {name: encoded, namespace: shop}\ndata: {password: aHVudGVyMg==}\n---\n";
    // Pod c's Configuration lets it read only `db` of the kube store.
    let scopes = "apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata: {name: only-db, namespace: shop}
spec:
  secrets:
    scopes:
    - {storeName: kube, defaultAccess: deny, allowedSecrets: [db]}
---
";
    let w = world(
        &[
            ("shop", "s", "s"),
            ("default", "d", "d"),
            ("shop", "c", "c"),
        ],
        &[("c", "dapr.io/config: only-db")],
        &[
            ("secrets.yaml", secrets),
            ("stores.yaml", SECRET_STORES.to_string() + scopes),
            ("local-secrets.txt", LOCAL.to_string()),
        ],
    );
    let (s, d) = (w.pod("s"), w.pod("d"));
    wait_component(&w, "s", "files");

    let r = get(s, "/v1.0/secrets/kube/db");
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.json(), json!({"password": "shop-pw", "user": "s"}));
    let r = get(d, "/v1.0/secrets/kube/db");
    assert_eq!(r.json(), json!({"password": "default-pw"}), "{}", r.text());
    let r = get(s, "/v1.0/secrets/kube/encoded");
    assert_eq!(r.json(), json!({"password": "hunter2"}), "{}", r.text());
    // shop's pod cannot read default's Secret, even naming its namespace.
    for path in [
        "/v1.0/secrets/kube/only-default",
        "/v1.0/secrets/kube/only-default?metadata.namespace=default",
        "/v1.0/secrets/kube/../../namespaces/default/secrets/only-default",
    ] {
        assert_error(&get(s, path), 500, "ERR_SECRET_GET", "only-default");
    }
    let r = get(d, "/v1.0/secrets/kube/only-default");
    assert_eq!(r.json(), json!({"k": "v"}), "{}", r.text());
    let r = get(s, "/v1.0/secrets/kube/bulk");
    assert_eq!(
        r.json(),
        json!({"db": {"password": "shop-pw", "user": "s"}, "encoded": {"password": "hunter2"}}),
        "{}",
        r.text()
    );
    // A process of the node (the unix socket, outside any container) has
    // no namespace: the Kubernetes store refuses it; the file store serves.
    let sock = w.agent.state.path().join("runtime").join("runtime.sock");
    let node_get = |path: &str| {
        let stream =
            std::os::unix::net::UnixStream::connect(&sock).expect("connect the runtime socket");
        Conn::new(stream)
            .request("GET", path, &[], b"")
            .expect("request over the socket")
    };
    assert_error(
        &node_get("/v1.0/secrets/kube/db"),
        403,
        "ERR_PERMISSION_DENIED",
        "not a pod",
    );
    assert_eq!(
        node_get("/v1.0/secrets/files/token").json(),
        json!({"token": "t0"})
    );

    // Configuration secret scopes: c reads db, not encoded; bulk leaves
    // encoded out; other stores are not limited.
    let c = w.pod("c");
    let r = get(c, "/v1.0/secrets/kube/db");
    assert_eq!(r.json()["password"], "shop-pw", "{}", r.text());
    assert_error(
        &get(c, "/v1.0/secrets/kube/encoded"),
        403,
        "ERR_PERMISSION_DENIED",
        "encoded",
    );
    let r = get(c, "/v1.0/secrets/kube/bulk");
    assert_eq!(
        r.json().as_object().map(|o| o.len()),
        Some(1),
        "{}",
        r.text()
    );
    let r = get(c, "/v1.0/secrets/files/token");
    assert_eq!(r.json(), json!({"token": "t0"}), "{}", r.text());
    assert_error(
        &get(s, "/v1.0/secrets/vault/db"),
        401,
        "ERR_SECRET_STORE_NOT_FOUND",
        "vault",
    );

    // The local file store: nested keys joined with ":".
    let r = get(s, "/v1.0/secrets/files/db:pass:current");
    assert_eq!(r.json(), json!({"db:pass:current": "p1"}), "{}", r.text());
    let r = get(d, "/v1.0/secrets/files/token");
    assert_eq!(r.json(), json!({"token": "t0"}), "{}", r.text());
    let r = get(s, "/v1.0/secrets/files/bulk");
    assert_eq!(
        r.json(),
        json!({"token": {"token": "t0"}, "db:user": {"db:user": "u"}, "db:pass:current": {"db:pass:current": "p1"}}),
        "{}",
        r.text()
    );
    let r = get(s, "/v1.0/secrets/multi/db");
    assert_eq!(
        r.json(),
        json!({"user": "u", "pass:current": "p1"}),
        "{}",
        r.text()
    );
    assert_error(
        &get(s, "/v1.0/secrets/files/db"),
        500,
        "ERR_SECRET_GET",
        "not found",
    );
}

#[test]
fn component_metadata_comes_from_secret_key_refs() {
    prereq::require_root();
    let port = 16391;
    let mut node = Node::new(&[CIDR]);
    let redis = NodeRedis::start_with(&node.ns, port, &["--requirepass", "s3cret"]);
    let agent = Agent::start(&mut node, &[CIDR], &[]);
    let cluster = NAMESPACES.to_string() + &apps::pod_yaml("shop", "s", Some("s"), "", "");
    let components = format!(
        "apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: cache}}
spec:
  type: state.redis
  version: v1
  metadata:
  - {{name: redisHost, value: \"127.0.0.1:{port}\"}}
  - name: redisPassword
    secretKeyRef: {{name: redis-secret, key: password}}
auth: {{secretStore: kube}}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: broken}}
spec:
  type: state.redis
  version: v1
  metadata:
  - {{name: redisHost, value: \"127.0.0.1:{port}\"}}
  - name: redisPassword
    secretKeyRef: {{name: missing-secret, key: password}}
auth: {{secretStore: kube}}
---
"
    );
    agent.apply(&[
        ("cluster.yaml", cluster),
        // A component without a namespace reads the default namespace's.
        (
            "secrets.yaml",
            secret_yaml("default", "redis-secret", "password: s3cret"),
        ),
        ("stores.yaml", SECRET_STORES.to_string()),
        ("local-secrets.txt", LOCAL.to_string()),
        ("components.yaml", components),
    ]);
    let w = World {
        pods: vec![("s".into(), AppPod::add(&node, "shop", "s"))],
        _node: node,
        agent,
    };
    wait_known(&w, &[("shop", "s", "s")]);
    wait_component(&w, "s", "cache");
    let s = w.pod("s");
    let r = post(s, "/v1.0/state/cache", json!([{"key": "k", "value": "v1"}]));
    assert_eq!(
        r.status(),
        204,
        "save through the password from the secret: {}",
        r.text()
    );
    let r = get(s, "/v1.0/state/cache/k");
    assert_eq!(r.json(), json!("v1"), "{}", r.text());
    let m = get(s, "/v1.0/metadata").json();
    let errors = m["extended"]["componentErrors"].to_string();
    assert!(
        errors.contains("component broken: metadata redisPassword: secret missing-secret key password from secret store kube"),
        "{errors}"
    );
    assert!(
        !m["components"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["name"] == "broken")),
        "{m}"
    );
    drop(w);
    drop(redis);
}
