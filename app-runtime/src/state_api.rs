//! `/v1.0/state/{store}...`: save, get, delete, bulk get and transactions
//! (<https://docs.dapr.io/reference/api/state_api/>), with keys scoped to
//! the caller's app id as Dapr scopes them (`app-id||key`) unless the
//! store's `keyPrefix` shares them.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use nodeplane_state::{Concurrency, Delete, Op, Save};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::components::{KeyPrefix, StateComponent};
use crate::dapr::{self, json_response, ApiError};
use crate::server::{Body, Caller};
use crate::Runtime;

#[derive(Debug, Deserialize, Default)]
struct Options {
    concurrency: Option<String>,
    consistency: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Item {
    key: String,
    value: Option<Box<RawValue>>,
    etag: Option<String>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct BulkGet {
    keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Transaction {
    operations: Vec<TxOperation>,
}

#[derive(Debug, Deserialize)]
struct TxOperation {
    operation: String,
    request: Item,
}

pub async fn handle(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match route(rt, caller, tail, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (store_name, rest) = match tail.split_once('/') {
        Some((s, r)) => (s, Some(r)),
        None => (tail, None),
    };
    let registry = rt.registry();
    if registry.stores.is_empty() {
        return Err(ApiError::stores_not_configured());
    }
    let comp = registry
        .store(store_name, caller.app_id(), caller.namespace())
        .ok_or_else(|| ApiError::store_not_found(store_name))?;
    let scope = Scope::of(comp, caller)?;
    let method = req.method().clone();
    match (method, rest) {
        (Method::POST | Method::PUT, None) => {
            let items: Vec<Item> = json_body(req).await?;
            for it in items {
                let save = scope.save(it)?;
                comp.store.save(save).await.map_err(|e| {
                    ApiError::state(
                        "ERR_STATE_SAVE",
                        format!("failed saving state in state store {store_name}"),
                        &e,
                    )
                })?;
            }
            Ok(dapr::no_content())
        }
        (Method::POST | Method::PUT, Some("bulk")) => {
            let bulk: BulkGet = json_body(req).await?;
            let keys = bulk
                .keys
                .iter()
                .map(|k| scope.key(k))
                .collect::<Result<Vec<_>, _>>()?;
            let items = comp.store.bulk_get(&keys).await.map_err(|e| {
                ApiError::state(
                    "ERR_STATE_BULK_GET",
                    format!("failed getting state from state store {store_name}"),
                    &e,
                )
            })?;
            let mut out = Vec::with_capacity(items.len());
            for (key, item) in bulk.keys.iter().zip(items) {
                let mut o = serde_json::Map::new();
                o.insert("key".into(), key.clone().into());
                if let Some(it) = item {
                    let data: Box<RawValue> = raw(&it.value);
                    o.insert(
                        "data".into(),
                        serde_json::to_value(&data).unwrap_or_default(),
                    );
                    o.insert("etag".into(), it.etag.into());
                }
                out.push(serde_json::Value::Object(o));
            }
            Ok(json_response(
                StatusCode::OK,
                serde_json::to_vec(&out).unwrap_or_default().into(),
            ))
        }
        (Method::POST | Method::PUT, Some("transaction")) => {
            let tx: Transaction = json_body(req).await?;
            let mut ops = Vec::with_capacity(tx.operations.len());
            for op in tx.operations {
                ops.push(match op.operation.as_str() {
                    "upsert" => Op::Upsert(scope.save(op.request)?),
                    "delete" => Op::Delete(scope.delete(
                        op.request.key,
                        op.request.etag,
                        op.request.options,
                    )?),
                    other => {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "ERR_NOT_SUPPORTED_STATE_OPERATION",
                            format!("operation type {other} not supported (upsert or delete)"),
                        ))
                    }
                });
            }
            comp.store.transact(ops).await.map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_STATE_TRANSACTION",
                    format!("error while executing state transaction: {e}"),
                )
            })?;
            Ok(dapr::no_content())
        }
        (Method::GET, Some(key)) => {
            let key = decode(key)?;
            let item = comp.store.get(&scope.key(&key)?).await.map_err(|e| {
                ApiError::state(
                    "ERR_STATE_GET",
                    format!("fail to get {key} from state store {store_name}"),
                    &e,
                )
            })?;
            Ok(match item {
                Some(it) => {
                    let mut r = json_response(StatusCode::OK, it.value);
                    if let Ok(v) = http::HeaderValue::from_str(&it.etag) {
                        r.headers_mut().insert(http::header::ETAG, v);
                    }
                    r
                }
                None => dapr::no_content(),
            })
        }
        (Method::DELETE, Some(key)) => {
            let key = decode(key)?;
            let etag = req
                .headers()
                .get(http::header::IF_MATCH)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim_matches('"').to_string());
            let q = query(req.uri().query());
            let options = Options {
                concurrency: q.get("concurrency").cloned(),
                consistency: q.get("consistency").cloned(),
            };
            let del = scope.delete(key.clone(), etag, Some(options))?;
            comp.store.delete(del).await.map_err(|e| {
                ApiError::state(
                    "ERR_STATE_DELETE",
                    format!("failed deleting state with key {key}"),
                    &e,
                )
            })?;
            Ok(dapr::no_content())
        }
        (m, _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_MALFORMED_REQUEST",
            format!("{m} is not a state operation on {tail}"),
        )),
    }
}

/// How the caller's keys map to stored keys in one store.
struct Scope {
    prefix: Option<String>,
}

impl Scope {
    fn of(comp: &StateComponent, caller: &Caller) -> Result<Scope, ApiError> {
        let need = |what: &str| {
            caller
                .app_id()
                .map(str::to_string)
                .ok_or_else(|| ApiError::identity_required(&caller.describe(), what))
        };
        let what = format!("state store {} (keyPrefix appid)", comp.spec.name);
        let prefix = match &comp.key_prefix {
            KeyPrefix::AppId => Some(need(&what)?),
            KeyPrefix::Namespace => {
                let app = need(&what)?;
                Some(format!("{}.{app}", caller.namespace().unwrap_or("default")))
            }
            KeyPrefix::Name => Some(comp.spec.name.clone()),
            KeyPrefix::None => None,
            KeyPrefix::Custom(p) => Some(p.clone()),
        };
        Ok(Scope { prefix })
    }

    fn key(&self, key: &str) -> Result<String, ApiError> {
        if key.is_empty() {
            return Err(ApiError::malformed("a state key must not be empty"));
        }
        if key.contains("||") {
            return Err(ApiError::malformed(format!(
                "input key {key:?} can't contain '||'"
            )));
        }
        Ok(match &self.prefix {
            Some(p) => format!("{p}||{key}"),
            None => key.to_string(),
        })
    }

    fn save(&self, it: Item) -> Result<Save, ApiError> {
        let etag = it.etag.filter(|e| !e.is_empty());
        let concurrency = concurrency(it.options.as_ref(), etag.is_some())?;
        let ttl = ttl(&it.metadata)?;
        let value = it
            .value
            .map(|v| Bytes::copy_from_slice(v.get().as_bytes()))
            .ok_or_else(|| ApiError::malformed(format!("state item {:?} has no value", it.key)))?;
        Ok(Save {
            key: self.key(&it.key)?,
            value,
            etag,
            concurrency,
            ttl,
        })
    }

    fn delete(
        &self,
        key: String,
        etag: Option<String>,
        options: Option<Options>,
    ) -> Result<Delete, ApiError> {
        let etag = etag.filter(|e| !e.is_empty());
        Ok(Delete {
            key: self.key(&key)?,
            concurrency: concurrency(options.as_ref(), etag.is_some())?,
            etag,
        })
    }
}

/// The store's concurrency for a request. Unspecified, Dapr's runtime
/// leaves the option empty and its stores then check an etag that is
/// given (and write unconditionally without one); only an explicit
/// `last-write` ignores the etag.
fn concurrency(o: Option<&Options>, has_etag: bool) -> Result<Concurrency, ApiError> {
    if let Some(c) = o.and_then(|o| o.consistency.as_deref()) {
        if !matches!(c, "" | "eventual" | "strong") {
            return Err(ApiError::malformed(format!(
                "consistency {c:?} is not one of eventual, strong"
            )));
        }
    }
    match o.and_then(|o| o.concurrency.as_deref()) {
        None | Some("") if has_etag => Ok(Concurrency::FirstWrite),
        None | Some("") | Some("last-write") => Ok(Concurrency::LastWrite),
        Some("first-write") => Ok(Concurrency::FirstWrite),
        Some(other) => Err(ApiError::malformed(format!(
            "concurrency {other:?} is not one of first-write, last-write"
        ))),
    }
}

/// Metadata `ttlInSeconds`: seconds until the item expires; -1 (or absent)
/// keeps it.
fn ttl(metadata: &BTreeMap<String, String>) -> Result<Option<Duration>, ApiError> {
    let Some(v) = metadata.get("ttlInSeconds") else {
        return Ok(None);
    };
    match v.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(n) if n > 0 => Ok(Some(Duration::from_secs(n as u64))),
        _ => Err(ApiError::malformed(format!(
            "metadata ttlInSeconds {v:?} is not a positive number of seconds (or -1 for no expiry)"
        ))),
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = dapr::read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed(format!("failed deserializing HTTP body: {e}")))
}

/// A stored value as JSON for a bulk answer; a value that is not JSON
/// (written by something else) is returned as a JSON string.
fn raw(value: &Bytes) -> Box<RawValue> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| RawValue::from_string(s.to_string()).ok())
        .unwrap_or_else(|| {
            let s = serde_json::to_string(&String::from_utf8_lossy(value)).unwrap_or_default();
            RawValue::from_string(s)
                .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
        })
}

fn decode(key: &str) -> Result<String, ApiError> {
    percent_decode(key).ok_or_else(|| {
        ApiError::malformed(format!("key {key:?} is not valid percent-encoded UTF-8"))
    })
}

/// Decodes `%XX` escapes (keys may hold any character).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query string as name → value (decoded; the last one wins).
pub fn query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k)?, percent_decode(&v.replace('+', " "))?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_and_concurrency_follow_dapr() {
        let m = |v: &str| BTreeMap::from([("ttlInSeconds".to_string(), v.to_string())]);
        assert_eq!(ttl(&m("10")).expect("ttl"), Some(Duration::from_secs(10)));
        assert_eq!(ttl(&m("-1")).expect("ttl"), None);
        assert!(ttl(&m("0")).is_err());
        assert!(ttl(&m("soon")).is_err());
        let o = |c: &str| Options {
            concurrency: Some(c.into()),
            consistency: None,
        };
        assert_eq!(
            concurrency(Some(&o("first-write")), false).expect("c"),
            Concurrency::FirstWrite
        );
        assert_eq!(concurrency(None, false).expect("c"), Concurrency::LastWrite);
        assert_eq!(concurrency(None, true).expect("c"), Concurrency::FirstWrite);
        assert_eq!(
            concurrency(Some(&o("last-write")), true).expect("c"),
            Concurrency::LastWrite
        );
        assert!(concurrency(Some(&o("first")), false).is_err());
    }

    #[test]
    fn keys_are_scoped_and_decoded() {
        let s = Scope {
            prefix: Some("orders".into()),
        };
        assert_eq!(s.key("k1").expect("key"), "orders||k1");
        assert!(s.key("a||b").is_err());
        assert!(s.key("").is_err());
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("bad%zz"), None);
        let q = query(Some("concurrency=first-write&x=a+b"));
        assert_eq!(q["concurrency"], "first-write");
        assert_eq!(q["x"], "a b");
    }
}
