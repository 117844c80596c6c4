//! Bodies the relay sends: the peer's own streaming body passed through, or
//! a buffered one (a rewritten request, or a unary answer the shim read to
//! learn an id) replayed with its trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};

/// Errors of a relayed body (the peer's connection failing mid-stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One relay body type for both directions.
#[derive(Debug)]
pub enum Body {
    Stream(Incoming),
    Buffered(Buffered),
}

/// Data chunks (as they arrived, not joined: a large answer is not copied
/// again) then trailers.
#[derive(Debug, Default)]
pub struct Buffered {
    data: std::vec::IntoIter<Bytes>,
    len: u64,
    trailers: Option<HeaderMap>,
}

/// A whole body as read: its data chunks and trailers.
#[derive(Debug, Default)]
pub struct Chunks {
    pub data: Vec<Bytes>,
    pub trailers: Option<HeaderMap>,
}

impl Body {
    pub fn empty() -> Self {
        Body::Buffered(Buffered::default())
    }

    pub fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let data = if data.is_empty() { vec![] } else { vec![data] };
        Body::chunks(Chunks { data, trailers })
    }

    pub fn chunks(c: Chunks) -> Self {
        Body::Buffered(Buffered {
            len: c.data.iter().map(|d| d.len() as u64).sum(),
            data: c.data.into_iter(),
            trailers: c.trailers,
        })
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Stream(s) => Pin::new(s).poll_frame(cx).map_err(Into::into),
            Body::Buffered(b) => Poll::Ready(
                b.data
                    .next()
                    .map(|d| {
                        b.len -= d.len() as u64;
                        Frame::data(d)
                    })
                    .or_else(|| b.trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream(s) => s.is_end_stream(),
            Body::Buffered(b) => b.data.len() == 0 && b.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(s) => s.size_hint(),
            Body::Buffered(b) => SizeHint::with_exact(b.len),
        }
    }
}

/// Reads a whole body (a unary message), keeping its trailers, refusing
/// more than `limit` bytes.
pub async fn collect(body: Incoming, limit: usize) -> Result<(Bytes, Option<HeaderMap>), BoxError> {
    let limited = http_body_util::Limited::new(body, limit);
    let collected = limited.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes(), trailers))
}

/// Reads a whole body (a unary message) as its chunks and trailers,
/// refusing more than `limit` bytes.
pub async fn collect_chunks(mut body: Incoming, limit: usize) -> Result<Chunks, BoxError> {
    let mut c = Chunks::default();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(d) => {
                len += d.len();
                if len > limit {
                    return Err(format!("body larger than {limit} bytes").into());
                }
                if !d.is_empty() {
                    c.data.push(d);
                }
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    c.trailers = Some(t);
                }
            }
        }
    }
    Ok(c)
}
