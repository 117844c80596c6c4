//! `bindings.redis` (<https://docs.dapr.io/reference/components-reference/supported-bindings/redis/>):
//! plain string keys on a Redis server.
//!
//! Operations (request metadata `key` is required for all):
//! - `create`: `SET key data`; with `ttlInSeconds` (> 0) the key expires;
//! - `get`: the value (200, empty body when the key is absent); with
//!   metadata `delete` = `true` the key is removed as it is read (GETDEL);
//! - `delete`: `DEL key`;
//! - `increment`: `INCR key` (and `ttlInSeconds` as for create).
//!
//! Component metadata: `redisHost` (required, `host:port`),
//! `redisPassword`, `redisUsername`, `redisDB`; `enableTLS` = true is
//! refused (no TLS client here), as for `state.redis`.

use bytes::Bytes;
use nodeplane_state::ComponentSpec;
use redis::aio::ConnectionManager;

use super::{Failure, InvokeRequest, InvokeResponse, OpenError};

pub const OPERATIONS: &[&str] = &["create", "get", "delete", "increment"];

pub struct RedisBinding {
    host: String,
    conn: ConnectionManager,
}

impl std::fmt::Debug for RedisBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBinding")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Request metadata `ttlInSeconds`: None when absent or not positive.
fn ttl(req: &InvokeRequest) -> Result<Option<u64>, String> {
    match req.metadata.get("ttlInSeconds").map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .map(|n| u64::try_from(n).ok().filter(|n| *n > 0))
            .map_err(|_| format!("ttlInSeconds value must be a valid integer: actual is '{v}'")),
    }
}

impl RedisBinding {
    pub async fn open(spec: &ComponentSpec) -> Result<RedisBinding, OpenError> {
        // Its errors already name the component and its type.
        let (conn, _, host) = nodeplane_state::redis_connect(spec)
            .await
            .map_err(|e| match e {
                nodeplane_state::Error::Config(m) => OpenError::Config(m),
                other => OpenError::Backend(other.to_string()),
            })?;
        Ok(RedisBinding { host, conn })
    }

    pub async fn invoke(&self, req: &InvokeRequest) -> Result<InvokeResponse, Failure> {
        let key = req
            .metadata
            .get("key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Failure::new("redis binding: missing key in request metadata (set metadata.key)")
            })?;
        let ttl = ttl(req).map_err(Failure::new)?;
        let fail = |e: redis::RedisError| Failure::new(format!("redis at {}: {e}", self.host));
        let mut conn = self.conn.clone();
        match req.operation.as_str() {
            "create" => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(req.data.as_ref());
                if let Some(t) = ttl {
                    cmd.arg("EX").arg(t);
                }
                cmd.query_async::<()>(&mut conn).await.map_err(fail)?;
                Ok(InvokeResponse::default())
            }
            "increment" => {
                let mut pipe = redis::pipe();
                pipe.atomic().cmd("INCR").arg(key).ignore();
                if let Some(t) = ttl {
                    pipe.cmd("EXPIRE").arg(key).arg(t).ignore();
                }
                pipe.query_async::<()>(&mut conn).await.map_err(fail)?;
                Ok(InvokeResponse::default())
            }
            "delete" => {
                redis::cmd("DEL")
                    .arg(key)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(fail)?;
                Ok(InvokeResponse::default())
            }
            "get" => {
                let del = req.metadata.get("delete").is_some_and(|v| v == "true");
                let v: Option<Vec<u8>> = redis::cmd(if del { "GETDEL" } else { "GET" })
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(fail)?;
                Ok(InvokeResponse {
                    data: Some(v.map(Bytes::from).unwrap_or_default()),
                    ..InvokeResponse::default()
                })
            }
            other => Err(Failure::new(format!("invalid operation type: {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_errors_name_the_field() {
        let spec = |md: &[(&str, &str)]| ComponentSpec {
            name: "cache".into(),
            kind: "bindings.redis".into(),
            version: "v1".into(),
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // The workspace's one reading of Redis metadata.
        let settings = |s: &ComponentSpec| {
            nodeplane_state::redis_client(s)
                .map(|(_, host)| host)
                .map_err(|e| e.to_string())
        };
        assert!(settings(&spec(&[]))
            .expect_err("no host")
            .contains("redisHost"));
        assert!(settings(&spec(&[("redisHost", "h:port")]))
            .expect_err("port")
            .contains("port"));
        assert!(
            settings(&spec(&[("redisHost", "h:1"), ("enableTLS", "true")]))
                .expect_err("tls")
                .contains("enableTLS")
        );
        assert!(settings(&spec(&[("redisHost", "h:1"), ("redisDB", "x")]))
            .expect_err("db")
            .contains("redisDB"));
        let host = settings(&spec(&[("redisHost", "127.0.0.1:6380")])).expect("ok");
        assert_eq!(host, "127.0.0.1:6380");
        let r = |v: &str| InvokeRequest {
            metadata: [("ttlInSeconds".to_string(), v.to_string())].into(),
            ..InvokeRequest::default()
        };
        assert_eq!(ttl(&r("30")), Ok(Some(30)));
        assert_eq!(ttl(&r("0")), Ok(None));
        assert!(ttl(&r("soon")).is_err());
    }
}
