//! `state.redis`: each key is a hash with fields `data` and `version`, as
//! Dapr's state.redis component stores it (so either can read the other's
//! items), etag = `version`.
//!
//! Every write, single or transactional, is one Lua script: it checks all
//! etags first (replaying earlier ops of the same call, so two ops on one
//! key see each other) and only then writes, so a failed check leaves
//! nothing changed and no other client can slip in between (a script runs
//! atomically on the server).

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Script};

use crate::expect::{self, Expect};
use crate::{ComponentSpec, Delete, Error, Item, Op, Result, Save, Store};

/// KEYS: one per op. ARGV: five per op: kind (`s` save, `d` delete), mode
/// (`a` any, `n` must be absent, `v` must have version), expected version,
/// data, TTL in ms (`0` = none). Returns 0, or the 1-based index of the
/// first op whose check failed.
const APPLY: &str = r#"
local virt = {}
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local k = KEYS[i]
  local cur = virt[k]
  if cur == nil then
    local v = redis.pcall("HGET", k, "version")
    if type(v) == "table" or not v then cur = 0 else cur = tonumber(v) or 0 end
  end
  local mode = ARGV[b + 2]
  if mode == "n" and cur ~= 0 then return i end
  if mode == "v" and (cur == 0 or cur ~= tonumber(ARGV[b + 3])) then return i end
  if ARGV[b + 1] == "s" then virt[k] = cur + 1 else virt[k] = 0 end
end
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local k = KEYS[i]
  if ARGV[b + 1] == "s" then
    local t = redis.call("TYPE", k)
    if t.ok ~= "hash" and t.ok ~= "none" then redis.call("DEL", k) end
    redis.call("HSET", k, "data", ARGV[b + 4])
    redis.call("HINCRBY", k, "version", 1)
    local ttl = tonumber(ARGV[b + 5])
    if ttl > 0 then redis.call("PEXPIRE", k, ttl) else redis.call("PERSIST", k) end
  else
    redis.call("DEL", k)
  end
end
return 0
"#;

pub(crate) struct RedisStore {
    name: String,
    host: String,
    conn: ConnectionManager,
    /// `ttlInSeconds`: applies to saves that carry no TTL of their own.
    default_ttl: Option<Duration>,
    apply: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("default_ttl", &self.default_ttl)
            .finish_non_exhaustive()
    }
}

fn field<'a>(spec: &'a ComponentSpec, name: &str) -> Option<&'a str> {
    spec.metadata
        .get(name)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// A client for the Redis server a component's metadata names
/// (`redisHost`, `redisDB`, `redisUsername`, `redisPassword`, as Dapr's
/// Redis components read them), and the `host:port` for messages. Every
/// Redis-backed component (state, configuration, locks, bindings) opens
/// its server through this, so they all read the same keys the same way.
pub fn redis_client(spec: &ComponentSpec) -> Result<(redis::Client, String)> {
    let (name, kind) = (&spec.name, &spec.kind);
    let bad = |msg: String| Error::Config(format!("component {name} ({kind}): {msg}"));
    let host = field(spec, "redisHost").ok_or_else(|| {
        bad("metadata redisHost is required: set it to the server's host:port, e.g. redis-master:6379".into())
    })?;
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>().map_err(|_| {
                bad(format!(
                    "metadata redisHost {host:?}: the port is not a number; write host:port"
                ))
            })?,
        ),
        None => (host, 6379),
    };
    if field(spec, "enableTLS").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(bad(
            "metadata enableTLS=true is not supported by this runtime; remove it or use a plain-TCP Redis".into(),
        ));
    }
    let mut settings = RedisConnectionInfo::default();
    if let Some(db) = field(spec, "redisDB") {
        let db = db.parse::<i64>().map_err(|_| {
            bad(format!(
                "metadata redisDB {db:?} is not a number; write a database index such as 0"
            ))
        })?;
        settings = settings.set_db(db);
    }
    if let Some(user) = field(spec, "redisUsername") {
        settings = settings.set_username(user);
    }
    if let Some(pw) = spec.metadata.get("redisPassword").filter(|p| !p.is_empty()) {
        settings = settings.set_password(pw);
    }
    let info = ConnectionAddr::Tcp(h.to_owned(), port)
        .into_connection_info()
        .map_err(|e| bad(format!("metadata redisHost {host:?}: {e}")))?
        .set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(|e| bad(format!("{e}")))?;
    Ok((client, host.to_owned()))
}

/// [`redis_client`], connected: the reconnecting connection every
/// Redis-backed component keeps (5 s to connect, 10 s per reply, two
/// retries), the client (for what a managed connection cannot do, such as
/// subscribing) and the `host:port`.
pub async fn redis_connect(
    spec: &ComponentSpec,
) -> Result<(ConnectionManager, redis::Client, String)> {
    let (client, host) = redis_client(spec)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2);
    let conn = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(|e| {
            Error::Backend(format!(
                "component {} ({}): cannot connect to {host}: {e}",
                spec.name, spec.kind
            ))
        })?;
    Ok((conn, client, host))
}

impl RedisStore {
    pub(crate) async fn open(spec: &ComponentSpec) -> Result<Self> {
        let name = &spec.name;
        let bad = |msg: String| Error::Config(format!("component {name} (state.redis): {msg}"));
        let default_ttl = match field(spec, "ttlInSeconds") {
            None => None,
            Some(t) => {
                let secs = t.parse::<i64>().map_err(|_| {
                    bad(format!(
                        "metadata ttlInSeconds {t:?} is not a whole number of seconds"
                    ))
                })?;
                u64::try_from(secs)
                    .ok()
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs)
            }
        };
        let (conn, _, host) = redis_connect(spec).await?;
        Ok(RedisStore {
            name: name.clone(),
            host,
            conn,
            default_ttl,
            apply: Script::new(APPLY),
        })
    }

    fn backend(&self, e: redis::RedisError) -> Error {
        Error::Backend(format!(
            "component {} (state.redis at {}): {e}",
            self.name, self.host
        ))
    }

    async fn run(&self, ops: &[(&Op, Expect)]) -> Result<()> {
        let mut inv = self.apply.prepare_invoke();
        for (op, want) in ops {
            let (mode, ver) = match want {
                Expect::Any => ("a", 0),
                Expect::Absent => ("n", 0),
                Expect::Version(v) => ("v", *v),
            };
            match op {
                Op::Upsert(s) => {
                    let ttl = expect::ttl_ms(s.ttl.or(self.default_ttl)).unwrap_or(0);
                    inv.key(&s.key)
                        .arg("s")
                        .arg(mode)
                        .arg(ver)
                        .arg(s.value.as_ref())
                        .arg(ttl);
                }
                Op::Delete(d) => {
                    inv.key(&d.key).arg("d").arg(mode).arg(ver).arg("").arg(0);
                }
            }
        }
        let mut conn = self.conn.clone();
        let failed: i64 = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.backend(e))?;
        if failed == 0 {
            return Ok(());
        }
        let key = usize::try_from(failed - 1)
            .ok()
            .and_then(|i| ops.get(i))
            .map(|(op, _)| match op {
                Op::Upsert(s) => s.key.as_str(),
                Op::Delete(d) => d.key.as_str(),
            })
            .unwrap_or("");
        Err(expect::mismatch(key))
    }
}

fn item(reply: (Option<Vec<u8>>, Option<String>)) -> Option<Item> {
    match reply {
        (Some(data), Some(version)) => Some(Item {
            value: Bytes::from(data),
            etag: version,
        }),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Item>> {
        let mut conn = self.conn.clone();
        let reply: (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg("data")
            .arg("version")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.backend(e))?;
        Ok(item(reply))
    }

    async fn save(&self, save: Save) -> Result<()> {
        let want = expect::for_save(&save)?;
        self.run(&[(&Op::Upsert(save), want)]).await
    }

    async fn delete(&self, delete: Delete) -> Result<()> {
        let want = expect::for_delete(&delete)?;
        self.run(&[(&Op::Delete(delete), want)]).await
    }

    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<Item>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HMGET").arg(k).arg("data").arg("version");
        }
        let mut conn = self.conn.clone();
        let replies: Vec<(Option<Vec<u8>>, Option<String>)> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.backend(e))?;
        Ok(replies.into_iter().map(item).collect())
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<()> {
        let checked = ops
            .iter()
            .map(|op| Ok((op, expect::for_op(op)?)))
            .collect::<Result<Vec<_>>>()?;
        if checked.is_empty() {
            return Ok(());
        }
        self.run(&checked).await
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
