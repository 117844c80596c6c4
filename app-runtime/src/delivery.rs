//! Delivering published messages to the apps of this node.
//!
//! One task follows the directory and the registry (every
//! [`TICK`]) and keeps one broker subscription per (namespace, app id,
//! pub/sub, topic) that has at least one ready pod on this node and a
//! subscription for it: the app's own (`GET /dapr/subscribe` on its app
//! port, asked once per pod each time it becomes ready, and again while it
//! does not answer) or a declarative `Subscription` that applies to it.
//! The consumer group is the app id, so with a shared broker the app's
//! pods on every node compete: each message reaches one pod of the app.
//!
//! Each delivery is POSTed to the route on a ready local pod of the app
//! (round robin), then settled from the answer, as Dapr does:
//! - 2xx with `{"status":"SUCCESS"}`, no status or a body that is not
//!   JSON: ack;
//! - `{"status":"DROP"}` or 404: ack without retry, after forwarding the
//!   message to the dead-letter topic when the subscription has one
//!   (Dapr ≥ 1.13 forwards dropped messages too);
//! - `{"status":"RETRY"}`, another status, any other error, no answer in
//!   time: nack with exponential backoff ([`RetryPolicy`]); after
//!   `maxDeliveryAttempts` deliveries the message goes to the dead-letter
//!   topic if set (and only once that publish succeeded is it acked),
//!   else it is dropped with a warning.
//!
//! Nothing is acked before the app answered, so an agent killed at any
//! point loses nothing: the broker delivers again (after its ack timeout,
//! or at once for the embedded log after a restart).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::components::PubSubComponent;
use crate::directory::AppPod;
use crate::pubsub_api::{envelope, mime, Envelope, CLOUDEVENT_CONTENT_TYPE, RAW_PAYLOAD};
use crate::subscriptions::{RetryPolicy, SubscriptionSpec};
use crate::Runtime;

/// How often the task looks at the directory and the registry.
const TICK: Duration = Duration::from_millis(200);
/// Deliveries of one subscription in flight at once.
const CONCURRENCY: usize = 16;
/// How long `/dapr/subscribe` may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// An app's answer to a delivery is read up to this size.
const MAX_ANSWER: usize = 1 << 20;

/// (namespace, app id, pub/sub name, topic).
pub type Key = (String, String, String, String);

/// What the runtime subscribes to, for `/v1.0/metadata`.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Active subscriptions and whether they are declarative.
    pub active: BTreeMap<Key, (SubscriptionSpec, bool)>,
    /// Why subscriptions of an app are not used: (namespace, app) → problems.
    pub errors: BTreeMap<(String, String), Vec<String>>,
}

/// One pod's `/dapr/subscribe` answer (or the wait for it).
#[derive(Debug)]
struct Asked {
    ips: Vec<IpAddr>,
    subs: Option<Vec<SubscriptionSpec>>,
    errors: Vec<String>,
    next_try: Instant,
    tries: u32,
    in_flight: bool,
}

struct Running {
    spec: SubscriptionSpec,
    broker: Arc<dyn nodeplane_pubsub::Broker>,
    /// Dropped (or set) to stop the subscription.
    _stop: watch::Sender<bool>,
}

/// Keeps the subscriptions current; runs for the runtime's life.
pub async fn run(rt: Arc<Runtime>) {
    let mut asked: HashMap<String, Asked> = HashMap::new();
    let mut running: BTreeMap<Key, Running> = BTreeMap::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Vec<IpAddr>, Result<Vec<u8>, String>)>();
    loop {
        while let Ok((pod, ips, answer)) = rx.try_recv() {
            let Some(a) = asked.get_mut(&pod).filter(|a| a.ips == ips) else {
                continue;
            };
            a.in_flight = false;
            match answer {
                Ok(body) => {
                    let (subs, errors) = SubscriptionSpec::parse_list(&body);
                    a.subs = Some(subs);
                    a.errors = errors;
                }
                Err(e) => {
                    a.tries += 1;
                    a.next_try = Instant::now() + Duration::from_millis(200 << a.tries.min(5));
                    a.errors = vec![format!("GET /dapr/subscribe on pod {pod}: {e}")];
                }
            }
        }
        let dir = rt.directory();
        let reg = rt.registry();
        // Local ready pods of apps, by app.
        let mut apps: BTreeMap<(String, String), Vec<Arc<AppPod>>> = BTreeMap::new();
        for p in dir.pods() {
            if let (true, true, Some(app), Some(_)) = (p.local, p.ready, &p.app_id, p.app_port) {
                if !p.ips.is_empty() {
                    apps.entry((p.namespace.clone(), app.clone()))
                        .or_default()
                        .push(p.clone());
                }
            }
        }
        let live: std::collections::HashSet<String> =
            apps.values().flatten().map(|p| p.key()).collect();
        asked.retain(|k, _| live.contains(k));
        for p in apps.values().flatten() {
            let a = asked.entry(p.key()).or_insert_with(|| Asked {
                ips: p.ips.clone(),
                subs: None,
                errors: Vec::new(),
                next_try: Instant::now(),
                tries: 0,
                in_flight: false,
            });
            if a.ips != p.ips {
                *a = Asked {
                    ips: p.ips.clone(),
                    subs: None,
                    errors: Vec::new(),
                    next_try: Instant::now(),
                    tries: 0,
                    in_flight: false,
                };
            }
            if a.subs.is_none() && !a.in_flight && a.next_try <= Instant::now() {
                a.in_flight = true;
                let (rt, tx, pod) = (rt.clone(), tx.clone(), p.clone());
                tokio::spawn(async move {
                    let answer = ask(&rt, &pod).await;
                    let _ = tx.send((pod.key(), pod.ips.clone(), answer));
                });
            }
        }

        // What should run.
        let mut status = Status::default();
        let mut want: BTreeMap<Key, (SubscriptionSpec, bool, PubSubComponent)> = BTreeMap::new();
        for ((ns, app), pods) in &apps {
            let mut specs: Vec<(SubscriptionSpec, bool)> = Vec::new();
            let mut errors = Vec::new();
            for p in pods {
                if let Some(a) = asked.get(&p.key()) {
                    errors.extend(a.errors.iter().cloned());
                    for s in a.subs.iter().flatten() {
                        specs.push((s.clone(), false));
                    }
                }
            }
            for d in reg.subscriptions.iter().filter(|d| d.applies_to(app, ns)) {
                specs.push((d.spec.clone(), true));
            }
            for (spec, declarative) in specs {
                let key = (
                    ns.clone(),
                    app.clone(),
                    spec.pubsub.clone(),
                    spec.topic.clone(),
                );
                if want.contains_key(&key) {
                    continue;
                }
                let Some(comp) = reg.pubsub(&spec.pubsub, Some(app), Some(ns)) else {
                    errors.push(format!(
                        "topic {}: pubsub {} is not found for app {app}",
                        spec.topic, spec.pubsub
                    ));
                    continue;
                };
                if !comp.topics.may_subscribe(app, &spec.topic) {
                    errors.push(format!(
                        "topic {} of pubsub {}: not allowed for app id {app} (subscriptionScopes, allowedTopics)",
                        spec.topic, spec.pubsub
                    ));
                    continue;
                }
                status
                    .active
                    .insert(key.clone(), (spec.clone(), declarative));
                want.insert(key, (spec, declarative, comp.clone()));
            }
            errors.sort();
            errors.dedup();
            if !errors.is_empty() {
                status.errors.insert((ns.clone(), app.clone()), errors);
            }
        }
        running.retain(|k, r| {
            want.get(k).is_some_and(|(spec, _, comp)| {
                *spec == r.spec && Arc::ptr_eq(&comp.broker, &r.broker)
            })
        });
        for (key, (spec, _, comp)) in want {
            if running.contains_key(&key) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            running.insert(
                key.clone(),
                Running {
                    spec: spec.clone(),
                    broker: comp.broker.clone(),
                    _stop: stop,
                },
            );
            tracing::info!(namespace = %key.0, app = %key.1, pubsub = %key.2, topic = %key.3, "subscribing");
            tokio::spawn(subscription(rt.clone(), key, spec, comp, stopped));
        }
        *rt.pubsub_status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        tokio::time::sleep(TICK).await;
    }
}

/// `GET /dapr/subscribe` on the pod's app port: the body of a 2xx answer
/// (a 404 or other error status is "no subscriptions", as in Dapr).
async fn ask(rt: &Runtime, pod: &AppPod) -> Result<Vec<u8>, String> {
    let addr = endpoint(pod).ok_or("no address or app port")?;
    let req = Request::get("/dapr/subscribe")
        .header(http::header::HOST, addr.to_string())
        .body(crate::server::full(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let (status, body) = post(rt, addr, req, SUBSCRIBE_TIMEOUT).await?;
    Ok(if status.is_success() {
        body.to_vec()
    } else {
        Vec::new()
    })
}

pub(crate) fn endpoint(p: &AppPod) -> Option<SocketAddr> {
    Some(SocketAddr::new(*p.ips.first()?, p.app_port?))
}

/// Sends one request to an app pod and reads the whole answer.
pub(crate) async fn post(
    rt: &Runtime,
    addr: SocketAddr,
    req: Request<crate::server::Body>,
    limit: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let (parts, body) = exchange(rt, addr, req, limit, MAX_ANSWER).await?;
    Ok((parts.status, body))
}

/// One request to `addr` over the runtime's pooled HTTP/1 connections,
/// with the answer's head and its whole body (at most `max` bytes), all
/// within `limit`. Shared by deliveries, input bindings and the HTTP
/// output binding.
pub(crate) async fn exchange(
    rt: &Runtime,
    addr: SocketAddr,
    req: Request<crate::server::Body>,
    limit: Duration,
    max: usize,
) -> Result<(http::response::Parts, Bytes), String> {
    let work = async {
        let mut sender = match rt.pool.idle(addr).await {
            Some(s) => s,
            None => rt
                .pool
                .connect_untracked(addr)
                .await
                .map_err(|e| e.to_string())?,
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                // A pooled connection closed meanwhile: once more, fresh.
                Some(back) => {
                    sender = rt
                        .pool
                        .connect_untracked(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    sender.send_request(back).await.map_err(|e| e.to_string())?
                }
                None => return Err(e.into_error().to_string()),
            },
        };
        let (parts, body) = resp.into_parts();
        let body = rt.pool.body(addr, sender, body);
        let bytes = http_body_util::Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((parts, bytes))
    };
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// A ready pod of `app` on this node, taking turns by `turn` (round robin
/// over the pods in name order), and its address; `Err` says why none.
pub(crate) fn local_pod(
    rt: &Runtime,
    ns: &str,
    app: &str,
    turn: usize,
) -> Result<(Arc<AppPod>, SocketAddr), String> {
    let mut local = local_pods(rt, ns, app);
    if local.is_empty() {
        return Err("no ready pod of the app on this node".into());
    }
    let pod = local.swap_remove(turn % local.len());
    match endpoint(&pod) {
        Some(addr) => Ok((pod, addr)),
        None => Err(format!("pod {} has no address", pod.key())),
    }
}

/// The app's ready pods on this node, in name order.
pub(crate) fn local_pods(rt: &Runtime, ns: &str, app: &str) -> Vec<Arc<AppPod>> {
    let mut local: Vec<Arc<AppPod>> = rt
        .directory()
        .endpoints(ns, app)
        .into_iter()
        .filter(|p| p.local)
        .collect();
    local.sort_by(|a, b| a.name.cmp(&b.name));
    local
}

/// Joins `topic` as consumer group `group` at `broker`, trying again
/// every second; `None` when `stop` came first.
pub(crate) async fn join(
    broker: &dyn nodeplane_pubsub::Broker,
    topic: &str,
    group: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Box<dyn nodeplane_pubsub::Subscription>> {
    loop {
        tokio::select! {
            _ = stop.changed() => return None,
            s = broker.subscribe(topic, group) => match s {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, group, topic, "subscribe failed; trying again");
                    tokio::select! {
                        _ = stop.changed() => return None,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
    }
}

/// Hands `sub`'s deliveries to `handle`, each in a task of its own and at
/// most `limit` at once, until `stop` fires. `what` names the
/// subscription in logs.
pub(crate) async fn pump<F, Fut>(
    sub: &mut dyn nodeplane_pubsub::Subscription,
    limit: usize,
    stop: &mut watch::Receiver<bool>,
    what: &str,
    handle: F,
) where
    F: Fn(nodeplane_pubsub::Delivery) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit));
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let d = tokio::select! {
            _ = stop.changed() => return,
            d = sub.next() => d,
        };
        match d {
            Ok(d) => {
                let work = handle(d);
                tokio::spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, what, "receiving failed; trying again");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// One broker subscription, until `stop` fires.
async fn subscription(
    rt: Arc<Runtime>,
    key: Key,
    spec: SubscriptionSpec,
    comp: PubSubComponent,
    mut stop: watch::Receiver<bool>,
) {
    let (ns, app, _, topic) = key.clone();
    let Some(mut sub) = join(comp.broker.as_ref(), &topic, &app, &mut stop).await else {
        return;
    };
    rt.count_subscribed(&key, true);
    let ctx = Arc::new(Ctx {
        rt,
        ns,
        app,
        spec,
        comp,
        next: std::sync::atomic::AtomicUsize::new(0),
    });
    let what = format!("app {} topic {}", ctx.app, ctx.spec.topic);
    pump(sub.as_mut(), CONCURRENCY, &mut stop, &what, |d| {
        let ctx = ctx.clone();
        async move { ctx.deliver(d).await }
    })
    .await;
    tracing::info!(app = %ctx.app, topic = %ctx.spec.topic, pubsub = %ctx.spec.pubsub, "unsubscribing");
    ctx.rt.count_subscribed(&key, false);
    if let Err(e) = sub.close().await {
        tracing::debug!(error = %e, "closing a subscription");
    }
}

struct Ctx {
    rt: Arc<Runtime>,
    ns: String,
    app: String,
    spec: SubscriptionSpec,
    comp: PubSubComponent,
    /// Round-robin position over the app's local pods.
    next: std::sync::atomic::AtomicUsize,
}

/// How the app took a delivery (a pub/sub message or an input binding's
/// firing).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Retry(String),
    Drop(String),
}

impl Ctx {
    async fn deliver(&self, d: nodeplane_pubsub::Delivery) {
        let nodeplane_pubsub::Delivery {
            msg,
            attempt,
            token,
        } = d;
        let began = std::time::Instant::now();
        let outcome = self.call(&msg).await;
        let label = match &outcome {
            Outcome::Success => "success",
            Outcome::Retry(_) => "retry",
            Outcome::Drop(_) => "drop",
        };
        self.rt.metrics.delivered(
            &self.app,
            &self.spec.pubsub,
            &msg.topic,
            label,
            began.elapsed(),
        );
        let policy: RetryPolicy = self.comp.retry;
        let settled = match outcome {
            Outcome::Success => token.ack().await,
            Outcome::Drop(why) => {
                tracing::warn!(app = %self.app, topic = %msg.topic, id = %msg.id, why = %why, "message dropped by the app");
                if self.dead_letter(&msg).await {
                    token.ack().await
                } else {
                    token.nack(policy.backoff(attempt)).await
                }
            }
            Outcome::Retry(why) if attempt >= policy.max_attempts => {
                tracing::warn!(app = %self.app, topic = %msg.topic, id = %msg.id, attempt, why = %why, "retry budget spent");
                if self.spec.dead_letter.is_none() {
                    tracing::warn!(app = %self.app, topic = %msg.topic, id = %msg.id, "no deadLetterTopic: message dropped");
                }
                if self.dead_letter(&msg).await {
                    token.ack().await
                } else {
                    token.nack(policy.backoff(attempt)).await
                }
            }
            Outcome::Retry(why) => {
                tracing::debug!(app = %self.app, topic = %msg.topic, id = %msg.id, attempt, why = %why, "delivery to retry");
                token.nack(policy.backoff(attempt)).await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, app = %self.app, topic = %msg.topic, "settling a delivery failed (it comes again)");
        }
    }

    /// Forwards to the dead-letter topic when there is one; false when
    /// that failed (the message must stay).
    async fn dead_letter(&self, msg: &nodeplane_pubsub::Message) -> bool {
        let Some(dlt) = &self.spec.dead_letter else {
            return true;
        };
        let mut m = msg.clone();
        m.topic = dlt.clone();
        match self.comp.broker.publish(m).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, topic = %dlt, "publishing to the dead-letter topic failed");
                false
            }
        }
    }

    /// One POST to a ready local pod of the app.
    async fn call(&self, msg: &nodeplane_pubsub::Message) -> Outcome {
        let raw_msg = msg.metadata.get(RAW_PAYLOAD).is_some_and(|v| v == "true")
            || mime(&msg.content_type) != CLOUDEVENT_CONTENT_TYPE;
        let mut event: Option<Value> = if raw_msg {
            None
        } else {
            serde_json::from_slice(&msg.data).ok()
        };
        let (body, content_type) = if self.spec.raw {
            (msg.data.clone(), msg.content_type.clone())
        } else if event.is_some() {
            (msg.data.clone(), CLOUDEVENT_CONTENT_TYPE.to_string())
        } else {
            // A raw message to an app that takes CloudEvents: wrapped here.
            let ev = envelope(
                &Envelope {
                    id: msg.id.clone(),
                    source: String::new(),
                    pubsub: self.spec.pubsub.clone(),
                    topic: msg.topic.clone(),
                    traceparent: crate::trace::next(None),
                },
                &msg.content_type,
                &msg.data,
            );
            let b = Bytes::from(ev.to_string());
            event = Some(ev);
            (b, CLOUDEVENT_CONTENT_TYPE.to_string())
        };
        let Some(route) = self.spec.route(event.as_ref()) else {
            return Outcome::Drop("no routing rule matches and there is no default route".into());
        };
        // Round robin over this node's pods, in a stable order.
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (pod, addr) = match local_pod(&self.rt, &self.ns, &self.app, turn) {
            Ok(p) => p,
            Err(why) => return Outcome::Retry(why),
        };
        let traceparent = crate::trace::next(
            event
                .as_ref()
                .and_then(|e| e.get("traceparent"))
                .and_then(Value::as_str),
        );
        let req = Request::post(route)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, content_type)
            .header("traceparent", traceparent)
            .header("pubsubname", self.spec.pubsub.as_str())
            .body(crate::server::full(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Drop(format!("route {route:?}: {e}")),
        };
        let limit = self
            .comp
            .broker
            .ack_timeout()
            .map_or(Duration::from_secs(60), |t| t * 3 / 4);
        match post(&self.rt, addr, req, limit).await {
            Err(e) => Outcome::Retry(format!("pod {}: {e}", pod.key())),
            Ok((status, body)) => outcome(status, &body),
        }
    }
}

/// Dapr's reading of an app's answer to a delivery.
fn outcome(status: StatusCode, body: &[u8]) -> Outcome {
    if status == StatusCode::NOT_FOUND {
        return Outcome::Drop("the app answered 404".into());
    }
    if !status.is_success() {
        return Outcome::Retry(format!("the app answered {status}"));
    }
    let said = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_uppercase)
    });
    match said.as_deref() {
        None | Some("") | Some("SUCCESS") => Outcome::Success,
        Some("DROP") => Outcome::Drop("the app answered DROP".into()),
        Some("RETRY") => Outcome::Retry("the app answered RETRY".into()),
        Some(other) => Outcome::Retry(format!("the app answered an unknown status {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_dapr_reads_them() {
        let ok = StatusCode::OK;
        assert_eq!(outcome(ok, b""), Outcome::Success);
        assert_eq!(outcome(ok, b"done"), Outcome::Success);
        assert_eq!(outcome(ok, br#"{"status":"SUCCESS"}"#), Outcome::Success);
        assert_eq!(outcome(StatusCode::NO_CONTENT, b""), Outcome::Success);
        assert!(matches!(
            outcome(ok, br#"{"status":"RETRY"}"#),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            outcome(ok, br#"{"status":"drop"}"#),
            Outcome::Drop(_)
        ));
        assert!(matches!(
            outcome(ok, br#"{"status":"MAYBE"}"#),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            outcome(StatusCode::NOT_FOUND, b""),
            Outcome::Drop(_)
        ));
        assert!(matches!(
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"status":"SUCCESS"}"#
            ),
            Outcome::Retry(_)
        ));
    }
}
