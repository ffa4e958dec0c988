//! A reader's pace cap: the benchmark's Doppler sink and the tests' Doppler stand-in take at most
//! so many envelopes a second, all streams together, by reading nothing until the last batch's
//! share of time has passed (HTTP/2 flow control then pushes back, as on a saturated Doppler).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Default)]
pub struct ReadPacer {
    /// Envelopes a second (0: as fast as it can).
    rate: AtomicU64,
    /// When the next batch may be read.
    next: Mutex<Option<Instant>>,
}

impl ReadPacer {
    /// At most `per_second` envelopes a second from now on (0: no cap).
    pub fn set(&self, per_second: u64) {
        self.rate.store(per_second, Ordering::Relaxed);
        *self.next.lock() = None;
    }

    /// Waits until more may be read after a batch of `n` envelopes.
    pub async fn after(&self, n: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let until = {
            let mut next = self.next.lock();
            let now = Instant::now();
            let until =
                next.map_or(now, |t| t.max(now)) + Duration::from_secs_f64(n as f64 / rate as f64);
            *next = Some(until);
            until
        };
        tokio::time::sleep_until(until.into()).await;
    }
}
