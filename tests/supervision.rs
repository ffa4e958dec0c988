//! Supervision under load: Doppler connection actors killed mid-stream (the chaos hook) and the
//! Doppler itself killed and restarted. The supervisor restarts, delivery resumes, the balance
//! holds and no source's envelopes arrive out of order.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::agent::{assert_balanced, assert_losses_accounted, wait_drained, World};
use common::*;
use metron::proto::EnvelopeBatch;
use metron::telemetry::RestartCause;

const WAIT: Duration = Duration::from_secs(20);

/// Sends batches of 50 envelopes over 12 sources until `stop` (or a hard cap), counting what the
/// agent accepted.
fn spawn_load(
    mut client: metron::proto::ingress_client::IngressClient<tonic::transport::Channel>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        // Bounded: at most 4,000 batches (200k envelopes) whatever happens.
        for _ in 0..4_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    i += 1;
                    log_envelope(&format!("src-{}", i % 12), &format!("{i}"))
                })
                .collect();
            client
                .send(EnvelopeBatch { batch })
                .await
                .expect("Send succeeds whatever the Dopplers do");
            sent.fetch_add(50, Ordering::Relaxed);
            // Yield so the test's checks interleave with the load on this runtime.
            tokio::task::yield_now().await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_actors_and_doppler_are_restarted_and_the_balance_holds() {
    let w = World::new();
    let mut doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let slots = agent.connection_slots();
    let client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = spawn_load(client, stop.clone(), sent.clone());

    // 1. Kill every connection actor, twice, while envelopes flow.
    let killed = || {
        agent
            .metrics()
            .restarts
            .iter()
            .find(|(c, _)| *c == RestartCause::Killed)
            .map_or(0, |(_, n)| *n)
    };
    let mut kills = 0;
    for _round in 0..2 {
        for slot in 0..slots {
            agent.chaos_kill_connection(slot);
            kills += 1;
            assert!(
                wait_until_async(WAIT, || killed() == kills).await,
                "the supervisor restarted slot {slot}'s actor"
            );
            assert!(
                wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == slots as i64).await,
                "slot {slot} reconnected"
            );
            let before = doppler.count();
            assert!(
                wait_until_async(WAIT, || doppler.count() > before + 500).await,
                "delivery goes on after killing slot {slot}"
            );
        }
    }

    // 2. Kill the Doppler, let the agent notice, bring it back on the same address.
    let before_kill = doppler.count();
    doppler.kill();
    assert!(wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == 0).await);
    let opened = doppler.connections_opened();
    doppler.restart();
    assert!(
        doppler
            .wait_for_connections_async(opened + slots, WAIT)
            .await,
        "the supervisor reconnects every slot"
    );
    assert!(
        wait_until_async(WAIT, || doppler.count() > before_kill + 1_000).await,
        "delivery resumes after the Doppler returns"
    );

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(wait_drained(&agent, WAIT));
    assert_balanced(&agent);
    let restarts = agent.metrics().restarts_total();
    assert!(restarts >= 3 * slots as u64, "{restarts} restarts");
    // A graceful shutdown ends every stream and waits for the Doppler's acknowledgement, so what
    // the Doppler holds afterwards is final.
    let report = agent.shutdown();
    assert!(report.flushed);
    let m = report.metrics;
    assert_eq!(
        m.ingress,
        sent.load(Ordering::Relaxed),
        "every accepted envelope was counted"
    );
    assert_eq!(m.ingress, m.egress + m.dropped_total());
    // Only what was in flight on a dying connection may be missing; it was counted as
    // `connection_lost`, and what did not arrive of it shows up as gaps.
    let received = doppler.received();
    assert_losses_accounted(&received, &m);
    eprintln!(
        "counted as possibly lost: {}, of which arrived anyway: {}",
        m.dropped_by(metron::telemetry::DropReason::ConnectionLost),
        received.len() as u64 - m.egress
    );
}
