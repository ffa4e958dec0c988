//! When a destination's connections are back after failures: the supervisor logs one line then
//! (how long, how much was held meanwhile), so an operator who saw "connection lost" also sees
//! the recovery, not only a metric.

use std::time::{Duration, Instant};

/// Tracks one destination's failures until every connection is up again.
#[derive(Debug, Default)]
pub struct Outage {
    /// Since when a connection has been failing, until all are up again.
    since: Option<Instant>,
    /// Connections that failed in that time.
    failures: u64,
    /// Envelopes waiting when the first connection came back.
    held: Option<usize>,
}

/// A recovery worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// From the first failure to the last connection back.
    pub down_for: Duration,
    /// Connection failures in that time.
    pub failures: u64,
    /// Envelopes that waited for the connections, counted when the first one came back: the
    /// backlog the recovery replays.
    pub held: usize,
}

impl Outage {
    /// A connection failed at `now` (not a graceful move or recycle: those are not failures).
    pub fn on_failure(&mut self, now: Instant) {
        self.since.get_or_insert(now);
        self.failures += 1;
    }

    /// A connection came up at `now`, with `up` of `slots` connections now open and `held`
    /// envelopes waiting: the recovery when that makes every connection open after failures.
    pub fn on_up(
        &mut self,
        up: usize,
        slots: usize,
        held: usize,
        now: Instant,
    ) -> Option<Recovered> {
        self.since?;
        let held = *self.held.get_or_insert(held);
        if up < slots {
            return None;
        }
        let since = self.since.take()?;
        self.held = None;
        Some(Recovered {
            down_for: now.saturating_duration_since(since),
            failures: std::mem::take(&mut self.failures),
            held,
        })
    }

    /// Whether a failure has not yet been followed by every connection coming back.
    pub fn ongoing(&self) -> bool {
        self.since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_is_reported_once_every_connection_is_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut o = Outage::default();
        assert_eq!(
            o.on_up(3, 3, 0, t0),
            None,
            "nothing failed: nothing to report"
        );
        o.on_failure(t0);
        o.on_failure(t0 + ms(10));
        assert!(o.ongoing());
        assert_eq!(o.on_up(2, 3, 700, t0 + ms(50)), None, "one still down");
        assert_eq!(
            o.on_up(3, 3, 300, t0 + ms(80)),
            Some(Recovered {
                down_for: ms(80),
                failures: 2,
                held: 700,
            }),
            "the backlog as the first connection came back"
        );
        assert!(!o.ongoing());
        assert_eq!(o.on_up(3, 3, 0, t0 + ms(90)), None, "reported once");
    }
}
