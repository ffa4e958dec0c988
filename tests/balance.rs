//! The balance: every envelope that enters is delivered or counted as dropped, exactly.
//! Healthy, overloaded (stalled Doppler) and with no Doppler at all.

mod common;

use std::time::{Duration, Instant};

use common::agent::{assert_balanced, sequences, unserved_addr, wait_drained, World};
use common::*;
use metron::proto::{Envelope, EnvelopeBatch};
use metron::telemetry::DropReason;

const WAIT: Duration = Duration::from_secs(30);

fn batches(sources: usize, count: usize, per_batch: usize, payload: usize) -> Vec<EnvelopeBatch> {
    let body = "x".repeat(payload);
    let envs: Vec<Envelope> = (0..count)
        .map(|i| log_envelope(&format!("src-{}", i % sources), &body))
        .collect();
    envs.chunks(per_batch)
        .map(|c| EnvelopeBatch { batch: c.to_vec() })
        .collect()
}

/// `streams` concurrent BatchSender streams, each sending `per_stream` envelopes over its own
/// `sources` source ids; returns when every stream has been answered.
async fn send_concurrently(
    agent: &metron::Agent,
    w: &World,
    streams: usize,
    sources: usize,
    per_stream: usize,
    per_batch: usize,
    payload: usize,
) {
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
        let mut load = batches(sources, per_stream, per_batch, payload);
        for e in load.iter_mut().flat_map(|b| b.batch.iter_mut()) {
            e.source_id = format!("{}-stream{s}", e.source_id);
        }
        tasks.push(tokio::spawn(async move {
            client
                .batch_sender(tokio_stream::iter(load))
                .await
                .expect("BatchSender");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Every source's numbers are exactly 1..=n: drops at the edge happen before sequencing and so
/// leave no gaps.
fn assert_gapless(received: &[Envelope]) {
    for ((_, source), seqs) in sequences(received) {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "sequence of {source}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_doppler_gets_every_envelope_from_concurrent_streams() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let streams = 4;
    let per_stream = 50 * 100;
    send_concurrently(&agent, &w, streams, 25, per_stream, 100, 200).await;
    let sent = streams * per_stream;
    assert!(
        doppler.wait_for_count_async(sent, WAIT).await,
        "{} of {sent}",
        doppler.count()
    );
    assert!(wait_drained(&agent, WAIT), "acknowledged");
    let m = agent.metrics();
    assert_eq!(
        (m.ingress, m.egress, m.dropped_total()),
        (sent as u64, sent as u64, 0)
    );
    assert_eq!(doppler.count(), sent);
    assert_gapless(&doppler.received());
    assert_balanced(&agent);
}

#[tokio::test]
async fn stalled_doppler_drops_at_the_edge_within_the_wait_bound_and_counts_exactly() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    doppler.set_stalled(true);
    // The watchdog would replace the stalled connection; this test is about the edge alone.
    let yaml = w
        .yaml(
            &[(doppler.addr(), "z1")],
            "pipeline: { max_buffered_bytes: 10485760 }\n",
        )
        .replace("progress_timeout_ms: 500", "progress_timeout_ms: 600000");
    let agent = metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).unwrap();
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    assert_eventually!(agent.metrics().doppler_v2_streams == 3);
    // 4 KiB envelopes: the 10 MiB budget holds about 2,500 of them.
    let load = batches(10, 8_000, 100, 4096);
    let mut slowest = Duration::ZERO;
    for b in load {
        let t = Instant::now();
        client
            .send(b)
            .await
            .expect("Send never fails for a full pipeline");
        slowest = slowest.max(t.elapsed());
    }
    // The bound is ingress.grpc.max_wait_ms (100 ms); 10x absorbs a loaded CI machine.
    assert!(
        slowest < Duration::from_secs(1),
        "an emitter call took {slowest:?}"
    );
    let m = agent.metrics();
    assert_eq!(m.ingress, 8_000);
    assert!(
        m.dropped_by(DropReason::PipelineFull) + m.dropped_by(DropReason::SlotQueueFull) > 0,
        "{m:?}"
    );
    assert!(agent.buffered().1 <= 10 * 1024 * 1024);

    doppler.set_stalled(false);
    assert!(wait_drained(&agent, WAIT));
    let m = agent.metrics();
    assert!(doppler.wait_for_count(m.egress as usize, WAIT));
    assert_eq!(
        doppler.count() as u64,
        m.egress,
        "everything counted as egress arrived"
    );
    assert_eq!(m.ingress, m.egress + m.dropped_total());
    assert_eq!(
        m.dropped_total(),
        m.dropped_by(DropReason::PipelineFull) + m.dropped_by(DropReason::SlotQueueFull),
        "only drops decided before sequencing: {m:?}"
    );
    assert_gapless(&doppler.received());
}

#[tokio::test]
async fn no_doppler_buffers_up_to_the_budget_then_delivers_when_one_appears() {
    let w = World::new();
    // An address with nothing listening: every connection attempt fails.
    let addr = unserved_addr();
    // A long max_wait_ms, so that waiting for room would show: more than half the 60 calls
    // below find the budget full, and would take 2 s each.
    let yaml = w
        .yaml(
            &[(addr, "z1")],
            "pipeline: { max_buffered_bytes: 10485760 }\n",
        )
        .replacen(
            "    listen: \"127.0.0.1:0\"\n    tls:",
            "    listen: \"127.0.0.1:0\"\n    max_wait_ms: 2000\n    tls:",
            1,
        );
    assert!(yaml.contains("max_wait_ms: 2000"));
    metron::telemetry::init_logging("warn");
    let agent = metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).unwrap();
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let load = batches(10, 6_000, 100, 4096);
    let t = Instant::now();
    for b in load {
        client
            .send(b)
            .await
            .expect("Send never fails with no Doppler");
    }
    // With no Doppler stream open the edge does not wait at all: 30 full-budget calls
    // waiting 2 s each would take a minute.
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "60 calls took {:?}",
        t.elapsed()
    );
    let m = agent.metrics();
    let (buffered, bytes) = agent.buffered();
    assert_eq!(m.egress, 0);
    assert!(buffered > 1_000, "kept up to the budget: {buffered}");
    assert!(bytes <= 10 * 1024 * 1024);
    assert_eq!(m.ingress, m.dropped_total() + buffered);
    // Upstream's meaning: dropped because no Doppler could take them (direction egress).
    assert!(m.dropped_by(DropReason::NoDoppler) > 0, "{m:?}");
    assert_eq!(
        m.dropped_total(),
        m.dropped_by(DropReason::NoDoppler) + m.dropped_by(DropReason::SlotQueueFull),
        "only drops decided before sequencing: {m:?}"
    );

    let doppler = FakeDoppler::start_on(&w.pki, addr);
    assert!(
        wait_drained(&agent, WAIT),
        "buffered envelopes delivered once a Doppler appears"
    );
    assert!(doppler.wait_for_count(buffered as usize, WAIT));
    assert_eq!(doppler.count() as u64, buffered);
    assert_gapless(&doppler.received());
    assert_balanced(&agent);
}

#[tokio::test]
async fn tiny_envelopes_cannot_outgrow_the_budget() {
    let w = World::new();
    let addr = unserved_addr();
    let agent = w.start(
        &[(addr, "z1")],
        "pipeline: { max_buffered_bytes: 10485760 }\n",
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    for _ in 0..200 {
        let batch = vec![Envelope::default(); 1_000];
        client.send(EnvelopeBatch { batch }).await.expect("Send");
    }
    // The last call returns once its batch is admitted; the actors may still be routing (and
    // shedding) what came before. Wait until the books balance, then read them.
    assert!(
        wait_until_async(WAIT, || {
            let m = agent.metrics();
            m.ingress == m.dropped_total() + agent.buffered().0
        })
        .await,
        "the pipeline settles"
    );
    let (buffered, bytes) = agent.buffered();
    // Every envelope costs at least the agent's fixed overhead (> 200 bytes: its item, its
    // layout, the metron tag and the default tags it may need), so 10 MiB holds fewer than
    // 52,429 of them however small they are.
    assert!(buffered > 0 && buffered < 52_429, "buffered {buffered}");
    assert!(bytes <= 10 * 1024 * 1024);
    let m = agent.metrics();
    assert_eq!(m.ingress, 200_000);
    assert_eq!(m.ingress, m.dropped_total() + buffered);
}

#[tokio::test]
async fn an_envelope_that_would_outgrow_a_doppler_message_is_dropped_at_the_edge() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    // 6 MiB of origin fits one ingress message, but becomes the source_id too: 12 MiB on the way out.
    let mut big = log_envelope("", "payload");
    big.tags
        .insert("origin".into(), "o".repeat(6 * 1024 * 1024));
    let small = log_envelope("app", "fine");
    client
        .send(EnvelopeBatch {
            batch: vec![big, small],
        })
        .await
        .expect("Send");
    assert!(doppler.wait_for_count(1, WAIT));
    let m = agent.metrics();
    assert_eq!(m.dropped_by(DropReason::Oversize), 1);
    assert!(wait_drained(&agent, WAIT));
    let m = agent.metrics();
    assert_eq!((m.ingress, m.egress), (2, 1));
    assert_eq!(doppler.received()[0].source_id, "app");
    assert_eq!(
        m.restarts_total(),
        0,
        "no connection was broken by an oversize message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_doppler_cannot_take_the_healthy_slots_share() {
    let w = World::new();
    let stuck = FakeDoppler::start(&w.pki);
    let healthy = FakeDoppler::start(&w.pki);
    stuck.set_stalled(true);
    // Four slots spread two and two; the watchdog is out of the way so the share alone is tested.
    let yaml = w
        .yaml(
            &[(stuck.addr(), "z1"), (healthy.addr(), "z1")],
            "pipeline: { max_buffered_bytes: 10485760 }\n",
        )
        .replace("connections: 3", "connections: 4")
        .replace("progress_timeout_ms: 500", "progress_timeout_ms: 600000");
    let agent = metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).unwrap();
    assert!(
        stuck.wait_for_connections_async(2, WAIT).await
            && healthy.wait_for_connections_async(2, WAIT).await
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    // 24 MiB over 40 sources: far more than the stuck slots may hold (the budget less the
    // healthy slots' guaranteed 2 × 1.25 MiB).
    for b in batches(40, 6_000, 100, 4096) {
        client.send(b).await.expect("Send");
    }
    assert!(healthy.wait_for_count_async(1_000, WAIT).await);
    let m = agent.metrics();
    assert_eq!(
        m.dropped_by(DropReason::PipelineFull),
        0,
        "the healthy slots never ran out of budget: {m:?}"
    );
    // Shed at the stuck slots' share, or earlier at the edge by fair shedding (every source
    // sends alike here, and the healthy slots drain: decision 30).
    assert!(
        m.dropped_by(DropReason::SlotQueueFull) + m.dropped_by(DropReason::FairShare) > 0,
        "{m:?}"
    );

    stuck.set_stalled(false);
    assert!(wait_until_async(WAIT, || agent.buffered().0 == 0).await);
    let m = agent.metrics();
    assert!(
        wait_until_async(WAIT, || (stuck.count() + healthy.count()) as u64
            == m.egress)
        .await
    );
    assert_eq!(m.ingress, 6_000);
    assert_eq!(m.ingress, m.egress + m.dropped_total());
}

#[tokio::test]
async fn a_doppler_that_stops_reading_is_replaced_by_the_watchdog() {
    let w = World::new();
    let stuck = FakeDoppler::start(&w.pki);
    let healthy = FakeDoppler::start(&w.pki);
    stuck.set_stalled(true);
    // The stuck Doppler is local, so every connection starts there; the other AZ is healthy.
    let yaml = w
        .yaml(&[(stuck.addr(), "z1"), (healthy.addr(), "z2")], "")
        .replace(
            "rebalance_interval_ms: 100",
            "rebalance_interval_ms: 600000",
        );
    let agent = metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).unwrap();
    let slots = agent.connection_slots();
    assert!(stuck.wait_for_connections(slots, WAIT));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    // Enough to fill the stuck Doppler's HTTP/2 windows and leave the queues non-empty.
    for b in batches(30, 3_000, 100, 4096) {
        client.send(b).await.expect("Send");
    }
    assert!(
        healthy.wait_for_connections(slots, WAIT),
        "every stuck connection was replaced ({} moved)",
        healthy.connections_opened()
    );
    let stalled = |m: &metron::telemetry::MetricsSnapshot| {
        m.restarts
            .iter()
            .find(|(c, _)| *c == metron::telemetry::RestartCause::Stalled)
            .map_or(0, |(_, n)| *n)
    };
    assert!(stalled(&agent.metrics()) >= 1);
    // What the stuck Doppler had not taken is delivered by the healthy one.
    assert!(wait_drained(&agent, WAIT));
    let m = agent.metrics();
    assert_eq!(m.ingress, 3_000);
    assert_eq!(m.ingress, m.egress + m.dropped_total());
    assert!(healthy.count() > 0);
    // A fresh wave goes entirely to the healthy Doppler.
    let before = healthy.count();
    for b in batches(30, 1_000, 100, 100) {
        client.send(b).await.expect("Send");
    }
    assert!(
        healthy.wait_for_count(before + 1_000, WAIT),
        "{} of 1000",
        healthy.count() - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_mailboxes_drop_by_reason_and_gaps_match_the_drops_after_sequencing() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        "pipeline: { mailbox_capacity: 1 }\n",
    );
    send_concurrently(&agent, &w, 4, 20, 20_000, 50, 100).await;
    let report = tokio::task::spawn_blocking(move || agent.shutdown())
        .await
        .unwrap();
    assert!(report.flushed);
    let m = report.metrics;
    assert_eq!(m.ingress, 80_000);
    assert_eq!(m.ingress, m.egress + m.dropped_total(), "{m:?}");
    assert!(
        m.dropped_total() > 0,
        "one-batch mailboxes overflow under this load: {m:?}"
    );
    assert_eq!(doppler.count() as u64, m.egress);
    // Drops decided before sequencing leave no gap; one after it leaves exactly one.
    let after_sequencing = m.dropped_by(DropReason::SignerQueueFull);
    let received = doppler.received();
    let gaps: u64 = sequences(&received)
        .values()
        .map(|seqs| {
            assert!(seqs.windows(2).all(|p| p[0] < p[1]), "in order");
            seqs.last().unwrap() - seqs.len() as u64
        })
        .sum();
    // A source whose last envelopes were dropped after sequencing shows no gap for them.
    assert!(
        gaps <= after_sequencing,
        "gaps {gaps} > drops after sequencing {after_sequencing}"
    );
}

#[tokio::test]
async fn a_full_source_table_starts_a_new_stream_without_repeating_numbers() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "pipeline: { max_sources: 2 }\n");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    for src in ["a", "b", "a", "c", "a", "b"] {
        client
            .send(EnvelopeBatch {
                batch: vec![log_envelope(src, "x")],
            })
            .await
            .unwrap();
    }
    assert!(doppler.wait_for_count(6, WAIT));
    let received = doppler.received();
    let streams: std::collections::BTreeSet<_> = received
        .iter()
        .map(|e| common::agent::seq_of(e).0)
        .collect();
    // a b a | c a | b: a new source arriving at a full table (2 sources) begins a new stream.
    assert_eq!(streams.len(), 3);
    assert_gapless(&received);
    let text = scrape(agent.metrics_addr().unwrap());
    assert_eq!(
        metric_value(&text, "sequence_stream_rotations", &[]),
        Some(2.0)
    );
}
