//! The shared per-node app runtime (issue 6): one process serves the Dapr
//! v1.0 HTTP API to every pod on the node, instead of a sidecar per pod.
//!
//! - [`server`]: TCP on the pods' gateway address and HTTP over a unix
//!   socket; each request's caller comes from the kernel (source address
//!   or socket peer credentials), never from a header.
//! - [`invoke`]: service invocation; [`state_api`]: the state API over
//!   [`nodeplane_state`] stores; [`acl`]: Dapr access control.
//! - [`pubsub_api`]: publishing; [`subscriptions`] and [`delivery`]:
//!   what apps subscribe to and delivering to them, over
//!   [`nodeplane_pubsub`] brokers.
//! - [`config_api`]: the configuration API over [`config_store`] stores.
//! - [`bindings`]: output bindings (`/v1.0/bindings/{name}`) and input
//!   bindings (cron schedules delivered to the apps).
//! - [`directory`]: pods and app ids (fed by the agent's model);
//!   [`components`]: Dapr Component / Configuration / Subscription
//!   manifests.
//! - [`lock_api`]: distributed locks over [`nodeplane_state::lock`];
//!   [`secrets`]: secret stores and the secrets API.

pub mod acl;
pub mod bindings;
pub mod components;
pub mod config_api;
pub mod config_store;
pub mod dapr;
pub mod delivery;
pub mod directory;
mod error;
pub mod invoke;
pub mod lock_api;
pub mod mesh;
pub mod metrics;
pub mod peer;
pub mod pool;
pub mod pubsub_api;
pub mod secrets;
pub mod server;
pub mod state_api;
pub mod subscriptions;
pub mod trace;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Response, StatusCode};
use tokio::sync::watch;

pub use error::{Error, Result};
pub use secrets::Secrets;

use components::Registry;
use directory::Directory;
use server::{Body, Caller};

/// The port Dapr SDKs use by default (`DAPR_HTTP_PORT`).
pub const DEFAULT_PORT: u16 = 3500;
/// The unix socket's file name in the runtime directory.
pub const SOCKET_NAME: &str = "runtime.sock";

#[derive(Debug, Clone)]
pub struct Options {
    /// A directory of Component and Configuration manifests (None: none;
    /// the API's objects come through [`Runtime::start_components`]).
    pub components_dir: Option<PathBuf>,
    /// Where embedded stores keep their files.
    pub state_dir: PathBuf,
    /// How long an invocation waits for the target's response headers.
    pub invoke_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Maps a container (or sandbox) id to its pod: the agent answers from
/// what the CRI shim reported, for callers on the unix socket.
pub trait Containers: Send + Sync + std::fmt::Debug {
    /// (namespace, name) of the pod running container `id`.
    fn pod_of(&self, id: &str) -> Option<(String, String)>;
}

/// The runtime's shared state: one per node, used by every connection.
#[derive(Debug)]
pub struct Runtime {
    directory: watch::Receiver<Arc<Directory>>,
    registry: Arc<RwLock<Arc<Registry>>>,
    pub pool: Arc<pool::Pool>,
    pub metrics: metrics::Metrics,
    pub opts: Options,
    ready: AtomicBool,
    containers: Option<Arc<dyn Containers>>,
    /// Connections to other nodes' agents (None: same-node only).
    pub peers: Option<mesh::Peers>,
    /// What the runtime could not set up (a listener, TLS), for status.
    problems: std::sync::Mutex<Vec<String>>,
    /// The API's components, when they are a source: their current
    /// problems (CRD not installed) are part of [`Runtime::problems`].
    api: std::sync::OnceLock<watch::Receiver<components::ApiComponents>>,
    /// What the delivery task subscribes to now (for metadata).
    pubsub_status: std::sync::Mutex<delivery::Status>,
    /// Configuration subscriptions (pushes of store changes to pods).
    pub(crate) config_subs: config_api::Subscriptions,
    /// Subscriptions joined at the broker (tasks per key).
    subscribed: std::sync::Mutex<std::collections::BTreeMap<delivery::Key, usize>>,
    /// The Kubernetes Secrets (set by [`Runtime::set_secrets`]).
    secrets: std::sync::OnceLock<Arc<dyn Secrets>>,
}

impl Runtime {
    pub fn new(
        opts: Options,
        directory: watch::Receiver<Arc<Directory>>,
        containers: Option<Arc<dyn Containers>>,
        peers: Option<mesh::Peers>,
    ) -> Arc<Runtime> {
        Arc::new(Runtime {
            directory,
            registry: Arc::new(RwLock::new(Arc::new(Registry::default()))),
            pool: pool::Pool::new(opts.connect_timeout),
            metrics: metrics::Metrics::default(),
            opts,
            ready: AtomicBool::new(false),
            containers,
            peers,
            problems: std::sync::Mutex::new(Vec::new()),
            api: std::sync::OnceLock::new(),
            pubsub_status: std::sync::Mutex::new(delivery::Status::default()),
            config_subs: config_api::Subscriptions::default(),
            subscribed: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            secrets: std::sync::OnceLock::new(),
        })
    }

    /// Gives the runtime the node's Kubernetes Secrets (for
    /// `secretstores.kubernetes` and `secretKeyRef`); call it before
    /// [`Runtime::start_components`]. A second call is ignored.
    pub fn set_secrets(&self, secrets: Arc<dyn Secrets>) {
        let _ = self.secrets.set(secrets);
    }

    /// The Kubernetes Secrets, if the agent gave any.
    pub fn secrets(&self) -> Option<Arc<dyn Secrets>> {
        self.secrets.get().cloned()
    }

    /// Reads the components now and keeps them current, from the
    /// directory in [`Options::components_dir`] and, when given, the
    /// Kubernetes API's objects as the agent publishes them. The runtime is
    /// ready once the first read is done; with the API, that read waits
    /// for its first answer, success or failure (at most
    /// [`components::API_WAIT`]).
    pub async fn start_components(
        self: &Arc<Self>,
        every: Duration,
        api: Option<watch::Receiver<components::ApiComponents>>,
    ) {
        if let Some(rx) = &api {
            let _ = self.api.set(rx.clone());
        }
        let sources = components::Sources {
            dir: self.opts.components_dir.clone(),
            api,
        };
        // With the API as a source the agent runs in Kubernetes mode.
        let ctx = secrets::SecretsContext {
            provider: self.secrets(),
            kubernetes: sources.api.is_some(),
            base_dir: self.opts.components_dir.clone(),
        };
        let (state, target) = (self.opts.state_dir.clone(), self.registry.clone());
        let (tx, loaded) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = components::watch_with(sources, state, target, every, tx, ctx).await {
                tracing::error!(error = %e, "app runtime components no longer reloaded");
            }
        });
        // Ready once the first read is in (or the reader failed to start).
        let _ = loaded.await;
        tokio::spawn(delivery::run(self.clone()));
        tokio::spawn(bindings::input::run(self.clone()));
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Records something the runtime could not set up.
    pub fn report_problem(&self, p: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }

    /// What the runtime could not set up, and what keeps a component
    /// source from being read now.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(api) = self.api.get() {
            p.extend(api.borrow().problems.iter().cloned());
        }
        p
    }

    /// The pod running container `id`, by the shim's report.
    pub fn pod_of_container(&self, id: &str) -> Option<(String, String)> {
        self.containers.as_ref()?.pod_of(id)
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.directory.borrow().clone()
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Ready, and every state store answers.
    pub async fn outbound_ready(&self) -> bool {
        if !self.is_ready() {
            return false;
        }
        for c in self.registry().stores.values() {
            if c.store.ping().await.is_err() {
                return false;
            }
        }
        for c in self.registry().pubsubs.values() {
            if c.broker.ping().await.is_err() {
                return false;
            }
        }
        for c in self.registry().locks.values() {
            if c.store.ping().await.is_err() {
                return false;
            }
        }
        true
    }

    fn is_subscribed(&self, k: &delivery::Key) -> bool {
        self.subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(k)
            .is_some_and(|n| *n > 0)
    }

    /// Counts a subscription task joined (`+1`) or gone (`-1`).
    pub(crate) fn count_subscribed(&self, k: &delivery::Key, joined: bool) {
        let mut m = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(k.clone()).or_insert(0);
        if joined {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(k);
            }
        }
    }

    /// `/v1.0/metadata`, for the calling app.
    pub fn metadata(&self, caller: &Caller) -> Response<Body> {
        let reg = self.registry();
        let entry = |spec: &nodeplane_state::ComponentSpec, caps: &[&str]| {
            serde_json::json!({
                "name": spec.name,
                "type": spec.kind,
                "version": spec.version,
                "capabilities": caps,
            })
        };
        let (app, ns) = (caller.app_id(), caller.namespace());
        let components: Vec<serde_json::Value> = reg
            .visible_stores(app, ns)
            .into_iter()
            .map(|c| entry(&c.spec, &["ETAG", "TRANSACTIONAL", "TTL"]))
            .chain(
                reg.visible_pubsubs(app, ns)
                    .into_iter()
                    .map(|c| entry(&c.spec, &[])),
            )
            .chain(
                reg.visible_config_stores(app, ns)
                    .into_iter()
                    .map(|c| entry(&c.spec, &[])),
            )
            .chain(
                reg.visible_bindings(app, ns)
                    .into_iter()
                    .map(|c| entry(&c.spec, &[])),
            )
            .chain(
                reg.visible_locks(app, ns)
                    .into_iter()
                    .map(|c| entry(&c.spec, &[])),
            )
            .chain(
                reg.visible_secret_stores(app, ns)
                    .into_iter()
                    .map(|c| entry(&c.spec, &[])),
            )
            .collect();
        let me = (
            caller.namespace().unwrap_or("").to_string(),
            caller.app_id().unwrap_or("").to_string(),
        );
        let status = self
            .pubsub_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let subscriptions: Vec<serde_json::Value> = status
            .active
            .iter()
            .filter(|((ns, app, _, _), _)| (ns, app) == (&me.0, &me.1))
            // Only those joined at the broker: a message published from
            // now on reaches them.
            .filter(|(k, _)| self.is_subscribed(k))
            .map(|(_, (s, declarative))| {
                serde_json::json!({
                    "pubsubname": s.pubsub,
                    "topic": s.topic,
                    "deadLetterTopic": s.dead_letter.clone().unwrap_or_default(),
                    "metadata": if s.raw { serde_json::json!({"rawPayload": "true"}) } else { serde_json::json!({}) },
                    "rules": s.routes.rules.iter().map(|r| serde_json::json!({"match": r.text, "path": r.path})).chain(
                        s.routes.default.iter().map(|d| serde_json::json!({"match": "", "path": d}))
                    ).collect::<Vec<_>>(),
                    "type": if *declarative { "DECLARATIVE" } else { "PROGRAMMATIC" },
                })
            })
            .collect();
        let subscription_errors = status.errors.get(&me).cloned().unwrap_or_default();
        let port = match caller {
            Caller::Pod(p) => p.app_port,
            _ => None,
        };
        let body = serde_json::json!({
            "id": caller.app_id().unwrap_or(""),
            "runtimeVersion": concat!("nodeplane-", env!("CARGO_PKG_VERSION")),
            "enabledFeatures": [],
            "components": components,
            "subscriptions": subscriptions,
            "extended": {
                "caller": caller.describe(),
                "configurations": reg.config_names(caller.namespace().unwrap_or("")),
                "componentErrors": reg.errors,
                "subscriptionErrors": subscription_errors,
            },
            "appConnectionProperties": {
                "port": port,
                "protocol": "http",
            },
        });
        dapr::json_response(StatusCode::OK, body.to_string().into())
    }
}
