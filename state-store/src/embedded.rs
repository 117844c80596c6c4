//! `state.embedded`: one redb file per component under the state dir.
//!
//! Every write (save, delete, transaction) is one redb write transaction
//! committed with `Durability::Immediate` (fsync before `commit` returns),
//! so an acknowledged write survives kill -9 and power loss. redb admits one
//! write transaction at a time, so the etag check and the write inside it
//! cannot interleave with another writer.
//!
//! Etags come from one counter kept in the same file and bumped by every
//! write: per key they only grow, and a key deleted and written again never
//! reissues an etag a client may still hold.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::expect::{self, Expect};
use crate::sweep::{self, Sweeper};
use crate::{ComponentSpec, Delete, Error, Item, Op, Result, Save, Store};

/// key → record: version (u64 LE), expiry in ms since the epoch (u64 LE,
/// 0 = never), then the value.
const DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// "etag" → the last version issued.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const HEADER: usize = 16;

#[derive(Debug)]
pub(crate) struct Embedded {
    name: String,
    path: PathBuf,
    db: Arc<Database>,
    _sweeper: Sweeper,
}

struct Record<'a> {
    version: u64,
    expires_ms: u64,
    value: &'a [u8],
}

fn decode(raw: &[u8]) -> Option<Record<'_>> {
    let (head, value) = raw.split_at_checked(HEADER)?;
    let version = u64::from_le_bytes(head[..8].try_into().ok()?);
    let expires_ms = u64::from_le_bytes(head[8..].try_into().ok()?);
    Some(Record {
        version,
        expires_ms,
        value,
    })
}

fn encode(version: u64, expires_ms: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&expires_ms.to_le_bytes());
    out.extend_from_slice(value);
    out
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn live(rec: &Record<'_>, now: u64) -> bool {
    rec.expires_ms == 0 || rec.expires_ms > now
}

impl Embedded {
    pub(crate) async fn open(spec: &ComponentSpec, state_dir: &Path) -> Result<Self> {
        let name = spec.name.clone();
        if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
            return Err(Error::Config(format!(
                "component {name:?}: metadata.name must be a non-empty file name (it names {}/<name>.redb)",
                state_dir.display()
            )));
        }
        let path = state_dir.join(format!("{name}.redb"));
        let dir = state_dir.to_owned();
        let p = path.clone();
        let n = name.clone();
        let db = blocking(move || {
            let db = open_file(&dir, &p, &n)?;
            // Create both tables so readers never meet a missing one.
            let txn = db.begin_write().map_err(|e| backend(&n, e))?;
            txn.open_table(DATA).map_err(|e| backend(&n, e))?;
            txn.open_table(META).map_err(|e| backend(&n, e))?;
            txn.commit().map_err(|e| backend(&n, e))?;
            Ok(db)
        })
        .await?;
        let db = Arc::new(db);
        let weak = Arc::downgrade(&db);
        let n = name.clone();
        let sweeper = sweep::every(move || {
            let weak = weak.clone();
            let n = n.clone();
            async move {
                // A failed sweep is retried next period; reads already hide expired items.
                let _ = blocking(move || sweep_expired(&weak, &n)).await;
            }
        });
        Ok(Embedded {
            name,
            path,
            db,
            _sweeper: sweeper,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let name = self.name.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(|e| backend(&name, e))?;
            let table = txn.open_table(DATA).map_err(|e| backend(&name, e))?;
            f(&table)
        })
        .await
    }

    /// Checks and applies `ops` in order in one durable write transaction;
    /// the first failed check aborts it with nothing written.
    async fn write(&self, ops: Vec<(Op, Expect)>) -> Result<()> {
        let db = self.db.clone();
        let name = self.name.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(|e| backend(&name, e))?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| backend(&name, e))?;
            {
                let mut data = txn.open_table(DATA).map_err(|e| backend(&name, e))?;
                let mut meta = txn.open_table(META).map_err(|e| backend(&name, e))?;
                let mut seq = meta
                    .get("etag")
                    .map_err(|e| backend(&name, e))?
                    .map(|g| g.value())
                    .unwrap_or(0);
                let now = now_ms();
                for (op, want) in &ops {
                    let key = match op {
                        Op::Upsert(s) => s.key.as_str(),
                        Op::Delete(d) => d.key.as_str(),
                    };
                    let current = data.get(key).map_err(|e| backend(&name, e))?.and_then(|g| {
                        decode(g.value())
                            .filter(|r| live(r, now))
                            .map(|r| r.version)
                    });
                    if !expect::satisfied(*want, current) {
                        // Dropping the uncommitted transaction aborts it.
                        return Err(expect::mismatch(key));
                    }
                    match op {
                        Op::Upsert(s) => {
                            seq += 1;
                            let expires = match expect::ttl_ms(s.ttl) {
                                Some(ms) => now.saturating_add(ms),
                                None => 0,
                            };
                            let rec = encode(seq, expires, &s.value);
                            data.insert(key, rec.as_slice())
                                .map_err(|e| backend(&name, e))?;
                        }
                        Op::Delete(_) => {
                            data.remove(key).map_err(|e| backend(&name, e))?;
                        }
                    }
                }
                meta.insert("etag", seq).map_err(|e| backend(&name, e))?;
            }
            txn.commit().map_err(|e| backend(&name, e))
        })
        .await
    }
}

fn sweep_expired(db: &Weak<Database>, name: &str) -> Result<()> {
    let Some(db) = db.upgrade() else {
        return Ok(());
    };
    let txn = db.begin_write().map_err(|e| backend(name, e))?;
    let mut removed = 0usize;
    {
        let mut data = txn.open_table(DATA).map_err(|e| backend(name, e))?;
        let now = now_ms();
        data.retain(|_, v| {
            let keep = decode(v).is_none_or(|r| live(&r, now));
            removed += usize::from(!keep);
            keep
        })
        .map_err(|e| backend(name, e))?;
    }
    if removed == 0 {
        // Nothing changed: skip the fsync.
        return txn.abort().map_err(|e| backend(name, e));
    }
    txn.commit().map_err(|e| backend(name, e))
}

/// Creates `dir` and opens (or creates) component `name`'s redb file `p`
/// in it, blocking. A store dropped a moment ago may still have a blocking
/// call in flight (its caller gave up) that holds the file: it is tried
/// again for up to a second.
pub(crate) fn open_file(dir: &Path, p: &Path, name: &str) -> Result<Database> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Backend(format!(
            "component {name}: cannot create state dir {}: {e}",
            dir.display()
        ))
    })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match Database::create(p) {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::Backend(format!(
                    "component {name}: {} is already open (another agent, or this component opened twice)",
                    p.display()
                )))
            }
            Err(e) => {
                return Err(Error::Backend(format!(
                    "component {name}: cannot open {}: {e}",
                    p.display()
                )))
            }
        }
    }
}

pub(crate) fn backend(name: &str, e: impl Into<redb::Error>) -> Error {
    Error::Backend(format!("component {name}: embedded store: {}", e.into()))
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Backend(format!("embedded store task failed: {e}")))?
}

fn item(raw: &[u8], now: u64) -> Option<Item> {
    let rec = decode(raw).filter(|r| live(r, now))?;
    Some(Item {
        value: Bytes::copy_from_slice(rec.value),
        etag: rec.version.to_string(),
    })
}

#[async_trait::async_trait]
impl Store for Embedded {
    async fn get(&self, key: &str) -> Result<Option<Item>> {
        let key = key.to_owned();
        let name = self.name.clone();
        self.read(move |t| {
            let g = t.get(key.as_str()).map_err(|e| backend(&name, e))?;
            Ok(g.and_then(|g| item(g.value(), now_ms())))
        })
        .await
    }

    async fn save(&self, save: Save) -> Result<()> {
        let want = expect::for_save(&save)?;
        self.write(vec![(Op::Upsert(save), want)]).await
    }

    async fn delete(&self, delete: Delete) -> Result<()> {
        let want = expect::for_delete(&delete)?;
        self.write(vec![(Op::Delete(delete), want)]).await
    }

    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<Item>>> {
        let keys = keys.to_vec();
        let name = self.name.clone();
        self.read(move |t| {
            let now = now_ms();
            keys.iter()
                .map(|k| {
                    let g = t.get(k.as_str()).map_err(|e| backend(&name, e))?;
                    Ok(g.and_then(|g| item(g.value(), now)))
                })
                .collect()
        })
        .await
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<()> {
        let ops = ops
            .into_iter()
            .map(|op| {
                let want = expect::for_op(&op)?;
                Ok((op, want))
            })
            .collect::<Result<Vec<_>>>()?;
        if ops.is_empty() {
            return Ok(());
        }
        self.write(ops).await
    }

    async fn ping(&self) -> Result<()> {
        let path = self.path.clone();
        self.read(move |_| Ok(()))
            .await
            .map_err(|e| Error::Backend(format!("{} unusable: {e}", path.display())))
    }
}
