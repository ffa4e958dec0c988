//! Per-source rate limits (`limits:`): a token bucket per source id, as Diego's per-app log rate
//! limit. Plain logic: the edge hands it the source of each envelope it read, in place. What is
//! over a source's limit is refused (`source_rate_limited`) and counted for the source's notice.
//! Exempt sources, the agent's own envelopes and its notices are never limited (the latter two
//! do not come through the gRPC edge at all).

use std::collections::HashMap;
use std::time::Instant;

use super::fair::Offer;
use crate::config::{Limit, LimitsConfig};

/// One source's bucket: tokens of envelopes and of bytes, refilled at the limit's rates up to
/// its burst.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: Limit,
    envelopes: f64,
    bytes: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: Limit, now: Instant) -> Self {
        Self {
            limit,
            envelopes: limit.envelopes_per_second.unwrap_or(0.0) * limit.burst_seconds,
            bytes: limit.bytes_per_second.unwrap_or(0.0) * limit.burst_seconds,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let l = self.limit;
        if let Some(r) = l.envelopes_per_second {
            self.envelopes = (self.envelopes + r * dt).min(r * l.burst_seconds);
        }
        if let Some(r) = l.bytes_per_second {
            self.bytes = (self.bytes + r * dt).min(r * l.burst_seconds);
        }
    }

    /// Whether one envelope of `bytes` fits now; takes it if so. An envelope larger than the
    /// whole byte burst passes when the bucket is full (and leaves it in debt), so no envelope
    /// is refused for ever.
    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        let l = self.limit;
        let envelopes_ok = l.envelopes_per_second.is_none() || self.envelopes >= 1.0;
        let bytes_ok = l.bytes_per_second.is_none_or(|r| {
            let cap = r * l.burst_seconds;
            self.bytes >= (bytes as f64).min(cap)
        });
        if !(envelopes_ok && bytes_ok) {
            return false;
        }
        if l.envelopes_per_second.is_some() {
            self.envelopes -= 1.0;
        }
        if l.bytes_per_second.is_some() {
            self.bytes -= bytes as f64;
        }
        true
    }

    /// Whether the bucket is back to full (it then holds no state worth keeping).
    fn full(&self, now: Instant) -> bool {
        let mut b = *self;
        b.refill(now);
        let l = b.limit;
        l.envelopes_per_second
            .is_none_or(|r| b.envelopes >= r * l.burst_seconds)
            && l.bytes_per_second
                .is_none_or(|r| b.bytes >= r * l.burst_seconds)
    }
}

/// The per-source rate limiter. See the module docs.
pub struct RateLimiter {
    config: LimitsConfig,
    buckets: HashMap<Box<[u8]>, Bucket>,
    max_sources: usize,
    /// Envelopes refused per source since its last notice (counted by [`RateLimiter::note`],
    /// once the refusals are counted as drops).
    pending: HashMap<Box<[u8]>, u64>,
}

/// Envelopes refused per source in one batch, for [`RateLimiter::note`].
pub type Refusals = Vec<(Box<[u8]>, u64)>;

impl RateLimiter {
    pub fn new(config: LimitsConfig, max_sources: usize) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
            max_sources: max_sources.max(1),
            pending: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// A reload's limits: each bucket keeps what it holds, up to its new burst.
    pub fn set_config(&mut self, config: LimitsConfig, now: Instant) {
        self.config = config;
        let config = &self.config;
        self.buckets.retain(|source, b| {
            let Some(limit) = std::str::from_utf8(source)
                .ok()
                .and_then(|s| config.limit_of(s))
            else {
                return false;
            };
            b.refill(now);
            let fresh = Bucket::new(limit, now);
            // A dimension the old limit did not have starts full, as a new bucket's.
            let keep = |had: Option<f64>, held: f64, new: f64| {
                if had.is_some() {
                    held.min(new)
                } else {
                    new
                }
            };
            *b = Bucket {
                limit,
                envelopes: keep(b.limit.envelopes_per_second, b.envelopes, fresh.envelopes),
                bytes: keep(b.limit.bytes_per_second, b.bytes, fresh.bytes),
                at: now,
            };
            true
        });
    }

    /// Decides for each of `offers` whether it is within its source's limit; `keep[i]` says
    /// whether offer `i` is. Returns how many were refused; `refusals` gets them by source.
    pub fn decide(
        &mut self,
        offers: &[Offer],
        now: Instant,
        keep: &mut Vec<bool>,
        refusals: &mut Refusals,
    ) -> usize {
        keep.clear();
        let mut refused = 0;
        for o in offers {
            let admit = match self.bucket(o.source, now) {
                None => true,
                Some(b) => b.take(o.bytes, now),
            };
            if !admit {
                refused += 1;
                match refusals.last_mut() {
                    Some((s, n)) if **s == *o.source => *n += 1,
                    _ => refusals.push((o.source.into(), 1)),
                }
            }
            keep.push(admit);
        }
        refused
    }

    /// Counts `refusals` for the sources' notices (once they are counted as drops; a source
    /// beyond `max_sources` pending is counted in the metrics but not told).
    pub fn note(&mut self, refusals: Refusals) {
        for (source, n) in refusals {
            if self.pending.len() < self.max_sources || self.pending.contains_key(&source) {
                *self.pending.entry(source).or_default() += n;
            }
        }
    }

    /// The bucket of `source`, made on its first envelope; `None` when it is not limited.
    fn bucket(&mut self, source: &[u8], now: Instant) -> Option<&mut Bucket> {
        if !self.buckets.contains_key(source) {
            let limit = self.config.limit_of(std::str::from_utf8(source).ok()?)?;
            if self.buckets.len() >= self.max_sources {
                // Full buckets hold nothing worth keeping; if none is, any one goes.
                self.buckets.retain(|_, b| !b.full(now));
                if self.buckets.len() >= self.max_sources {
                    let any = self.buckets.keys().next().cloned();
                    if let Some(k) = any {
                        self.buckets.remove(&k);
                    }
                }
            }
            self.buckets.insert(source.into(), Bucket::new(limit, now));
        }
        self.buckets.get_mut(source)
    }

    /// Up to `max` sources with envelopes refused since their last notice, and how many; each
    /// returned source starts counting again.
    pub fn take_pending(&mut self, max: usize) -> Vec<(String, u64)> {
        let keys: Vec<Box<[u8]>> = self.pending.keys().take(max).cloned().collect();
        keys.into_iter()
            .filter_map(|k| {
                let n = self.pending.remove(&k)?;
                Some((String::from_utf8_lossy(&k).into_owned(), n))
            })
            .collect()
    }

    /// `source`'s limit, for its notice.
    pub fn limit_of(&self, source: &str) -> Option<Limit> {
        self.config.limit_of(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn config(envelopes: Option<f64>, bytes: Option<f64>, burst: f64) -> LimitsConfig {
        LimitsConfig {
            per_source: Some(Limit {
                envelopes_per_second: envelopes,
                bytes_per_second: bytes,
                burst_seconds: burst,
            }),
            overrides: [(
                "big".to_string(),
                Limit {
                    envelopes_per_second: Some(1e9),
                    bytes_per_second: None,
                    burst_seconds: 1.0,
                },
            )]
            .into(),
            exempt: ["router".to_string()].into(),
            top_sources: 10,
        }
    }

    #[test]
    fn exempt_and_overridden_sources_and_the_burst() {
        let mut r = RateLimiter::new(config(Some(10.0), None, 1.0), 100);
        let t0 = Instant::now();
        let mut keep = Vec::new();
        let offers = |s: &'static str, n| -> Vec<Offer<'static>> {
            (0..n)
                .map(|_| Offer {
                    source: s.as_bytes(),
                    bytes: 100,
                })
                .collect()
        };
        let mut refusals = Refusals::new();
        assert_eq!(
            r.decide(&offers("app", 15), t0, &mut keep, &mut refusals),
            5,
            "a burst of 10"
        );
        assert_eq!(
            r.decide(&offers("router", 1000), t0, &mut keep, &mut refusals),
            0,
            "exempt"
        );
        assert_eq!(
            r.decide(&offers("big", 1000), t0, &mut keep, &mut refusals),
            0,
            "overridden"
        );
        let later = t0 + Duration::from_millis(500);
        assert_eq!(
            r.decide(&offers("app", 10), later, &mut keep, &mut refusals),
            5,
            "5 refilled in 0.5 s"
        );
        assert!(r.take_pending(10).is_empty(), "told only once counted");
        r.note(refusals);
        assert_eq!(r.take_pending(10), vec![("app".to_string(), 10)]);
        assert!(r.take_pending(10).is_empty(), "counted again from zero");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Over any stretch of time, a source is admitted at most its burst plus its rate times
        /// the time, in envelopes and in bytes (one envelope's overdraft aside), and a source
        /// that stays under its rate loses nothing.
        #[test]
        fn a_bucket_holds_its_source_to_the_limit(
            rate in 1.0f64..2000.0, byte_rate in 1000.0f64..1e6, burst in 0.1f64..3.0,
            steps in prop::collection::vec((0u64..50, 1usize..40, 1usize..2000), 1..100),
        ) {
            let mut r = RateLimiter::new(config(Some(rate), Some(byte_rate), burst), 100);
            let t0 = Instant::now();
            let mut now = t0;
            let mut keep = Vec::new();
            let (mut admitted, mut admitted_bytes) = (0.0, 0.0);
            for (ms, n, bytes) in steps {
                now += Duration::from_millis(ms);
                let offers: Vec<Offer> = (0..n).map(|_| Offer { source: b"app", bytes }).collect();
                r.decide(&offers, now, &mut keep, &mut Refusals::new());
                let k = keep.iter().filter(|k| **k).count() as f64;
                admitted += k;
                admitted_bytes += k * bytes as f64;
                let t = now.duration_since(t0).as_secs_f64();
                prop_assert!(admitted <= rate * burst + rate * t + 1e-6);
                prop_assert!(admitted_bytes <= byte_rate * burst + byte_rate * t + 2000.0);
            }
        }
    }
}
