//! How a [`Message`] is written down: the embedded log's binary record
//! body, and the metadata JSON the Redis and JetStream backends carry next
//! to the payload.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::Message;

/// The embedded log's record body: length-prefixed (u32 LE) topic, id,
/// content type, metadata pairs (count, then key/value), then the data to
/// the end.
pub(crate) fn encode_body(msg: &Message) -> Vec<u8> {
    let meta: usize = msg
        .metadata
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(
        16 + msg.topic.len() + msg.id.len() + msg.content_type.len() + meta + msg.data.len(),
    );
    put_str(&mut out, &msg.topic);
    put_str(&mut out, &msg.id);
    put_str(&mut out, &msg.content_type);
    out.extend_from_slice(&len32(msg.metadata.len()).to_le_bytes());
    for (k, v) in &msg.metadata {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    out.extend_from_slice(&msg.data);
    out
}

fn len32(n: usize) -> u32 {
    // A single message over 4 GiB cannot be published anyway (the record
    // length is u32); the publish path refuses it before encoding.
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&len32(s.len()).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// The topic alone (recovery indexes records without decoding them).
pub(crate) fn body_topic(body: &[u8]) -> Option<&str> {
    std::str::from_utf8(Reader(body).bytes()?).ok()
}

pub(crate) fn decode_body(body: &[u8]) -> Option<Message> {
    let mut r = Reader(body);
    let topic = r.string()?;
    let id = r.string()?;
    let content_type = r.string()?;
    let n = r.u32()?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n {
        let k = r.string()?;
        let v = r.string()?;
        metadata.insert(k, v);
    }
    Some(Message {
        id,
        topic,
        data: Bytes::copy_from_slice(r.0),
        content_type,
        metadata,
    })
}

/// Metadata as one JSON object (a Redis field, a NATS header value: JSON
/// escapes the CR/LF a header may not contain).
pub(crate) fn metadata_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

/// The reverse; anything unreadable (a message from another publisher)
/// is no metadata.
pub(crate) fn metadata_from_json(s: &[u8]) -> BTreeMap<String, String> {
    serde_json::from_slice(s).unwrap_or_default()
}

/// CRC-32C (Castagnoli), bitwise table, for the embedded log's records.
pub(crate) fn crc32c(parts: &[&[u8]]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
        assert_eq!(crc32c(&[b"1234", b"56789"]), 0xE306_9283);
    }

    #[test]
    fn body_round_trip() {
        let msg = Message {
            id: "id-1".into(),
            topic: "orders".into(),
            data: Bytes::from_static(b"\x00\xff{\"a\":1}"),
            content_type: "application/json".into(),
            metadata: [("k".to_string(), "v\r\nw".to_string())].into(),
        };
        let body = encode_body(&msg);
        assert_eq!(body_topic(&body), Some("orders"));
        assert_eq!(decode_body(&body), Some(msg.clone()));
        assert_eq!(decode_body(&body[..5]), None);
        let json = metadata_json(&msg.metadata);
        assert_eq!(metadata_from_json(json.as_bytes()), msg.metadata);
    }
}
