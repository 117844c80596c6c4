//! Running input bindings (`bindings.cron`) for the apps of this node.
//!
//! One task follows the directory and the registry (every [`TICK`]) and
//! keeps one schedule per (namespace, app id, binding) for every app with
//! a ready pod on this node that sees the binding (its namespace and
//! `scopes`), as each Dapr sidecar of the app would. A schedule starts
//! when the app appears or the component is added, restarts when the
//! component's spec changes, and stops when either goes away.
//!
//! Each firing is first appended to a durable log (an embedded pub/sub
//! log of the runtime's own, `_input-bindings.pubsub` in the state
//! directory, one topic per schedule and the app id as its group), then
//! delivered from it exactly as a pub/sub message is: POSTed to the
//! binding's route on ONE ready local pod of the app (round robin), with
//! an empty body and Dapr's cron metadata as headers (`timeZone`,
//! `readTimeUTC`). A 2xx answer acks it; a 404 drops it; anything else
//! (another status, no connection, no answer within ¾ of the log's ack
//! timeout) is retried with the pub/sub backoff ([`RetryPolicy`], the
//! component's `maxDeliveryAttempts`, `retryInitialInterval`,
//! `retryMaxInterval`), then dropped with a warning. At most
//! [`IN_FLIGHT`] firings of one schedule wait unsettled; a firing due
//! beyond that is skipped with a warning.
//!
//! What is kept: the pub/sub guarantee. A firing, once in the log, is
//! delivered at least once even across an agent kill -9 (the log hands
//! out unsettled firings again after the restart, with their original
//! `readTimeUTC`). Firings due while the agent was down are not made up
//! (an `@every` schedule counts again from the agent's start), as with a
//! Dapr sidecar that was down.
//!
//! Before the first delivery to a pod, as Dapr does, the runtime asks
//! `OPTIONS {route}`: a 2xx or 405 answer means the app listens there;
//! anything else (404) means it does not, and that pod gets no firings.
//! A binding with an explicit `direction: input` is delivered without
//! asking.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::sync::watch;

use nodeplane_pubsub::{Broker, Delivery, Message, Subscription};

use super::cron::{go_time_utc, CronBinding, Schedule};
use super::Binding;
use crate::delivery::Outcome;
use crate::directory::AppPod;
use crate::Runtime;

/// How often the task looks at the directory and the registry.
const TICK: Duration = Duration::from_millis(200);
/// Firings of one schedule being delivered at once.
pub const IN_FLIGHT: usize = 16;
/// The durable log's component name: Kubernetes names never start with
/// `_`, so no user's pub/sub can share its directory.
const LOG_NAME: &str = "_input-bindings";
/// The firing's time, as its message metadata carries it.
const READ_TIME: &str = "readTimeUTC";
/// How long to wait before trying the log again after a failure.
const LOG_RETRY: Duration = Duration::from_secs(1);
/// How long the `OPTIONS` probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// (namespace, app id, binding key in the registry).
type Key = (String, String, String);

struct Running {
    cron: Arc<CronBinding>,
    /// Dropped to stop the schedule and its deliveries.
    _stop: watch::Sender<bool>,
}

/// Keeps the schedules current; runs for the runtime's life.
pub async fn run(rt: Arc<Runtime>) {
    let log = open_log(&rt).await;
    let mut running: BTreeMap<Key, Running> = BTreeMap::new();
    loop {
        let dir = rt.directory();
        let reg = rt.registry();
        let mut want: BTreeMap<Key, (String, Arc<CronBinding>)> = BTreeMap::new();
        for p in dir.pods() {
            let (true, true, Some(app), Some(_)) = (p.local, p.ready, &p.app_id, p.app_port) else {
                continue;
            };
            if p.ips.is_empty() {
                continue;
            }
            for c in reg.visible_bindings(Some(app), Some(&p.namespace)) {
                let Binding::Cron(cron) = &c.binding else {
                    continue;
                };
                if cron.directions.explicit && !cron.directions.input {
                    continue;
                }
                let k = crate::components::key(c.namespace.as_deref(), &c.spec.name);
                want.insert(
                    (p.namespace.clone(), app.clone(), k),
                    (c.spec.name.clone(), cron.clone()),
                );
            }
        }
        drop((dir, reg));
        running.retain(|k, r| {
            let keep = want.get(k).is_some_and(|(_, c)| Arc::ptr_eq(c, &r.cron));
            if !keep {
                tracing::info!(namespace = %k.0, app = %k.1, binding = %k.2, "input binding stopped");
            }
            keep
        });
        for (key, (name, cron)) in want {
            if running.contains_key(&key) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            tracing::info!(namespace = %key.0, app = %key.1, binding = %key.2,
                schedule = %cron.schedule_text, route = %cron.route, "input binding started");
            let ctx = Arc::new(Ctx {
                rt: rt.clone(),
                log: log.clone(),
                topic: format!("{}/{}/{}", key.0, key.1, key.2),
                pending: AtomicUsize::new(0),
                ns: key.0.clone(),
                app: key.1.clone(),
                name,
                cron: cron.clone(),
                next: AtomicUsize::new(0),
                listens: Mutex::new(HashMap::new()),
            });
            tokio::spawn(schedule(ctx, stopped));
            running.insert(key, Running { cron, _stop: stop });
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Opens the firings' log, trying until it opens (a failure is reported
/// in the runtime's problems and logged).
async fn open_log(rt: &Runtime) -> Arc<dyn Broker> {
    let spec = nodeplane_pubsub::ComponentSpec {
        name: LOG_NAME.into(),
        kind: "pubsub.embedded".into(),
        version: "v1".into(),
        metadata: BTreeMap::new(),
    };
    let mut reported = false;
    loop {
        match nodeplane_pubsub::open(&spec, &rt.opts.state_dir).await {
            Ok(b) => return b,
            Err(e) => {
                tracing::error!(error = %e, "input bindings' firing log cannot be opened; trying again");
                if !reported {
                    rt.report_problem(format!("input bindings' firing log: {e}"));
                    reported = true;
                }
                tokio::time::sleep(LOG_RETRY).await;
            }
        }
    }
}

struct Ctx {
    rt: Arc<Runtime>,
    /// Where firings wait until the app has them.
    log: Arc<dyn Broker>,
    /// This schedule's topic in the log.
    topic: String,
    /// Firings in the log not yet settled (by this instance).
    pending: AtomicUsize,
    ns: String,
    app: String,
    /// The component's name, for messages.
    name: String,
    cron: Arc<CronBinding>,
    /// Round-robin position over the app's local pods.
    next: AtomicUsize,
    /// Whether a pod (by key and addresses) listens on the route.
    listens: Mutex<HashMap<(String, Vec<IpAddr>), bool>>,
}

/// Fires on the schedule until `stop` is dropped: joins the log first (a
/// new group sees only what is appended after it joined), then appends
/// each firing, while [`consume`] delivers them.
async fn schedule(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let Some(sub) = crate::delivery::join(ctx.log.as_ref(), &ctx.topic, &ctx.app, &mut stop).await
    else {
        return;
    };
    tokio::spawn(consume(ctx.clone(), sub, stop.clone()));
    let mut last = SystemTime::now();
    let mut seq: u64 = 0;
    loop {
        let Some(at) = ctx.cron.schedule.next(last) else {
            tracing::warn!(binding = %ctx.name, schedule = %ctx.cron.schedule_text, "the schedule never fires");
            return;
        };
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // `@every` counts from the planned time (no drift); a field
        // schedule from now, so a late wake-up never fires twice.
        last = match ctx.cron.schedule {
            Schedule::Every(_) => at,
            Schedule::Fields(_) => at.max(SystemTime::now()),
        };
        if ctx.pending.load(Ordering::Relaxed) >= IN_FLIGHT {
            tracing::warn!(app = %ctx.app, binding = %ctx.name,
                "firing skipped: {IN_FLIGHT} earlier firings are still being delivered");
            continue;
        }
        seq += 1;
        let stamp = go_time_utc(at);
        let msg = Message {
            id: format!("{}-{stamp}-{seq}", ctx.topic),
            topic: ctx.topic.clone(),
            data: Bytes::new(),
            content_type: "application/json".into(),
            metadata: BTreeMap::from([(READ_TIME.to_string(), stamp)]),
        };
        ctx.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = ctx.log.publish(msg).await {
            ctx.settled();
            tracing::warn!(error = %e, app = %ctx.app, binding = %ctx.name, "firing not recorded: skipped");
        }
    }
}

/// Delivers the schedule's firings from the log, [`IN_FLIGHT`] at a time,
/// until `stop`.
async fn consume(ctx: Arc<Ctx>, mut sub: Box<dyn Subscription>, mut stop: watch::Receiver<bool>) {
    let what = format!("input binding {} of app {}", ctx.name, ctx.app);
    crate::delivery::pump(sub.as_mut(), IN_FLIGHT, &mut stop, &what, |d| {
        let ctx = ctx.clone();
        async move { deliver(&ctx, d).await }
    })
    .await;
}

/// One delivery of a firing: acked once settled, else put back in the
/// log with the retry policy's delay.
async fn deliver(ctx: &Ctx, d: Delivery) {
    let policy = ctx.cron.retry;
    let Delivery {
        msg,
        attempt,
        token,
    } = d;
    let read_time = msg.metadata.get(READ_TIME).cloned().unwrap_or_default();
    let settled = match ctx.call(&read_time).await {
        Outcome::Success => token.ack().await,
        Outcome::Drop(why) => {
            tracing::debug!(app = %ctx.app, binding = %ctx.name, why = %why, "firing not delivered");
            token.ack().await
        }
        Outcome::Retry(why) if attempt >= policy.max_attempts => {
            tracing::warn!(app = %ctx.app, binding = %ctx.name, attempt, why = %why,
                "retry budget spent: firing dropped");
            token.ack().await
        }
        Outcome::Retry(why) => {
            tracing::debug!(app = %ctx.app, binding = %ctx.name, attempt, why = %why, "firing to retry");
            if let Err(e) = token.nack(policy.backoff(attempt)).await {
                tracing::warn!(error = %e, binding = %ctx.name, "putting a firing back failed (it comes again)");
            }
            return;
        }
    };
    ctx.settled();
    if let Err(e) = settled {
        tracing::warn!(error = %e, binding = %ctx.name, "settling a firing failed (it comes again)");
    }
}

/// Dapr's reading of the `OPTIONS` probe: 2xx or 405 (the route exists
/// but takes only POST) means the app listens.
fn listens(status: StatusCode) -> bool {
    status.is_success() || status == StatusCode::METHOD_NOT_ALLOWED
}

/// Dapr's reading of the app's answer to a firing.
fn outcome(status: StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Success
    } else if status == StatusCode::NOT_FOUND {
        Outcome::Drop("the app answered 404".into())
    } else {
        Outcome::Retry(format!("the app answered {status}"))
    }
}

impl Ctx {
    /// One firing fewer waits (those recovered after a restart were never
    /// counted, hence saturating).
    fn settled(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Whether `pod` listens on the route (asked once per pod).
    async fn probe(&self, pod: &AppPod, addr: std::net::SocketAddr) -> Result<bool, String> {
        if self.cron.directions.explicit && self.cron.directions.input {
            return Ok(true);
        }
        let k = (pod.key(), pod.ips.clone());
        if let Some(v) = self
            .listens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&k)
        {
            return Ok(*v);
        }
        let req = Request::builder()
            .method(Method::OPTIONS)
            .uri(&self.cron.route)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(crate::server::full(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let (status, _) = crate::delivery::post(&self.rt, addr, req, PROBE_TIMEOUT)
            .await
            .map_err(|e| format!("OPTIONS {} on pod {}: {e}", self.cron.route, pod.key()))?;
        let yes = listens(status);
        if !yes {
            tracing::info!(app = %self.app, pod = %pod.key(), binding = %self.name, route = %self.cron.route, %status,
                "the app does not listen on the input binding's route: no firings to this pod");
        }
        self.listens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k, yes);
        Ok(yes)
    }

    /// One POST to a ready local pod of the app that listens on the route.
    async fn call(&self, read_time: &str) -> Outcome {
        let pods = crate::delivery::local_pods(&self.rt, &self.ns, &self.app).len();
        if pods == 0 {
            return Outcome::Retry("no ready pod of the app on this node".into());
        }
        let mut target = None;
        for _ in 0..pods {
            let turn = self.next.fetch_add(1, Ordering::Relaxed);
            let (pod, addr) = match crate::delivery::local_pod(&self.rt, &self.ns, &self.app, turn)
            {
                Ok(p) => p,
                Err(why) => return Outcome::Retry(why),
            };
            match self.probe(&pod, addr).await {
                Ok(true) => {
                    target = Some((pod, addr));
                    break;
                }
                Ok(false) => continue,
                Err(why) => return Outcome::Retry(why),
            }
        }
        let Some((pod, addr)) = target else {
            return Outcome::Drop(format!(
                "no pod of app {} listens on {}",
                self.app, self.cron.route
            ));
        };
        let req = Request::post(&self.cron.route)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("traceparent", crate::trace::next(None))
            .header("timeZone", "UTC")
            .header("readTimeUTC", read_time)
            .body(crate::server::full(Bytes::new()));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Drop(format!("route {:?}: {e}", self.cron.route)),
        };
        // Answered before the log would hand the firing out again.
        let limit = self
            .log
            .ack_timeout()
            .map_or(Duration::from_secs(60), |t| t * 3 / 4);
        match crate::delivery::post(&self.rt, addr, req, limit).await {
            Err(e) => Outcome::Retry(format!("pod {}: {e}", pod.key())),
            Ok((status, _)) => outcome(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_dapr_reads_them() {
        assert!(listens(StatusCode::OK));
        assert!(listens(StatusCode::NO_CONTENT));
        assert!(listens(StatusCode::METHOD_NOT_ALLOWED));
        assert!(!listens(StatusCode::NOT_FOUND));
        assert!(!listens(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(outcome(StatusCode::OK), Outcome::Success);
        assert_eq!(outcome(StatusCode::ACCEPTED), Outcome::Success);
        assert!(matches!(outcome(StatusCode::NOT_FOUND), Outcome::Drop(_)));
        assert!(matches!(
            outcome(StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::Retry(_)
        ));
    }
}
