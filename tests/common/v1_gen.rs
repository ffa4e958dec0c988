//! proptest strategies for v1 envelopes that `metron::v1::decode` accepts, biased towards the
//! edge cases of the conversions (tags named like fields, empty strings, UUID-shaped strings,
//! enum values the enums lack, newlines in `forwarded`, byte counts above 2^53).
//!
//! Included by path (`#[path = "common/v1_gen.rs"]`) by the v1 property tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use metron::proto_v1::envelope::EventType;
use metron::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, Error, HttpStartStop, LogMessage, Uuid, ValueMetric,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

/// Short strings, often empty, sometimes UUID-shaped, sometimes any printable text.
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a-z0-9/]{0,6}",
        1 => Just(String::new()),
        1 => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        1 => "\\PC{0,8}",
    ]
    .boxed()
}

/// Tag names the conversions give a meaning to, and a few that mean nothing.
pub fn tag_key() -> BoxedStrategy<String> {
    prop_oneof![
        2 => prop::sample::select(vec![
            "origin", "deployment", "job", "index", "ip", "__v1_type", "source_id", "instance_id",
            "source_type", "source", "code", "request_id", "peer_type", "method", "uri",
            "remote_address", "user_agent", "status_code", "content_length",
            "routing_instance_id", "forwarded",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_]{1,6}",
    ]
    .boxed()
}

pub fn tags() -> BoxedStrategy<BTreeMap<String, String>> {
    btree_map(tag_key(), text(), 0..5).boxed()
}

fn uuid() -> BoxedStrategy<Uuid> {
    prop_oneof![
        3 => (any::<u64>(), any::<u64>()),
        1 => Just((0, 0)),
    ]
    .prop_map(|(low, high)| Uuid {
        low: Some(low),
        high: Some(high),
    })
    .boxed()
}

/// A finite double (NaN would make equality checks meaningless, not the code wrong).
fn double() -> BoxedStrategy<f64> {
    prop_oneof![
        any::<f64>().prop_filter("not NaN", |f| !f.is_nan()),
        Just(0.0),
        Just(-0.0),
        (0u64..=u64::MAX).prop_map(|n| n as f64),
    ]
    .boxed()
}

/// Byte counts, often above 2^53 so that the `f64` leg of the trip shows.
fn bytes_count() -> BoxedStrategy<u64> {
    prop_oneof![0u64..1 << 40, any::<u64>()].boxed()
}

fn enum_value(known: std::ops::RangeInclusive<i32>) -> BoxedStrategy<i32> {
    prop_oneof![4 => known, 1 => any::<i32>()].boxed()
}

pub fn log_message() -> BoxedStrategy<LogMessage> {
    (
        vec(any::<u8>(), 0..16),
        enum_value(1..=2),
        any::<i64>(),
        option::of(text()),
        option::of(text()),
        option::of(text()),
    )
        .prop_map(
            |(message, message_type, timestamp, app_id, source_type, source_instance)| LogMessage {
                message: Some(message),
                message_type: Some(message_type),
                timestamp: Some(timestamp),
                app_id,
                source_type,
                source_instance,
            },
        )
        .boxed()
}

pub fn http_start_stop() -> BoxedStrategy<HttpStartStop> {
    (
        (any::<i64>(), any::<i64>(), uuid()),
        (enum_value(1..=2), enum_value(1..=44)),
        (text(), text(), text()),
        (any::<i32>(), any::<i64>()),
        (
            option::of(uuid()),
            option::of(any::<i32>()),
            option::of(text()),
            vec(prop_oneof![text(), Just("a\nb".to_owned())], 0..3),
        ),
    )
        .prop_map(
            |(
                (start, stop, request_id),
                (peer_type, method),
                (uri, remote_address, user_agent),
                (status_code, content_length),
                (application_id, instance_index, instance_id, forwarded),
            )| HttpStartStop {
                start_timestamp: Some(start),
                stop_timestamp: Some(stop),
                request_id: Some(request_id),
                peer_type: Some(peer_type),
                method: Some(method),
                uri: Some(uri),
                remote_address: Some(remote_address),
                user_agent: Some(user_agent),
                status_code: Some(status_code),
                content_length: Some(content_length),
                application_id,
                instance_index,
                instance_id,
                forwarded,
            },
        )
        .boxed()
}

pub fn value_metric() -> BoxedStrategy<ValueMetric> {
    (text(), double(), text())
        .prop_map(|(name, value, unit)| ValueMetric {
            name: Some(name),
            value: Some(value),
            unit: Some(unit),
        })
        .boxed()
}

pub fn counter_event() -> BoxedStrategy<CounterEvent> {
    (text(), any::<u64>(), option::of(any::<u64>()))
        .prop_map(|(name, delta, total)| CounterEvent {
            name: Some(name),
            delta: Some(delta),
            total,
        })
        .boxed()
}

pub fn error() -> BoxedStrategy<Error> {
    (text(), any::<i32>(), text())
        .prop_map(|(source, code, message)| Error {
            source: Some(source),
            code: Some(code),
            message: Some(message),
        })
        .boxed()
}

pub fn container_metric() -> BoxedStrategy<ContainerMetric> {
    (
        (text(), any::<i32>(), double()),
        (bytes_count(), bytes_count()),
        (option::of(bytes_count()), option::of(bytes_count())),
    )
        .prop_map(
            |(
                (application_id, instance_index, cpu),
                (memory, disk),
                (memory_quota, disk_quota),
            )| ContainerMetric {
                application_id: Some(application_id),
                instance_index: Some(instance_index),
                cpu_percentage: Some(cpu),
                memory_bytes: Some(memory),
                disk_bytes: Some(disk),
                memory_bytes_quota: memory_quota,
                disk_bytes_quota: disk_quota,
            },
        )
        .boxed()
}

/// An envelope `decode` accepts: the event message `eventType` names, sometimes one more event
/// message of another type (which the conversions ignore), every optional field maybe unset.
pub fn valid_envelope() -> BoxedStrategy<Envelope> {
    let base = (
        text(),
        option::of(any::<i64>()),
        (
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        tags(),
    )
        .prop_map(
            |(origin, timestamp, (deployment, job, index, ip), tags)| Envelope {
                origin: Some(origin),
                timestamp,
                deployment,
                job,
                index,
                ip,
                tags,
                ..Envelope::default()
            },
        );
    let event = prop_oneof![
        http_start_stop().prop_map(|m| (
            EventType::HttpStartStop,
            Envelope {
                http_start_stop: Some(m),
                ..Envelope::default()
            }
        )),
        log_message().prop_map(|m| (
            EventType::LogMessage,
            Envelope {
                log_message: Some(m),
                ..Envelope::default()
            }
        )),
        value_metric().prop_map(|m| (
            EventType::ValueMetric,
            Envelope {
                value_metric: Some(m),
                ..Envelope::default()
            }
        )),
        counter_event().prop_map(|m| (
            EventType::CounterEvent,
            Envelope {
                counter_event: Some(m),
                ..Envelope::default()
            }
        )),
        error().prop_map(|m| (
            EventType::Error,
            Envelope {
                error: Some(m),
                ..Envelope::default()
            }
        )),
        container_metric().prop_map(|m| (
            EventType::ContainerMetric,
            Envelope {
                container_metric: Some(m),
                ..Envelope::default()
            }
        )),
    ];
    (base, event, option::weighted(0.1, value_metric()))
        .prop_map(|(mut e, (event_type, m), extra)| {
            e.event_type = Some(event_type as i32);
            e.http_start_stop = m.http_start_stop;
            e.log_message = m.log_message;
            e.value_metric = m.value_metric;
            e.counter_event = m.counter_event;
            e.error = m.error;
            e.container_metric = m.container_metric;
            if event_type != EventType::ValueMetric {
                e.value_metric = extra;
            }
            e
        })
        .boxed()
}
