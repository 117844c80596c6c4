//! Dapr `Component` and `Configuration` manifests (apiVersion
//! `dapr.io/v1alpha1`) from a directory, re-read when a file changes.
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
use crate::{Error, Result};

/// The state store every app gets without any component: Dapr's usual
/// name, backed by the embedded store under the agent's state directory.
pub const DEFAULT_STORE: &str = "statestore";

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

impl StateComponent {
    /// May an app (`app`, `namespace`) use this store?
    pub fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|n| Some(n) == namespace);
        let scope_ok =
            self.scopes.is_empty() || app.is_some_and(|a| self.scopes.iter().any(|s| s == a));
        ns_ok && scope_ok
    }
}

/// What the manifests currently configure.
#[derive(Debug, Default)]
pub struct Registry {
    pub stores: BTreeMap<String, StateComponent>,
    /// Configuration name → its access control.
    pub configs: BTreeMap<String, AccessControl>,
    /// Problems of the last read (file, document, what is wrong).
    pub errors: Vec<String>,
}

/// One parsed document of interest.
#[derive(Debug, Clone, PartialEq)]
enum Doc {
    State {
        spec: ComponentSpec,
        namespace: Option<String>,
        scopes: Vec<String>,
    },
    Config {
        name: String,
        acl: AccessControl,
    },
}

/// Parses the Dapr documents of one file's text; other documents are
/// skipped. Errors name the document and the field.
fn parse_docs(path: &Path, text: &str) -> (Vec<Doc>, Vec<String>) {
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let values: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, options) {
        Ok(v) => v,
        Err(e) => {
            // The agent reports unreadable YAML for its own kinds too; a
            // file with no Dapr document in it is not ours to judge.
            if text.contains("dapr.io/") {
                errors.push(format!("{}: not valid YAML: {e}", path.display()));
            }
            return (docs, errors);
        }
    };
    for (i, v) in values.into_iter().enumerate() {
        let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if !api.starts_with("dapr.io/") {
            continue;
        }
        let at = format!("{} document {}", path.display(), i + 1);
        match doc(&v) {
            Ok(Some(d)) => docs.push(d),
            Ok(None) => {}
            Err(m) => errors.push(format!("{at}: {m}")),
        }
    }
    (docs, errors)
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
            if !kind_s.starts_with("state.") {
                // pub/sub, bindings, secrets: a later part of the runtime.
                return Ok(None);
            }
            let mut metadata = BTreeMap::new();
            for item in v
                .pointer("/spec/metadata")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = item.get("name").and_then(Value::as_str).ok_or_else(|| {
                    format!("Component {name}: a spec.metadata entry has no name")
                })?;
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
            Ok(Some(Doc::State {
                spec: ComponentSpec {
                    name: name.clone(),
                    kind: kind_s.to_string(),
                    version: v
                        .pointer("/spec/version")
                        .and_then(Value::as_str)
                        .unwrap_or("v1")
                        .to_string(),
                    metadata,
                },
                namespace: v
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                scopes,
            }))
        }
        "Configuration" => {
            let acl = match v.pointer("/spec/accessControl") {
                Some(a) => serde_json::from_value(a.clone())
                    .map_err(|e| format!("Configuration {name}: spec.accessControl: {e}"))?,
                None => AccessControl::default(),
            };
            Ok(Some(Doc::Config { name, acl }))
        }
        _ => Ok(None),
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

/// Reads the directory into a registry, reusing `prev`'s open stores whose
/// spec is unchanged.
pub async fn load(dir: &Path, state_dir: &Path, prev: &Registry) -> Registry {
    let mut reg = Registry::default();
    let mut docs = Vec::new();
    for (path, _, _) in stamps(dir) {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (d, e) = parse_docs(&path, &text);
                docs.extend(d);
                reg.errors.extend(e);
            }
            Err(e) => reg.errors.push(format!("{}: {e}", path.display())),
        }
    }
    if !docs
        .iter()
        .any(|d| matches!(d, Doc::State { spec, .. } if spec.name == DEFAULT_STORE))
    {
        docs.push(Doc::State {
            spec: ComponentSpec {
                name: DEFAULT_STORE.into(),
                kind: "state.embedded".into(),
                version: "v1".into(),
                metadata: BTreeMap::new(),
            },
            namespace: None,
            scopes: Vec::new(),
        });
    }
    for d in docs {
        match d {
            Doc::Config { name, acl } => {
                reg.configs.insert(name, acl);
            }
            Doc::State {
                spec,
                namespace,
                scopes,
            } => {
                if reg.stores.contains_key(&spec.name) {
                    reg.errors.push(format!(
                        "component {} is defined twice; the first definition is used",
                        spec.name
                    ));
                    continue;
                }
                let store = match prev.stores.get(&spec.name) {
                    Some(old) if old.spec == spec => old.store.clone(),
                    _ => match nodeplane_state::open(&spec, state_dir).await {
                        Ok(s) => s,
                        Err(e) => {
                            reg.errors.push(format!("component {}: {e}", spec.name));
                            continue;
                        }
                    },
                };
                let key_prefix =
                    KeyPrefix::parse(spec.metadata.get("keyPrefix").map(String::as_str));
                reg.stores.insert(
                    spec.name.clone(),
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
    reg
}

/// Keeps `target` current with `dir`: reads it now (then fires `loaded`),
/// then again whenever a file's size or mtime changes (checked every
/// `every`).
pub async fn watch(
    dir: PathBuf,
    state_dir: PathBuf,
    target: Arc<std::sync::RwLock<Arc<Registry>>>,
    every: Duration,
    loaded: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| Error::io(format!("create {}", state_dir.display()), e))?;
    let mut loaded = Some(loaded);
    let mut seen: Option<Vec<Stamp>> = None;
    loop {
        let now = stamps(&dir);
        if seen.as_ref() != Some(&now) {
            let prev = target.read().unwrap_or_else(|e| e.into_inner()).clone();
            let next = load(&dir, &state_dir, &prev).await;
            tracing::info!(
                stores = next.stores.len(),
                configurations = next.configs.len(),
                errors = next.errors.len(),
                "app runtime components loaded"
            );
            *target.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            seen = Some(now);
            if let Some(tx) = loaded.take() {
                let _ = tx.send(());
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(docs.len(), 2, "{docs:?}");
        match &docs[0] {
            Doc::State {
                spec,
                namespace,
                scopes,
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
            matches!(&docs[1], Doc::Config { name, acl } if name == "acl" && acl.policies.len() == 1)
        );
    }
}
