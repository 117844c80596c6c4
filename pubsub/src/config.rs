//! Component metadata → broker configuration, with Dapr's metadata names
//! (pubsub.redis: <https://docs.dapr.io/reference/components-reference/supported-pubsub/setup-redis-pubsub/>,
//! pubsub.jetstream: <https://docs.dapr.io/reference/components-reference/supported-pubsub/setup-jetstream/>).
//!
//! Keys are handled in three ways, so a Dapr component file works and a
//! typo does not pass silently:
//! - implemented keys are parsed strictly: a bad value is an error naming
//!   the key and the expected form;
//! - keys Dapr documents that tune its own Go client or that the app
//!   runtime handles (pool sizes, retries, `concurrency`, scoping) are
//!   accepted and ignored (the `IGNORED_*` lists);
//! - keys whose meaning this runtime cannot honour (TLS, cluster,
//!   sentinel, JWT) are an error when set to anything but their default,
//!   and any other key is an error naming it.
//!
//! Durations are Go duration strings (`1m30s`, `500ms`, `2h`; also `d` for
//! days) or a bare whole number of milliseconds, as Dapr's redis component
//! reads them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{ComponentSpec, Error, Result};

/// Keys every Dapr pub/sub component may carry that the app runtime
/// itself reads (topic scoping), not the broker.
const RUNTIME_KEYS: &[&str] = &[
    "allowedTopics",
    "publishingScopes",
    "subscriptionScopes",
    "protectedTopics",
    "concurrency",
    // The app runtime's delivery retries (see nodeplane-runtime's
    // delivery module): attempts before the dead-letter topic, backoff.
    "maxDeliveryAttempts",
    "retryInitialInterval",
    "retryMaxInterval",
];

/// pubsub.redis keys of Dapr's go-redis client tuning: ignored.
pub const IGNORED_REDIS: &[&str] = &[
    "redisMaxRetries",
    "redisMinRetryInterval",
    "redisMaxRetryInterval",
    "readTimeout",
    "writeTimeout",
    "poolSize",
    "poolTimeout",
    "maxConnAge",
    "minIdleConns",
    "idleCheckFrequency",
    "idleTimeout",
    // The app runtime decides ack or nack from the app's answer.
    "ackOnError",
];

/// pubsub.jetstream keys for Dapr's push consumers, or that name what this
/// crate derives itself (the durable consumer is per group and topic):
/// ignored.
pub const IGNORED_JETSTREAM: &[&str] = &[
    "durableName",
    "queueGroupName",
    "flowControl",
    "rateLimit",
    "heartbeat",
];

/// Keys this runtime cannot honour: an error unless empty or equal to the
/// default given here (`""` = no value allowed).
const UNSUPPORTED_REDIS: &[(&str, &str)] = &[
    ("enableTLS", "false"),
    ("insecureSkipTLSVerify", "false"),
    ("clientCert", ""),
    ("clientKey", ""),
    ("redisType", "node"),
    ("failover", "false"),
    ("sentinelMasterName", ""),
    ("sentinelUsername", ""),
    ("sentinelPassword", ""),
    ("useEntraID", "false"),
    ("useAzureAD", "false"),
    ("useOIDC", "false"),
];

const UNSUPPORTED_JETSTREAM: &[(&str, &str)] = &[
    ("jwt", ""),
    ("seedKey", ""),
    ("tls_client_cert", ""),
    ("tls_client_key", ""),
    ("ackPolicy", "explicit"),
    ("backOff", ""),
];

/// A parsed pub/sub component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerConfig {
    Embedded(EmbeddedConfig),
    Redis(RedisConfig),
    JetStream(JetStreamConfig),
}

/// `pubsub.embedded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// `consumerID`: replaces the group given to `subscribe`.
    pub consumer_id: Option<String>,
    /// `ackTimeout` (default 30 s): unsettled deliveries come back after it.
    pub ack_timeout: Duration,
    /// `segmentBytes` (default 64 MiB): the log is cut into files of about
    /// this size; retention removes whole files.
    pub segment_bytes: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            consumer_id: None,
            ack_timeout: Duration::from_secs(30),
            segment_bytes: 64 << 20,
        }
    }
}

/// How a Redis stream is kept short (Dapr's `maxLenApprox` or `streamTTL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    /// `XADD ... MAXLEN ~ n`.
    MaxLenApprox(u64),
    /// `XADD ... MINID ~ <now - age>`.
    MaxAge(Duration),
}

/// `pubsub.redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redisHost` as `host:port` (port 6379 when omitted).
    pub host: String,
    pub port: u16,
    /// `redisUsername`, `redisPassword` (ACL / AUTH).
    pub username: Option<String>,
    pub password: Option<String>,
    /// `redisDB` (default 0).
    pub db: i64,
    /// `consumerID`: replaces the group given to `subscribe`.
    pub consumer_id: Option<String>,
    /// `processingTimeout` (Dapr's default 60 s): how long an entry stays
    /// pending before another consumer claims it. Zero disables that
    /// redelivery (Dapr's meaning); `nack` still redelivers.
    pub processing_timeout: Duration,
    /// `redeliverInterval` (Dapr's default 15 s): how often each
    /// subscription looks for such entries; zero disables redelivery too.
    pub redeliver_interval: Duration,
    /// `queueDepth` (Dapr's default 100): entries read per XREADGROUP and
    /// held ahead by one subscription.
    pub queue_depth: usize,
    /// `maxLenApprox` / `streamTTL` (one of them, or neither: unbounded).
    pub trim: Option<Trim>,
    /// `dialTimeout` (default 5 s).
    pub dial_timeout: Duration,
}

/// Where a JetStream consumer created for a new group starts (Dapr's
/// `deliverPolicy`, `startSequence`, `startTime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Everything the stream still holds for the topic (Dapr's default).
    All,
    /// Only messages published after the group was created.
    New,
    /// The last message, then new ones.
    Last,
    /// From a stream sequence number.
    Sequence(u64),
    /// From a Unix time in seconds.
    Time(u64),
}

/// `pubsub.jetstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// `natsURL`, e.g. `nats://127.0.0.1:4222` (required).
    pub url: String,
    /// `name`: the connection name the server shows.
    pub connection_name: String,
    /// `token`: token authentication.
    pub token: Option<String>,
    /// `streamName` (default: the component name with characters NATS does
    /// not allow in stream names replaced by `_`). Created when missing;
    /// every topic used is added to its subjects.
    pub stream_name: String,
    /// `consumerID`: replaces the group given to `subscribe`.
    pub consumer_id: Option<String>,
    /// `ackWait` (default 30 s): the consumer's AckWait.
    pub ack_wait: Duration,
    /// `maxDeliver` (default unlimited): after this many deliveries the
    /// server stops redelivering a message.
    pub max_deliver: Option<i64>,
    /// `maxAckPending` (default: the server's, 1000): unacked deliveries
    /// one group may have outstanding.
    pub max_ack_pending: Option<i64>,
    /// `deliverPolicy` and friends.
    pub start_at: StartAt,
    /// `replicas` (default 1) and `memoryStorage` (default false) for a
    /// stream this crate creates.
    pub replicas: usize,
    pub memory_storage: bool,
    /// `domain`, `apiPrefix`: JetStream behind a leaf node or an account
    /// import.
    pub domain: Option<String>,
    pub api_prefix: Option<String>,
}

/// Reads and checks one component's metadata.
struct Fields<'a> {
    component: &'a str,
    kind: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

impl<'a> Fields<'a> {
    fn err(&self, msg: String) -> Error {
        Error::Config(format!(
            "component {} ({}): {msg}",
            self.component, self.kind
        ))
    }

    /// A non-empty, trimmed value.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.metadata
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn duration(&self, key: &str, default: Duration) -> Result<Duration> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_duration(v).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} {v:?} is not a duration: write e.g. \"30s\", \"1m30s\", \"500ms\" or a whole number of milliseconds"
                ))
            }),
        }
    }

    fn number<T: std::str::FromStr>(&self, key: &str, what: &str) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<T>()
                .map(Some)
                .map_err(|_| self.err(format!("metadata {key} {v:?} is not {what}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(self.err(format!("metadata {key} {v:?} is not true or false"))),
        }
    }

    /// Every key is known: implemented, ignored, or unsupported with its
    /// default value.
    fn check_keys(
        &self,
        implemented: &[&str],
        ignored: &[&str],
        unsupported: &[(&str, &str)],
    ) -> Result<()> {
        for (key, value) in self.metadata {
            let value = value.trim();
            if implemented.contains(&key.as_str())
                || ignored.contains(&key.as_str())
                || RUNTIME_KEYS.contains(&key.as_str())
            {
                continue;
            }
            if let Some((_, default)) = unsupported.iter().find(|(k, _)| k == key) {
                if value.is_empty() || value.eq_ignore_ascii_case(default) {
                    continue;
                }
                return Err(self.err(format!(
                    "metadata {key}={value:?} is not supported by this runtime; remove it{}",
                    if default.is_empty() {
                        String::new()
                    } else {
                        format!(" or set it to {default:?}")
                    }
                )));
            }
            let mut known: Vec<&str> = implemented.to_vec();
            known.sort_unstable();
            return Err(self.err(format!(
                "unknown metadata key {key:?}; this component reads: {}",
                known.join(", ")
            )));
        }
        Ok(())
    }
}

impl BrokerConfig {
    /// Parses a component; `spec.kind` picks the backend.
    pub fn from_spec(spec: &ComponentSpec) -> Result<BrokerConfig> {
        let f = Fields {
            component: &spec.name,
            kind: &spec.kind,
            metadata: &spec.metadata,
        };
        match spec.kind.as_str() {
            "pubsub.embedded" => embedded(&f).map(BrokerConfig::Embedded),
            "pubsub.redis" => redis(&f).map(BrokerConfig::Redis),
            "pubsub.jetstream" => jetstream(&f, &spec.name).map(BrokerConfig::JetStream),
            other => Err(Error::Config(format!(
                "component {}: spec.type {other} is not supported; use one of: {}",
                spec.name,
                crate::KINDS.join(", ")
            ))),
        }
    }
}

fn embedded(f: &Fields<'_>) -> Result<EmbeddedConfig> {
    f.check_keys(&["consumerID", "ackTimeout", "segmentBytes"], &[], &[])?;
    let d = EmbeddedConfig::default();
    let ack_timeout = f.duration("ackTimeout", d.ack_timeout)?;
    if ack_timeout.is_zero() {
        return Err(f.err("metadata ackTimeout must be more than zero".into()));
    }
    let segment_bytes = f
        .number::<u64>("segmentBytes", "a whole number of bytes")?
        .unwrap_or(d.segment_bytes);
    if segment_bytes < 4096 {
        return Err(f.err(format!(
            "metadata segmentBytes {segment_bytes} is too small: use at least 4096"
        )));
    }
    Ok(EmbeddedConfig {
        consumer_id: f.get("consumerID").map(str::to_owned),
        ack_timeout,
        segment_bytes,
    })
}

fn redis(f: &Fields<'_>) -> Result<RedisConfig> {
    f.check_keys(
        &[
            "redisHost",
            "redisPassword",
            "redisUsername",
            "redisDB",
            "consumerID",
            "processingTimeout",
            "redeliverInterval",
            "queueDepth",
            "maxLenApprox",
            "streamTTL",
            "dialTimeout",
        ],
        IGNORED_REDIS,
        UNSUPPORTED_REDIS,
    )?;
    let host = f.get("redisHost").ok_or_else(|| {
        f.err("metadata redisHost is required: set it to the server's host:port, e.g. redis-master:6379".into())
    })?;
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>().map_err(|_| {
                f.err(format!(
                    "metadata redisHost {host:?}: the port is not a number; write host:port"
                ))
            })?,
        ),
        _ => (host, 6379),
    };
    if h.is_empty() {
        return Err(f.err(format!(
            "metadata redisHost {host:?} has no host name; write host:port"
        )));
    }
    let queue_depth = f
        .number::<usize>("queueDepth", "a whole number")?
        .unwrap_or(100);
    if queue_depth == 0 {
        return Err(f.err("metadata queueDepth must be at least 1".into()));
    }
    let max_len = f.number::<u64>("maxLenApprox", "a whole number of entries")?;
    let ttl = match f.get("streamTTL") {
        None => None,
        Some(_) => Some(f.duration("streamTTL", Duration::ZERO)?),
    };
    let trim = match (max_len, ttl) {
        (Some(_), Some(_)) => {
            return Err(f.err(
                "metadata maxLenApprox and streamTTL are both set; Redis trims a stream by one rule, keep one".into(),
            ))
        }
        (Some(0), None) | (None, None) => None,
        (Some(n), None) => Some(Trim::MaxLenApprox(n)),
        (None, Some(d)) if d.is_zero() => None,
        (None, Some(d)) => Some(Trim::MaxAge(d)),
    };
    Ok(RedisConfig {
        host: h.to_owned(),
        port,
        username: f.get("redisUsername").map(str::to_owned),
        password: f
            .metadata
            .get("redisPassword")
            .filter(|p| !p.is_empty())
            .cloned(),
        db: f
            .number::<i64>("redisDB", "a database index such as 0")?
            .unwrap_or(0),
        consumer_id: f.get("consumerID").map(str::to_owned),
        processing_timeout: f.duration("processingTimeout", Duration::from_secs(60))?,
        redeliver_interval: f.duration("redeliverInterval", Duration::from_secs(15))?,
        queue_depth,
        trim,
        dial_timeout: f.duration("dialTimeout", Duration::from_secs(5))?,
    })
}

/// NATS stream and consumer names: no whitespace, `.`, `*`, `>`, path
/// separators.
pub(crate) fn nats_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn jetstream(f: &Fields<'_>, component: &str) -> Result<JetStreamConfig> {
    f.check_keys(
        &[
            "natsURL",
            "name",
            "token",
            "streamName",
            "consumerID",
            "ackWait",
            "maxDeliver",
            "maxAckPending",
            "deliverPolicy",
            "startSequence",
            "startTime",
            "replicas",
            "memoryStorage",
            "domain",
            "apiPrefix",
        ],
        IGNORED_JETSTREAM,
        UNSUPPORTED_JETSTREAM,
    )?;
    let url = f.get("natsURL").ok_or_else(|| {
        f.err(
            "metadata natsURL is required: set it to the server's URL, e.g. nats://nats:4222"
                .into(),
        )
    })?;
    let ack_wait = f.duration("ackWait", Duration::from_secs(30))?;
    if ack_wait.is_zero() {
        return Err(f.err("metadata ackWait must be more than zero".into()));
    }
    let positive = |key: &str| -> Result<Option<i64>> {
        match f.number::<i64>(key, "a whole number")? {
            Some(n) if n > 0 => Ok(Some(n)),
            // Dapr and NATS read 0 and -1 as "no limit".
            Some(0 | -1) | None => Ok(None),
            Some(n) => Err(f.err(format!(
                "metadata {key} {n} must be positive, or -1 for no limit"
            ))),
        }
    };
    let start_sequence = f.number::<u64>("startSequence", "a stream sequence number")?;
    let start_time = f.number::<u64>("startTime", "a Unix time in seconds")?;
    let start_at = match f.get("deliverPolicy").unwrap_or("all") {
        "all" => StartAt::All,
        "new" => StartAt::New,
        "last" => StartAt::Last,
        "sequence" => StartAt::Sequence(start_sequence.ok_or_else(|| {
            f.err("metadata deliverPolicy \"sequence\" needs startSequence".into())
        })?),
        "time" => StartAt::Time(start_time.ok_or_else(|| {
            f.err("metadata deliverPolicy \"time\" needs startTime (Unix seconds)".into())
        })?),
        other => {
            return Err(f.err(format!(
                "metadata deliverPolicy {other:?} is not one of: all, new, last, sequence, time"
            )))
        }
    };
    let replicas = f
        .number::<usize>("replicas", "a whole number")?
        .unwrap_or(1)
        .max(1);
    let stream_name = match f.get("streamName") {
        Some(s) if nats_name(s) != s => {
            return Err(f.err(format!(
                "metadata streamName {s:?} may not contain whitespace, '.', '*', '>' or slashes"
            )))
        }
        Some(s) => s.to_owned(),
        None => nats_name(component),
    };
    if stream_name.is_empty() {
        return Err(f.err("metadata streamName is empty and so is the component name".into()));
    }
    Ok(JetStreamConfig {
        url: url.to_owned(),
        connection_name: f
            .get("name")
            .unwrap_or("nodeplane - pubsub.jetstream")
            .to_owned(),
        token: f.get("token").map(str::to_owned),
        stream_name,
        consumer_id: f.get("consumerID").map(str::to_owned),
        ack_wait,
        max_deliver: positive("maxDeliver")?,
        max_ack_pending: positive("maxAckPending")?,
        start_at,
        replicas,
        memory_storage: f.bool("memoryStorage")?,
        domain: f.get("domain").map(str::to_owned),
        api_prefix: f.get("apiPrefix").map(str::to_owned),
    })
}

/// A Go duration (`1h2m3.5s`, `300ms`, `2d`) or whole milliseconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Some(Duration::from_millis(ms));
    }
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("1500"), Some(ms(1500)));
        assert_eq!(parse_duration("30s"), Some(ms(30_000)));
        assert_eq!(parse_duration("1m30s"), Some(ms(90_000)));
        assert_eq!(parse_duration("250ms"), Some(ms(250)));
        assert_eq!(parse_duration("1.5h"), Some(ms(5_400_000)));
        assert_eq!(parse_duration("2d"), Some(ms(172_800_000)));
        for bad in ["", "abc", "10x", "-5s", "s", "1..5s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn nats_names() {
        assert_eq!(nats_name("orders.v1 *>/x"), "orders_v1____x");
    }
}
