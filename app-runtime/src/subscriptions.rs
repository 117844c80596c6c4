//! What an app subscribes to, in Dapr's two forms read the same way: the
//! JSON an app answers on `GET /dapr/subscribe` (programmatic) and the
//! `spec` of a `kind: Subscription` document (`dapr.io/v2alpha1`, or
//! `v1alpha1` with a single `route`); plus a pub/sub component's topic
//! scoping and the runtime's delivery retry policy from its metadata.
//!
//! Routing rules (`routes.rules[].match`) are CEL in Dapr. Only a subset
//! is understood here, and anything else is an error naming the rule (the
//! subscription is then not used, rather than routed wrongly):
//! `event.ATTR == "text"` and `!=`, joined by `&&`, where ATTR is a
//! CloudEvent attribute (`type`, `source`, `id`, `topic`, ...) or a path
//! into its data (`data.kind`, `data.order.state`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

/// One subscription of one app to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    pub pubsub: String,
    pub topic: String,
    pub routes: Routes,
    /// `deadLetterTopic`: where messages go after the retry budget.
    pub dead_letter: Option<String>,
    /// `metadata.rawPayload`: deliver the published bytes, not a CloudEvent.
    pub raw: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Routes {
    pub rules: Vec<Rule>,
    /// The path when no rule matches (`route` in the older forms).
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The expression as written (for `/v1.0/metadata`).
    pub text: String,
    pub matches: Vec<Test>,
    pub path: String,
}

/// `event.PATH == VALUE` (or `!=` when `negated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Test {
    pub path: Vec<String>,
    pub value: String,
    pub negated: bool,
}

impl SubscriptionSpec {
    /// One subscription object (`/dapr/subscribe` entry or Subscription
    /// `spec`).
    pub fn parse(v: &Value) -> Result<SubscriptionSpec, String> {
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let pubsub = text("pubsubname")
            .or_else(|| text("pubsubName"))
            .ok_or("no pubsubname")?;
        let topic = text("topic").ok_or("no topic")?;
        let mut routes = Routes {
            rules: Vec::new(),
            default: text("route").map(|r| path(&r)),
        };
        if let Some(r) = v.get("routes") {
            if let Some(d) = r.get("default").and_then(Value::as_str) {
                if !d.trim().is_empty() {
                    routes.default = Some(path(d.trim()));
                }
            }
            for rule in r
                .get("rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let m = rule.get("match").and_then(Value::as_str).unwrap_or("");
                let p = rule
                    .get("path")
                    .and_then(Value::as_str)
                    .filter(|p| !p.trim().is_empty())
                    .ok_or_else(|| format!("topic {topic}: a routes rule has no path"))?;
                routes.rules.push(Rule {
                    text: m.trim().to_string(),
                    matches: parse_match(m).map_err(|e| format!("topic {topic}: {e}"))?,
                    path: path(p.trim()),
                });
            }
        }
        if routes.default.is_none() && routes.rules.is_empty() {
            return Err(format!("topic {topic}: no route (route or routes)"));
        }
        let raw = match v.pointer("/metadata/rawPayload") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };
        Ok(SubscriptionSpec {
            pubsub,
            topic,
            routes,
            dead_letter: text("deadLetterTopic"),
            raw,
        })
    }

    /// An app's `/dapr/subscribe` answer: the subscriptions and the
    /// problems of the entries that could not be read. An empty or
    /// non-JSON answer means no subscriptions (an app without any).
    pub fn parse_list(body: &[u8]) -> (Vec<SubscriptionSpec>, Vec<String>) {
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
            return (out, errors);
        };
        for (i, item) in items.iter().enumerate() {
            match SubscriptionSpec::parse(item) {
                Ok(s) => out.push(s),
                Err(e) => errors.push(format!("/dapr/subscribe entry {}: {e}", i + 1)),
            }
        }
        (out, errors)
    }

    /// The path to deliver `event` (a CloudEvent as JSON, or `None` for
    /// a raw message) to: the first rule that matches, else the default.
    pub fn route(&self, event: Option<&Value>) -> Option<&str> {
        if let Some(ev) = event {
            for r in &self.routes.rules {
                if r.matches.iter().all(|t| t.holds(ev)) {
                    return Some(&r.path);
                }
            }
        }
        self.routes.default.as_deref()
    }
}

impl Test {
    fn holds(&self, ev: &Value) -> bool {
        let mut v = ev;
        for seg in &self.path {
            match v.get(seg) {
                Some(next) => v = next,
                None => return self.negated,
            }
        }
        let eq = match v {
            Value::String(s) => *s == self.value,
            other => serde_json::to_string(other).is_ok_and(|t| t == self.value),
        };
        eq != self.negated
    }
}

fn path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

/// The supported subset of CEL (see the module docs). An empty match is
/// always true.
fn parse_match(m: &str) -> Result<Vec<Test>, String> {
    let m = m.trim();
    if m.is_empty() {
        return Ok(Vec::new());
    }
    let unsupported = || {
        format!("match {m:?} is not supported: write event.ATTR == \"text\" (or !=), joined by &&")
    };
    let mut tests = Vec::new();
    for part in m.split("&&") {
        let part = part.trim();
        let (lhs, rhs, negated) = if let Some((l, r)) = part.split_once("==") {
            (l, r, false)
        } else if let Some((l, r)) = part.split_once("!=") {
            (l, r, true)
        } else {
            return Err(unsupported());
        };
        let attr = lhs.trim().strip_prefix("event.").ok_or_else(unsupported)?;
        if attr.is_empty()
            || !attr
                .split('.')
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(unsupported());
        }
        let rhs = rhs.trim();
        let value = rhs
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .or_else(|| rhs.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
            .map(str::to_string)
            .or_else(|| {
                (rhs.parse::<f64>().is_ok() || rhs == "true" || rhs == "false")
                    .then(|| rhs.to_string())
            })
            .ok_or_else(unsupported)?;
        tests.push(Test {
            path: attr.split('.').map(str::to_string).collect(),
            value,
            negated,
        });
    }
    Ok(tests)
}

/// A component's topic scoping, Dapr's metadata keys: `allowedTopics`
/// (`t1,t2`: no other topic at all), `publishingScopes` and
/// `subscriptionScopes` (`app1=t1,t2;app2=t3`: an app listed may use only
/// its topics, an app listed with none may use none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicScopes {
    pub allowed: Option<Vec<String>>,
    pub publishing: BTreeMap<String, Vec<String>>,
    pub subscription: BTreeMap<String, Vec<String>>,
}

impl TopicScopes {
    pub fn parse(md: &BTreeMap<String, String>) -> Result<TopicScopes, String> {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        };
        let scopes = |key: &str| -> Result<BTreeMap<String, Vec<String>>, String> {
            let mut out = BTreeMap::new();
            for entry in md
                .get(key)
                .map(String::as_str)
                .unwrap_or("")
                .split(';')
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                let (app, topics) = entry
                    .split_once('=')
                    .ok_or_else(|| format!("metadata {key}: {entry:?} is not app=topic1,topic2"))?;
                out.insert(app.trim().to_string(), list(topics));
            }
            Ok(out)
        };
        Ok(TopicScopes {
            allowed: md
                .get("allowedTopics")
                .filter(|v| !v.trim().is_empty())
                .map(|v| list(v)),
            publishing: scopes("publishingScopes")?,
            subscription: scopes("subscriptionScopes")?,
        })
    }

    fn allows(&self, per_app: &BTreeMap<String, Vec<String>>, app: &str, topic: &str) -> bool {
        let listed = self
            .allowed
            .as_ref()
            .is_none_or(|a| a.iter().any(|t| t == topic));
        let scoped = per_app
            .get(app)
            .is_none_or(|ts| ts.iter().any(|t| t == topic));
        listed && scoped
    }

    pub fn may_publish(&self, app: &str, topic: &str) -> bool {
        self.allows(&self.publishing, app, topic)
    }

    pub fn may_subscribe(&self, app: &str, topic: &str) -> bool {
        self.allows(&self.subscription, app, topic)
    }
}

/// How the runtime retries a delivery the app did not take (RETRY, an
/// error status, no answer): `maxDeliveryAttempts` deliveries in all
/// (default 10; then the dead-letter topic, or dropped), waiting
/// `retryInitialInterval` (default 1 s) doubled per attempt up to
/// `retryMaxInterval` (default 60 s) between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    pub fn parse(md: &BTreeMap<String, String>) -> Result<RetryPolicy, String> {
        let d = RetryPolicy::default();
        let get = |k: &str| md.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let dur = |k: &str, def: Duration| match get(k) {
            None => Ok(def),
            Some(v) => nodeplane_pubsub::parse_duration(v)
                .ok_or_else(|| format!("metadata {k} {v:?} is not a duration (e.g. 500ms, 2s)")),
        };
        let max_attempts = match get("maxDeliveryAttempts") {
            None => d.max_attempts,
            Some(v) => v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                format!("metadata maxDeliveryAttempts {v:?} is not a whole number ≥ 1")
            })?,
        };
        Ok(RetryPolicy {
            max_attempts,
            initial: dur("retryInitialInterval", d.initial)?,
            max: dur("retryMaxInterval", d.max)?,
        })
    }

    /// The wait before delivery `attempt + 1`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn programmatic_answers_in_both_forms() {
        let body = json!([
            {"pubsubname": "pubsub", "topic": "orders", "route": "orders"},
            {"pubsubname": "pubsub", "topic": "events", "deadLetterTopic": "dead",
             "metadata": {"rawPayload": "true"},
             "routes": {"rules": [{"match": "event.type == \"big\" && event.data.k != 'x'", "path": "/big"}],
                        "default": "/other"}},
            {"pubsubname": "pubsub", "topic": "bad",
             "routes": {"rules": [{"match": "event.type.startsWith('a')", "path": "/a"}]}},
            {"topic": "nobus", "route": "/x"}
        ]);
        let (subs, errors) = SubscriptionSpec::parse_list(body.to_string().as_bytes());
        assert_eq!(subs.len(), 2, "{subs:?}");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("not supported"), "{errors:?}");
        assert_eq!(subs[0].routes.default.as_deref(), Some("/orders"));
        let ev = subs[1].clone();
        assert!(ev.raw);
        assert_eq!(ev.dead_letter.as_deref(), Some("dead"));
        let big = json!({"type": "big", "data": {"k": "y"}});
        let big_x = json!({"type": "big", "data": {"k": "x"}});
        assert_eq!(ev.route(Some(&big)), Some("/big"));
        assert_eq!(ev.route(Some(&big_x)), Some("/other"));
        assert_eq!(ev.route(None), Some("/other"));
        assert!(SubscriptionSpec::parse_list(b"").0.is_empty());
        assert!(SubscriptionSpec::parse_list(b"not json").0.is_empty());
    }

    #[test]
    fn topic_scopes_and_retry_policy() {
        let md: BTreeMap<String, String> = [
            ("allowedTopics", "a,b,c"),
            ("publishingScopes", "front=a;mute="),
            ("maxDeliveryAttempts", "3"),
            ("retryInitialInterval", "100ms"),
            ("retryMaxInterval", "250ms"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t = TopicScopes::parse(&md).expect("scopes");
        assert!(t.may_publish("front", "a"));
        assert!(!t.may_publish("front", "b"));
        assert!(!t.may_publish("mute", "a"));
        assert!(t.may_publish("other", "c"));
        assert!(!t.may_publish("other", "d"));
        assert!(t.may_subscribe("mute", "a"));
        let r = RetryPolicy::parse(&md).expect("retry");
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(3), Duration::from_millis(250));
        assert_eq!(r.backoff(40), Duration::from_millis(250));
    }
}
