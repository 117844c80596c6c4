//! Unusable components fail at open with a message naming the component,
//! the key and the fix; unreachable servers name the address.

mod support;

use nodeplane_pubsub::{BrokerConfig, Error};
use support::{free_port, spec, TempDir};

fn config_error(kind: &str, metadata: &[(&str, &str)]) -> String {
    match BrokerConfig::from_spec(&spec("mybus", kind, metadata)) {
        Err(Error::Config(msg)) => {
            assert!(msg.contains("mybus"), "names the component: {msg}");
            msg
        }
        Err(e) => panic!("{kind}: expected a config error, got {e}"),
        Ok(c) => panic!("{kind} {metadata:?}: expected a config error, parsed {c:?}"),
    }
}

fn parses(kind: &str, metadata: &[(&str, &str)]) -> BrokerConfig {
    BrokerConfig::from_spec(&spec("mybus", kind, metadata))
        .unwrap_or_else(|e| panic!("{kind} {metadata:?}: {e}"))
}

#[test]
fn unknown_kind() {
    let msg = config_error("pubsub.kafka", &[]);
    assert!(msg.contains("pubsub.kafka"), "{msg}");
    assert!(
        msg.contains("pubsub.embedded, pubsub.redis, pubsub.jetstream"),
        "{msg}"
    );
}

#[test]
fn redis_metadata() {
    let msg = config_error("pubsub.redis", &[]);
    assert!(
        msg.contains("redisHost") && msg.contains("host:port"),
        "{msg}"
    );
    let host = ("redisHost", "localhost:6379");
    for (key, value) in [
        ("processingTimeout", "soon"),
        ("redeliverInterval", "10x"),
        ("queueDepth", "many"),
        ("maxLenApprox", "-3"),
        ("redisDB", "x"),
    ] {
        let msg = config_error("pubsub.redis", &[host, (key, value)]);
        assert!(msg.contains(key) && msg.contains(value), "{key}: {msg}");
    }
    let msg = config_error("pubsub.redis", &[("redisHost", "localhost:port")]);
    assert!(msg.contains("port"), "{msg}");
    let msg = config_error(
        "pubsub.redis",
        &[host, ("maxLenApprox", "10"), ("streamTTL", "1h")],
    );
    assert!(
        msg.contains("maxLenApprox") && msg.contains("streamTTL"),
        "{msg}"
    );
    // A typo is not silently ignored...
    let msg = config_error("pubsub.redis", &[host, ("procesingTimeout", "5s")]);
    assert!(
        msg.contains("procesingTimeout") && msg.contains("processingTimeout"),
        "{msg}"
    );
    // ...nor is what this runtime cannot do...
    let msg = config_error("pubsub.redis", &[host, ("enableTLS", "true")]);
    assert!(
        msg.contains("enableTLS") && msg.contains("not supported"),
        "{msg}"
    );
    let msg = config_error("pubsub.redis", &[host, ("redisType", "cluster")]);
    assert!(msg.contains("redisType"), "{msg}");
    // ...but Dapr's client tuning and the runtime's own keys are accepted.
    let BrokerConfig::Redis(c) = parses(
        "pubsub.redis",
        &[
            ("redisHost", "redis:6380"),
            ("poolSize", "20"),
            ("concurrency", "5"),
            ("enableTLS", "false"),
            ("processingTimeout", "15000"),
            ("redeliverInterval", "2s"),
            ("maxLenApprox", "1000"),
            ("consumerID", "shared"),
        ],
    ) else {
        panic!("not a redis config")
    };
    assert_eq!((c.host.as_str(), c.port), ("redis", 6380));
    assert_eq!(c.processing_timeout, std::time::Duration::from_secs(15));
    assert_eq!(c.redeliver_interval, std::time::Duration::from_secs(2));
    assert_eq!(c.trim, Some(nodeplane_pubsub::Trim::MaxLenApprox(1000)));
    assert_eq!(c.consumer_id.as_deref(), Some("shared"));
}

#[test]
fn jetstream_metadata() {
    let msg = config_error("pubsub.jetstream", &[]);
    assert!(msg.contains("natsURL"), "{msg}");
    let url = ("natsURL", "nats://localhost:4222");
    for (key, value) in [
        ("ackWait", "forever"),
        ("maxDeliver", "lots"),
        ("deliverPolicy", "sometimes"),
        ("memoryStorage", "maybe"),
    ] {
        let msg = config_error("pubsub.jetstream", &[url, (key, value)]);
        assert!(msg.contains(key) && msg.contains(value), "{key}: {msg}");
    }
    let msg = config_error("pubsub.jetstream", &[url, ("deliverPolicy", "sequence")]);
    assert!(msg.contains("startSequence"), "{msg}");
    let msg = config_error("pubsub.jetstream", &[url, ("jwt", "eyJ...")]);
    assert!(
        msg.contains("jwt") && msg.contains("not supported"),
        "{msg}"
    );
    let msg = config_error("pubsub.jetstream", &[url, ("streamName", "a.b")]);
    assert!(msg.contains("streamName"), "{msg}");
    let BrokerConfig::JetStream(c) = parses(
        "pubsub.jetstream",
        &[
            url,
            ("ackWait", "10s"),
            ("durableName", "ignored"),
            ("maxDeliver", "-1"),
        ],
    ) else {
        panic!("not a jetstream config")
    };
    assert_eq!(c.ack_wait, std::time::Duration::from_secs(10));
    assert_eq!(c.max_deliver, None);
    assert_eq!(c.stream_name, "mybus", "defaults to the component name");
}

#[test]
fn embedded_metadata() {
    let msg = config_error("pubsub.embedded", &[("ackTimeout", "1 minute")]);
    assert!(msg.contains("ackTimeout"), "{msg}");
    let msg = config_error("pubsub.embedded", &[("ackTimeout", "0")]);
    assert!(msg.contains("ackTimeout"), "{msg}");
    let msg = config_error("pubsub.embedded", &[("redisHost", "x:1")]);
    assert!(msg.contains("redisHost"), "{msg}");
}

#[tokio::test]
async fn embedded_needs_a_file_name() {
    let dir = TempDir::new("cfg");
    for name in ["", "a/b", ".."] {
        match nodeplane_pubsub::open(&spec(name, "pubsub.embedded", &[]), dir.path()).await {
            Err(Error::Config(msg)) => assert!(msg.contains("metadata.name"), "{msg}"),
            other => panic!("name {name:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn unreachable_servers_name_the_address() {
    let dir = TempDir::new("cfg");
    // Nothing listens on a port just freed.
    let addr = format!("127.0.0.1:{}", free_port());
    let redis = nodeplane_pubsub::open(
        &spec(
            "mybus",
            "pubsub.redis",
            &[("redisHost", &addr), ("dialTimeout", "2s")],
        ),
        dir.path(),
    )
    .await;
    match redis {
        Err(Error::Backend(msg)) => assert!(msg.contains(&addr) && msg.contains("mybus"), "{msg}"),
        other => panic!("redis at {addr}: {other:?}"),
    }
    let url = format!("nats://{addr}");
    let nats = nodeplane_pubsub::open(
        &spec("mybus", "pubsub.jetstream", &[("natsURL", &url)]),
        dir.path(),
    )
    .await;
    match nats {
        Err(Error::Backend(msg)) => {
            assert!(msg.contains(&url) && msg.contains("natsURL"), "{msg}")
        }
        other => panic!("nats at {url}: {other:?}"),
    }
}
