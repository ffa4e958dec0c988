//! Availability zones: traffic goes to the Doppler in the agent's AZ; with it dead, to another
//! AZ; and back home once the local Doppler returns.

mod common;

use std::time::Duration;

use common::agent::{assert_balanced, World};
use common::*;
use metron::proto::Envelope;

const WAIT: Duration = Duration::from_secs(15);

fn wave(tag: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| log_envelope(&format!("app-{}", i % 17), &format!("{tag} {i}")))
        .collect()
}

#[tokio::test]
async fn prefers_the_local_az_falls_back_when_it_dies_and_returns() {
    let w = World::new();
    let mut local = FakeDoppler::start(&w.pki);
    let remote = FakeDoppler::start(&w.pki);
    // The remote endpoint is listed first: preference must come from the AZ, not the order.
    let agent = w.start(&[(remote.addr(), "z2"), (local.addr(), "z1")], "");
    let slots = agent.connection_slots();
    assert!(
        local.wait_for_connections(slots, WAIT),
        "every connection goes to the local AZ"
    );
    assert_eventually!(agent.metrics().doppler_v2_streams == slots as i64);
    assert_eq!(remote.connections_opened(), 0);

    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let first = wave("first", 600);
    send_all(&mut client, &first).await;
    assert!(
        local.wait_for_count(first.len(), WAIT),
        "local got {}",
        local.count()
    );
    assert_eq!(remote.count(), 0, "nothing went to the other AZ");
    // Acknowledged before the kill: otherwise the kill counts it as lost (connection_lost).
    assert_eventually!(agent.metrics().egress == first.len() as u64);

    local.kill();
    assert!(
        remote.wait_for_connections(slots, WAIT),
        "with the local Doppler dead every connection moves to the other AZ ({} opened)",
        remote.connections_opened()
    );
    assert_eventually!(agent.metrics().doppler_v2_streams == slots as i64);

    let second = wave("second", 600);
    send_all(&mut client, &second).await;
    assert!(
        remote.wait_for_count(second.len(), WAIT),
        "remote got {}",
        remote.count()
    );
    assert_eq!(
        remote.count(),
        second.len(),
        "exactly the second wave, once"
    );
    assert_eq!(local.count(), first.len());

    // The local Doppler returns: the supervisor moves every connection back, one at a time.
    let opened = local.connections_opened();
    local.restart();
    assert!(
        local.wait_for_connections(opened + slots, WAIT),
        "every connection returns to the local AZ ({} reopened)",
        local.connections_opened() - opened
    );
    assert_eventually!(agent.metrics().doppler_v2_streams == slots as i64);
    let third = wave("third", 600);
    send_all(&mut client, &third).await;
    assert!(
        local.wait_for_count(first.len() + third.len(), WAIT),
        "local got {}",
        local.count()
    );
    assert_eq!(
        local.count(),
        first.len() + third.len(),
        "exactly the third wave, once"
    );
    assert_eq!(
        remote.count(),
        second.len(),
        "nothing more went to the other AZ"
    );

    let total = (first.len() + second.len() + third.len()) as u64;
    assert_eventually!(
        agent.metrics().egress == total,
        "every envelope acknowledged: {:?}",
        agent.metrics()
    );
    let m = agent.metrics();
    let recycled = m
        .restarts
        .iter()
        .find(|(c, _)| *c == metron::telemetry::RestartCause::Recycled)
        .map_or(0, |(_, n)| *n);
    assert_eq!(
        recycled, slots as u64,
        "each slot was moved home once: {m:?}"
    );
    assert_eq!(m.ingress, (first.len() + second.len() + third.len()) as u64);
    assert_eq!(m.egress, m.ingress);
    assert!(m.restarts_total() >= slots as u64, "{m:?}");
    assert_balanced(&agent);
}
