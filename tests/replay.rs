//! Replay that a Doppler can take (decisions.md 25): the backlog an agent held while its
//! Doppler was down is sent at the live rate plus a bounded extra, so the bounded buffer a real
//! Doppler keeps per subscriber does not overflow, while live traffic keeps its order behind
//! the backlog and everything stays accounted for.
//!
//! The fake Doppler models a subscriber's buffer (1,000 envelopes, upstream's default, read at
//! 2.5 × the live rate). Emitters send 1,000 envelopes a second; the Doppler is killed until the
//! agent holds 2,000 envelopes, then restarted. With the default pace the model drops nothing;
//! with pacing effectively off, the same backlog overflows it: the model can fail.

mod common;

use std::time::{Duration, Instant};

use common::agent::World;
use common::load::{Load, PER_BATCH};
use common::*;
use metron::config::Config;
use metron::Agent;

const WAIT: Duration = Duration::from_secs(30);
/// The emitters' rate: one batch of `PER_BATCH` every 40 ms.
const LIVE_PER_SECOND: f64 = 1_000.0;
const BACKLOG: u64 = 2_000;

/// What one outage showed.
struct Outage {
    /// Envelopes the modelled subscriber buffer dropped inside the Doppler.
    model_drops: u64,
    /// Held when the Doppler came back.
    held: u64,
    /// From the restart until no slot was replaying any more.
    replay: Duration,
}

async fn outage(w: &World, dopplers_extra: &str) -> Outage {
    let mut doppler = FakeDoppler::start(&w.pki);
    doppler.model_subscriber(1_000, 2.5 * LIVE_PER_SECOND);
    let yaml = w.yaml(&[(doppler.addr(), "z1")], "").replace(
        "  connections: 3\n",
        &format!("  connections: 3\n{dopplers_extra}"),
    );
    let config = Config::from_yaml(&yaml).expect("test config");
    let agent = Agent::start(config).expect("agent starts");
    let period = Duration::from_secs_f64(PER_BATCH as f64 / LIVE_PER_SECOND);
    let load = Load::start(&agent, w, 1, Some(period)).await;
    assert!(doppler.wait_for_count_async(1_000, WAIT).await, "flowing");

    doppler.kill();
    assert!(
        wait_until_async(WAIT, || agent.buffered().0 >= BACKLOG).await,
        "the agent holds a backlog"
    );
    let held = agent.buffered().0;
    let before = doppler.count();
    // A connection that started with anything queued counts as a replay, at start-up too.
    let replays = agent.metrics().doppler_replays;
    doppler.restart();
    let back = Instant::now();
    assert!(
        wait_until_async(WAIT, || {
            let m = agent.metrics();
            m.doppler_replays > replays && m.doppler_replaying == 0
        })
        .await,
        "the backlog is replayed: {:?}",
        agent.metrics()
    );
    let replay = back.elapsed();
    // Live traffic flows on behind the backlog.
    assert!(
        doppler
            .wait_for_count_async(before + held as usize + 1_000, WAIT)
            .await,
        "the backlog and live traffic after it arrive"
    );
    load.finish_losing_only_in_flight(agent, &doppler).await;
    Outage {
        model_drops: doppler.subscriber_drops(),
        held,
        replay,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_replayed_at_a_pace_the_doppler_subscriber_takes() {
    let w = World::new();
    let o = outage(&w, "").await;
    eprintln!(
        "paced: held {}, replayed in {:?}, model drops {}",
        o.held, o.replay, o.model_drops
    );
    assert_eq!(o.model_drops, 0, "the subscriber's buffer never overflowed");
    // The backlog drains at 50% of the live rate plus 100/s: it cannot go in less than this
    // (the live rate taken as up to 1.5 × its nominal value, for the emitters' bursts).
    let fastest = o.held as f64 / (0.5 * 1.5 * LIVE_PER_SECOND + 100.0);
    assert!(
        o.replay.as_secs_f64() >= fastest * 0.8,
        "{:?} is faster than the pace allows ({fastest:.1} s)",
        o.replay
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pacing_the_same_backlog_overflows_the_subscriber() {
    let w = World::new();
    let o = outage(
        &w,
        "  replay_extra_percent: 1000\n  replay_min_rate: 1000000\n",
    )
    .await;
    eprintln!(
        "unpaced: held {}, replayed in {:?}, model drops {}",
        o.held, o.replay, o.model_drops
    );
    assert!(
        o.model_drops > 0,
        "{} held envelopes at line rate overflow a 1,000-envelope buffer",
        o.held
    );
}
