//! Configuration stores: read-only key/value items an app reads and
//! follows (Dapr's configuration building block).
//!
//! - `configuration.redis`: Dapr's format, so items written for Dapr read
//!   the same: a string key whose value is `VALUE` or `VALUE||VERSION`.
//!   Changes come from Redis keyspace notifications, which the server
//!   must publish (`notify-keyspace-events` with `K` and `A`, or at least
//!   the string and generic classes); subscribing says so when they are off.
//! - `configuration.file`: nodeplane's own, for standalone nodes: a YAML or
//!   JSON file (metadata `path`, absolute) mapping each key to a string or
//!   to `{value, version, metadata}`. The file is read on every get and
//!   watched for changes while anyone subscribes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nodeplane_state::ComponentSpec;
use serde_json::Value;
use tokio::sync::mpsc;

/// One configuration item, as the API answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Item {
    pub value: String,
    pub version: String,
    pub metadata: BTreeMap<String, String>,
}

/// Items by key.
pub type Items = BTreeMap<String, Item>;

/// Component types served here.
pub const KINDS: &[&str] = &["configuration.redis", "configuration.file"];

/// How often a watched file is looked at.
const FILE_POLL: Duration = Duration::from_millis(300);

#[async_trait::async_trait]
pub trait ConfigStore: Send + Sync + std::fmt::Debug {
    /// The items of `keys` that exist (no keys: every item).
    async fn get(&self, keys: &[String]) -> Result<Items, String>;
    /// Checks that changes can be followed, then sends every change of
    /// `keys` (no keys: all) to `tx` until it closes. A deleted item is
    /// sent with an empty value and version, as Dapr does.
    async fn watch(&self, keys: Vec<String>, tx: mpsc::Sender<Items>) -> Result<Watch, String>;
}

/// A running watch: dropping it stops it.
#[derive(Debug)]
pub struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a configuration store component.
pub async fn open(spec: &ComponentSpec) -> Result<Arc<dyn ConfigStore>, String> {
    match spec.kind.as_str() {
        "configuration.redis" => Ok(Arc::new(RedisConfig::open(spec).await?)),
        "configuration.file" => Ok(Arc::new(FileConfig::open(spec)?)),
        other => Err(format!(
            "type {other} is not a configuration store this runtime has; use one of {}",
            KINDS.join(", ")
        )),
    }
}

/// A Dapr Redis configuration value: `VALUE||VERSION` or `VALUE`.
fn redis_item(raw: &str) -> Item {
    let (value, version) = match raw.rsplit_once("||") {
        Some((v, ver)) => (v, ver),
        None => (raw, ""),
    };
    Item {
        value: value.into(),
        version: version.into(),
        metadata: BTreeMap::new(),
    }
}

#[derive(Debug)]
struct RedisConfig {
    name: String,
    host: String,
    client: redis::Client,
    conn: redis::aio::ConnectionManager,
    db: i64,
}

impl RedisConfig {
    async fn open(spec: &ComponentSpec) -> Result<Self, String> {
        let (conn, client, host) = nodeplane_state::redis_connect(spec)
            .await
            .map_err(|e| e.to_string())?;
        let db = client.get_connection_info().redis_settings().db();
        Ok(RedisConfig {
            name: spec.name.clone(),
            host,
            client,
            conn,
            db,
        })
    }

    fn err(&self, e: redis::RedisError) -> String {
        format!(
            "configuration store {} (redis at {}): {e}",
            self.name, self.host
        )
    }

    /// The string values of `keys`; other types are not configuration.
    async fn values(&self, keys: &[String]) -> Result<Items, String> {
        if keys.is_empty() {
            return Ok(Items::new());
        }
        let mut conn = self.conn.clone();
        let got: Vec<redis::Value> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(keys
            .iter()
            .zip(got)
            .filter_map(|(k, v)| {
                let s: String = redis::from_redis_value(v).ok()?;
                Some((k.clone(), redis_item(&s)))
            })
            .collect())
    }

    /// Is the server publishing the keyspace events a watch needs? `None`:
    /// CONFIG is refused (a managed server): trust the operator.
    async fn notifications_on(&self) -> Option<bool> {
        let mut conn = self.conn.clone();
        let got: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut conn)
            .await
            .ok()?;
        let flags = got.get(1)?;
        // K: keyspace channel; A (all) or $ (strings) and g (del/expire).
        let kinds = flags.contains('A') || (flags.contains('$') && flags.contains('g'));
        Some(flags.contains('K') && kinds)
    }
}

#[async_trait::async_trait]
impl ConfigStore for RedisConfig {
    async fn get(&self, keys: &[String]) -> Result<Items, String> {
        if !keys.is_empty() {
            return self.values(keys).await;
        }
        let mut conn = self.conn.clone();
        let mut all: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.err(e))?;
            all.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        all.sort();
        all.dedup();
        let mut items = Items::new();
        for chunk in all.chunks(500) {
            items.extend(self.values(chunk).await?);
        }
        Ok(items)
    }

    async fn watch(&self, keys: Vec<String>, tx: mpsc::Sender<Items>) -> Result<Watch, String> {
        if self.notifications_on().await == Some(false) {
            return Err(format!(
                "configuration store {}: the Redis server at {} does not publish keyspace notifications, so changes cannot be followed; enable them with `redis-cli config set notify-keyspace-events KA` (or notify-keyspace-events in redis.conf)",
                self.name, self.host
            ));
        }
        let mut ps = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| self.err(e))?;
        let prefix = format!("__keyspace@{}__:", self.db);
        if keys.is_empty() {
            ps.psubscribe(format!("{prefix}*"))
                .await
                .map_err(|e| self.err(e))?;
        } else {
            for k in &keys {
                ps.subscribe(format!("{prefix}{k}"))
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        let me = RedisConfig {
            name: self.name.clone(),
            host: self.host.clone(),
            client: self.client.clone(),
            conn: self.conn.clone(),
            db: self.db,
        };
        Ok(Watch(tokio::spawn(async move {
            let mut stream = ps.into_on_message();
            while let Some(msg) = stream.next().await {
                let Some(key) = msg.get_channel_name().strip_prefix(&prefix) else {
                    continue;
                };
                let event: String = msg.get_payload().unwrap_or_default();
                let key = key.to_string();
                let items = match event.as_str() {
                    "del" | "expired" | "evicted" | "unlink" => {
                        Items::from([(key, Item::default())])
                    }
                    _ => match me.values(std::slice::from_ref(&key)).await {
                        Ok(i) if !i.is_empty() => i,
                        // Not a string (anything but configuration) or
                        // gone again: nothing to tell.
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "configuration change not read");
                            continue;
                        }
                    },
                };
                if tx.send(items).await.is_err() {
                    return;
                }
            }
            tracing::warn!(store = %me.name, "configuration store's notification connection closed");
        })))
    }
}

#[derive(Debug)]
struct FileConfig {
    name: String,
    path: PathBuf,
}

impl FileConfig {
    fn open(spec: &ComponentSpec) -> Result<Self, String> {
        let path = spec
            .metadata
            .get("path")
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .ok_or("metadata path is required: the absolute path of a YAML or JSON file of key: value items")?;
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "metadata path {} is relative; write an absolute path",
                path.display()
            ));
        }
        let me = FileConfig {
            name: spec.name.clone(),
            path,
        };
        // A file that is there but unreadable is a manifest problem now,
        // not a surprise at the first request; a missing one is empty.
        me.read()?;
        Ok(me)
    }

    /// Every item of the file (a missing file has none).
    fn read(&self) -> Result<Items, String> {
        read_file(&self.path).map_err(|e| format!("configuration store {}: {e}", self.name))
    }
}

fn read_file(path: &Path) -> Result<Items, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Items::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Items::new());
    }
    let v: Value = serde_saphyr::from_str(&text)
        .map_err(|e| format!("{}: not valid YAML or JSON: {e}", path.display()))?;
    let Value::Object(map) = v else {
        return Err(format!(
            "{}: expected a mapping of key to value or {{value, version, metadata}}",
            path.display()
        ));
    };
    let text_of = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut items = Items::new();
    for (k, v) in map {
        let item = match &v {
            Value::Object(o) => {
                let value = o.get("value").ok_or_else(|| {
                    format!("{}: item {k} is a mapping without value", path.display())
                })?;
                Item {
                    value: text_of(value),
                    version: o.get("version").map(text_of).unwrap_or_default(),
                    metadata: o
                        .get("metadata")
                        .and_then(Value::as_object)
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), text_of(v))).collect())
                        .unwrap_or_default(),
                }
            }
            other => Item {
                value: text_of(other),
                ..Item::default()
            },
        };
        items.insert(k, item);
    }
    Ok(items)
}

/// What changed from `old` to `new` among `keys` (no keys: all): changed
/// or added items, and deleted ones as empty items.
fn changes(old: &Items, new: &Items, keys: &[String]) -> Items {
    let wanted = |k: &String| keys.is_empty() || keys.contains(k);
    let mut out: Items = new
        .iter()
        .filter(|(k, v)| wanted(k) && old.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for k in old.keys().filter(|k| wanted(k) && !new.contains_key(*k)) {
        out.insert(k.clone(), Item::default());
    }
    out
}

#[async_trait::async_trait]
impl ConfigStore for FileConfig {
    async fn get(&self, keys: &[String]) -> Result<Items, String> {
        let mut all = self.read()?;
        if !keys.is_empty() {
            all.retain(|k, _| keys.contains(k));
        }
        Ok(all)
    }

    async fn watch(&self, keys: Vec<String>, tx: mpsc::Sender<Items>) -> Result<Watch, String> {
        let (name, path) = (self.name.clone(), self.path.clone());
        let mut last = self.read()?;
        Ok(Watch(tokio::spawn(async move {
            loop {
                tokio::time::sleep(FILE_POLL).await;
                let now = match read_file(&path) {
                    Ok(i) => i,
                    // Half-written by an editor, most likely: look again.
                    Err(e) => {
                        tracing::debug!(store = %name, error = %e, "configuration file unreadable");
                        continue;
                    }
                };
                let diff = changes(&last, &now, &keys);
                last = now;
                if !diff.is_empty() && tx.send(diff).await.is_err() {
                    return;
                }
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_values_split_off_their_version() {
        assert_eq!(redis_item("101||1").value, "101");
        assert_eq!(redis_item("101||1").version, "1");
        assert_eq!(redis_item("a||b||7").value, "a||b");
        assert_eq!(redis_item("plain").version, "");
    }

    #[test]
    fn file_items_are_strings_or_mappings() {
        let dir = std::env::temp_dir().join(format!("np-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test file");
        let f = dir.join("c.yaml");
        std::fs::write(
            &f,
            "a: one\nb: {value: two, version: \"3\", metadata: {owner: ops}}\nc: 7\n",
        )
        .expect("test file");
        let items = read_file(&f).expect("test file");
        assert_eq!(items["a"].value, "one");
        assert_eq!(items["b"].version, "3");
        assert_eq!(items["b"].metadata["owner"], "ops");
        assert_eq!(items["c"].value, "7");
        std::fs::write(&f, "b: {version: 1}\n").expect("test file");
        assert!(read_file(&f)
            .expect_err("an error")
            .contains("without value"));
        std::fs::write(&f, "- a\n").expect("test file");
        assert!(read_file(&f)
            .expect_err("an error")
            .contains("expected a mapping"));
        assert!(read_file(&dir.join("none.yaml"))
            .expect("test file")
            .is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn changes_are_new_changed_and_deleted_items() {
        let item = |v: &str| Item {
            value: v.into(),
            ..Item::default()
        };
        let old = Items::from([("a".into(), item("1")), ("b".into(), item("2"))]);
        let new = Items::from([("a".into(), item("1")), ("c".into(), item("3"))]);
        let d = changes(&old, &new, &[]);
        assert_eq!(d.len(), 2);
        assert_eq!(d["b"], Item::default());
        assert_eq!(d["c"].value, "3");
        assert!(changes(&old, &new, &["a".into()]).is_empty());
    }
}
