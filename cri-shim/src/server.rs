//! The listening side: HTTP/2 (gRPC) on the kubelet's unix socket, one
//! task per connection, each call handled independently; graceful stop.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixListener;

use crate::deliver::Hooks;
use crate::io::{Coalesced, Socket};
use crate::relay::Relay;
use crate::{Config, Error, Result};

/// How long in-flight calls get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

/// Binds the socket (replacing a stale one left by a killed shim).
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(
                format!("remove stale socket {}", path.display()),
                e,
            ))
        }
    }
    // Bound and listening under a temporary name first, then renamed into
    // place: a client that sees the path can connect. Bound at the final
    // name, the path exists a moment before listen(2), and a client quick
    // enough (a test right after start-up, a kubelet retrying) gets
    // ECONNREFUSED.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| Error::io(format!("bind {} (--listen)", tmp.display()), e))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(
            format!("rename {} to {} (--listen)", tmp.display(), path.display()),
            e,
        ));
    }
    Ok(listener)
}

/// Runs the shim until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<()> {
    // Handlers first: once the socket exists a supervisor may stop us, and
    // a SIGTERM before the handler would take the default action, killing
    // the shim with its socket file left behind.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT handler", e))?;
    if let Some(inj) = &cfg.inject {
        // The bind mount's source must exist or every CreateContainer fails.
        std::fs::create_dir_all(&inj.host_dir).map_err(|e| {
            Error::io(
                format!("create {} (--runtime-dir)", inj.host_dir.display()),
                e,
            )
        })?;
    }
    let hooks = cfg
        .agent
        .as_ref()
        .map(|p| Hooks::start(p, cfg.agent_timeout, cfg.hook_queue));
    let listener = bind(&cfg.listen)?;
    let relay = Arc::new(Relay::new(cfg.clone(), hooks.clone()));
    if let Some(h) = &hooks {
        tokio::spawn(crate::resync::run(
            relay.clone(),
            h.clone(),
            cfg.agent_resync,
        ));
    }
    if let Some(addr) = cfg.metrics_listen {
        let (m, h) = (relay.metrics.clone(), hooks.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m, h).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    tracing::info!(listen = %cfg.listen.display(), runtime = %cfg.runtime.display(),
        agent = ?cfg.agent, inject = cfg.inject.is_some(), "nodeplane-cri-shim relaying");

    let active = Arc::new(AtomicUsize::new(0));
    tokio::select! {
        _ = accept(listener, relay, active.clone()) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // New calls find no socket (the kubelet retries against the next
    // shim); calls in flight get a moment to finish.
    let _ = std::fs::remove_file(&cfg.listen);
    let deadline = tokio::time::Instant::now() + DRAIN;
    while active.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(unfinished = active.load(Ordering::Relaxed), "stopped");
    Ok(())
}

async fn accept(listener: UnixListener, relay: Arc<Relay>, active: Arc<AtomicUsize>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the CRI socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(relay.clone(), active.clone(), stream));
    }
}

/// Serves one kubelet connection: with the frame relay over a containerd
/// connection of its own, or (`--relay h2`, or containerd unreachable just
/// now) with the h2 relay.
async fn connection(relay: Arc<Relay>, active: Arc<AtomicUsize>, stream: tokio::net::UnixStream) {
    if !relay.frames() {
        return serve_h2(relay, active, stream, false).await;
    }
    match tokio::net::UnixStream::connect(relay.runtime_path()).await {
        Ok(runtime) => crate::frames::serve(relay, stream, runtime, active).await,
        Err(e) => {
            tracing::warn!(runtime = %relay.runtime_path().display(), error = %e,
                "runtime unreachable; this kubelet connection is relayed call by call until it is back");
            serve_h2(relay, active, stream, true).await
        }
    }
}

/// The h2 relay for one kubelet connection. `until_runtime`: the frame
/// relay could not reach containerd; each call here is answered (with
/// UNAVAILABLE naming the runtime while it is down), and once containerd
/// accepts connections again this one is closed gracefully (GOAWAY), so
/// the client's next connection gets the frame relay.
async fn serve_h2(
    relay: Arc<Relay>,
    active: Arc<AtomicUsize>,
    stream: tokio::net::UnixStream,
    until_runtime: bool,
) {
    let runtime = relay.runtime_path().to_path_buf();
    let svc = hyper::service::service_fn(move |req| {
        let relay = relay.clone();
        let active = active.clone();
        async move {
            active.fetch_add(1, Ordering::Relaxed);
            let r = relay.handle(req).await;
            active.fetch_sub(1, Ordering::Relaxed);
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(None)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        // Relay the runtime's headers as they are: no Date added.
        .auto_date_header(false);
    let stream = match Socket::new(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "registering a kubelet connection");
            return;
        }
    };
    let conn = b.serve_connection(TokioIo::new(Coalesced::new(stream)), svc);
    tokio::pin!(conn);
    let r = if until_runtime {
        tokio::select! {
            r = conn.as_mut() => r,
            () = runtime_back(&runtime) => {
                tracing::info!(runtime = %runtime.display(),
                    "runtime reachable again; closing this kubelet connection (GOAWAY) so its next one gets the frame relay");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        conn.await
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "kubelet connection ended");
    }
}

/// Returns once the runtime's socket accepts a connection.
pub(crate) async fn runtime_back(path: &Path) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
    }
}
