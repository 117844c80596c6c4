//! One suite of delivery semantics, run against every backend on a real
//! engine: the embedded log, a real redis-server and a real nats-server
//! with JetStream (both started by the test).
//!
//! Each backend is opened twice: `normal` (default ack timeout: nothing
//! is redelivered by timeout during a test) and `fast` (ack timeout 1 s,
//! for the timeout cases). Every case uses its own topics.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodeplane_pubsub::{Broker, Message};
use support::{maybe_next, message, next, spec, Nats, Redis, TempDir};

async fn publish(b: &dyn Broker, msg: Message) {
    let what = format!("publish {} to {}", msg.id, msg.topic);
    b.publish(msg)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

async fn publish_n(b: &dyn Broker, topic: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{topic}-{i}");
        publish(b, message(topic, &id, &format!("payload {i}"))).await;
        ids.push(id);
    }
    ids
}

async fn round_trip(b: &dyn Broker) {
    let mut sub = b.subscribe("rt", "app").await.expect("subscribe");
    let msg = Message {
        id: "ce-1".into(),
        topic: "rt".into(),
        data: Bytes::from_static(b"\x00\xff{\"a\":1}\r\n"),
        content_type: "application/cloudevents+json".into(),
        metadata: BTreeMap::from([
            ("rawPayload".to_string(), "false".to_string()),
            ("trace".to_string(), "00-ab\r\n-01 é".to_string()),
        ]),
    };
    publish(b, msg.clone()).await;
    let d = next(&mut sub, "round trip").await;
    assert_eq!(d.msg, msg, "delivered intact");
    assert_eq!(d.attempt, 1);
    d.token.ack().await.expect("ack");
    sub.close().await.expect("close");
}

/// Two groups each get every message.
async fn every_group_gets_every_message(b: &dyn Broker) {
    let mut a = b.subscribe("fanout", "app-a").await.expect("subscribe a");
    let mut z = b.subscribe("fanout", "app-z").await.expect("subscribe z");
    let ids = publish_n(b, "fanout", 10).await;
    for (name, sub) in [("app-a", &mut a), ("app-z", &mut z)] {
        let mut got = Vec::new();
        for _ in 0..ids.len() {
            let d = next(sub, name).await;
            got.push(d.msg.id.clone());
            d.token.ack().await.expect("ack");
        }
        got.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got, want, "group {name} gets every message");
        assert!(
            maybe_next(sub, Duration::from_millis(300)).await.is_none(),
            "group {name}: nothing more"
        );
    }
}

/// Two subscriptions of one group: each message goes to one of them, and
/// one holding a delivery does not stop the other.
async fn competing_consumers(b: &dyn Broker) {
    let mut one = b.subscribe("compete", "app").await.expect("subscribe 1");
    let mut two = b.subscribe("compete", "app").await.expect("subscribe 2");
    // More than any backend reads ahead for one subscription.
    let ids = publish_n(b, "compete", 48).await;
    let held = next(&mut one, "first subscription").await;
    let other = next(&mut two, "second subscription while the first holds one").await;
    assert_ne!(held.msg.id, other.msg.id, "no message to both");
    let mut seen: HashMap<String, &str> = HashMap::new();
    seen.insert(held.msg.id.clone(), "one");
    seen.insert(other.msg.id.clone(), "two");
    held.token.ack().await.expect("ack");
    other.token.ack().await.expect("ack");
    let (mut count_one, mut count_two) = (1, 1);
    while seen.len() < ids.len() {
        let (d, who) = tokio::select! {
            d = next(&mut one, "drain one") => (d, "one"),
            d = next(&mut two, "drain two") => (d, "two"),
        };
        assert_eq!(d.attempt, 1, "{} redelivered within the test", d.msg.id);
        if let Some(first) = seen.insert(d.msg.id.clone(), who) {
            panic!("{} delivered to {first} and again to {who}", d.msg.id);
        }
        if who == "one" {
            count_one += 1;
        } else {
            count_two += 1;
        }
        d.token.ack().await.expect("ack");
    }
    let got: HashSet<&String> = seen.keys().collect();
    assert_eq!(got, ids.iter().collect(), "every message once");
    eprintln!("competing consumers: {count_one} + {count_two}");
    for sub in [&mut one, &mut two] {
        assert!(maybe_next(sub, Duration::from_millis(300)).await.is_none());
    }
}

/// nack(delay): delivered again, attempt 2, no sooner than the delay.
async fn nack_redelivers_after_delay(b: &dyn Broker) {
    let mut sub = b.subscribe("nack", "app").await.expect("subscribe");
    publish(b, message("nack", "n-1", "x")).await;
    let d = next(&mut sub, "first delivery").await;
    assert_eq!((d.msg.id.as_str(), d.attempt), ("n-1", 1));
    let delay = Duration::from_millis(800);
    let start = Instant::now();
    d.token.nack(delay).await.expect("nack");
    let again = next(&mut sub, "redelivery after nack").await;
    assert!(
        start.elapsed() >= delay,
        "redelivered after {:?}, before the {delay:?} delay",
        start.elapsed()
    );
    assert_eq!((again.msg.id.as_str(), again.attempt), ("n-1", 2));
    assert_eq!(again.msg.data, Bytes::from_static(b"x"));
    // And once more: attempts keep counting.
    again
        .token
        .nack(Duration::from_millis(100))
        .await
        .expect("nack");
    let third = next(&mut sub, "second redelivery").await;
    assert_eq!((third.msg.id.as_str(), third.attempt), ("n-1", 3));
    third.token.ack().await.expect("ack");
    assert!(maybe_next(&mut sub, Duration::from_millis(500))
        .await
        .is_none());
}

/// A nack on one subscription may be redelivered to another of the group.
async fn nack_goes_to_the_group(b: &dyn Broker) {
    let mut sub = b.subscribe("nack-group", "app").await.expect("subscribe");
    publish(b, message("nack-group", "ng-1", "x")).await;
    let d = next(&mut sub, "first delivery").await;
    d.token
        .nack(Duration::from_millis(100))
        .await
        .expect("nack");
    let again = next(&mut sub, "redelivery").await;
    assert_eq!((again.msg.id.as_str(), again.attempt), ("ng-1", 2));
    again.token.ack().await.expect("ack");
}

/// Neither ack nor nack within the ack timeout: delivered again.
async fn timeout_redelivers(fast: &dyn Broker) {
    let timeout = fast.ack_timeout().expect("an ack timeout");
    let mut sub = fast.subscribe("timeout", "app").await.expect("subscribe");
    publish(fast, message("timeout", "t-1", "x")).await;
    let d = next(&mut sub, "first delivery").await;
    assert_eq!(d.attempt, 1);
    let start = Instant::now();
    drop(d.token); // as if the app never answered
    let again = next(&mut sub, "redelivery after the ack timeout").await;
    assert_eq!((again.msg.id.as_str(), again.attempt), ("t-1", 2));
    assert!(
        start.elapsed() >= timeout.mul_f64(0.8),
        "redelivered after {:?}, ack timeout {timeout:?}",
        start.elapsed()
    );
    again.token.ack().await.expect("ack");
}

/// Acked: never again, not even after the ack timeout.
async fn ack_is_final(fast: &dyn Broker) {
    let timeout = fast.ack_timeout().expect("an ack timeout");
    let mut sub = fast.subscribe("final", "app").await.expect("subscribe");
    publish_n(fast, "final", 2).await;
    let first = next(&mut sub, "first").await;
    let second = next(&mut sub, "second").await;
    let (acked, kept) = (first.msg.id.clone(), second.msg.id.clone());
    first.token.ack().await.expect("ack");
    drop(second.token);
    // Past the timeout only the unacked one comes back.
    let again = next(&mut sub, "the unacked one").await;
    assert_eq!(again.msg.id, kept);
    assert!(again.attempt >= 2);
    again.token.ack().await.expect("ack");
    if let Some(d) = maybe_next(&mut sub, timeout * 2 + Duration::from_millis(500)).await {
        panic!("{} delivered again after ack (acked {acked})", d.msg.id);
    }
}

/// One subscription: first deliveries in publish order.
async fn ordered(b: &dyn Broker) {
    let mut sub = b.subscribe("order", "app").await.expect("subscribe");
    let ids = publish_n(b, "order", 30).await;
    let mut got = Vec::new();
    for _ in 0..ids.len() {
        let d = next(&mut sub, "ordered").await;
        got.push(d.msg.id.clone());
        d.token.ack().await.expect("ack");
    }
    assert_eq!(got, ids, "publish order");
}

/// Tokens settle from other tasks while `next` is awaited.
async fn settle_from_other_tasks(b: Arc<dyn Broker>) {
    let mut sub = b.subscribe("tasks", "app").await.expect("subscribe");
    let ids = publish_n(&*b, "tasks", 20).await;
    let mut handles = Vec::new();
    let mut got = HashSet::new();
    for _ in 0..ids.len() {
        let d = next(&mut sub, "tasks").await;
        got.insert(d.msg.id.clone());
        handles.push(tokio::spawn(async move { d.token.ack().await }));
    }
    for h in handles {
        h.await.expect("task").expect("ack");
    }
    assert_eq!(got, ids.iter().cloned().collect());
    assert!(maybe_next(&mut sub, Duration::from_millis(300))
        .await
        .is_none());
}

async fn suite(normal: Arc<dyn Broker>, fast: Arc<dyn Broker>) {
    normal.ping().await.expect("ping");
    round_trip(&*normal).await;
    every_group_gets_every_message(&*normal).await;
    competing_consumers(&*normal).await;
    ordered(&*normal).await;
    settle_from_other_tasks(normal.clone()).await;
    // The slow ones overlap.
    tokio::join!(
        nack_redelivers_after_delay(&*normal),
        nack_goes_to_the_group(&*normal),
        timeout_redelivers(&*fast),
        ack_is_final(&*fast),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_embedded() {
    let dir = TempDir::new("emb");
    let normal = nodeplane_pubsub::open(&spec("normal", "pubsub.embedded", &[]), dir.path())
        .await
        .expect("open embedded");
    let fast = nodeplane_pubsub::open(
        &spec("fast", "pubsub.embedded", &[("ackTimeout", "1s")]),
        dir.path(),
    )
    .await
    .expect("open embedded (fast)");
    suite(normal, fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_redis() {
    let redis = Redis::start();
    let dir = TempDir::new("redis-unused");
    let host = redis.host();
    // queueDepth 4: a subscription reads few ahead, so the competing case
    // sees both subscriptions served.
    let normal = nodeplane_pubsub::open(
        &spec(
            "normal",
            "pubsub.redis",
            &[("redisHost", &host), ("queueDepth", "4")],
        ),
        dir.path(),
    )
    .await
    .expect("open redis");
    let fast = nodeplane_pubsub::open(
        &spec(
            "fast",
            "pubsub.redis",
            &[
                ("redisHost", &host),
                ("processingTimeout", "1s"),
                ("redeliverInterval", "200"),
            ],
        ),
        dir.path(),
    )
    .await
    .expect("open redis (fast)");
    suite(normal, fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_jetstream() {
    let nats = Nats::start();
    let dir = TempDir::new("nats-unused");
    let url = nats.url();
    let normal = nodeplane_pubsub::open(
        &spec("normal", "pubsub.jetstream", &[("natsURL", &url)]),
        dir.path(),
    )
    .await
    .expect("open jetstream");
    // Its own stream; topics differ from the normal one's, so the two
    // streams' subjects never overlap.
    let fast = nodeplane_pubsub::open(
        &spec(
            "fast",
            "pubsub.jetstream",
            &[("natsURL", &url), ("ackWait", "1s")],
        ),
        dir.path(),
    )
    .await
    .expect("open jetstream (fast)");
    suite(normal, fast).await;
}
