//! HTTP/2 connections to the runtime's CRI socket, shared by every call.
//!
//! A connection multiplexes any number of calls, so a handful are enough;
//! calls pick one round-robin. A slot whose connection closed (containerd
//! restarted) is re-dialled by the first call that finds it closed; the
//! short std mutex per slot guards only a handle clone, never a call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::Body;
use crate::io::{Coalesced, Socket};
use crate::{Error, Result};

/// How long dialling the runtime may take before the call fails UNAVAILABLE.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Upstream {
    path: PathBuf,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Slot {
    conn: Mutex<Option<SendRequest<Body>>>,
    /// Serialises re-dialling of this slot only (one dial, not one per call).
    dial: tokio::sync::Mutex<()>,
}

impl Upstream {
    pub fn new(path: &Path, connections: usize) -> Self {
        Upstream {
            path: path.to_path_buf(),
            slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A ready handle on a live connection, dialling one if needed.
    pub async fn sender(&self) -> Result<SendRequest<Body>> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        if let Some(s) = live(&slot.conn) {
            return Ok(s);
        }
        let _dialling = slot.dial.lock().await;
        if let Some(s) = live(&slot.conn) {
            return Ok(s);
        }
        let s = tokio::time::timeout(DIAL_TIMEOUT, self.dial())
            .await
            .map_err(|_| self.error("timed out connecting"))??;
        *lock(&slot.conn) = Some(s.clone());
        Ok(s)
    }

    async fn dial(&self) -> Result<SendRequest<Body>> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| self.error(e))?;
        let stream = Socket::new(stream).map_err(|e| self.error(e))?;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // Windows large enough that a big ListContainers answer or an
            // image pull's progress is not paced by flow control.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false);
        let (sender, conn) = builder
            .handshake(TokioIo::new(Coalesced::new(stream)))
            .await
            .map_err(|e| self.error(e))?;
        let path = self.path.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(runtime = %path.display(), error = %e, "runtime connection closed");
            } else {
                tracing::info!(runtime = %path.display(), "runtime connection closed");
            }
        });
        tracing::debug!(runtime = %self.path.display(), "connected to the runtime");
        Ok(sender)
    }

    fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Runtime {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}

fn live(conn: &Mutex<Option<SendRequest<Body>>>) -> Option<SendRequest<Body>> {
    lock(conn).as_ref().filter(|s| !s.is_closed()).cloned()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
