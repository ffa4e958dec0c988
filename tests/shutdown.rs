//! Graceful shutdown: buffered envelopes are flushed to the Doppler within the grace period; what
//! cannot be flushed in time is counted, so the books still balance exactly.

mod common;

use std::time::{Duration, Instant};

use common::agent::{unserved_addr, World};
use common::*;
use metron::proto::EnvelopeBatch;
use metron::telemetry::DropReason;

fn load(n: usize) -> Vec<EnvelopeBatch> {
    let body = "y".repeat(1024);
    (0..n)
        .map(|i| log_envelope(&format!("s{}", i % 7), &body))
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|c| EnvelopeBatch { batch: c.to_vec() })
        .collect()
}

#[tokio::test]
async fn shutdown_flushes_what_is_buffered() {
    let w = World::new();
    // No Doppler yet: everything sent stays buffered.
    let addr = unserved_addr();
    let mut agent = w.start(&[(addr, "z1")], "shutdown: { grace_period_ms: 10000 }\n");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    for b in load(3_000) {
        client.send(b).await.unwrap();
    }
    assert_eq!(agent.buffered().0, 3_000);
    // The Doppler appears only after shutdown was requested, so every delivery is the drain's.
    agent.begin_shutdown();
    let doppler = FakeDoppler::start_on(&w.pki, addr);
    let report = agent.shutdown();
    assert!(report.flushed, "{report:?}");
    let m = report.metrics;
    assert_eq!((m.ingress, m.egress, m.dropped_total()), (3_000, 3_000, 0));
    assert_eq!(
        doppler.count(),
        3_000,
        "acknowledged by the Doppler before the agent stopped"
    );
}

#[tokio::test]
async fn what_the_grace_period_cannot_flush_is_counted() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    doppler.set_stalled(true);
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        "shutdown: { grace_period_ms: 300 }\n",
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    for b in load(3_000) {
        client.send(b).await.unwrap();
    }
    let buffered = agent.buffered().0;
    assert!(buffered > 0);
    let t = Instant::now();
    let report = agent.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bounded by the grace period: {:?}",
        t.elapsed()
    );
    assert!(!report.flushed);
    let m = report.metrics;
    assert!(m.dropped_by(DropReason::ShutdownGraceExpired) > 0, "{m:?}");
    assert_eq!(m.ingress, 3_000);
    assert_eq!(
        m.ingress,
        m.egress + m.dropped_total(),
        "exact after shutdown: {m:?}"
    );
}
