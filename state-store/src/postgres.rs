//! `state.postgresql`: one table (`tableName`, default `state`) of
//! key, value bytea, etag bigint, expires_at, updated_at.
//!
//! Etags come from a sequence beside the table, so they only grow per key
//! and a key deleted and written again never reissues an old etag. Each
//! checked write is a single statement whose WHERE clause is the check
//! (`UPDATE … WHERE etag = $n`, `INSERT … ON CONFLICT DO UPDATE … WHERE
//! expired`): under READ COMMITTED a concurrent writer of the same row
//! waits and then re-evaluates the WHERE against the new row, so exactly one
//! of two racing first-writers matches. Transactions run in one SQL
//! transaction that rolls back on the first failed check.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::expect::{self, Expect};
use crate::sweep::{self, Sweeper};
use crate::{ComponentSpec, Delete, Error, Item, Op, Result, Save, Store};

/// Connections per store: the runtime's calls are short; more would only
/// take server slots from other agents.
const POOL_SIZE: usize = 4;

#[derive(Debug)]
struct Sql {
    get: String,
    bulk_get: String,
    upsert: String,
    insert_absent: String,
    update_version: String,
    delete: String,
    delete_version: String,
    sweep: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        let seq = format!("{table}_etag_seq");
        let live = "(expires_at IS NULL OR expires_at > now())";
        // $3: TTL in ms or NULL; NULL * interval is NULL, i.e. no expiry.
        let expiry = "now() + $3::bigint * interval '1 millisecond'";
        let insert = format!(
            "INSERT INTO {table} AS t (key, value, etag, expires_at, updated_at) \
             VALUES ($1, $2, nextval('{seq}'), {expiry}, now()) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, etag = excluded.etag, \
             expires_at = excluded.expires_at, updated_at = now()"
        );
        Sql {
            get: format!("SELECT value, etag FROM {table} WHERE key = $1 AND {live}"),
            bulk_get: format!(
                "SELECT key, value, etag FROM {table} WHERE key = ANY($1) AND {live}"
            ),
            insert_absent: format!(
                "{insert} WHERE t.expires_at IS NOT NULL AND t.expires_at <= now()"
            ),
            upsert: insert,
            update_version: format!(
                "UPDATE {table} SET value = $2, etag = nextval('{seq}'), expires_at = {expiry}, \
                 updated_at = now() WHERE key = $1 AND etag = $4 AND {live}"
            ),
            delete: format!("DELETE FROM {table} WHERE key = $1"),
            delete_version: format!("DELETE FROM {table} WHERE key = $1 AND etag = $2 AND {live}"),
            sweep: format!("DELETE FROM {table} WHERE expires_at <= now()"),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Postgres {
    name: String,
    pool: Pool,
    sql: std::sync::Arc<Sql>,
    _sweeper: Sweeper,
}

/// `name` or `schema.name`, each part an unquoted SQL identifier: the name
/// is spliced into statements, so nothing else may pass.
fn valid_table(t: &str) -> bool {
    let parts: Vec<&str> = t.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            let mut b = p.bytes();
            b.next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
                && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        })
}

fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl Postgres {
    pub(crate) async fn open(spec: &ComponentSpec) -> Result<Self> {
        let name = spec.name.clone();
        let bad =
            |msg: String| Error::Config(format!("component {name} (state.postgresql): {msg}"));
        let conn_str = spec
            .metadata
            .get("connectionString")
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                bad(
                    "metadata connectionString is required: set it to a libpq string such as \
                     \"host=db port=5432 user=dapr password=... dbname=dapr\" or a postgres:// URL"
                        .into(),
                )
            })?;
        let table = spec
            .metadata
            .get("tableName")
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .unwrap_or("state")
            .to_owned();
        if !valid_table(&table) {
            return Err(bad(format!(
                "metadata tableName {table:?} must be an SQL identifier (letters, digits, _), optionally schema-qualified"
            )));
        }
        // Parse errors may quote the string, which may hold a password: name the problem only.
        let mut pg = tokio_postgres::Config::from_str(conn_str).map_err(|e| {
            bad(format!("metadata connectionString does not parse ({}); use key=value pairs or a postgres:// URL",
                e.to_string().replace(conn_str, "…")))
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        let mgr = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let base = table.rsplit('.').next().unwrap_or(&table);
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
               key text PRIMARY KEY, value bytea NOT NULL, etag bigint NOT NULL, \
               expires_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now()); \
             CREATE SEQUENCE IF NOT EXISTS {table}_etag_seq; \
             CREATE INDEX IF NOT EXISTS {base}_expires_at_idx ON {table} (expires_at) \
               WHERE expires_at IS NOT NULL;"
        );
        let store = Postgres {
            name: name.clone(),
            pool: pool.clone(),
            sql: std::sync::Arc::new(Sql::new(&table)),
            _sweeper: {
                let pool = pool.clone();
                let sweep = Sql::new(&table).sweep;
                sweep::every(move || {
                    let pool = pool.clone();
                    let sweep = sweep.clone();
                    async move {
                        // A failed sweep is retried next period; reads already hide expired rows.
                        if let Ok(c) = pool.get().await {
                            let _ = c.execute(sweep.as_str(), &[]).await;
                        }
                    }
                })
            },
        };
        let client = store.client().await?;
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| store.backend(&e))?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool.get().await.map_err(|e| {
            Error::Backend(format!(
                "component {} (state.postgresql): no connection: {e}",
                self.name
            ))
        })
    }

    fn backend(&self, e: &tokio_postgres::Error) -> Error {
        Error::Backend(format!(
            "component {} (state.postgresql): {}",
            self.name,
            db_error(e)
        ))
    }

    /// One checked write on `c` (a pooled client or an open transaction).
    async fn apply(&self, c: &impl GenericClient, op: &Op, want: Expect) -> Result<()> {
        let (n, key) = match op {
            Op::Upsert(s) => {
                let ttl = expect::ttl_ms(s.ttl).map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
                let value: &[u8] = &s.value;
                let n = match want {
                    Expect::Any | Expect::Absent => {
                        let sql = if want == Expect::Any {
                            &self.sql.upsert
                        } else {
                            &self.sql.insert_absent
                        };
                        let st = c.prepare_cached(sql).await.map_err(|e| self.backend(&e))?;
                        c.execute(&st, &[&s.key, &value, &ttl]).await
                    }
                    Expect::Version(v) => {
                        let st = c
                            .prepare_cached(&self.sql.update_version)
                            .await
                            .map_err(|e| self.backend(&e))?;
                        // No version above i64::MAX was ever issued: such an etag cannot match.
                        let v = i64::try_from(v).unwrap_or(-1);
                        c.execute(&st, &[&s.key, &value, &ttl, &v]).await
                    }
                };
                (n, &s.key)
            }
            Op::Delete(d) => {
                let n = match want {
                    Expect::Version(v) => {
                        let st = c
                            .prepare_cached(&self.sql.delete_version)
                            .await
                            .map_err(|e| self.backend(&e))?;
                        let v = i64::try_from(v).unwrap_or(-1);
                        c.execute(&st, &[&d.key, &v]).await
                    }
                    Expect::Any | Expect::Absent => {
                        let st = c
                            .prepare_cached(&self.sql.delete)
                            .await
                            .map_err(|e| self.backend(&e))?;
                        c.execute(&st, &[&d.key]).await
                    }
                };
                (n, &d.key)
            }
        };
        let n = n.map_err(|e| self.backend(&e))?;
        if n == 0 && want != Expect::Any {
            return Err(expect::mismatch(key));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for Postgres {
    async fn get(&self, key: &str) -> Result<Option<Item>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&self.sql.get)
            .await
            .map_err(|e| self.backend(&e))?;
        let row = c
            .query_opt(&st, &[&key])
            .await
            .map_err(|e| self.backend(&e))?;
        Ok(row.map(|r| Item {
            value: Bytes::from(r.get::<_, Vec<u8>>(0)),
            etag: r.get::<_, i64>(1).to_string(),
        }))
    }

    async fn save(&self, save: Save) -> Result<()> {
        let want = expect::for_save(&save)?;
        let c = self.client().await?;
        self.apply(&c, &Op::Upsert(save), want).await
    }

    async fn delete(&self, delete: Delete) -> Result<()> {
        let want = expect::for_delete(&delete)?;
        let c = self.client().await?;
        self.apply(&c, &Op::Delete(delete), want).await
    }

    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<Item>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let st = c
            .prepare_cached(&self.sql.bulk_get)
            .await
            .map_err(|e| self.backend(&e))?;
        let rows = c.query(&st, &[&keys]).await.map_err(|e| self.backend(&e))?;
        let found: std::collections::HashMap<String, Item> = rows
            .into_iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    Item {
                        value: Bytes::from(r.get::<_, Vec<u8>>(1)),
                        etag: r.get::<_, i64>(2).to_string(),
                    },
                )
            })
            .collect();
        // A key asked for twice gets its item twice.
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<()> {
        let checked = ops
            .iter()
            .map(|op| Ok((op, expect::for_op(op)?)))
            .collect::<Result<Vec<_>>>()?;
        if checked.is_empty() {
            return Ok(());
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.backend(&e))?;
        for (op, want) in checked {
            // On error `tx` is dropped, which rolls back.
            self.apply(&tx, op, want).await?;
        }
        tx.commit().await.map_err(|e| self.backend(&e))
    }

    async fn ping(&self) -> Result<()> {
        let c = self.client().await?;
        c.simple_query("SELECT 1")
            .await
            .map_err(|e| self.backend(&e))?;
        Ok(())
    }
}
