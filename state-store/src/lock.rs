//! Lock stores for Dapr's distributed lock API
//! (<https://docs.dapr.io/reference/api/distributed_lock_api/>): a lock is
//! a key held by one owner until it is unlocked by that owner or its
//! expiry passes.
//!
//! - `lock.redis`: `SET key owner NX PX expiry`; unlock is one Lua script
//!   that deletes the key only if it still holds the caller's owner, so
//!   nobody can release a lock that expired and was taken by another.
//! - `lock.embedded`: one redb file per component under the state dir
//!   (`<name>.lock.redb`); each lock is `key → (expiry ms, owner)`,
//!   checked and written in one durable write transaction. An expired
//!   lock counts as absent: another owner takes it, its old owner's
//!   unlock answers "does not exist".
//!
//! Keys arrive already scoped (the app runtime prefixes
//! `lock||app-id||`); a store never interprets them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::ReadableTable;
use redis::aio::ConnectionManager;
use redis::Script;

use crate::embedded::{backend, blocking, now_ms};
use crate::{ComponentSpec, Error, Result};

/// Dapr's `UnlockResponse.Status` values (0..=3; INTERNAL_ERROR is an
/// `Err` here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnlockStatus {
    Success = 0,
    LockDoesNotExist = 1,
    LockBelongsToOthers = 2,
}

/// A lock store. Every method is safe to call concurrently.
#[async_trait::async_trait]
pub trait LockStore: Send + Sync + std::fmt::Debug {
    /// Takes `key` for `owner` for `expiry`; false when someone holds it
    /// (the same owner included: Dapr's locks are not re-entrant).
    async fn try_lock(&self, key: &str, owner: &str, expiry: Duration) -> Result<bool>;
    /// Releases `key` if `owner` holds it.
    async fn unlock(&self, key: &str, owner: &str) -> Result<UnlockStatus>;
    /// Reachable and usable.
    async fn ping(&self) -> Result<()>;
}

/// The `spec.type` values [`open_lock`] opens.
pub const LOCK_KINDS: &[&str] = &["lock.embedded", "lock.redis"];

/// Opens the lock store a component describes; `state_dir` is where an
/// embedded one keeps its file.
pub async fn open_lock(spec: &ComponentSpec, state_dir: &Path) -> Result<Arc<dyn LockStore>> {
    match spec.kind.as_str() {
        "lock.embedded" => Ok(Arc::new(EmbeddedLock::open(spec, state_dir).await?)),
        "lock.redis" => {
            let (conn, _, host) = crate::redis_connect(spec).await?;
            Ok(Arc::new(RedisLock {
                name: spec.name.clone(),
                host,
                conn,
                unlock: Script::new(UNLOCK),
            }))
        }
        other => Err(Error::Config(format!(
            "component {}: spec.type {other} is not supported; use one of: {}",
            spec.name,
            LOCK_KINDS.join(", ")
        ))),
    }
}

/// Milliseconds of an expiry, at least 1 (Redis refuses PX 0).
fn expiry_ms(expiry: Duration) -> u64 {
    u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// KEYS[1]: the lock; ARGV[1]: the owner. 0 released, 1 absent, 2 held by
/// another owner (Dapr's unlock statuses).
const UNLOCK: &str = r#"
local v = redis.call("GET", KEYS[1])
if not v then return 1 end
if v ~= ARGV[1] then return 2 end
redis.call("DEL", KEYS[1])
return 0
"#;

struct RedisLock {
    name: String,
    host: String,
    conn: ConnectionManager,
    unlock: Script,
}

impl std::fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLock")
            .field("name", &self.name)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl RedisLock {
    fn backend(&self, e: redis::RedisError) -> Error {
        Error::Backend(format!(
            "component {} (lock.redis at {}): {e}",
            self.name, self.host
        ))
    }
}

#[async_trait::async_trait]
impl LockStore for RedisLock {
    async fn try_lock(&self, key: &str, owner: &str, expiry: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(expiry_ms(expiry))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.backend(e))?;
        Ok(set.is_some())
    }

    async fn unlock(&self, key: &str, owner: &str) -> Result<UnlockStatus> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .unlock
            .key(key)
            .arg(owner)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.backend(e))?;
        status_of(n).ok_or_else(|| {
            Error::Backend(format!(
                "component {}: the unlock script answered {n}",
                self.name
            ))
        })
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.backend(e))?;
        Ok(())
    }
}

fn status_of(n: i64) -> Option<UnlockStatus> {
    match n {
        0 => Some(UnlockStatus::Success),
        1 => Some(UnlockStatus::LockDoesNotExist),
        2 => Some(UnlockStatus::LockBelongsToOthers),
        _ => None,
    }
}

/// lock key → expiry in ms since the epoch (u64 LE), then the owner.
const LOCKS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("locks");

#[derive(Debug)]
struct EmbeddedLock {
    name: String,
    path: PathBuf,
    db: Arc<redb::Database>,
}

/// A held lock's record, if `raw` is one that has not expired at `now`.
fn holder(raw: &[u8], now: u64) -> Option<&[u8]> {
    let (head, owner) = raw.split_at_checked(8)?;
    let expires = u64::from_le_bytes(head.try_into().ok()?);
    (expires > now).then_some(owner)
}

fn record(expires: u64, owner: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + owner.len());
    v.extend_from_slice(&expires.to_le_bytes());
    v.extend_from_slice(owner.as_bytes());
    v
}

/// What a try-lock does to the current record: the new record, or None
/// when the lock is held.
fn try_take(current: Option<&[u8]>, owner: &str, now: u64, expiry: Duration) -> Option<Vec<u8>> {
    match current.and_then(|c| holder(c, now)) {
        Some(_) => None,
        None => Some(record(now.saturating_add(expiry_ms(expiry)), owner)),
    }
}

/// What an unlock answers for the current record (a success deletes it).
fn release(current: Option<&[u8]>, owner: &str, now: u64) -> UnlockStatus {
    match current.and_then(|c| holder(c, now)) {
        None => UnlockStatus::LockDoesNotExist,
        Some(o) if o == owner.as_bytes() => UnlockStatus::Success,
        Some(_) => UnlockStatus::LockBelongsToOthers,
    }
}

impl EmbeddedLock {
    async fn open(spec: &ComponentSpec, state_dir: &Path) -> Result<Self> {
        let name = spec.name.clone();
        if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
            return Err(Error::Config(format!(
                "component {name:?}: metadata.name must be a non-empty file name (it names {}/<name>.lock.redb)",
                state_dir.display()
            )));
        }
        let path = state_dir.join(format!("{name}.lock.redb"));
        let (dir, p, n) = (state_dir.to_owned(), path.clone(), name.clone());
        let db = blocking(move || {
            // The instance this one replaces may still be closing.
            let db = crate::embedded::open_file(&dir, &p, &n)?;
            let txn = db.begin_write().map_err(|e| backend(&n, e))?;
            txn.open_table(LOCKS).map_err(|e| backend(&n, e))?;
            txn.commit().map_err(|e| backend(&n, e))?;
            Ok(db)
        })
        .await?;
        Ok(EmbeddedLock {
            name,
            path,
            db: Arc::new(db),
        })
    }

    /// Runs `f` on the lock's current record in one durable write
    /// transaction; `f` answers what to store (Some(None): delete) and
    /// the result.
    async fn update<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&[u8]>, u64) -> (Option<Option<Vec<u8>>>, T) + Send + 'static,
    ) -> Result<T> {
        let (db, name, key) = (self.db.clone(), self.name.clone(), key.to_string());
        blocking(move || {
            let mut txn = db.begin_write().map_err(|e| backend(&name, e))?;
            txn.set_durability(redb::Durability::Immediate)
                .map_err(|e| backend(&name, e))?;
            let out = {
                let mut t = txn.open_table(LOCKS).map_err(|e| backend(&name, e))?;
                let current = t
                    .get(key.as_str())
                    .map_err(|e| backend(&name, e))?
                    .map(|g| g.value().to_vec());
                let (write, out) = f(current.as_deref(), now_ms());
                match write {
                    Some(Some(rec)) => {
                        t.insert(key.as_str(), rec.as_slice())
                            .map_err(|e| backend(&name, e))?;
                    }
                    Some(None) => {
                        t.remove(key.as_str()).map_err(|e| backend(&name, e))?;
                    }
                    None => {}
                }
                out
            };
            txn.commit().map_err(|e| backend(&name, e))?;
            Ok(out)
        })
        .await
    }
}

#[async_trait::async_trait]
impl LockStore for EmbeddedLock {
    async fn try_lock(&self, key: &str, owner: &str, expiry: Duration) -> Result<bool> {
        let owner = owner.to_string();
        self.update(key, move |cur, now| {
            match try_take(cur, &owner, now, expiry) {
                Some(rec) => (Some(Some(rec)), true),
                None => (None, false),
            }
        })
        .await
    }

    async fn unlock(&self, key: &str, owner: &str) -> Result<UnlockStatus> {
        let owner = owner.to_string();
        self.update(key, move |cur, now| {
            let s = release(cur, &owner, now);
            // An expired record is removed too: nothing holds it.
            let write = match (s, cur.is_some()) {
                (UnlockStatus::Success, _) | (UnlockStatus::LockDoesNotExist, true) => Some(None),
                _ => None,
            };
            (write, s)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        if self.path.exists() {
            Ok(())
        } else {
            Err(Error::Backend(format!(
                "component {}: {} is gone",
                self.name,
                self.path.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_held_lock_refuses_others_until_it_expires() {
        let rec = try_take(None, "a", 1000, S).expect("free");
        assert_eq!(holder(&rec, 1999), Some(&b"a"[..]));
        assert!(try_take(Some(&rec), "b", 1500, S).is_none());
        assert!(
            try_take(Some(&rec), "a", 1500, S).is_none(),
            "not re-entrant"
        );
        let taken = try_take(Some(&rec), "b", 2000, S).expect("expired");
        assert_eq!(holder(&taken, 2500), Some(&b"b"[..]));
    }

    #[test]
    fn unlock_answers_dapr_statuses() {
        let rec = record(2000, "a");
        assert_eq!(release(Some(&rec), "a", 1000), UnlockStatus::Success);
        assert_eq!(
            release(Some(&rec), "b", 1000),
            UnlockStatus::LockBelongsToOthers
        );
        assert_eq!(
            release(Some(&rec), "a", 2000),
            UnlockStatus::LockDoesNotExist
        );
        assert_eq!(release(None, "a", 0), UnlockStatus::LockDoesNotExist);
        assert_eq!(
            release(Some(b"bad"), "a", 0),
            UnlockStatus::LockDoesNotExist
        );
        assert_eq!(UnlockStatus::LockBelongsToOthers as i32, 2);
    }

    #[tokio::test]
    async fn embedded_locks_survive_reopen_and_expire() {
        let dir = std::env::temp_dir().join(format!("np-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = ComponentSpec {
            name: "locks".into(),
            kind: "lock.embedded".into(),
            ..ComponentSpec::default()
        };
        let l = open_lock(&spec, &dir).await.expect("open");
        assert!(l
            .try_lock("k", "a", Duration::from_secs(60))
            .await
            .expect("lock"));
        assert!(!l
            .try_lock("k", "b", Duration::from_secs(60))
            .await
            .expect("lock"));
        assert!(l
            .try_lock("short", "a", Duration::from_millis(1))
            .await
            .expect("lock"));
        drop(l);
        let l = open_lock(&spec, &dir).await.expect("reopen");
        assert_eq!(
            l.unlock("k", "b").await.expect("unlock"),
            UnlockStatus::LockBelongsToOthers
        );
        assert_eq!(
            l.unlock("k", "a").await.expect("unlock"),
            UnlockStatus::Success
        );
        assert_eq!(
            l.unlock("k", "a").await.expect("unlock"),
            UnlockStatus::LockDoesNotExist
        );
        // Poll: the 1 ms lock has expired once another owner can take it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !l.try_lock("short", "b", S).await.expect("lock") {
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
