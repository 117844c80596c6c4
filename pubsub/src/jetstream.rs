//! `pubsub.jetstream`: NATS JetStream. One stream (`streamName`) holds
//! every topic as a subject of the same name (as Dapr publishes); a topic
//! the stream does not cover yet is added to its subjects (and the stream
//! created, file storage, when missing).
//!
//! - publish: `Nodeplane-Id`, `Content-Type` and `Nodeplane-Metadata`
//!   (JSON) headers, the payload as is; `Ok` once the PubAck arrived. No
//!   `Nats-Msg-Id` is set: like the other backends, this one does not drop
//!   a message whose id repeats.
//! - subscribe: a durable pull consumer per (group, topic), named
//!   `<group>_<topic>_<hash>` (NATS-safe characters; the hash keeps two
//!   groups whose names differ only in replaced characters apart), filter
//!   = the topic, explicit ack, AckWait = `ackWait`, start = `deliverPolicy`
//!   (Dapr's default `all`: a new group sees what the stream still holds).
//!   Every subscription pulls from that consumer, so subscriptions in any
//!   process compete. A consumer that already exists is used as it is
//!   (changing `ackWait` later needs the consumer deleted).
//! - attempt = the server's delivery count; ack waits for the server's
//!   confirmation (double ack), so an `Ok` ack is never redelivered;
//!   nack = `-NAK` with the delay; `maxDeliver` caps deliveries (then the
//!   server stops redelivering: the app runtime's dead-letter handling
//!   should come first, so leave it unlimited).
//! - Each subscription pulls batches of up to 16 messages: they are
//!   delivered (AckWait running) as soon as they arrive, before `next`
//!   hands them out.
//!
//! Order: a single subscription gets a topic's messages in stream order;
//! redeliveries come when due.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures::StreamExt;

use crate::config::{nats_name, JetStreamConfig, StartAt};
use crate::{wire, AckToken, Broker, Delivery, Error, Message, Result, Settle, Subscription};

/// Messages per pull request.
const BATCH: usize = 16;
const H_ID: &str = "Nodeplane-Id";
const H_TYPE: &str = "Content-Type";
const H_META: &str = "Nodeplane-Metadata";

pub(crate) struct JetStream {
    name: String,
    cfg: JetStreamConfig,
    js: jetstream::Context,
    /// Topics the stream is known to cover.
    covered: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for JetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStream")
            .field("name", &self.name)
            .field("url", &self.cfg.url)
            .field("stream", &self.cfg.stream_name)
            .finish_non_exhaustive()
    }
}

/// Whether NATS subject pattern `pattern` matches subject `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// FNV-1a: a hash that is the same in every build and process (consumer
/// names are shared across nodes).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn short(s: &str) -> String {
    nats_name(s).chars().take(64).collect()
}

pub(crate) fn consumer_name(group: &str, topic: &str) -> String {
    format!(
        "{}_{}_{:016x}",
        short(group),
        short(topic),
        fnv1a(&[group, topic])
    )
}

impl JetStream {
    pub(crate) async fn open(name: &str, cfg: JetStreamConfig) -> Result<Self> {
        let mut opts = match &cfg.token {
            Some(t) => async_nats::ConnectOptions::with_token(t.clone()),
            None => async_nats::ConnectOptions::new(),
        };
        opts = opts
            .name(&cfg.connection_name)
            .connection_timeout(Duration::from_secs(5));
        let client = opts.connect(cfg.url.as_str()).await.map_err(|e| {
            Error::Backend(format!(
                "component {name} (pubsub.jetstream): cannot connect to natsURL {}: {e}",
                cfg.url
            ))
        })?;
        let js = match (&cfg.domain, &cfg.api_prefix) {
            (Some(d), _) => jetstream::with_domain(client, d),
            (None, Some(p)) => jetstream::with_prefix(client, p),
            (None, None) => jetstream::new(client),
        };
        let b = JetStream {
            name: name.to_owned(),
            cfg,
            js,
            covered: Mutex::new(HashSet::new()),
        };
        b.ping().await?;
        Ok(b)
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Backend(format!(
            "component {} (pubsub.jetstream at {}): {what}: {e}",
            self.name, self.cfg.url
        ))
    }

    fn check_topic(&self, topic: &str) -> Result<()> {
        let bad = topic.is_empty()
            || topic.starts_with('$')
            || topic.chars().any(|c| c.is_whitespace() || c.is_control())
            || topic
                .split('.')
                .any(|t| t.is_empty() || t == "*" || t == ">");
        if bad {
            return Err(Error::Invalid(format!(
                "component {}: topic {topic:?} is not a NATS subject: use dot-separated tokens without spaces, '*', '>' or a leading '$'",
                self.name
            )));
        }
        Ok(())
    }

    fn is_covered(&self, topic: &str) -> bool {
        self.covered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(topic)
    }

    fn set_covered(&self, topic: &str, yes: bool) {
        let mut c = self.covered.lock().unwrap_or_else(|p| p.into_inner());
        if yes {
            c.insert(topic.to_owned());
        } else {
            c.remove(topic);
        }
    }

    /// Makes the stream exist and cover `topic` (asking the server); returns it.
    async fn stream_for(&self, topic: &str) -> Result<stream::Stream> {
        for _ in 0..5 {
            match self.js.get_stream(&self.cfg.stream_name).await {
                Ok(s) => {
                    let subjects = &s.cached_info().config.subjects;
                    if subjects.iter().any(|p| subject_matches(p, topic)) {
                        self.set_covered(topic, true);
                        return Ok(s);
                    }
                    let mut config = s.cached_info().config.clone();
                    config.subjects.push(topic.to_owned());
                    // Two agents adding topics at once: one update may
                    // overwrite the other's; the loop looks again.
                    self.js.update_stream(config).await.map_err(|e| {
                        self.err(
                            &format!("add subject {topic} to stream {}", self.cfg.stream_name),
                            e,
                        )
                    })?;
                }
                Err(e)
                    if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    let config = stream::Config {
                        name: self.cfg.stream_name.clone(),
                        subjects: vec![topic.to_owned()],
                        storage: if self.cfg.memory_storage {
                            stream::StorageType::Memory
                        } else {
                            stream::StorageType::File
                        },
                        num_replicas: self.cfg.replicas,
                        ..Default::default()
                    };
                    match self.js.create_stream(config).await {
                        Ok(s) => {
                            self.set_covered(topic, true);
                            return Ok(s);
                        }
                        // Created by someone else meanwhile: look again.
                        Err(e)
                            if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j)
                                if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) => {}
                        Err(e) => {
                            return Err(
                                self.err(&format!("create stream {}", self.cfg.stream_name), e)
                            )
                        }
                    }
                }
                Err(e) => return Err(self.err(&format!("get stream {}", self.cfg.stream_name), e)),
            }
        }
        Err(self.err(
            &format!("stream {}", self.cfg.stream_name),
            format!("still does not cover subject {topic} after 5 updates"),
        ))
    }
}

fn header_safe(what: &str, v: &str) -> Result<()> {
    if v.contains(['\r', '\n']) {
        return Err(Error::Invalid(format!(
            "message {what} {v:?} contains a line break, which a NATS header cannot carry"
        )));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Broker for JetStream {
    async fn publish(&self, msg: Message) -> Result<()> {
        self.check_topic(&msg.topic)?;
        header_safe("id", &msg.id)?;
        header_safe("content type", &msg.content_type)?;
        let mut headers = HeaderMap::new();
        headers.insert(H_ID, msg.id.as_str());
        headers.insert(H_TYPE, msg.content_type.as_str());
        headers.insert(H_META, wire::metadata_json(&msg.metadata).as_str());
        // Publishes skip the stream lookup once a topic is known covered;
        // if the subject was removed since, the server has no stream for it
        // ("no responders"): look again, once.
        for first in [true, false] {
            if !self.is_covered(&msg.topic) {
                self.stream_for(&msg.topic).await?;
            }
            let sent = self
                .js
                .publish_with_headers(msg.topic.clone(), headers.clone(), msg.data.clone())
                .await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(_) => return Ok(()),
                Err(e)
                    if first
                        && e.kind() == jetstream::context::PublishErrorKind::StreamNotFound =>
                {
                    self.set_covered(&msg.topic, false);
                }
                Err(e) => return Err(self.err(&format!("publish to {}", msg.topic), e)),
            }
        }
        Err(self.err(
            &format!("publish to {}", msg.topic),
            "no stream covers the subject",
        ))
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        let group = self.cfg.consumer_id.as_deref().unwrap_or(group).to_owned();
        self.check_topic(topic)?;
        if group.is_empty() {
            return Err(Error::Invalid(format!(
                "component {}: subscribe to {topic} needs a group",
                self.name
            )));
        }
        let stream = self.stream_for(topic).await?;
        let name = consumer_name(&group, topic);
        let deliver_policy = match self.cfg.start_at {
            StartAt::All => consumer::DeliverPolicy::All,
            StartAt::New => consumer::DeliverPolicy::New,
            StartAt::Last => consumer::DeliverPolicy::Last,
            StartAt::Sequence(start_sequence) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            StartAt::Time(secs) => consumer::DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(i128::from(secs) * 1_000_000_000)
                    .map_err(|e| {
                        Error::Config(format!(
                            "component {}: metadata startTime {secs}: {e}",
                            self.name
                        ))
                    })?,
            },
        };
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("nodeplane group {group} on {topic}")),
            filter_subject: topic.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.cfg.ack_wait,
            max_deliver: self.cfg.max_deliver.unwrap_or(-1),
            max_ack_pending: self.cfg.max_ack_pending.unwrap_or(0),
            deliver_policy,
            ..Default::default()
        };
        let consumer: consumer::PullConsumer =
            stream
                .get_or_create_consumer(&name, config)
                .await
                .map_err(|e| self.err(&format!("create consumer {name} for group {group}"), e))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .messages()
            .await
            .map_err(|e| self.err(&format!("pull from consumer {name}"), e))?;
        Ok(Box::new(Sub {
            what: format!(
                "component {} (pubsub.jetstream at {}) consumer {name}",
                self.name, self.cfg.url
            ),
            messages,
        }))
    }

    async fn ping(&self) -> Result<()> {
        // A stream lookup answers from JetStream itself (account info
        // does too, but its reply shape changed after server 2.9).
        match self.js.get_stream(&self.cfg.stream_name).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err(
                "JetStream does not answer (is the server started with -js?)",
                e,
            )),
        }
    }

    fn ack_timeout(&self) -> Option<Duration> {
        Some(self.cfg.ack_wait)
    }
}

struct Sub {
    what: String,
    messages: consumer::pull::Stream,
}

impl std::fmt::Debug for Sub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sub")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

fn header(h: Option<&HeaderMap>, name: &str) -> String {
    h.and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl Subscription for Sub {
    async fn next(&mut self) -> Result<Delivery> {
        match self.messages.next().await {
            Some(Ok(m)) => {
                let info = m.info().map_err(|e| {
                    Error::Backend(format!("{}: bad message reply subject: {e}", self.what))
                })?;
                let attempt = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
                let seq = info.stream_sequence;
                let (m, acker) = m.split();
                let h = m.headers.as_ref();
                let mut id = header(h, H_ID);
                if id.is_empty() {
                    // Published by someone else (e.g. a Dapr sidecar).
                    id = seq.to_string();
                }
                let metadata = wire::metadata_from_json(header(h, H_META).as_bytes());
                Ok(Delivery {
                    msg: Message {
                        id,
                        topic: m.subject.to_string(),
                        data: m.payload,
                        content_type: header(h, H_TYPE),
                        metadata,
                    },
                    attempt,
                    token: AckToken::new(Token {
                        what: self.what.clone(),
                        acker,
                    }),
                })
            }
            Some(Err(e)) => Err(Error::Backend(format!("{}: {e}", self.what))),
            None => Err(Error::Closed(format!("{}: subscription ended", self.what))),
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

struct Token {
    what: String,
    acker: jetstream::message::Acker,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Settle for Token {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.acker
            .double_ack()
            .await
            .map_err(|e| Error::Backend(format!("{}: ack: {e}", self.what)))
    }

    async fn nack(self: Box<Self>, retry_after: Duration) -> Result<()> {
        self.acker
            .ack_with(jetstream::AckKind::Nak(Some(retry_after)))
            .await
            .map_err(|e| Error::Backend(format!("{}: nack: {e}", self.what)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(subject_matches("orders", "orders"));
        assert!(subject_matches("orders.*", "orders.eu"));
        assert!(!subject_matches("orders.*", "orders.eu.x"));
        assert!(subject_matches("orders.>", "orders.eu.x"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(!subject_matches("orders", "orders.eu"));
    }

    #[test]
    fn consumer_names_are_stable_and_distinct() {
        assert_eq!(
            consumer_name("app", "orders"),
            consumer_name("app", "orders")
        );
        assert_ne!(consumer_name("a.b", "t"), consumer_name("a_b", "t"));
        assert_ne!(consumer_name("a", "b.c"), consumer_name("a.b", "c"));
        let n = consumer_name("my app", "orders.eu");
        assert!(n.starts_with("my_app_orders_eu_"), "{n}");
    }
}
