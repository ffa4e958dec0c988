//! v1 parity with the upstream agent, checked against what a real Doppler delivered behind it
//! (`tests/vectors/v1_upstream_doppler.txt`): one dropsonde datagram of each captured type, sent
//! over UDP to a real agent with the same identity, arrives at a fake Doppler with exactly the
//! fields upstream's did: source_id from the origin or the event, the VM's identity tags, the
//! event's own tags and message.

mod common;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::Duration;

use common::agent::{World, KEY_ID};
use common::*;
use metron::proto::envelope::Message as V2Message;
use metron::proto_v1::envelope::EventType;
use metron::proto_v1::log_message::MessageType;
use metron::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, HttpStartStop, LogMessage, Method, PeerType, Uuid,
    ValueMetric,
};
use prost::Message as _;
use serde_json::Value as Json;

const WAIT: Duration = Duration::from_secs(15);
const ORIGIN: &str = "interop-v1-origin";

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

/// The datagram of the capture's `kind`, as the capture describes it: origin `interop-v1-origin`,
/// no deployment, job, index or ip, one tag `v1_kind`, and the event the output shows.
fn datagram(kind: EventType) -> Envelope {
    let mut e = Envelope {
        origin: some(ORIGIN),
        event_type: Some(kind as i32),
        timestamp: Some(1_796_562_258_480_000_000),
        tags: BTreeMap::from([("v1_kind".to_owned(), kind.as_str_name().to_owned())]),
        ..Default::default()
    };
    match kind {
        EventType::ContainerMetric => {
            e.container_metric = Some(ContainerMetric {
                application_id: some("6f6a6b7e-0000-4000-8000-00000000c001"),
                instance_index: Some(3),
                cpu_percentage: Some(12.5),
                memory_bytes: Some(1001),
                disk_bytes: Some(2000),
                memory_bytes_quota: Some(4096),
                disk_bytes_quota: Some(8192),
            });
        }
        EventType::CounterEvent => {
            e.counter_event = Some(CounterEvent {
                name: some("interop_v1_counter"),
                delta: Some(2),
                total: None,
            });
        }
        EventType::HttpStartStop => {
            e.http_start_stop = Some(HttpStartStop {
                start_timestamp: Some(1_796_562_258_474_108_633),
                stop_timestamp: Some(1_796_562_258_479_108_633),
                // 01000000-0000-0000-6300-000000000000: bytes little-endian, low then high.
                request_id: Some(Uuid {
                    low: Some(1),
                    high: Some(0x63),
                }),
                peer_type: Some(PeerType::Server as i32),
                method: Some(Method::Get as i32),
                uri: some("http://app.example/path"),
                remote_address: some("10.0.0.1:5555"),
                user_agent: some("interop/1"),
                status_code: Some(200),
                content_length: Some(512),
                application_id: Some(Uuid {
                    low: Some(0x0706_0504_0302_0100),
                    high: Some(0x0f0e_0d0c_0b0a_0908),
                }),
                instance_index: Some(1),
                instance_id: some("inst-1"),
                forwarded: vec!["1.1.1.1".into(), "2.2.2.2".into()],
            });
        }
        EventType::LogMessage => {
            e.log_message = Some(LogMessage {
                message: Some(b"v1 log 3".to_vec()),
                message_type: Some(MessageType::Out as i32),
                timestamp: Some(1_796_562_258_480_000_000),
                app_id: some("6f6a6b7e-0000-4000-8000-00000000a001"),
                source_type: some("APP/PROC/WEB"),
                source_instance: some("2"),
            });
        }
        EventType::ValueMetric => {
            e.value_metric = Some(ValueMetric {
                name: some("interop_v1_value"),
                value: Some(0.5),
                unit: some("ms"),
            });
        }
        EventType::Error => unreachable!("not in the capture"),
    }
    e
}

/// The capture: event type name → what Doppler delivered.
fn captured() -> Vec<(EventType, Json)> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/v1_upstream_doppler.txt");
    std::fs::read_to_string(path)
        .expect("the capture")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (kind, json) = l.split_once(": ").expect("kind: json");
            let kind = EventType::from_str_name(kind).expect("an event type");
            (kind, floats(serde_json::from_str(json).expect("JSON")))
        })
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `e` as Doppler's reader printed envelopes (protojson with proto names: fields at their default
/// left out, 64-bit integers as strings, bytes in base64), without its timestamp, as the capture.
fn as_captured(e: &metron::proto::Envelope) -> Json {
    let text = |s: &str| Json::String(s.to_owned());
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Json| {
        let empty = matches!(&v, Json::String(s) if s.is_empty() || s == "0")
            || matches!(&v, Json::Object(o) if o.is_empty());
        if !empty {
            m.insert(k.to_owned(), v);
        }
    };
    put("source_id", text(&e.source_id));
    put("instance_id", text(&e.instance_id));
    put(
        "tags",
        Json::Object(e.tags.iter().map(|(k, v)| (k.clone(), text(v))).collect()),
    );
    let message = match &e.message {
        Some(V2Message::Log(l)) => {
            let mut o = BTreeMap::from([("payload".to_owned(), text(&base64(&l.payload)))]);
            if l.r#type != 0 {
                o.insert("type".into(), text("ERR"));
            }
            Some(("log", o))
        }
        Some(V2Message::Counter(c)) => Some((
            "counter",
            BTreeMap::from([
                ("name".to_owned(), text(&c.name)),
                ("delta".to_owned(), text(&c.delta.to_string())),
                ("total".to_owned(), text(&c.total.to_string())),
            ]),
        )),
        Some(V2Message::Gauge(g)) => {
            let metrics = g
                .metrics
                .iter()
                .map(|(k, v)| {
                    let value = BTreeMap::from([
                        ("unit".to_owned(), text(&v.unit)),
                        ("value".to_owned(), Json::from(v.value)),
                    ]);
                    (k.clone(), Json::Object(value.into_iter().collect()))
                })
                .collect();
            Some((
                "gauge",
                BTreeMap::from([("metrics".to_owned(), Json::Object(metrics))]),
            ))
        }
        Some(V2Message::Timer(t)) => Some((
            "timer",
            BTreeMap::from([
                ("name".to_owned(), text(&t.name)),
                ("start".to_owned(), text(&t.start.to_string())),
                ("stop".to_owned(), text(&t.stop.to_string())),
            ]),
        )),
        other => panic!("not in the capture: {other:?}"),
    };
    if let Some((k, o)) = message {
        put(k, Json::Object(o.into_iter().collect()));
    }
    floats(Json::Object(m.into_iter().collect()))
}

/// `v` with every number as a float: the capture writes `12` where the agent's value is `12.0`.
fn floats(v: Json) -> Json {
    match v {
        Json::Number(n) => Json::from(n.as_f64().expect("a finite number")),
        Json::Array(a) => Json::Array(a.into_iter().map(floats).collect()),
        Json::Object(o) => Json::Object(o.into_iter().map(|(k, v)| (k, floats(v))).collect()),
        other => other,
    }
}

#[test]
fn each_captured_type_arrives_exactly_as_behind_the_upstream_agent() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    // The capture's agent identity, no tags beyond it, and neither sequencing nor signing: the
    // agent adds nothing upstream does not.
    let signing = format!(
        "signing: {{ key_id: {KEY_ID}, key_file: {} }}",
        w.key_file.display()
    );
    let yaml = w
        .yaml(&[(doppler.addr(), "z1")], "")
        .replace(
            &signing,
            "signing: { enabled: false }\nsequencing: { enabled: false }",
        )
        .replace(
            r#"identity: { deployment: cf, job: diego-cell, index: "3", ip: 10.0.0.5, az: z1 }"#,
            r#"identity: { deployment: cf, job: diego-cell, index: "0", ip: 127.0.0.1, az: z1 }"#,
        )
        .replace("tags: { team: loggregator }", "tags: {}");
    assert!(yaml.contains("ip: 127.0.0.1") && yaml.contains("tags: {}"));
    assert!(yaml.contains("sequencing: { enabled: false }"));
    metron::telemetry::init_logging("warn");
    let agent = metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).unwrap();

    let captured = captured();
    assert_eq!(captured.len(), 5);
    let to = agent.udp_addr().expect("UDP ingress is on");
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, (kind, _)) in captured.iter().enumerate() {
        socket
            .send_to(&datagram(*kind).encode_to_vec(), to)
            .unwrap();
        // One at a time: the kernel's socket buffer never overflows.
        assert!(wait_until(WAIT, || agent.metrics().ingress_v1 > i as u64));
    }
    assert!(doppler.wait_for_count(captured.len(), WAIT));

    let arrived = doppler.received();
    for (kind, want) in captured {
        let name = kind.as_str_name();
        let got: Vec<_> = arrived
            .iter()
            .filter(|e| e.tags.get("__v1_type").map(String::as_str) == Some(name))
            .collect();
        assert_eq!(got.len(), 1, "one {name}");
        assert_eq!(as_captured(got[0]), want, "{name}: {:?}", got[0]);
    }
}

#[test]
fn base64_is_the_standard_alphabet_with_padding() {
    assert_eq!(base64(b"v1 log 3"), "djEgbG9nIDM=");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"abc"), "YWJj");
    assert_eq!(base64(b""), "");
}
