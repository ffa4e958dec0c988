//! v2 → v1: what a Doppler derives for the v1 firehose (go-loggregator's `ToV1`).

use std::collections::BTreeMap;

use crate::proto::envelope::Message;
use crate::proto::{self, value::Data, Counter, Gauge, Log, Timer};
use crate::proto_v1::envelope::EventType;
use crate::proto_v1::log_message::MessageType;
use crate::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, Error, HttpStartStop, LogMessage, Method, PeerType,
    ValueMetric,
};

use super::{parse_uuid, BASE_TAGS};

/// The gauge keys that make a v2 gauge a v1 `ContainerMetric`.
const CONTAINER_METRICS: [&str; 5] = ["cpu", "memory", "disk", "memory_quota", "disk_quota"];

/// Converts a v2 envelope to the v1 envelopes a Doppler shows on the v1 firehose (upstream's
/// `ToV1`): none for an `Event` or an envelope without a message, several for a gauge of several
/// values, otherwise one.
///
/// Base of every result: `origin`, `deployment`, `job`, `index`, `ip` from the tag of that name
/// (in `tags`, else `deprecated_tags`: text as is, integers in decimal, decimals as Go's `%f`,
/// six places), all set, `""` when absent; `timestamp` set; `tags` = `tags` plus
/// `deprecated_tags` (the deprecated value winning), plus `source_id` = the envelope's
/// `source_id` when non-empty, minus the base names and `__v1_type` and the tags the event
/// type turns back into fields (`source_type`; `source`, `code`; the ten HTTP ones). Then:
///
/// * Log → `LogMessage { message: payload, message_type: OUT if OUT else ERR, timestamp: the
///   envelope's, app_id: source_id, source_type: tag, source_instance: instance_id }`, or, when
///   the tag `__v1_type` is `Error`, `Error { source: tag, code: tag, message: payload }` (a
///   payload that is not UTF-8 has each bad sequence replaced by U+FFFD: v1 `message` is a
///   `string`);
/// * Counter → `CounterEvent { name, delta, total }`, tag `instance_id` = `instance_id` when
///   non-empty;
/// * Gauge with more than one key, including `cpu`, `memory`, `disk`, `memory_quota` and
///   `disk_quota` each with a unit or a non-zero value → one `ContainerMetric` (any other key is
///   dropped, except `instance_index`, which then gives `instanceIndex` instead of
///   `instance_id`); `applicationId` = `source_id`; byte counts are the values cast to `u64`,
///   saturating (Go leaves out-of-range casts to the platform). Upstream's rule, which the
///   reference's "exactly those five keys" simplifies;
/// * any other Gauge → one `ValueMetric` per key, in key order (upstream's is Go map order,
///   i.e. random), tag `instance_id` as for a counter;
/// * Timer (whatever its name) → `HttpStartStop`: `start`, `stop`; `requestId` parsed from the
///   tag `request_id` and `applicationId` from `source_id`, each left unset unless it parses as
///   a UUID (a missing `requestId` is then what upstream's encoder refuses); `peerType`,
///   `method` from their tags by name, `0` for a name the enum lacks; `statusCode`,
///   `contentLength` from their tags in decimal, `0` if not a number; `instanceIndex` from
///   `instance_id` likewise; `instanceId` from the tag `routing_instance_id`; `forwarded` = the
///   tag split at `"\n"` (so an absent tag gives `[""]`, as upstream's does).
///
/// Integers parsed from text wrap into `int32` fields as Go's `int32(x)` does.
///
/// # Round trip
///
/// `to_v1(&to_v2(&e))` is `[e]` for an envelope in the form `to_v1` itself produces, and
/// otherwise differs from `[e]` only as listed here (the tests check this list against arbitrary
/// envelopes). For every type:
/// * unset optional fields come back set to `""` or `0` (`timestamp`, `deployment`, `job`,
///   `index`, `ip`, and those of each event);
/// * the `source_id` tag comes back holding the `source_id` [`super::to_v2`] derived (added when
///   absent), or not at all when that is empty;
/// * tags named like the base fields, `__v1_type`, or the event's own tags are dropped;
/// * an event message other than the one `eventType` names is dropped;
///
/// and per type in that
/// * LogMessage: the log's `timestamp` becomes the envelope's; `app_id` becomes the derived
///   `source_id`; a `message_type` that is neither OUT nor ERR becomes OUT;
/// * HttpStartStop: an unset or all-zero `applicationId` comes back unset (or as the derived
///   `source_id`, if that happens to parse as a UUID); an unknown `peerType` or `method` comes
///   back `0`; `forwarded` is split again at newlines, so `[]` comes back as `[""]` and an entry
///   holding a newline as two;
/// * CounterEvent: an `instance_id` tag that is empty is dropped;
/// * ContainerMetric: byte counts above 2^53 come back rounded (they travel as `f64`);
///   `applicationId` becomes the derived `source_id` when it was empty.
///
/// ValueMetric and Error have no differences of their own.
pub fn to_v1(e: &proto::Envelope) -> Vec<Envelope> {
    let mut out = match &e.message {
        Some(Message::Log(l)) => vec![log(e, l)],
        Some(Message::Counter(c)) => vec![counter(e, c)],
        Some(Message::Gauge(g)) => gauge(e, g),
        Some(Message::Timer(t)) => vec![timer(e, t)],
        Some(Message::Event(_)) | None => Vec::new(),
    };
    for v1 in &mut out {
        for key in BASE_TAGS {
            v1.tags.remove(key);
        }
    }
    out
}

/// Upstream's `getV2Tag`: the tag, else the deprecated tag rendered as text, else `""`.
fn tag(e: &proto::Envelope, key: &str) -> String {
    if let Some(v) = e.tags.get(key) {
        return v.clone();
    }
    e.deprecated_tags
        .get(key)
        .and_then(|v| v.data.as_ref())
        .map(data_text)
        .unwrap_or_default()
}

fn data_text(d: &Data) -> String {
    match d {
        Data::Text(s) => s.clone(),
        Data::Integer(i) => i.to_string(),
        Data::Decimal(f) => go_percent_f(*f),
    }
}

/// Go's `fmt.Sprintf("%f", f)`.
fn go_percent_f(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{f:.6}")
    }
}

/// Go's `strconv.ParseInt(s, 10, 64)`, 0 when it fails (upstream's `atoi`).
fn atoi(s: &str) -> i64 {
    s.parse().unwrap_or(0)
}

/// Upstream's `createBaseV1`: everything but the event type and its message.
fn base(e: &proto::Envelope) -> Envelope {
    let mut tags: BTreeMap<String, String> = e.tags.clone();
    for (key, value) in &e.deprecated_tags {
        if let Some(d) = &value.data {
            tags.insert(key.clone(), data_text(d));
        }
    }
    if !e.source_id.is_empty() {
        tags.insert("source_id".to_owned(), e.source_id.clone());
    }
    Envelope {
        origin: Some(tag(e, "origin")),
        timestamp: Some(e.timestamp),
        deployment: Some(tag(e, "deployment")),
        job: Some(tag(e, "job")),
        index: Some(tag(e, "index")),
        ip: Some(tag(e, "ip")),
        tags,
        ..Envelope::default()
    }
}

fn log(e: &proto::Envelope, l: &Log) -> Envelope {
    let mut v1 = base(e);
    if tag(e, "__v1_type") == "Error" {
        v1.event_type = Some(EventType::Error as i32);
        v1.error = Some(Error {
            source: Some(tag(e, "source")),
            code: Some(atoi(&tag(e, "code")) as i32),
            message: Some(String::from_utf8_lossy(&l.payload).into_owned()),
        });
        v1.tags.remove("source");
        v1.tags.remove("code");
        return v1;
    }
    let message_type = if l.r#type == proto::log::Type::Out as i32 {
        MessageType::Out
    } else {
        MessageType::Err
    };
    v1.event_type = Some(EventType::LogMessage as i32);
    v1.log_message = Some(LogMessage {
        message: Some(l.payload.clone()),
        message_type: Some(message_type as i32),
        timestamp: Some(e.timestamp),
        app_id: Some(e.source_id.clone()),
        source_type: Some(tag(e, "source_type")),
        source_instance: Some(e.instance_id.clone()),
    });
    v1.tags.remove("source_type");
    v1
}

fn counter(e: &proto::Envelope, c: &Counter) -> Envelope {
    let mut v1 = base(e);
    v1.event_type = Some(EventType::CounterEvent as i32);
    if !e.instance_id.is_empty() {
        v1.tags
            .insert("instance_id".to_owned(), e.instance_id.clone());
    }
    v1.counter_event = Some(CounterEvent {
        name: Some(c.name.clone()),
        delta: Some(c.delta),
        total: Some(c.total),
    });
    v1
}

fn gauge(e: &proto::Envelope, g: &Gauge) -> Vec<Envelope> {
    if let Some(v1) = container_metric(e, g) {
        return vec![v1];
    }
    g.metrics
        .iter()
        .map(|(name, m)| {
            let mut v1 = base(e);
            v1.event_type = Some(EventType::ValueMetric as i32);
            if !e.instance_id.is_empty() {
                v1.tags
                    .insert("instance_id".to_owned(), e.instance_id.clone());
            }
            v1.value_metric = Some(ValueMetric {
                name: Some(name.clone()),
                value: Some(m.value),
                unit: Some(m.unit.clone()),
            });
            v1
        })
        .collect()
}

fn container_metric(e: &proto::Envelope, g: &Gauge) -> Option<Envelope> {
    if g.metrics.len() == 1 {
        return None;
    }
    let mut values = [0.0; 5];
    for (slot, key) in values.iter_mut().zip(CONTAINER_METRICS) {
        let m = g.metrics.get(key)?;
        if m.unit.is_empty() && m.value == 0.0 {
            return None;
        }
        *slot = m.value;
    }
    let [cpu, memory, disk, memory_quota, disk_quota] = values;
    let instance_index = match g.metrics.get("instance_index") {
        Some(m) => m.value as i32,
        None => atoi(&e.instance_id) as i32,
    };
    let mut v1 = base(e);
    v1.event_type = Some(EventType::ContainerMetric as i32);
    v1.container_metric = Some(ContainerMetric {
        application_id: Some(e.source_id.clone()),
        instance_index: Some(instance_index),
        cpu_percentage: Some(cpu),
        memory_bytes: Some(memory as u64),
        disk_bytes: Some(disk as u64),
        memory_bytes_quota: Some(memory_quota as u64),
        disk_bytes_quota: Some(disk_quota as u64),
    });
    Some(v1)
}

fn timer(e: &proto::Envelope, t: &Timer) -> Envelope {
    let mut v1 = base(e);
    v1.event_type = Some(EventType::HttpStartStop as i32);
    let peer_type = PeerType::from_str_name(&tag(e, "peer_type")).map_or(0, |p| p as i32);
    let method = Method::from_str_name(&tag(e, "method")).map_or(0, |m| m as i32);
    v1.http_start_stop = Some(HttpStartStop {
        start_timestamp: Some(t.start),
        stop_timestamp: Some(t.stop),
        request_id: parse_uuid(&tag(e, "request_id")),
        peer_type: Some(peer_type),
        method: Some(method),
        uri: Some(tag(e, "uri")),
        remote_address: Some(tag(e, "remote_address")),
        user_agent: Some(tag(e, "user_agent")),
        status_code: Some(atoi(&tag(e, "status_code")) as i32),
        content_length: Some(atoi(&tag(e, "content_length"))),
        application_id: parse_uuid(&e.source_id),
        instance_index: Some(atoi(&e.instance_id) as i32),
        instance_id: Some(tag(e, "routing_instance_id")),
        forwarded: tag(e, "forwarded").split('\n').map(str::to_owned).collect(),
    });
    for key in [
        "peer_type",
        "method",
        "request_id",
        "uri",
        "remote_address",
        "user_agent",
        "status_code",
        "content_length",
        "routing_instance_id",
        "forwarded",
    ] {
        v1.tags.remove(key);
    }
    v1
}
