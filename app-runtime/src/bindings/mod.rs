//! Dapr bindings (<https://docs.dapr.io/reference/api/bindings_api/>):
//! `POST /v1.0/bindings/{name}` invokes an output binding
//! ([`http`]: `bindings.http`, [`redis`]: `bindings.redis`), and input
//! bindings ([`cron`]: `bindings.cron`) call the apps that see them, on
//! their route ([`input`]).
//!
//! A request is Dapr's `{"operation", "data", "metadata"}`; `data` goes to
//! the binding as its JSON text (a string keeps its quotes, as in Dapr).
//! The answer is the binding's data (200) or nothing (204), with each
//! response metadata entry as a `metadata.KEY` header, also on errors.
//! Every failure of an invocation is Dapr's `ERR_INVOKE_OUTPUT_BINDING`
//! (500), a body that is not the JSON above `ERR_MALFORMED_REQUEST` (400).

pub mod cron;
pub mod http;
pub mod input;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;

use ::http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use hyper::body::Incoming;
use nodeplane_state::ComponentSpec;
use serde_json::Value;

use crate::dapr::{self, ApiError};
use crate::server::{Body, Caller};
use crate::Runtime;

/// One binding component in service.
#[derive(Debug, Clone)]
pub struct BindingComponent {
    pub spec: ComponentSpec,
    pub namespace: Option<String>,
    pub scopes: Vec<String>,
    pub binding: Binding,
}

/// An open binding; shared by every reload that leaves its spec unchanged.
#[derive(Debug, Clone)]
pub enum Binding {
    Http(Arc<http::HttpBinding>),
    Redis(Arc<redis::RedisBinding>),
    Cron(Arc<cron::CronBinding>),
}

/// Why a binding could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The manifest is wrong: stays so until it changes.
    Config(String),
    /// A server did not answer: tried again later.
    Backend(String),
}

impl OpenError {
    pub fn is_config(&self) -> bool {
        matches!(self, OpenError::Config(_))
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Config(m) | OpenError::Backend(m) => f.write_str(m),
        }
    }
}

/// The types served, for the error naming the others.
const TYPES: &str = "bindings.http, bindings.redis, bindings.cron";

/// Opens the binding a component describes.
pub async fn open(spec: &ComponentSpec) -> Result<Binding, OpenError> {
    let directions = Directions::parse(&spec.metadata)
        .map_err(|e| OpenError::Config(format!("{} ({}): {e}", spec.name, spec.kind)))?;
    let b = match spec.kind.as_str() {
        "bindings.http" => Binding::Http(Arc::new(http::HttpBinding::open(spec)?)),
        "bindings.redis" => Binding::Redis(Arc::new(redis::RedisBinding::open(spec).await?)),
        "bindings.cron" => Binding::Cron(Arc::new(cron::CronBinding::open(spec)?)),
        other => {
            return Err(OpenError::Config(format!(
                "binding type {other} is not supported by this runtime (supported: {TYPES})"
            )))
        }
    };
    let (input, output) = b.directions();
    if (directions.input && !input) || (directions.output && !output) {
        return Err(OpenError::Config(format!(
            "metadata direction {:?}: {} is {}",
            spec.metadata.get("direction").cloned().unwrap_or_default(),
            spec.kind,
            if input {
                "an input binding only"
            } else {
                "an output binding only"
            }
        )));
    }
    Ok(b)
}

/// Metadata `direction` (`input`, `output`, `input, output`): which ways a
/// binding is used; absent, every way its type supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directions {
    pub input: bool,
    pub output: bool,
    /// `direction` was given (an explicit `input` skips the check whether
    /// the app listens on the route, as in Dapr).
    pub explicit: bool,
}

impl Directions {
    pub fn parse(md: &BTreeMap<String, String>) -> Result<Directions, String> {
        let Some(v) = md
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("direction"))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
        else {
            return Ok(Directions::default());
        };
        let mut d = Directions {
            explicit: true,
            ..Directions::default()
        };
        for w in v.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match w.to_ascii_lowercase().as_str() {
                "input" => d.input = true,
                "output" => d.output = true,
                _ => {
                    return Err(format!(
                        "metadata direction {v:?}: {w:?} is neither input nor output"
                    ))
                }
            }
        }
        Ok(d)
    }
}

impl Binding {
    /// (input, output): what the type can be.
    fn directions(&self) -> (bool, bool) {
        match self {
            Binding::Http(_) | Binding::Redis(_) => (false, true),
            Binding::Cron(_) => (true, false),
        }
    }

    /// The operations an output binding takes (None: not an output binding).
    pub fn operations(&self) -> Option<&'static [&'static str]> {
        match self {
            Binding::Http(_) => Some(http::OPERATIONS),
            Binding::Redis(_) => Some(redis::OPERATIONS),
            Binding::Cron(_) => None,
        }
    }

    async fn invoke(&self, rt: &Runtime, req: &InvokeRequest) -> Result<InvokeResponse, Failure> {
        match self {
            Binding::Http(b) => b.invoke(rt, req).await,
            Binding::Redis(b) => b.invoke(req).await,
            Binding::Cron(_) => Err(Failure::new("not an output binding")),
        }
    }
}

/// What an output binding is asked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InvokeRequest {
    pub operation: String,
    /// `data` as JSON text.
    pub data: Bytes,
    pub metadata: BTreeMap<String, String>,
}

/// What an output binding answers: data (None: 204) and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InvokeResponse {
    pub data: Option<Bytes>,
    pub metadata: BTreeMap<String, String>,
}

/// A failed invocation; its metadata (the HTTP binding's status and
/// headers) is still answered, as Dapr does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub metadata: BTreeMap<String, String>,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            metadata: BTreeMap::new(),
        }
    }
}

/// Dapr's error for a failed invocation of `name`.
fn invoke_error(name: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "ERR_INVOKE_OUTPUT_BINDING",
        format!("error invoking output binding {name}: {why}"),
    )
}

/// Reads Dapr's request body.
pub fn parse_request(body: &[u8]) -> Result<InvokeRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("failed deserializing HTTP body: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ApiError::malformed(
            "failed deserializing HTTP body: expected an object {\"operation\", \"data\", \"metadata\"}",
        ));
    };
    let operation = match o.get("operation") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::malformed(
                "failed deserializing HTTP body: operation is not a string",
            ))
        }
    };
    let mut metadata = BTreeMap::new();
    match o.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(ApiError::malformed(format!(
                        "failed deserializing HTTP body: metadata.{k} is not a string (every metadata value is one)"
                    )));
                };
                metadata.insert(k.clone(), s.clone());
            }
        }
        Some(_) => {
            return Err(ApiError::malformed(
                "failed deserializing HTTP body: metadata is not an object of strings",
            ))
        }
    }
    let data = serde_json::to_vec(o.get("data").unwrap_or(&Value::Null))
        .map_err(|e| ApiError::malformed(format!("can't serialize request data field: {e}")))?;
    Ok(InvokeRequest {
        operation,
        data: data.into(),
        metadata,
    })
}

/// `/v1.0/bindings/{name}` (POST or PUT, as in Dapr).
pub async fn handle(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::POST && req.method() != Method::PUT {
        return ApiError::not_found(&format!("/v1.0/bindings/{tail}")).into_response();
    }
    let name = crate::state_api::percent_decode(tail).unwrap_or_else(|| tail.to_string());
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match dapr::read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let mut request = match parse_request(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // The trace goes on to the target (the HTTP binding sends it).
    request.metadata.insert(
        "traceparent".into(),
        crate::trace::next(traceparent.as_deref()),
    );
    let reg = rt.registry();
    let Some(comp) = reg
        .binding(&name, caller.app_id(), caller.namespace())
        .filter(|c| c.binding.operations().is_some())
        .cloned()
    else {
        return invoke_error(&name, &format!("couldn't find output binding {name}"))
            .into_response();
    };
    drop(reg);
    let ops = comp.binding.operations().unwrap_or_default();
    if request.operation.is_empty() {
        return invoke_error(&name, "operation field is missing from request").into_response();
    }
    if !ops.contains(&request.operation.as_str()) {
        return invoke_error(
            &name,
            &format!(
                "binding {name} does not support operation {}. supported operations: {}",
                request.operation,
                ops.join(" ")
            ),
        )
        .into_response();
    }
    match comp.binding.invoke(rt, &request).await {
        Ok(r) => {
            let mut resp = match r.data {
                None => dapr::no_content(),
                // Always JSON, whatever the data, as Dapr answers.
                Some(d) => dapr::json_response(StatusCode::OK, d),
            };
            metadata_headers(&mut resp, &r.metadata);
            resp
        }
        Err(f) => {
            tracing::debug!(binding = %name, error = %f.message, "output binding failed");
            let mut resp = invoke_error(&name, &f.message).into_response();
            metadata_headers(&mut resp, &f.metadata);
            resp
        }
    }
}

/// Each metadata entry as a `metadata.KEY` header (entries that cannot be
/// a header are left out).
fn metadata_headers(resp: &mut Response<Body>, md: &BTreeMap<String, String>) {
    for (k, v) in md {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("metadata.{k}").as_bytes()),
            HeaderValue::from_str(v),
        ) else {
            continue;
        };
        resp.headers_mut().append(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_as_dapr_reads_them() {
        let r = parse_request(
            br#"{"operation":"create","data":{"a":1},"metadata":{"key":"k","ttlInSeconds":"5"}}"#,
        )
        .expect("parse");
        assert_eq!(r.operation, "create");
        assert_eq!(&r.data[..], br#"{"a":1}"#);
        assert_eq!(r.metadata["key"], "k");
        // A string keeps its quotes; no data is null.
        let r = parse_request(br#"{"operation":"create","data":"hi"}"#).expect("parse");
        assert_eq!(&r.data[..], br#""hi""#);
        let r = parse_request(br#"{"operation":"get"}"#).expect("parse");
        assert_eq!(&r.data[..], b"null");
        for bad in [
            &b"not json"[..],
            br#"[1]"#,
            br#"{"operation":1}"#,
            br#"{"operation":"get","metadata":{"n":1}}"#,
        ] {
            let e = parse_request(bad).expect_err("malformed");
            assert_eq!(e.code, "ERR_MALFORMED_REQUEST", "{e:?}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }

    fn doc(name: &str, kind: &str, metadata: Value, scopes: &[&str]) -> (String, Value) {
        (
            format!("API Component shop/{name}"),
            serde_json::json!({
                "apiVersion": "dapr.io/v1alpha1", "kind": "Component",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"type": kind, "version": "v1", "metadata": metadata},
                "scopes": scopes,
            }),
        )
    }

    #[tokio::test]
    async fn reload_reads_bindings_with_scopes_and_keeps_unchanged_ones() {
        let state = std::env::temp_dir().join(format!("np-bind-{}", std::process::id()));
        let target = std::sync::RwLock::new(Arc::new(crate::components::Registry::default()));
        let docs = vec![
            doc(
                "web",
                "bindings.http",
                serde_json::json!([{"name": "url", "value": "http://10.0.0.1:80"}]),
                &[],
            ),
            doc(
                "tick",
                "bindings.cron",
                serde_json::json!([{"name": "schedule", "value": "@every 5s"}]),
                &["worker"],
            ),
            doc("nourl", "bindings.http", Value::Null, &[]),
            doc("mq", "bindings.kafka", Value::Null, &[]),
            doc(
                "wrongway",
                "bindings.cron",
                serde_json::json!([{"name": "schedule", "value": "@hourly"}, {"name": "direction", "value": "output"}]),
                &[],
            ),
        ];
        let reg = crate::components::reload(&target, docs.clone(), Vec::new(), &state, false).await;
        assert_eq!(
            reg.bindings.keys().collect::<Vec<_>>(),
            ["shop/tick", "shop/web"]
        );
        let errors = reg.errors.join("\n");
        assert!(
            errors.contains("nourl") && errors.contains("metadata url is required"),
            "{errors}"
        );
        assert!(
            errors.contains("bindings.kafka is not supported"),
            "{errors}"
        );
        assert!(
            errors.contains("wrongway") && errors.contains("input binding only"),
            "{errors}"
        );
        assert!(!reg.open_failed, "configuration errors are not retried");
        assert!(reg.binding("web", Some("a"), Some("shop")).is_some());
        assert!(reg.binding("web", Some("a"), Some("other")).is_none());
        assert!(reg.binding("tick", Some("a"), Some("shop")).is_none());
        assert!(reg.binding("tick", Some("worker"), Some("shop")).is_some());
        assert_eq!(reg.visible_bindings(Some("worker"), Some("shop")).len(), 2);
        // Unchanged: the same instance (a running schedule goes on).
        let again = crate::components::reload(&target, docs, Vec::new(), &state, false).await;
        match (
            &reg.bindings["shop/tick"].binding,
            &again.bindings["shop/tick"].binding,
        ) {
            (Binding::Cron(a), Binding::Cron(b)) => assert!(Arc::ptr_eq(a, b)),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn directions() {
        let md = |v: &str| BTreeMap::from([("direction".to_string(), v.to_string())]);
        assert_eq!(
            Directions::parse(&BTreeMap::new()).expect("none"),
            Directions::default()
        );
        let d = Directions::parse(&md("input, output")).expect("both");
        assert!(d.input && d.output && d.explicit);
        assert!(Directions::parse(&md("sideways"))
            .expect_err("bad")
            .contains("sideways"));
    }
}
