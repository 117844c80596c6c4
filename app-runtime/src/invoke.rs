//! `/v1.0/invoke/{app-id}/method/{method}`: service invocation.
//!
//! The target is resolved from the pod directory (ready pods carrying the
//! app id, load-balanced round robin), access control of the target's
//! Configuration is checked against the caller's kernel-derived identity,
//! and the request goes straight to the target pod's app port: method,
//! path, query, headers and body as the caller sent them (bodies over
//! 64 KiB or of unknown length streamed both ways), plus `dapr-caller-app-id` set by the runtime
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

/// Bodies of known length up to this size are read whole before they go
/// on, both ways. The next hop then gets headers and body in one write
/// (one TLS record between agents) instead of a write per frame: across
/// nodes that took node 1's agent from about 3 writev calls per 1 KB
/// invocation to 2. Larger or unknown-length bodies stream.
const WHOLE_BODY: u64 = 64 * 1024;

/// `body`, read whole when it is small and of known length.
async fn whole_if_small(body: Body) -> Result<Body, hyper::Error> {
    use hyper::body::Body as _;
    match body.size_hint().exact() {
        Some(n) if n <= WHOLE_BODY && !body.is_end_stream() => {
            let bytes = body.collect().await?.to_bytes();
            Ok(http_body_util::Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync())
        }
        _ => Ok(body),
    }
}

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
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(parts, body.boxed_unsync());
    prepare(&mut req, caller.app_id(), caller.namespace(), app, method)?;
    send(rt, app, &endpoints, req).await
}

/// An invocation another node's agent sent for a pod of this node: the
/// caller headers it set stay, the rest is prepared as for a local caller.
pub async fn forward_local(
    rt: &Runtime,
    app: &str,
    method: &str,
    pods: &[Arc<AppPod>],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if pods.is_empty() {
        return Err(invoke_error(
            StatusCode::SERVICE_UNAVAILABLE,
            app,
            "no ready pod of the app on this node (it moved or stopped)",
        ));
    }
    let h = req.headers();
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (caller_app, caller_ns) = (get(CALLER_APP), get(CALLER_NS));
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(parts, body.boxed_unsync());
    req.headers_mut().remove(crate::mesh::TARGET_NS);
    prepare(
        &mut req,
        caller_app.as_deref(),
        caller_ns.as_deref(),
        app,
        method,
    )?;
    send(rt, app, pods, req).await
}

/// Where an endpoint is reached: a pod of this node directly, a pod
/// elsewhere through its node's agent (None: not reachable from here).
fn target(rt: &Runtime, p: &AppPod) -> Option<SocketAddr> {
    match (p.local, p.host_ip, &rt.peers) {
        (true, _, _) => Some(endpoint(p)),
        (false, Some(host), Some(peers)) => Some(peers.addr(host)),
        _ => None,
    }
}

/// Sends a prepared request to the first endpoint that takes it.
async fn send(
    rt: &Runtime,
    app: &str,
    endpoints: &[Arc<AppPod>],
    req: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    if !endpoints.iter().any(|p| target(rt, p).is_some()) {
        return Err(invoke_error(
            StatusCode::SERVICE_UNAVAILABLE,
            app,
            "every pod of the app runs on another node, and this agent cannot reach it (the pod's status.hostIP is unknown, or --peer-listen is off)",
        ));
    }
    let candidates: Vec<(&Arc<AppPod>, SocketAddr)> = endpoints
        .iter()
        .filter_map(|p| target(rt, p).map(|a| (p, a)))
        .filter(|(_, a)| !rt.pool.is_open(*a))
        .collect();
    if candidates.is_empty() {
        return Err(invoke_error(
            StatusCode::SERVICE_UNAVAILABLE,
            app,
            "every pod of the app failed its recent connections (circuit open; retried after 5 s)",
        ));
    }
    let (parts, body) = req.into_parts();
    let body = whole_if_small(body).await.map_err(|e| {
        ApiError::malformed(format!("the caller's request body could not be read: {e}"))
    })?;
    let mut req = Request::from_parts(parts, body);
    let mut tried = Vec::new();
    for (pod, addr) in candidates
        .iter()
        .cycle()
        .take(ATTEMPTS.max(candidates.len()))
    {
        let attempt = if pod.local {
            to_pod(rt, app, pod, *addr, req).await
        } else {
            to_peer(rt, app, pod, *addr, req).await
        };
        match attempt {
            Attempt::Done(Ok(resp)) => {
                let (parts, body) = resp.into_parts();
                let body = whole_if_small(body)
                    .await
                    .map_err(|e| invoke_error(StatusCode::BAD_GATEWAY, app, e))?;
                return Ok(Response::from_parts(parts, body));
            }
            Attempt::Done(r) => return r,
            // Nothing was sent: the next endpoint gets the request.
            Attempt::NotSent(back, why) => {
                req = back;
                tried.push(why);
                tokio::time::sleep(Duration::from_millis(5 << tried.len().min(4))).await;
            }
        }
    }
    Err(invoke_error(
        StatusCode::SERVICE_UNAVAILABLE,
        app,
        format!("no endpoint reachable: {}", tried.join("; ")),
    ))
}

/// One attempt's outcome: an answer (or a failure after sending, never
/// repeated since the method may not be idempotent), or the request back.
enum Attempt {
    Done(Result<Response<Body>, ApiError>),
    NotSent(Request<Body>, String),
}

fn timed_out(app: &str, pod: &AppPod, limit: Duration) -> ApiError {
    invoke_error(
        StatusCode::GATEWAY_TIMEOUT,
        app,
        format!("{} did not answer within {limit:?}", pod.key()),
    )
}

async fn to_pod(
    rt: &Runtime,
    app: &str,
    pod: &AppPod,
    addr: SocketAddr,
    req: Request<Body>,
) -> Attempt {
    let limit = rt.opts.invoke_timeout;
    let mut sender = match rt.pool.idle(addr).await {
        Some(s) => s,
        None => match rt.pool.connect(addr).await {
            Ok(s) => s,
            Err(e) => return Attempt::NotSent(req, format!("{} ({addr}): {e}", pod.key())),
        },
    };
    let resp = match tokio::time::timeout(limit, sender.try_send_request(req)).await {
        Err(_) => return Attempt::Done(Err(timed_out(app, pod, limit))),
        Ok(Ok(resp)) => resp,
        Ok(Err(mut e)) => match e.take_message() {
            // The pooled connection had closed meanwhile: once more on a
            // fresh one.
            Some(back) => {
                sender = match rt.pool.connect(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        return Attempt::NotSent(back, format!("{} ({addr}): {e}", pod.key()))
                    }
                };
                match tokio::time::timeout(limit, sender.send_request(back)).await {
                    Err(_) => return Attempt::Done(Err(timed_out(app, pod, limit))),
                    Ok(Err(e)) => {
                        return Attempt::Done(Err(invoke_error(StatusCode::BAD_GATEWAY, app, e)))
                    }
                    Ok(Ok(r)) => r,
                }
            }
            None => {
                return Attempt::Done(Err(invoke_error(
                    StatusCode::BAD_GATEWAY,
                    app,
                    format!("{} failed mid-request: {}", pod.key(), e.into_error()),
                )))
            }
        },
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop(&mut parts.headers);
    let body = rt.pool.body(addr, sender, body);
    Attempt::Done(Ok(Response::from_parts(parts, body)))
}

async fn to_peer(
    rt: &Runtime,
    app: &str,
    pod: &AppPod,
    addr: SocketAddr,
    mut req: Request<Body>,
) -> Attempt {
    let Some(peers) = &rt.peers else {
        return Attempt::NotSent(req, format!("{}: no peer connections", pod.key()));
    };
    let mut sender = match peers.conn(addr).await {
        Ok(s) => {
            rt.pool.record(addr, true);
            s
        }
        Err(e) => {
            rt.pool.record(addr, false);
            return Attempt::NotSent(req, format!("{} via peer {addr}: {e}", pod.key()));
        }
    };
    // The peer gets the invoke path again (and the target's namespace);
    // it prepares the request for its pod.
    let pq = req
        .uri()
        .path_and_query()
        .map_or("", |p| p.as_str())
        .trim_start_matches('/')
        .to_string();
    let uri = format!(
        "https://{}/v1.0/invoke/{app}/method/{pq}",
        crate::mesh::PEER_NAME
    );
    match uri.parse() {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => {
            return Attempt::Done(Err(ApiError::malformed(format!("method path {pq:?}: {e}"))))
        }
    }
    if let Ok(v) = HeaderValue::from_str(&pod.namespace) {
        req.headers_mut()
            .insert(HeaderName::from_static(crate::mesh::TARGET_NS), v);
    }
    let limit = rt.opts.invoke_timeout;
    match tokio::time::timeout(limit, sender.send_request(req)).await {
        Err(_) => Attempt::Done(Err(timed_out(app, pod, limit))),
        Ok(Err(e)) => Attempt::Done(Err(crate::mesh::peer_error(app, addr, e))),
        Ok(Ok(resp)) => {
            let (parts, body) = resp.into_parts();
            Attempt::Done(Ok(Response::from_parts(parts, body.boxed_unsync())))
        }
    }
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
    let Some(acl) = registry.config(config, &target.namespace) else {
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
    caller_app: Option<&str>,
    caller_ns: Option<&str>,
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
    if let Some(id) = caller_app.and_then(|a| HeaderValue::from_str(a).ok()) {
        h.insert(HeaderName::from_static(CALLER_APP), id);
    }
    if let Some(ns) = caller_ns.and_then(|a| HeaderValue::from_str(a).ok()) {
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
