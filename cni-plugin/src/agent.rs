//! Telling nodeplane-agent about attachments (proto/agent.proto).
//!
//! The data path never waits for a healthy agent: if the socket is absent
//! or the agent does not answer within `agentTimeoutMs`, the verb still
//! succeeds and the pod is left to the agent's fail mode (isolated by
//! default, until the agent programs it). The outcome is logged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nodeplane_proto::agent::{request::What, Reply, Request};
use nodeplane_proto::prost::Message;

use crate::config::NetConf;

/// Sends one request and waits for the reply; `Err` says why there is none.
pub fn notify(conf: &NetConf, what: What, timeout: Duration) -> Result<Reply, String> {
    if conf.agent_socket.as_os_str().is_empty() {
        return Err("agent notification is off (agentSocket is empty)".into());
    }
    let start = Instant::now();
    let mut s = UnixStream::connect(&conf.agent_socket)
        .map_err(|e| format!("agent socket {}: {e}", conf.agent_socket.display()))?;
    let timeout = timeout.max(Duration::from_millis(1));
    let _ = s.set_write_timeout(Some(timeout));
    let request = Request { what: Some(what) };
    s.write_all(&request.encode_length_delimited_to_vec())
        .map_err(|e| format!("send to agent: {e}"))?;
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    let _ = s.set_read_timeout(Some(left));
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("agent did not answer within {} ms", timeout.as_millis())
        }
        _ => format!("read agent reply: {e}"),
    })?;
    Reply::decode_length_delimited(buf.as_slice()).map_err(|e| format!("bad agent reply: {e}"))
}
