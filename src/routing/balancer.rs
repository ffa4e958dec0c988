//! Which Doppler endpoint each connection slot uses: local AZ first, spread over distinct
//! endpoints, failed endpoints held back by backoff, other AZs only while no local one is usable.

use std::time::{Duration, Instant};

use super::backoff;

/// An endpoint as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: String,
    pub az: String,
}

#[derive(Debug, Clone)]
struct State {
    endpoint: Endpoint,
    /// Consecutive failures since the last connection that lived long enough to count as healthy.
    failures: u32,
    /// Not to be tried before this instant.
    retry_at: Option<Instant>,
    /// Slots currently assigned to this endpoint.
    assigned: usize,
}

/// The decision for one slot: connect to `endpoint` (an index into the configured list) after
/// waiting `delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub endpoint: usize,
    pub delay: Duration,
}

#[derive(Debug, Clone)]
pub struct Balancer {
    local_az: String,
    endpoints: Vec<State>,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Balancer {
    /// # Panics
    /// If `endpoints` is empty (the config requires at least one).
    pub fn new(
        local_az: &str,
        endpoints: Vec<Endpoint>,
        backoff_initial: Duration,
        backoff_max: Duration,
    ) -> Self {
        assert!(!endpoints.is_empty());
        Self {
            local_az: local_az.to_owned(),
            endpoints: endpoints
                .into_iter()
                .map(|endpoint| State {
                    endpoint,
                    failures: 0,
                    retry_at: None,
                    assigned: 0,
                })
                .collect(),
            backoff_initial,
            backoff_max,
        }
    }

    pub fn endpoint(&self, i: usize) -> &Endpoint {
        &self.endpoints[i].endpoint
    }

    pub fn is_local(&self, i: usize) -> bool {
        self.endpoints[i].endpoint.az == self.local_az
    }

    pub fn assigned(&self, i: usize) -> usize {
        self.endpoints[i].assigned
    }

    /// Picks an endpoint for a slot and counts the slot as assigned to it (give it back with
    /// [`Balancer::release`]). Among endpoints not held back by backoff: local AZ first, then the
    /// least-assigned (spreading slots over distinct Dopplers), then configuration order. If every
    /// endpoint is held back, the one free soonest (local first on a tie), with the wait as delay.
    pub fn assign(&mut self, now: Instant) -> Assignment {
        let ready = |s: &State| s.retry_at.is_none_or(|t| t <= now);
        let best = (0..self.endpoints.len())
            .filter(|&i| ready(&self.endpoints[i]))
            .min_by_key(|&i| (!self.is_local(i), self.endpoints[i].assigned, i));
        let (endpoint, delay) = match best {
            Some(i) => (i, Duration::ZERO),
            None => {
                let i = (0..self.endpoints.len())
                    .min_by_key(|&i| (self.endpoints[i].retry_at, !self.is_local(i), i))
                    .expect("at least one endpoint");
                let at = self.endpoints[i].retry_at.unwrap_or(now);
                (i, at.saturating_duration_since(now))
            }
        };
        self.endpoints[endpoint].assigned += 1;
        Assignment { endpoint, delay }
    }

    /// The local-AZ endpoint a slot would get now, if one is usable (not held back by backoff).
    pub fn local_candidate(&self, now: Instant) -> Option<usize> {
        (0..self.endpoints.len())
            .filter(|&i| self.is_local(i) && self.endpoints[i].retry_at.is_none_or(|t| t <= now))
            .min_by_key(|&i| (self.endpoints[i].assigned, i))
    }

    /// Whether an endpoint other than `current` is usable now (not held back by backoff).
    pub fn has_alternative(&self, current: usize, now: Instant) -> bool {
        (0..self.endpoints.len())
            .any(|i| i != current && self.endpoints[i].retry_at.is_none_or(|t| t <= now))
    }

    /// Counts a slot as assigned to `i` without choosing (the slot connected there on its own).
    pub fn claim(&mut self, i: usize) {
        self.endpoints[i].assigned += 1;
    }

    /// The slot assigned to endpoint `i` let go of it.
    pub fn release(&mut self, i: usize) {
        let s = &mut self.endpoints[i];
        debug_assert!(s.assigned > 0, "release without assign");
        s.assigned = s.assigned.saturating_sub(1);
    }

    /// A connection to `i` failed: hold the endpoint back for a jittered, growing backoff.
    pub fn on_failure(&mut self, i: usize, now: Instant, random: u64) {
        let (initial, max) = (self.backoff_initial, self.backoff_max);
        let s = &mut self.endpoints[i];
        s.failures = s.failures.saturating_add(1);
        s.retry_at = Some(now + backoff::delay(s.failures, initial, max, random));
    }

    /// A connection to `i` proved healthy: forget its failures.
    pub fn on_healthy(&mut self, i: usize) {
        let s = &mut self.endpoints[i];
        s.failures = 0;
        s.retry_at = None;
    }

    pub fn failures(&self, i: usize) -> u32 {
        self.endpoints[i].failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ep(addr: &str, az: &str) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            az: az.into(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn local_first_then_fallback_then_back() {
        let now = Instant::now();
        let mut b = Balancer::new(
            "z1",
            vec![ep("remote", "z2"), ep("local", "z1")],
            ms(100),
            ms(1000),
        );
        let a = b.assign(now);
        assert_eq!(
            a,
            Assignment {
                endpoint: 1,
                delay: Duration::ZERO
            }
        );
        b.release(1);
        b.on_failure(1, now, 0);
        assert_eq!(
            b.assign(now).endpoint,
            0,
            "local held back: fall back to the other AZ"
        );
        assert_eq!(b.local_candidate(now), None);
        assert!(b.has_alternative(1, now));
        assert!(
            !b.has_alternative(0, now),
            "the only other endpoint is in backoff"
        );
        assert_eq!(b.local_candidate(now + ms(1000)), Some(1));
        b.release(0);
        // once its backoff has passed, the local endpoint is preferred again
        assert_eq!(b.assign(now + ms(1000)).endpoint, 1);
    }

    #[test]
    fn every_endpoint_held_back_waits_for_the_soonest() {
        let now = Instant::now();
        let mut b = Balancer::new("z1", vec![ep("a", "z1"), ep("b", "z2")], ms(100), ms(1000));
        b.on_failure(0, now, 0);
        b.on_failure(0, now, 0); // 100 ms
        b.on_failure(1, now, 0); // 50 ms
        assert_eq!(
            b.assign(now),
            Assignment {
                endpoint: 1,
                delay: ms(50)
            }
        );
    }

    proptest! {
        /// Slots spread evenly over the usable local endpoints, and a remote endpoint is chosen
        /// only when no local one is usable.
        #[test]
        fn spreads_and_prefers_local(azs in prop::collection::vec(0u8..3, 1..8),
                                     failed in prop::collection::vec(any::<bool>(), 8),
                                     slots in 1usize..12) {
            let now = Instant::now();
            let eps: Vec<Endpoint> = azs.iter().enumerate()
                .map(|(i, z)| ep(&format!("e{i}"), &format!("z{z}"))).collect();
            let mut b = Balancer::new("z0", eps.clone(), ms(100), ms(1000));
            for (i, f) in failed.iter().take(eps.len()).enumerate() {
                if *f { b.on_failure(i, now, 0) }
            }
            let usable = |i: usize| !failed[i];
            let local_usable: Vec<usize> = (0..eps.len()).filter(|&i| usable(i) && azs[i] == 0).collect();
            let any_usable: Vec<usize> = (0..eps.len()).filter(|&i| usable(i)).collect();
            for _ in 0..slots {
                let a = b.assign(now);
                if !local_usable.is_empty() {
                    prop_assert!(local_usable.contains(&a.endpoint));
                    prop_assert_eq!(a.delay, Duration::ZERO);
                } else if !any_usable.is_empty() {
                    prop_assert!(any_usable.contains(&a.endpoint));
                }
            }
            let pool = if local_usable.is_empty() { &any_usable } else { &local_usable };
            if !pool.is_empty() {
                let counts: Vec<usize> = pool.iter().map(|&i| b.assigned(i)).collect();
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "uneven spread {:?}", counts);
            }
        }
    }
}
