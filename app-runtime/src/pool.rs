//! HTTP/1.1 connections to app pods, pooled per address, with a circuit
//! breaker per address.
//!
//! Connecting is separate from sending, so a connection failure is retried
//! before any byte of the request left (the body is streamed and cannot be
//! replayed), and a pooled connection the app closed meanwhile gives the
//! request back (`try_send_request`) to go out on a fresh one. A
//! connection returns to the pool when the response body has been read to
//! its end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::server::Body;

/// Idle connections kept per address.
const MAX_IDLE: usize = 64;
/// Consecutive connection failures that open an address's breaker ...
const TRIP_AFTER: u32 = 3;
/// ... for this long.
const OPEN_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<SendRequest<Body>>>>,
    breakers: Mutex<HashMap<SocketAddr, Breaker>>,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            connect_timeout,
        })
    }

    /// Is the address's breaker open (recent connection failures)?
    pub fn is_open(&self, addr: SocketAddr) -> bool {
        let b = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        b.get(&addr)
            .and_then(|b| b.open_until)
            .is_some_and(|t| Instant::now() < t)
    }

    pub fn record(&self, addr: SocketAddr, ok: bool) {
        let mut all = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            all.remove(&addr);
            return;
        }
        let b = all.entry(addr).or_default();
        b.failures += 1;
        if b.failures >= TRIP_AFTER {
            b.open_until = Some(Instant::now() + OPEN_FOR);
            tracing::warn!(%addr, failures = b.failures, "app endpoint unreachable: circuit open");
        }
    }

    /// An idle connection, if one is usable.
    pub async fn idle(&self, addr: SocketAddr) -> Option<SendRequest<Body>> {
        loop {
            let mut s = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(&addr)?.pop()?
            };
            if s.is_closed() {
                continue;
            }
            if s.ready().await.is_ok() {
                return Some(s);
            }
        }
    }

    /// A new connection (records the outcome in the breaker).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<SendRequest<Body>> {
        let r = self.connect_untracked(addr).await;
        self.record(addr, r.is_ok());
        r
    }

    /// A new connection whose outcome the breaker does not see: for the
    /// runtime's own calls to apps (subscription discovery, pub/sub
    /// deliveries), which retry on their own schedule. An app that starts
    /// listening a moment after its pod is ready fails those first calls,
    /// and they must not open the circuit that invocations are refused by.
    pub async fn connect_untracked(&self, addr: SocketAddr) -> std::io::Result<SendRequest<Body>> {
        async {
            let stream =
                tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                    })??;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
        .await
    }

    fn put_back(&self, addr: SocketAddr, s: SendRequest<Body>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let v = idle.entry(addr).or_default();
        if v.len() < MAX_IDLE {
            v.push(s);
        }
    }

    /// The response body, returning the connection to the pool at its end.
    pub fn body(
        self: &Arc<Self>,
        addr: SocketAddr,
        sender: SendRequest<Body>,
        inner: Incoming,
    ) -> Body {
        use http_body_util::BodyExt;
        if hyper::body::Body::is_end_stream(&inner) {
            // Nothing to read (e.g. 204): hyper's server may never poll it.
            self.put_back(addr, sender);
            return inner.boxed_unsync();
        }
        PooledBody {
            inner,
            back: Some((self.clone(), addr, sender)),
        }
        .boxed_unsync()
    }
}

struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, SocketAddr, SendRequest<Body>)>,
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        // The end is either a final `None` or, for a body of known length,
        // the frame after which the body reports its end (a server may
        // never poll again once it sees that).
        let done = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if done {
            if let Some((pool, addr, s)) = self.back.take() {
                pool.put_back(addr, s);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback port nothing listens on (bound, then closed).
    fn refused() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn only_tracked_connection_failures_open_the_breaker() {
        let pool = Pool::new(Duration::from_secs(1));
        let addr = refused();
        for _ in 0..TRIP_AFTER * 2 {
            assert!(pool.connect_untracked(addr).await.is_err());
        }
        assert!(
            !pool.is_open(addr),
            "the runtime's own calls (deliveries, discovery) must not open it"
        );
        for _ in 0..TRIP_AFTER {
            assert!(pool.connect(addr).await.is_err());
        }
        assert!(pool.is_open(addr), "invocations' failures open it");
    }
}
