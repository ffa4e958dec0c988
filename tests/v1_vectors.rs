//! The v1 → v2 test vectors (`tests/vectors/v1_to_v2.txt`): every datagram decodes to the v1
//! envelope the file shows and becomes the v2 envelope the file expects when an agent with the
//! file's identity ([`AGENT`]) takes it in (the upstream agent's v1 rules, then `ToV2`), or is
//! rejected with the error the file names.
//!
//! The datagrams are built by `inputs()` below. `METRON_WRITE_VECTORS=1 cargo test --test
//! v1_vectors` rewrites the file's `description`, `v1_pb_hex` and `v1_json` lines from them; the
//! expectations (`v2_json`, `error`) are never generated: the writer copies them from the file as
//! it is, and writes `expect: TODO` for a new vector, which fails until someone writes its
//! expectation by hand from the rules (`metron::v1::apply_agent_rules` and `metron::v1::to_v2`'s
//! documentation).

#[path = "common/json.rs"]
mod json;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use metron::envelope::signing::{decode_hex, encode_hex};
use metron::proto_v1::envelope::EventType;
use metron::proto_v1::log_message::MessageType;
use metron::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, Error, HttpStartStop, LogMessage, Method, PeerType,
    Uuid, ValueMetric,
};
use metron::v1::{self, V1Error};
use prost::Message as _;

/// The agent's identity in every vector: distinct from the emitters' own identity fields below,
/// so the vectors show which ones the agent filled in.
fn agent() -> v1::V1Identity {
    v1::V1Identity {
        deployment: "cf-vm".into(),
        job: "vm-job".into(),
        index: "5".into(),
        ip: "10.0.9.9".into(),
    }
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/v1_to_v2.txt")
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

/// An envelope of `event_type` with every envelope field set; the event message is the caller's.
fn env(event_type: EventType) -> Envelope {
    Envelope {
        origin: some("rep"),
        event_type: Some(event_type as i32),
        timestamp: Some(1_700_000_000_000_000_123),
        deployment: some("cf"),
        job: some("diego-cell"),
        index: some("9c5d0e4e-7d3b-4f4a-8b7e-3f2a1c0d9e8f"),
        ip: some("10.0.16.5"),
        ..Envelope::default()
    }
}

fn log_message(message: &[u8], message_type: i32) -> LogMessage {
    LogMessage {
        message: Some(message.to_vec()),
        message_type: Some(message_type),
        timestamp: Some(1_700_000_000_000_000_000),
        ..LogMessage::default()
    }
}

fn log_env(l: LogMessage) -> Envelope {
    Envelope {
        log_message: Some(l),
        ..env(EventType::LogMessage)
    }
}

/// f47ac10b-58cc-4372-a567-0e02b2c3d479, dropsonde's own example of the byte order.
fn request_id() -> Uuid {
    Uuid {
        low: Some(0x7243_cc58_0bc1_7af4),
        high: Some(0x79d4_c3b2_020e_67a5),
    }
}

/// Every required field of an HttpStartStop, nothing optional.
fn http_required() -> HttpStartStop {
    HttpStartStop {
        start_timestamp: Some(1_700_000_000_000_000_000),
        stop_timestamp: Some(1_700_000_000_250_000_000),
        request_id: Some(request_id()),
        peer_type: Some(PeerType::Client as i32),
        method: Some(Method::Get as i32),
        uri: some("/v2/info"),
        remote_address: some("10.0.0.1:4242"),
        user_agent: some("curl/8.0"),
        status_code: Some(404),
        content_length: Some(-1),
        ..HttpStartStop::default()
    }
}

fn http_env(h: HttpStartStop) -> Envelope {
    Envelope {
        origin: some("gorouter"),
        job: some("router"),
        http_start_stop: Some(h),
        ..env(EventType::HttpStartStop)
    }
}

fn value_metric() -> ValueMetric {
    ValueMetric {
        name: some("latency"),
        value: Some(0.25),
        unit: some("ms"),
    }
}

fn value_env(v: ValueMetric) -> Envelope {
    Envelope {
        value_metric: Some(v),
        ..env(EventType::ValueMetric)
    }
}

fn counter_event() -> CounterEvent {
    CounterEvent {
        name: some("requests"),
        delta: Some(5),
        total: Some(1200),
    }
}

fn counter_env(c: CounterEvent) -> Envelope {
    Envelope {
        counter_event: Some(c),
        ..env(EventType::CounterEvent)
    }
}

fn error_env(r: Error) -> Envelope {
    Envelope {
        error: Some(r),
        ..env(EventType::Error)
    }
}

fn container_metric() -> ContainerMetric {
    ContainerMetric {
        application_id: some("6f1a9e52-5d1c-4d9a-9f3e-1c2b3a4d5e6f"),
        instance_index: Some(4),
        cpu_percentage: Some(12.5),
        memory_bytes: Some(268_435_456),
        disk_bytes: Some(1_073_741_824),
        memory_bytes_quota: Some(536_870_912),
        disk_bytes_quota: Some(2_147_483_648),
    }
}

fn container_env(c: ContainerMetric) -> Envelope {
    Envelope {
        container_metric: Some(c),
        ..env(EventType::ContainerMetric)
    }
}

/// `(name, description, datagram)` for every vector, in file order.
fn inputs() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let out = MessageType::Out as i32;
    let err = MessageType::Err as i32;
    let full_log = LogMessage {
        app_id: some("6f1a9e52-5d1c-4d9a-9f3e-1c2b3a4d5e6f"),
        source_type: some("APP/PROC/WEB"),
        source_instance: some("2"),
        ..log_message(b"hello world", out)
    };
    let mut full_http = http_required();
    full_http.peer_type = Some(PeerType::Server as i32);
    full_http.method = Some(Method::Post as i32);
    full_http.uri = some("https://app.example.com/path?q=1");
    full_http.status_code = Some(201);
    full_http.content_length = Some(512);
    full_http.application_id = Some(Uuid {
        low: Some(0x0706_0504_0302_0100),
        high: Some(0x0f0e_0d0c_0b0a_0908),
    });
    full_http.instance_index = Some(3);
    full_http.instance_id = some("c0ffee");
    full_http.forwarded = vec!["203.0.113.7".into(), "10.0.0.1".into()];

    let mut with_unknown_fields = log_env(log_message(b"hi", out)).encode_to_vec();
    // Field 99 (varint 1) and field 100 (length-delimited "xy"): unknown, so skipped.
    with_unknown_fields.extend([0x98, 0x06, 0x01, 0xa2, 0x06, 0x02, b'x', b'y']);

    let mut truncated = log_env(full_log.clone()).encode_to_vec();
    truncated.truncate(truncated.len() - 3);

    let e = |e: Envelope| e.encode_to_vec();
    vec![
        // --- accepted, one per event type, then the edge cases ---
        (
            "log-message",
            "LogMessage with every field set and a custom tag",
            e(Envelope {
                tags: tags(&[("custom", "yes")]),
                ..log_env(full_log.clone())
            }),
        ),
        (
            "log-message-err",
            "v1 ERR is 2, v2 ERR is 1",
            e(log_env(log_message(b"boom", err))),
        ),
        (
            "log-message-required-only",
            "only the required fields: the agent's identity fills the identity tags, the origin gives source_id",
            e(Envelope {
                origin: some("legacy"),
                event_type: Some(EventType::LogMessage as i32),
                log_message: Some(log_message(b"x", out)),
                ..Envelope::default()
            }),
        ),
        (
            "log-message-non-utf8",
            "a payload that is not UTF-8 is carried byte for byte",
            e(log_env(log_message(
                &[0xff, 0xfe, 0x00, 0xc3, 0x28, 0x0a],
                out,
            ))),
        ),
        (
            "log-message-unknown-type",
            "message_type 3 is neither OUT nor ERR: by name it maps to nothing, i.e. v2 OUT",
            e(log_env(log_message(b"x", 3))),
        ),
        (
            "source-id-tag",
            "the source_id tag becomes source_id and leaves the tags",
            e(Envelope {
                tags: tags(&[("source_id", "my-source"), ("zone", "z1")]),
                ..log_env(log_message(b"x", out))
            }),
        ),
        (
            "source-id-tag-empty",
            "a source_id tag that is present but empty is replaced by the origin",
            e(Envelope {
                tags: tags(&[("source_id", "")]),
                ..log_env(log_message(b"x", out))
            }),
        ),
        (
            "app-id-over-source-id-tag",
            "a LogMessage's app_id wins over the source_id tag",
            e(Envelope {
                tags: tags(&[("source_id", "tag-source")]),
                ..log_env(LogMessage {
                    app_id: some("app-guid"),
                    ..log_message(b"x", out)
                })
            }),
        ),
        (
            "base-tags-overwrite-v1-tags",
            "v1 tags named like the fields ToV2 writes are overwritten by those fields",
            e(Envelope {
                tags: tags(&[
                    ("origin", "spoofed"),
                    ("__v1_type", "Error"),
                    ("deployment", "other"),
                    ("source_type", "spoofed"),
                    ("keep", "me"),
                ]),
                ..log_env(LogMessage {
                    source_type: some("RTR"),
                    ..log_message(b"x", out)
                })
            }),
        ),
        (
            "http-start-stop",
            "HttpStartStop with every field set; applicationId bytes 00..0f show the byte order",
            e(http_env(full_http)),
        ),
        (
            "http-start-stop-required-only",
            "no applicationId, instanceIndex, instanceId or forwarded",
            e(http_env(http_required())),
        ),
        (
            "http-start-stop-zero-application-id",
            "an all-zero applicationId leaves source_id to the tag",
            e(Envelope {
                tags: tags(&[("source_id", "from-tag")]),
                ..http_env(HttpStartStop {
                    application_id: Some(Uuid {
                        low: Some(0),
                        high: Some(0),
                    }),
                    ..http_required()
                })
            }),
        ),
        (
            "http-start-stop-last-method",
            "the last Method upstream knows, and one forwarded entry",
            e(http_env(HttpStartStop {
                method: Some(Method::VersionControl as i32),
                forwarded: vec!["198.51.100.1".into()],
                ..http_required()
            })),
        ),
        (
            "http-start-stop-unknown-enums",
            "peerType 7 and method 99 are not in the enums: their numbers are the tags",
            e(http_env(HttpStartStop {
                peer_type: Some(7),
                method: Some(99),
                ..http_required()
            })),
        ),
        (
            "value-metric",
            "ValueMetric; the instance_id tag gives instance_id and stays a tag",
            e(Envelope {
                tags: tags(&[("instance_id", "7")]),
                ..value_env(value_metric())
            }),
        ),
        (
            "value-metric-extreme-value",
            "a tiny negative value and no instance_id tag",
            e(value_env(ValueMetric {
                value: Some(-1.5e-7),
                ..value_metric()
            })),
        ),
        (
            "counter-event",
            "CounterEvent; the instance_id tag gives instance_id and leaves the tags",
            e(Envelope {
                tags: tags(&[("instance_id", "2"), ("k", "v")]),
                ..counter_env(counter_event())
            }),
        ),
        (
            "counter-event-no-total",
            "total unset reads as 0",
            e(counter_env(CounterEvent {
                total: None,
                ..counter_event()
            })),
        ),
        (
            "error",
            "Error becomes an OUT log with source and code tags",
            e(error_env(Error {
                source: some("api"),
                code: Some(-7),
                message: some("disk full"),
            })),
        ),
        (
            "container-metric",
            "ContainerMetric with every field set",
            e(container_env(container_metric())),
        ),
        (
            "container-metric-minimal",
            "empty applicationId (source_id from the origin), zero usage, no quotas",
            e(container_env(ContainerMetric {
                application_id: some(""),
                instance_index: Some(0),
                cpu_percentage: Some(0.0),
                memory_bytes: Some(0),
                disk_bytes: Some(0),
                memory_bytes_quota: None,
                disk_bytes_quota: None,
            })),
        ),
        (
            "container-metric-large",
            "byte counts above 2^53 are rounded to the nearest f64",
            e(container_env(ContainerMetric {
                memory_bytes: Some((1 << 53) + 1),
                disk_bytes: Some(u64::MAX),
                ..container_metric()
            })),
        ),
        (
            "identity-empty-on-the-wire",
            "deployment, job, index and ip sent empty count as unset: the agent's fill them",
            e(Envelope {
                deployment: some(""),
                job: some(""),
                index: some(""),
                ip: some(""),
                ..counter_env(counter_event())
            }),
        ),
        (
            "identity-partly-set",
            "only the identity fields the emitter left unset are filled",
            e(Envelope {
                job: None,
                ip: None,
                ..value_env(value_metric())
            }),
        ),
        (
            "origin-empty",
            "an empty origin and no source_id tag: source_id is the empty origin, as upstream's",
            e(Envelope {
                origin: some(""),
                ..value_env(value_metric())
            }),
        ),
        (
            "unknown-fields-skipped",
            "a LogMessage followed by unknown fields 99 and 100",
            with_unknown_fields,
        ),
        (
            "other-event-message-ignored",
            "a CounterEvent that also carries a (valid) valueMetric: only the counter counts",
            e(Envelope {
                value_metric: Some(value_metric()),
                ..counter_env(counter_event())
            }),
        ),
        // --- rejected ---
        (
            "empty-datagram",
            "zero bytes: a valid encoding of an envelope with nothing set",
            Vec::new(),
        ),
        ("garbage", "four 0xff bytes", vec![0xff; 4]),
        (
            "text-garbage",
            "an HTTP request line sent to the UDP port",
            b"GET / HTTP/1.1\r\n".to_vec(),
        ),
        (
            "truncated",
            "the log-message datagram without its last 3 bytes",
            truncated,
        ),
        (
            "invalid-utf8-origin",
            "origin holds the bytes ff fe",
            vec![0x0a, 0x02, 0xff, 0xfe, 0x10, 0x05],
        ),
        (
            "wrong-wire-type",
            "origin sent as a varint",
            vec![0x08, 0x01, 0x10, 0x05],
        ),
        (
            "missing-origin",
            "no origin",
            e(Envelope {
                origin: None,
                ..log_env(log_message(b"x", out))
            }),
        ),
        (
            "missing-event-type",
            "no eventType",
            e(Envelope {
                event_type: None,
                ..log_env(log_message(b"x", out))
            }),
        ),
        (
            "missing-log-message-type",
            "logMessage without message_type",
            e(log_env(LogMessage {
                message_type: None,
                ..log_message(b"x", out)
            })),
        ),
        (
            "missing-log-timestamp",
            "logMessage without timestamp",
            e(log_env(LogMessage {
                timestamp: None,
                ..log_message(b"x", out)
            })),
        ),
        (
            "missing-http-request-id",
            "httpStartStop without requestId",
            e(http_env(HttpStartStop {
                request_id: None,
                ..http_required()
            })),
        ),
        (
            "missing-http-request-id-high",
            "httpStartStop whose requestId lacks high",
            e(http_env(HttpStartStop {
                request_id: Some(Uuid {
                    low: Some(1),
                    high: None,
                }),
                ..http_required()
            })),
        ),
        (
            "missing-http-application-id-low",
            "an optional applicationId must still be a whole UUID",
            e(http_env(HttpStartStop {
                application_id: Some(Uuid {
                    low: None,
                    high: Some(1),
                }),
                ..http_required()
            })),
        ),
        (
            "missing-value-metric-unit",
            "valueMetric without unit",
            e(value_env(ValueMetric {
                unit: None,
                ..value_metric()
            })),
        ),
        (
            "missing-counter-delta",
            "counterEvent without delta",
            e(counter_env(CounterEvent {
                delta: None,
                ..counter_event()
            })),
        ),
        (
            "missing-error-code",
            "error without code",
            e(error_env(Error {
                source: some("api"),
                code: None,
                message: some("m"),
            })),
        ),
        (
            "missing-container-disk",
            "containerMetric without diskBytes",
            e(container_env(ContainerMetric {
                disk_bytes: None,
                ..container_metric()
            })),
        ),
        (
            "missing-field-in-other-event",
            "a valid LogMessage that also carries a valueMetric without unit",
            e(Envelope {
                value_metric: Some(ValueMetric {
                    unit: None,
                    ..value_metric()
                }),
                ..log_env(log_message(b"x", out))
            }),
        ),
        (
            "event-without-message",
            "eventType LogMessage, no logMessage",
            e(env(EventType::LogMessage)),
        ),
        (
            "event-with-other-message",
            "eventType ValueMetric carrying only a counterEvent",
            e(Envelope {
                event_type: Some(EventType::ValueMetric as i32),
                ..counter_env(counter_event())
            }),
        ),
        (
            "unknown-event-type-heartbeat",
            "eventType 1 (Heartbeat, removed upstream)",
            e(Envelope {
                event_type: Some(1),
                ..log_env(log_message(b"x", out))
            }),
        ),
        (
            "unknown-event-type",
            "eventType 42",
            e(Envelope {
                event_type: Some(42),
                ..log_env(log_message(b"x", out))
            }),
        ),
    ]
}

/// How the file writes an expected rejection.
fn error_line(e: &V1Error) -> String {
    match e {
        V1Error::Undecodable(_) => "undecodable".into(),
        V1Error::MissingField(f) => format!("missing_field {f}"),
        V1Error::MissingEvent { event_type, field } => {
            format!("missing_event {event_type} {field}")
        }
        V1Error::UnknownEventType(t) => format!("unknown_event_type {t}"),
    }
}

const HEADER: &str = "\
# metron v1 (dropsonde) → v2 test vectors: what the agent makes of each UDP datagram before
# tagging it like any v2 envelope. One block per vector, fields `name: value`.
# The agent's identity in every vector: deployment cf-vm, job vm-job, index 5, ip 10.0.9.9.
# description: what the vector shows. v1_pb_hex: the UDP datagram (protobuf events.Envelope).
# v1_json: the datagram as metron decodes it, before validation (upstream field names; only set
#   fields appear; bytes as hex; enums by name, or the number when the enum lacks it); absent when
#   the datagram does not parse at all.
# v2_json: the expected loggregator.v2.Envelope, in the JSON form of tests/vectors/signing.txt
#   (bytes as hex; \\u000a is the newline joining `forwarded`).
# error: the expected rejection: undecodable | missing_field <path> |
#   missing_event <eventType> <field> | unknown_event_type <number>.
#
# How this file is made: tests/v1_vectors.rs builds the datagrams and, with METRON_WRITE_VECTORS=1,
# writes the description, v1_pb_hex and v1_json lines. The v2_json and error lines were written by
# hand from the rules (upstream's v1 reader and tagger: metron::v1::apply_agent_rules; then ToV2:
# metron::v1::to_v2's documentation, go-loggregator's conversion package) and are never
# generated: the writer copies them over from this file.
";

type Block = BTreeMap<String, String>;

fn parse(text: &str) -> Vec<Block> {
    text.split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| l.split_once(": "))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Block>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn render(existing: &[Block]) -> String {
    let mut out = String::from(HEADER);
    for (name, description, datagram) in inputs() {
        let _ = write!(
            out,
            "\nname: {name}\ndescription: {description}\nv1_pb_hex: {}\n",
            encode_hex(&datagram)
        );
        if let Ok(parsed) = Envelope::decode(datagram.as_slice()) {
            let _ = writeln!(out, "v1_json: {}", json::v1_json(&parsed));
        }
        let old = existing.iter().find(|b| b["name"] == name);
        let mut expected = false;
        for key in ["v2_json", "error"] {
            if let Some(v) = old.and_then(|b| b.get(key)) {
                let _ = writeln!(out, "{key}: {v}");
                expected = true;
            }
        }
        if !expected {
            out.push_str("expect: TODO\n");
        }
    }
    out
}

#[test]
fn every_vector_converts_or_fails_as_written() {
    let text = std::fs::read_to_string(path()).unwrap_or_default();
    if std::env::var_os("METRON_WRITE_VECTORS").is_some() {
        std::fs::write(path(), render(&parse(&text))).unwrap();
        return;
    }
    let vectors = parse(&text);
    let inputs = inputs();
    assert_eq!(vectors.len(), inputs.len(), "one block per input");
    for (v, (name, description, datagram)) in vectors.iter().zip(inputs) {
        assert_eq!(v["name"], name);
        assert_eq!(v["description"], description, "{name}");
        let bytes = decode_hex(&v["v1_pb_hex"]).expect("hex");
        assert_eq!(
            bytes, datagram,
            "{name}: the file holds the documented input"
        );
        match Envelope::decode(bytes.as_slice()) {
            Ok(parsed) => assert_eq!(v["v1_json"], json::v1_json(&parsed), "{name}"),
            Err(_) => assert!(!v.contains_key("v1_json"), "{name}"),
        }
        match (v.get("v2_json"), v.get("error"), v1::decode(&bytes)) {
            (Some(expected), None, Ok(e)) => {
                assert_eq!(
                    &json::v2_json(&v1::agent_to_v2(e.clone(), &agent())),
                    expected,
                    "{name}"
                );
                assert_eq!(v1::into_v2(e.clone()), v1::to_v2(&e), "{name}");
            }
            (None, Some(expected), Err(err)) => assert_eq!(&error_line(&err), expected, "{name}"),
            (_, _, got) => panic!("{name}: the file expects {v:?}, decode gave {got:?}"),
        }
    }
}
