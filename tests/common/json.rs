//! Envelopes as one line of canonical JSON for test-vector files, without a JSON crate: keys in a
//! fixed order, maps sorted, bytes as hex, doubles in Rust's shortest round-trip form. The v2 form
//! is the one `tests/vectors/signing.txt` uses.
//!
//! Included by path (`#[path = "common/json.rs"]`) by the tests that need it, so the other test
//! binaries do not compile it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use metron::envelope::signing::encode_hex;
use metron::proto::envelope::Message;
use metron::proto::{value::Data, Envelope};
use metron::proto_v1 as v1;

pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn json_map<V>(m: &BTreeMap<String, V>, f: impl Fn(&V) -> String) -> String {
    let items: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{}: {}", json_str(k), f(v)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// A v2 envelope, every field present.
pub fn v2_json(e: &Envelope) -> String {
    let message = match &e.message {
        None => "null".to_string(),
        Some(Message::Log(l)) => format!(
            "{{\"log\": {{\"payload_hex\": \"{}\", \"type\": {}}}}}",
            encode_hex(&l.payload),
            l.r#type
        ),
        Some(Message::Counter(c)) => format!(
            "{{\"counter\": {{\"name\": {}, \"delta\": {}, \"total\": {}}}}}",
            json_str(&c.name),
            c.delta,
            c.total
        ),
        Some(Message::Gauge(g)) => format!(
            "{{\"gauge\": {{\"metrics\": {}}}}}",
            json_map(&g.metrics, |v| format!(
                "{{\"unit\": {}, \"value\": {:?}}}",
                json_str(&v.unit),
                v.value
            ))
        ),
        Some(Message::Timer(t)) => format!(
            "{{\"timer\": {{\"name\": {}, \"start\": {}, \"stop\": {}}}}}",
            json_str(&t.name),
            t.start,
            t.stop
        ),
        Some(Message::Event(ev)) => format!(
            "{{\"event\": {{\"title\": {}, \"body\": {}}}}}",
            json_str(&ev.title),
            json_str(&ev.body)
        ),
    };
    let deprecated = json_map(&e.deprecated_tags, |v| match &v.data {
        None => "{}".to_string(),
        Some(Data::Text(s)) => format!("{{\"text\": {}}}", json_str(s)),
        Some(Data::Integer(i)) => format!("{{\"integer\": {i}}}"),
        Some(Data::Decimal(d)) => format!("{{\"decimal\": {d:?}}}"),
    });
    format!(
        "{{\"timestamp\": {}, \"source_id\": {}, \"instance_id\": {}, \"tags\": {}, \"deprecated_tags\": {}, \"message\": {}}}",
        e.timestamp,
        json_str(&e.source_id),
        json_str(&e.instance_id),
        json_map(&e.tags, |v| json_str(v)),
        deprecated,
        message
    )
}

/// Collects `"name": value` members, leaving out unset (proto2 `None`) fields so that the
/// difference between unset and zero stays visible.
#[derive(Default)]
struct Obj(Vec<String>);

impl Obj {
    fn put(mut self, name: &str, value: Option<String>) -> Self {
        if let Some(v) = value {
            self.0.push(format!("{}: {v}", json_str(name)));
        }
        self
    }

    fn done(self) -> String {
        format!("{{{}}}", self.0.join(", "))
    }
}

fn s(v: &Option<String>) -> Option<String> {
    v.as_deref().map(json_str)
}

fn n<T: std::fmt::Display>(v: Option<T>) -> Option<String> {
    v.map(|x| x.to_string())
}

fn f(v: Option<f64>) -> Option<String> {
    v.map(|x| format!("{x:?}"))
}

/// An enum by name, or its number when the enum has no such value.
fn name(v: Option<i32>, to_name: impl Fn(i32) -> Option<&'static str>) -> Option<String> {
    v.map(|raw| to_name(raw).map_or_else(|| raw.to_string(), json_str))
}

fn uuid(u: &Option<v1::Uuid>) -> Option<String> {
    u.as_ref().map(|u| {
        Obj::default()
            .put("low", n(u.low))
            .put("high", n(u.high))
            .done()
    })
}

/// A v1 envelope with the upstream field names; only set fields appear.
pub fn v1_json(e: &v1::Envelope) -> String {
    use v1::envelope::EventType;
    let http = e.http_start_stop.as_ref().map(|h| {
        Obj::default()
            .put("startTimestamp", n(h.start_timestamp))
            .put("stopTimestamp", n(h.stop_timestamp))
            .put("requestId", uuid(&h.request_id))
            .put(
                "peerType",
                name(h.peer_type, |r| {
                    v1::PeerType::try_from(r).ok().map(|p| p.as_str_name())
                }),
            )
            .put(
                "method",
                name(h.method, |r| {
                    v1::Method::try_from(r).ok().map(|m| m.as_str_name())
                }),
            )
            .put("uri", s(&h.uri))
            .put("remoteAddress", s(&h.remote_address))
            .put("userAgent", s(&h.user_agent))
            .put("statusCode", n(h.status_code))
            .put("contentLength", n(h.content_length))
            .put("applicationId", uuid(&h.application_id))
            .put("instanceIndex", n(h.instance_index))
            .put("instanceId", s(&h.instance_id))
            .put(
                "forwarded",
                (!h.forwarded.is_empty()).then(|| {
                    format!(
                        "[{}]",
                        h.forwarded
                            .iter()
                            .map(|x| json_str(x))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
            )
            .done()
    });
    let log = e.log_message.as_ref().map(|l| {
        Obj::default()
            .put(
                "message_hex",
                l.message.as_deref().map(|m| json_str(&encode_hex(m))),
            )
            .put(
                "message_type",
                name(l.message_type, |r| {
                    v1::log_message::MessageType::try_from(r)
                        .ok()
                        .map(|t| t.as_str_name())
                }),
            )
            .put("timestamp", n(l.timestamp))
            .put("app_id", s(&l.app_id))
            .put("source_type", s(&l.source_type))
            .put("source_instance", s(&l.source_instance))
            .done()
    });
    let value = e.value_metric.as_ref().map(|v| {
        Obj::default()
            .put("name", s(&v.name))
            .put("value", f(v.value))
            .put("unit", s(&v.unit))
            .done()
    });
    let counter = e.counter_event.as_ref().map(|c| {
        Obj::default()
            .put("name", s(&c.name))
            .put("delta", n(c.delta))
            .put("total", n(c.total))
            .done()
    });
    let error = e.error.as_ref().map(|r| {
        Obj::default()
            .put("source", s(&r.source))
            .put("code", n(r.code))
            .put("message", s(&r.message))
            .done()
    });
    let container = e.container_metric.as_ref().map(|c| {
        Obj::default()
            .put("applicationId", s(&c.application_id))
            .put("instanceIndex", n(c.instance_index))
            .put("cpuPercentage", f(c.cpu_percentage))
            .put("memoryBytes", n(c.memory_bytes))
            .put("diskBytes", n(c.disk_bytes))
            .put("memoryBytesQuota", n(c.memory_bytes_quota))
            .put("diskBytesQuota", n(c.disk_bytes_quota))
            .done()
    });
    Obj::default()
        .put("origin", s(&e.origin))
        .put(
            "eventType",
            name(e.event_type, |r| {
                EventType::try_from(r).ok().map(|t| t.as_str_name())
            }),
        )
        .put("timestamp", n(e.timestamp))
        .put("deployment", s(&e.deployment))
        .put("job", s(&e.job))
        .put("index", s(&e.index))
        .put("ip", s(&e.ip))
        .put(
            "tags",
            (!e.tags.is_empty()).then(|| json_map(&e.tags, |v| json_str(v))),
        )
        .put("httpStartStop", http)
        .put("logMessage", log)
        .put("valueMetric", value)
        .put("counterEvent", counter)
        .put("error", error)
        .put("containerMetric", container)
        .done()
}
