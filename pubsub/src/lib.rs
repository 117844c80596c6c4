//! The message brokers behind the app runtime's Dapr-compatible pub/sub
//! (<https://docs.dapr.io/reference/api/pubsub_api/>), all behind one
//! at-least-once trait:
//!
//! - `pubsub.embedded`: a durable append-only log in the node's state
//!   directory, for one node (no server);
//! - `pubsub.redis`: Redis Streams with consumer groups;
//! - `pubsub.jetstream`: NATS JetStream with durable pull consumers.
//!
//! This crate moves opaque messages. It does not build or parse
//! CloudEvents, route by rules, call apps, retry with backoff or keep dead
//! letters: the app runtime does that on top of [`Delivery::attempt`],
//! [`AckToken::ack`] and [`AckToken::nack`].
//!
//! # Delivery contract (every backend)
//! - [`Broker::publish`] returns `Ok` only once the message is durable as
//!   far as the backend can say so (embedded: fsync'd to disk; redis: XADD
//!   answered; jetstream: PubAck received).
//! - A consumer *group* (the app-id) sees every message published to the
//!   topic after the group was first created. Subscriptions with the same
//!   (topic, group) compete: each message goes to one of them.
//! - Every delivery is settled by its [`AckToken`]: `ack` (done, never
//!   delivered again) or `nack(delay)` (delivered again, to some
//!   subscription of the group, no sooner than `delay`, with `attempt + 1`).
//!   A delivery settled neither way within the broker's ack timeout is
//!   delivered again: this is what makes a crash between accepting a
//!   delivery and finishing it lose nothing.
//! - Order: one subscription alone receives a topic's first deliveries in
//!   publish order; a redelivery (nack, timeout) comes when it is due, out
//!   of that order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

mod config;
mod embedded;
mod error;
mod jetstream;
mod redis_broker;
mod wire;

pub use config::{
    parse_duration, BrokerConfig, EmbeddedConfig, JetStreamConfig, RedisConfig, StartAt, Trim,
};
pub use error::{Error, Result};

/// One message, as published and as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The CloudEvent id, set by the publisher (the app runtime). Brokers
    /// carry it, they do not deduplicate on it.
    pub id: String,
    pub topic: String,
    pub data: Bytes,
    /// e.g. `application/cloudevents+json`.
    pub content_type: String,
    pub metadata: BTreeMap<String, String>,
}

/// One delivery of a message to one subscription.
#[derive(Debug)]
pub struct Delivery {
    pub msg: Message,
    /// 1 on the first delivery to this group, then one more per redelivery.
    /// Where a backend can lose the count in a crash (see each backend),
    /// it only ever undercounts.
    pub attempt: u32,
    pub token: AckToken,
}

/// Settles one delivery. It is separate from the [`Subscription`] (which
/// is borrowed mutably by whoever awaits [`Subscription::next`]) so that a
/// delivery can be finished on another task while the next one is
/// awaited; it is consumed by settling, so a delivery is settled at most
/// once. It stays usable after its subscription is closed.
///
/// Dropping a token unsettled is neither ack nor nack: the message is
/// delivered again after the broker's ack timeout.
#[derive(Debug)]
pub struct AckToken(Box<dyn Settle>);

impl AckToken {
    pub(crate) fn new(s: impl Settle + 'static) -> AckToken {
        AckToken(Box::new(s))
    }

    /// Done: this group never gets the message again.
    pub async fn ack(self) -> Result<()> {
        self.0.ack().await
    }

    /// Not done: deliver again (to any subscription of the group) no
    /// sooner than `retry_after`, with `attempt + 1`.
    pub async fn nack(self, retry_after: Duration) -> Result<()> {
        self.0.nack(retry_after).await
    }
}

/// A backend's way of settling one delivery.
#[async_trait::async_trait]
pub(crate) trait Settle: Send + Sync + std::fmt::Debug {
    async fn ack(self: Box<Self>) -> Result<()>;
    async fn nack(self: Box<Self>, retry_after: Duration) -> Result<()>;
}

/// One consumer in a group.
#[async_trait::async_trait]
pub trait Subscription: Send + std::fmt::Debug {
    /// Waits for the next delivery. Cancel-safe: dropping the future loses
    /// no message (at worst one already taken is redelivered after the ack
    /// timeout; see each backend). An `Err` is a backend failure (server
    /// gone, disk error); the subscription stays usable and the next call
    /// tries again.
    async fn next(&mut self) -> Result<Delivery>;

    /// Stops receiving. Deliveries already handed out keep their tokens;
    /// those never settled are redelivered to the group after the ack
    /// timeout. Dropping the subscription does the same without waiting.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// A pub/sub component. Every method is safe to call concurrently.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Appends `msg` to `msg.topic`; `Ok` means durable (see the crate docs).
    async fn publish(&self, msg: Message) -> Result<()>;

    /// Joins consumer group `group` (the app-id; the component's
    /// `consumerID` metadata, when set, replaces it) on `topic`, creating
    /// the group on first use.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>>;

    /// Reachable and usable (for `/v1.0/healthz/outbound` and readiness).
    async fn ping(&self) -> Result<()>;

    /// How long a delivery may stay unsettled before it is redelivered;
    /// `None` when the component disabled redelivery (Dapr's redis
    /// `processingTimeout: 0`). The runtime keeps its app calls shorter.
    fn ack_timeout(&self) -> Option<Duration>;
}

/// A component's `spec` as the app runtime read it from a Dapr
/// `Component` manifest: the one type every component family shares
/// (`metadata.name` also names the embedded log's directory).
pub use nodeplane_state::ComponentSpec;

/// The `spec.type` values this crate opens.
pub const KINDS: &[&str] = &["pubsub.embedded", "pubsub.redis", "pubsub.jetstream"];

/// Opens the broker a component describes. `state_dir` is where embedded
/// logs live (one directory per component name).
pub async fn open(spec: &ComponentSpec, state_dir: &Path) -> Result<Arc<dyn Broker>> {
    open_config(&spec.name, BrokerConfig::from_spec(spec)?, state_dir).await
}

/// Opens a broker from an already parsed configuration; `name` is the
/// component name used in messages (and the embedded directory).
pub async fn open_config(
    name: &str,
    config: BrokerConfig,
    state_dir: &Path,
) -> Result<Arc<dyn Broker>> {
    Ok(match config {
        BrokerConfig::Embedded(c) => Arc::new(embedded::Embedded::open(name, c, state_dir).await?),
        BrokerConfig::Redis(c) => Arc::new(redis_broker::RedisBroker::open(name, c).await?),
        BrokerConfig::JetStream(c) => Arc::new(jetstream::JetStream::open(name, c).await?),
    })
}
