//! The Kubernetes Secrets the app runtime reads (`secretstores.kubernetes`,
//! components' `secretKeyRef`): from the API with source `kube`, or in
//! standalone mode from `kind: Secret` (apiVersion `v1`) documents in the
//! manifests directory. Either way a Secret's values are its `data`
//! (base64-decoded; k8s-openapi's `ByteString` decodes it) and its
//! `stringData`, which wins on a key in both, as the API server merges
//! them. Which namespace is asked is the runtime's decision (the caller's
//! own); this module only answers.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Secret;
use nodeplane_runtime::secrets::SecretValues;
use serde_json::Value;

/// A Secret's values.
fn values(s: &Secret) -> SecretValues {
    let mut out: SecretValues = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    out.extend(
        s.string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    out
}

/// Whether a manifest document is a core Secret (the manifests source
/// skips them: they are not the model's).
pub fn is_secret(doc: &Value) -> bool {
    doc.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && doc.get("kind").and_then(Value::as_str) == Some("Secret")
}

/// The Secrets of one manifest file's text: (namespace, name) → values.
/// Documents that are not Secrets, and Secrets that do not parse, are
/// skipped (the manifests source reports broken files).
pub fn secrets_in(text: &str) -> Vec<((String, String), SecretValues)> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).unwrap_or_default();
    let mut out = Vec::new();
    let mut take = |doc: &Value| {
        if !is_secret(doc) {
            return;
        }
        if let Ok(s) = serde_json::from_value::<Secret>(doc.clone()) {
            let ns = s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            if let Some(name) = s.metadata.name.clone().filter(|n| !n.is_empty()) {
                out.push(((ns, name), values(&s)));
            }
        }
    };
    for doc in &docs {
        match doc.get("items").and_then(Value::as_array) {
            Some(items)
                if doc
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                items.iter().for_each(&mut take)
            }
            _ => take(doc),
        }
    }
    out
}

/// Standalone mode: the manifests directory's Secrets, read on each
/// request (the directory is small, and a change is seen at once).
#[derive(Debug)]
pub struct ManifestSecrets {
    pub dir: PathBuf,
}

impl ManifestSecrets {
    fn namespace(&self, namespace: &str) -> Result<BTreeMap<String, SecretValues>, String> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("read {}: {e}", self.dir.display()))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !n.starts_with('.')
                    && (n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".json"))
            })
            .collect();
        files.sort();
        let mut out = BTreeMap::new();
        for f in files {
            // A file removed meanwhile is simply not there.
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            if !text.contains("Secret") {
                continue;
            }
            for ((ns, name), v) in secrets_in(&text) {
                // The last file (in name order) that holds it wins, as in
                // the manifests source.
                if ns == namespace {
                    out.insert(name, v);
                }
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl nodeplane_runtime::Secrets for ManifestSecrets {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<SecretValues>, String> {
        Ok(self.namespace(namespace)?.remove(name))
    }

    async fn list(&self, namespace: &str) -> Result<BTreeMap<String, SecretValues>, String> {
        self.namespace(namespace)
    }
}

/// Kubernetes mode: Secrets from the API (RBAC: `get`, and `list` for
/// bulk reads, on `secrets`; see deploy/daemonset/rbac-dapr.yaml).
#[derive(Clone)]
pub struct KubeSecrets {
    pub client: kube::Client,
}

impl std::fmt::Debug for KubeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSecrets").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl nodeplane_runtime::Secrets for KubeSecrets {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<SecretValues>, String> {
        let api = kube::Api::<Secret>::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map(|s| s.as_ref().map(values))
            .map_err(|e| format!("Kubernetes API: get Secret {namespace}/{name}: {e}"))
    }

    async fn list(&self, namespace: &str) -> Result<BTreeMap<String, SecretValues>, String> {
        let api = kube::Api::<Secret>::namespaced(self.client.clone(), namespace);
        let list = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| format!("Kubernetes API: list Secrets of {namespace}: {e}"))?;
        Ok(list
            .items
            .iter()
            .filter_map(|s| Some((s.metadata.name.clone()?, values(s))))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeplane_runtime::Secrets;

    const DIR: &str = "apiVersion: v1
kind: Secret
metadata: {name: db, namespace: shop}
data: {password: aHVudGVyMg==, user: YQ==}
stringData: {user: b}
---
apiVersion: v1
kind: Secret
metadata: {name: db}
stringData: {password: other}
---
apiVersion: v1
kind: Pod
metadata: {name: p}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Secret, metadata: {name: listed, namespace: shop}, stringData: {k: v}}
";

    #[test]
    fn secrets_are_read_with_data_decoded_and_string_data_winning() {
        let s: BTreeMap<_, _> = secrets_in(DIR).into_iter().collect();
        let db = &s[&("shop".to_string(), "db".to_string())];
        assert_eq!(db["password"], "hunter2");
        assert_eq!(db["user"], "b");
        assert_eq!(
            s[&("default".to_string(), "db".to_string())]["password"],
            "other"
        );
        assert_eq!(s[&("shop".to_string(), "listed".to_string())]["k"], "v");
        assert_eq!(s.len(), 3);
    }

    /// A test double of the API server: answers Secret gets and lists of
    /// namespace shop from `secrets`, 404 for anything else, one request
    /// per connection; records the paths asked.
    async fn api_double(
        secrets: Vec<Value>,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let path = path.split('?').next().unwrap_or("").to_string();
                log.lock().expect("log").push(path.clone());
                let prefix = "/api/v1/namespaces/shop/secrets";
                let (status, body) = if path == prefix {
                    (
                        "200 OK",
                        serde_json::json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": secrets}),
                    )
                } else if let Some(s) = path
                    .strip_prefix(prefix)
                    .and_then(|n| n.strip_prefix('/'))
                    .and_then(|n| secrets.iter().find(|s| s["metadata"]["name"] == n))
                {
                    ("200 OK", s.clone())
                } else {
                    (
                        "404 Not Found",
                        serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    )
                };
                let body = body.to_string();
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes()).await;
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn kube_secrets_are_read_from_the_namespace_asked() {
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db", "namespace": "shop"},
            "data": {"password": "aHVudGVyMg=="},
        });
        let (url, seen) = api_double(vec![secret]).await;
        let client = crate::source::kube::client_from_url(&url)
            .await
            .expect("client");
        let k = KubeSecrets { client };
        assert_eq!(
            k.get("shop", "db").await.expect("get").expect("db")["password"],
            "hunter2"
        );
        assert!(
            k.get("shop", "nope").await.expect("get").is_none(),
            "404 is None"
        );
        assert!(k.get("default", "db").await.expect("get").is_none());
        let all = k.list("shop").await.expect("list");
        assert_eq!(all.keys().collect::<Vec<_>>(), ["db"]);
        assert_eq!(
            *seen.lock().expect("log"),
            [
                "/api/v1/namespaces/shop/secrets/db",
                "/api/v1/namespaces/shop/secrets/nope",
                "/api/v1/namespaces/default/secrets/db",
                "/api/v1/namespaces/shop/secrets",
            ]
        );
    }

    #[tokio::test]
    async fn a_namespace_sees_only_its_own_secrets() {
        let dir = std::env::temp_dir().join(format!("np-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("s.yaml"), DIR).expect("write");
        let m = ManifestSecrets { dir: dir.clone() };
        assert_eq!(
            m.get("shop", "db").await.expect("get").expect("db")["password"],
            "hunter2"
        );
        assert_eq!(
            m.get("default", "db").await.expect("get").expect("db")["password"],
            "other"
        );
        assert!(m.get("shop", "nope").await.expect("get").is_none());
        assert!(m.get("other", "db").await.expect("get").is_none());
        let all = m.list("shop").await.expect("list");
        assert_eq!(all.keys().collect::<Vec<_>>(), ["db", "listed"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
