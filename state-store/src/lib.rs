//! State stores behind one trait, with the semantics of Dapr's state API
//! (<https://docs.dapr.io/reference/api/state_api/>): opaque values,
//! string etags for optimistic concurrency, first-write / last-write,
//! per-item TTL, bulk get and all-or-nothing transactions.
//!
//! Keys arrive already scoped (the app runtime prefixes `app-id||`); a
//! store never interprets them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

mod embedded;
mod error;
mod expect;
pub mod lock;
mod postgres;
mod redis_store;
mod sweep;
pub use error::{Error, Result};
pub use redis_store::{redis_client, redis_connect};

/// Dapr's `options.concurrency`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Concurrency {
    /// An etag, when given, must match; with no etag the key must not exist.
    FirstWrite,
    /// The write wins whatever is stored; a given etag is ignored (by save
    /// and delete alike). Dapr's own stores disagree on this: state.redis
    /// ignores it on save but checks it on delete, state.postgresql checks
    /// it whenever given, state.sqlite ignores it; this crate follows the
    /// documented first-write/last-write split in every backend.
    #[default]
    LastWrite,
}

/// A stored value and its current etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: Bytes,
    pub etag: String,
}

/// One save (`POST /v1.0/state/{store}` item, or a transaction's upsert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Save {
    pub key: String,
    pub value: Bytes,
    pub etag: Option<String>,
    pub concurrency: Concurrency,
    /// From metadata `ttlInSeconds`; `None` keeps the item until deleted
    /// (or, in state.redis, applies the component's own `ttlInSeconds`
    /// default if it has one); `Some(Duration::ZERO)` means no expiry even
    /// then (Dapr's `ttlInSeconds: -1`).
    pub ttl: Option<Duration>,
}

/// One delete (`DELETE /v1.0/state/{store}/{key}` or a transaction's delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub key: String,
    pub etag: Option<String>,
    pub concurrency: Concurrency,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Upsert(Save),
    Delete(Delete),
}

/// A state store. Every method is safe to call concurrently.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The item, or `None` when the key is absent or expired.
    async fn get(&self, key: &str) -> Result<Option<Item>>;
    /// Stores one item; `Error::EtagMismatch` / `Error::EtagInvalid` per
    /// the concurrency rules above.
    async fn save(&self, save: Save) -> Result<()>;
    /// Removes one item; deleting an absent key without an etag succeeds.
    async fn delete(&self, delete: Delete) -> Result<()>;
    /// The items for `keys`, in order.
    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<Item>>>;
    /// All operations or none: an etag failure in any of them aborts all.
    async fn transact(&self, ops: Vec<Op>) -> Result<()>;
    /// Reachable and usable (for `/v1.0/healthz/outbound` and readiness).
    async fn ping(&self) -> Result<()>;
}

/// A component's `spec` as the app runtime read it from a Dapr
/// `Component` manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentSpec {
    /// The component's `metadata.name` (for messages).
    pub name: String,
    /// `spec.type`, e.g. `state.redis`.
    pub kind: String,
    /// `spec.version`, e.g. `v1`.
    pub version: String,
    /// `spec.metadata` as name → value.
    pub metadata: BTreeMap<String, String>,
}

/// The `spec.type` values this crate opens.
pub const KINDS: &[&str] = &["state.embedded", "state.redis", "state.postgresql"];

/// Opens the store a component describes. `state_dir` is where embedded
/// stores keep their files (one per component name).
pub async fn open(spec: &ComponentSpec, state_dir: &Path) -> Result<Arc<dyn Store>> {
    match spec.kind.as_str() {
        "state.embedded" => Ok(Arc::new(embedded::Embedded::open(spec, state_dir).await?)),
        "state.redis" => Ok(Arc::new(redis_store::RedisStore::open(spec).await?)),
        "state.postgresql" => Ok(Arc::new(postgres::Postgres::open(spec).await?)),
        other => Err(Error::Config(format!(
            "component {}: spec.type {other} is not supported; use one of: {}",
            spec.name,
            KINDS.join(", ")
        ))),
    }
}
