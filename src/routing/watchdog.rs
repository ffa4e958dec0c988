//! The progress watchdog of one connection, as plain logic: a Doppler that stops reading keeps
//! its TCP connection open and answers HTTP/2 pings, so only the lack of progress tells (nothing
//! taken from a non-empty queue, or a stream end left unanswered).

use std::time::{Duration, Instant};

/// What the connection actor is to do after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Progress, or a stall already reported within the timeout.
    Fine,
    /// Tell the supervisor, which decides whether moving is worth a lost window.
    Report,
    /// A recycled stream whose end is never acknowledged: moving anyway, fail without asking.
    Fail,
}

/// One connection's watchdog: when its current stall was last reported.
#[derive(Debug, Default)]
pub struct Watchdog {
    reported: Option<Instant>,
}

impl Watchdog {
    /// Checks a connection that has made no progress for `stalled_for` against `timeout`, at
    /// `now`. A drain is bounded by the grace period, so it is never a stall; a stall is reported
    /// again every `timeout` while it lasts (another Doppler may have become usable).
    pub fn check(
        &mut self,
        stalled_for: Duration,
        timeout: Duration,
        recycling: bool,
        draining: bool,
        now: Instant,
    ) -> Verdict {
        let stalled = !draining && stalled_for >= timeout;
        if !stalled {
            self.reported = None;
            return Verdict::Fine;
        }
        if recycling {
            return Verdict::Fail;
        }
        if self
            .reported
            .is_some_and(|t| now.saturating_duration_since(t) < timeout)
        {
            return Verdict::Fine;
        }
        self.reported = Some(now);
        Verdict::Report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_reported_once_per_timeout_while_it_lasts() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watchdog::default();
        assert_eq!(w.check(s(1), s(2), false, false, t0), Verdict::Fine);
        assert_eq!(w.check(s(2), s(2), false, false, t0), Verdict::Report);
        assert_eq!(w.check(s(3), s(2), false, false, t0 + s(1)), Verdict::Fine);
        assert_eq!(
            w.check(s(4), s(2), false, false, t0 + s(2)),
            Verdict::Report
        );
        // Progress resets it: the next stall is reported at once.
        assert_eq!(w.check(s(0), s(2), false, false, t0 + s(3)), Verdict::Fine);
        assert_eq!(
            w.check(s(2), s(2), false, false, t0 + s(3)),
            Verdict::Report
        );
    }

    #[test]
    fn a_drain_is_never_a_stall_and_a_recycled_stream_fails() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watchdog::default();
        assert_eq!(w.check(s(9), s(2), false, true, t0), Verdict::Fine);
        assert_eq!(w.check(s(9), s(2), true, false, t0), Verdict::Fail);
    }
}
