//! Supervision under load: Doppler connection actors made to panic mid-stream (the chaos hook) and the
//! Doppler itself killed and restarted. The supervisor restarts, delivery resumes, the balance
//! holds and no source's envelopes arrive out of order.

mod common;

use std::time::Duration;

use common::agent::World;
use common::load::Load;
use common::*;
use metron::telemetry::RestartCause;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_actors_and_doppler_are_restarted_and_the_balance_holds() {
    let w = World::new();
    let mut doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let slots = agent.connection_slots();
    let load = Load::start(&agent, &w, 1, None).await;

    // 1. Make every connection actor panic, twice, while envelopes flow.
    let killed = || {
        agent
            .metrics()
            .restarts
            .iter()
            .find(|(c, _)| *c == RestartCause::Panic)
            .map_or(0, |(_, n)| *n)
    };
    let mut kills = 0;
    for _round in 0..2 {
        for slot in 0..slots {
            agent.chaos_panic_connection(slot);
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

    let restarts = agent.metrics().restarts_total();
    assert!(restarts >= 3 * slots as u64, "{restarts} restarts");
    // A graceful shutdown ends every stream and waits for the Doppler's acknowledgement, so what
    // the Doppler holds afterwards is final. Only what was in flight on a dying connection may
    // be missing; it was counted as `connection_lost`, and what did not arrive of it shows up as
    // gaps.
    let m = load.finish_losing_only_in_flight(agent, &doppler).await;
    let received = doppler.received();
    eprintln!(
        "counted as possibly lost: {}, of which arrived anyway: {}",
        m.dropped_by(metron::telemetry::DropReason::ConnectionLost),
        received.len() as u64 - m.egress
    );
}
