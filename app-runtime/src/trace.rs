//! W3C trace context (<https://www.w3.org/TR/trace-context/>): a hop keeps
//! the caller's trace id and flags and gets its own parent id; a request
//! without a valid `traceparent` starts a new trace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `traceparent` to send on, given the one received.
pub fn next(incoming: Option<&str>) -> String {
    let span = format!("{:016x}", random64() | 1);
    if let Some((trace, flags)) = incoming.and_then(parse) {
        return format!("00-{trace}-{span}-{flags}");
    }
    format!("00-{:016x}{:016x}-{span}-01", random64(), random64() | 1)
}

/// (trace id, flags) of a valid version-00 header.
fn parse(v: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [ver, trace, parent, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (*ver == "00"
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2))
    .then_some((*trace, *flags))
}

/// Not cryptographic: trace ids need to be unique, not secret
/// (splitmix64 over time and a counter).
pub(crate) fn random64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = t ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_trace_and_makes_a_new_parent() {
        let inc = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = next(Some(inc));
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(out, inc);
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let out = next(Some(bad));
            assert!(parse(&out).is_some(), "{out}");
            assert!(!out.contains("00000000000000000000000000000000"));
        }
    }
}
