//! Secret stores (Dapr's `secretstores.*` components) and
//! `/v1.0/secrets/{store}/{name}` and `/v1.0/secrets/{store}/bulk`
//! (<https://docs.dapr.io/reference/api/secrets_api/>).
//!
//! - `secretstores.local.file`: a JSON file (metadata `secretsFile`; a
//!   relative path is relative to the components directory, or to the
//!   runtime's state directory when there is none, e.g. components from the
//!   Kubernetes API). Nested objects and arrays are flattened with
//!   `nestedSeparator` (default `:`) into one secret per leaf, as Dapr's
//!   local file store does; with `multiValued: "true"` each top-level key
//!   is one secret whose keys are its flattened contents. The file is read
//!   on every request (it is small), so a change is seen at once.
//! - `secretstores.kubernetes`: the Kubernetes Secrets of the **caller's
//!   own namespace** (through [`Secrets`], which the agent implements from
//!   the API or, standalone, from `kind: Secret` documents). Dapr lets a
//!   request name another namespace (`metadata.namespace`); this runtime
//!   never does: a shared runtime must not let one namespace's pods read
//!   another's Secrets. A caller that is not a pod has no namespace and is
//!   refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use nodeplane_state::ComponentSpec;
use serde_json::Value;

use crate::dapr::{json_response, ApiError};
use crate::server::{Body, Caller};
use crate::Runtime;

/// One secret's values: key → value.
pub type SecretValues = BTreeMap<String, String>;

/// The node's Kubernetes Secrets, as the agent knows them. Values are the
/// Secret's `data` (decoded) and `stringData`.
#[async_trait::async_trait]
pub trait Secrets: Send + Sync + std::fmt::Debug {
    /// Secret `name` of `namespace`; `Ok(None)` when it does not exist.
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<SecretValues>, String>;
    /// Every Secret of `namespace`, by name.
    async fn list(&self, namespace: &str) -> Result<BTreeMap<String, SecretValues>, String>;
}

/// What reading components needs to resolve secrets.
#[derive(Debug, Clone, Default)]
pub struct SecretsContext {
    /// The Kubernetes Secrets (None: `secretstores.kubernetes` answers
    /// that the agent has none).
    pub provider: Option<Arc<dyn Secrets>>,
    /// The agent reads the Kubernetes API: a store named
    /// [`DEFAULT_SECRET_STORE`] is defined when no component defines it,
    /// and `secretKeyRef` without `auth.secretStore` reads from it.
    pub kubernetes: bool,
    /// Where relative `secretsFile` paths start (None: the state dir).
    pub base_dir: Option<PathBuf>,
}

/// The secret store Dapr defines in Kubernetes mode.
pub const DEFAULT_SECRET_STORE: &str = "kubernetes";

/// A secret store's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    LocalFile {
        path: PathBuf,
        separator: String,
        multi_valued: bool,
    },
    Kubernetes,
}

/// One entry of a Configuration's `spec.secrets.scopes`: which secrets of
/// `storeName` the apps using that Configuration may read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretScope {
    pub store_name: String,
    /// `allow` (the default) or `deny`.
    #[serde(default)]
    pub default_access: Option<String>,
    #[serde(default)]
    pub allowed_secrets: Vec<String>,
    #[serde(default)]
    pub denied_secrets: Vec<String>,
}

impl SecretScope {
    /// Dapr's rule: a non-empty `allowedSecrets` is the whole answer;
    /// else a secret in `deniedSecrets` is refused; else `defaultAccess`.
    pub fn allows(&self, secret: &str) -> bool {
        if !self.allowed_secrets.is_empty() {
            return self.allowed_secrets.iter().any(|s| s == secret);
        }
        if self.denied_secrets.iter().any(|s| s == secret) {
            return false;
        }
        !self
            .default_access
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case("deny"))
    }
}

/// May `caller` read `secret` of `store` under its Configuration's
/// secret scopes (no Configuration, or no scope for the store: yes)?
fn allowed(reg: &crate::components::Registry, caller: &Caller, store: &str, secret: &str) -> bool {
    let Caller::Pod(p) = caller else {
        return true;
    };
    let Some(config) = p.config.as_deref() else {
        return true;
    };
    reg.secret_scopes(config, &p.namespace)
        .iter()
        .filter(|s| s.store_name == store)
        .all(|s| s.allows(secret))
}

/// One secret store in service.
#[derive(Debug, Clone)]
pub struct SecretComponent {
    pub spec: ComponentSpec,
    pub namespace: Option<String>,
    pub scopes: Vec<String>,
    pub backend: Backend,
}

/// Why a secret could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretError {
    /// The caller has no namespace (not a pod) for a Kubernetes store.
    NoNamespace(String),
    /// The store failed (file unreadable, API down).
    Failed(String),
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretError::NoNamespace(m) | SecretError::Failed(m) => f.write_str(m),
        }
    }
}

impl Backend {
    /// The backend a component's spec describes; `base` is where a
    /// relative `secretsFile` starts. The message names the field.
    pub fn of(spec: &ComponentSpec, base: &Path) -> Result<Backend, String> {
        let field = |k: &str| {
            spec.metadata
                .get(k)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        match spec.kind.as_str() {
            "secretstores.local.file" => {
                let file = field("secretsFile").ok_or(
                    "metadata secretsFile is required: the path of a JSON file of secrets",
                )?;
                let multi_valued = match field("multiValued") {
                    None => false,
                    Some(v) if v.eq_ignore_ascii_case("true") => true,
                    Some(v) if v.eq_ignore_ascii_case("false") => false,
                    Some(v) => {
                        return Err(format!(
                            "metadata multiValued {v:?} is not a boolean; write \"true\" or \"false\""
                        ))
                    }
                };
                let backend = Backend::LocalFile {
                    path: base.join(file),
                    separator: spec
                        .metadata
                        .get("nestedSeparator")
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .unwrap_or_else(|| ":".into()),
                    multi_valued,
                };
                // As Dapr's Init: a file that cannot be read fails the component.
                backend.read_file()?;
                Ok(backend)
            }
            "secretstores.kubernetes" => Ok(Backend::Kubernetes),
            other => Err(format!(
                "spec.type {other} is not supported; use secretstores.local.file or secretstores.kubernetes"
            )),
        }
    }

    fn read_file(&self) -> Result<BTreeMap<String, SecretValues>, String> {
        let Backend::LocalFile {
            path,
            separator,
            multi_valued,
        } = self
        else {
            return Ok(BTreeMap::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("metadata secretsFile {}: {e}", path.display()))?;
        parse_file(&text, separator, *multi_valued)
            .map_err(|e| format!("metadata secretsFile {}: {e}", path.display()))
    }
}

/// A local secrets file's secrets, flattened as Dapr's local file store
/// does (see the module doc). Numbers and booleans become their JSON
/// text, null an empty string.
pub fn parse_file(
    text: &str,
    separator: &str,
    multi_valued: bool,
) -> Result<BTreeMap<String, SecretValues>, String> {
    let top: serde_json::Map<String, Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let mut out = BTreeMap::new();
    if multi_valued {
        for (name, v) in top {
            match v {
                Value::String(s) => {
                    out.insert(name.clone(), SecretValues::from([(name, s)]));
                }
                Value::Object(_) => {
                    let mut values = SecretValues::new();
                    flatten(&mut values, None, &v, separator)?;
                    out.insert(name, values);
                }
                // Dapr's store keeps only strings and objects at the top.
                _ => {}
            }
        }
    } else {
        let mut flat = SecretValues::new();
        flatten(&mut flat, None, &Value::Object(top), separator)?;
        for (k, v) in flat {
            out.insert(k.clone(), SecretValues::from([(k, v)]));
        }
    }
    Ok(out)
}

fn flatten(out: &mut SecretValues, path: Option<&str>, v: &Value, sep: &str) -> Result<(), String> {
    let join = |k: &str| match path {
        Some(p) => format!("{p}{sep}{k}"),
        None => k.to_string(),
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(out, Some(&join(k)), v, sep)?;
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(out, Some(&join(&i.to_string())), v, sep)?;
            }
        }
        leaf => {
            let key = path.unwrap_or_default().to_string();
            let text = match leaf {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            if out.insert(key.clone(), text).is_some() {
                return Err(format!(
                    "key {key:?} occurs twice once nested keys are joined with {sep:?}"
                ));
            }
        }
    }
    Ok(())
}

impl SecretComponent {
    pub fn visible_to(&self, app: Option<&str>, namespace: Option<&str>) -> bool {
        crate::components::visible(self.namespace.as_deref(), &self.scopes, app, namespace)
    }

    /// Secret `name` as a caller of `namespace` reads it.
    pub async fn get(
        &self,
        provider: Option<&dyn Secrets>,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<SecretValues>, SecretError> {
        match &self.backend {
            Backend::LocalFile { .. } => Ok(self
                .backend
                .read_file()
                .map_err(SecretError::Failed)?
                .remove(name)),
            Backend::Kubernetes => {
                // The name goes into an API path: only what Kubernetes
                // allows in an object name, so `../` can never reach
                // another namespace's Secret.
                if !is_object_name(name) {
                    return Err(SecretError::Failed(format!(
                        "{name:?} is not a Kubernetes Secret name (lowercase letters, digits, '-' and '.')"
                    )));
                }
                let (p, ns) = self.kubernetes(provider, namespace)?;
                p.get(ns, name).await.map_err(SecretError::Failed)
            }
        }
    }

    /// Every secret a caller of `namespace` can read from the store.
    pub async fn bulk(
        &self,
        provider: Option<&dyn Secrets>,
        namespace: Option<&str>,
    ) -> Result<BTreeMap<String, SecretValues>, SecretError> {
        match &self.backend {
            Backend::LocalFile { .. } => self.backend.read_file().map_err(SecretError::Failed),
            Backend::Kubernetes => {
                let (p, ns) = self.kubernetes(provider, namespace)?;
                p.list(ns).await.map_err(SecretError::Failed)
            }
        }
    }

    fn kubernetes<'a>(
        &self,
        provider: Option<&'a dyn Secrets>,
        namespace: Option<&'a str>,
    ) -> Result<(&'a dyn Secrets, &'a str), SecretError> {
        let ns = namespace.ok_or_else(|| {
            SecretError::NoNamespace(format!(
                "secret store {} (secretstores.kubernetes) serves the Secrets of the calling pod's own namespace, and the caller is not a pod",
                self.spec.name
            ))
        })?;
        let p = provider.ok_or_else(|| {
            SecretError::Failed(format!(
                "secret store {}: this agent has no source of Kubernetes Secrets",
                self.spec.name
            ))
        })?;
        Ok((p, ns))
    }
}

/// A DNS-subdomain object name, as Kubernetes requires of a Secret's.
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// `GET /v1.0/secrets/{store}/{name}` and `.../bulk`; `tail` is what
/// follows `/v1.0/secrets/`.
pub async fn handle(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match route(rt, caller, tail, &req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (store, name) = match tail.split_once('/') {
        Some((s, n)) if !s.is_empty() && !n.is_empty() && req.method() == Method::GET => (s, n),
        _ => {
            return Err(ApiError::not_found(&format!("/v1.0/secrets/{tail}")));
        }
    };
    let reg = rt.registry();
    if reg.secret_stores.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_SECRET_STORES_NOT_CONFIGURED",
            "secret store is not configured",
        ));
    }
    let comp = reg
        .secret_store(store, caller.app_id(), caller.namespace())
        .ok_or_else(|| {
            // Dapr answers 401 here.
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "ERR_SECRET_STORE_NOT_FOUND",
                format!("failed finding secret store with key {store}"),
            )
        })?;
    let provider = rt.secrets();
    let failed = |e: SecretError, what: String| match e {
        SecretError::NoNamespace(m) => {
            ApiError::new(StatusCode::FORBIDDEN, "ERR_PERMISSION_DENIED", m)
        }
        SecretError::Failed(m) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_SECRET_GET",
            format!("{what}: {m}"),
        ),
    };
    let body = if name == "bulk" {
        let mut all = comp
            .bulk(provider.as_deref(), caller.namespace())
            .await
            .map_err(|e| {
                failed(
                    e,
                    format!("failed getting secrets from secret store {store}"),
                )
            })?;
        // As Dapr: a bulk read leaves out what the scopes deny.
        all.retain(|secret, _| allowed(&reg, caller, store, secret));
        serde_json::to_vec(&all)
    } else {
        if !allowed(&reg, caller, store, name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "ERR_PERMISSION_DENIED",
                format!("access denied by policy to get {name:?} from {store:?}"),
            ));
        }
        let what = || format!("failed getting secret with key {name} from secret store {store}");
        let one = comp
            .get(provider.as_deref(), caller.namespace(), name)
            .await
            .map_err(|e| failed(e, what()))?
            .ok_or_else(|| {
                failed(
                    SecretError::Failed(format!("secret {name} not found")),
                    what(),
                )
            })?;
        serde_json::to_vec(&one)
    };
    Ok(json_response(
        StatusCode::OK,
        body.unwrap_or_default().into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{
        "redisPassword": "pw",
        "db": {"user": "u", "pass": {"current": "p1"}},
        "hosts": ["a", "b"],
        "port": 6379,
        "on": true
    }"#;

    #[test]
    fn a_file_is_flattened_into_one_secret_per_leaf() {
        let s = parse_file(FILE, ":", false).expect("parse");
        assert_eq!(
            s["redisPassword"],
            SecretValues::from([("redisPassword".into(), "pw".into())])
        );
        assert_eq!(s["db:pass:current"]["db:pass:current"], "p1");
        assert_eq!(s["db:user"]["db:user"], "u");
        assert_eq!(s["hosts:1"]["hosts:1"], "b");
        assert_eq!(s["port"]["port"], "6379");
        assert_eq!(s["on"]["on"], "true");
        assert!(!s.contains_key("db"));
        let dots = parse_file(FILE, ".", false).expect("parse");
        assert!(dots.contains_key("db.pass.current"));
    }

    #[test]
    fn multi_valued_keeps_top_level_secrets_with_flattened_keys() {
        let s = parse_file(FILE, ":", true).expect("parse");
        assert_eq!(
            s["db"],
            SecretValues::from([
                ("pass:current".into(), "p1".into()),
                ("user".into(), "u".into())
            ])
        );
        assert_eq!(s["redisPassword"]["redisPassword"], "pw");
        // As Dapr: only strings and objects at the top.
        assert!(!s.contains_key("port") && !s.contains_key("hosts"));
    }

    #[tokio::test]
    async fn a_kubernetes_store_refuses_callers_without_a_namespace() {
        let c = SecretComponent {
            spec: ComponentSpec {
                name: "kubernetes".into(),
                kind: "secretstores.kubernetes".into(),
                ..ComponentSpec::default()
            },
            namespace: None,
            scopes: Vec::new(),
            backend: Backend::Kubernetes,
        };
        let e = c.get(None, None, "db").await.expect_err("refused");
        assert!(
            matches!(&e, SecretError::NoNamespace(m) if m.contains("not a pod")),
            "{e}"
        );
        for bad in ["../default/secrets/db", "a/b", "..", "Db", "db%2F"] {
            let e = c
                .get(None, Some("shop"), bad)
                .await
                .expect_err("not a name");
            assert!(
                e.to_string().contains("not a Kubernetes Secret name"),
                "{e}"
            );
        }
        let e = c.bulk(None, Some("shop")).await.expect_err("no provider");
        assert!(matches!(e, SecretError::Failed(_)), "{e}");
    }

    #[test]
    fn secret_scopes_follow_dapr_rules() {
        let scope = |v: Value| -> SecretScope { serde_json::from_value(v).expect("scope") };
        let open = scope(serde_json::json!({"storeName": "s", "deniedSecrets": ["x"]}));
        assert!(open.allows("a") && !open.allows("x"));
        let closed = scope(serde_json::json!({"storeName": "s", "defaultAccess": "deny"}));
        assert!(!closed.allows("a"));
        let listed = scope(serde_json::json!({
            "storeName": "s", "defaultAccess": "deny",
            "allowedSecrets": ["a"], "deniedSecrets": ["a"],
        }));
        assert!(
            listed.allows("a") && !listed.allows("b"),
            "allowedSecrets wins"
        );
        assert!(serde_json::from_value::<SecretScope>(
            serde_json::json!({"storeName": "s", "allowed": []})
        )
        .is_err());
    }

    #[test]
    fn bad_files_are_reported() {
        assert!(parse_file("[1]", ":", false)
            .expect_err("an error")
            .contains("JSON object"));
        let dup = parse_file(r#"{"a:b": "1", "a": {"b": "2"}}"#, ":", false).expect_err("an error");
        assert!(dup.contains("twice"), "{dup}");
        let spec = |meta: &[(&str, &str)]| ComponentSpec {
            name: "files".into(),
            kind: "secretstores.local.file".into(),
            version: "v1".into(),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let base = Path::new("/nonexistent-np");
        assert!(Backend::of(&spec(&[]), base)
            .expect_err("an error")
            .contains("secretsFile"));
        let e = Backend::of(&spec(&[("secretsFile", "s.json")]), base).expect_err("an error");
        assert!(e.contains("/nonexistent-np/s.json"), "{e}");
        let e = Backend::of(
            &spec(&[("secretsFile", "s.json"), ("multiValued", "yes")]),
            base,
        )
        .expect_err("an error");
        assert!(e.contains("multiValued"), "{e}");
    }
}
