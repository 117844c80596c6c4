//! The local API the CNI plugin calls (proto/agent.proto): one
//! length-delimited `Request` per connection, answered with one `Reply`
//! once the agent has programmed the change (or could not).

use std::path::Path;
use std::time::Duration;

use nodeplane_proto::agent::{request::What, Reply, Request};
use nodeplane_proto::prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::agent::ApiCall;
use crate::lifecycle::Lifecycle;
use crate::{Error, Result};

/// Largest request accepted (a GC listing thousands of attachments fits).
const MAX_REQUEST: usize = 4 << 20;

/// Binds the socket, replacing a stale one left by a killed agent.
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
    UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))
}

/// Accepts connections until the channel to the agent closes.
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::Sender<ApiCall>,
    lifecycle: std::sync::Arc<Lifecycle>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the local API socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if calls.is_closed() {
            return;
        }
        let calls = calls.clone();
        let lifecycle = lifecycle.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, calls, &lifecycle).await {
                tracing::warn!(error = %e, "local API request");
            }
        });
    }
}

async fn handle(
    mut stream: UnixStream,
    calls: mpsc::Sender<ApiCall>,
    lifecycle: &Lifecycle,
) -> Result<()> {
    let request = read_message::<Request>(&mut stream).await?;
    let (tx, rx) = oneshot::channel();
    // CRI shim events are recorded and answered here, off the agent loop.
    let reply = if let Some(What::Lifecycle(ev)) = &request.what {
        lifecycle.record(ev)
    } else if calls.send(ApiCall { request, reply: tx }).await.is_err() {
        Reply {
            programmed: false,
            error: "agent is shutting down".into(),
            generation: 0,
        }
    } else {
        // The plugin time-boxes its wait; the agent answers when programmed.
        rx.await.unwrap_or(Reply {
            programmed: false,
            error: "agent dropped the request".into(),
            generation: 0,
        })
    };
    stream
        .write_all(&reply.encode_length_delimited_to_vec())
        .await
        .map_err(|e| Error::Api(format!("write reply: {e}")))?;
    Ok(())
}

/// Reads one varint-length-prefixed message.
async fn read_message<M: Message + Default>(stream: &mut UnixStream) -> Result<M> {
    let mut len: usize = 0;
    for shift in (0..35).step_by(7) {
        let b = stream
            .read_u8()
            .await
            .map_err(|e| Error::Api(format!("read length: {e}")))?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    if len > MAX_REQUEST {
        return Err(Error::Api(format!(
            "request of {len} bytes is larger than {MAX_REQUEST}"
        )));
    }
    let mut buf = vec![0; len];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| Error::Api(format!("read request: {e}")))?;
    M::decode(buf.as_slice()).map_err(|e| Error::Api(format!("bad request: {e}")))
}
