//! `POST /v1.0/publish/{pubsub}/{topic}`: the body becomes a CloudEvents
//! 1.0 envelope (<https://docs.dapr.io/reference/api/pubsub_api/>) unless
//! it already is one (`application/cloudevents+json`) or the request says
//! `?metadata.rawPayload=true`; 204 once the broker has it durably.
//!
//! The publisher is the calling pod's app id, from the kernel: a caller
//! without one is refused, since a CloudEvent's `source` and the topic
//! scopes need it.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::components::PubSubComponent;
use crate::dapr::{self, ApiError};
use crate::server::{Body, Caller};
use crate::state_api::{percent_decode, query};
use crate::Runtime;

pub const CLOUDEVENT_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Message metadata marking a raw (not enveloped) payload.
pub const RAW_PAYLOAD: &str = "rawPayload";

pub async fn handle(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let r = match publish(rt, caller, tail, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    count(rt, caller, tail, &r);
    r
}

/// Counts a publish (single or bulk) in the runtime's metrics.
fn count(rt: &Runtime, caller: &Caller, tail: &str, r: &Response<Body>) {
    let (name, topic) = tail.split_once('/').unwrap_or((tail, ""));
    rt.metrics.published(
        caller.app_id().unwrap_or(""),
        name,
        topic,
        r.status().as_u16(),
    );
}

/// `/v1.0-alpha1/publish/bulk/{pubsub}/{topic}`.
pub async fn handle_bulk(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let r = match bulk(rt, caller, tail, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    count(rt, caller, tail, &r);
    r
}

/// Where a publish goes, checked: the component, its name, the topic and
/// the publishing app.
struct Target {
    comp: PubSubComponent,
    name: String,
    topic: String,
    app: String,
}

fn target(rt: &Runtime, caller: &Caller, tail: &str) -> Result<Target, ApiError> {
    let (name, topic) = tail.split_once('/').unwrap_or((tail, ""));
    if name.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ERR_PUBSUB_EMPTY",
            "pubsub name is empty",
        ));
    }
    let name = percent_decode(name).unwrap_or_else(|| name.to_string());
    let topic = percent_decode(topic).unwrap_or_else(|| topic.to_string());
    if topic.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ERR_TOPIC_EMPTY",
            format!("topic is empty in pubsub {name}"),
        ));
    }
    let Some(app) = caller.app_id() else {
        return Err(ApiError::identity_required(
            &caller.describe(),
            "publishing",
        ));
    };
    let reg = rt.registry();
    let Some(comp) = reg.pubsub(&name, Some(app), caller.namespace()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ERR_PUBSUB_NOT_FOUND",
            format!("pubsub '{name}' not found"),
        ));
    };
    if !comp.topics.may_publish(app, &topic) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ERR_PUBSUB_FORBIDDEN",
            format!("topic {topic} is not allowed for app id {app}"),
        ));
    }
    Ok(Target {
        comp: comp.clone(),
        name,
        topic,
        app: app.to_string(),
    })
}

/// `metadata.*` query parameters, and whether `rawPayload` is set.
fn query_metadata(q: Option<&str>) -> Result<(BTreeMap<String, String>, bool), ApiError> {
    let metadata: BTreeMap<String, String> = query(q)
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?.to_string(), v)))
        .collect();
    let raw = raw_flag(&metadata)?;
    Ok((metadata, raw))
}

fn raw_flag(metadata: &BTreeMap<String, String>) -> Result<bool, ApiError> {
    match metadata.get(RAW_PAYLOAD).map(String::as_str) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ERR_PUBSUB_REQUEST_METADATA",
            format!("failed deserializing metadata: rawPayload {v:?} is not true or false"),
        )),
    }
}

impl Target {
    /// The message for one payload: enveloped unless raw or already a
    /// CloudEvent.
    fn message(
        &self,
        raw: bool,
        mut metadata: BTreeMap<String, String>,
        content_type: &str,
        traceparent: &str,
        body: Bytes,
    ) -> Result<nodeplane_pubsub::Message, ApiError> {
        let (id, data, content_type) = if raw {
            metadata.insert(RAW_PAYLOAD.into(), "true".into());
            (new_id(), body, content_type.to_string())
        } else {
            let event = if mime(content_type) == CLOUDEVENT_CONTENT_TYPE {
                given_event(&body, &self.name, &self.topic, traceparent)?
            } else {
                envelope(
                    &Envelope {
                        id: new_id(),
                        source: self.app.clone(),
                        pubsub: self.name.clone(),
                        topic: self.topic.clone(),
                        traceparent: traceparent.to_string(),
                    },
                    content_type,
                    &body,
                )
            };
            let id = event["id"].as_str().unwrap_or_default().to_string();
            let data = Bytes::from(event.to_string());
            (id, data, CLOUDEVENT_CONTENT_TYPE.to_string())
        };
        Ok(nodeplane_pubsub::Message {
            id,
            topic: self.topic.clone(),
            data,
            content_type,
            metadata,
        })
    }

    async fn send(&self, msg: nodeplane_pubsub::Message) -> Result<(), String> {
        self.comp.broker.publish(msg).await.map_err(|e| {
            format!(
                "error when publishing to topic {} in pubsub {}: {e}",
                self.topic, self.name
            )
        })
    }
}

fn content_type_and_trace(req: &Request<Incoming>) -> (String, String) {
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        // Dapr's default data content type.
        .unwrap_or("text/plain")
        .to_string();
    let traceparent = crate::trace::next(
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    (content_type, traceparent)
}

async fn publish(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::POST && req.method() != Method::PUT {
        return Err(ApiError::not_found(req.uri().path()));
    }
    let t = target(rt, caller, tail)?;
    let (metadata, raw) = query_metadata(req.uri().query())?;
    let (content_type, traceparent) = content_type_and_trace(&req);
    let body = dapr::read_body(req).await?;
    let msg = t.message(raw, metadata, &content_type, &traceparent, body)?;
    t.send(msg).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_PUBSUB_PUBLISH_MESSAGE",
            e,
        )
    })?;
    Ok(dapr::no_content())
}

/// One entry of a bulk publish.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry {
    #[serde(default)]
    entry_id: String,
    event: Value,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Bulk publish (Dapr's alpha API): every entry is published; 204 when
/// all were, else 500 with the failed entries' ids.
async fn bulk(
    rt: &Runtime,
    caller: &Caller,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::POST && req.method() != Method::PUT {
        return Err(ApiError::not_found(req.uri().path()));
    }
    let t = target(rt, caller, tail)?;
    let (metadata, raw) = query_metadata(req.uri().query())?;
    let (_, traceparent) = content_type_and_trace(&req);
    let body = dapr::read_body(req).await?;
    let ser = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "ERR_PUBSUB_EVENTS_SER", m);
    let entries: Vec<BulkEntry> = serde_json::from_slice(&body).map_err(|e| {
        ser(format!(
            "error when unmarshaling the request for topic {}: {e}",
            t.topic
        ))
    })?;
    let mut ids = std::collections::BTreeSet::new();
    let mut msgs = Vec::new();
    for e in entries {
        if e.entry_id.is_empty() || !ids.insert(e.entry_id.clone()) {
            return Err(ser(format!(
                "error: entryId is duplicated or not present for entry {:?}",
                e.entry_id
            )));
        }
        let content_type = if e.content_type.is_empty() {
            "application/json".to_string()
        } else {
            e.content_type.clone()
        };
        let payload = match (&e.event, mime(&content_type).as_str()) {
            (Value::String(s), m) if m != "application/json" && !m.ends_with("+json") => {
                Bytes::from(s.clone())
            }
            (v, _) => Bytes::from(v.to_string()),
        };
        let mut md = metadata.clone();
        md.extend(e.metadata.clone());
        let raw = raw || raw_flag(&e.metadata)?;
        msgs.push((
            e.entry_id,
            t.message(raw, md, &content_type, &traceparent, payload)?,
        ));
    }
    // Concurrently: the broker batches them (the embedded log fsyncs
    // them together).
    let results = futures::future::join_all(
        msgs.into_iter()
            .map(|(id, m)| async { (id, t.send(m).await) }),
    )
    .await;
    let failed: Vec<Value> = results
        .into_iter()
        .filter_map(|(id, r)| r.err().map(|e| json!({"entryId": id, "error": e})))
        .collect();
    if failed.is_empty() {
        return Ok(dapr::no_content());
    }
    let body = json!({
        "failedEntries": failed,
        "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE",
    });
    Ok(dapr::json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        body.to_string().into(),
    ))
}

/// The media type without parameters, lower case.
pub fn mime(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The attributes the runtime sets on an envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub source: String,
    pub pubsub: String,
    pub topic: String,
    pub traceparent: String,
}

/// A CloudEvent around `body`: JSON data as JSON, text as a string,
/// anything else base64 in `data_base64`.
pub fn envelope(e: &Envelope, content_type: &str, body: &[u8]) -> Value {
    let mut ev = json!({
        "specversion": "1.0",
        "id": e.id,
        "source": e.source,
        "type": "com.dapr.event.sent",
        "datacontenttype": content_type,
        "topic": e.topic,
        "pubsubname": e.pubsub,
        "traceparent": e.traceparent,
        "traceid": e.traceparent,
    });
    let m = mime(content_type);
    let json_type = m == "application/json" || m.ends_with("+json");
    let parsed = json_type
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten();
    match parsed {
        Some(v) => ev["data"] = v,
        None => match std::str::from_utf8(body) {
            Ok(s) if json_type || m.starts_with("text/") || m == "application/xml" => {
                ev["data"] = Value::String(s.to_string())
            }
            _ => ev["data_base64"] = Value::String(base64(body)),
        },
    }
    ev
}

/// A CloudEvent the app sent itself: kept, with the attributes Dapr
/// fills in when missing (`id`, `source`, `type`, `specversion`) and the
/// routing ones it always sets (`topic`, `pubsubname`).
fn given_event(
    body: &[u8],
    pubsub: &str,
    topic: &str,
    traceparent: &str,
) -> Result<Value, ApiError> {
    let mut ev: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "ERR_PUBSUB_EVENTS_SER",
            format!("the body is not a CloudEvent in JSON: {e}"),
        )
    })?;
    let Some(obj) = ev.as_object_mut() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ERR_PUBSUB_EVENTS_SER",
            "the body is not a CloudEvent (a JSON object)",
        ));
    };
    let defaults = [
        ("id", Value::String(new_id())),
        ("specversion", "1.0".into()),
        ("type", "com.dapr.event.sent".into()),
        ("source", "".into()),
        ("traceparent", traceparent.into()),
    ];
    for (k, v) in defaults {
        obj.entry(k).or_insert(v);
    }
    obj.insert("topic".into(), topic.into());
    obj.insert("pubsubname".into(), pubsub.into());
    Ok(ev)
}

/// A random id in the UUID v4 form.
pub fn new_id() -> String {
    let (a, b) = (crate::trace::random64(), crate::trace::random64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// Standard base64 with padding (CloudEvents' `data_base64`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            id: new_id(),
            source: "front".into(),
            pubsub: "pubsub".into(),
            topic: "orders".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        }
    }

    #[test]
    fn envelopes_json_text_and_binary() {
        let ev = envelope(&env(), "application/json", br#"{"a":1}"#);
        assert_eq!(ev["data"]["a"], 1);
        assert_eq!(ev["specversion"], "1.0");
        assert_eq!(ev["type"], "com.dapr.event.sent");
        assert_eq!(ev["source"], "front");
        assert_eq!(ev["topic"], "orders");
        let id = ev["id"].as_str().expect("id");
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        let ev = envelope(&env(), "text/plain", b"hi");
        assert_eq!(ev["data"], "hi");
        let ev = envelope(&env(), "application/octet-stream", &[0, 1, 2, 255]);
        assert_eq!(ev["data_base64"], "AAEC/w==");
        assert!(ev.get("data").is_none());
        // JSON declared but not JSON: kept as text.
        let ev = envelope(&env(), "application/json", b"not json");
        assert_eq!(ev["data"], "not json");
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn a_given_cloudevent_keeps_its_attributes() {
        let ev = given_event(
            br#"{"id":"x1","type":"order.created","source":"shop","data":{"n":1}}"#,
            "pubsub",
            "orders",
            "tp",
        )
        .expect("event");
        assert_eq!(ev["id"], "x1");
        assert_eq!(ev["type"], "order.created");
        assert_eq!(ev["topic"], "orders");
        assert_eq!(ev["specversion"], "1.0");
        assert!(given_event(b"[1]", "p", "t", "tp").is_err());
    }
}
