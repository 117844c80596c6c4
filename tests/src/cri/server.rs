//! A gRPC server on a unix socket that plays the CRI runtime for what
//! containerd 1.6 cannot show: GetContainerEvents as a real stream (counted
//! as produced, so back-pressure and cancellation are visible), and a probe
//! method that echoes the metadata and deadline it received and answers
//! with a chosen status, message and trailers. Written on hyper directly
//! so it can answer any path.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_cri::v1::ContainerEventResponse;
use nodeplane_proto::prost::Message;
use tokio::sync::mpsc;

/// The probe: echoes its request message; trailers carry `x-echo-<h>` for
/// every request header `x-test-*` and for grpc-timeout; the status is
/// taken from request header `x-want-status` (message `x-want-message`).
pub const PROBE: &str = "/nodeplane.test.v1.Probe/Echo";
pub const EVENTS: &str = "/runtime.v1.RuntimeService/GetContainerEvents";

/// What the stream side saw.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Events handed to the transport so far (a channel of 1 in front of
    /// HTTP/2 flow control, so this only grows when the consumer makes room).
    pub produced: AtomicU64,
    /// The consumer went away before the stream ended.
    pub cancelled: AtomicBool,
    pub finished: AtomicBool,
}

#[derive(Debug)]
pub struct TestServer {
    pub socket: PathBuf,
    /// One entry per GetContainerEvents call, in arrival order.
    pub streams: Arc<std::sync::Mutex<Vec<Arc<StreamStats>>>>,
    task: tokio::task::JoinHandle<()>,
    /// Connection tasks, aborted on drop so the "runtime" really goes away.
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TestServer {
    /// Serves at `socket`; GetContainerEvents streams `events` events of
    /// about `event_size` bytes each, container ids "c0", "c1", ...
    pub fn start(socket: &Path, events: u64, event_size: usize) -> TestServer {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).expect("bind test CRI server");
        let streams: Arc<std::sync::Mutex<Vec<Arc<StreamStats>>>> = Arc::default();
        let st = streams.clone();
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let c = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let st = st.clone();
                let conn = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                handle(req, st, events, event_size).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
                c.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn.abort_handle());
            }
        });
        TestServer {
            socket: socket.to_path_buf(),
            streams,
            task,
            conns,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Frames from a channel, as a response body.
struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 5);
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

fn grpc_headers(r: &mut HeaderMap) {
    r.insert("content-type", HeaderValue::from_static("application/grpc"));
}

async fn handle(
    req: Request<Incoming>,
    streams: Arc<std::sync::Mutex<Vec<Arc<StreamStats>>>>,
    events: u64,
    size: usize,
) -> Response<ChannelBody> {
    let (parts, body) = req.into_parts();
    let data = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel(1);
    let mut resp = Response::new(ChannelBody(rx));
    grpc_headers(resp.headers_mut());
    match parts.uri.path() {
        EVENTS => {
            let st = Arc::new(StreamStats::default());
            streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(st.clone());
            tokio::spawn(async move {
                for i in 0..events {
                    let ev = ContainerEventResponse {
                        container_id: format!("c{i}"),
                        created_at: i as i64,
                        pod_sandbox_status: Some(k8s_cri::v1::PodSandboxStatus {
                            annotations: [("pad".to_string(), "x".repeat(size))].into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    if tx
                        .send(Frame::data(frame(&ev.encode_to_vec())))
                        .await
                        .is_err()
                    {
                        st.cancelled.store(true, Ordering::Relaxed);
                        return;
                    }
                    st.produced.fetch_add(1, Ordering::Relaxed);
                }
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from_static("0"));
                if tx.send(Frame::trailers(t)).await.is_ok() {
                    st.finished.store(true, Ordering::Relaxed);
                }
            });
        }
        PROBE => {
            let mut t = HeaderMap::new();
            for (k, v) in &parts.headers {
                if let Some(rest) = k.as_str().strip_prefix("x-test-") {
                    if let Ok(name) = http::HeaderName::try_from(format!("x-echo-{rest}")) {
                        t.append(name, v.clone());
                    }
                }
            }
            if let Some(v) = parts.headers.get("grpc-timeout") {
                t.insert("x-echo-grpc-timeout", v.clone());
            }
            let code = parts
                .headers
                .get("x-want-status")
                .cloned()
                .unwrap_or(HeaderValue::from_static("0"));
            t.insert("grpc-status", code);
            if let Some(m) = parts.headers.get("x-want-message") {
                t.insert("grpc-message", m.clone());
            }
            tokio::spawn(async move {
                if !data.is_empty() {
                    let _ = tx.send(Frame::data(data)).await;
                }
                let _ = tx.send(Frame::trailers(t)).await;
            });
        }
        _ => {
            // Trailers-only UNIMPLEMENTED, as grpc-go answers.
            let h = resp.headers_mut();
            h.insert("grpc-status", HeaderValue::from_static("12"));
            h.insert("grpc-message", HeaderValue::from_static("unknown method"));
            drop(tx);
        }
    }
    resp
}
