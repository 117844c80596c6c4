//! `/v1.0/invoke/{app-id}/method/{method}`: service invocation.
//!
//! The target is resolved from the pod directory (ready pods carrying the
//! app id, load-balanced round robin), access control of the target's
//! Configuration is checked against the caller's kernel-derived identity,
//! and the request goes straight to the target pod's app port: method,
//! path, query, headers and body as the caller sent them (the body
//! streamed both ways), plus `dapr-caller-app-id` set by the runtime
//! (a value the caller sent is dropped) and a W3C `traceparent`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::acl::{Action, CallerId};
use crate::dapr::ApiError;
use crate::directory::AppPod;
use crate::server::{Body, Caller};
use crate::Runtime;

/// Connection attempts per invocation (each to the next endpoint).
const ATTEMPTS: usize = 3;

/// Headers that belong to one hop and are not forwarded (RFC 9110 7.6.1).
const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Identity headers only the runtime sets.
const CALLER_APP: &str = "dapr-caller-app-id";
const CALLER_NS: &str = "dapr-caller-namespace";
const CALLEE_APP: &str = "dapr-callee-app-id";

pub async fn invoke(
    rt: &Runtime,
    caller: &Caller,
    target: &str,
    method: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let (app, ns) = target_of(rt, caller, target);
    let verb = req.method().to_string();
    let resp = match route(rt, caller, &app, &ns, method, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    rt.metrics.invoke(
        caller.app_id().unwrap_or(""),
        &app,
        &verb,
        resp.status().as_u16(),
        start.elapsed(),
    );
    resp
}

/// `app.namespace` names a namespace; otherwise the caller's own (a node
/// process: the one namespace running the app, else `default`).
fn target_of(rt: &Runtime, caller: &Caller, target: &str) -> (String, String) {
    if let Some((app, ns)) = target.rsplit_once('.') {
        if !app.is_empty() && !ns.is_empty() {
            return (app.to_string(), ns.to_string());
        }
    }
    let ns = match caller.namespace() {
        Some(ns) => ns.to_string(),
        None => {
            let all = rt.directory().namespaces_of(target);
            match all.as_slice() {
                [only] => only.clone(),
                _ => "default".to_string(),
            }
        }
    };
    (target.to_string(), ns)
}

fn invoke_error(status: StatusCode, app: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        status,
        "ERR_DIRECT_INVOKE",
        format!("fail to invoke, id: {app}, err: {why}"),
    )
}

async fn route(
    rt: &Runtime,
    caller: &Caller,
    app: &str,
    ns: &str,
    method: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if let Caller::Unknown(who) = caller {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ERR_PERMISSION_DENIED",
            format!(
                "the runtime does not know the caller {who}; only pods of this node may call it"
            ),
        ));
    }
    let endpoints = rt.directory().endpoints(ns, app);
    if endpoints.is_empty() {
        let why = if rt.directory().knows_app(ns, app) {
            format!(
                "no ready pod of app {app} in namespace {ns} has an address and a dapr.io/app-port"
            )
        } else {
            format!("no pod with dapr.io/app-id {app} in namespace {ns}")
        };
        return Err(invoke_error(StatusCode::INTERNAL_SERVER_ERROR, app, why));
    }
    check_access(
        rt,
        caller,
        app,
        &endpoints[0],
        req.method().as_str(),
        method,
    )?;
    let local: Vec<&Arc<AppPod>> = endpoints.iter().filter(|p| p.local).collect();
    if local.is_empty() {
        return Err(invoke_error(
            StatusCode::SERVICE_UNAVAILABLE,
            app,
            format!(
                "every pod of {app} runs on another node, and agent-to-agent invocation (mTLS) is not built yet"
            ),
        ));
    }
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(parts, body.boxed_unsync());
    prepare(&mut req, caller, app, method)?;
    let candidates: Vec<&Arc<AppPod>> = local
        .iter()
        .copied()
        .filter(|p| !rt.pool.is_open(endpoint(p)))
        .collect();
    if candidates.is_empty() {
        return Err(invoke_error(
            StatusCode::SERVICE_UNAVAILABLE,
            app,
            "every pod of the app failed its recent connections (circuit open; retried after 5 s)",
        ));
    }
    let mut tried = Vec::new();
    for pod in candidates
        .iter()
        .cycle()
        .take(ATTEMPTS.max(candidates.len()))
    {
        let addr = endpoint(pod);
        let mut sender = match rt.pool.idle(addr).await {
            Some(s) => s,
            None => match rt.pool.connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    // Nothing was sent: the next endpoint gets the request.
                    tried.push(format!("{} ({addr}): {e}", pod.key()));
                    tokio::time::sleep(Duration::from_millis(5 << tried.len().min(4))).await;
                    continue;
                }
            },
        };
        let limit = rt.opts.invoke_timeout;
        let timed_out = || {
            invoke_error(
                StatusCode::GATEWAY_TIMEOUT,
                app,
                format!("{} did not answer within {limit:?}", pod.key()),
            )
        };
        let sent = tokio::time::timeout(limit, sender.try_send_request(req))
            .await
            .map_err(|_| timed_out())?;
        let resp = match sent {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // Not sent (the pooled connection had closed meanwhile):
                // once more on a fresh connection.
                Some(back) => {
                    sender = rt
                        .pool
                        .connect(addr)
                        .await
                        .map_err(|e| invoke_error(StatusCode::BAD_GATEWAY, app, e))?;
                    tokio::time::timeout(limit, sender.send_request(back))
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(|e| invoke_error(StatusCode::BAD_GATEWAY, app, e))?
                }
                // Sent, or partly: never repeated (it may not be idempotent).
                None => {
                    return Err(invoke_error(
                        StatusCode::BAD_GATEWAY,
                        app,
                        format!("{} failed mid-request: {}", pod.key(), e.into_error()),
                    ))
                }
            },
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop(&mut parts.headers);
        let body = rt.pool.body(addr, sender, body);
        return Ok(Response::from_parts(parts, body));
    }
    Err(invoke_error(
        StatusCode::SERVICE_UNAVAILABLE,
        app,
        format!("no endpoint reachable: {}", tried.join("; ")),
    ))
}

/// Where a pod's app listens.
fn endpoint(p: &AppPod) -> SocketAddr {
    SocketAddr::new(p.ips[0], p.app_port.unwrap_or(80))
}

fn check_access(
    rt: &Runtime,
    caller: &Caller,
    app: &str,
    target: &AppPod,
    verb: &str,
    method: &str,
) -> Result<(), ApiError> {
    let Some(config) = &target.config else {
        return Ok(());
    };
    let registry = rt.registry();
    let Some(acl) = registry.configs.get(config) else {
        // Fail closed: the app asked for a policy the runtime cannot see.
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ERR_DIRECT_INVOKE",
            format!("app {app} uses Configuration {config}, which the runtime has not found; access denied"),
        ));
    };
    let who = CallerId {
        app_id: caller.app_id(),
        namespace: caller.namespace(),
    };
    match acl.decide(who, verb, method) {
        Action::Allow => Ok(()),
        Action::Deny => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ERR_DIRECT_INVOKE",
            format!(
                "access control policy has denied access to id: {app} operation: {method} verb: {verb} (caller {})",
                caller.app_id().unwrap_or("without app id")
            ),
        )),
    }
}

/// Rewrites the request for the target: origin-form URI `/method?query`,
/// hop-by-hop and identity headers replaced, trace context carried on.
fn prepare(
    req: &mut Request<Body>,
    caller: &Caller,
    app: &str,
    method: &str,
) -> Result<(), ApiError> {
    let pq = match req.uri().query() {
        Some(q) => format!("/{method}?{q}"),
        None => format!("/{method}"),
    };
    *req.uri_mut() = pq
        .parse()
        .map_err(|e| ApiError::malformed(format!("method path {method:?}: {e}")))?;
    let h = req.headers_mut();
    strip_hop(h);
    for k in [CALLER_APP, CALLER_NS, CALLEE_APP] {
        h.remove(k);
    }
    if let Some(id) = caller.app_id().and_then(|a| HeaderValue::from_str(a).ok()) {
        h.insert(HeaderName::from_static(CALLER_APP), id);
    }
    if let Some(ns) = caller
        .namespace()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        h.insert(HeaderName::from_static(CALLER_NS), ns);
    }
    if let Ok(v) = HeaderValue::from_str(app) {
        h.insert(HeaderName::from_static(CALLEE_APP), v);
    }
    let tp = crate::trace::next(h.get("traceparent").and_then(|v| v.to_str().ok()));
    if let Ok(v) = HeaderValue::from_str(&tp) {
        h.insert(HeaderName::from_static("traceparent"), v);
    }
    Ok(())
}

fn strip_hop(h: &mut HeaderMap) {
    // Headers the Connection header lists are hop-by-hop too.
    let listed: Vec<String> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for k in HOP.iter().map(|s| s.to_string()).chain(listed) {
        h.remove(k.as_str());
    }
}
