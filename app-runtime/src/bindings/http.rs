//! `bindings.http` (<https://docs.dapr.io/reference/components-reference/supported-bindings/http/>):
//! one HTTP/1.1 request to the component's `url` per invocation.
//!
//! - the operation is the method (`create` is POST, as in Dapr); only
//!   post, put and patch send `data`;
//! - request metadata `path` is appended to `url`; every metadata key that
//!   starts with a capital letter is a request header (Dapr's rule), and
//!   `traceparent` / `tracestate` / `baggage` go on as headers;
//!   `Content-Type` (for a body) and `Accept` default to
//!   `application/json; charset=utf-8`;
//! - the answer's body is the binding's data; its metadata is `statusCode`,
//!   `status` and every response header;
//! - a status outside 2xx is an error (`received status code N`) unless
//!   `errorIfNot2XX` is false (component or request metadata);
//! - component metadata: `url` (required, `http://`), `responseTimeout`
//!   (none by default, as in Dapr), `maxResponseBodySize` (default 100Mi),
//!   `securityToken` with `securityTokenHeader`, `errorIfNot2XX`.
//!
//! Only plain `http://` targets: `https://` (and the `MTLS*` keys) are
//! refused with a message, as this runtime has no TLS client for them.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use nodeplane_state::ComponentSpec;

use super::{Failure, InvokeRequest, InvokeResponse, OpenError};
use crate::Runtime;

pub const OPERATIONS: &[&str] = &[
    "create", "get", "head", "post", "put", "patch", "delete", "options", "trace",
];

/// Dapr's default `maxResponseBodySize`.
const DEFAULT_MAX_BODY: usize = 100 << 20;
/// How long connecting to the target may take (Dapr's dialer: 15 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBinding {
    /// `url` as configured (without a trailing path change).
    url: String,
    /// `host[:port]` of the url, for connecting and the Host header.
    authority: String,
    host: String,
    port: u16,
    timeout: Option<Duration>,
    max_body: usize,
    error_if_not_2xx: bool,
    token: Option<(HeaderName, HeaderValue)>,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "t" | "y" | "yes" | "on"
    )
}

/// `100Mi`, `1Gi`, `512k`, `1048576`: bytes.
fn byte_size(v: &str) -> Option<usize> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: usize = n.parse().ok()?;
    let scale: usize = match unit.trim() {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

impl HttpBinding {
    pub fn open(spec: &ComponentSpec) -> Result<HttpBinding, OpenError> {
        let bad = |m: String| OpenError::Config(format!("{} (bindings.http): {m}", spec.name));
        let get = |k: &str| {
            spec.metadata
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let url = get("url").ok_or_else(|| {
            bad(
                "metadata url is required: the base URL to call, e.g. http://orders.shop:8080/api"
                    .into(),
            )
        })?;
        if url.starts_with("https://")
            || ["MTLSRootCA", "MTLSClientCert", "MTLSClientKey"]
                .iter()
                .any(|k| get(k).is_some())
        {
            return Err(bad(format!(
                "metadata url {url:?}: https and the MTLS* keys are not supported by this runtime; use an http:// URL"
            )));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad(format!("metadata url {url:?} must start with http://")))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("").to_string();
        let auth: http::uri::Authority = authority
            .parse()
            .map_err(|e| bad(format!("metadata url {url:?}: the host is not valid: {e}")))?;
        if auth.host().is_empty() {
            return Err(bad(format!("metadata url {url:?} has no host")));
        }
        let host = auth
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = auth.port_u16().unwrap_or(80);
        let timeout = match get("responseTimeout") {
            None => None,
            Some(v) => Some(
                nodeplane_pubsub::parse_duration(v)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        bad(format!(
                            "metadata responseTimeout {v:?} is not a duration (e.g. 30s, 1m)"
                        ))
                    })?,
            ),
        };
        let max_body = match get("maxResponseBodySize") {
            None => DEFAULT_MAX_BODY,
            Some(v) => match byte_size(v) {
                Some(0) => usize::MAX,
                Some(n) => n,
                None => {
                    return Err(bad(format!(
                        "metadata maxResponseBodySize {v:?} is not a size (e.g. 100Mi, 1048576)"
                    )))
                }
            },
        };
        let token = match (get("securityToken"), get("securityTokenHeader")) {
            (Some(t), Some(h)) => Some((
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    bad(format!(
                        "metadata securityTokenHeader {h:?} is not a header name"
                    ))
                })?,
                HeaderValue::from_str(t).map_err(|_| {
                    bad("metadata securityToken is not a valid header value".into())
                })?,
            )),
            _ => None,
        };
        Ok(HttpBinding {
            url: url.to_string(),
            authority,
            host,
            port,
            timeout,
            max_body,
            error_if_not_2xx: get("errorIfNot2XX").is_none_or(truthy),
            token,
        })
    }

    /// The request an invocation sends (without connecting anywhere).
    pub fn request(&self, req: &InvokeRequest) -> Result<Request<Bytes>, String> {
        let method = match req.operation.to_ascii_uppercase().as_str() {
            "CREATE" | "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            "DELETE" => Method::DELETE,
            "OPTIONS" => Method::OPTIONS,
            "TRACE" => Method::TRACE,
            _ => return Err(format!("invalid operation: {}", req.operation)),
        };
        let mut url = self.url.clone();
        if let Some(p) = req.metadata.get("path").filter(|p| !p.is_empty()) {
            url = format!(
                "{}/{}",
                url.trim_end_matches('/'),
                p.trim_start_matches('/')
            );
        }
        let rest = url.strip_prefix("http://").unwrap_or(&url);
        let target = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => rest[i..].to_string(),
            Some(i) => format!("/{}", &rest[i..]),
            None => "/".to_string(),
        };
        let target = target.split('#').next().unwrap_or("/").to_string();
        let with_body = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        let mut b = Request::builder()
            .method(method)
            .uri(&target)
            .header(http::header::HOST, &self.authority);
        let md = &req.metadata;
        if with_body && !md.contains_key("Content-Type") {
            b = b.header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            );
        }
        if !md.contains_key("Accept") {
            b = b.header(http::header::ACCEPT, "application/json; charset=utf-8");
        }
        let mut r = b
            .body(if with_body {
                req.data.clone()
            } else {
                Bytes::new()
            })
            .map_err(|e| format!("metadata path {target:?}: {e}"))?;
        let h = r.headers_mut();
        if let Some((name, value)) = &self.token {
            h.insert(name.clone(), value.clone());
        }
        for (k, v) in md {
            let upper = k.starts_with(|c: char| c.is_ascii_uppercase());
            let trace = matches!(k.as_str(), "traceparent" | "tracestate" | "baggage");
            if !(upper || trace && !v.is_empty()) {
                continue;
            }
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("metadata {k:?} is not a valid header name"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("metadata {k}: the value is not a valid header value"))?;
            h.insert(name, value);
        }
        Ok(r)
    }

    pub async fn invoke(
        &self,
        rt: &Runtime,
        req: &InvokeRequest,
    ) -> Result<InvokeResponse, Failure> {
        let error_if_not_2xx = req
            .metadata
            .get("errorIfNot2XX")
            .filter(|v| !v.is_empty())
            .map_or(self.error_if_not_2xx, |v| truthy(v));
        let request = self.request(req).map_err(Failure::new)?;
        let addr = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| Failure::new(format!("resolving {}: timed out", self.host)))?
        .map_err(|e| Failure::new(format!("resolving {}: {e}", self.host)))?
        .next()
        .ok_or_else(|| Failure::new(format!("{} has no address", self.host)))?;
        let request = request.map(crate::server::full);
        let limit = self.timeout.unwrap_or(Duration::MAX);
        let (parts, body) = crate::delivery::exchange(rt, addr, request, limit, self.max_body)
            .await
            .map_err(|e| Failure::new(format!("{} {}: {e}", req.operation, self.url)))?;
        let mut metadata = BTreeMap::new();
        metadata.insert("statusCode".to_string(), parts.status.as_u16().to_string());
        metadata.insert("status".to_string(), status_line(parts.status));
        for name in parts.headers.keys() {
            let values: Vec<&str> = parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            metadata.insert(canonical_header(name.as_str()), values.join(", "));
        }
        if error_if_not_2xx && !parts.status.is_success() {
            return Err(Failure {
                message: format!("received status code {}", parts.status.as_u16()),
                metadata,
            });
        }
        Ok(InvokeResponse {
            data: Some(body),
            metadata,
        })
    }
}

/// Go's `resp.Status`: `404 Not Found`.
fn status_line(s: http::StatusCode) -> String {
    match s.canonical_reason() {
        Some(r) => format!("{} {r}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}

/// Go's canonical header form (`content-type` → `Content-Type`), the
/// keys Dapr's HTTP binding reports response headers under.
fn canonical_header(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(md: &[(&str, &str)]) -> ComponentSpec {
        ComponentSpec {
            name: "web".into(),
            kind: "bindings.http".into(),
            version: "v1".into(),
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn req(op: &str, data: &str, md: &[(&str, &str)]) -> InvokeRequest {
        InvokeRequest {
            operation: op.into(),
            data: Bytes::from(data.to_string()),
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn metadata_is_checked_and_names_the_field() {
        let e = HttpBinding::open(&spec(&[])).expect_err("no url");
        assert!(
            e.is_config() && e.to_string().contains("metadata url is required"),
            "{e}"
        );
        let e = HttpBinding::open(&spec(&[("url", "https://x")])).expect_err("https");
        assert!(e.to_string().contains("https"), "{e}");
        let e = HttpBinding::open(&spec(&[("url", "ftp://x")])).expect_err("ftp");
        assert!(e.to_string().contains("http://"), "{e}");
        let e = HttpBinding::open(&spec(&[("url", "http://x"), ("responseTimeout", "soon")]))
            .expect_err("timeout");
        assert!(e.to_string().contains("responseTimeout"), "{e}");
        let b = HttpBinding::open(&spec(&[
            ("url", "http://10.0.0.5:8080/api"),
            ("responseTimeout", "5s"),
            ("maxResponseBodySize", "1Mi"),
        ]))
        .expect("open");
        assert_eq!((b.host.as_str(), b.port), ("10.0.0.5", 8080));
        assert_eq!(b.timeout, Some(Duration::from_secs(5)));
        assert_eq!(b.max_body, 1 << 20);
        assert!(b.error_if_not_2xx);
        let b = HttpBinding::open(&spec(&[("url", "http://svc"), ("errorIfNot2XX", "false")]))
            .expect("open");
        assert_eq!((b.port, b.timeout, b.error_if_not_2xx), (80, None, false));
    }

    #[test]
    fn requests_are_built_as_dapr_builds_them() {
        let b = HttpBinding::open(&spec(&[
            ("url", "http://10.0.0.5:8080/api/"),
            ("securityToken", "s3cret"),
            ("securityTokenHeader", "X-Token"),
        ]))
        .expect("open");
        let r = b
            .request(&req(
                "create",
                r#"{"a":1}"#,
                &[
                    ("path", "/orders/7?x=1"),
                    ("X-Extra", "yes"),
                    ("lowercase", "not a header"),
                    (
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    ),
                ],
            ))
            .expect("request");
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri(), "/api/orders/7?x=1");
        let h = r.headers();
        assert_eq!(h["host"], "10.0.0.5:8080");
        assert_eq!(h["content-type"], "application/json; charset=utf-8");
        assert_eq!(h["accept"], "application/json; charset=utf-8");
        assert_eq!(h["x-token"], "s3cret");
        assert_eq!(h["x-extra"], "yes");
        assert!(h.get("lowercase").is_none() && h.get("path").is_none());
        assert!(h["traceparent"]
            .to_str()
            .is_ok_and(|t| t.starts_with("00-4bf9")));
        assert_eq!(&r.body()[..], br#"{"a":1}"#);

        // GET sends no body; the caller's Content-Type and Accept win.
        let r = b
            .request(&req("get", "null", &[("Accept", "text/plain")]))
            .expect("get");
        assert_eq!((r.method(), r.uri().path()), (&Method::GET, "/api/"));
        assert!(r.body().is_empty());
        assert!(r.headers().get("content-type").is_none());
        assert_eq!(r.headers()["accept"], "text/plain");
        let r = b
            .request(&req("PUT", "\"x\"", &[("Content-Type", "text/plain")]))
            .expect("put");
        assert_eq!(r.method(), Method::PUT);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(&r.body()[..], b"\"x\"");
        assert!(b.request(&req("fly", "", &[])).is_err());

        let bare = HttpBinding::open(&spec(&[("url", "http://svc")])).expect("open");
        let r = bare
            .request(&req("delete", "", &[("path", "items/1")]))
            .expect("delete");
        assert_eq!(r.uri().path(), "/items/1");
        assert_eq!(r.headers()["host"], "svc");
    }

    #[test]
    fn header_names_and_sizes() {
        assert_eq!(canonical_header("content-type"), "Content-Type");
        assert_eq!(canonical_header("x-echo-h-x-a"), "X-Echo-H-X-A");
        assert_eq!(status_line(http::StatusCode::NOT_FOUND), "404 Not Found");
        assert_eq!(byte_size("100Mi"), Some(100 << 20));
        assert_eq!(byte_size("10k"), Some(10_000));
        assert_eq!(byte_size("12"), Some(12));
        assert_eq!(byte_size("lots"), None);
    }
}
