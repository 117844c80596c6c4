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

/// Data then trailers, each at most once.
#[derive(Debug, Default)]
pub struct Buffered {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body {
    pub fn empty() -> Self {
        Body::Buffered(Buffered::default())
    }

    pub fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Body::Buffered(Buffered {
            data: (!data.is_empty()).then_some(data),
            trailers,
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
                    .take()
                    .map(Frame::data)
                    .or_else(|| b.trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream(s) => s.is_end_stream(),
            Body::Buffered(b) => b.data.is_none() && b.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(s) => s.size_hint(),
            Body::Buffered(b) => {
                SizeHint::with_exact(b.data.as_ref().map_or(0, |d| d.len() as u64))
            }
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
