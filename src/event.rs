//! Stream entries as the worker sees them: the entry ID, its fields exactly as the
//! producer wrote them, and what is derived from them — the body to POST, the event
//! type, the ordering key, the idempotency key and the request ID. Parsing never fails
//! the program: an entry
//! that cannot be delivered becomes a [`Rejected`] carrying the reason, to be
//! dead-lettered.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use redis::Value;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A stream entry ID, `<milliseconds>-<sequence>`; ordered as Redis orders them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

/// Hashes entry IDs in a few instructions (the multiply-rotate of rustc's FxHasher):
/// the coordinator looks an ID up in several sets per event, and SipHash's resistance
/// to chosen keys buys nothing here, since Redis assigns the IDs, each greater than the
/// last. Measured: a 2,000-event drain spent 3 % of its instructions in SipHash.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        // The table takes its bucket from the low bits: bring the well-mixed high
        // ones down.
        self.0.rotate_left(26)
    }
}

pub type IdSet = HashSet<StreamId, BuildHasherDefault<IdHasher>>;
pub type IdMap<V> = HashMap<StreamId, V, BuildHasherDefault<IdHasher>>;

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for StreamId {
    type Err = String;

    fn from_str(s: &str) -> Result<StreamId, String> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        match (ms.parse(), seq.parse()) {
            (Ok(ms), Ok(seq)) => Ok(StreamId { ms, seq }),
            _ => Err(format!("not a stream entry ID: {s:?}")),
        }
    }
}

/// One field of an entry, name and value as raw bytes.
pub type Field = (Vec<u8>, Vec<u8>);

/// The field `paheko-push dead replay` adds to a replayed entry: the ID the entry had
/// when the producer first wrote it. The worker sends it as the `Idempotency-Key`, so
/// the plugin sees one key per ticket however often it is replayed (issue 8 §6). It is
/// never part of the body.
pub const IDEMPOTENCY_KEY_FIELD: &str = "idempotency_key";

/// An entry as read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: StreamId,
    /// `None` when the entry is in the pending list but no longer in the stream: it
    /// was trimmed or deleted before it was delivered.
    pub fields: Option<Vec<Field>>,
}

/// An entry ready to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: StreamId,
    pub fields: Vec<Field>,
    body: Body,
    /// The entry's `event` field (`pos.ticket.created`, …), empty when absent.
    pub kind: String,
    /// Events sharing a key are delivered in stream order.
    pub key: Option<String>,
    /// Sent as `Idempotency-Key` (and `webhook-id`): the [`IDEMPOTENCY_KEY_FIELD`] of a
    /// replayed entry, else the entry ID.
    pub idempotency_key: String,
    /// The payload's `request_id` or `correlation_id`, else the idempotency key.
    pub request_id: String,
    /// HTTP attempts made so far, across parkings.
    pub attempts: u32,
    /// Times Redis has delivered the entry to a consumer, when known (re-read pending
    /// entries and taken-over ones); 0 for a first delivery.
    pub deliveries: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// The value of the field at this index, sent byte for byte.
    Field(usize),
    /// No `payload` or `data` field: a JSON object of all the fields.
    Built(Vec<u8>),
}

/// An entry that cannot be delivered, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: StreamId,
    pub fields: Vec<Field>,
    /// Machine-readable: `invalid_payload`, `invalid_event`, `invalid_idempotency_key`.
    pub reason: &'static str,
    /// For a person: what exactly was wrong.
    pub detail: String,
}

/// What the reader hands the acker for each entry it read.
#[derive(Debug)]
pub enum Incoming {
    Event(Event),
    Rejected(Box<Rejected>),
    /// In the pending list but gone from the stream: trimmed before delivery.
    Vanished(StreamId),
}

impl Incoming {
    pub fn id(&self) -> StreamId {
        match self {
            Incoming::Event(e) => e.id,
            Incoming::Rejected(r) => r.id,
            Incoming::Vanished(id) => *id,
        }
    }
}

impl Event {
    pub fn body(&self) -> &[u8] {
        match &self.body {
            Body::Field(i) => &self.fields[*i].1,
            Body::Built(b) => b,
        }
    }

    /// Builds the event for an entry, or says why it cannot be delivered.
    pub fn parse(
        id: StreamId,
        fields: Vec<Field>,
        order_keys: &[String],
    ) -> Result<Event, Box<Rejected>> {
        let reject = |fields, reason, detail| {
            Box::new(Rejected {
                id,
                fields,
                reason,
                detail,
            })
        };
        let kind = match field(&fields, "event") {
            None => String::new(),
            Some(raw) => match std::str::from_utf8(raw) {
                Ok(k) if is_header_value(k) => k.to_string(),
                _ => {
                    let detail = format!(
                        "the event field {:?} cannot be sent in an HTTP header",
                        String::from_utf8_lossy(raw)
                    );
                    return Err(reject(fields, "invalid_event", detail));
                }
            },
        };
        let idempotency_key = match field(&fields, IDEMPOTENCY_KEY_FIELD) {
            None => id.to_string(),
            Some(raw) => match std::str::from_utf8(raw) {
                Ok(k) if !k.is_empty() && is_header_value(k) => k.to_string(),
                _ => {
                    let detail = format!(
                        "the {IDEMPOTENCY_KEY_FIELD} field {:?} cannot be sent in an HTTP header",
                        String::from_utf8_lossy(raw)
                    );
                    return Err(reject(fields, "invalid_idempotency_key", detail));
                }
            },
        };
        let payload_at = ["payload", "data"]
            .iter()
            .find_map(|name| fields.iter().position(|(f, _)| f == name.as_bytes()));
        let Some(at) = payload_at else {
            let body = fields_as_json(&fields);
            return Ok(Event {
                id,
                body: Body::Built(body),
                kind,
                key: None,
                request_id: idempotency_key.clone(),
                idempotency_key,
                attempts: 0,
                deliveries: 0,
                fields,
            });
        };
        let (key, request_id) = match inspect_payload(&fields[at].1, order_keys) {
            Ok(found) => found,
            Err(detail) => {
                let name = String::from_utf8_lossy(&fields[at].0).into_owned();
                return Err(reject(
                    fields,
                    "invalid_payload",
                    format!("field {name}: {detail}"),
                ));
            }
        };
        Ok(Event {
            id,
            body: Body::Field(at),
            kind,
            key,
            request_id: request_id.unwrap_or_else(|| idempotency_key.clone()),
            idempotency_key,
            attempts: 0,
            deliveries: 0,
            fields,
        })
    }
}

fn field<'a>(fields: &'a [Field], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(f, _)| f == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// Checks the payload is UTF-8 JSON and finds its ordering key and request ID in one
/// pass, without building a tree of the document nor copying its keys.
fn inspect_payload(
    raw: &[u8],
    order_keys: &[String],
) -> Result<(Option<String>, Option<String>), String> {
    let text = std::str::from_utf8(raw).map_err(|e| format!("not UTF-8 ({e})"))?;
    if !text.trim_start().starts_with('{') {
        let _: &RawValue = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        return Ok((None, None));
    }
    let mut json = serde_json::Deserializer::from_str(text);
    let found = Wanted { order_keys }
        .deserialize(&mut json)
        .and_then(|found| json.end().map(|()| found))
        .map_err(|e| format!("not JSON ({e})"))?;
    let key = found
        .order_keys
        .iter()
        .flatten()
        .find_map(|v| scalar_text(v));
    let request_id = [found.request_id, found.correlation_id]
        .into_iter()
        .flatten()
        .find_map(scalar_text)
        .filter(|r| is_header_value(r));
    Ok((key, request_id))
}

/// What [`inspect_payload`] looks for in the top-level object: the fields it needs,
/// each as a slice of the payload; the last occurrence of a repeated field wins.
struct Wanted<'k> {
    order_keys: &'k [String],
}

struct Found<'de> {
    /// One slot per order key, in the order of `PAHEKO_PUSH_ORDER_KEYS`.
    order_keys: Vec<Option<&'de RawValue>>,
    request_id: Option<&'de RawValue>,
    correlation_id: Option<&'de RawValue>,
}

impl<'de> DeserializeSeed<'de> for Wanted<'_> {
    type Value = Found<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Found<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Wanted<'_> {
    type Value = Found<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found<'de>, A::Error> {
        let mut found = Found {
            order_keys: vec![None; self.order_keys.len()],
            request_id: None,
            correlation_id: None,
        };
        while let Some(Key(key)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            match key.as_ref() {
                "request_id" => found.request_id = Some(value),
                "correlation_id" => found.correlation_id = Some(value),
                _ => {}
            }
            if let Some(at) = self.order_keys.iter().position(|k| *k == key) {
                found.order_keys[at] = Some(value);
            }
        }
        Ok(found)
    }
}

/// An object key, borrowed from the payload unless it holds an escape.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A JSON string's text, or a number's digits; `None` for null, objects and arrays.
fn scalar_text(v: &RawValue) -> Option<String> {
    let raw = v.get();
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(raw).ok(),
        b'-' | b'0'..=b'9' => Some(raw.to_string()),
        _ => None,
    }
}

fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) && s.len() <= 1024
}

/// The body of an entry without a `payload` or `data` field: its fields as the producer
/// wrote them, so without the [`IDEMPOTENCY_KEY_FIELD`] a replay added.
fn fields_as_json(fields: &[Field]) -> Vec<u8> {
    let object: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .filter(|(k, _)| k != IDEMPOTENCY_KEY_FIELD.as_bytes())
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    serde_json::to_vec(&object).unwrap_or_else(|_| b"{}".to_vec())
}

/// Reads the entries of an XREADGROUP or XAUTOCLAIM reply (RESP2):
/// `[[id, [field, value, …] | nil], …]`.
pub fn entries_from(value: Value) -> Result<Vec<Entry>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected a list of entries, got {value:?}"));
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut pair) = item else {
                return Err("an entry is not a list".to_string());
            };
            if pair.len() != 2 {
                return Err(format!("an entry has {} parts, not 2", pair.len()));
            }
            let fields = pair.pop().unwrap_or(Value::Nil);
            let id = match pair.pop() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).parse()?,
                other => return Err(format!("an entry ID is {other:?}")),
            };
            let fields = match fields {
                Value::Nil => None,
                Value::Array(flat) => Some(pairs(flat)?),
                other => return Err(format!("entry {id} has fields {other:?}")),
            };
            Ok(Entry { id, fields })
        })
        .collect()
}

fn pairs(flat: Vec<Value>) -> Result<Vec<Field>, String> {
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let Some(name) = it.next() {
        match (name, it.next()) {
            (Value::BulkString(n), Some(Value::BulkString(v))) => out.push((n, v)),
            (n, v) => return Err(format!("a field is {n:?} = {v:?}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        vec!["cash_session_id".into(), "session_id".into()]
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<Field> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    const ID: StreamId = StreamId {
        ms: 1700000000000,
        seq: 3,
    };

    #[test]
    fn stream_ids_order_numerically() {
        let a: StreamId = "1700000000000-9".parse().unwrap();
        let b: StreamId = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert!("x-1".parse::<StreamId>().is_err());
    }

    #[test]
    fn payload_is_sent_byte_for_byte() {
        let payload = "{ \"sale_id\" : \"s1\",\"cash_session_id\":\"cs-9\", \"total\": 1.50, \"label\":\"caf\\u00e9\" }";
        let e = Event::parse(
            ID,
            fields(&[("event", "pos.ticket.created"), ("payload", payload)]),
            &keys(),
        )
        .unwrap();
        assert_eq!(e.body(), payload.as_bytes());
        assert_eq!(e.kind, "pos.ticket.created");
        assert_eq!(e.key.as_deref(), Some("cs-9"));
        assert_eq!(e.request_id, "1700000000000-3");
    }

    #[test]
    fn first_present_order_key_wins_and_numbers_count() {
        let e = Event::parse(
            ID,
            fields(&[("payload", r#"{"session_id":42,"cash_session_id":null}"#)]),
            &keys(),
        )
        .unwrap();
        assert_eq!(e.key.as_deref(), Some("42"));
        let e = Event::parse(ID, fields(&[("data", r#"{"x":1}"#)]), &keys()).unwrap();
        assert_eq!(e.key, None);
        assert_eq!(e.body(), br#"{"x":1}"#);
    }

    #[test]
    fn only_top_level_fields_count_and_escaped_names_match() {
        let payload = r#"{"items":[{"cash_session_id":"nested"}],"cash\u005fsession_id":"cs-1"}"#;
        let e = Event::parse(ID, fields(&[("payload", payload)]), &keys()).unwrap();
        assert_eq!(e.key.as_deref(), Some("cs-1"));
        let e = Event::parse(
            ID,
            fields(&[("payload", r#"{"session_id":"a","session_id":"b"}"#)]),
            &keys(),
        )
        .unwrap();
        assert_eq!(
            e.key.as_deref(),
            Some("b"),
            "the last of a repeated field, as a JSON object would keep"
        );
        let e = Event::parse(ID, fields(&[("payload", " [1, 2] ")]), &keys()).unwrap();
        assert_eq!((e.key.as_deref(), e.body()), (None, " [1, 2] ".as_bytes()));
    }

    #[test]
    fn trailing_text_or_a_truncated_object_is_not_json() {
        for bad in [r#"{"a":1} x"#, r#"{"a":1"#, r#"{"a":}"#, "[1,"] {
            let r = Event::parse(ID, fields(&[("payload", bad)]), &keys()).unwrap_err();
            assert!(
                r.detail.starts_with("field payload: not JSON"),
                "{bad}: {}",
                r.detail
            );
        }
    }

    #[test]
    fn request_id_comes_from_the_payload() {
        let e = Event::parse(
            ID,
            fields(&[("payload", r#"{"correlation_id":"c-1"}"#)]),
            &keys(),
        )
        .unwrap();
        assert_eq!(e.request_id, "c-1");
        let e = Event::parse(
            ID,
            fields(&[("payload", r#"{"request_id":"r-1","correlation_id":"c-1"}"#)]),
            &keys(),
        )
        .unwrap();
        assert_eq!(e.request_id, "r-1");
    }

    #[test]
    fn entry_without_payload_is_sent_as_its_fields() {
        let e = Event::parse(
            ID,
            fields(&[("event", "pos.session.opened"), ("session_id", "s1")]),
            &keys(),
        )
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(e.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"event": "pos.session.opened", "session_id": "s1"})
        );
    }

    #[test]
    fn a_replayed_entry_keeps_its_first_id_as_idempotency_key() {
        let payload = r#"{"sale_id":"s1"}"#;
        let e = Event::parse(
            ID,
            fields(&[("payload", payload), ("idempotency_key", "1699999999999-7")]),
            &keys(),
        )
        .unwrap();
        assert_eq!(e.idempotency_key, "1699999999999-7");
        assert_eq!(e.request_id, "1699999999999-7", "the X-Request-Id fallback");
        assert_eq!(e.body(), payload.as_bytes());
        let e = Event::parse(ID, fields(&[("payload", payload)]), &keys()).unwrap();
        assert_eq!(e.idempotency_key, "1700000000000-3");
        // Without a payload field the body is the producer's fields, not the added one.
        let e = Event::parse(
            ID,
            fields(&[("session_id", "s1"), ("idempotency_key", "1-1")]),
            &keys(),
        )
        .unwrap();
        assert_eq!(e.body(), br#"{"session_id":"s1"}"#);
        assert_eq!(e.fields.len(), 2, "kept for a later dead letter");
        let r = Event::parse(
            ID,
            fields(&[("payload", "{}"), ("idempotency_key", "a\nb")]),
            &keys(),
        )
        .unwrap_err();
        assert_eq!(r.reason, "invalid_idempotency_key");
    }

    #[test]
    fn bad_payloads_are_rejected_with_a_reason() {
        let r = Event::parse(ID, fields(&[("payload", "{not json")]), &keys()).unwrap_err();
        assert_eq!(r.reason, "invalid_payload");
        assert!(
            r.detail.starts_with("field payload: not JSON"),
            "{}",
            r.detail
        );
        let mut f = fields(&[("payload", "")]);
        f[0].1 = vec![b'"', 0xff, b'"'];
        let r = Event::parse(ID, f, &keys()).unwrap_err();
        assert!(r.detail.contains("not UTF-8"), "{}", r.detail);
        let r =
            Event::parse(ID, fields(&[("event", "a\nb"), ("payload", "{}")]), &keys()).unwrap_err();
        assert_eq!(r.reason, "invalid_event");
    }

    #[test]
    fn reads_redis_replies_including_vanished_entries() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-1"),
                Value::Array(vec![bulk("event"), bulk("e"), bulk("payload"), bulk("{}")]),
            ]),
            Value::Array(vec![bulk("1-2"), Value::Nil]),
        ]);
        let entries = entries_from(reply).unwrap();
        assert_eq!(
            entries[0].fields.as_ref().unwrap()[1],
            (b"payload".to_vec(), b"{}".to_vec())
        );
        assert_eq!(
            entries[1],
            Entry {
                id: StreamId { ms: 1, seq: 2 },
                fields: None
            }
        );
        assert!(entries_from(Value::Int(3)).is_err());
    }
}
