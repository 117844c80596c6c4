//! gRPC calls by path with raw message bytes (tonic's generic client and a
//! pass-through codec), for methods no compiled proto here knows.

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn client(channel: Channel) -> Result<tonic::client::Grpc<Channel>, Status> {
    let mut g = tonic::client::Grpc::new(channel);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(g)
}

fn path(p: &str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::try_from(p).expect("valid gRPC path")
}

/// A unary call: `req` is the whole tonic request (metadata, timeout).
pub async fn unary(
    channel: Channel,
    method: &str,
    req: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    client(channel)
        .await?
        .unary(req, path(method), RawCodec)
        .await
}

/// A server-streaming call.
pub async fn server_streaming(
    channel: Channel,
    method: &str,
    req: tonic::Request<Bytes>,
) -> Result<tonic::Response<Streaming<Bytes>>, Status> {
    client(channel)
        .await?
        .server_streaming(req, path(method), RawCodec)
        .await
}
