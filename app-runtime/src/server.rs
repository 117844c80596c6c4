//! Accepting connections (TCP on the pods' gateway address, HTTP over the
//! unix socket in the directory the CRI shim mounts into containers),
//! learning each connection's caller from the kernel, and routing the
//! Dapr v1.0 HTTP API.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::dapr::{self, ApiError};
use crate::directory::{canonical, AppPod};
use crate::{peer, Error, Result, Runtime};

/// Every response body: a buffered one or the target app's streamed one.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

pub fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// The kernel's fact about a connection's other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// TCP: the source address.
    Addr(IpAddr),
    /// Unix socket: the container id found in the peer process's cgroup
    /// (`None`: a process outside any container, i.e. on the node).
    Container(Option<String>),
}

/// Who is calling, resolved per request from the current directory.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A pod of this node.
    Pod(Arc<AppPod>),
    /// A process of the node itself (loopback, or outside containers).
    Node,
    /// Neither: the runtime knows no pod at that address or container.
    Unknown(String),
}

impl Caller {
    pub fn app_id(&self) -> Option<&str> {
        match self {
            Caller::Pod(p) => p.app_id.as_deref(),
            _ => None,
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match self {
            Caller::Pod(p) => Some(&p.namespace),
            _ => None,
        }
    }

    /// For messages: `pod ns/name`, `the node`, or what is unknown.
    pub fn describe(&self) -> String {
        match self {
            Caller::Pod(p) => format!("pod {}", p.key()),
            Caller::Node => "a process of the node".into(),
            Caller::Unknown(why) => why.clone(),
        }
    }
}

impl Runtime {
    pub fn caller(&self, peer: &Peer) -> Caller {
        let dir = self.directory();
        match peer {
            Peer::Addr(ip) => {
                let ip = canonical(*ip);
                if ip.is_loopback() {
                    return Caller::Node;
                }
                match dir.by_ip(ip) {
                    Some(p) => Caller::Pod(p.clone()),
                    None => Caller::Unknown(format!("{ip} (no pod of this node has that address)")),
                }
            }
            Peer::Container(None) => Caller::Node,
            Peer::Container(Some(id)) => {
                let found = dir.by_container(id).cloned().or_else(|| {
                    let (ns, name) = self.pod_of_container(id)?;
                    dir.by_key(&ns, &name).cloned()
                });
                match found {
                    Some(p) => Caller::Pod(p),
                    None => {
                        Caller::Unknown(format!("container {id} (no pod of this node runs it)"))
                    }
                }
            }
        }
    }
}

/// Serves TCP connections until the listener fails.
pub async fn serve_tcp(rt: Arc<Runtime>, listener: tokio::net::TcpListener) -> Result<()> {
    loop {
        let (stream, from): (_, SocketAddr) = listener
            .accept()
            .await
            .map_err(|e| Error::io("accept on the runtime's TCP address", e))?;
        let _ = stream.set_nodelay(true);
        spawn_conn(rt.clone(), stream, Peer::Addr(from.ip()));
    }
}

/// Binds the unix socket (bind to a temporary name, then rename, so a
/// client never finds a half-made socket) and serves it.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let l = tokio::net::UnixListener::bind(&tmp)
        .map_err(|e| Error::io(format!("bind {}", tmp.display()), e))?;
    // Pods run as any user: the socket must be connectable by all; who
    // calls is decided by the peer's credentials, not by file modes.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666));
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
    Ok(l)
}

pub async fn serve_unix(rt: Arc<Runtime>, listener: tokio::net::UnixListener) -> Result<()> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| Error::io("accept on the runtime's socket", e))?;
        let peer = Peer::Container(peer::container_of(&stream));
        spawn_conn(rt.clone(), stream, peer);
    }
}

fn spawn_conn<S>(rt: Arc<Runtime>, stream: S, peer: Peer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let (rt, peer) = (rt.clone(), peer.clone());
            async move { Ok::<_, Infallible>(handle(rt, &peer, req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    });
}

/// Routes one request.
pub async fn handle(rt: Arc<Runtime>, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
    let caller = rt.caller(peer);
    let path = req.uri().path().to_string();
    for (prefix, unlock) in [
        ("/v1.0-alpha1/lock/", false),
        ("/v1.0-alpha1/unlock/", true),
    ] {
        if let Some(store) = path.strip_prefix(prefix) {
            let store = store.to_string();
            return crate::lock_api::handle(&rt, &caller, unlock, &store, req).await;
        }
    }
    if let Some(tail) = path.strip_prefix("/v1.0-alpha1/publish/bulk/") {
        let tail = tail.to_string();
        return crate::pubsub_api::handle_bulk(&rt, &caller, &tail, req).await;
    }
    if let Some(tail) = path
        .strip_prefix("/v1.0/configuration/")
        .or_else(|| path.strip_prefix("/v1.0-alpha1/configuration/"))
    {
        let tail = tail.to_string();
        return crate::config_api::handle(&rt, &caller, &tail, req).await;
    }
    let Some(rest) = path.strip_prefix("/v1.0/") else {
        return ApiError::not_found(&path).into_response();
    };
    let segs: Vec<&str> = rest.splitn(2, '/').collect();
    match (segs[0], segs.get(1).copied().unwrap_or("")) {
        ("invoke", tail) => match tail.split_once("/method/") {
            Some((app, method)) if !app.is_empty() => {
                let (app, method) = (app.to_string(), method.to_string());
                crate::invoke::invoke(&rt, &caller, &app, &method, req).await
            }
            _ => ApiError::new(
                StatusCode::BAD_REQUEST,
                "ERR_DIRECT_INVOKE",
                "expected /v1.0/invoke/{app-id}/method/{method}",
            )
            .into_response(),
        },
        ("publish", tail) => crate::pubsub_api::handle(&rt, &caller, tail, req).await,
        ("bindings", tail) if !tail.is_empty() && !tail.contains('/') => {
            crate::bindings::handle(&rt, &caller, tail, req).await
        }
        ("state", tail) if !tail.is_empty() => {
            crate::state_api::handle(&rt, &caller, tail, req).await
        }
        ("secrets", tail) => crate::secrets::handle(&rt, &caller, tail, req).await,
        ("healthz", "") if req.method() == Method::GET => {
            if rt.is_ready() {
                dapr::no_content()
            } else {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_HEALTH_NOT_READY",
                    "dapr is not ready",
                )
                .into_response()
            }
        }
        ("healthz", "outbound") if req.method() == Method::GET => {
            if rt.outbound_ready().await {
                dapr::no_content()
            } else {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_OUTBOUND_HEALTH_NOT_READY",
                    "dapr outbound is not ready",
                )
                .into_response()
            }
        }
        ("metadata", "") if req.method() == Method::GET => rt.metadata(&caller),
        _ => ApiError::not_found(&path).into_response(),
    }
}
