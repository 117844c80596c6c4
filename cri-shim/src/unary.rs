//! Unary calls to the runtime over h2 directly, without hyper's client.
//!
//! hyper's HTTP/2 client hands every request over a channel to its
//! connection task and spawns a task per call to await the answer (and
//! another to send the body when it cannot go at once). A unary call the
//! shim has read whole needs none of that: here the calling task opens the
//! stream, queues headers, data and trailers, and reads the answer itself.
//! Streams, hooked calls and the shim's own calls keep the hyper path
//! ([`crate::upstream`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};

use crate::body::Chunks;
use crate::io::{Coalesced, Socket};
use crate::{Error, Result};

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Unary {
    path: PathBuf,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Slot {
    conn: Mutex<Option<Conn>>,
    dial: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection task ended (containerd went away).
    closed: Arc<AtomicBool>,
}

impl Unary {
    pub fn new(path: &Path, connections: usize) -> Self {
        Unary {
            path: path.to_path_buf(),
            slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Relays one whole request; the answer's headers, data chunks and
    /// trailers as they came. `Error::Runtime` when the call did not get
    /// through, `Error::Malformed` when its answer broke off.
    pub async fn call(&self, req: Request<Chunks>, limit: usize) -> Result<Response<Chunks>> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let mut conn = self.conn(slot).await?;
        if std::future::poll_fn(|cx| conn.send.poll_ready(cx))
            .await
            .is_err()
        {
            // Found dead just before use (containerd restarted): nothing
            // was sent yet, so one fresh connection may carry it.
            conn.closed.store(true, Ordering::Relaxed);
            conn = self.conn(slot).await?;
            std::future::poll_fn(|cx| conn.send.poll_ready(cx))
                .await
                .map_err(|e| self.error(e))?;
        }
        let (mut parts, body) = req.into_parts();
        // h2 refuses HTTP/1 connection headers (hyper's client drops them
        // silently); a gRPC client sends none, but one must not break a call.
        for h in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            parts.headers.remove(h);
        }
        if parts
            .headers
            .get(http::header::TE)
            .is_some_and(|v| v != "trailers")
        {
            parts.headers.remove(http::header::TE);
        }
        let Chunks { data, trailers } = body;
        let end = data.is_empty() && trailers.is_none();
        let (answer, mut stream) = conn
            .send
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(|e| self.error(e))?;
        let n = data.len();
        for (i, d) in data.into_iter().enumerate() {
            let last = i + 1 == n && trailers.is_none();
            stream.send_data(d, last).map_err(|e| self.error(e))?;
        }
        if let Some(t) = trailers {
            stream.send_trailers(t).map_err(|e| self.error(e))?;
        }
        let (rparts, mut rbody) = answer.await.map_err(|e| self.error(e))?.into_parts();
        let mut chunks = Chunks::default();
        let mut len = 0usize;
        while let Some(d) = rbody.data().await {
            let d = d.map_err(|e| Error::malformed("runtime answer", e))?;
            // Read whole, so the window is given back at once.
            let _ = rbody.flow_control().release_capacity(d.len());
            len += d.len();
            if len > limit {
                return Err(Error::malformed(
                    "runtime answer",
                    format!("larger than {limit} bytes"),
                ));
            }
            if !d.is_empty() {
                chunks.data.push(d);
            }
        }
        chunks.trailers = rbody
            .trailers()
            .await
            .map_err(|e| Error::malformed("runtime answer", e))?;
        Ok(Response::from_parts(rparts, chunks))
    }

    async fn conn(&self, slot: &Slot) -> Result<Conn> {
        if let Some(c) = live(&slot.conn) {
            return Ok(c);
        }
        let _dialling = slot.dial.lock().await;
        if let Some(c) = live(&slot.conn) {
            return Ok(c);
        }
        let c = tokio::time::timeout(DIAL_TIMEOUT, self.dial())
            .await
            .map_err(|_| self.error("timed out connecting"))??;
        *lock(&slot.conn) = Some(c.clone());
        Ok(c)
    }

    async fn dial(&self) -> Result<Conn> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| self.error(e))?;
        let io = Coalesced::new(Socket::new(stream).map_err(|e| self.error(e))?);
        let (send, conn) = h2::client::Builder::new()
            // As the hyper path: a big ListContainers answer is not paced
            // by flow control.
            .initial_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| self.error(e))?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let path = self.path.clone();
        tokio::spawn(async move {
            match conn.await {
                Err(e) => {
                    tracing::warn!(runtime = %path.display(), error = %e, path = "unary", "runtime connection closed")
                }
                Ok(()) => {
                    tracing::info!(runtime = %path.display(), path = "unary", "runtime connection closed")
                }
            }
            flag.store(true, Ordering::Relaxed);
        });
        Ok(Conn { send, closed })
    }

    fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Runtime {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}

fn live(conn: &Mutex<Option<Conn>>) -> Option<Conn> {
    lock(conn)
        .as_ref()
        .filter(|c| !c.closed.load(Ordering::Relaxed))
        .cloned()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
