//! Dapr's configuration API over [`crate::config_store`] stores:
//!
//! - `GET /v1.0/configuration/{store}?key=a&key=b` (no key: every item):
//!   `{"a": {"value", "version", "metadata"}}`;
//! - `GET /v1.0/configuration/{store}/subscribe?key=...`: `{"id"}`; every
//!   change is then POSTed to the subscribing pod's app at
//!   `/configuration/{store}/{key}` with `{"id", "items": {key: item}}`;
//! - `GET /v1.0/configuration/{store}/{id}/unsubscribe`: `{"ok": true}`.
//!
//! The same paths answer under `/v1.0-alpha1/` (and its older
//! `/v1.0-alpha1/configuration/{id}/unsubscribe`). A subscription belongs
//! to the pod that made it: only that pod can end it, it ends when the pod
//! leaves the node or the store's definition changes, and an agent restart
//! ends every subscription (an app subscribes again when it starts, as
//! with a restarted Dapr sidecar).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::components::ConfigStoreComponent;
use crate::config_store::Items;
use crate::dapr::{self, ApiError};
use crate::directory::AppPod;
use crate::server::{Body, Caller};
use crate::Runtime;

/// How often a subscription checks that its pod and store are still there.
const CHECK: Duration = Duration::from_secs(1);
/// How long a push waits for the app.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Pushes tried per change before it is given up (and logged).
const PUSH_TRIES: u32 = 3;

/// The configuration subscriptions of the node's pods.
#[derive(Debug, Default)]
pub struct Subscriptions {
    by_id: Mutex<HashMap<String, Sub>>,
}

#[derive(Debug)]
struct Sub {
    /// The subscribing pod, `namespace/name`.
    pod: String,
    store: String,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriptions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sub>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many subscriptions are active (for metrics and tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for (_, s) in self.lock().drain() {
            s.task.abort();
        }
    }
}

fn error(status: StatusCode, code: &'static str, msg: impl Into<String>) -> Response<Body> {
    ApiError::new(status, code, msg).into_response()
}

/// Routes `tail`, the path after `/v1.0[-alpha1]/configuration/`.
pub async fn handle(
    rt: &Arc<Runtime>,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_MALFORMED_REQUEST",
            "the configuration API answers GET only",
        );
    }
    let keys = keys(req.uri().query());
    let segs: Vec<&str> = tail.split('/').collect();
    match segs.as_slice() {
        [store] if !store.is_empty() => get(rt, caller, store, &keys).await,
        [store, "subscribe"] => subscribe(rt, caller, store, keys).await,
        [store, id, "unsubscribe"] => unsubscribe(rt, caller, Some(store), id),
        // Dapr's older alpha path, without the store.
        [id, "unsubscribe"] => unsubscribe(rt, caller, None, id),
        _ => ApiError::malformed(
            "expected /configuration/{store}, /configuration/{store}/subscribe or /configuration/{store}/{id}/unsubscribe",
        )
        .into_response(),
    }
}

/// Every `key` query parameter, decoded, in order.
fn keys(query: Option<&str>) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "key")
        .filter_map(|(_, v)| crate::state_api::percent_decode(v))
        .filter(|v| !v.is_empty())
        .collect()
}

/// The store as the caller sees it.
fn store_of(rt: &Runtime, caller: &Caller, name: &str) -> Result<ConfigStoreComponent, ApiError> {
    let reg = rt.registry();
    if let Some(c) = reg.config_store(name, caller.app_id(), caller.namespace()) {
        return Ok(c.clone());
    }
    if reg.config_stores.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_CONFIGURATION_STORE_NOT_CONFIGURED",
            "configuration stores are not configured: define a Component of type configuration.redis or configuration.file",
        ));
    }
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "ERR_CONFIGURATION_STORE_NOT_FOUND",
        format!(
            "configuration store {name} is not found (for {})",
            caller.describe()
        ),
    ))
}

fn json(body: serde_json::Value) -> Response<Body> {
    dapr::json_response(StatusCode::OK, body.to_string().into())
}

async fn get(rt: &Runtime, caller: &Caller, name: &str, keys: &[String]) -> Response<Body> {
    let comp = match store_of(rt, caller, name) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match comp.store.get(keys).await {
        Ok(items) => json(serde_json::to_value(items).unwrap_or_default()),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_CONFIGURATION_GET",
            format!("failed to get {keys:?} from configuration store {name}: {e}"),
        ),
    }
}

/// A subscription id: 128 random bits, UUID-shaped as Dapr's are.
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.finish()
    };
    let x = (u128::from(word()) << 64) | u128::from(word());
    let h = format!("{x:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

async fn subscribe(
    rt: &Arc<Runtime>,
    caller: &Caller,
    name: &str,
    keys: Vec<String>,
) -> Response<Body> {
    let Caller::Pod(pod) = caller else {
        return error(
            StatusCode::BAD_REQUEST,
            "ERR_CONFIGURATION_SUBSCRIBE",
            format!(
                "changes are pushed to the subscribing app, and {} is not a pod of this node",
                caller.describe()
            ),
        );
    };
    if pod.app_port.is_none() || pod.ips.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "ERR_CONFIGURATION_SUBSCRIBE",
            format!(
                "changes are pushed to the app at its port, and pod {} has none: set the pod annotation dapr.io/app-port",
                pod.key()
            ),
        );
    }
    let comp = match store_of(rt, caller, name) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel(64);
    let watch = match comp.store.watch(keys, tx).await {
        Ok(w) => w,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_CONFIGURATION_SUBSCRIBE",
                format!("failed to subscribe to configuration store {name}: {e}"),
            )
        }
    };
    let id = new_id();
    let task = tokio::spawn(follow(
        rt.clone(),
        id.clone(),
        name.to_string(),
        comp,
        pod.clone(),
        watch,
        rx,
    ));
    rt.config_subs.lock().insert(
        id.clone(),
        Sub {
            pod: pod.key(),
            store: name.to_string(),
            task,
        },
    );
    tracing::info!(pod = %pod.key(), store = %name, %id, "configuration subscription");
    json(serde_json::json!({ "id": id }))
}

fn unsubscribe(rt: &Runtime, caller: &Caller, store: Option<&str>, id: &str) -> Response<Body> {
    let mut subs = rt.config_subs.lock();
    let mine = subs.get(id).is_some_and(|s| {
        matches!(caller, Caller::Pod(p) if p.key() == s.pod) && store.is_none_or(|st| st == s.store)
    });
    if !mine {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_CONFIGURATION_UNSUBSCRIBE",
            format!(
                "failed to unsubscribe {id}: {} has no such subscription",
                caller.describe()
            ),
        );
    }
    if let Some(s) = subs.remove(id) {
        s.task.abort();
    }
    json(serde_json::json!({ "ok": true }))
}

/// Pushes a subscription's changes to its pod until it ends.
async fn follow(
    rt: Arc<Runtime>,
    id: String,
    store: String,
    comp: ConfigStoreComponent,
    pod: Arc<AppPod>,
    _watch: crate::config_store::Watch,
    mut rx: mpsc::Receiver<Items>,
) {
    let gone = |rt: &Runtime| {
        let here = rt
            .directory()
            .by_key(&pod.namespace, &pod.name)
            .is_some_and(|p| p.ips == pod.ips && p.app_port == pod.app_port);
        let same = rt
            .registry()
            .config_store(&store, pod.app_id.as_deref(), Some(&pod.namespace))
            .is_some_and(|c| Arc::ptr_eq(&c.store, &comp.store));
        !(here && same)
    };
    let why = loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(items) => push(&rt, &id, &store, &pod, items).await,
                None => break "the store stopped sending changes",
            },
            _ = tokio::time::sleep(CHECK) => {
                if gone(&rt) {
                    break "the pod or the store's definition changed";
                }
            }
        }
    };
    tracing::info!(pod = %pod.key(), %store, %id, why, "configuration subscription ended");
    rt.config_subs.lock().remove(&id);
}

/// `s` as one path segment: everything but RFC 3986's unreserved
/// characters percent-encoded (a key may hold `/` or spaces).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One POST per changed key, as Dapr's HTTP channel sends them.
async fn push(rt: &Runtime, id: &str, store: &str, pod: &AppPod, items: Items) {
    let Some(addr) = crate::delivery::endpoint(pod) else {
        return;
    };
    for (key, item) in items {
        let body = serde_json::json!({"id": id, "items": {key.clone(): item}}).to_string();
        let path = format!(
            "/configuration/{}/{}",
            encode_segment(store),
            encode_segment(&key)
        );
        let mut tries = 0;
        loop {
            tries += 1;
            let req = Request::post(path.as_str())
                .header(http::header::HOST, addr.to_string())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(crate::server::full(Bytes::from(body.clone())));
            let Ok(req) = req else { break };
            match crate::delivery::post(rt, addr, req, PUSH_TIMEOUT).await {
                Ok((status, _)) if status.is_success() => break,
                outcome if tries >= PUSH_TRIES => {
                    tracing::warn!(pod = %pod.key(), %store, %key, ?outcome, "configuration change not taken by the app");
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_every_key_parameter_decoded() {
        assert_eq!(
            keys(Some("key=a&metadata.x=1&key=b%2Fc&key=")),
            vec!["a".to_string(), "b/c".to_string()]
        );
        assert!(keys(None).is_empty());
    }

    #[test]
    fn keys_are_one_path_segment() {
        assert_eq!(encode_segment("a b/c.d"), "a%20b%2Fc.d");
    }

    #[test]
    fn ids_are_uuid_shaped_and_distinct() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }
}
