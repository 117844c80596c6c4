//! `POST /v1.0-alpha1/lock/{store}` and `POST /v1.0-alpha1/unlock/{store}`
//! (<https://docs.dapr.io/reference/api/distributed_lock_api/>) over
//! [`nodeplane_state::lock`] stores.
//!
//! Lock keys follow Dapr's (`pkg/components/lock`): `lock||` then the
//! store's `keyPrefix` — `appid` (the default): `lock||app-id||resourceId`,
//! so two apps locking `r1` hold two locks; `name`:
//! `lock||store||resourceId`; `none`: `lock||resourceId`; `namespace`:
//! `lock||namespace.app-id||resourceId`; anything else:
//! `lock||prefix||resourceId`, shared by every app. A resource id holding
//! `||` is refused, as in Dapr. Unlike Dapr, which falls back to
//! `lock||resourceId` when it has no app id, a caller without an app id is
//! refused where the prefix needs one (as the state API does): on a shared
//! runtime such callers would otherwise all share one lock space.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;

use crate::components::{KeyPrefix, LockComponent};
use crate::dapr::{json_response, read_body, ApiError};
use crate::server::{Body, Caller};
use crate::Runtime;

/// Dapr's key separator.
const SEP: &str = "||";

/// `unlock`: the unlock endpoint, else the lock one; `store` is the path's
/// last segment.
pub async fn handle(
    rt: &Runtime,
    caller: &Caller,
    unlock: bool,
    store: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match route(rt, caller, unlock, store, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn malformed(msg: String) -> ApiError {
    ApiError::malformed(msg)
}

/// A body field as a string ("" when absent or not a string).
fn text<'a>(body: &'a Value, field: &str) -> &'a str {
    body.get(field).and_then(Value::as_str).unwrap_or("")
}

async fn route(
    rt: &Runtime,
    caller: &Caller,
    unlock: bool,
    store: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let which = if unlock { "unlock" } else { "lock" };
    if req.method() != Method::POST || store.is_empty() || store.contains('/') {
        return Err(ApiError::not_found(&format!(
            "/v1.0-alpha1/{which}/{store}"
        )));
    }
    let reg = rt.registry();
    if reg.locks.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_LOCK_STORE_NOT_CONFIGURED",
            "lock store is not configured",
        ));
    }
    let raw = read_body(req).await?;
    let body: Value = serde_json::from_slice(&raw)
        .map_err(|e| malformed(format!("failed deserializing HTTP body: {e}")))?;
    if !body.is_object() {
        return Err(malformed(
            "failed deserializing HTTP body: expected a JSON object".into(),
        ));
    }
    // Dapr's order of checks: fields first, then the store.
    let resource = text(&body, "resourceId");
    if resource.is_empty() {
        return Err(malformed(format!(
            "ResourceId is empty in lock store {store}: set the body's resourceId"
        )));
    }
    let owner = text(&body, "lockOwner");
    if owner.is_empty() {
        return Err(malformed(format!(
            "LockOwner is empty in lock store {store}: set the body's lockOwner"
        )));
    }
    let expiry = if unlock {
        Duration::ZERO
    } else {
        // A number, or a numeric string (as protobuf JSON allows).
        let secs = match body.get("expiryInSeconds") {
            Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
            Some(Value::String(s)) => s.trim().parse::<i64>().unwrap_or(0),
            _ => 0,
        };
        if secs <= 0 {
            return Err(malformed(format!(
                "ExpiryInSeconds is not positive in lock store {store}: set the body's expiryInSeconds to a whole number of seconds above 0"
            )));
        }
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    let comp = reg
        .lock_store(store, caller.app_id(), caller.namespace())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "ERR_LOCK_STORE_NOT_FOUND",
                format!("lock store {store} not found"),
            )
        })?;
    let (code, verb) = if unlock {
        ("ERR_UNLOCK", "failed to release lock")
    } else {
        ("ERR_TRY_LOCK", "failed to try acquiring lock")
    };
    let key = lock_key(comp, caller, resource).map_err(|m| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code,
            format!("{verb}: {m}"),
        )
    })?;
    let backend = |e: nodeplane_state::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code,
            format!("{verb}: {e}"),
        )
    };
    let out = if unlock {
        let status = comp.store.unlock(&key, owner).await.map_err(backend)?;
        serde_json::json!({ "status": status as i32 })
    } else {
        let ok = comp
            .store
            .try_lock(&key, owner, expiry)
            .await
            .map_err(backend)?;
        serde_json::json!({ "success": ok })
    };
    Ok(json_response(StatusCode::OK, out.to_string().into()))
}

/// The store key of `resource` for `caller` (see the module doc).
fn lock_key(comp: &LockComponent, caller: &Caller, resource: &str) -> Result<String, String> {
    if resource.contains(SEP) {
        return Err(format!(
            "input key/keyPrefix '{resource}' can't contain '{SEP}'"
        ));
    }
    let app = || {
        caller.app_id().ok_or_else(|| {
            format!(
                "lock store {} scopes locks by app id (keyPrefix appid), and {} has none (set the pod annotation dapr.io/app-id)",
                comp.spec.name,
                caller.describe()
            )
        })
    };
    Ok(match &comp.key_prefix {
        KeyPrefix::AppId => format!("lock{SEP}{}{SEP}{resource}", app()?),
        KeyPrefix::Namespace => format!(
            "lock{SEP}{}.{}{SEP}{resource}",
            caller.namespace().unwrap_or(""),
            app()?
        ),
        KeyPrefix::Name => format!("lock{SEP}{}{SEP}{resource}", comp.spec.name),
        KeyPrefix::None => format!("lock{SEP}{resource}"),
        KeyPrefix::Custom(p) => format!("lock{SEP}{p}{SEP}{resource}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Debug)]
    struct NoStore;

    #[async_trait::async_trait]
    impl nodeplane_state::lock::LockStore for NoStore {
        async fn try_lock(&self, _: &str, _: &str, _: Duration) -> nodeplane_state::Result<bool> {
            Ok(false)
        }
        async fn unlock(
            &self,
            _: &str,
            _: &str,
        ) -> nodeplane_state::Result<nodeplane_state::lock::UnlockStatus> {
            Ok(nodeplane_state::lock::UnlockStatus::LockDoesNotExist)
        }
        async fn ping(&self) -> nodeplane_state::Result<()> {
            Ok(())
        }
    }

    fn comp(prefix: KeyPrefix) -> LockComponent {
        LockComponent {
            spec: nodeplane_state::ComponentSpec {
                name: "locks".into(),
                kind: "lock.embedded".into(),
                ..Default::default()
            },
            namespace: None,
            scopes: Vec::new(),
            key_prefix: prefix,
            store: Arc::new(NoStore),
        }
    }

    #[test]
    fn keys_follow_dapr_lock_keys() {
        let pod = Caller::Pod(Arc::new(crate::directory::AppPod {
            namespace: "shop".into(),
            name: "p".into(),
            app_id: Some("orders".into()),
            ..Default::default()
        }));
        let key = |p, c: &Caller| lock_key(&comp(p), c, "r1");
        assert_eq!(
            key(KeyPrefix::AppId, &pod).as_deref(),
            Ok("lock||orders||r1")
        );
        assert_eq!(
            key(KeyPrefix::Namespace, &pod).as_deref(),
            Ok("lock||shop.orders||r1")
        );
        assert_eq!(key(KeyPrefix::Name, &pod).as_deref(), Ok("lock||locks||r1"));
        assert_eq!(key(KeyPrefix::None, &pod).as_deref(), Ok("lock||r1"));
        assert_eq!(
            key(KeyPrefix::Custom("team".into()), &pod).as_deref(),
            Ok("lock||team||r1")
        );
        let e = key(KeyPrefix::AppId, &Caller::Node).expect_err("no app id");
        assert!(e.contains("dapr.io/app-id"), "{e}");
        assert_eq!(
            key(KeyPrefix::Name, &Caller::Node).as_deref(),
            Ok("lock||locks||r1")
        );
        let e = lock_key(&comp(KeyPrefix::AppId), &pod, "a||b").expect_err("separator");
        assert!(e.contains("||"), "{e}");
    }
}
