//! v1 → v2 → v1 round trips: lossless for every event type in the form `to_v1` produces, and
//! otherwise different exactly as `metron::v1::to_v1` documents (checked over arbitrary
//! envelopes); plus the v2-only cases of `to_v1` (gauges, events, deprecated tags).

#[path = "common/v1_gen.rs"]
mod v1_gen;

use std::collections::BTreeMap;

use metron::proto::envelope::Message;
use metron::proto::{self, value::Data, Event, Gauge, GaugeValue, Log, Timer, Value};
use metron::proto_v1::envelope::EventType;
use metron::proto_v1::log_message::MessageType;
use metron::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, Error, HttpStartStop, LogMessage, Method, PeerType,
    Uuid, ValueMetric,
};
use metron::v1::{parse_uuid, to_v1, to_v2, uuid_to_string};
use proptest::prelude::*;

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

fn round_trip(e: &Envelope) -> Vec<Envelope> {
    to_v1(&to_v2(e))
}

/// Every envelope field set; `source_id` is the tag the caller adds.
fn base(event_type: EventType, source_id: &str) -> Envelope {
    Envelope {
        origin: some("rep"),
        event_type: Some(event_type as i32),
        timestamp: Some(1_700_000_000_000_000_123),
        deployment: some("cf"),
        job: some("diego-cell"),
        index: some("0"),
        ip: some("10.0.16.5"),
        tags: tags(&[("source_id", source_id), ("custom", "yes")]),
        ..Envelope::default()
    }
}

const APP: &str = "6f1a9e52-5d1c-4d9a-9f3e-1c2b3a4d5e6f";

/// One envelope per event type, each already in the form `to_v1` produces.
fn canonical() -> Vec<Envelope> {
    let app_uuid = parse_uuid(APP).unwrap();
    vec![
        Envelope {
            log_message: Some(LogMessage {
                message: Some(vec![0xff, b'h', b'i']),
                message_type: Some(MessageType::Err as i32),
                timestamp: Some(1_700_000_000_000_000_123),
                app_id: some(APP),
                source_type: some("APP/PROC/WEB"),
                source_instance: some("3"),
            }),
            ..base(EventType::LogMessage, APP)
        },
        Envelope {
            http_start_stop: Some(HttpStartStop {
                start_timestamp: Some(1),
                stop_timestamp: Some(2),
                request_id: parse_uuid("f47ac10b-58cc-4372-a567-0e02b2c3d479"),
                peer_type: Some(PeerType::Server as i32),
                method: Some(Method::Patch as i32),
                uri: some("/x"),
                remote_address: some("10.0.0.1:1"),
                user_agent: some("ua"),
                status_code: Some(503),
                content_length: Some(-1),
                application_id: Some(app_uuid),
                instance_index: Some(-2),
                instance_id: some("c0ffee"),
                forwarded: vec!["1.1.1.1".into(), "".into(), "2.2.2.2".into()],
            }),
            ..base(EventType::HttpStartStop, APP)
        },
        Envelope {
            value_metric: Some(ValueMetric {
                name: some("latency"),
                value: Some(-0.25),
                unit: some("ms"),
            }),
            tags: tags(&[("source_id", "cf/diego-cell"), ("instance_id", "")]),
            ..base(EventType::ValueMetric, "")
        },
        Envelope {
            counter_event: Some(CounterEvent {
                name: some("requests"),
                delta: Some(5),
                total: Some(u64::MAX),
            }),
            tags: tags(&[("source_id", "custom-source"), ("instance_id", "7")]),
            ..base(EventType::CounterEvent, "")
        },
        Envelope {
            error: Some(Error {
                source: some("api"),
                code: Some(i32::MIN),
                message: some("disk full ✗"),
            }),
            ..base(EventType::Error, "cf/diego-cell")
        },
        Envelope {
            container_metric: Some(ContainerMetric {
                application_id: some("app"),
                instance_index: Some(4),
                cpu_percentage: Some(12.5),
                memory_bytes: Some(1 << 53),
                disk_bytes: Some(0),
                memory_bytes_quota: Some(1 << 30),
                disk_bytes_quota: Some(1 << 31),
            }),
            ..base(EventType::ContainerMetric, "app")
        },
    ]
}

#[test]
fn lossless_for_every_event_type_in_the_form_to_v1_produces() {
    let all = canonical();
    assert_eq!(all.len(), 6, "one per event type");
    for e in all {
        metron::v1::validate(&e).unwrap();
        assert_eq!(round_trip(&e), vec![e.clone()], "{e:?}");
    }
}

/// The round trip `to_v1` documents for an envelope `decode` accepts, restated independently of
/// the conversion code: every difference listed there, and nothing else.
fn documented(e: &Envelope) -> Envelope {
    let event_type = EventType::try_from(e.event_type.unwrap()).unwrap();
    let mut x = e.clone();
    let base_source = e
        .tags
        .get("source_id")
        .cloned()
        .unwrap_or_else(|| format!("{}/{}", e.deployment(), e.job()));
    let derived = match event_type {
        EventType::LogMessage => Some(e.log_message.as_ref().unwrap().app_id().to_owned()),
        EventType::HttpStartStop => e
            .http_start_stop
            .as_ref()
            .unwrap()
            .application_id
            .as_ref()
            .filter(|u| u.low() != 0 || u.high() != 0)
            .map(uuid_to_string),
        EventType::ContainerMetric => Some(
            e.container_metric
                .as_ref()
                .unwrap()
                .application_id()
                .to_owned(),
        ),
        _ => None,
    }
    .filter(|s| !s.is_empty())
    .unwrap_or(base_source);

    // Every type: unset optional fields come back set.
    x.timestamp = Some(e.timestamp());
    for f in [&mut x.deployment, &mut x.job, &mut x.index, &mut x.ip] {
        f.get_or_insert_with(String::new);
    }
    // Event messages eventType does not name are not carried.
    let keep = |t: EventType| event_type == t;
    if !keep(EventType::ValueMetric) {
        x.value_metric = None;
    }
    // Tags named like the base fields, __v1_type, or the event's own tags are dropped, and the
    // source_id tag holds the derived source_id.
    let own: &[&str] = match event_type {
        EventType::LogMessage => &["source_type"],
        EventType::Error => &["source", "code"],
        EventType::HttpStartStop => &[
            "request_id",
            "peer_type",
            "method",
            "uri",
            "remote_address",
            "user_agent",
            "status_code",
            "content_length",
            "routing_instance_id",
            "forwarded",
        ],
        _ => &[],
    };
    for k in [
        "origin",
        "deployment",
        "job",
        "index",
        "ip",
        "__v1_type",
        "source_id",
    ]
    .iter()
    .chain(own)
    {
        x.tags.remove(*k);
    }
    if !derived.is_empty() {
        x.tags.insert("source_id".into(), derived.clone());
    }

    match event_type {
        EventType::LogMessage => {
            let l = x.log_message.as_mut().unwrap();
            l.timestamp = Some(e.timestamp());
            l.app_id = Some(derived);
            if l.message_type != Some(MessageType::Err as i32) {
                l.message_type = Some(MessageType::Out as i32);
            }
            l.source_type.get_or_insert_with(String::new);
            l.source_instance.get_or_insert_with(String::new);
        }
        EventType::HttpStartStop => {
            let h = x.http_start_stop.as_mut().unwrap();
            if !matches!(&h.application_id, Some(u) if u.low() != 0 || u.high() != 0) {
                h.application_id = parse_uuid(&derived);
            }
            if PeerType::try_from(h.peer_type.unwrap()).is_err() {
                h.peer_type = Some(0);
            }
            if Method::try_from(h.method.unwrap()).is_err() {
                h.method = Some(0);
            }
            h.forwarded = h.forwarded.join("\n").split('\n').map(Into::into).collect();
            h.instance_index.get_or_insert(0);
            h.instance_id.get_or_insert_with(String::new);
        }
        EventType::CounterEvent => {
            x.counter_event.as_mut().unwrap().total.get_or_insert(0);
            if e.tags.get("instance_id").is_some_and(String::is_empty) {
                x.tags.remove("instance_id");
            }
        }
        EventType::ContainerMetric => {
            let c = x.container_metric.as_mut().unwrap();
            let via_f64 = |n: Option<u64>| Some(n.unwrap_or(0) as f64 as u64);
            c.memory_bytes = via_f64(c.memory_bytes);
            c.disk_bytes = via_f64(c.disk_bytes);
            c.memory_bytes_quota = via_f64(c.memory_bytes_quota);
            c.disk_bytes_quota = via_f64(c.disk_bytes_quota);
            c.application_id = Some(derived);
        }
        EventType::ValueMetric | EventType::Error => {}
    }
    x
}

proptest! {
    #[test]
    fn round_trip_differs_only_as_documented(e in v1_gen::valid_envelope()) {
        prop_assert_eq!(metron::v1::validate(&e), Ok(()));
        prop_assert_eq!(round_trip(&e), vec![documented(&e)]);
    }
}

// Each documented difference on its own, with a concrete example.

fn log_env(l: LogMessage) -> Envelope {
    Envelope {
        origin: some("rep"),
        event_type: Some(EventType::LogMessage as i32),
        log_message: Some(l),
        ..Envelope::default()
    }
}

fn minimal_log() -> LogMessage {
    LogMessage {
        message: Some(b"x".to_vec()),
        message_type: Some(MessageType::Out as i32),
        timestamp: Some(42),
        ..LogMessage::default()
    }
}

#[test]
fn unset_fields_come_back_set_and_source_id_tag_appears() {
    let e = log_env(minimal_log());
    let back = round_trip(&e).remove(0);
    assert_eq!(back.timestamp, Some(0));
    assert_eq!(back.deployment, some(""));
    assert_eq!(back.ip, some(""));
    // deployment/job were unset, so source_id was "/".
    assert_eq!(back.tags, tags(&[("source_id", "/")]));
    let l = back.log_message.unwrap();
    assert_eq!(
        l.timestamp,
        Some(0),
        "the log's timestamp becomes the envelope's"
    );
    assert_eq!(l.app_id, some("/"), "app_id becomes the derived source_id");
    assert_eq!(l.source_type, some(""));
    assert_eq!(l.source_instance, some(""));
}

#[test]
fn an_empty_source_id_leaves_no_tag() {
    let mut e = log_env(minimal_log());
    e.tags = tags(&[("source_id", ""), ("origin", "spoofed"), ("keep", "me")]);
    let back = round_trip(&e).remove(0);
    assert_eq!(back.tags, tags(&[("keep", "me")]));
    assert_eq!(back.origin, some("rep"));
}

#[test]
fn log_message_type_neither_out_nor_err_becomes_out() {
    let e = log_env(LogMessage {
        message_type: Some(9),
        ..minimal_log()
    });
    let back = round_trip(&e).remove(0);
    assert_eq!(
        back.log_message.unwrap().message_type,
        Some(MessageType::Out as i32)
    );
}

fn http_env(h: HttpStartStop) -> Envelope {
    Envelope {
        origin: some("gorouter"),
        event_type: Some(EventType::HttpStartStop as i32),
        http_start_stop: Some(h),
        ..Envelope::default()
    }
}

fn minimal_http() -> HttpStartStop {
    HttpStartStop {
        start_timestamp: Some(1),
        stop_timestamp: Some(2),
        request_id: Some(Uuid {
            low: Some(1),
            high: Some(2),
        }),
        peer_type: Some(PeerType::Client as i32),
        method: Some(Method::Get as i32),
        uri: some("/"),
        remote_address: some("a"),
        user_agent: some("b"),
        status_code: Some(200),
        content_length: Some(0),
        ..HttpStartStop::default()
    }
}

#[test]
fn http_application_id_zero_or_unset_comes_back_unset_or_from_source_id() {
    let zero = http_env(HttpStartStop {
        application_id: Some(Uuid {
            low: Some(0),
            high: Some(0),
        }),
        ..minimal_http()
    });
    let h = round_trip(&zero).remove(0).http_start_stop.unwrap();
    assert_eq!(h.application_id, None);
    let mut from_tag = http_env(minimal_http());
    from_tag.tags = tags(&[("source_id", APP)]);
    let h = round_trip(&from_tag).remove(0).http_start_stop.unwrap();
    assert_eq!(h.application_id, parse_uuid(APP));
}

#[test]
fn http_unknown_enums_come_back_zero_and_forwarded_is_split_again() {
    let e = http_env(HttpStartStop {
        peer_type: Some(3),
        method: Some(45),
        ..minimal_http()
    });
    let h = round_trip(&e).remove(0).http_start_stop.unwrap();
    assert_eq!((h.peer_type, h.method), (Some(0), Some(0)));
    assert_eq!(h.forwarded, vec![String::new()], "[] comes back as [\"\"]");
    assert_eq!(h.instance_index, Some(0));
    assert_eq!(h.instance_id, some(""));

    let e = http_env(HttpStartStop {
        forwarded: vec!["a\nb".into(), "c".into()],
        ..minimal_http()
    });
    let h = round_trip(&e).remove(0).http_start_stop.unwrap();
    assert_eq!(h.forwarded, vec!["a", "b", "c"]);
}

#[test]
fn counter_empty_instance_id_tag_is_dropped() {
    let e = Envelope {
        origin: some("rep"),
        event_type: Some(EventType::CounterEvent as i32),
        tags: tags(&[("instance_id", "")]),
        counter_event: Some(CounterEvent {
            name: some("c"),
            delta: Some(1),
            total: None,
        }),
        ..Envelope::default()
    };
    let back = round_trip(&e).remove(0);
    assert_eq!(back.tags, tags(&[("source_id", "/")]));
    assert_eq!(back.counter_event.unwrap().total, Some(0));
}

#[test]
fn container_metric_bytes_travel_as_f64_and_empty_application_id_is_filled() {
    let e = Envelope {
        origin: some("rep"),
        event_type: Some(EventType::ContainerMetric as i32),
        deployment: some("cf"),
        job: some("cell"),
        container_metric: Some(ContainerMetric {
            application_id: some(""),
            instance_index: Some(1),
            cpu_percentage: Some(1.0),
            memory_bytes: Some((1 << 53) + 1),
            disk_bytes: Some(u64::MAX),
            memory_bytes_quota: None,
            disk_bytes_quota: None,
        }),
        ..Envelope::default()
    };
    let c = round_trip(&e).remove(0).container_metric.unwrap();
    assert_eq!(c.memory_bytes, Some(1 << 53));
    assert_eq!(
        c.disk_bytes,
        Some(u64::MAX),
        "2^64 saturates back to u64::MAX"
    );
    assert_eq!(c.memory_bytes_quota, Some(0));
    assert_eq!(c.application_id, some("cf/cell"));
}

// v2-only behaviour of to_v1.

fn v2(message: Message, tags_: &[(&str, &str)]) -> proto::Envelope {
    proto::Envelope {
        timestamp: 7,
        source_id: "src".into(),
        instance_id: "3".into(),
        tags: tags(tags_),
        message: Some(message),
        ..proto::Envelope::default()
    }
}

fn gauge(metrics: &[(&str, &str, f64)]) -> Message {
    Message::Gauge(Gauge {
        metrics: metrics
            .iter()
            .map(|(k, unit, value)| {
                (
                    k.to_string(),
                    GaugeValue {
                        unit: unit.to_string(),
                        value: *value,
                    },
                )
            })
            .collect(),
    })
}

#[test]
fn a_gauge_of_several_values_is_one_value_metric_each_in_key_order() {
    let out = to_v1(&v2(gauge(&[("b", "u", 2.0), ("a", "u", 1.0)]), &[]));
    let names: Vec<_> = out
        .iter()
        .map(|e| {
            assert_eq!(e.event_type, Some(EventType::ValueMetric as i32));
            assert_eq!(e.tags["instance_id"], "3");
            e.value_metric.as_ref().unwrap().name().to_owned()
        })
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(to_v1(&v2(gauge(&[]), &[])).is_empty());
}

#[test]
fn container_metric_needs_all_five_keys_each_with_a_unit_or_a_value() {
    let five = [
        ("cpu", "percentage", 1.5),
        ("memory", "bytes", 10.0),
        ("disk", "bytes", 20.0),
        ("memory_quota", "bytes", 30.0),
        ("disk_quota", "bytes", 40.0),
    ];
    let out = to_v1(&v2(gauge(&five), &[]));
    assert_eq!(out.len(), 1);
    let c = out[0].container_metric.as_ref().unwrap();
    assert_eq!(c.application_id, some("src"));
    assert_eq!(c.instance_index, Some(3));
    assert_eq!(
        (c.cpu_percentage, c.memory_bytes, c.disk_bytes_quota),
        (Some(1.5), Some(10), Some(40))
    );

    // Extra keys are dropped, except instance_index, which wins over instance_id.
    let mut more = five.to_vec();
    more.extend([("instance_index", "", 9.0), ("extra", "x", 1.0)]);
    let out = to_v1(&v2(gauge(&more), &[]));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].container_metric.as_ref().unwrap().instance_index,
        Some(9)
    );

    // A key with neither unit nor value disqualifies it.
    let mut blank = five.to_vec();
    blank[2] = ("disk", "", 0.0);
    assert_eq!(to_v1(&v2(gauge(&blank), &[])).len(), 5);
}

#[test]
fn events_and_empty_envelopes_have_no_v1_form() {
    let event = Message::Event(Event {
        title: "t".into(),
        body: "b".into(),
    });
    assert!(to_v1(&v2(event, &[])).is_empty());
    assert!(to_v1(&proto::Envelope::default()).is_empty());
}

#[test]
fn base_fields_fall_back_to_deprecated_tags_rendered_as_go_does() {
    let mut e = v2(
        Message::Log(Log {
            payload: b"p".to_vec(),
            r#type: 1,
        }),
        &[("origin", "preferred")],
    );
    let dep = |data| Value { data: Some(data) };
    e.deprecated_tags = [
        ("origin", dep(Data::Text("ignored".into()))),
        ("job", dep(Data::Integer(-3))),
        ("index", dep(Data::Decimal(0.23))),
        ("ip", dep(Data::Decimal(f64::INFINITY))),
        ("extra", dep(Data::Decimal(1.0))),
        ("unset", Value { data: None }),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let out = to_v1(&e).remove(0);
    assert_eq!(out.origin, some("preferred"));
    assert_eq!(out.job, some("-3"));
    assert_eq!(out.index, some("0.230000"));
    assert_eq!(out.ip, some("+Inf"));
    assert_eq!(
        out.tags,
        tags(&[("extra", "1.000000"), ("source_id", "src")]),
        "deprecated tags are copied (the base ones then removed); a valueless one is not"
    );
    let l = out.log_message.unwrap();
    assert_eq!(l.message_type, Some(MessageType::Err as i32));
    assert_eq!(l.source_instance, some("3"));
}

#[test]
fn a_log_tagged_error_is_an_error_even_with_a_non_utf8_payload() {
    let e = v2(
        Message::Log(Log {
            payload: vec![b'o', 0xff, b'k'],
            r#type: 0,
        }),
        &[("__v1_type", "Error"), ("source", "s"), ("code", "x")],
    );
    let out = to_v1(&e).remove(0);
    assert_eq!(out.event_type, Some(EventType::Error as i32));
    assert_eq!(
        out.error,
        Some(Error {
            source: some("s"),
            code: Some(0),
            message: some("o\u{fffd}k"),
        })
    );
    assert_eq!(out.tags, tags(&[("source_id", "src")]));
}

#[test]
fn any_timer_is_an_http_start_stop_and_unparseable_tags_give_zero_or_unset() {
    let e = v2(
        Message::Timer(Timer {
            name: "not-http".into(),
            start: 1,
            stop: 2,
        }),
        &[
            ("status_code", "4294967496"),
            ("content_length", "1e3"),
            ("request_id", "nope"),
            ("method", "get"),
            ("peer_type", "Server"),
        ],
    );
    let h = to_v1(&e).remove(0).http_start_stop.unwrap();
    assert_eq!(h.status_code, Some(200), "int32(4294967496) wraps as in Go");
    assert_eq!(h.content_length, Some(0));
    assert_eq!(h.request_id, None, "upstream's encoder then refuses it");
    assert_eq!(h.application_id, None, "\"src\" is no UUID");
    assert_eq!(h.method, Some(0), "names are case-sensitive");
    assert_eq!(h.peer_type, Some(PeerType::Server as i32));
    assert_eq!(h.instance_index, Some(3));
}
