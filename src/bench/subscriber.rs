//! A model of the buffer a real Doppler keeps for each subscriber (a firehose nozzle, Log
//! Cache): a fixed number of envelopes (upstream's default is 1,000), read at some rate. What
//! arrives while it is full is dropped inside the Doppler, after the Doppler acknowledged it to
//! the agent, so no agent counter shows it. The benchmark's outage run and the test suite's fake
//! Doppler put it behind what they receive, to see what a replay would cost a real subscriber.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct SubscriberBuffer {
    capacity: f64,
    /// Envelopes read a second.
    rate: f64,
    level: f64,
    last: Option<Instant>,
    dropped: u64,
}

impl SubscriberBuffer {
    pub fn new(capacity: usize, rate: f64) -> Self {
        Self {
            capacity: capacity as f64,
            rate,
            level: 0.0,
            last: None,
            dropped: 0,
        }
    }

    /// `n` envelopes arrive at `now`, one after another as the Doppler copies them.
    pub fn arrive(&mut self, n: usize, now: Instant) {
        if let Some(last) = self.last {
            let read = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.level = (self.level - read).max(0.0);
        }
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        self.level += n as f64;
        if self.level > self.capacity {
            self.dropped += (self.level - self.capacity).round() as u64;
            self.level = self.capacity;
        }
    }

    /// A restarted Doppler starts with empty buffers; what was dropped stays counted.
    pub fn empty(&mut self) {
        self.level = 0.0;
        self.last = None;
    }

    /// Envelopes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn drops_what_overflows_and_reads_at_its_rate() {
        let t = Instant::now();
        let mut b = SubscriberBuffer::new(1_000, 100.0);
        b.arrive(900, t);
        assert_eq!(b.dropped(), 0);
        b.arrive(300, t);
        assert_eq!(b.dropped(), 200);
        // A second later 100 have been read: 100 more fit.
        b.arrive(150, t + Duration::from_secs(1));
        assert_eq!(b.dropped(), 250);
        b.empty();
        b.arrive(1_000, t + Duration::from_secs(2));
        assert_eq!(b.dropped(), 250);
    }
}
