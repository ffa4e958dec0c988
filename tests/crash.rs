//! The crash policy, with real panics (the chaos hooks): a panic inside an actor is caught,
//! counted, and the actor goes on from fresh state; only what it held for the message it was
//! handling is lost, counted as `actor_panic`. A panic that escapes a guard takes the actor down:
//! `/livez` and `/readyz` say so and the agent stops itself.

mod common;

use std::time::Duration;

use common::agent::{assert_losses_accounted, World};
use common::load::Load;
use common::*;
use metron::telemetry::{ActorName, DropReason, RestartCause};
use metron::Agent;

const WAIT: Duration = Duration::from_secs(20);

async fn health(agent: &Agent, path: &str) -> (u16, String) {
    http_get(agent.health_addr().expect("health.listen is set"), path)
        .await
        .expect("the health endpoint answers")
}

async fn delivery_goes_on(doppler: &FakeDoppler, what: &str) {
    let before = doppler.count();
    assert!(
        doppler.wait_for_count_async(before + 400, WAIT).await,
        "delivery goes on after {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_pipeline_actor_costs_only_the_batch_it_held() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let load = Load::start(&agent, &w, 1, None).await;
    delivery_goes_on(&doppler, "start-up").await;

    let mut lost = 0;
    for actor in [ActorName::Ingress, ActorName::Sequencer, ActorName::Signer] {
        agent.chaos_panic(actor, 0, false);
        // The panic is counted, and so is the batch it held.
        let panicked = |m: &metron::telemetry::MetricsSnapshot| {
            m.panics_of(actor) == 1 && m.dropped_by(DropReason::ActorPanic) > lost
        };
        assert!(
            wait_until_async(WAIT, || panicked(&agent.metrics())).await,
            "the {} actor panicked once, losing its batch: {:?}",
            actor.name(),
            agent.metrics()
        );
        lost = agent.metrics().dropped_by(DropReason::ActorPanic);
        delivery_goes_on(&doppler, &format!("the {} actor panicked", actor.name())).await;
        assert_eq!(health(&agent, "/livez").await.0, 200, "still live");
        assert_eq!(health(&agent, "/readyz").await.0, 200, "still ready");
    }

    let m = load.finish(agent).await;
    assert_eq!(m.panics_total(), 3, "{m:?}");
    // Nothing but the three batches was lost: no other actor's buffers were touched.
    assert_eq!(
        m.dropped_total(),
        m.dropped_by(DropReason::ActorPanic),
        "{m:?}"
    );
    let received = doppler.received();
    assert_eq!(received.len() as u64, m.egress);
    assert_losses_accounted(&received, &m);
    // The sequencer started over under a new stream, so no receiver sees a repeat.
    let streams: std::collections::BTreeSet<_> =
        received.iter().map(|e| agent::seq_of(e).0).collect();
    assert_eq!(
        streams.len(),
        2,
        "one stream before the sequencer's panic, one after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_restarts_and_loses_at_most_its_window() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let slots = agent.connection_slots() as i64;
    let load = Load::start(&agent, &w, 1, None).await;
    delivery_goes_on(&doppler, "start-up").await;

    agent.chaos_panic(ActorName::DopplerConnection, 1, false);
    assert!(
        wait_until_async(WAIT, || agent.metrics().restarts_by(RestartCause::Panic)
            == 1)
        .await,
        "the connection restarted for its panic"
    );
    assert_eq!(agent.metrics().panics_of(ActorName::DopplerConnection), 1);
    assert!(
        wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == slots).await,
        "it reconnected"
    );
    delivery_goes_on(&doppler, "the connection panicked").await;

    // Only what its stream had in flight may be lost, and it is counted.
    load.finish_losing_only_in_flight(agent, &doppler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_supervisor_starts_over_and_loses_nothing() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let slots = agent.connection_slots();
    let load = Load::start(&agent, &w, 1, None).await;
    delivery_goes_on(&doppler, "start-up").await;

    let opened = doppler.connections_opened();
    agent.chaos_panic(ActorName::Supervisor, 0, false);
    assert!(
        wait_until_async(WAIT, || {
            agent.metrics().restarts_by(RestartCause::SupervisorReset) == slots as u64
        })
        .await,
        "every connection reported to the new supervisor: {:?}",
        agent.metrics()
    );
    assert_eq!(agent.metrics().panics_of(ActorName::Supervisor), 1);
    assert!(
        doppler
            .wait_for_connections_async(opened + slots, WAIT)
            .await,
        "every connection reconnected, on the new supervisor's word"
    );
    assert!(
        wait_until_async(WAIT, || agent.metrics().connections_in("z1")
            == slots as i64)
        .await,
        "the connections per AZ are counted afresh: {:?}",
        agent.metrics()
    );
    delivery_goes_on(&doppler, "the supervisor started over").await;

    // The new supervisor supervises: a connection that panics now is restarted.
    agent.chaos_panic_connection(0);
    assert!(
        wait_until_async(WAIT, || agent.metrics().restarts_by(RestartCause::Panic)
            == 1)
        .await
    );
    assert!(
        wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == slots as i64).await,
        "the panicked connection reconnected"
    );
    delivery_goes_on(&doppler, "the connection panicked").await;

    // The reset ended every stream gracefully; only the panicking connection could cost a window.
    load.finish_losing_only_in_flight(agent, &doppler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_a_panic_took_down_makes_the_agent_unhealthy_and_stop_itself() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        "shutdown: { grace_period_ms: 3000 }",
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    send_all(&mut client, &[log_envelope("app", "before")]).await;
    assert!(doppler.wait_for_count_async(1, WAIT).await);
    // A Doppler that stops reading keeps the shutdown's drain waiting, so the health endpoint is
    // still up to be asked once the agent has begun stopping itself.
    doppler.set_stalled(true);
    send_all(&mut client, &[log_envelope("app", "held")]).await;
    assert_eq!(health(&agent, "/livez").await.0, 200);

    agent.chaos_panic(ActorName::Signer, 0, true);
    let gone = tokio::time::timeout(WAIT, agent.actor_gone())
        .await
        .expect("the agent notices the gone actor");
    assert_eq!(gone, "signer");
    let (status, body) = health(&agent, "/livez").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("actor gone") && body.contains("signer"),
        "{body}"
    );
    let (status, body) = health(&agent, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("actor gone: signer"), "{body}");

    let report = agent.shutdown();
    assert_eq!(report.actors_gone.as_deref(), Some("signer"));
    let m = report.metrics;
    // Every envelope is still accounted for.
    assert_eq!(m.ingress, 2);
    assert_eq!(m.ingress, m.egress + m.dropped_total(), "{m:?}");
}
