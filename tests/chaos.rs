//! The chaos suite: load flows through the agent from several emitter connections and many sources
//! while Doppler connection actors panic at random, Dopplers are killed and restarted (one at
//! a time and all at once), a Doppler stalls, and the whole local AZ goes away and comes back.
//!
//! After each scenario: the agent is alive and back in the local AZ (new traffic reaches only
//! local Dopplers); after a graceful shutdown `ingress == egress + dropped` exactly; everything
//! acknowledged arrived; every sequence gap is an envelope counted as dropped after sequencing;
//! no source's envelopes were sent out of order or arrived twice (checked over all Dopplers,
//! merged in the order the streams that carried them started); the byte budget was never
//! exceeded.
//!
//! Randomness (which slot, how long between kills) comes from a seed printed at the start; set
//! `CHAOS_SEED` to replay a run.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agent::{assert_losses_accounted, World};
use common::doppler::received_in_send_order;
use common::load::Load;
use common::*;
use metron::telemetry::{DropReason, MetricsSnapshot, RestartCause};
use metron::Agent;

const WAIT: Duration = Duration::from_secs(20);
const SLOTS: usize = 4;
const BUDGET: u64 = 64 * 1024 * 1024;
/// `pipeline.max_buffered_bytes` when not configured.
const DEFAULT_BUDGET: u64 = 32 * 1024 * 1024;

/// Local (z1, the agent's AZ) and remote (z2) fake Dopplers.
struct Fleet {
    local: Vec<FakeDoppler>,
    remote: Vec<FakeDoppler>,
}

impl Fleet {
    fn start(w: &World, local: usize, remote: usize) -> Fleet {
        Fleet {
            local: (0..local).map(|_| FakeDoppler::start(&w.pki)).collect(),
            remote: (0..remote).map(|_| FakeDoppler::start(&w.pki)).collect(),
        }
    }

    fn endpoints(&self) -> Vec<(SocketAddr, &'static str)> {
        let local = self.local.iter().map(|d| (d.addr(), "z1"));
        let remote = self.remote.iter().map(|d| (d.addr(), "z2"));
        // Remote first: preference must come from the AZ, not the order.
        remote.chain(local).collect()
    }

    fn all(&self) -> Vec<&FakeDoppler> {
        self.local.iter().chain(self.remote.iter()).collect()
    }

    fn local_count(&self) -> usize {
        self.local.iter().map(|d| d.count()).sum()
    }

    fn remote_count(&self) -> usize {
        self.remote.iter().map(|d| d.count()).sum()
    }

    fn total(&self) -> usize {
        self.local_count() + self.remote_count()
    }
}

/// An agent with `SLOTS` connections and a byte budget of `budget` (`None`: the default).
fn start_agent(w: &World, fleet: &Fleet, budget: Option<u64>) -> Agent {
    let extra = budget.map_or(String::new(), |b| {
        format!("pipeline: {{ max_buffered_bytes: {b} }}\n")
    });
    let yaml = w
        .yaml(&fleet.endpoints(), &extra)
        .replace("connections: 3", &format!("connections: {SLOTS}"));
    let config = metron::config::Config::from_yaml(&yaml).expect("test config");
    Agent::start(config).expect("agent starts")
}

/// A seeded xorshift, so a failing run can be replayed with `CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(metron::entropy::random_u64)
            | 1;
        eprintln!("CHAOS_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Waits until `fleet` has received `more` envelopes beyond what it had: delivery goes on.
async fn delivery_goes_on(fleet: &Fleet, more: usize, what: &str) {
    let before = fleet.total();
    assert!(
        wait_until_async(WAIT, || fleet.total() >= before + more).await,
        "delivery stopped {what} ({} → {})",
        before,
        fleet.total()
    );
}

/// Waits until every slot streams to a Doppler in `az`.
async fn all_connections_in(agent: &Agent, az: &str, what: &str) {
    assert!(
        wait_until_async(WAIT, || agent.metrics().connections_in(az) == SLOTS as i64).await,
        "{what}: {:?}",
        agent.metrics().connections_by_az
    );
}

/// The end of every scenario: the agent is back in the local AZ and new traffic goes only there;
/// then a graceful shutdown, and every invariant of the module documentation.
async fn finish(agent: Agent, fleet: &Fleet, load: Load, budget: u64) -> MetricsSnapshot {
    all_connections_in(&agent, "z1", "every connection back in the local AZ").await;
    let remote_before = fleet.remote_count();
    let local_before = fleet.local_count();
    assert!(
        wait_until_async(WAIT, || fleet.local_count() >= local_before + 2_000).await,
        "new traffic reaches the local AZ"
    );
    assert_eq!(
        fleet.remote_count(),
        remote_before,
        "no new traffic went to the other AZ"
    );
    let m = load.finish(agent).await;
    let received = received_in_send_order(&fleet.all());
    assert_losses_accounted(&received, &m);
    assert!(
        m.peak_buffered_bytes <= budget,
        "peak {} over the budget",
        m.peak_buffered_bytes
    );
    let dropped: Vec<_> = m.dropped.iter().filter(|(_, n)| *n > 0).collect();
    eprintln!(
        "sent {}, acknowledged {}, received {}, dropped {dropped:?}, failovers {}, rerouted batches {}, peak buffered {} B",
        m.ingress,
        m.egress,
        received.len(),
        m.failovers,
        m.rerouted_batches,
        m.peak_buffered_bytes
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_actors_panicking_at_random_intervals() {
    let w = World::new();
    let fleet = Fleet::start(&w, 2, 1);
    let agent = start_agent(&w, &fleet, Some(BUDGET));
    let load = Load::start(&agent, &w, 3, None).await;
    delivery_goes_on(&fleet, 2_000, "before the first kill").await;
    let mut rng = Rng::from_env();
    let kills = 12;
    for k in 0..kills {
        let slot = rng.below(SLOTS as u64) as usize;
        agent.chaos_panic_connection(slot);
        assert!(
            wait_until_async(WAIT, || agent.metrics().restarts_by(RestartCause::Panic)
                > k)
            .await,
            "kill {k} (slot {slot}) restarted the actor"
        );
        // A random pause between kills: part of the scenario, not synchronisation.
        tokio::time::sleep(Duration::from_millis(10 + rng.below(60))).await;
    }
    delivery_goes_on(&fleet, 2_000, "after the kills").await;
    let m = finish(agent, &fleet, load, BUDGET).await;
    assert_eq!(m.restarts_by(RestartCause::Panic), kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dopplers_killed_one_at_a_time_then_all_at_once() {
    let w = World::new();
    let mut fleet = Fleet::start(&w, 2, 2);
    let agent = start_agent(&w, &fleet, Some(BUDGET));
    let load = Load::start(&agent, &w, 3, Some(Duration::from_millis(2))).await;
    delivery_goes_on(&fleet, 2_000, "before the first kill").await;

    // One at a time: the other local Doppler takes over, then the killed one comes back.
    for i in 0..fleet.local.len() {
        fleet.local[i].kill();
        assert!(
            wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == SLOTS as i64
                && agent.metrics().connections_in("z1") == SLOTS as i64)
            .await,
            "local Doppler {i} died: every slot on the other local one"
        );
        delivery_goes_on(&fleet, 1_000, "with one local Doppler dead").await;
        fleet.local[i].restart();
        let opened = fleet.local[i].connections_opened();
        assert!(
            fleet.local[i]
                .wait_for_connections_async(opened + 1, WAIT)
                .await,
            "the spread repair moves a connection back to local Doppler {i}"
        );
    }

    // All at once: nothing is reachable; the agent buffers, then delivers when they return.
    let m = agent.metrics();
    let failovers_before = m.failovers;
    for d in fleet.local.iter_mut().chain(fleet.remote.iter_mut()) {
        d.kill();
    }
    assert!(wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == 0).await);
    let buffered_before = agent.buffered().0;
    assert!(
        wait_until_async(WAIT, || agent.buffered().0 >= buffered_before + 2_000).await,
        "the agent buffers while no Doppler is reachable"
    );
    for d in fleet.local.iter_mut().chain(fleet.remote.iter_mut()) {
        d.restart();
    }
    let back = Instant::now();
    delivery_goes_on(&fleet, 1, "after every Doppler returned").await;
    eprintln!(
        "delivery resumed {:?} after every Doppler returned",
        back.elapsed()
    );
    delivery_goes_on(&fleet, 2_000, "after every Doppler returned").await;
    let m = finish(agent, &fleet, load, BUDGET).await;
    assert!(
        failovers_before >= 1,
        "the one-at-a-time kills failed slots over to the other Doppler: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doppler_that_stops_reading_is_replaced_and_the_rest_flows() {
    let w = World::new();
    let fleet = Fleet::start(&w, 2, 1);
    let agent = start_agent(&w, &fleet, Some(BUDGET));
    let load = Load::start(&agent, &w, 3, Some(Duration::from_millis(2))).await;
    delivery_goes_on(&fleet, 2_000, "before the stall").await;

    fleet.local[0].set_stalled(true);
    assert!(
        wait_until_async(WAIT, || agent.metrics().restarts_by(RestartCause::Stalled)
            >= 1)
        .await,
        "the watchdog noticed the stall"
    );
    // Every slot ends up on a Doppler that reads: the stalled one is held out of the probes and
    // of the reconnects, so it gets no new connection while it stays stalled.
    assert!(
        wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == SLOTS as i64).await,
        "every slot streams again"
    );
    let stalled_count = fleet.local[0].count();
    let stalled_connections = fleet.local[0].connections_opened();
    delivery_goes_on(&fleet, 3_000, "with a Doppler stalled").await;
    assert_eq!(
        fleet.local[0].count(),
        stalled_count,
        "a stalled Doppler records nothing"
    );
    assert_eq!(
        fleet.local[0].connections_opened(),
        stalled_connections,
        "no slot went back to the stalled Doppler"
    );
    fleet.local[0].set_stalled(false);
    let m = finish(agent, &fleet, load, BUDGET).await;
    assert!(m.restarts_by(RestartCause::Stalled) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_az_goes_away_and_comes_back() {
    let w = World::new();
    let mut fleet = Fleet::start(&w, 2, 2);
    let agent = start_agent(&w, &fleet, Some(BUDGET));
    let load = Load::start(&agent, &w, 3, Some(Duration::from_millis(2))).await;
    delivery_goes_on(&fleet, 2_000, "before the AZ outage").await;
    assert_eq!(fleet.remote_count(), 0, "everything went to the local AZ");

    for d in &mut fleet.local {
        d.kill();
    }
    all_connections_in(&agent, "z2", "every connection fell back to the other AZ").await;
    let remote = fleet.remote_count();
    assert!(
        wait_until_async(WAIT, || fleet.remote_count() >= remote + 2_000).await,
        "traffic flows to the other AZ"
    );
    for d in &mut fleet.local {
        d.restart();
    }
    let m = finish(agent, &fleet, load, BUDGET).await;
    assert!(
        m.restarts_by(RestartCause::Recycled) >= SLOTS as u64,
        "the slots went home gracefully"
    );
}

/// The figures the issue asks for: how fast delivery resumes after a Doppler restart, and what a
/// 5 s outage of the only Doppler costs at 10k envelopes/s (printed; the assertions are the
/// invariants, plus a loose bound on the resume time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_outage_at_ten_thousand_per_second() {
    let w = World::new();
    let mut fleet = Fleet::start(&w, 1, 0);
    // The shipped default budget: what an operator gets without tuning.
    let agent = start_agent(&w, &fleet, None);
    // 5 streams × 40 envelopes every 20 ms ≈ 10k envelopes/s offered.
    let load = Load::start(&agent, &w, 5, Some(Duration::from_millis(20))).await;
    delivery_goes_on(&fleet, 5_000, "before the outage").await;

    let ingress_at_kill = agent.metrics().ingress;
    fleet.local[0].kill();
    let killed = Instant::now();
    // The outage itself: five seconds without any Doppler.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let offered = agent.metrics().ingress - ingress_at_kill;
    let received_before = fleet.total();
    fleet.local[0].restart();
    let back = Instant::now();
    assert!(
        wait_until_async(WAIT, || fleet.total() > received_before).await,
        "delivery resumes"
    );
    let resumed = back.elapsed();
    let outage = back - killed;
    delivery_goes_on(&fleet, 5_000, "after the outage").await;
    let m = finish(agent, &fleet, load, DEFAULT_BUDGET).await;
    let lost_in_flight = m.dropped_by(DropReason::ConnectionLost);
    let shed = m.dropped_total() - lost_in_flight;
    eprintln!(
        "outage {outage:?} at {:.0} envelopes/s offered: resumed {resumed:?} after the restart; \
         shed {shed} ({:?}), in flight at the kill counted as connection_lost {lost_in_flight}",
        offered as f64 / outage.as_secs_f64(),
        m.dropped.iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>()
    );
    // What the README promises: within the default budget a 5 s outage at 10k/s sheds nothing;
    // the only loss counted is the window in flight at the kill (`finish` checked that every
    // gap is a counted loss). The timings are printed, not promised.
    assert_eq!(shed, 0, "nothing shed within the budget: {m:?}");
    assert!(
        resumed < Duration::from_secs(2),
        "resumed only after {resumed:?}"
    );
}
