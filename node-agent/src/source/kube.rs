//! The Kubernetes API source: kube-rs watches of Pods, Namespaces,
//! NetworkPolicies and this Node, turned into [`super::Event`]s.
//!
//! Each kind is followed by one kube-runtime [`watcher`], which does the
//! list-then-watch dance of client-go's reflector: a paginated list, then a
//! watch from the list's resourceVersion, resumed from the last seen version
//! (or bookmark) when the server ends the stream, and a fresh list when the
//! server says that version is gone (410). A fresh list is what
//! [`Event::Reset`] … [`Event::Synced`] means to the model: objects missing
//! from it were deleted while we were not looking.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::Sender;

use super::{Event, Kind, Object};
use crate::{Error, Result};

/// Watches the four kinds concurrently and sends their events to `tx` until
/// the receiver is dropped. API errors never end it: every watcher retries
/// with client-go's backoff (0.8 s doubling to 30 s, with jitter) and
/// relists when its resourceVersion has expired, so the agent keeps its last
/// picture of the cluster while the API server is away.
pub async fn run(client: Client, node_name: String, tx: Sender<Event>) -> Result<()> {
    if node_name.is_empty() {
        // "metadata.name=" would select no Node at all, silently.
        return Err(Error::Kube("the node name is empty".into()));
    }
    // Bookmarks are on by default in watcher::Config; they are what lets a
    // watch on a quiet kind (this Node, NetworkPolicies) resume after the
    // server's timeout without its resourceVersion having expired.
    let all = watcher::Config::default();
    // Only this node's Node: its podCIDRs are all the model takes, and
    // watching every Node would wake every agent on every Node status
    // update in the cluster.
    let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let watches = async {
        tokio::join!(
            follow::<Pod>(&client, all.clone(), &tx),
            follow::<Namespace>(&client, all.clone(), &tx),
            follow::<NetworkPolicy>(&client, all, &tx),
            follow::<Node>(&client, this_node, &tx),
        )
    };
    // A watcher only notices a dropped receiver when it next has an event to
    // send, which on a quiet cluster may be never: also wait for the close.
    tokio::select! {
        _ = watches => {}
        () = tx.closed() => {}
    }
    Ok(())
}

/// A watched API type and the [`Object`] it becomes.
trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + 'static {
    const KIND: Kind;
    fn wrap(self) -> Object;
}

impl Watched for Pod {
    const KIND: Kind = Kind::Pod;
    fn wrap(self) -> Object {
        Object::Pod(Box::new(self))
    }
}

impl Watched for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn wrap(self) -> Object {
        Object::Namespace(Box::new(self))
    }
}

impl Watched for NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    fn wrap(self) -> Object {
        Object::NetworkPolicy(Box::new(self))
    }
}

impl Watched for Node {
    const KIND: Kind = Kind::Node;
    fn wrap(self) -> Object {
        Object::Node(Box::new(self))
    }
}

/// Follows one kind until the receiver is dropped.
async fn follow<K>(client: &Client, config: watcher::Config, tx: &Sender<Event>)
where
    K: Watched<DynamicType = ()>,
{
    let api = Api::<K>::all(client.clone());
    let kind = K::KIND;
    // Paces the relists this function starts itself (see `needs_relist`),
    // the way the watcher's own backoff paces its retries.
    let mut relist_backoff = DefaultBackoff::default();
    loop {
        // A new watcher starts with a list (watcher::Event::Init).
        let mut events =
            std::pin::pin!(watcher::watcher(api.clone(), config.clone()).default_backoff());
        while let Some(item) = events.next().await {
            let event = match item {
                Ok(event) => event,
                Err(e) if needs_relist(&e) => {
                    tracing::warn!(kind = kind.name(), error = %e, "resourceVersion expired; relisting after backoff");
                    break;
                }
                Err(e) => {
                    // The watcher recovers by itself on the next poll, after
                    // the backoff: resumes the watch, or relists on a 410
                    // WatchEvent ERROR.
                    tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                    continue;
                }
            };
            let event = match event {
                watcher::Event::Init => Event::Reset(kind),
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => Event::Apply(o.wrap()),
                watcher::Event::InitDone => Event::Synced(kind),
                watcher::Event::Delete(o) => Event::Delete(o.wrap().key()),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let delay = relist_backoff.next().unwrap_or(Duration::from_secs(30));
        tokio::time::sleep(delay).await;
    }
}

/// A 410 Gone that kube-runtime's watcher would not turn into a relist.
///
/// The watcher relists on a 410 that arrives as a WatchEvent ERROR inside
/// the stream. But when the watch request itself is answered with HTTP 410
/// (the other way the API conventions allow for an expired resourceVersion,
/// and the one client-go's reflector also relists on), kube-runtime 5.0.0
/// stays in its "listed" state and retries the watch from the same expired
/// version forever, with backoff, never relisting (seen against the test
/// double in tests/kube_source.rs). The only way into a relist from outside
/// is a new watcher.
pub(crate) fn needs_relist(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// A client for the API server at `url`, with no credentials: for
/// `kubectl proxy`, an API server's insecure port in a lab, or a test
/// double. `--kube-api` takes this URL.
pub async fn client_from_url(url: &str) -> Result<Client> {
    let uri = url
        .parse()
        .map_err(|e| Error::Kube(format!("API server URL {url:?}: {e}")))?;
    Client::try_from(kube::Config::new(uri))
        .map_err(|e| Error::Kube(format!("client for {url}: {e}")))
}

/// A client configured the usual way. Inside a pod (the DaemonSet) the
/// service account is used first, even when a kubeconfig happens to be
/// reachable through a host mount, since the DaemonSet's RBAC is what the
/// agent is deployed with; elsewhere (a developer's machine) the kubeconfig
/// from `KUBECONFIG` or `~/.kube/config`.
pub async fn client_default() -> Result<Client> {
    let config = match kube::Config::incluster() {
        Ok(config) => config,
        Err(in_cluster) => kube::Config::infer().await.map_err(|e| {
            Error::Kube(format!(
                "no in-cluster configuration ({in_cluster}) and no kubeconfig ({e})"
            ))
        })?,
    };
    Client::try_from(config).map_err(|e| Error::Kube(format!("client: {e}")))
}
