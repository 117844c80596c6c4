//! `pubsub.redis`: Redis Streams (Redis ≥ 6.2 for XAUTOCLAIM), laid out as
//! Dapr's component does so both can share a server: the stream key is the
//! topic, the consumer group is the group (Dapr's `consumerID`, by default
//! the app-id), and the payload is the entry's `data` field. This crate
//! adds `id`, `contentType` and `metadata` (JSON) fields; an entry without
//! them (from a Dapr sidecar) is delivered with the entry ID as id.
//!
//! - publish: `XADD <topic> [MAXLEN ~ n | MINID ~ t] * data … id … `; `Ok`
//!   once Redis answered (how durable that is, is the server's AOF
//!   setting).
//! - subscribe: `XGROUP CREATE <topic> <group> 0 MKSTREAM` (BUSYGROUP:
//!   it exists). As in Dapr, a new group starts at `0`: it sees what the
//!   stream still holds, then everything new. Each subscription is its
//!   own consumer (`<host>-<pid>-<n>-<ms>`), so several subscriptions,
//!   in any process, compete. A background task reads with
//!   `XREADGROUP … BLOCK` into a channel of `queueDepth` entries (held
//!   ahead; cancel-safe `next`) and, every `redeliverInterval`, claims
//!   entries pending longer than `processingTimeout` with `XAUTOCLAIM`
//!   (delivery count from `XPENDING` → `attempt`).
//! - nack(delay): the entry stays pending. Its not-before time goes into
//!   the hash `nodeplane-pubsub:retry:<len(group)>:<group>:<topic>` (so
//!   any consumer that claims it later waits too — also after this process
//!   died), its idle time is reset (`XCLAIM … JUSTID`) so nobody claims it
//!   early, and this subscription claims it back (`XCLAIM`, counting a
//!   delivery) when due, refreshing the idle time meanwhile if the delay
//!   is longer than half the processing timeout.
//! - ack: `XACK` (and `HDEL` of any not-before).
//! - close: the consumer is deleted if it has nothing pending; a consumer
//!   with pending entries stays until they are claimed, and consumers idle
//!   for an hour with nothing pending are removed by the next subscribe.
//!
//! Order: one subscription gets new entries in stream order; claimed and
//! nacked entries come when due. With `processingTimeout: 0` (Dapr:
//! redelivery disabled) an unsettled delivery is never redelivered, and a
//! nack is redelivered only by the subscription that nacked it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{RedisConfig, Trim};
use crate::{wire, AckToken, Broker, Delivery, Error, Message, Result, Settle, Subscription};

/// Longest single XREADGROUP block.
const BLOCK: Duration = Duration::from_secs(2);
/// Consumers idle this long with nothing pending are removed.
const STALE_CONSUMER: Duration = Duration::from_secs(3600);

/// Deletes consumer ARGV[2] of group ARGV[1] on stream KEYS[1] if it has
/// no pending entries (atomically: none can arrive in between).
const DEL_IF_IDLE: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
"#;

/// Deletes consumers of group ARGV[1] idle longer than ARGV[2] ms with
/// nothing pending.
const DEL_STALE: &str = r#"
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"#;

pub(crate) struct RedisBroker {
    name: String,
    addr: String,
    cfg: RedisConfig,
    client: redis::Client,
    conn: ConnectionManager,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn backend(name: &str, addr: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("component {name} (pubsub.redis at {addr}): {e}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisBroker {
    pub(crate) async fn open(name: &str, cfg: RedisConfig) -> Result<Self> {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let mut settings = RedisConnectionInfo::default().set_db(cfg.db);
        if let Some(u) = &cfg.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &cfg.password {
            settings = settings.set_password(p);
        }
        let info = ConnectionAddr::Tcp(cfg.host.clone(), cfg.port)
            .into_connection_info()
            .map_err(|e| {
                Error::Config(format!(
                    "component {name} (pubsub.redis): metadata redisHost {addr:?}: {e}"
                ))
            })?
            .set_redis_settings(settings);
        let client = redis::Client::open(info)
            .map_err(|e| Error::Config(format!("component {name} (pubsub.redis): {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.dial_timeout))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| backend(name, &addr, format!("cannot connect: {e}")))?;
        let b = RedisBroker {
            name: name.to_owned(),
            addr,
            cfg,
            client,
            conn,
        };
        b.ping().await?;
        Ok(b)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        backend(&self.name, &self.addr, e)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(topic)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.err(format!("XGROUP CREATE {topic} {group}: {e}"))),
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

#[async_trait::async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, msg: Message) -> Result<()> {
        if msg.topic.is_empty() {
            return Err(Error::Invalid(format!(
                "component {}: the topic name is empty",
                self.name
            )));
        }
        let mut c = redis::cmd("XADD");
        c.arg(&msg.topic);
        match self.cfg.trim {
            Some(Trim::MaxLenApprox(n)) => {
                c.arg("MAXLEN").arg("~").arg(n);
            }
            Some(Trim::MaxAge(age)) => {
                c.arg("MINID")
                    .arg("~")
                    .arg(format!("{}-0", now_ms().saturating_sub(ms(age))));
            }
            None => {}
        }
        c.arg("*")
            .arg("data")
            .arg(msg.data.as_ref())
            .arg("id")
            .arg(&msg.id)
            .arg("contentType")
            .arg(&msg.content_type)
            .arg("metadata")
            .arg(wire::metadata_json(&msg.metadata));
        let mut conn = self.conn.clone();
        let _: String = c
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(format!("XADD {}: {e}", msg.topic)))?;
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        let group = self.cfg.consumer_id.as_deref().unwrap_or(group).to_owned();
        if topic.is_empty() || group.is_empty() {
            return Err(Error::Invalid(format!(
                "component {}: subscribe needs a topic and a group (got {topic:?}, {group:?})",
                self.name
            )));
        }
        self.create_group(topic, &group).await?;
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<i64> = redis::Script::new(DEL_STALE)
            .key(topic)
            .arg(&group)
            .arg(ms(STALE_CONSUMER))
            .invoke_async(&mut conn)
            .await;
        static N: AtomicU64 = AtomicU64::new(0);
        let consumer = format!(
            "{}-{}-{}-{}",
            host_name(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            now_ms()
        );
        let ctx = Arc::new(Ctx {
            name: self.name.clone(),
            addr: self.addr.clone(),
            retry_key: format!("nodeplane-pubsub:retry:{}:{}:{}", group.len(), group, topic),
            topic: topic.to_owned(),
            group,
            consumer,
            conn: self.conn.clone(),
            client: self.client.clone(),
            processing_timeout: self.cfg.processing_timeout,
            redeliver_interval: self.cfg.redeliver_interval,
            queue_depth: self.cfg.queue_depth,
            dial_timeout: self.cfg.dial_timeout,
        });
        let reader_conn = ctx.reader_connection().await?;
        let (tx, rx) = mpsc::channel(self.cfg.queue_depth);
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(
            ctx.clone(),
            reader_conn,
            tx.clone(),
            retry_tx.clone(),
        ));
        let retrier = tokio::spawn(retry_loop(ctx.clone(), retry_rx, tx, retry_tx.downgrade()));
        Ok(Box::new(Sub {
            ctx,
            rx,
            tasks: vec![reader.abort_handle(), retrier.abort_handle()],
        }))
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn ack_timeout(&self) -> Option<Duration> {
        let c = &self.cfg;
        (!c.processing_timeout.is_zero() && !c.redeliver_interval.is_zero())
            .then_some(c.processing_timeout)
    }
}

/// What one subscription's tasks and tokens share.
struct Ctx {
    name: String,
    addr: String,
    topic: String,
    group: String,
    consumer: String,
    retry_key: String,
    conn: ConnectionManager,
    client: redis::Client,
    processing_timeout: Duration,
    redeliver_interval: Duration,
    queue_depth: usize,
    dial_timeout: Duration,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        backend(
            &self.name,
            &self.addr,
            format!("{what} {} (group {}): {e}", self.topic, self.group),
        )
    }

    fn redelivers(&self) -> bool {
        !self.processing_timeout.is_zero() && !self.redeliver_interval.is_zero()
    }

    /// Its own connection: a blocked XREADGROUP holds up every command
    /// queued behind it on a connection.
    async fn reader_connection(&self) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.dial_timeout))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(10)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.err("connect for", e))
    }

    fn delivery(self: &Arc<Self>, entry: Entry, attempt: u32, retry: &RetryTx) -> Delivery {
        let mut msg = Message {
            id: String::new(),
            topic: self.topic.clone(),
            data: Bytes::new(),
            content_type: String::new(),
            metadata: Default::default(),
        };
        for (k, v) in entry.fields {
            match k.as_slice() {
                b"data" => msg.data = Bytes::from(v),
                b"id" => msg.id = String::from_utf8_lossy(&v).into_owned(),
                b"contentType" => msg.content_type = String::from_utf8_lossy(&v).into_owned(),
                b"metadata" => msg.metadata = wire::metadata_from_json(&v),
                _ => {}
            }
        }
        if msg.id.is_empty() {
            msg.id = entry.id.clone();
        }
        Delivery {
            msg,
            attempt,
            token: AckToken::new(Token {
                ctx: self.clone(),
                id: entry.id,
                retry: retry.clone(),
            }),
        }
    }

    /// Delivery counts of our pending entries among `ids` (ascending).
    async fn counts(&self, ids: &[String]) -> Result<HashMap<String, u32>> {
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
            return Ok(HashMap::new());
        };
        let mut conn = self.conn.clone();
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&self.topic)
            .arg(&self.group)
            .arg(first)
            .arg(last)
            .arg(ids.len().max(1) * 2)
            .arg(&self.consumer)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err("XPENDING", e))?;
        Ok(rows
            .into_iter()
            .map(|(id, _, _, n)| (id, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect())
    }

    /// Not-before times (ms) nacks left for `ids`.
    async fn not_before(&self, ids: &[String]) -> Result<Vec<Option<u64>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut c = redis::cmd("HMGET");
        c.arg(&self.retry_key);
        for id in ids {
            c.arg(id);
        }
        c.query_async(&mut conn)
            .await
            .map_err(|e| self.err("HMGET retry times of", e))
    }

    /// One XAUTOCLAIM sweep: entries pending longer than the processing
    /// timeout become ours; those a nack delays are held until due.
    async fn reclaim(self: &Arc<Self>, tx: &DeliveryTx, retry: &RetryTx) -> Result<bool> {
        let mut cursor = "0-0".to_owned();
        // Bounded per sweep; the rest waits for the next one.
        for _ in 0..10 {
            let mut conn = self.conn.clone();
            let v: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.topic)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(ms(self.processing_timeout))
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.queue_depth)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.err("XAUTOCLAIM", e))?;
            let (next, entries, deleted) = parse_autoclaim(v);
            if !deleted.is_empty() {
                // Trimmed away (MAXLEN) while pending: nothing to deliver.
                let mut c = redis::cmd("HDEL");
                c.arg(&self.retry_key);
                for id in &deleted {
                    c.arg(id);
                }
                let _: redis::RedisResult<i64> = c.query_async(&mut conn).await;
            }
            let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            let counts = self.counts(&ids).await?;
            let not_before = self.not_before(&ids).await?;
            let now = now_ms();
            for (entry, nb) in entries.into_iter().zip(not_before) {
                match nb {
                    Some(t) if t > now => {
                        let due = Instant::now() + Duration::from_millis(t - now);
                        let _ = retry.send(Held { due, id: entry.id });
                    }
                    _ => {
                        let attempt = counts.get(&entry.id).copied().unwrap_or(2).max(2);
                        if tx
                            .send(Ok(self.delivery(entry, attempt, retry)))
                            .await
                            .is_err()
                        {
                            return Ok(false);
                        }
                    }
                }
            }
            if next == "0-0" || next.is_empty() {
                break;
            }
            cursor = next;
        }
        Ok(true)
    }
}

/// One stream entry: its ID and field/value pairs.
#[derive(Debug)]
struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn bytes_of(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// `[[id, [f, v, …]], …]`; entries whose fields are nil (deleted, in
/// Redis 6.2) are skipped.
fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop();
        let Some(id) = pair.pop().as_ref().and_then(text) else {
            continue;
        };
        let fields = match fields {
            Some(Value::Array(f)) => f,
            Some(Value::Map(m)) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => continue,
        };
        let mut it = fields.into_iter();
        let mut kv = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            kv.push((bytes_of(k), bytes_of(v)));
        }
        out.push(Entry { id, fields: kv });
    }
    out
}

/// XREADGROUP: nil, or `[[stream, entries]]` (a map in RESP3).
fn parse_read(v: Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    kv.pop().map(parse_entries).unwrap_or_default()
                }
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.into_iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        _ => Vec::new(),
    }
}

/// XAUTOCLAIM: `[next cursor, entries, deleted ids]`.
fn parse_autoclaim(v: Value) -> (String, Vec<Entry>, Vec<String>) {
    let Value::Array(parts) = v else {
        return (String::new(), Vec::new(), Vec::new());
    };
    let mut it = parts.into_iter();
    let next = it.next().as_ref().and_then(text).unwrap_or_default();
    let entries = it.next().map(parse_entries).unwrap_or_default();
    let deleted = match it.next() {
        Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    (next, entries, deleted)
}

type DeliveryTx = mpsc::Sender<Result<Delivery>>;
type RetryTx = mpsc::UnboundedSender<Held>;

/// An entry this subscription holds back until a nack's delay is over.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    due: Instant,
    id: String,
}

async fn read_loop(ctx: Arc<Ctx>, mut conn: MultiplexedConnection, tx: DeliveryTx, retry: RetryTx) {
    let mut next_reclaim = Instant::now();
    loop {
        if ctx.redelivers() && Instant::now() >= next_reclaim {
            match ctx.reclaim(&tx, &retry).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = tx.try_send(Err(e));
                }
            }
            next_reclaim = Instant::now() + ctx.redeliver_interval;
        }
        let block = if ctx.redelivers() {
            next_reclaim
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), BLOCK)
        } else {
            BLOCK
        };
        let r: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&ctx.group)
            .arg(&ctx.consumer)
            .arg("COUNT")
            .arg(ctx.queue_depth)
            .arg("BLOCK")
            .arg(ms(block).max(1))
            .arg("STREAMS")
            .arg(&ctx.topic)
            .arg(">")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(v) => {
                for entry in parse_read(v) {
                    if tx.send(Ok(ctx.delivery(entry, 1, &retry))).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if tx.is_closed() {
                    return;
                }
                let _ = tx.try_send(Err(ctx.err("XREADGROUP", &e)));
                tokio::time::sleep(Duration::from_millis(500)).await;
                if e.code() == Some("NOGROUP") {
                    // The stream or group was deleted under us: as Dapr, recreate it.
                    let mut c = ctx.conn.clone();
                    let _: redis::RedisResult<Value> = redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&ctx.topic)
                        .arg(&ctx.group)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async(&mut c)
                        .await;
                } else if let Ok(c) = ctx.reader_connection().await {
                    conn = c;
                }
            }
        }
    }
}

async fn retry_loop(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<Held>,
    tx: DeliveryTx,
    retry: mpsc::WeakUnboundedSender<Held>,
) {
    let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let refresh_every = ctx.processing_timeout / 2;
    let mut next_refresh = Instant::now() + refresh_every;
    loop {
        let mut wake = held.peek().map(|h| h.0.due);
        if !held.is_empty() && !refresh_every.is_zero() {
            wake = Some(wake.map_or(next_refresh, |w| w.min(next_refresh)));
        }
        tokio::select! {
            m = rx.recv() => match m {
                Some(h) => held.push(Reverse(h)),
                None => return,
            },
            _ = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(w).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let now = Instant::now();
        while held.peek().is_some_and(|h| h.0.due <= now) {
            let Some(Reverse(h)) = held.pop() else { break };
            let Some(retry) = retry.upgrade() else { return };
            match claim_again(&ctx, &h.id, &retry).await {
                Ok(Some(d)) => {
                    if tx.send(Ok(d)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.try_send(Err(e));
                    held.push(Reverse(Held {
                        due: now + Duration::from_secs(1),
                        id: h.id,
                    }));
                    break;
                }
            }
        }
        if !refresh_every.is_zero() && now >= next_refresh {
            next_refresh = now + refresh_every;
            let ids: Vec<&str> = held.iter().map(|h| h.0.id.as_str()).collect();
            if !ids.is_empty() {
                // Keep them ours: reset their idle time, counting no delivery.
                let mut c = redis::cmd("XCLAIM");
                c.arg(&ctx.topic).arg(&ctx.group).arg(&ctx.consumer).arg(0);
                for id in &ids {
                    c.arg(*id);
                }
                c.arg("JUSTID");
                let mut conn = ctx.conn.clone();
                let _: redis::RedisResult<Value> = c.query_async(&mut conn).await;
            }
        }
    }
}

/// Takes a held entry back as a new delivery (XCLAIM counts it).
async fn claim_again(ctx: &Arc<Ctx>, id: &str, retry: &RetryTx) -> Result<Option<Delivery>> {
    let mut conn = ctx.conn.clone();
    let v: Value = redis::cmd("XCLAIM")
        .arg(&ctx.topic)
        .arg(&ctx.group)
        .arg(&ctx.consumer)
        .arg(0)
        .arg(id)
        .query_async(&mut conn)
        .await
        .map_err(|e| ctx.err("XCLAIM", e))?;
    let Some(entry) = parse_entries(v).pop() else {
        // Acked meanwhile, or trimmed away.
        return Ok(None);
    };
    let counts = ctx.counts(std::slice::from_ref(&entry.id)).await?;
    let attempt = counts.get(&entry.id).copied().unwrap_or(2).max(2);
    Ok(Some(ctx.delivery(entry, attempt, retry)))
}

#[derive(Debug)]
struct Sub {
    ctx: Arc<Ctx>,
    rx: mpsc::Receiver<Result<Delivery>>,
    tasks: Vec<AbortHandle>,
}

impl Sub {
    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

async fn delete_consumer(ctx: &Ctx) -> Result<()> {
    let mut conn = ctx.conn.clone();
    let _: i64 = redis::Script::new(DEL_IF_IDLE)
        .key(&ctx.topic)
        .arg(&ctx.group)
        .arg(&ctx.consumer)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| ctx.err("XGROUP DELCONSUMER on", e))?;
    Ok(())
}

impl Drop for Sub {
    fn drop(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        self.stop();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let ctx = self.ctx.clone();
            rt.spawn(async move {
                let _ = delete_consumer(&ctx).await;
            });
        }
    }
}

#[async_trait::async_trait]
impl Subscription for Sub {
    async fn next(&mut self) -> Result<Delivery> {
        match self.rx.recv().await {
            Some(d) => d,
            None => Err(Error::Closed(format!(
                "component {}: subscription to {} closed",
                self.ctx.name, self.ctx.topic
            ))),
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.stop();
        // What was read ahead stays pending under this consumer until the
        // processing timeout; deliver nothing more from here.
        self.rx.close();
        delete_consumer(&self.ctx).await
    }
}

#[derive(Debug)]
struct Token {
    ctx: Arc<Ctx>,
    id: String,
    retry: RetryTx,
}

#[async_trait::async_trait]
impl Settle for Token {
    async fn ack(self: Box<Self>) -> Result<()> {
        let ctx = &self.ctx;
        let mut conn = ctx.conn.clone();
        let _: (i64, i64) = redis::pipe()
            .cmd("XACK")
            .arg(&ctx.topic)
            .arg(&ctx.group)
            .arg(&self.id)
            .cmd("HDEL")
            .arg(&ctx.retry_key)
            .arg(&self.id)
            .query_async(&mut conn)
            .await
            .map_err(|e| ctx.err("XACK", e))?;
        Ok(())
    }

    async fn nack(self: Box<Self>, retry_after: Duration) -> Result<()> {
        let ctx = &self.ctx;
        let mut conn = ctx.conn.clone();
        let _: (i64, Value) = redis::pipe()
            .cmd("HSET")
            .arg(&ctx.retry_key)
            .arg(&self.id)
            .arg(now_ms().saturating_add(ms(retry_after)))
            .cmd("XCLAIM")
            .arg(&ctx.topic)
            .arg(&ctx.group)
            .arg(&ctx.consumer)
            .arg(0)
            .arg(&self.id)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .map_err(|e| ctx.err("nack (HSET, XCLAIM)", e))?;
        // If this subscription is gone, another consumer claims the entry
        // after the processing timeout and still honours the delay.
        let _ = self.retry.send(Held {
            due: Instant::now() + retry_after,
            id: self.id,
        });
        Ok(())
    }
}
