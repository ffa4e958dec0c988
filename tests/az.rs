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

/// A local Doppler that takes every dial (TCP, TLS, HTTP/2) but refuses every stream: the
/// return-home probe, itself a dial, cannot tell it from a healthy one. After its second quick
/// failure it is held out like a stalled Doppler, so the slots stay in the other AZ instead of
/// going home and failing again every few hundred milliseconds (each time losing their window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_doppler_that_refuses_every_stream_is_held_out_of_the_way_home() {
    let w = World::new();
    let local = FakeDoppler::start(&w.pki);
    local.set_refusing(true);
    let remote = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(local.addr(), "z1"), (remote.addr(), "z2")], "");
    let slots = agent.connection_slots();
    assert!(
        remote.wait_for_connections_async(slots, WAIT).await,
        "every connection settles in the other AZ"
    );
    // Streams refused so far: each slot tried home a couple of times at most.
    let settled = local.streams_opened();
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = 0;
    // Three seconds of traffic (the test template's probe runs every 100 ms, its backoff is at
    // most 200 ms): without the hold each slot would go home and fail a dozen times.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let wave = wave("while-refused", 50);
        send_all(&mut client, &wave).await;
        sent += wave.len();
        assert!(remote.wait_for_count_async(sent, WAIT).await);
    }
    let refused_since = local.streams_opened() - settled;
    assert!(
        refused_since <= slots,
        "{refused_since} more streams refused by the local Doppler after settling ({settled} before)"
    );
    let m = agent.metrics();
    assert_eq!(remote.count() as u64, sent as u64, "{m:?}");
    assert_eq!(m.dropped_total(), 0, "no window lost to a trip home: {m:?}");
    assert_balanced(&agent);
}
