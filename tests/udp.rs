//! v1 (dropsonde) datagrams on the agent's UDP port: each arrives at a fake Doppler as the
//! documented v2 envelope, tagged, sequenced and signed like gRPC traffic; garbage is counted by
//! reason and harms nothing else.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::agent::{assert_balanced, sequences, unserved_addr, wait_drained, World, KEY, KEY_ID};
use common::*;
use metron::proto::envelope::Message as V2Message;
use metron::proto_v1::envelope::EventType;
use metron::proto_v1::log_message::MessageType;
use metron::proto_v1::{
    ContainerMetric, CounterEvent, Envelope, Error, HttpStartStop, LogMessage, Method, PeerType,
    ValueMetric,
};
use metron::telemetry::DropReason;
use prost::Message as _;

const WAIT: Duration = Duration::from_secs(15);
const APP: &str = "6f1a9e52-5d1c-4d9a-9f3e-1c2b3a4d5e6f";

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

fn base(event_type: EventType) -> Envelope {
    Envelope {
        origin: some("rep"),
        event_type: Some(event_type as i32),
        timestamp: Some(1_700_000_000_000_000_123),
        deployment: some("cf-v1"),
        job: some("legacy-cell"),
        index: some("7"),
        ip: some("10.0.16.5"),
        ..Envelope::default()
    }
}

/// One envelope of each of the six event types.
fn every_type() -> Vec<Envelope> {
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
            ..base(EventType::LogMessage)
        },
        Envelope {
            http_start_stop: Some(HttpStartStop {
                start_timestamp: Some(1),
                stop_timestamp: Some(2),
                request_id: metron::v1::parse_uuid("f47ac10b-58cc-4372-a567-0e02b2c3d479"),
                peer_type: Some(PeerType::Server as i32),
                method: Some(Method::Get as i32),
                uri: some("/x"),
                remote_address: some("10.0.0.1:1"),
                user_agent: some("ua"),
                status_code: Some(200),
                content_length: Some(12),
                application_id: metron::v1::parse_uuid(APP),
                instance_index: Some(2),
                instance_id: some("c0ffee"),
                forwarded: vec!["1.1.1.1".into(), "2.2.2.2".into()],
            }),
            ..base(EventType::HttpStartStop)
        },
        Envelope {
            value_metric: Some(ValueMetric {
                name: some("latency"),
                value: Some(0.25),
                unit: some("ms"),
            }),
            ..base(EventType::ValueMetric)
        },
        Envelope {
            counter_event: Some(CounterEvent {
                name: some("requests"),
                delta: Some(5),
                total: Some(0),
            }),
            ..base(EventType::CounterEvent)
        },
        Envelope {
            error: Some(Error {
                source: some("api"),
                code: Some(42),
                message: some("disk full"),
            }),
            ..base(EventType::Error)
        },
        Envelope {
            container_metric: Some(ContainerMetric {
                application_id: some("app"),
                instance_index: Some(4),
                cpu_percentage: Some(12.5),
                memory_bytes: Some(1 << 20),
                disk_bytes: Some(1 << 21),
                memory_bytes_quota: Some(1 << 30),
                disk_bytes_quota: Some(1 << 31),
            }),
            ..base(EventType::ContainerMetric)
        },
    ]
}

/// Sends `datagrams` one at a time, each only once the agent has counted the one before: the
/// kernel's socket buffer never overflows, so every datagram is counted.
fn send_paced(agent: &metron::Agent, datagrams: &[Vec<u8>]) {
    let to: SocketAddr = agent.udp_addr().expect("UDP ingress is on");
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = agent.metrics().ingress_v1;
    for (i, d) in datagrams.iter().enumerate() {
        socket.send_to(d, to).unwrap();
        let want = start + i as u64 + 1;
        assert!(
            wait_until(WAIT, || agent.metrics().ingress_v1 >= want),
            "datagram {i} counted"
        );
    }
}

fn agent_tags(e: &metron::proto::Envelope) -> BTreeMap<String, String> {
    let mut tags = e.tags.clone();
    tags.remove(metron::envelope::tag::TAG);
    tags
}

#[test]
fn a_datagram_of_each_type_arrives_as_the_documented_v2_envelope() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let sent = every_type();
    send_paced(
        &agent,
        &sent.iter().map(|e| e.encode_to_vec()).collect::<Vec<_>>(),
    );
    assert!(doppler.wait_for_count(sent.len(), WAIT));
    // Sources travel on different connections: match each by its type, not by arrival order.
    let arrived = doppler.received();
    assert_eq!(arrived.len(), sent.len());
    let of_type = |v1: &Envelope| {
        let name = EventType::try_from(v1.event_type.unwrap())
            .unwrap()
            .as_str_name();
        let found: Vec<_> = arrived
            .iter()
            .filter(|e| e.tags.get("__v1_type").map(String::as_str) == Some(name))
            .collect();
        assert_eq!(found.len(), 1, "one {name}");
        found[0].clone()
    };
    let received: Vec<_> = sent.iter().map(of_type).collect();

    for (v1, got) in sent.iter().zip(&received) {
        metron::verify(got, KEY_ID, KEY).unwrap_or_else(|err| panic!("{err}: {got:?}"));
        // The agent's v1 rules and the conversion (the emitter's own identity is kept: it set
        // every field), then the agent's tagging: its default tags only where absent, and
        // counter totals.
        let identity = metron::v1::V1Identity {
            deployment: "cf".into(),
            job: "diego-cell".into(),
            index: "3".into(),
            ip: "10.0.0.5".into(),
        };
        let mut want = metron::v1::agent_to_v2(v1.clone(), &identity);
        want.tags.insert("team".into(), "loggregator".into());
        if let Some(V2Message::Counter(c)) = &mut want.message {
            c.total = c.delta;
        }
        assert_eq!(agent_tags(got), want.tags, "tags of {v1:?}");
        assert_eq!(
            (
                &got.source_id,
                &got.instance_id,
                got.timestamp,
                &got.message
            ),
            (
                &want.source_id,
                &want.instance_id,
                want.timestamp,
                &want.message
            ),
            "{v1:?}"
        );
    }

    // The documented form, spelled out for the log message.
    let log = &received[0];
    assert_eq!(log.source_id, APP, "source_id is app_id");
    assert_eq!(log.instance_id, "3", "instance_id is source_instance");
    assert_eq!(log.timestamp, 1_700_000_000_000_000_123);
    let Some(V2Message::Log(l)) = &log.message else {
        panic!("a log: {log:?}")
    };
    assert_eq!(l.payload, vec![0xff, b'h', b'i'], "payload bytes as sent");
    assert_eq!(l.r#type, 1, "v1 ERR=2 is v2 ERR=1");
    for (k, v) in [
        ("source_type", "APP/PROC/WEB"),
        ("origin", "rep"),
        ("deployment", "cf-v1"),
        ("job", "legacy-cell"),
        ("index", "7"),
        ("ip", "10.0.16.5"),
        ("__v1_type", "LogMessage"),
        ("team", "loggregator"),
    ] {
        assert_eq!(log.tags.get(k).map(String::as_str), Some(v), "tag {k}");
    }
    let Some(V2Message::Timer(t)) = &received[1].message else {
        panic!("a timer: {:?}", received[1])
    };
    assert_eq!((t.name.as_str(), t.start, t.stop), ("http", 1, 2));
    assert_eq!(received[1].tags["forwarded"], "1.1.1.1\n2.2.2.2");
    assert_eq!(
        received[1].tags["request_id"],
        "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    );

    // Sequenced like gRPC traffic: numbered per source from 1.
    for ((_, source), numbers) in sequences(&arrived) {
        let want: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, want, "sequence of {source}");
    }
    let m = agent.metrics();
    assert_eq!((m.ingress_v1, m.ingress), (sent.len() as u64, 0));
    assert!(wait_drained(&agent, WAIT));
    assert_balanced(&agent);
}

/// A deterministic stream of junk bytes (no RNG crate needed).
fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_is_counted_by_reason_and_good_datagrams_between_it_all_arrive() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let good = every_type();
    let log = good[0].clone();

    // Each kind of bad datagram, with the reason it must be counted under.
    let mut no_type = log.clone();
    no_type.log_message.as_mut().unwrap().message_type = None;
    let mut no_origin = log.clone();
    no_origin.origin = None;
    let mut no_event = log.clone();
    no_event.log_message = None;
    let mut heartbeat = log.clone();
    heartbeat.event_type = Some(1);
    let valid = log.encode_to_vec();
    let bad: Vec<(Vec<u8>, DropReason)> = vec![
        (valid[..valid.len() / 2].to_vec(), DropReason::V1Undecodable),
        (vec![0xff; 40], DropReason::V1Undecodable),
        (Vec::new(), DropReason::V1MissingField),
        (no_type.encode_to_vec(), DropReason::V1MissingField),
        (no_origin.encode_to_vec(), DropReason::V1MissingField),
        (no_event.encode_to_vec(), DropReason::V1MissingEvent),
        (heartbeat.encode_to_vec(), DropReason::V1UnknownEventType),
    ];

    let rounds = 20;
    let mut datagrams = Vec::new();
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..rounds {
        for (d, reason) in &bad {
            datagrams.push(d.clone());
            *want.entry(reason.name()).or_default() += 1;
        }
        // Random bytes, counted under whatever reason the decoder finds (random bytes that
        // happen to form a valid envelope would be a broken generator).
        for i in 0..5 {
            let j = junk((round * 5 + i) as u64, 1 + (round * 37 + i) % 900);
            let err = metron::v1::decode(&j).expect_err("junk is rejected");
            let reason = format!("v1_{}", err.reason());
            *want.entry(Box::leak(reason.into_boxed_str())).or_default() += 1;
            datagrams.push(j);
        }
        datagrams.push(good[round % good.len()].encode_to_vec());
    }
    send_paced(&agent, &datagrams);
    assert!(doppler.wait_for_count(rounds, WAIT));
    assert!(wait_drained(&agent, WAIT));

    let received = doppler.received();
    assert_eq!(received.len(), rounds, "every good datagram arrived, once");
    for e in &received {
        metron::verify(e, KEY_ID, KEY).unwrap();
        assert!(e.tags.contains_key("__v1_type"));
    }
    let m = agent.metrics();
    assert_eq!(m.ingress_v1, datagrams.len() as u64);
    assert_eq!(m.egress, rounds as u64);
    let v1_dropped: u64 = [
        DropReason::V1Undecodable,
        DropReason::V1MissingField,
        DropReason::V1MissingEvent,
        DropReason::V1UnknownEventType,
    ]
    .iter()
    .map(|r| m.dropped_by(*r))
    .sum();
    assert_eq!(
        v1_dropped,
        (datagrams.len() - rounds) as u64,
        "every bad datagram counted: {m:?}"
    );
    for (reason, n) in &want {
        let counted = m.dropped.iter().find(|(r, _)| r.name() == *reason).unwrap();
        assert_eq!(counted.1, *n, "{reason}");
    }
    assert_eq!(m.dropped_total(), v1_dropped, "nothing else was dropped");

    // What Prometheus sees, with upstream's labels.
    let text = scrape(agent.metrics_addr().unwrap());
    let v1 = [("metric_version", "1.0")];
    assert_eq!(
        metric_value(&text, "ingress", &v1),
        Some(datagrams.len() as f64)
    );
    assert_eq!(
        metric_value(
            &text,
            "dropped",
            &[("direction", "ingress"), ("metric_version", "1.0")]
        ),
        Some(v1_dropped as f64)
    );
    assert_balanced(&agent);
}

#[test]
fn udp_can_be_turned_off() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let yaml = w.yaml(&[(doppler.addr(), "z1")], "").replace(
        "udp: { listen: \"127.0.0.1:0\" }",
        "udp: { enabled: false }",
    );
    let config = metron::config::Config::from_yaml(&yaml).unwrap();
    let agent = metron::Agent::start(config).expect("agent starts");
    assert_eq!(agent.udp_addr(), None);
}

#[test]
fn shutdown_accounts_for_every_datagram_read() {
    let w = World::new();
    // No Doppler: what the converter admits stays buffered until the drain finds one.
    let addr = unserved_addr();
    let mut agent = w.start(&[(addr, "z1")], "shutdown: { grace_period_ms: 10000 }\n");
    let log = every_type().remove(0).encode_to_vec();
    send_paced(&agent, &vec![log; 300]);
    assert!(wait_until(WAIT, || agent.buffered().0 == 300));
    agent.begin_shutdown();
    let doppler = FakeDoppler::start_on(&w.pki, addr);
    let report = agent.shutdown();
    assert!(report.flushed, "{report:?}");
    let m = report.metrics;
    assert_eq!((m.ingress_v1, m.egress, m.dropped_total()), (300, 300, 0));
    assert_eq!(doppler.count(), 300);
}

/// A flood of junk on the UDP port while an emitter sends over gRPC: the gRPC envelopes all
/// arrive, and every datagram the agent read is accounted for (what the kernel dropped before
/// the agent could read it never entered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_flood_does_not_stop_grpc_traffic() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let to = agent.udp_addr().unwrap();
    let flood = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..30_000u64 {
            let _ = socket.send_to(&junk(i, 1 + (i as usize * 131) % 1400), to);
        }
    });
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let envs: Vec<_> = (0..2_000)
        .map(|i| log_envelope("grpc-app", &format!("line {i}")))
        .collect();
    send_all(&mut client, &envs).await;
    flood.join().unwrap();
    assert!(doppler.wait_for_count_async(envs.len(), WAIT).await);
    assert!(wait_until_async(WAIT, || agent.buffered().0 == 0).await);
    // The reader may still be emptying the socket's buffer after the flood ends: wait for a
    // moment when everything it read has been converted (and dropped), and check that snapshot.
    let mut settled = None;
    assert!(
        wait_until_async(WAIT, || {
            let m = agent.metrics();
            let done = m.dropped_total() == m.ingress_v1;
            settled = Some(m);
            done
        })
        .await,
        "every datagram read was junk, counted as dropped: {settled:?}"
    );
    let m = settled.expect("one snapshot at least");
    assert_eq!(m.ingress, envs.len() as u64);
    assert_eq!(m.egress, envs.len() as u64, "every gRPC envelope delivered");
    assert!(m.ingress_v1 > 0, "the flood was read: {m:?}");
    assert_eq!(
        m.ingress_total(),
        m.egress + m.dropped_total(),
        "balanced, nothing buffered: {m:?}"
    );
}

/// The identity the agent writes into v1 envelopes that lack one follows a reload, like the
/// default tags of v2 envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_identity_reaches_v1_envelopes_without_one() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let anonymous = |n: &str| Envelope {
        origin: some(n),
        event_type: Some(EventType::ValueMetric as i32),
        value_metric: Some(ValueMetric {
            name: some("m"),
            value: Some(1.0),
            unit: some("u"),
        }),
        ..Envelope::default()
    };
    send_paced(&agent, &[anonymous("before").encode_to_vec()]);
    assert!(doppler.wait_for_count_async(1, WAIT).await);
    let moved = w
        .yaml(&[(doppler.addr(), "z1")], "")
        .replacen("job: diego-cell", "job: router", 1);
    let outcome = agent
        .reload(metron::config::Config::from_yaml(&moved).unwrap())
        .await
        .expect("the reload applies");
    assert!(outcome.applied.contains(&"tags"), "{outcome:?}");
    send_paced(&agent, &[anonymous("after").encode_to_vec()]);
    assert!(doppler.wait_for_count_async(2, WAIT).await);
    for e in doppler.received() {
        let job = if e.source_id == "before" {
            "diego-cell"
        } else {
            "router"
        };
        assert_eq!(e.tags["job"], job, "{e:?}");
        assert_eq!(e.tags["deployment"], "cf", "{e:?}");
        assert_eq!(e.tags["origin"], e.source_id, "source_id from the origin");
    }
}
