//! Replay pacing: how fast a slot sends the backlog it held while it had no Doppler.
//!
//! A Doppler copies what it receives into a bounded buffer per subscriber (1,000 envelopes by
//! default) and drops what does not fit, after having acknowledged it to the agent. A backlog
//! sent at line rate when a Doppler comes back therefore fills those buffers at once and is
//! lost inside the Doppler, counted by metron as delivered. So a connection that starts with a
//! backlog sends it *paced*, at `1 + extra` times the slot's normal rate, plus a `floor`, until
//! what it may send covers everything queued; from then on it is unpaced again. The slot's
//! normal rate is the larger of two: what arrives live now (each arriving envelope earns
//! `1 + extra`), and the rate at which the backlog built up (the backlog over the time since the
//! queue was last empty, earned as time passes), so a backlog still drains at the pace it came
//! in when live traffic stops. The queue stays first in, first out: live traffic waits behind
//! the backlog, in order.
//!
//! What that bounds (see the property tests): from the start of a replay, a slot sends at most
//! `max((1 + extra) × arrived, (1 + extra) × before × elapsed) + floor × elapsed` envelopes,
//! where `before` is the rate the backlog built up at, never more than what arrived meanwhile
//! over that time: so a Doppler that many agents reconnect to at once sees at most `1 + extra`
//! times the larger of its load now and before the outage, plus one floor per slot. The backlog
//! is always sent within `backlog / floor` seconds, in about `outage / extra` at a steady live
//! rate, and in about `outage / (1 + extra)` once live traffic stops. Plain logic: time is an
//! argument.

use std::time::{Duration, Instant};

/// How fast a slot may replay (`dopplers.replay_extra_percent`, `dopplers.replay_min_rate`
/// divided among the slots).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayRate {
    /// Sent beyond the slot's normal rate while replaying, as a fraction of it (0.5: 1.5 ×).
    pub extra: f64,
    /// Envelopes a second the slot may send while replaying, whatever its rate (> 0).
    pub floor: f64,
}

impl Default for ReplayRate {
    /// The defaults of `dopplers.replay_extra_percent` and `replay_min_rate` over one slot.
    fn default() -> Self {
        Self {
            extra: 0.5,
            floor: 100.0,
        }
    }
}

/// A finished replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Envelopes sent while paced.
    pub envelopes: u64,
    /// From the connection's start to the end of pacing.
    pub took: Duration,
}

/// The shortest time a backlog's rate is measured over: a few envelopes queued a moment ago
/// are not a rate of millions a second.
const MIN_BUILD_UP: Duration = Duration::from_millis(100);

/// The longest a paced stream waits before it asks again.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// One slot's replay state.
#[derive(Debug, Default)]
pub struct Pacer {
    rate: ReplayRate,
    replay: Option<Replay>,
}

#[derive(Debug)]
struct Replay {
    started: Instant,
    /// Credit accrued up to `last`.
    last: Instant,
    /// The rate the backlog built up at (envelopes a second).
    before: f64,
    /// Credit earned by arrivals (and the floor), less what was sent: may go below zero while
    /// `by_time` pays.
    by_arrivals: f64,
    /// Credit earned by time at the rate before (and the floor), less what was sent.
    by_time: f64,
    sent: u64,
}

impl Replay {
    fn credit(&self) -> f64 {
        self.by_arrivals.max(self.by_time)
    }
}

impl Pacer {
    pub fn new(rate: ReplayRate) -> Self {
        Self {
            rate,
            ..Self::default()
        }
    }

    /// A reload: applies to the replay under way too.
    pub fn set_rate(&mut self, rate: ReplayRate) {
        self.rate = rate;
    }

    /// A connection starts at `now` with `queued` envelopes waiting, which built up over
    /// `built_up` (since the queue was last empty): a replay when there are any. Returns whether
    /// one began.
    pub fn start(&mut self, now: Instant, queued: usize, built_up: Duration) -> bool {
        let mut before = queued as f64 / built_up.max(MIN_BUILD_UP).as_secs_f64();
        // A replay cut off by its connection goes on: the queue has not been empty since the
        // outage began, so the time since then now includes the replay, and would understate
        // the rate.
        if let Some(r) = &self.replay {
            before = before.max(r.before);
        }
        self.replay = (queued > 0).then_some(Replay {
            started: now,
            last: now,
            before,
            by_arrivals: 0.0,
            by_time: 0.0,
            sent: 0,
        });
        self.replay.is_some()
    }

    /// `n` envelopes arrived live.
    pub fn pushed(&mut self, n: usize) {
        if let Some(r) = &mut self.replay {
            r.by_arrivals += (1.0 + self.rate.extra) * n as f64;
        }
    }

    /// How many envelopes may be taken at `now` with `queued` waiting: `Ok(None)` unpaced,
    /// `Ok(Some(k))` at most `k` (maybe 0). `Err` when this call ended the replay (what may be
    /// sent covers everything queued): unpaced from now on.
    pub fn allowance(&mut self, now: Instant, queued: usize) -> Result<Option<usize>, Replayed> {
        let ReplayRate { extra, floor } = self.rate;
        let Some(r) = &mut self.replay else {
            return Ok(None);
        };
        if now > r.last {
            let dt = now.duration_since(r.last).as_secs_f64();
            r.by_arrivals += floor * dt;
            r.by_time += ((1.0 + extra) * r.before + floor) * dt;
            r.last = now;
        }
        if r.credit() >= queued as f64 {
            let done = Replayed {
                envelopes: r.sent,
                took: now.saturating_duration_since(r.started),
            };
            self.replay = None;
            return Err(done);
        }
        Ok(Some(r.credit().max(0.0) as usize))
    }

    /// `n` envelopes were taken (within the allowance).
    pub fn took(&mut self, n: usize) {
        if let Some(r) = &mut self.replay {
            r.by_arrivals -= n as f64;
            r.by_time -= n as f64;
            r.sent += n as u64;
        }
    }

    /// While replaying with less than one envelope of credit: how long until time grants one
    /// (an arrival may grant it sooner).
    pub fn wait(&self) -> Option<Duration> {
        let r = self.replay.as_ref()?;
        let ReplayRate { extra, floor } = self.rate;
        let until = |credit: f64, per_second: f64| {
            if per_second > 0.0 {
                (1.0 - credit).max(0.0) / per_second
            } else {
                f64::INFINITY
            }
        };
        let secs =
            until(r.by_arrivals, floor).min(until(r.by_time, (1.0 + extra) * r.before + floor));
        // Never a busy loop; never long, so that the stream keeps asking (which the progress
        // watchdog sees) and a reload's new rate applies soon.
        Some(Duration::from_secs_f64(
            secs.clamp(1e-4, MAX_WAIT.as_secs_f64()),
        ))
    }

    /// Shutdown: the queue is flushed as fast as the Doppler takes it.
    pub fn stop(&mut self) -> Option<Replayed> {
        self.replay.take().map(|r| Replayed {
            envelopes: r.sent,
            took: r.last.saturating_duration_since(r.started),
        })
    }

    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a replay did: sent and arrived while paced, seconds paced, whether it ended, the
    /// rate the backlog built up at, and the most it ever sent beyond the bound the module
    /// documentation states (checked after every take; ≤ 0 when the bound held throughout).
    struct Run {
        sent: u64,
        secs: f64,
        ended: bool,
        worst_excess: f64,
    }

    /// A slot taking `take_percent` of what it may (100: everything, as the stream does when its
    /// messages are large enough), from a replay of `backlog` built up over `built_up_ms` on:
    /// `steps` of (milliseconds passed, envelopes arriving).
    fn simulate(
        rate: ReplayRate,
        built_up_ms: u64,
        backlog: usize,
        steps: &[(u64, usize)],
        take_percent: usize,
    ) -> Run {
        let t0 = Instant::now();
        let mut p = Pacer::new(rate);
        let mut now = t0;
        let mut queued = backlog;
        assert!(p.start(now, queued, Duration::from_millis(built_up_ms)));
        let before = p.replay.as_ref().expect("replaying").before;
        assert!(before * (built_up_ms.max(100) as f64 / 1000.0) <= backlog as f64 + 1e-6);
        let (mut sent, mut arrived) = (0u64, 0u64);
        let mut worst_excess = f64::NEG_INFINITY;
        for &(ms, n) in steps {
            now += Duration::from_millis(ms);
            queued += n;
            p.pushed(n);
            arrived += n as u64;
            let secs = (now - t0).as_secs_f64();
            match p.allowance(now, queued) {
                Ok(Some(k)) => {
                    let k = (k * take_percent / 100).max(k.min(1)).min(queued);
                    queued -= k;
                    p.took(k);
                    sent += k as u64;
                    let normal = (arrived as f64).max(before * secs);
                    let bound = (1.0 + rate.extra) * normal + rate.floor * secs;
                    worst_excess = worst_excess.max(sent as f64 - bound);
                }
                Ok(None) => unreachable!("unpaced only after the end was reported"),
                Err(done) => {
                    assert_eq!(done.envelopes, sent);
                    return Run {
                        sent,
                        secs,
                        ended: true,
                        worst_excess,
                    };
                }
            }
        }
        let secs = (now - t0).as_secs_f64();
        Run {
            sent,
            secs,
            ended: false,
            worst_excess,
        }
    }

    /// Any rate the config allows: 0-1000%, a floor from 1/s over 1,000 connections up.
    fn rate() -> impl Strategy<Value = ReplayRate> {
        (0u32..=1_000, 1u32..=2_000_000).prop_map(|(percent, floor_thousandths)| ReplayRate {
            extra: f64::from(percent) / 100.0,
            floor: f64::from(floor_thousandths) / 1_000.0,
        })
    }

    /// Rates whose floor drains a backlog within a simulation's length.
    fn draining_rate() -> impl Strategy<Value = ReplayRate> {
        (0u32..=1_000, 1u32..=2_000).prop_map(|(percent, floor)| ReplayRate {
            extra: f64::from(percent) / 100.0,
            floor: f64::from(floor),
        })
    }

    proptest! {
        /// Never floods: after every take of a replay, what was sent stays within `1 + extra`
        /// times the larger of the live arrivals and the rate the backlog built up at, plus
        /// the floor, however much of its allowance the stream takes each time.
        #[test]
        fn a_replay_never_sends_more_than_the_normal_rate_plus_the_extra_and_the_floor(
            rate in rate(),
            built_up_ms in 0u64..20_000,
            backlog in 1usize..200_000,
            steps in proptest::collection::vec((0u64..200, 0usize..2_000), 1..300),
            take_percent in 1usize..=100,
        ) {
            let r = simulate(rate, built_up_ms, backlog, &steps, take_percent);
            prop_assert!(r.worst_excess <= 1e-6, "{} over the bound", r.worst_excess);
        }

        /// Always drains: whatever arrives, and however much of its allowance the stream
        /// takes, the replay ends within `backlog / floor` seconds.
        #[test]
        fn a_replay_always_ends_within_the_backlog_over_the_floor(
            rate in draining_rate(),
            built_up_ms in 0u64..20_000,
            backlog in 1usize..20_000,
            arrivals in proptest::collection::vec(0usize..500, 1..50),
            take_percent in 1usize..=100,
        ) {
            let limit_ms = (backlog as f64 / rate.floor * 1000.0).ceil() as u64 + 10;
            // Steps of 10 ms cycling through the arrivals, well past the limit.
            let steps: Vec<(u64, usize)> = (0..=limit_ms / 10 * 2 + 10)
                .map(|i| (10, arrivals[i as usize % arrivals.len()]))
                .collect();
            let r = simulate(rate, built_up_ms, backlog, &steps, take_percent);
            prop_assert!(r.ended, "still replaying after {} s", r.secs);
            prop_assert!(r.secs * 1000.0 <= limit_ms as f64, "{} s", r.secs);
        }
    }

    #[test]
    fn nothing_queued_at_the_start_is_no_replay() {
        let mut p = Pacer::default();
        assert!(!p.start(Instant::now(), 0, Duration::ZERO));
        p.pushed(10);
        assert_eq!(p.allowance(Instant::now(), 10), Ok(None));
        assert_eq!(p.wait(), None);
    }

    const DEFAULTS: ReplayRate = ReplayRate {
        extra: 0.5,
        floor: 100.0,
    };

    /// A steady live rate: the backlog goes in about `backlog / (extra × live + floor)`.
    #[test]
    fn a_steady_slot_replays_in_about_the_backlog_over_the_extra_rate() {
        // 1,000 envelopes a second before and after, in 10 ms steps; 6,000 held: 6,000 / 600.
        let r = simulate(DEFAULTS, 6_000, 6_000, &vec![(10, 10); 2_000], 100);
        assert!(r.ended);
        assert!((9.8..=10.2).contains(&r.secs), "{} s", r.secs);
    }

    /// Live traffic stops: a backlog that built up at 1,000 a second still goes at 1.5 × that,
    /// not at the floor: 3,000 / (1,500 + 100) s.
    #[test]
    fn a_busy_slot_whose_traffic_stops_replays_at_the_rate_its_backlog_built_up() {
        let r = simulate(DEFAULTS, 3_000, 3_000, &vec![(10, 0); 1_000], 100);
        assert!(r.ended);
        assert!((1.8..=2.0).contains(&r.secs), "{} s", r.secs);
        // The last few go unpaced, once the credit covers them.
        assert!((2_900..3_000).contains(&r.sent), "{}", r.sent);
    }

    /// A backlog that built up slowly, with no traffic now, drains at its own pace and the
    /// floor: 300 over 30 s is 10 a second, 15 + 100 a second to replay.
    #[test]
    fn a_quiet_slot_replays_at_its_pace_and_the_floor() {
        let r = simulate(DEFAULTS, 30_000, 300, &vec![(10, 0); 1_000], 100);
        assert!(r.ended);
        assert!((2.5..=2.7).contains(&r.secs), "{} s", r.secs);
    }

    /// A connection that dies during a replay: the next one goes on at the rate the backlog
    /// built up at, not at the lower rate the longer time since the outage began suggests.
    #[test]
    fn a_replay_cut_off_by_its_connection_goes_on_at_the_same_pace() {
        let t0 = Instant::now();
        let mut p = Pacer::new(DEFAULTS);
        assert!(p.start(t0, 5_000, Duration::from_secs(5)));
        let later = t0 + Duration::from_secs(50);
        assert!(p.start(later, 4_000, Duration::from_secs(55)));
        assert_eq!(p.replay.as_ref().map(|r| r.before), Some(1_000.0));
    }

    #[test]
    fn shutdown_stops_pacing() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert!(p.start(t0, 50, Duration::from_secs(1)));
        assert_eq!(p.allowance(t0, 50), Ok(Some(0)));
        assert!(p.wait().is_some());
        assert_eq!(
            p.stop(),
            Some(Replayed {
                envelopes: 0,
                took: Duration::ZERO
            })
        );
        assert_eq!(p.allowance(t0, 50), Ok(None));
    }
}
