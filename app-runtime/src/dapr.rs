//! Dapr's error bodies (`{"errorCode", "message"}`) and the HTTP statuses
//! Dapr's runtime answers with for each (dapr/dapr pkg/messages and the
//! HTTP API reference).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::server::Body;

/// One error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ERR_MALFORMED_REQUEST", message)
    }

    pub fn store_not_found(store: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "ERR_STATE_STORE_NOT_FOUND",
            format!("state store {store} is not found"),
        )
    }

    pub fn stores_not_configured() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_STATE_STORE_NOT_CONFIGURED",
            "state store is not configured",
        )
    }

    /// The caller is not a pod with an app id, where one is needed.
    pub fn identity_required(who: &str, what: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "ERR_PERMISSION_DENIED",
            format!(
                "{what} needs the caller's app id, and {who} has none (set the pod annotation dapr.io/app-id)"
            ),
        )
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ERR_NOT_FOUND",
            format!("method {path:?} is not found"),
        )
    }

    /// A store failure in `code`'s operation, with Dapr's status for it:
    /// 409 for an etag mismatch, 400 for an invalid etag, else 500.
    pub fn state(code: &'static str, what: String, e: &nodeplane_state::Error) -> Self {
        use nodeplane_state::Error as E;
        let status = match e {
            E::EtagMismatch { .. } => StatusCode::CONFLICT,
            E::EtagInvalid { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, code, format!("{what}: {e}"))
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({"errorCode": self.code, "message": self.message});
        json_response(self.status, body.to_string().into())
    }
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(crate::server::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// 204 No Content.
pub fn no_content() -> Response<Body> {
    let mut r = Response::new(crate::server::full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The largest request body the state and pub/sub APIs read: a value or a
/// message is not a file transfer (Dapr's default request limit is 4 MB).
pub const MAX_BODY: usize = 16 << 20;

/// A request's whole body, at most [`MAX_BODY`] bytes.
pub async fn read_body(req: http::Request<hyper::body::Incoming>) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    Ok(http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::malformed(format!("failed reading the request body: {e}")))?
        .to_bytes())
}
