//! One UDP datagram → one validated v1 envelope, rejecting exactly what upstream rejects.

use prost::Message as _;

use crate::proto_v1::envelope::EventType;
use crate::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, Error, HttpStartStop, LogMessage, Uuid, ValueMetric,
};

/// Why a datagram is not a usable v1 envelope. Each variant is one of upstream's reasons to drop
/// a dropsonde packet; [`V1Error::reason`] names it for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V1Error {
    /// Not a protobuf `events.Envelope`: broken framing, a wrong wire type, or a `string` field
    /// that is not UTF-8.
    #[error("undecodable datagram: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// A field upstream declares `required` is absent; named by its path, e.g.
    /// `logMessage.message_type` or `httpStartStop.requestId.low`.
    #[error("missing required field {0}")]
    MissingField(&'static str),
    /// `eventType` names an event whose message field is absent.
    #[error("event type {event_type} without its {field} message")]
    MissingEvent {
        event_type: &'static str,
        field: &'static str,
    },
    /// `eventType` is not one of the six upstream still accepts (1-3 were Heartbeat, HttpStart and
    /// HttpStop, long removed).
    #[error("unknown event type {0}")]
    UnknownEventType(i32),
}

impl V1Error {
    /// A short stable name for the reason, fit for a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            V1Error::Undecodable(_) => "undecodable",
            V1Error::MissingField(_) => "missing_field",
            V1Error::MissingEvent { .. } => "missing_event",
            V1Error::UnknownEventType(_) => "unknown_event_type",
        }
    }
}

/// Decodes one datagram (one protobuf `events.Envelope`, no framing) and [`validate`]s it.
///
/// Unknown fields are skipped, as upstream's decoder does. One deliberate difference: a `string`
/// field holding invalid UTF-8 makes the datagram undecodable, where upstream's Go decoder
/// accepts it; such a string could not be carried in a v2 envelope (whose strings must be UTF-8)
/// and upstream's own v2 encoder fails on it further down.
///
/// # Errors
/// A [`V1Error`] saying why upstream would drop the datagram.
pub fn decode(datagram: &[u8]) -> Result<Envelope, V1Error> {
    let envelope = Envelope::decode(datagram)?;
    validate(&envelope)?;
    Ok(envelope)
}

/// The checks upstream's proto2 decoder and its dropsonde unmarshaller make after parsing:
/// required fields (the envelope's own, then those of every event message present, in
/// field-number order, even one `eventType` does not name), then the named event's message, then
/// whether the event type is known at all. When several fail, the first in that order is
/// reported; upstream, checking nested messages while it parses, may name another one.
///
/// Upstream checks required fields per occurrence of a message on the wire, this after merging
/// repeated occurrences (proto2 merge semantics); only a sender that splits one event message
/// across two occurrences could tell the difference.
///
/// # Errors
/// The first problem found, as a [`V1Error`].
pub fn validate(e: &Envelope) -> Result<(), V1Error> {
    need(&e.origin, "origin")?;
    let Some(event_type) = e.event_type else {
        return Err(V1Error::MissingField("eventType"));
    };
    if let Some(h) = &e.http_start_stop {
        http_start_stop(h)?;
    }
    if let Some(l) = &e.log_message {
        log_message(l)?;
    }
    if let Some(v) = &e.value_metric {
        value_metric(v)?;
    }
    if let Some(c) = &e.counter_event {
        counter_event(c)?;
    }
    if let Some(r) = &e.error {
        error(r)?;
    }
    if let Some(c) = &e.container_metric {
        container_metric(c)?;
    }
    let (present, field) = match EventType::try_from(event_type) {
        Ok(EventType::HttpStartStop) => (e.http_start_stop.is_some(), "httpStartStop"),
        Ok(EventType::LogMessage) => (e.log_message.is_some(), "logMessage"),
        Ok(EventType::ValueMetric) => (e.value_metric.is_some(), "valueMetric"),
        Ok(EventType::CounterEvent) => (e.counter_event.is_some(), "counterEvent"),
        Ok(EventType::Error) => (e.error.is_some(), "error"),
        Ok(EventType::ContainerMetric) => (e.container_metric.is_some(), "containerMetric"),
        Err(_) => return Err(V1Error::UnknownEventType(event_type)),
    };
    if !present {
        let event_type = EventType::try_from(event_type)
            .map(|t| t.as_str_name())
            .unwrap_or_default();
        return Err(V1Error::MissingEvent { event_type, field });
    }
    Ok(())
}

fn need<T>(field: &Option<T>, path: &'static str) -> Result<(), V1Error> {
    match field {
        Some(_) => Ok(()),
        None => Err(V1Error::MissingField(path)),
    }
}

fn http_start_stop(h: &HttpStartStop) -> Result<(), V1Error> {
    need(&h.start_timestamp, "httpStartStop.startTimestamp")?;
    need(&h.stop_timestamp, "httpStartStop.stopTimestamp")?;
    match &h.request_id {
        Some(u) => uuid(
            u,
            "httpStartStop.requestId.low",
            "httpStartStop.requestId.high",
        )?,
        None => return Err(V1Error::MissingField("httpStartStop.requestId")),
    }
    need(&h.peer_type, "httpStartStop.peerType")?;
    need(&h.method, "httpStartStop.method")?;
    need(&h.uri, "httpStartStop.uri")?;
    need(&h.remote_address, "httpStartStop.remoteAddress")?;
    need(&h.user_agent, "httpStartStop.userAgent")?;
    need(&h.status_code, "httpStartStop.statusCode")?;
    need(&h.content_length, "httpStartStop.contentLength")?;
    if let Some(u) = &h.application_id {
        uuid(
            u,
            "httpStartStop.applicationId.low",
            "httpStartStop.applicationId.high",
        )?;
    }
    Ok(())
}

fn uuid(u: &Uuid, low: &'static str, high: &'static str) -> Result<(), V1Error> {
    need(&u.low, low)?;
    need(&u.high, high)
}

fn log_message(l: &LogMessage) -> Result<(), V1Error> {
    need(&l.message, "logMessage.message")?;
    need(&l.message_type, "logMessage.message_type")?;
    need(&l.timestamp, "logMessage.timestamp")
}

fn value_metric(v: &ValueMetric) -> Result<(), V1Error> {
    need(&v.name, "valueMetric.name")?;
    need(&v.value, "valueMetric.value")?;
    need(&v.unit, "valueMetric.unit")
}

fn counter_event(c: &CounterEvent) -> Result<(), V1Error> {
    need(&c.name, "counterEvent.name")?;
    need(&c.delta, "counterEvent.delta")
}

fn error(r: &Error) -> Result<(), V1Error> {
    need(&r.source, "error.source")?;
    need(&r.code, "error.code")?;
    need(&r.message, "error.message")
}

fn container_metric(c: &ContainerMetric) -> Result<(), V1Error> {
    need(&c.application_id, "containerMetric.applicationId")?;
    need(&c.instance_index, "containerMetric.instanceIndex")?;
    need(&c.cpu_percentage, "containerMetric.cpuPercentage")?;
    need(&c.memory_bytes, "containerMetric.memoryBytes")?;
    need(&c.disk_bytes, "containerMetric.diskBytes")
}
