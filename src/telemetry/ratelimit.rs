//! Warnings about a recurring condition, at most one line per interval, carrying how many
//! occurrences the quiet period swallowed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A lock-free gate: `check` says whether to log now and how many occurrences since the last line.
#[derive(Debug)]
pub struct RateLimit {
    origin: Instant,
    interval_ms: u64,
    /// Milliseconds since `origin` of the last line, plus one (0 = never logged).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            origin: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Records one occurrence and calls `log` with the count when a line is due.
    pub fn warn_every(&self, log: impl FnOnce(u64)) {
        if let Some(times) = self.check() {
            log(times);
        }
    }

    /// Records one occurrence; returns `Some(occurrences since the last line, this one included)`
    /// when a line should be written now.
    pub fn check(&self) -> Option<u64> {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now < last + self.interval_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_counts() {
        let r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(1));
        for _ in 0..99 {
            assert_eq!(r.check(), None);
        }
        let r0 = RateLimit::new(Duration::ZERO);
        assert_eq!(r0.check(), Some(1));
        assert_eq!(r0.check(), Some(1));
    }
}
