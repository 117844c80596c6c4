//! Dapr's Components and Configurations (`dapr.io/v1alpha1`) and
//! Subscriptions (`dapr.io/v2alpha1`) from the Kubernetes API, for the app
//! runtime (Dapr's Kubernetes mode reads them the same way, from these
//! three custom resources).
//!
//! Subscriptions are read at `v2alpha1`, Dapr's storage version. When the
//! CRD serves `v1alpha1` too, the API server hands those objects out
//! converted: through Dapr's conversion webhook where Dapr is installed
//! (`route` becomes `routes.default`), or relabelled as they are with this
//! project's CRD (conversion `None`), whose `route` the runtime reads too.
//!
//! Each kind is followed cluster-wide by a kube-runtime [`watcher`] over
//! [`DynamicObject`]s, with the same list-then-watch, resume and relist
//! handling as the policy source ([`super::kube`]). The current objects,
//! keyed by (namespace, name), are published as one
//! [`ApiComponents`] after the initial list, after each relist's end (so
//! objects deleted while the watch was away are gone) and after every
//! single change. The runtime reads them exactly as it reads manifest
//! files.
//!
//! The CRDs may not be installed (no Dapr in the cluster): a kind the API
//! server does not serve is reported in [`ApiComponents::problems`] (the
//! runtime's `/status` problems), counts as answered so the runtime does
//! not wait for it to be ready, counts as complete (no CRD, no objects) so
//! it holds nothing back (a cluster may well have the Component CRD but
//! not the Subscription one), and is retried with the watcher's backoff
//! until the CRD appears.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use nodeplane_runtime::components::{ApiComponents, Labelled};
use serde_json::Value;
use tokio::sync::watch;

/// The API group and version of Dapr's Components and Configurations.
pub const API_VERSION: &str = "dapr.io/v1alpha1";
/// The version Subscriptions are read at (Dapr's storage version; the
/// runtime's parser reads both forms, see the module doc).
pub const SUBSCRIPTION_API_VERSION: &str = "dapr.io/v2alpha1";
/// The CRDs for clusters without Dapr installed.
pub const CRD_MANIFEST: &str = "deploy/daemonset/dapr-crds.yaml";
/// The agent's read access to them.
pub const RBAC_MANIFEST: &str = "deploy/daemonset/rbac-dapr.yaml";

/// The watched kinds, in the order their documents are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DaprKind {
    Component,
    Configuration,
    Subscription,
}

/// How many kinds are watched.
const KINDS: usize = 3;

impl DaprKind {
    const ALL: [DaprKind; KINDS] = [
        DaprKind::Component,
        DaprKind::Configuration,
        DaprKind::Subscription,
    ];

    fn kind(self) -> &'static str {
        match self {
            DaprKind::Component => "Component",
            DaprKind::Configuration => "Configuration",
            DaprKind::Subscription => "Subscription",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            DaprKind::Component => "components",
            DaprKind::Configuration => "configurations",
            DaprKind::Subscription => "subscriptions",
        }
    }

    /// `group/version`, as read and as set on the published documents.
    fn api_version(self) -> &'static str {
        match self {
            DaprKind::Component | DaprKind::Configuration => API_VERSION,
            DaprKind::Subscription => SUBSCRIPTION_API_VERSION,
        }
    }

    fn version(self) -> &'static str {
        let api = self.api_version();
        api.split_once('/').map_or(api, |(_, v)| v)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("dapr.io", self.version(), self.kind()),
            self.plural(),
        )
    }
}

/// What is known of one kind.
#[derive(Debug, Default)]
struct Known {
    objects: BTreeMap<(String, String), Value>,
    /// Listed once, or failed to be listed once.
    answered: bool,
    /// Listed once, or answered 404 (no CRD, so no objects): `objects` is
    /// all there is (or was at the last list).
    complete: bool,
    /// Why it cannot be listed now.
    problem: Option<String>,
}

impl Known {
    /// The kind cannot be listed now, for `problem`; `absent`: because it
    /// is not served at all (404).
    fn failed(&mut self, problem: String, absent: bool) {
        self.answered = true;
        self.complete |= absent;
        if absent {
            // No CRD, no objects (deleting a CRD deletes its objects).
            self.objects.clear();
        }
        self.problem = Some(problem);
    }
}

/// Every kind, and where their sum is published.
struct Shared {
    kinds: Mutex<[Known; KINDS]>,
    tx: watch::Sender<ApiComponents>,
}

impl Shared {
    /// Changes what is known of `kind` and publishes the sum if it changed.
    fn update(&self, kind: DaprKind, change: impl FnOnce(&mut Known)) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut kinds[kind.index()]);
        let mut next = ApiComponents {
            settled: kinds.iter().all(|k| k.answered),
            // Only the kinds that can define a store or a pub/sub hold back
            // the defaults: Subscriptions cannot, so an agent that may not
            // read them (RBAC not yet updated) still serves the defaults.
            complete: DaprKind::ALL
                .iter()
                .filter(|k| **k != DaprKind::Subscription)
                .all(|k| kinds[k.index()].complete),
            ..ApiComponents::default()
        };
        for k in DaprKind::ALL {
            let known = &kinds[k.index()];
            next.docs
                .extend(known.objects.iter().map(|((ns, name), v)| -> Labelled {
                    (format!("API {} {ns}/{name}", k.kind()), v.clone())
                }));
            next.problems.extend(known.problem.clone());
        }
        drop(kinds);
        self.tx.send_if_modified(|cur| {
            let changed = *cur != next;
            if changed {
                *cur = next;
            }
            changed
        });
    }
}

/// Follows Components, Configurations and Subscriptions and publishes them
/// to `tx` until every receiver is gone. API errors never end it (see the module doc).
pub async fn run(client: Client, tx: watch::Sender<ApiComponents>) {
    let shared = Shared {
        kinds: Mutex::new(Default::default()),
        tx,
    };
    let watches = async {
        tokio::join!(
            follow(&client, DaprKind::Component, &shared),
            follow(&client, DaprKind::Configuration, &shared),
            follow(&client, DaprKind::Subscription, &shared),
        )
    };
    // Nothing is sent on a quiet cluster, so also wait for the close.
    tokio::select! {
        _ = watches => {}
        () = shared.tx.closed() => {}
    }
}

/// Follows one kind, forever.
async fn follow(client: &Client, kind: DaprKind, shared: &Shared) {
    let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource());
    // Paces the relists this function starts itself, as in `super::kube`.
    let mut relist_backoff = DefaultBackoff::default();
    loop {
        let mut events = std::pin::pin!(
            watcher::watcher(api.clone(), watcher::Config::default()).default_backoff()
        );
        // The objects of a list in progress: they replace the known ones
        // only when the list is complete.
        let mut listing: Option<BTreeMap<(String, String), Value>> = None;
        while let Some(item) = events.next().await {
            match item {
                Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    let (key, doc) = document(kind, o);
                    listing.get_or_insert_default().insert(key, doc);
                }
                Ok(watcher::Event::InitDone) => {
                    let objects = listing.take().unwrap_or_default();
                    tracing::info!(
                        kind = kind.kind(),
                        count = objects.len(),
                        "Dapr {} listed",
                        kind.plural()
                    );
                    shared.update(kind, |k| {
                        k.objects = objects;
                        k.answered = true;
                        k.complete = true;
                        k.problem = None;
                    });
                }
                Ok(watcher::Event::Apply(o)) => {
                    let (key, doc) = document(kind, o);
                    shared.update(kind, |k| {
                        k.objects.insert(key, doc);
                    });
                }
                Ok(watcher::Event::Delete(o)) => {
                    let (key, _) = document(kind, o);
                    shared.update(kind, |k| {
                        k.objects.remove(&key);
                    });
                }
                Err(e) => {
                    let problem = problem(kind, &e);
                    let absent = status_code(&e) == Some(404);
                    if let Some(p) = &problem {
                        shared.update(kind, |k| k.failed(p.clone(), absent));
                    }
                    // A CRD deleted while watched answers the watch with
                    // 404: list again (the list reports the problem).
                    let relist = super::kube::needs_relist(&e) || absent;
                    tracing::warn!(
                        kind = kind.kind(),
                        error = %e,
                        problem = problem.as_deref().unwrap_or(""),
                        "Dapr {} watch failed; retrying",
                        kind.plural()
                    );
                    if relist {
                        break;
                    }
                    // Otherwise the watcher recovers on the next poll,
                    // after its backoff.
                }
            }
        }
        let delay = relist_backoff.next().unwrap_or(Duration::from_secs(30));
        tokio::time::sleep(delay).await;
    }
}

/// The object's key, and the object as the runtime reads it: JSON with its
/// `apiVersion` and `kind` (list items may come without them).
fn document(kind: DaprKind, obj: DynamicObject) -> ((String, String), Value) {
    let key = (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    );
    let mut doc = serde_json::to_value(&obj).unwrap_or_default();
    if let Some(m) = doc.as_object_mut() {
        m.insert("apiVersion".into(), kind.api_version().into());
        m.insert("kind".into(), kind.kind().into());
    }
    (key, doc)
}

fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// What a failure means to a user, when it keeps the kind from being
/// read: a list that fails, or a watch refused for good (no CRD, no RBAC).
/// A watch that merely broke is no problem; the watcher resumes it.
fn problem(kind: DaprKind, e: &watcher::Error) -> Option<String> {
    let what = format!("{} {}", kind.api_version(), kind.plural());
    let listing = matches!(e, watcher::Error::InitialListFailed(_));
    match status_code(e) {
        Some(404) => Some(format!(
            "{what}: not served by the API server (is the Dapr CRD installed? see {CRD_MANIFEST}); serving without them, retrying"
        )),
        Some(403) => Some(format!(
            "{what}: the agent may not read them (see {RBAC_MANIFEST}); serving without them, retrying"
        )),
        _ if listing => Some(format!("{what}: cannot be listed ({e}); retrying")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_carry_their_kind_namespace_and_data() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cache", "namespace": "shop"},
            "spec": {"type": "state.redis"},
            "scopes": ["orders"],
        }))
        .expect("object");
        let ((ns, name), doc) = document(DaprKind::Component, obj);
        assert_eq!((ns.as_str(), name.as_str()), ("shop", "cache"));
        assert_eq!(doc["apiVersion"], API_VERSION);
        assert_eq!(doc["kind"], "Component");
        assert_eq!(doc["metadata"]["namespace"], "shop");
        assert_eq!(doc["spec"]["type"], "state.redis");
        assert_eq!(doc["scopes"][0], "orders");
    }

    #[test]
    fn subscriptions_are_read_and_published_at_v2alpha1() {
        let r = DaprKind::Subscription.resource();
        assert_eq!(
            (r.group.as_str(), r.version.as_str(), r.plural.as_str()),
            ("dapr.io", "v2alpha1", "subscriptions")
        );
        assert_eq!(r.api_version, SUBSCRIPTION_API_VERSION);
        let r = DaprKind::Configuration.resource();
        assert_eq!(r.api_version, API_VERSION);
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"pubsubname": "pubsub", "topic": "orders", "routes": {"default": "/orders"}},
        }))
        .expect("object");
        let (_, doc) = document(DaprKind::Subscription, obj);
        assert_eq!(doc["apiVersion"], "dapr.io/v2alpha1");
        assert_eq!(doc["kind"], "Subscription");
        assert_eq!(doc["spec"]["routes"]["default"], "/orders");
    }

    #[test]
    fn subscriptions_never_hold_back_the_defaults() {
        let (tx, rx) = watch::channel(ApiComponents::default());
        let shared = Shared {
            kinds: Mutex::new(Default::default()),
            tx,
        };
        for kind in [DaprKind::Component, DaprKind::Configuration] {
            shared.update(kind, |k| {
                k.answered = true;
                k.complete = true;
            });
        }
        // Subscriptions not answered yet: not settled, but complete, since
        // a Subscription defines no store or pub/sub.
        assert!(!rx.borrow().settled && rx.borrow().complete);
        let refused = watcher::Error::InitialListFailed(kube::Error::Api(
            kube::core::Status::failure("x", "Forbidden")
                .with_code(403)
                .boxed(),
        ));
        let p = problem(DaprKind::Subscription, &refused).expect("a problem");
        shared.update(DaprKind::Subscription, |k| {
            k.failed(p, status_code(&refused) == Some(404))
        });
        {
            let now = rx.borrow();
            assert!(now.settled && now.complete, "403 (old RBAC): {now:?}");
        }
        let absent = watcher::Error::InitialListFailed(kube::Error::Api(
            kube::core::Status::failure("x", "NotFound")
                .with_code(404)
                .boxed(),
        ));
        let p = problem(DaprKind::Subscription, &absent).expect("a problem");
        shared.update(DaprKind::Subscription, |k| {
            k.failed(p, status_code(&absent) == Some(404))
        });
        let now = rx.borrow();
        assert!(now.settled && now.complete, "{now:?}");
        assert_eq!(now.problems.len(), 1);
        assert!(
            now.problems[0].starts_with("dapr.io/v2alpha1 subscriptions: not served"),
            "{:?}",
            now.problems
        );
    }

    #[test]
    fn problems_say_what_to_install_and_broken_watches_are_none() {
        let api = |code| {
            kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            )
        };
        let list = |code| watcher::Error::InitialListFailed(api(code));
        let p = problem(DaprKind::Component, &list(404)).expect("a problem");
        assert!(
            p.starts_with("dapr.io/v1alpha1 components: not served") && p.contains(CRD_MANIFEST),
            "{p}"
        );
        let p = problem(DaprKind::Configuration, &list(403)).expect("a problem");
        assert!(
            p.starts_with("dapr.io/v1alpha1 configurations:") && p.contains(RBAC_MANIFEST),
            "{p}"
        );
        let p = problem(DaprKind::Component, &list(500)).expect("a problem");
        assert!(p.contains("cannot be listed"), "{p}");
        let p = problem(
            DaprKind::Component,
            &watcher::Error::WatchStartFailed(api(404)),
        );
        assert!(p.is_some_and(|p| p.contains("not served")));
        let broken = watcher::Error::WatchFailed(api(500));
        assert_eq!(problem(DaprKind::Component, &broken), None);
    }
}
