//! The etag rules shared by every backend: what a write requires of the
//! stored item, decided before the backend looks at it.

use std::time::Duration;

use crate::{Concurrency, Delete, Error, Op, Result, Save};

/// What the stored item must be for a write to go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Whatever is stored (last-write, or a delete without etag).
    Any,
    /// Nothing is stored (first-write without etag).
    Absent,
    /// The stored item has this version (first-write with etag).
    Version(u64),
}

/// An empty etag is no etag: Dapr's HTTP API sends `""` for an omitted one.
fn given(etag: &Option<String>) -> Option<&str> {
    etag.as_deref().filter(|e| !e.is_empty())
}

/// Every backend here issues etags as decimal version numbers, so anything
/// else could never match: Dapr answers that with ETagInvalid (400).
fn parse(key: &str, etag: &str) -> Result<u64> {
    if !etag.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::EtagInvalid {
            key: key.to_owned(),
            etag: etag.to_owned(),
        });
    }
    etag.parse().map_err(|_| Error::EtagInvalid {
        key: key.to_owned(),
        etag: etag.to_owned(),
    })
}

pub(crate) fn for_save(save: &Save) -> Result<Expect> {
    match (save.concurrency, given(&save.etag)) {
        (Concurrency::LastWrite, _) => Ok(Expect::Any),
        (Concurrency::FirstWrite, None) => Ok(Expect::Absent),
        (Concurrency::FirstWrite, Some(etag)) => Ok(Expect::Version(parse(&save.key, etag)?)),
    }
}

pub(crate) fn for_delete(delete: &Delete) -> Result<Expect> {
    match (delete.concurrency, given(&delete.etag)) {
        (Concurrency::FirstWrite, Some(etag)) => Ok(Expect::Version(parse(&delete.key, etag)?)),
        // Deleting without an etag is unconditional (an absent key is fine).
        _ => Ok(Expect::Any),
    }
}

/// What one transaction operation needs of the stored item.
pub(crate) fn for_op(op: &Op) -> Result<Expect> {
    match op {
        Op::Upsert(s) => for_save(s),
        Op::Delete(d) => for_delete(d),
    }
}

/// Whether an item at `current` (None = absent or expired) satisfies `expect`.
pub(crate) fn satisfied(expect: Expect, current: Option<u64>) -> bool {
    match expect {
        Expect::Any => true,
        Expect::Absent => current.is_none(),
        Expect::Version(v) => current == Some(v),
    }
}

/// A TTL in whole milliseconds (rounded up, so 1 ns is not "no TTL"); a zero
/// TTL means none, as `ttlInSeconds: 0` does in Dapr's stores.
pub(crate) fn ttl_ms(ttl: Option<Duration>) -> Option<u64> {
    let ttl = ttl.filter(|d| !d.is_zero())?;
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    Some(u64::try_from(ms).unwrap_or(u64::MAX))
}

pub(crate) fn mismatch(key: &str) -> Error {
    Error::EtagMismatch {
        key: key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn save(etag: Option<&str>, concurrency: Concurrency) -> Save {
        Save {
            key: "k".into(),
            value: Bytes::new(),
            etag: etag.map(str::to_owned),
            concurrency,
            ttl: None,
        }
    }

    #[test]
    fn rules() {
        use Concurrency::*;
        assert_eq!(
            for_save(&save(Some("x"), LastWrite)).ok(),
            Some(Expect::Any)
        );
        assert_eq!(for_save(&save(None, FirstWrite)).ok(), Some(Expect::Absent));
        assert_eq!(
            for_save(&save(Some(""), FirstWrite)).ok(),
            Some(Expect::Absent)
        );
        assert_eq!(
            for_save(&save(Some("7"), FirstWrite)).ok(),
            Some(Expect::Version(7))
        );
        assert!(matches!(
            for_save(&save(Some("+7"), FirstWrite)),
            Err(Error::EtagInvalid { .. })
        ));
        assert!(matches!(
            for_save(&save(Some("99999999999999999999999"), FirstWrite)),
            Err(Error::EtagInvalid { .. })
        ));
        assert_eq!(ttl_ms(Some(Duration::from_nanos(1))), Some(1));
        assert_eq!(ttl_ms(Some(Duration::ZERO)), None);
    }
}
