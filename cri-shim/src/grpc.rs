//! The few gRPC-over-HTTP/2 facts the relay needs: message framing, the
//! grpc-timeout header, and status answers the shim makes itself.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};

/// gRPC status codes the shim itself answers with.
pub const UNAVAILABLE: u32 = 14;
pub const INTERNAL: u32 = 13;
pub const INVALID_ARGUMENT: u32 = 3;

/// The one message of a unary call, from its length-prefixed body: 1 byte
/// compressed flag, 4 bytes big-endian length, the message. `None` when the
/// body is not exactly one uncompressed message (the relay then forwards
/// it untouched rather than guess).
pub fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let msg = rest.get(4..)?;
    (msg.len() == len).then_some(msg)
}

/// Frames one uncompressed message.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The grpc-timeout header ("<digits><unit>", unit one of H M S m u n).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Rewrites grpc-timeout to what is left of it after `spent` (time the shim
/// itself spent before relaying), so the runtime sees the client's real
/// deadline. At most 8 digits, as the spec requires.
pub fn shorten_timeout(headers: &mut HeaderMap, spent: Duration) {
    let Some(t) = timeout(headers) else { return };
    let left = t.saturating_sub(spent).max(Duration::from_micros(1));
    let micros = left.as_micros();
    let v = if micros < 100_000_000 {
        format!("{micros}u")
    } else {
        format!("{}m", (left.as_millis()).min(99_999_999))
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        headers.insert("grpc-timeout", v);
    }
}

/// A "trailers-only" gRPC answer: HTTP 200 whose headers carry the status.
pub fn status_response<B>(code: u32, message: &str, body: B) -> http::Response<B> {
    let mut r = http::Response::new(body);
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(m) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", m);
    }
    r
}

/// grpc-message is percent-encoded outside printable ASCII (and '%').
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The gRPC status of a finished call: from the trailers, or from the
/// headers of a trailers-only answer. 2 (UNKNOWN) if neither says.
pub fn status_code(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> u32 {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_refuses_what_it_cannot_rewrite() {
        let f = frame(b"hello");
        assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(unframe(&f), Some(&b"hello"[..]));
        assert_eq!(unframe(&frame(b"")), Some(&b""[..]));
        // Compressed, truncated, or two messages: not ours to rewrite.
        let mut compressed = f.to_vec();
        compressed[0] = 1;
        assert_eq!(unframe(&compressed), None);
        assert_eq!(unframe(&f[..7]), None);
        let two = [f.to_vec(), f.to_vec()].concat();
        assert_eq!(unframe(&two), None);
        assert_eq!(unframe(&[]), None);
    }

    #[test]
    fn grpc_timeout_parses_every_unit_and_shortens() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("2S", Duration::from_secs(2)),
            ("1M", Duration::from_secs(60)),
            ("1H", Duration::from_secs(3600)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(timeout(&h), Some(d), "{v}");
        }
        h.insert("grpc-timeout", HeaderValue::from_static("2S"));
        shorten_timeout(&mut h, Duration::from_millis(500));
        assert_eq!(timeout(&h), Some(Duration::from_millis(1500)));
        h.insert("grpc-timeout", HeaderValue::from_static("1H"));
        shorten_timeout(&mut h, Duration::from_secs(1));
        assert_eq!(timeout(&h), Some(Duration::from_secs(3599)));
        h.insert("grpc-timeout", HeaderValue::from_static("x"));
        assert_eq!(timeout(&h), None);
    }

    #[test]
    fn shim_statuses_are_trailers_only_and_encoded() {
        let r = status_response(UNAVAILABLE, "runtime 100% down\n", ());
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "runtime 100%25 down%0A");
        assert_eq!(status_code(r.headers(), None), 14);
    }
}
