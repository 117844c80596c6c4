//! Dapr `Component` and `Configuration` manifests (apiVersion
//! `dapr.io/v1alpha1`) from a directory, re-read when a file changes, and
//! from the Kubernetes API (the agent watches the objects and hands them
//! over as [`ApiComponents`]). Both go through the same reading
//! ([`reload`]), so a manifest means the same wherever it comes from.
//!
//! Other documents in the directory (the agent's Pods, Namespaces,
//! NetworkPolicies) are left to the agent. A state component keeps its
//! open store across reloads while its spec is unchanged, so a reload
//! never drops connections or reopens an embedded database for nothing.
//! A component that cannot be opened is reported and skipped; the others
//! stay in service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodeplane_state::{ComponentSpec, Store};
use serde_json::Value;

use crate::acl::AccessControl;
use crate::secrets::{SecretComponent, SecretsContext, DEFAULT_SECRET_STORE};
use crate::{Error, Result};

/// The state store every app gets without any component: Dapr's usual
/// name, backed by the embedded store under the agent's state directory.
pub const DEFAULT_STORE: &str = "statestore";

/// The pub/sub every app gets without any component (Dapr's usual name),
/// an embedded log under the agent's state directory; held back like
/// [`DEFAULT_STORE`] while the API's list is incomplete.
pub const DEFAULT_PUBSUB: &str = "pubsub";

/// How keys of a store are scoped (metadata `keyPrefix`, as in Dapr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPrefix {
    /// `app-id||key` (Dapr's default).
    AppId,
    /// `namespace.app-id||key`.
    Namespace,
    /// `store-name||key`: shared by every app using the store.
    Name,
    /// The key as given: shared.
    None,
    /// `prefix||key`: shared under a fixed prefix.
    Custom(String),
}

impl KeyPrefix {
    fn parse(v: Option<&str>) -> KeyPrefix {
        match v.map(str::trim) {
            None | Some("") | Some("appid") => KeyPrefix::AppId,
            Some("namespace") => KeyPrefix::Namespace,
            Some("name") => KeyPrefix::Name,
            Some("none") => KeyPrefix::None,
            Some(other) => KeyPrefix::Custom(other.to_string()),
        }
    }

    /// Whether the prefix needs the caller's app id.
    pub fn needs_app_id(&self) -> bool {
        matches!(self, KeyPrefix::AppId | KeyPrefix::Namespace)
    }
}

/// One state store in service.
#[derive(Debug, Clone)]
pub struct StateComponent {
    pub spec: ComponentSpec,
    /// `metadata.namespace`: only apps in it may use the store.
    pub namespace: Option<String>,
    /// `scopes`: only these app ids may use it (empty: all).
    pub scopes: Vec<String>,
    pub key_prefix: KeyPrefix,
    pub store: Arc<dyn Store>,
}

/// May an app (`app`, `namespace`) use a component of `own` namespace
/// (None: any) and `scopes` (empty: every app)?
pub(crate) fn visible(
    own: Option<&str>,
    scopes: &[String],
    app: Option<&str>,
    namespace: Option<&str>,
) -> bool {
    own.is_none_or(|n| Some(n) == namespace)
        && (scopes.is_empty() || app.is_some_and(|a| scopes.iter().any(|s| s == a)))
}

/// What the registry's per-namespace lookup needs of a component.
trait Scoped {
    fn name(&self) -> &str;
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool;
}

impl StateComponent {
    /// May an app (`app`, `namespace`) use this store?
    pub fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        visible(self.namespace.as_deref(), &self.scopes, app, namespace)
    }
}

impl Scoped for StateComponent {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        StateComponent::visible_to(self, app, namespace)
    }
}

/// One pub/sub component in service.
#[derive(Debug, Clone)]
pub struct PubSubComponent {
    pub spec: ComponentSpec,
    pub namespace: Option<String>,
    pub scopes: Vec<String>,
    /// Topic scoping read from the metadata (`allowedTopics`,
    /// `publishingScopes`, `subscriptionScopes`).
    pub topics: crate::subscriptions::TopicScopes,
    /// Delivery retries read from the metadata.
    pub retry: crate::subscriptions::RetryPolicy,
    pub broker: Arc<dyn nodeplane_pubsub::Broker>,
}

impl PubSubComponent {
    pub fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        visible(self.namespace.as_deref(), &self.scopes, app, namespace)
    }
}

impl Scoped for PubSubComponent {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        PubSubComponent::visible_to(self, app, namespace)
    }
}

/// One configuration store in service.
#[derive(Debug, Clone)]
pub struct ConfigStoreComponent {
    pub spec: ComponentSpec,
    pub namespace: Option<String>,
    pub scopes: Vec<String>,
    pub store: Arc<dyn crate::config_store::ConfigStore>,
}

impl Scoped for ConfigStoreComponent {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        visible(self.namespace.as_deref(), &self.scopes, app, namespace)
    }
}

/// One lock store in service (`lock.*`).
#[derive(Debug, Clone)]
pub struct LockComponent {
    pub spec: ComponentSpec,
    pub namespace: Option<String>,
    pub scopes: Vec<String>,
    /// `keyPrefix`, as Dapr's lock stores read it (see [`crate::lock_api`]).
    pub key_prefix: KeyPrefix,
    pub store: Arc<dyn nodeplane_state::lock::LockStore>,
}

impl Scoped for LockComponent {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        visible(self.namespace.as_deref(), &self.scopes, app, namespace)
    }
}

impl Scoped for crate::bindings::BindingComponent {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        crate::bindings::BindingComponent::visible_to(self, app, namespace)
    }
}

impl crate::bindings::BindingComponent {
    pub fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        visible(self.namespace.as_deref(), &self.scopes, app, namespace)
    }
}

impl Scoped for SecretComponent {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        SecretComponent::visible_to(self, app, namespace)
    }
}

/// A component metadata entry read from a secret
/// (`secretKeyRef: {name, key}`), resolved when the component is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The metadata entry's name, e.g. `redisPassword`.
    pub field: String,
    /// The secret's name.
    pub secret: String,
    /// The key in the secret (empty: the secret's name, as Dapr does).
    pub key: String,
}

/// A `kind: Subscription` document.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredSubscription {
    pub name: String,
    pub namespace: Option<String>,
    /// `scopes`: the app ids it applies to (empty: every app).
    pub scopes: Vec<String>,
    pub spec: crate::subscriptions::SubscriptionSpec,
}

impl DeclaredSubscription {
    pub fn applies_to(&self, app: &str, namespace: &str) -> bool {
        visible(
            self.namespace.as_deref(),
            &self.scopes,
            Some(app),
            Some(namespace),
        )
    }
}

/// What the manifests currently configure.
///
/// Both maps are keyed by [`key`]: `name` for a definition without a
/// namespace (a file's, seen by every namespace) and `namespace/name` for
/// one in a namespace (every API object, or a file's with
/// `metadata.namespace`). As in Dapr's Kubernetes mode an app sees its own
/// namespace's definition of a name first, so `shop/statestore` and
/// `default/statestore` are two stores, and a namespace that defines
/// `statestore` shadows the default store only for itself.
#[derive(Debug, Default)]
pub struct Registry {
    pub stores: BTreeMap<String, StateComponent>,
    /// Pub/sub components, keyed like `stores`.
    pub pubsubs: BTreeMap<String, PubSubComponent>,
    /// Configuration stores (Dapr's configuration API), keyed like `stores`.
    pub config_stores: BTreeMap<String, ConfigStoreComponent>,
    /// Bindings (`bindings.*`), keyed like `stores`.
    pub bindings: BTreeMap<String, crate::bindings::BindingComponent>,
    /// Declarative subscriptions, in document order.
    pub subscriptions: Vec<DeclaredSubscription>,
    /// Lock stores, keyed like `stores`.
    pub locks: BTreeMap<String, LockComponent>,
    /// Secret stores, keyed like `stores`.
    pub secret_stores: BTreeMap<String, SecretComponent>,
    /// Configuration key → its access control.
    pub configs: BTreeMap<String, AccessControl>,
    /// Configuration key → its `spec.secrets.scopes` (when it has any).
    pub secret_scopes: BTreeMap<String, Vec<crate::secrets::SecretScope>>,
    /// Problems of the last read (file, document, what is wrong).
    pub errors: Vec<String>,
    /// A store or broker could not be opened (a server down, an embedded
    /// file still held by the instance it replaces): the reader tries
    /// again after [`REOPEN_AFTER`] even when nothing changed.
    pub open_failed: bool,
}

/// A definition's key in [`Registry`]'s maps. Kubernetes names never hold
/// `/`, so the two forms cannot collide.
pub fn key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// `name` in a map keyed by [`key`] as an app sees it: its own namespace's
/// definition, else one without a namespace, if its scopes let the app in.
fn lookup<'a, C: Scoped>(
    map: &'a BTreeMap<String, C>,
    name: &str,
    app: Option<&str>,
    namespace: Option<&str>,
) -> Option<&'a C> {
    let own = namespace.and_then(|ns| map.get(&key(Some(ns), name)));
    own.or_else(|| map.get(name))
        .filter(|c| c.visible_to(app, namespace))
}

/// Every component of a map an app sees, one per name, by name.
fn visible_all<'a, C: Scoped>(
    map: &'a BTreeMap<String, C>,
    app: Option<&str>,
    namespace: Option<&str>,
) -> Vec<&'a C> {
    let mut names: Vec<&str> = map.values().map(Scoped::name).collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| lookup(map, n, app, namespace))
        .collect()
}

impl Registry {
    /// The store `name` as an app (`app`, `namespace`) sees it: its own
    /// namespace's definition, else one without a namespace.
    pub fn store(
        &self,
        name: &str,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<&StateComponent> {
        lookup(&self.stores, name, app, namespace)
    }

    /// Every store an app sees, by name.
    pub fn visible_stores(
        &self,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Vec<&StateComponent> {
        visible_all(&self.stores, app, namespace)
    }

    /// The pub/sub `name` as an app sees it (same rules as [`Registry::store`]).
    pub fn pubsub(
        &self,
        name: &str,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<&PubSubComponent> {
        lookup(&self.pubsubs, name, app, namespace)
    }

    /// Every pub/sub an app sees, by name.
    pub fn visible_pubsubs(
        &self,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Vec<&PubSubComponent> {
        visible_all(&self.pubsubs, app, namespace)
    }

    /// The configuration store `name` as an app sees it.
    pub fn config_store(
        &self,
        name: &str,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<&ConfigStoreComponent> {
        lookup(&self.config_stores, name, app, namespace)
    }

    /// Every configuration store an app sees, by name.
    pub fn visible_config_stores(
        &self,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Vec<&ConfigStoreComponent> {
        visible_all(&self.config_stores, app, namespace)
    }

    /// The binding `name` as an app sees it (same rules as [`Registry::store`]).
    pub fn binding(
        &self,
        name: &str,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<&crate::bindings::BindingComponent> {
        lookup(&self.bindings, name, app, namespace)
    }

    /// Every binding an app sees, by name.
    pub fn visible_bindings(
        &self,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Vec<&crate::bindings::BindingComponent> {
        visible_all(&self.bindings, app, namespace)
    }

    /// The lock store `name` as an app sees it (same rules as [`Registry::store`]).
    pub fn lock_store(
        &self,
        name: &str,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<&LockComponent> {
        lookup(&self.locks, name, app, namespace)
    }

    /// Every lock store an app sees, by name.
    pub fn visible_locks(&self, app: Option<&str>, namespace: Option<&str>) -> Vec<&LockComponent> {
        visible_all(&self.locks, app, namespace)
    }

    /// The secret store `name` as an app sees it (same rules as [`Registry::store`]).
    pub fn secret_store(
        &self,
        name: &str,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<&SecretComponent> {
        lookup(&self.secret_stores, name, app, namespace)
    }

    /// Every secret store an app sees, by name.
    pub fn visible_secret_stores(
        &self,
        app: Option<&str>,
        namespace: Option<&str>,
    ) -> Vec<&SecretComponent> {
        visible_all(&self.secret_stores, app, namespace)
    }

    /// The names of the Configurations an app of `namespace` can use.
    pub fn config_names(&self, namespace: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .configs
            .keys()
            .filter_map(|k| match k.split_once('/') {
                Some((ns, name)) => (ns == namespace).then_some(name),
                None => Some(k.as_str()),
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The secret scopes of Configuration `name` for an app of
    /// `namespace` (the same Configuration [`Registry::config`] finds).
    pub fn secret_scopes(&self, name: &str, namespace: &str) -> &[crate::secrets::SecretScope] {
        let own = key(Some(namespace), name);
        let k = if self.configs.contains_key(&own) {
            own
        } else {
            name.to_string()
        };
        self.secret_scopes
            .get(&k)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The Configuration `name` for an app of `namespace`.
    pub fn config(&self, name: &str, namespace: &str) -> Option<&AccessControl> {
        self.configs
            .get(&key(Some(namespace), name))
            .or_else(|| self.configs.get(name))
    }
}

/// One parsed document of interest.
#[derive(Debug, Clone, PartialEq)]
enum Doc {
    /// A component of one of the [`Family`]s (by its `spec.type`).
    Component {
        spec: ComponentSpec,
        namespace: Option<String>,
        scopes: Vec<String>,
        /// Metadata entries to read from secrets before opening.
        refs: Vec<SecretRef>,
        /// `auth.secretStore`: where `refs` are read.
        auth: Option<String>,
    },
    Subscription(DeclaredSubscription),
    Config {
        name: String,
        namespace: Option<String>,
        acl: AccessControl,
        /// `spec.secrets.scopes`.
        secret_scopes: Vec<crate::secrets::SecretScope>,
    },
}

/// The component families the runtime serves, by `spec.type` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    State,
    PubSub,
    /// `configuration.*`: configuration stores, not `kind: Configuration`.
    ConfigStore,
    Binding,
    Lock,
    Secret,
}

impl Family {
    fn of(kind: &str) -> Option<Family> {
        if kind.starts_with("state.") {
            Some(Family::State)
        } else if kind.starts_with("pubsub.") {
            Some(Family::PubSub)
        } else if kind.starts_with("configuration.") {
            Some(Family::ConfigStore)
        } else if kind.starts_with("bindings.") {
            Some(Family::Binding)
        } else if kind.starts_with("lock.") {
            Some(Family::Lock)
        } else if kind.starts_with("secretstores.") {
            Some(Family::Secret)
        } else {
            None
        }
    }
}

/// A document to read and the label its errors carry: a file's
/// "PATH document N", or the API's "API Component shop/cache".
pub type Labelled = (String, Value);

/// The Dapr documents of one file's text, labelled; other documents are
/// skipped.
fn file_docs(path: &Path, text: &str) -> (Vec<Labelled>, Vec<String>) {
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    // A Dapr document names its group in `apiVersion`, so a file without
    // the text holds none: skip parsing it. The manifests directory is
    // shared with the agent's Pods, Namespaces and NetworkPolicies, and
    // re-parsing all of them on every change (94 ms for 1,000 pods and 500
    // policies) competed for the CPU with programming the change's rules.
    if !text.contains("dapr.io/") {
        return (docs, errors);
    }
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let values: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, options) {
        Ok(v) => v,
        Err(e) => {
            // The agent reports unreadable YAML for its own kinds too;
            // this file names dapr.io, so it is ours to judge.
            errors.push(format!("{}: not valid YAML: {e}", path.display()));
            return (docs, errors);
        }
    };
    for (i, v) in values.into_iter().enumerate() {
        let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if api.starts_with("dapr.io/") {
            docs.push((format!("{} document {}", path.display(), i + 1), v));
        }
    }
    (docs, errors)
}

/// Interprets documents, whatever their source, keeping their labels.
/// Errors name the document and the field.
fn interpret(docs: Vec<Labelled>) -> (Vec<(String, Doc)>, Vec<String>) {
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for (at, v) in docs {
        match doc(&v) {
            Ok(Some(d)) => out.push((at, d)),
            Ok(None) => {}
            Err(m) => errors.push(format!("{at}: {m}")),
        }
    }
    (out, errors)
}

fn doc(v: &Value) -> std::result::Result<Option<Doc>, String> {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{kind} has no metadata.name"))?
        .to_string();
    match kind {
        "Component" => {
            let kind_s = v
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("Component {name} has no spec.type (e.g. state.redis)"))?;
            if Family::of(kind_s).is_none() {
                // other types: not served by this runtime.
                return Ok(None);
            }
            let mut metadata = BTreeMap::new();
            let mut refs = Vec::new();
            for item in v
                .pointer("/spec/metadata")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = item.get("name").and_then(Value::as_str).ok_or_else(|| {
                    format!("Component {name}: a spec.metadata entry has no name")
                })?;
                if let Some(r) = item.get("secretKeyRef") {
                    let secret = r
                        .get("name")
                        .and_then(Value::as_str)
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| {
                            format!("Component {name}: metadata {key}: secretKeyRef has no name (the secret's name)")
                        })?;
                    refs.push(SecretRef {
                        field: key.to_string(),
                        secret: secret.to_string(),
                        key: r
                            .get("key")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    });
                    continue;
                }
                let value = match item.get("value") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                metadata.insert(key.to_string(), value);
            }
            let scopes = v
                .get("scopes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let version = v
                .pointer("/spec/version")
                .and_then(Value::as_str)
                .unwrap_or("v1")
                .to_string();
            Ok(Some(Doc::Component {
                spec: ComponentSpec {
                    name: name.clone(),
                    kind: kind_s.to_string(),
                    version,
                    metadata,
                },
                namespace: namespace(v),
                scopes,
                refs,
                auth: v
                    .pointer("/auth/secretStore")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            }))
        }
        "Subscription" => {
            let spec = v
                .get("spec")
                .ok_or_else(|| format!("Subscription {name} has no spec"))?;
            let spec = crate::subscriptions::SubscriptionSpec::parse(spec)
                .map_err(|e| format!("Subscription {name}: {e}"))?;
            Ok(Some(Doc::Subscription(DeclaredSubscription {
                name,
                namespace: namespace(v),
                scopes: strings(v.get("scopes")),
                spec,
            })))
        }
        "Configuration" => {
            let acl = match v.pointer("/spec/accessControl") {
                Some(a) => serde_json::from_value(a.clone())
                    .map_err(|e| format!("Configuration {name}: spec.accessControl: {e}"))?,
                None => AccessControl::default(),
            };
            let secret_scopes = match v.pointer("/spec/secrets/scopes") {
                Some(a) => serde_json::from_value(a.clone())
                    .map_err(|e| format!("Configuration {name}: spec.secrets.scopes: {e}"))?,
                None => Vec::new(),
            };
            Ok(Some(Doc::Config {
                name,
                namespace: namespace(v),
                acl,
                secret_scopes,
            }))
        }
        _ => Ok(None),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn namespace(v: &Value) -> Option<String> {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Where an embedded store of a namespaced component keeps its file, so
/// that two namespaces' stores of one name never share one.
fn store_dir(state_dir: &Path, namespace: Option<&str>) -> PathBuf {
    match namespace {
        Some(ns) => state_dir.join("namespaces").join(ns),
        None => state_dir.to_path_buf(),
    }
}

/// A file's identity for change detection.
type Stamp = (PathBuf, u64, SystemTime);

fn stamps(dir: &Path) -> Vec<Stamp> {
    let mut v: Vec<Stamp> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            !n.starts_with('.')
                && (n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".json"))
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.len(), m.modified().ok()?))
        })
        .collect();
    v.sort();
    v
}

/// The Dapr documents of the directory's files, in file name order, and
/// the problems reading them.
fn dir_docs(dir: &Path) -> (Vec<Labelled>, Vec<String>) {
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    for (path, _, _) in stamps(dir) {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (d, e) = file_docs(&path, &text);
                docs.extend(d);
                errors.extend(e);
            }
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    (docs, errors)
}

/// Replaces `target`'s registry with one built from `docs`, whatever their
/// source (a directory's files, the Kubernetes API's objects as JSON with
/// their `apiVersion` and `kind`); `errors` are the sources' own problems,
/// kept in the registry's. The first definition of a name is used; with
/// `default_store`, the default store is added when no document defines it
/// (without a namespace); an open store is kept while its spec is
/// unchanged.
///
/// A store whose spec changed is taken out of service before its new
/// definition is opened: an embedded store's file can be open only once,
/// and the old store closes when the last request still using it ends
/// (the embedded store's open waits a little for that).
pub async fn reload(
    target: &std::sync::RwLock<Arc<Registry>>,
    docs: Vec<Labelled>,
    errors: Vec<String>,
    state_dir: &Path,
    default_store: bool,
) -> Arc<Registry> {
    let ctx = SecretsContext::default();
    reload_with(target, docs, errors, state_dir, default_store, &ctx).await
}

/// [`reload`], with what resolving secrets needs: the Kubernetes Secrets,
/// and in Kubernetes mode the default `kubernetes` secret store.
pub async fn reload_with(
    target: &std::sync::RwLock<Arc<Registry>>,
    docs: Vec<Labelled>,
    mut errors: Vec<String>,
    state_dir: &Path,
    default_store: bool,
    ctx: &SecretsContext,
) -> Arc<Registry> {
    let (mut docs, e) = interpret(docs);
    errors.extend(e);
    let mut defaults = Vec::new();
    if default_store {
        defaults.push((DEFAULT_STORE, "state.embedded", "the default store"));
        defaults.push((DEFAULT_PUBSUB, "pubsub.embedded", "the default pub/sub"));
    }
    if ctx.kubernetes {
        // As Dapr in Kubernetes mode; Secrets are no store to hold back.
        defaults.push((
            DEFAULT_SECRET_STORE,
            "secretstores.kubernetes",
            "the default secret store",
        ));
    }
    {
        for (name, kind, label) in defaults {
            let family = Family::of(kind);
            let defined = docs.iter().any(|(_, d)| {
                matches!(d, Doc::Component { spec, namespace: None, .. }
                    if spec.name == name && Family::of(&spec.kind) == family)
            });
            if !defined {
                docs.push((
                    label.into(),
                    Doc::Component {
                        spec: ComponentSpec {
                            name: name.into(),
                            kind: kind.into(),
                            version: "v1".into(),
                            metadata: BTreeMap::new(),
                        },
                        namespace: None,
                        scopes: Vec::new(),
                        refs: Vec::new(),
                        auth: None,
                    },
                ));
            }
        }
    }
    // Where each key was first defined, for the "defined twice" message.
    // Components of every type share one name space, as in Dapr.
    let mut first: BTreeMap<(&str, String), String> = BTreeMap::new();
    docs.retain(|(at, d)| {
        let (what, name) = match d {
            Doc::Component {
                spec, namespace, ..
            } => ("component", key(namespace.as_deref(), &spec.name)),
            Doc::Subscription(s) => ("subscription", key(s.namespace.as_deref(), &s.name)),
            Doc::Config {
                name, namespace, ..
            } => ("configuration", key(namespace.as_deref(), name)),
        };
        if let Some(used) = first.get(&(what, name.clone())) {
            errors.push(format!(
                "{at}: {what} {name} is defined twice; the first definition ({used}) is used"
            ));
            return false;
        }
        first.insert((what, name.clone()), at.clone());
        true
    });

    // Secret stores first: other components' secretKeyRefs read from them.
    // They hold nothing open, so they are simply rebuilt.
    let mut secret_stores = BTreeMap::new();
    let base = ctx.base_dir.as_deref().unwrap_or(state_dir);
    docs.retain(|(at, d)| match d {
        Doc::Component {
            spec,
            namespace,
            scopes,
            refs,
            ..
        } if Family::of(&spec.kind) == Some(Family::Secret) => {
            if !refs.is_empty() {
                errors.push(format!(
                    "{at}: component {}: a secret store's metadata cannot use secretKeyRef; give the values",
                    spec.name
                ));
                return false;
            }
            match crate::secrets::Backend::of(spec, base) {
                Ok(backend) => {
                    secret_stores.insert(
                        key(namespace.as_deref(), &spec.name),
                        SecretComponent {
                            spec: spec.clone(),
                            namespace: namespace.clone(),
                            scopes: scopes.clone(),
                            backend,
                        },
                    );
                }
                Err(e) => errors.push(format!("{at}: component {}: {e}", spec.name)),
            }
            false
        }
        _ => true,
    });
    let mut resolved = Vec::with_capacity(docs.len());
    for (at, mut d) in docs {
        if let Doc::Component {
            spec,
            namespace,
            refs,
            auth,
            ..
        } = &mut d
        {
            if let Err(e) = resolve_refs(
                &secret_stores,
                ctx,
                spec,
                namespace.as_deref(),
                refs,
                auth.as_deref(),
            )
            .await
            {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        }
        resolved.push((at, d));
    }
    let docs = resolved;

    let current = || target.read().unwrap_or_else(|e| e.into_inner()).clone();
    let mut prev = current();
    // The open instance's spec, if a component of that family and key is
    // in service.
    let open_spec = |reg: &Registry, family, k: &str| -> Option<ComponentSpec> {
        match family {
            Family::State => reg.stores.get(k).map(|c| c.spec.clone()),
            Family::PubSub => reg.pubsubs.get(k).map(|c| c.spec.clone()),
            Family::ConfigStore => reg.config_stores.get(k).map(|c| c.spec.clone()),
            Family::Binding => reg.bindings.get(k).map(|c| c.spec.clone()),
            Family::Lock => reg.locks.get(k).map(|c| c.spec.clone()),
            // Rebuilt on every read (above).
            Family::Secret => None,
        }
    };
    // Components whose spec changed: (family, key).
    let changed: Vec<(Family, String)> = docs
        .iter()
        .filter_map(|(_, d)| match d {
            Doc::Component {
                spec, namespace, ..
            } => {
                let family = Family::of(&spec.kind)?;
                let k = key(namespace.as_deref(), &spec.name);
                open_spec(&prev, family, &k)
                    .is_some_and(|old| old != *spec)
                    .then_some((family, k))
            }
            _ => None,
        })
        .collect();
    if !changed.is_empty() {
        let mut interim = Registry {
            stores: prev.stores.clone(),
            pubsubs: prev.pubsubs.clone(),
            config_stores: prev.config_stores.clone(),
            bindings: prev.bindings.clone(),
            subscriptions: prev.subscriptions.clone(),
            locks: prev.locks.clone(),
            secret_stores: prev.secret_stores.clone(),
            configs: prev.configs.clone(),
            secret_scopes: prev.secret_scopes.clone(),
            errors: prev.errors.clone(),
            open_failed: prev.open_failed,
        };
        for (family, k) in &changed {
            match family {
                Family::State => drop(interim.stores.remove(k)),
                Family::PubSub => drop(interim.pubsubs.remove(k)),
                Family::ConfigStore => drop(interim.config_stores.remove(k)),
                Family::Binding => drop(interim.bindings.remove(k)),
                Family::Lock => drop(interim.locks.remove(k)),
                Family::Secret => {}
            }
        }
        *target.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(interim);
        prev = current();
    }

    let mut reg = Registry {
        errors,
        secret_stores,
        ..Registry::default()
    };
    for (_, d) in docs {
        match d {
            Doc::Subscription(s) => reg.subscriptions.push(s),
            Doc::Component {
                spec,
                namespace,
                scopes,
                ..
            } if Family::of(&spec.kind) == Some(Family::Lock) => {
                let k = key(namespace.as_deref(), &spec.name);
                let dir = store_dir(state_dir, namespace.as_deref());
                let key_prefix =
                    KeyPrefix::parse(spec.metadata.get("keyPrefix").map(String::as_str));
                if matches!(&key_prefix, KeyPrefix::Custom(p) if p.contains("||")) {
                    reg.errors.push(format!(
                        "component {}: metadata keyPrefix can't contain '||'",
                        spec.name
                    ));
                    continue;
                }
                let store = match prev.locks.get(&k) {
                    Some(old) if old.spec == spec => old.store.clone(),
                    _ => match nodeplane_state::lock::open_lock(&spec, &dir).await {
                        Ok(s) => s,
                        Err(e) => {
                            reg.errors.push(format!("component {}: {e}", spec.name));
                            reg.open_failed |= !matches!(e, nodeplane_state::Error::Config(_));
                            continue;
                        }
                    },
                };
                reg.locks.insert(
                    k,
                    LockComponent {
                        spec,
                        namespace,
                        scopes,
                        key_prefix,
                        store,
                    },
                );
            }
            Doc::Component {
                spec,
                namespace,
                scopes,
                ..
            } if Family::of(&spec.kind) == Some(Family::PubSub) => {
                let k = key(namespace.as_deref(), &spec.name);
                let dir = store_dir(state_dir, namespace.as_deref());
                let (topics, retry) = match (
                    crate::subscriptions::TopicScopes::parse(&spec.metadata),
                    crate::subscriptions::RetryPolicy::parse(&spec.metadata),
                ) {
                    (Ok(t), Ok(r)) => (t, r),
                    (Err(e), _) | (_, Err(e)) => {
                        reg.errors.push(format!("component {}: {e}", spec.name));
                        continue;
                    }
                };
                let broker = match prev.pubsubs.get(&k) {
                    Some(old) if old.spec == spec => old.broker.clone(),
                    _ => match open_broker(&spec, &dir).await {
                        Ok(b) => b,
                        Err(e) => {
                            reg.errors.push(format!("component {}: {e}", spec.name));
                            reg.open_failed |= !matches!(e, nodeplane_pubsub::Error::Config(_));
                            continue;
                        }
                    },
                };
                reg.pubsubs.insert(
                    k,
                    PubSubComponent {
                        spec,
                        namespace,
                        scopes,
                        topics,
                        retry,
                        broker,
                    },
                );
            }
            Doc::Component {
                spec,
                namespace,
                scopes,
                ..
            } if Family::of(&spec.kind) == Some(Family::ConfigStore) => {
                let k = key(namespace.as_deref(), &spec.name);
                let store = match prev.config_stores.get(&k) {
                    Some(old) if old.spec == spec => old.store.clone(),
                    _ => match crate::config_store::open(&spec).await {
                        Ok(s) => s,
                        Err(e) => {
                            reg.errors.push(format!("component {}: {e}", spec.name));
                            // A server may come back; try again later.
                            reg.open_failed |= spec.kind == "configuration.redis";
                            continue;
                        }
                    },
                };
                reg.config_stores.insert(
                    k,
                    ConfigStoreComponent {
                        spec,
                        namespace,
                        scopes,
                        store,
                    },
                );
            }
            Doc::Config {
                name,
                namespace,
                acl,
                secret_scopes,
            } => {
                let k = key(namespace.as_deref(), &name);
                if !secret_scopes.is_empty() {
                    reg.secret_scopes.insert(k.clone(), secret_scopes);
                }
                reg.configs.insert(k, acl);
            }
            Doc::Component {
                spec,
                namespace,
                scopes,
                ..
            } if Family::of(&spec.kind) == Some(Family::Binding) => {
                let k = key(namespace.as_deref(), &spec.name);
                // Unchanged: the same instance (its connections, and the
                // input binding's schedule, go on).
                let binding = match prev.bindings.get(&k) {
                    Some(old) if old.spec == spec => old.binding.clone(),
                    _ => match crate::bindings::open(&spec).await {
                        Ok(b) => b,
                        Err(e) => {
                            reg.errors.push(format!("component {}: {e}", spec.name));
                            reg.open_failed |= !e.is_config();
                            continue;
                        }
                    },
                };
                reg.bindings.insert(
                    k,
                    crate::bindings::BindingComponent {
                        spec,
                        namespace,
                        scopes,
                        binding,
                    },
                );
            }
            // Every other component is a state store: `doc` keeps only
            // the families of [`Family`], and secret stores are done above.
            Doc::Component {
                spec,
                namespace,
                scopes,
                ..
            } => {
                let k = key(namespace.as_deref(), &spec.name);
                let dir = store_dir(state_dir, namespace.as_deref());
                let store = match prev.stores.get(&k) {
                    Some(old) if old.spec == spec => old.store.clone(),
                    _ => match nodeplane_state::open(&spec, &dir).await {
                        Ok(s) => s,
                        Err(e) => {
                            reg.errors.push(format!("component {}: {e}", spec.name));
                            // A configuration error stays one until the
                            // manifest changes; anything else may pass.
                            reg.open_failed |= !matches!(e, nodeplane_state::Error::Config(_));
                            continue;
                        }
                    },
                };
                let key_prefix =
                    KeyPrefix::parse(spec.metadata.get("keyPrefix").map(String::as_str));
                reg.stores.insert(
                    k,
                    StateComponent {
                        spec,
                        namespace,
                        scopes,
                        key_prefix,
                        store,
                    },
                );
            }
        }
    }
    for e in &reg.errors {
        tracing::warn!(error = %e, "app runtime component not used");
    }
    let reg = Arc::new(reg);
    *target.write().unwrap_or_else(|e| e.into_inner()) = reg.clone();
    reg
}

/// Fills `spec`'s metadata entries that `refs` read from secrets: from
/// `auth` (`auth.secretStore`), else in Kubernetes mode the default
/// `kubernetes` store, with the Secrets of the component's namespace
/// (`default` for a file's component without one). The error names the
/// component, the field, the secret and the store.
async fn resolve_refs(
    stores: &BTreeMap<String, SecretComponent>,
    ctx: &SecretsContext,
    spec: &mut ComponentSpec,
    namespace: Option<&str>,
    refs: &[SecretRef],
    auth: Option<&str>,
) -> std::result::Result<(), String> {
    let Some(first) = refs.first() else {
        return Ok(());
    };
    let store_name = match auth {
        Some(s) => s,
        None if ctx.kubernetes => DEFAULT_SECRET_STORE,
        None => {
            return Err(format!(
                "component {}: metadata {} uses secretKeyRef, and the component has no auth.secretStore (outside Kubernetes mode there is no default secret store)",
                spec.name, first.field
            ))
        }
    };
    for r in refs {
        let k = if r.key.is_empty() { &r.secret } else { &r.key };
        let what = format!(
            "component {}: metadata {}: secret {} key {k} from secret store {store_name}",
            spec.name, r.field, r.secret
        );
        // Scoped secret stores serve apps, not components.
        let store = lookup(stores, store_name, None, namespace)
            .ok_or_else(|| format!("{what}: no such secret store is defined"))?;
        let values = store
            .get(
                ctx.provider.as_deref(),
                Some(namespace.unwrap_or("default")),
                &r.secret,
            )
            .await
            .map_err(|e| format!("{what}: {e}"))?
            .ok_or_else(|| format!("{what}: the secret does not exist"))?;
        let v = values
            .get(k)
            .ok_or_else(|| format!("{what}: the secret has no key {k}"))?;
        spec.metadata.insert(r.field.clone(), v.clone());
    }
    Ok(())
}

/// Opens a broker; an embedded one whose previous instance is still
/// closing (its deliveries' last users) finds its directory locked for a
/// moment, so the open is tried a few times (and again by [`watch`] after
/// [`REOPEN_AFTER`]).
async fn open_broker(
    spec: &ComponentSpec,
    dir: &Path,
) -> std::result::Result<Arc<dyn nodeplane_pubsub::Broker>, nodeplane_pubsub::Error> {
    let mut tries = 0;
    loop {
        match nodeplane_pubsub::open(spec, dir).await {
            Ok(b) => return Ok(b),
            Err(e)
                if tries < 5
                    && spec.kind == "pubsub.embedded"
                    && !matches!(e, nodeplane_pubsub::Error::Config(_)) =>
            {
                tries += 1;
                tracing::debug!(error = %e, "embedded pub/sub busy; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The Kubernetes API's Dapr Components and Configurations (`dapr.io/v1alpha1`)
/// and Subscriptions (`dapr.io/v2alpha1`)
/// as the agent's watches last saw them (the agent publishes it through a
/// `tokio::sync::watch` channel; see nodeplane-agent's `source::dapr`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApiComponents {
    /// Every object, labelled for errors ("API Component shop/cache"), with
    /// `apiVersion` and `kind` set, in a stable order.
    pub docs: Vec<Labelled>,
    /// Every kind has been listed once, or has failed to be listed once:
    /// the runtime need not wait for the API any longer to be ready.
    pub settled: bool,
    /// Every kind has been listed, or is not served at all (no CRD): what
    /// `docs` holds is all there is. Until then the runtime holds back the
    /// default store, since the cluster may define its own `statestore`
    /// and writes to the embedded one would be writes to the wrong store.
    pub complete: bool,
    /// Why a kind cannot be listed now (CRD not installed, RBAC), shown in
    /// the runtime's problems until it can.
    pub problems: Vec<String>,
}

/// Where components come from. Both may be given: the directory's
/// documents come first, so on a name defined in both the file wins.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub dir: Option<PathBuf>,
    pub api: Option<tokio::sync::watch::Receiver<ApiComponents>>,
}

/// How soon components that failed to open are tried again.
pub const REOPEN_AFTER: Duration = Duration::from_secs(3);

/// How long the first read waits for the API to answer before the runtime
/// serves without its components (a list request has no timeout: an API
/// server that accepts and never answers would otherwise hold readiness,
/// and the agent's start, forever).
pub const API_WAIT: Duration = Duration::from_secs(10);

/// Keeps `target` current with `sources`: reads them now (then fires
/// `loaded`), then again whenever a file's size or mtime changes (checked
/// every `every`) or the API's documents change. The first read waits for
/// the API to have answered once, successfully or not, for at most
/// [`API_WAIT`].
pub async fn watch(
    sources: Sources,
    state_dir: PathBuf,
    target: Arc<std::sync::RwLock<Arc<Registry>>>,
    every: Duration,
    loaded: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let ctx = SecretsContext::default();
    watch_with(sources, state_dir, target, every, loaded, ctx).await
}

/// [`watch`], resolving secrets with `ctx` (see [`reload_with`]).
pub async fn watch_with(
    sources: Sources,
    state_dir: PathBuf,
    target: Arc<std::sync::RwLock<Arc<Registry>>>,
    every: Duration,
    loaded: tokio::sync::oneshot::Sender<()>,
    ctx: SecretsContext,
) -> Result<()> {
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| Error::io(format!("create {}", state_dir.display()), e))?;
    let Sources { dir, mut api } = sources;
    let mut loaded = Some(loaded);
    let started = tokio::time::Instant::now();
    let mut api_closed = false;
    let mut seen: Option<Vec<Stamp>> = None;
    // (settled, complete, documents) of the API at the last read.
    let mut seen_api: Option<(bool, bool, Vec<Labelled>)> = None;
    // When to read again although nothing changed (an open failed).
    let mut reopen_at: Option<tokio::time::Instant> = None;
    loop {
        let now = dir.as_deref().map(stamps).unwrap_or_default();
        // Whether the API has answered (or been waited for long enough),
        // and its documents when they differ from the last read's.
        let (api_ready, fresh) = match &mut api {
            None => (true, None),
            Some(rx) => {
                let a = rx.borrow_and_update();
                let ready = a.settled || api_closed || started.elapsed() >= API_WAIT;
                let same = seen_api
                    .as_ref()
                    .is_some_and(|(s, c, d)| *s == a.settled && *c == a.complete && *d == a.docs);
                (
                    ready,
                    (ready && !same).then(|| (a.settled, a.complete, a.docs.clone())),
                )
            }
        };
        let reopen = reopen_at.is_some_and(|t| t <= tokio::time::Instant::now());
        if api_ready && (fresh.is_some() || seen.as_ref() != Some(&now) || reopen) {
            if fresh.is_some() {
                seen_api = fresh;
            }
            let (mut docs, mut errors) = match &dir {
                Some(d) => dir_docs(d),
                None => (Vec::new(), Vec::new()),
            };
            let mut default_store = true;
            if let Some((settled, complete, api_docs)) = &seen_api {
                if !complete {
                    default_store = false;
                    errors.push(format!(
                        "{DEFAULT_STORE} and {DEFAULT_PUBSUB} (the embedded defaults) are held back until the Kubernetes API has listed the Dapr Components: the cluster may define its own"
                    ));
                }
                if !settled {
                    errors.push(format!(
                        "the Kubernetes API has not answered every list of Dapr Components, Configurations and Subscriptions in {} s; serving what it has sent until it does",
                        API_WAIT.as_secs()
                    ));
                }
                docs.extend(api_docs.iter().cloned());
            }
            let next = reload_with(&target, docs, errors, &state_dir, default_store, &ctx).await;
            tracing::info!(
                stores = next.stores.len(),
                pubsubs = next.pubsubs.len(),
                bindings = next.bindings.len(),
                subscriptions = next.subscriptions.len(),
                configurations = next.configs.len(),
                errors = next.errors.len(),
                "app runtime components loaded"
            );
            seen = Some(now);
            reopen_at = next
                .open_failed
                .then(|| tokio::time::Instant::now() + REOPEN_AFTER);
            if let Some(tx) = loaded.take() {
                let _ = tx.send(());
            }
        }
        match &mut api {
            Some(rx) if !api_closed => {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    changed = rx.changed() => api_closed = changed.is_err(),
                }
            }
            _ => tokio::time::sleep(every).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_docs(path: &Path, text: &str) -> (Vec<Doc>, Vec<String>) {
        let (docs, mut errors) = file_docs(path, text);
        let (docs, e) = interpret(docs);
        errors.extend(e);
        (docs.into_iter().map(|(_, d)| d).collect(), errors)
    }

    #[test]
    fn reads_state_components_and_configurations_and_skips_the_rest() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: p}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: cache, namespace: shop}
spec:
  type: state.redis
  version: v1
  metadata:
  - name: redisHost
    value: 127.0.0.1:6379
  - name: keyPrefix
    value: none
  - name: enableTLS
    value: false
scopes: [orders]
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: bus}
spec: {type: pubsub.redis, version: v1}
---
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata: {name: acl}
spec:
  accessControl:
    defaultAction: deny
    policies:
    - appId: front
      operations: [{name: /x, httpVerb: [GET], action: allow}]
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {}
spec: {type: state.redis}
"#;
        let (docs, errors) = parse_docs(Path::new("f.yaml"), text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("document 5") && errors[0].contains("metadata.name"),
            "{errors:?}"
        );
        assert_eq!(docs.len(), 3, "{docs:?}");
        match &docs[0] {
            Doc::Component {
                spec,
                namespace,
                scopes,
                ..
            } => {
                assert_eq!(spec.kind, "state.redis");
                assert_eq!(spec.metadata["redisHost"], "127.0.0.1:6379");
                assert_eq!(spec.metadata["enableTLS"], "false");
                assert_eq!(namespace.as_deref(), Some("shop"));
                assert_eq!(scopes, &["orders".to_string()]);
                assert_eq!(
                    KeyPrefix::parse(spec.metadata.get("keyPrefix").map(String::as_str)),
                    KeyPrefix::None
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&docs[1], Doc::Component { spec, .. } if spec.name == "bus" && spec.kind == "pubsub.redis")
        );
        assert!(
            matches!(&docs[2], Doc::Config { name, acl, .. } if name == "acl" && acl.policies.len() == 1)
        );
    }

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "np-comp-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A Component as the agent hands it over from the API.
    fn api_component(ns: &str, name: &str, kind: &str, metadata: Value) -> Labelled {
        (
            format!("API Component {ns}/{name}"),
            serde_json::json!({
                "apiVersion": "dapr.io/v1alpha1", "kind": "Component",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
                "spec": {"type": kind, "version": "v1", "metadata": metadata},
            }),
        )
    }

    fn empty() -> std::sync::RwLock<Arc<Registry>> {
        std::sync::RwLock::new(Arc::new(Registry::default()))
    }

    #[tokio::test]
    async fn api_documents_are_read_like_files_and_the_first_definition_wins() {
        let state = TempDir::new("first");
        let (mut docs, errors) = file_docs(
            Path::new("dir/c.yaml"),
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: cache}\nspec: {type: state.embedded}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        docs.push(api_component(
            "shop",
            "cache",
            "state.embedded",
            Value::Null,
        ));
        docs.push(api_component(
            "shop",
            "orders",
            "state.embedded",
            serde_json::json!([{"name": "keyPrefix", "value": "name"}]),
        ));
        docs.push(api_component("shop", "orders", "state.redis", Value::Null));
        docs.push((
            "API Configuration shop/acl".into(),
            serde_json::json!({
                "apiVersion": "dapr.io/v1alpha1", "kind": "Configuration",
                "metadata": {"name": "acl", "namespace": "shop"},
                "spec": {"accessControl": {"defaultAction": "deny"}},
            }),
        ));
        docs.push((
            "API Component shop/broken".into(),
            serde_json::json!({
                "apiVersion": "dapr.io/v1alpha1", "kind": "Component",
                "metadata": {"name": "broken", "namespace": "shop"}, "spec": {},
            }),
        ));
        let target = empty();
        let reg = reload(
            &target,
            docs,
            vec!["a source's own problem".into()],
            &state.0,
            true,
        )
        .await;
        assert!(Arc::ptr_eq(&reg, &target.read().expect("lock")));
        assert_eq!(
            reg.stores.keys().collect::<Vec<_>>(),
            ["cache", "shop/cache", "shop/orders", "statestore"]
        );
        // An app sees its own namespace's definition of a name first, then
        // the one without a namespace; never another namespace's.
        assert_eq!(reg.stores["cache"].namespace, None);
        let shop_cache = reg.store("cache", Some("a"), Some("shop")).expect("shop's");
        assert_eq!(shop_cache.namespace.as_deref(), Some("shop"));
        let other_cache = reg
            .store("cache", Some("a"), Some("default"))
            .expect("file's");
        assert_eq!(other_cache.namespace, None);
        let orders = reg
            .store("orders", Some("a"), Some("shop"))
            .expect("orders");
        assert_eq!(orders.namespace.as_deref(), Some("shop"));
        assert_eq!(orders.key_prefix, KeyPrefix::Name);
        assert!(reg.store("orders", Some("a"), Some("default")).is_none());
        let names = |ns| {
            reg.visible_stores(Some("a"), Some(ns))
                .iter()
                .map(|c| key(c.namespace.as_deref(), &c.spec.name))
                .collect::<Vec<_>>()
        };
        assert_eq!(names("shop"), ["shop/cache", "shop/orders", "statestore"]);
        assert_eq!(names("default"), ["cache", "statestore"]);
        assert_eq!(
            reg.config("acl", "shop")
                .expect("shop's acl")
                .default_action,
            crate::acl::Action::Deny
        );
        assert!(reg.config("acl", "default").is_none());
        assert_eq!(reg.config_names("shop"), ["acl"]);
        assert!(reg.config_names("default").is_empty());
        assert_eq!(reg.errors.len(), 3, "{:?}", reg.errors);
        assert_eq!(reg.errors[0], "a source's own problem");
        assert!(
            reg.errors[1].starts_with("API Component shop/broken: ")
                && reg.errors[1].contains("spec.type"),
            "{:?}",
            reg.errors
        );
        assert!(
            reg.errors[2]
                .starts_with("API Component shop/orders: component shop/orders is defined twice")
                && reg.errors[2].contains("(API Component shop/orders)"),
            "{:?}",
            reg.errors
        );
    }

    #[tokio::test]
    async fn namespaces_keep_their_own_store_of_one_name() {
        let state = TempDir::new("ns");
        let docs = vec![
            api_component("a", DEFAULT_STORE, "state.embedded", Value::Null),
            api_component("b", DEFAULT_STORE, "state.embedded", Value::Null),
        ];
        let reg = reload(&empty(), docs, Vec::new(), &state.0, true).await;
        assert!(reg.errors.is_empty(), "{:?}", reg.errors);
        assert_eq!(
            reg.stores.keys().collect::<Vec<_>>(),
            ["a/statestore", "b/statestore", "statestore"]
        );
        let of = |ns| {
            reg.store(DEFAULT_STORE, Some("app"), Some(ns))
                .expect("a store")
        };
        of("a")
            .store
            .save(nodeplane_state::Save {
                key: "k".into(),
                value: bytes::Bytes::from_static(b"a's"),
                etag: None,
                concurrency: nodeplane_state::Concurrency::LastWrite,
                ttl: None,
            })
            .await
            .expect("save");
        // Separate files: b's store and the default do not see a's item.
        assert!(of("b").store.get("k").await.expect("get").is_none());
        assert_eq!(of("c").namespace, None, "other namespaces keep the default");
        assert!(of("c").store.get("k").await.expect("get").is_none());
    }

    #[tokio::test]
    async fn pubsubs_and_subscriptions_follow_the_namespace_rules() {
        let state = TempDir::new("pubsub");
        let docs = vec![
            api_component("a", DEFAULT_PUBSUB, "pubsub.embedded", Value::Null),
            api_component(
                "a",
                "bad",
                "pubsub.embedded",
                serde_json::json!([{"name": "nope", "value": "1"}]),
            ),
            (
                "API Subscription a/s".into(),
                serde_json::json!({
                    "apiVersion": "dapr.io/v2alpha1", "kind": "Subscription",
                    "metadata": {"name": "s", "namespace": "a"},
                    "spec": {"pubsubname": "pubsub", "topic": "t", "routes": {"default": "/t"}},
                    "scopes": ["app"],
                }),
            ),
        ];
        let target = empty();
        let reg = reload(&target, docs.clone(), Vec::new(), &state.0, true).await;
        assert_eq!(
            reg.pubsubs.keys().collect::<Vec<_>>(),
            ["a/pubsub", DEFAULT_PUBSUB]
        );
        assert_eq!(reg.errors.len(), 1, "{:?}", reg.errors);
        assert!(reg.errors[0].contains("nope"), "{:?}", reg.errors);
        let a = reg
            .pubsub(DEFAULT_PUBSUB, Some("app"), Some("a"))
            .expect("a's");
        assert_eq!(a.namespace.as_deref(), Some("a"));
        let other = reg
            .pubsub(DEFAULT_PUBSUB, Some("app"), Some("b"))
            .expect("default");
        assert_eq!(other.namespace, None);
        assert!(state.0.join("namespaces/a/pubsub.pubsub").is_dir());
        assert_eq!(reg.subscriptions.len(), 1);
        assert!(reg.subscriptions[0].applies_to("app", "a"));
        assert!(!reg.subscriptions[0].applies_to("other", "a"));
        assert!(!reg.subscriptions[0].applies_to("app", "b"));
        // Unchanged: the same broker; without the default, none.
        let again = reload(&target, docs, Vec::new(), &state.0, false).await;
        assert!(Arc::ptr_eq(
            &reg.pubsubs["a/pubsub"].broker,
            &again.pubsubs["a/pubsub"].broker
        ));
        assert_eq!(again.pubsubs.keys().collect::<Vec<_>>(), ["a/pubsub"]);
    }

    #[tokio::test]
    async fn reload_keeps_unchanged_stores_reopens_changed_ones_and_drops_removed_ones() {
        let state = TempDir::new("reload");
        let target = empty();
        let one = vec![api_component(
            "shop",
            "cache",
            "state.embedded",
            Value::Null,
        )];
        let first = reload(&target, one.clone(), Vec::new(), &state.0, true).await;
        let store = first.stores["shop/cache"].store.clone();
        store
            .save(nodeplane_state::Save {
                key: "k".into(),
                value: bytes::Bytes::from_static(b"1"),
                etag: None,
                concurrency: nodeplane_state::Concurrency::LastWrite,
                ttl: None,
            })
            .await
            .expect("save");
        drop(store);

        let same = reload(&target, one, Vec::new(), &state.0, true).await;
        assert!(Arc::ptr_eq(
            &first.stores["shop/cache"].store,
            &same.stores["shop/cache"].store
        ));
        assert!(Arc::ptr_eq(
            &first.stores[DEFAULT_STORE].store,
            &same.stores[DEFAULT_STORE].store
        ));
        drop((first, same));

        // A changed spec reopens the same embedded file: the old store is
        // closed first, or the open would find the file in use.
        let changed = vec![api_component(
            "shop",
            "cache",
            "state.embedded",
            serde_json::json!([{"name": "keyPrefix", "value": "none"}]),
        )];
        let reopened = reload(&target, changed, Vec::new(), &state.0, true).await;
        assert!(reopened.errors.is_empty(), "{:?}", reopened.errors);
        let c = &reopened.stores["shop/cache"];
        assert_eq!(c.key_prefix, KeyPrefix::None);
        let item = c.store.get("k").await.expect("get").expect("kept");
        assert_eq!(&item.value[..], b"1");
        drop(reopened);

        let gone = reload(&target, Vec::new(), Vec::new(), &state.0, true).await;
        assert_eq!(gone.stores.keys().collect::<Vec<_>>(), [DEFAULT_STORE]);
    }

    /// Secrets of two namespaces, for resolving secretKeyRef.
    #[derive(Debug)]
    struct FakeSecrets;

    #[async_trait::async_trait]
    impl crate::Secrets for FakeSecrets {
        async fn get(
            &self,
            namespace: &str,
            name: &str,
        ) -> std::result::Result<Option<crate::secrets::SecretValues>, String> {
            Ok((name == "redis").then(|| {
                crate::secrets::SecretValues::from([("password".into(), format!("{namespace}-pw"))])
            }))
        }
        async fn list(
            &self,
            _: &str,
        ) -> std::result::Result<BTreeMap<String, crate::secrets::SecretValues>, String> {
            Ok(BTreeMap::new())
        }
    }

    #[tokio::test]
    async fn secret_refs_are_resolved_or_the_component_is_reported() {
        let state = TempDir::new("refs");
        std::fs::write(state.0.join("s.json"), r#"{"lock": {"prefix": "shared"}}"#).expect("write");
        let with_ref = |ns: &str, name: &str, kind: &str, secret: &str, auth: Option<&str>| {
            let mut c = api_component(
                ns,
                name,
                kind,
                serde_json::json!([{"name": "keyPrefix", "secretKeyRef": {"name": secret, "key": "password"}}]),
            );
            if let Some(a) = auth {
                c.1["auth"] = serde_json::json!({"secretStore": a});
            }
            c
        };
        let docs = vec![
            api_component(
                "shop",
                "files",
                "secretstores.local.file",
                serde_json::json!([{"name": "secretsFile", "value": "s.json"}, {"name": "nestedSeparator", "value": "."}]),
            ),
            // From the default `kubernetes` store, shop's Secrets.
            with_ref("shop", "locks", "lock.embedded", "redis", None),
            // From the file store: the nested key, flattened.
            {
                let mut c = api_component(
                    "shop",
                    "shared",
                    "lock.embedded",
                    serde_json::json!([{"name": "keyPrefix", "secretKeyRef": {"name": "lock.prefix"}}]),
                );
                c.1["auth"] = serde_json::json!({"secretStore": "files"});
                c
            },
            with_ref("shop", "missing", "lock.embedded", "nope", None),
            with_ref("shop", "nostore", "lock.embedded", "redis", Some("vault")),
        ];
        let ctx = SecretsContext {
            provider: Some(Arc::new(FakeSecrets)),
            kubernetes: true,
            base_dir: None,
        };
        let reg = reload_with(&empty(), docs, Vec::new(), &state.0, true, &ctx).await;
        let shop = |n| reg.lock_store(n, Some("a"), Some("shop"));
        assert_eq!(
            shop("locks").expect("locks").key_prefix,
            KeyPrefix::Custom("shop-pw".into())
        );
        assert_eq!(
            shop("shared").expect("shared").key_prefix,
            KeyPrefix::Custom("shared".into())
        );
        assert!(shop("missing").is_none() && shop("nostore").is_none());
        assert!(reg
            .lock_store("locks", Some("a"), Some("default"))
            .is_none());
        assert_eq!(reg.errors.len(), 2, "{:?}", reg.errors);
        assert!(
            reg.errors[0].contains("component missing: metadata keyPrefix: secret nope key password from secret store kubernetes: the secret does not exist"),
            "{:?}",
            reg.errors
        );
        assert!(
            reg.errors[1].contains("component nostore")
                && reg.errors[1].contains("secret store vault: no such secret store"),
            "{:?}",
            reg.errors
        );
        // The default store, for every namespace; the file store for shop.
        assert!(reg
            .secret_store(DEFAULT_SECRET_STORE, Some("a"), Some("x"))
            .is_some());
        assert!(reg.secret_store("files", Some("a"), Some("shop")).is_some());
        assert!(reg.secret_store("files", Some("a"), Some("x")).is_none());
        // Standalone: no default store, and secretKeyRef needs auth.
        let other = TempDir::new("refs-standalone");
        let standalone = reload(
            &empty(),
            vec![with_ref("shop", "locks", "lock.embedded", "redis", None)],
            Vec::new(),
            &other.0,
            false,
        )
        .await;
        assert!(standalone.secret_stores.is_empty());
        assert!(
            standalone.errors[0].contains("no auth.secretStore"),
            "{:?}",
            standalone.errors
        );
    }

    #[tokio::test]
    async fn watch_reads_the_api_feed_and_follows_its_changes() {
        let state = TempDir::new("watch");
        let (tx, rx) = tokio::sync::watch::channel(ApiComponents::default());
        let target = Arc::new(std::sync::RwLock::new(Arc::new(Registry::default())));
        let (loaded_tx, loaded) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(watch(
            Sources {
                dir: None,
                api: Some(rx),
            },
            state.0.clone(),
            target.clone(),
            Duration::from_millis(20),
            loaded_tx,
        ));
        tx.send_replace(ApiComponents {
            docs: vec![api_component(
                "shop",
                "cache",
                "state.embedded",
                Value::Null,
            )],
            settled: true,
            complete: true,
            problems: Vec::new(),
        });
        tokio::time::timeout(Duration::from_secs(10), loaded)
            .await
            .expect("the first read is done")
            .expect("loaded fired");
        let stores = || {
            target
                .read()
                .expect("lock")
                .stores
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(stores(), ["shop/cache", DEFAULT_STORE]);
        tx.send_replace(ApiComponents {
            docs: vec![api_component(
                "shop",
                "other",
                "state.embedded",
                Value::Null,
            )],
            settled: true,
            complete: true,
            problems: Vec::new(),
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while stores() != ["shop/other", DEFAULT_STORE] {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the API's change is read");
        task.abort();
    }
}
