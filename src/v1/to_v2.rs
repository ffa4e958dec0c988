//! v1 → v2: go-loggregator's `ToV2` with preferred tags (`tags`, never `deprecated_tags`).

use std::collections::BTreeMap;

use crate::proto::envelope::Message;
use crate::proto::{self, Counter, Gauge, GaugeValue, Log, Timer};
use crate::proto_v1::envelope::EventType;
use crate::proto_v1::log_message::MessageType;
use crate::proto_v1::{Envelope, Method, PeerType};

use super::{event_type_name, uuid_to_string};

/// Converts a v1 envelope to v2 by upstream's rules (`ToV2(e, usePreferredTags = true)`).
///
/// Common to every event type, in this order:
/// * `timestamp` is the envelope's (0 if unset);
/// * `tags` are the v1 tags, then `origin`, `deployment`, `job`, `index`, `ip` (each `""` when
///   unset) and `__v1_type` (the event type's name) set over any v1 tag of the same name;
/// * `source_id` is the v1 tag `source_id` when present, even empty (the tag is then removed),
///   else `deployment + "/" + job`.
///
/// Then per event type (a field's tag is always set, `""` or `0` when the field is unset):
///
/// | v1 | v2 |
/// |---|---|
/// | LogMessage | `log { payload: message, type: OUT→OUT, ERR→ERR }` (by name: v1 is OUT=1/ERR=2, v2 OUT=0/ERR=1; a number that is neither gives OUT); tag `source_type`; `instance_id = source_instance`; `source_id = app_id` when non-empty. The log's own timestamp is not carried. |
/// | HttpStartStop | `timer { name: "http", start: startTimestamp, stop: stopTimestamp }`; `source_id` = `applicationId` as a UUID string unless unset or all zero; `instance_id` = `instanceIndex` in decimal (`"0"` when unset); tags `request_id` (UUID string), `peer_type` and `method` (enum names, `Client`, `GET`…, or the number when the enum has no such value), `uri`, `remote_address`, `user_agent`, `status_code` and `content_length` (decimal), `routing_instance_id` (= `instanceId`), `forwarded` (the list joined by `"\n"`) |
/// | ValueMetric | `gauge { metrics: { name: { unit, value } } }`; `instance_id` = v1 tag `instance_id` (which stays a tag) |
/// | CounterEvent | `counter { name, delta, total }`; `instance_id` = v1 tag `instance_id` (the tag is removed) |
/// | Error | `log { payload: message, type: OUT }`; tags `source` and `code` (decimal) |
/// | ContainerMetric | `gauge` with `cpu` (`percentage`) and `memory`, `disk`, `memory_quota`, `disk_quota` (`bytes`, as `f64`, so above 2^53 rounded to the nearest representable); `source_id = applicationId` when non-empty; `instance_id` = `instanceIndex` in decimal |
///
/// An unknown event type (only possible for an envelope [`super::decode`] did not accept) gives an
/// envelope without a message, as upstream's does.
pub fn to_v2(e: &Envelope) -> proto::Envelope {
    into_v2(e.clone())
}

/// [`to_v2`], moving the payload, strings and tags instead of copying them.
pub fn into_v2(e: Envelope) -> proto::Envelope {
    let mut tags = e.tags;
    let source_id = match tags.remove("source_id") {
        Some(s) => s,
        None => format!(
            "{}/{}",
            e.deployment.as_deref().unwrap_or_default(),
            e.job.as_deref().unwrap_or_default()
        ),
    };
    // An unset event type reads as the enum's first value, as upstream's getter does.
    let event_type = e.event_type.unwrap_or(EventType::HttpStartStop as i32);
    for (key, value) in [
        ("origin", e.origin.unwrap_or_default()),
        ("deployment", e.deployment.unwrap_or_default()),
        ("job", e.job.unwrap_or_default()),
        ("index", e.index.unwrap_or_default()),
        ("ip", e.ip.unwrap_or_default()),
        ("__v1_type", event_type_name(event_type)),
    ] {
        tags.insert(key.to_owned(), value);
    }
    let mut v2 = proto::Envelope {
        timestamp: e.timestamp.unwrap_or_default(),
        source_id,
        instance_id: String::new(),
        deprecated_tags: BTreeMap::new(),
        tags,
        message: None,
    };
    // A missing event message (again only for an envelope decode did not accept) reads as one with
    // every field unset, as upstream's getters on a nil message do.
    match EventType::try_from(event_type) {
        Ok(EventType::LogMessage) => {
            let l = e.log_message.unwrap_or_default();
            set(&mut v2, "source_type", l.source_type.unwrap_or_default());
            v2.instance_id = l.source_instance.unwrap_or_default();
            if let Some(app_id) = l.app_id.filter(|a| !a.is_empty()) {
                v2.source_id = app_id;
            }
            let r#type = match l.message_type.map(MessageType::try_from) {
                Some(Ok(MessageType::Err)) => proto::log::Type::Err,
                _ => proto::log::Type::Out,
            };
            v2.message = Some(Message::Log(Log {
                payload: l.message.unwrap_or_default(),
                r#type: r#type as i32,
            }));
        }
        Ok(EventType::HttpStartStop) => {
            let h = e.http_start_stop.unwrap_or_default();
            if let Some(app) = h.application_id.filter(|u| u.low() != 0 || u.high() != 0) {
                v2.source_id = uuid_to_string(&app);
            }
            v2.instance_id = h.instance_index().to_string();
            v2.message = Some(Message::Timer(Timer {
                name: "http".to_owned(),
                start: h.start_timestamp(),
                stop: h.stop_timestamp(),
            }));
            let request_id = uuid_to_string(&h.request_id.unwrap_or_default());
            let peer_type = h.peer_type.unwrap_or(PeerType::Client as i32);
            let method = h.method.unwrap_or(Method::Get as i32);
            for (key, value) in [
                ("request_id", request_id),
                (
                    "peer_type",
                    PeerType::try_from(peer_type)
                        .map_or_else(|_| peer_type.to_string(), |p| p.as_str_name().to_owned()),
                ),
                (
                    "method",
                    Method::try_from(method)
                        .map_or_else(|_| method.to_string(), |m| m.as_str_name().to_owned()),
                ),
                ("uri", h.uri.unwrap_or_default()),
                ("remote_address", h.remote_address.unwrap_or_default()),
                ("user_agent", h.user_agent.unwrap_or_default()),
                ("status_code", h.status_code.unwrap_or_default().to_string()),
                (
                    "content_length",
                    h.content_length.unwrap_or_default().to_string(),
                ),
                ("routing_instance_id", h.instance_id.unwrap_or_default()),
                ("forwarded", h.forwarded.join("\n")),
            ] {
                set(&mut v2, key, value);
            }
        }
        Ok(EventType::ValueMetric) => {
            let v = e.value_metric.unwrap_or_default();
            v2.instance_id = v1_instance_id(&v2);
            let value = v.value();
            v2.message = Some(gauge([(
                v.name.unwrap_or_default(),
                v.unit.unwrap_or_default(),
                value,
            )]));
        }
        Ok(EventType::CounterEvent) => {
            let c = e.counter_event.unwrap_or_default();
            v2.instance_id = v1_instance_id(&v2);
            v2.tags.remove("instance_id");
            v2.message = Some(Message::Counter(Counter {
                delta: c.delta(),
                total: c.total(),
                name: c.name.unwrap_or_default(),
            }));
        }
        Ok(EventType::Error) => {
            let r = e.error.unwrap_or_default();
            set(&mut v2, "code", r.code().to_string());
            set(&mut v2, "source", r.source.unwrap_or_default());
            v2.message = Some(Message::Log(Log {
                payload: r.message.unwrap_or_default().into_bytes(),
                r#type: proto::log::Type::Out as i32,
            }));
        }
        Ok(EventType::ContainerMetric) => {
            let c = e.container_metric.unwrap_or_default();
            v2.instance_id = c.instance_index().to_string();
            let bytes = |n: u64| ("bytes".to_owned(), n as f64);
            let metrics = [
                ("cpu", ("percentage".to_owned(), c.cpu_percentage())),
                ("memory", bytes(c.memory_bytes())),
                ("disk", bytes(c.disk_bytes())),
                ("memory_quota", bytes(c.memory_bytes_quota())),
                ("disk_quota", bytes(c.disk_bytes_quota())),
            ];
            if let Some(app) = c.application_id.filter(|a| !a.is_empty()) {
                v2.source_id = app;
            }
            v2.message = Some(gauge(
                metrics.map(|(name, (unit, value))| (name.to_owned(), unit, value)),
            ));
        }
        Err(_) => {}
    }
    v2
}

/// The v1 tag `instance_id` (no base tag has that name, so the v2 tags still hold the v1 value).
fn v1_instance_id(v2: &proto::Envelope) -> String {
    v2.tags.get("instance_id").cloned().unwrap_or_default()
}

fn set(v2: &mut proto::Envelope, key: &str, value: String) {
    v2.tags.insert(key.to_owned(), value);
}

fn gauge<const N: usize>(metrics: [(String, String, f64); N]) -> Message {
    Message::Gauge(Gauge {
        metrics: metrics
            .into_iter()
            .map(|(name, unit, value)| (name, GaugeValue { unit, value }))
            .collect(),
    })
}
