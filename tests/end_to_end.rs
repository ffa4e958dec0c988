//! One end-to-end test per ingress RPC: envelopes of every type go from an mTLS emitter through a
//! real agent to a fake Doppler, and arrive tagged, mapped, totalled, sequenced and signed.

mod common;

use std::time::Duration;

use common::agent::{assert_balanced, sequences, wait_drained, World, KEY, KEY_ID};
use common::*;
use metron::proto::envelope::Message;
use metron::proto::{value::Data, Envelope, EnvelopeBatch, Value};
use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(15);
const SOURCES: [&str; 3] = ["app-a", "app-b", "rep"];
const ROUNDS: usize = 4;

/// The workload: per source and round, one envelope of each type (log payload names the round),
/// with counters that carry deltas only; plus one envelope that needs origin mapping and one with
/// deprecated tags.
fn workload() -> Vec<Envelope> {
    let mut out = Vec::new();
    for round in 0..ROUNDS {
        for src in SOURCES {
            for mut e in all_types(src) {
                match &mut e.message {
                    Some(Message::Log(l)) => {
                        l.payload = format!("{src} round {round}").into_bytes()
                    }
                    Some(Message::Counter(c)) => {
                        c.delta = round as u64 + 1;
                        c.total = 0;
                    }
                    _ => {}
                }
                out.push(e);
            }
        }
    }
    let mut mapped = log_envelope("", "no source id");
    mapped.tags.insert("origin".into(), "gorouter".into());
    out.push(mapped);
    let mut legacy = log_envelope("legacy", "deprecated tags");
    legacy.deprecated_tags.insert(
        "job".into(),
        Value {
            data: Some(Data::Text("legacy-job".into())),
        },
    );
    legacy.deprecated_tags.insert(
        "load".into(),
        Value {
            data: Some(Data::Decimal(0.23)),
        },
    );
    out.push(legacy);
    out
}

/// Everything the agent promises about each delivered envelope.
fn check_delivered(sent: &[Envelope], received: &[Envelope]) {
    assert_eq!(
        received.len(),
        sent.len(),
        "every envelope arrives, exactly once"
    );
    for e in received {
        metron::verify(e, KEY_ID, KEY).unwrap_or_else(|err| panic!("{err}: {e:?}"));
        for (k, v) in [
            ("deployment", "cf"),
            ("index", "3"),
            ("ip", "10.0.0.5"),
            ("team", "loggregator"),
        ] {
            assert_eq!(
                e.tags.get(k).map(String::as_str),
                Some(v),
                "tag {k} on {e:?}"
            );
        }
        let job = if e.source_id == "legacy" {
            "legacy-job"
        } else {
            "diego-cell"
        };
        assert_eq!(e.tags["job"], job);
    }
    // Origin mapping and deprecated tags.
    assert!(received.iter().any(|e| e.source_id == "gorouter"));
    let legacy = received.iter().find(|e| e.source_id == "legacy").unwrap();
    assert_eq!(legacy.tags["load"], "0.23");

    // Per source: numbered 1..n in the order sent.
    let seqs = sequences(received);
    let streams: std::collections::BTreeSet<_> = seqs.keys().map(|(s, _)| s.clone()).collect();
    assert_eq!(streams.len(), 1, "one sequence stream per agent process");
    for ((_, source), numbers) in &seqs {
        let want: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, &want, "sequence of {source}");
    }
    for src in SOURCES {
        let logs: Vec<String> = received
            .iter()
            .filter(|e| e.source_id == src)
            .filter_map(|e| match &e.message {
                Some(Message::Log(l)) => Some(String::from_utf8_lossy(&l.payload).into_owned()),
                _ => None,
            })
            .collect();
        let want: Vec<String> = (0..ROUNDS).map(|r| format!("{src} round {r}")).collect();
        assert_eq!(logs, want, "{src}'s logs in order");
        // Counter totals: running sum of the deltas 1, 2, 3, 4.
        let totals: Vec<u64> = received
            .iter()
            .filter(|e| e.source_id == src)
            .filter_map(|e| match &e.message {
                Some(Message::Counter(c)) => Some(c.total),
                _ => None,
            })
            .collect();
        assert_eq!(totals, vec![1, 3, 6, 10], "{src}'s counter totals");
    }
    // Every type made it.
    for kind in ["log", "counter", "gauge", "timer", "event"] {
        let n = received
            .iter()
            .filter(|e| {
                matches!(
                    (&e.message, kind),
                    (Some(Message::Log(_)), "log")
                        | (Some(Message::Counter(_)), "counter")
                        | (Some(Message::Gauge(_)), "gauge")
                        | (Some(Message::Timer(_)), "timer")
                        | (Some(Message::Event(_)), "event")
                )
            })
            .count();
        assert!(n >= ROUNDS * SOURCES.len(), "{kind}: {n}");
    }
}

fn finish(agent: metron::Agent, doppler: &FakeDoppler, sent: &[Envelope]) {
    assert!(
        doppler.wait_for_count(sent.len(), WAIT),
        "delivered {} of {}",
        doppler.count(),
        sent.len()
    );
    check_delivered(sent, &doppler.received());
    // egress counts what a Doppler acknowledged: the next stream end, within ack_interval_ms.
    assert!(wait_drained(&agent, WAIT), "acknowledged");
    let m = agent.metrics();
    assert_eq!(m.ingress, sent.len() as u64);
    assert_eq!(m.origin_mappings, 1);
    assert_balanced(&agent);
    let text = scrape(agent.metrics_addr().unwrap());
    assert_eq!(
        metric_value(&text, "ingress", &[("metric_version", "2.0")]),
        Some(sent.len() as f64)
    );
    assert_eq!(
        metric_value(&text, "egress", &[("metric_version", "2.0")]),
        Some(sent.len() as f64)
    );
    assert_eq!(metric_value(&text, "origin_mappings", &[]), Some(1.0));
    assert_eq!(
        metric_value(&text, "dropped", &[("direction", "ingress")]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&text, "dropped", &[("direction", "egress")]),
        Some(0.0)
    );
    assert_eq!(metric_value(&text, "doppler_connections", &[]), Some(3.0));
    assert_eq!(metric_value(&text, "doppler_v2_streams", &[]), Some(3.0));
    let report = agent.shutdown();
    assert!(report.flushed);
    assert_eq!(report.metrics.egress, sent.len() as u64);
}

#[tokio::test]
async fn sender_stream_delivers_every_type() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent = workload();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let feed = sent.clone();
    let producer = tokio::spawn(async move {
        for e in feed {
            tx.send(e).await.unwrap();
        }
    });
    client
        .sender(ReceiverStream::new(rx))
        .await
        .expect("Sender completes");
    producer.await.unwrap();
    finish(agent, &doppler, &sent);
}

#[tokio::test]
async fn batch_sender_stream_delivers_every_type() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent = workload();
    let batches: Vec<EnvelopeBatch> = sent
        .chunks(7)
        .map(|c| EnvelopeBatch { batch: c.to_vec() })
        .collect();
    client
        .batch_sender(tokio_stream::iter(batches))
        .await
        .expect("BatchSender completes");
    finish(agent, &doppler, &sent);
}

/// Messages several times the agent's 256 KiB HTTP/2 window (each well under the 10 MiB limit)
/// arrive whole: the emitter is let through by window updates as the agent reads.
#[tokio::test]
async fn messages_larger_than_the_ingress_window_arrive_whole() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let batches: Vec<EnvelopeBatch> = (0..3)
        .map(|b| EnvelopeBatch {
            batch: (0..8)
                .map(|i| log_envelope("big", &format!("{b}-{i}-").repeat(40_000)))
                .collect(),
        })
        .collect();
    let window = 256 << 10;
    assert!(batches.iter().all(|b| b.encoded_len() > 4 * window));
    tokio::time::timeout(
        WAIT,
        client.batch_sender(tokio_stream::iter(batches.clone())),
    )
    .await
    .expect("BatchSender within the bound")
    .expect("BatchSender completes");
    let sent: Vec<Envelope> = batches.into_iter().flat_map(|b| b.batch).collect();
    assert!(doppler.wait_for_count(sent.len(), WAIT), "delivered");
    let log_payload = |e: &Envelope| match &e.message {
        Some(Message::Log(l)) => l.payload.clone(),
        other => panic!("not a log: {other:?}"),
    };
    let mut payloads: Vec<Vec<u8>> = doppler.received().iter().map(log_payload).collect();
    let mut expected: Vec<Vec<u8>> = sent.iter().map(log_payload).collect();
    payloads.sort();
    expected.sort();
    assert_eq!(payloads, expected);
    assert!(wait_drained(&agent, WAIT), "acknowledged");
    assert_balanced(&agent);
}

#[tokio::test]
async fn unary_send_delivers_every_type() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent = workload();
    for chunk in sent.chunks(5) {
        client
            .send(EnvelopeBatch {
                batch: chunk.to_vec(),
            })
            .await
            .expect("Send succeeds");
    }
    finish(agent, &doppler, &sent);
}
