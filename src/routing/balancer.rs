//! Which Doppler endpoint each connection slot uses: local AZ first, spread over distinct
//! endpoints, failed endpoints held back by backoff, other AZs only while no local one is usable.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::backoff;

/// An endpoint as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: String,
    /// The endpoint's AZ; only equality with the agent's own AZ matters. Discovery by DNS uses the
    /// empty string for "not the local AZ".
    pub az: String,
}

#[derive(Debug, Clone)]
struct State {
    endpoint: Endpoint,
    /// Consecutive failures since the last connection that lived long enough to count as healthy.
    failures: u32,
    /// Not to be tried before this instant.
    retry_at: Option<Instant>,
    /// Held out after a stall until this instant, whatever healthy connections to it say
    /// meanwhile (another slot's stream may still flow while this one stopped).
    held_until: Option<Instant>,
    /// Slots currently assigned to this endpoint.
    assigned: usize,
    /// Discovery no longer lists this endpoint: it gets no new slot, but keeps its index (the
    /// supervisor stores indices per slot) until the slots still on it let go; after that the
    /// index may be reused for a newly discovered endpoint.
    retired: bool,
}

impl State {
    fn fresh(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            failures: 0,
            retry_at: None,
            held_until: None,
            assigned: 0,
            retired: false,
        }
    }
}

/// The decision for one slot: connect to `endpoint` (an index into the balancer's endpoints,
/// stable while any slot holds it) after waiting `delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub endpoint: usize,
    pub delay: Duration,
}

#[derive(Debug, Clone)]
pub struct Balancer {
    local_az: String,
    /// Indexed by endpoint index. Never shrinks, so an index held by a slot always means the same
    /// endpoint; retired entries are reused instead, so DNS churn cannot grow it without bound.
    endpoints: Vec<State>,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// Orders endpoints that are otherwise equal (same AZ class, same number of slots): a value
    /// drawn once per agent, so that agents with the same sorted Doppler list do not all pick its
    /// first entries. 0 keeps the list's order (tests).
    tie_break: u64,
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
            endpoints: endpoints.into_iter().map(State::fresh).collect(),
            ..Self::empty(local_az, backoff_initial, backoff_max)
        }
    }

    /// A balancer with no endpoint yet, for discovery before its first answer: [`Balancer::assign`]
    /// returns `None` until [`Balancer::update_endpoints`] brings some.
    pub fn empty(local_az: &str, backoff_initial: Duration, backoff_max: Duration) -> Self {
        Self {
            local_az: local_az.to_owned(),
            endpoints: Vec::new(),
            backoff_initial,
            backoff_max,
            tie_break: 0,
        }
    }

    /// Breaks ties between equally good endpoints by `seed` (drawn at random once per agent)
    /// instead of by their order in the list. Discovery sorts what DNS returns, and so does any
    /// hand-written list; with ties broken by position every agent of a foundation would put its
    /// slots on the same first few Dopplers and leave the rest idle.
    #[must_use]
    pub fn with_tie_break(mut self, seed: u64) -> Self {
        self.tie_break = seed;
        self
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

    /// Whether discovery dropped endpoint `i`: it gets no new slot, and slots still on it should
    /// move (see [`Balancer::retired_with_slots`]).
    pub fn is_retired(&self, i: usize) -> bool {
        self.endpoints[i].retired
    }

    /// How many endpoints may be assigned (not retired), whether or not held back by backoff.
    pub fn live_endpoints(&self) -> usize {
        self.live().count()
    }

    /// Retired endpoints that slots still use, lowest index first: the caller should move those
    /// slots, since the Doppler behind them is leaving (or has left) the pool.
    pub fn retired_with_slots(&self) -> Vec<usize> {
        (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].retired && self.endpoints[i].assigned > 0)
            .collect()
    }

    /// Discovery found `endpoints` (first listing of an address wins). Endpoints still listed keep
    /// their index and state (failures, backoff, slots) and take the new `az`; endpoints no longer
    /// listed are retired, keeping their index and slots until released; new addresses take the
    /// index of a retired endpoint no slot holds, else a new one.
    ///
    /// An empty list is ignored: an empty DNS answer is far likelier a DNS fault than every
    /// Doppler gone, and retiring everything would leave nothing to send to.
    pub fn update_endpoints(&mut self, endpoints: Vec<Endpoint>) {
        if endpoints.is_empty() {
            return;
        }
        let mut seen = HashSet::new();
        let wanted: Vec<Endpoint> = endpoints
            .into_iter()
            .filter(|e| seen.insert(e.addr.clone()))
            .collect();
        let by_addr: HashMap<&str, &Endpoint> =
            wanted.iter().map(|e| (e.addr.as_str(), e)).collect();
        let mut known = HashSet::new();
        for s in &mut self.endpoints {
            match by_addr.get(s.endpoint.addr.as_str()) {
                Some(e) => {
                    // A retired endpoint that comes back keeps its index and state.
                    s.retired = false;
                    s.endpoint.az.clone_from(&e.az);
                    known.insert(s.endpoint.addr.clone());
                }
                None => s.retired = true,
            }
        }
        let mut free = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].retired && self.endpoints[i].assigned == 0)
            .collect::<Vec<_>>()
            .into_iter();
        for e in wanted {
            if known.contains(&e.addr) {
                continue;
            }
            match free.next() {
                Some(i) => self.endpoints[i] = State::fresh(e),
                None => self.endpoints.push(State::fresh(e)),
            }
        }
    }

    /// Picks an endpoint for a slot and counts the slot as assigned to it (give it back with
    /// [`Balancer::release`]). Among endpoints not retired and not held back by backoff: local AZ
    /// first, then the least-assigned (spreading slots over distinct Dopplers), then this agent's
    /// order of equals ([`Balancer::with_tie_break`]).
    /// If every such endpoint is held back, the one free soonest (local first on a tie), with the
    /// wait as delay. `None` when there is no endpoint at all yet (discovery has not answered):
    /// the caller tries again after the next resolution.
    pub fn assign(&mut self, now: Instant) -> Option<Assignment> {
        let (endpoint, delay) = match self.target(now) {
            Some(i) => (i, Duration::ZERO),
            None => {
                let i = self
                    .live()
                    .min_by_key(|&i| (self.free_at(i), !self.is_local(i), self.rank(i), i))?;
                let at = self.free_at(i).unwrap_or(now);
                (i, at.saturating_duration_since(now))
            }
        };
        self.endpoints[endpoint].assigned += 1;
        Some(Assignment { endpoint, delay })
    }

    /// The local-AZ endpoint a slot would get now, if one is usable (not retired, not held back).
    pub fn local_candidate(&self, now: Instant) -> Option<usize> {
        self.live()
            .filter(|&i| self.is_local(i) && self.ready(i, now))
            .min_by_key(|&i| (self.endpoints[i].assigned, self.rank(i), i))
    }

    /// Whether an endpoint other than `current` is usable now (not retired, not held back).
    pub fn has_alternative(&self, current: usize, now: Instant) -> bool {
        self.live().any(|i| i != current && self.ready(i, now))
    }

    /// Whether moving one slot would even out the spread, and if so the endpoint to take it from
    /// (release it there, then [`Balancer::assign`]). The slot would go to the endpoint `assign`
    /// picks now; a move is worth it only from an endpoint with at least two slots more, in the
    /// same preference class (or any non-local one when the target is local), so `assign` never
    /// undoes it and repeated moves stop after at most one per slot. The most-assigned such
    /// endpoint is returned, lowest index on a tie. Slots away from the local AZ while a local
    /// endpoint is usable are the return-home probe's business, and retired endpoints are
    /// [`Balancer::retired_with_slots`]'.
    pub fn spread_move(&self, now: Instant) -> Option<usize> {
        let target = self.target(now)?;
        let target_local = self.is_local(target);
        let floor = self.endpoints[target].assigned + 2;
        self.live()
            .filter(|&e| target_local || !self.is_local(e))
            .filter(|&e| self.endpoints[e].assigned >= floor)
            .min_by_key(|&e| (Reverse(self.endpoints[e].assigned), e))
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

    /// The stream to `i` stalled (the Doppler accepted the connection but stopped reading): a
    /// failure, held back for at least `hold`. A stalled Doppler still accepts connections, so
    /// after a short backoff it would win the return-home probe and take a slot again at once.
    pub fn on_stall(&mut self, i: usize, now: Instant, random: u64, hold: Duration) {
        self.on_failure(i, now, random);
        // A hold beyond what the clock can represent: the backoff alone applies.
        if let Some(until) = now.checked_add(hold) {
            let s = &mut self.endpoints[i];
            s.held_until = s.held_until.max(Some(until));
        }
    }

    /// A connection to `i` proved healthy: forget its failures (not a stall's hold).
    pub fn on_healthy(&mut self, i: usize) {
        let s = &mut self.endpoints[i];
        s.failures = 0;
        s.retry_at = None;
    }

    pub fn failures(&self, i: usize) -> u32 {
        self.endpoints[i].failures
    }

    /// Indices of the endpoints that may get slots.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.endpoints.len()).filter(|&i| !self.endpoints[i].retired)
    }

    /// Not held back (by backoff or a stall's hold) at `now`.
    fn ready(&self, i: usize, now: Instant) -> bool {
        self.free_at(i).is_none_or(|t| t <= now)
    }

    /// When `i` may be dialled again: the later of its backoff and a stall's hold.
    fn free_at(&self, i: usize) -> Option<Instant> {
        let s = &self.endpoints[i];
        s.retry_at.max(s.held_until)
    }

    /// The endpoint a slot would get now without waiting: the one rule [`Balancer::assign`] and
    /// [`Balancer::spread_move`] share, so a move is never undone.
    fn target(&self, now: Instant) -> Option<usize> {
        self.live()
            .filter(|&i| self.ready(i, now))
            .min_by_key(|&i| {
                (
                    !self.is_local(i),
                    self.endpoints[i].assigned,
                    self.rank(i),
                    i,
                )
            })
    }

    /// Where endpoint `i` comes among equals for this agent: a hash of its address under the
    /// agent's seed (the address, not the index, so a change in the list does not reshuffle the
    /// rest).
    fn rank(&self, i: usize) -> u64 {
        use std::hash::{Hash, Hasher};
        if self.tie_break == 0 {
            return 0;
        }
        let mut h = std::hash::DefaultHasher::new();
        self.tie_break.hash(&mut h);
        self.endpoints[i].endpoint.addr.hash(&mut h);
        h.finish()
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
            Some(Assignment {
                endpoint: 1,
                delay: Duration::ZERO
            })
        );
        b.release(1);
        b.on_failure(1, now, 0);
        assert_eq!(
            b.assign(now).unwrap().endpoint,
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
        assert_eq!(b.assign(now + ms(1000)).unwrap().endpoint, 1);
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
            Some(Assignment {
                endpoint: 1,
                delay: ms(50)
            })
        );
    }

    #[test]
    fn empty_balancer_assigns_nothing_until_discovery_answers() {
        let now = Instant::now();
        let mut b = Balancer::empty("z1", ms(100), ms(1000));
        assert_eq!(b.assign(now), None);
        assert_eq!(b.local_candidate(now), None);
        assert_eq!(b.spread_move(now), None);
        assert_eq!(b.live_endpoints(), 0);
        b.update_endpoints(vec![]);
        assert_eq!(b.assign(now), None, "an empty answer changes nothing");
        b.update_endpoints(vec![ep("a", "z2"), ep("b", "z1")]);
        assert_eq!(b.assign(now).unwrap().endpoint, 1);
    }

    #[test]
    fn update_keeps_state_retires_and_reuses_indices() {
        let now = Instant::now();
        let mut b = Balancer::new(
            "z1",
            vec![ep("a", "z1"), ep("b", "z1"), ep("c", "z2")],
            ms(100),
            ms(1000),
        );
        b.claim(0);
        b.on_failure(0, now, 0);
        b.claim(1);
        // a stays (and is now in another AZ), b and c go, d and e arrive
        b.update_endpoints(vec![ep("d", "z1"), ep("a", ""), ep("e", "")]);
        assert_eq!(b.endpoint(0), &ep("a", ""));
        assert_eq!((b.assigned(0), b.failures(0)), (1, 1), "state kept");
        assert!(b.is_retired(1));
        assert_eq!(b.assigned(1), 1, "a retired endpoint keeps its slots");
        // c held no slot: d takes its index; b still has one, so e is appended
        assert_eq!(b.endpoint(2), &ep("d", "z1"));
        assert_eq!(b.endpoint(3), &ep("e", ""));
        assert_eq!(b.live_endpoints(), 3);
        assert_eq!(b.retired_with_slots(), vec![1]);
        assert!(b.has_alternative(2, now), "e is live and ready");
        assert_eq!(b.local_candidate(now), Some(2));
        assert_eq!(b.assign(now).unwrap().endpoint, 2);

        b.release(1);
        assert!(b.retired_with_slots().is_empty());
        b.update_endpoints(vec![ep("f", "z1"), ep("a", "z1")]);
        // b's index is free now; d and e retire, d (still holding a slot) keeps index 2
        assert_eq!(b.endpoint(1), &ep("f", "z1"));
        assert_eq!(b.endpoint(2), &ep("d", "z1"));
        assert!(b.is_retired(2) && b.is_retired(3));
        assert_eq!(b.endpoints.len(), 4);

        // an address that comes back while its entry is still there keeps index and state
        b.update_endpoints(vec![ep("d", "z1")]);
        assert_eq!(b.endpoint(2), &ep("d", "z1"));
        assert!(!b.is_retired(2));
        assert_eq!(b.assigned(2), 1);
    }

    #[test]
    fn retired_endpoints_are_never_offered() {
        let now = Instant::now();
        let mut b = Balancer::new("z1", vec![ep("a", "z1"), ep("b", "z2")], ms(100), ms(1000));
        b.claim(0);
        b.update_endpoints(vec![ep("b", "z2")]);
        assert_eq!(b.local_candidate(now), None);
        assert!(b.has_alternative(0, now));
        assert!(!b.has_alternative(1, now), "only the retired one is left");
        b.on_failure(1, now, 0);
        assert_eq!(
            b.assign(now),
            Some(Assignment {
                endpoint: 1,
                delay: ms(50)
            }),
            "the live endpoint in backoff, not the retired ready one"
        );
    }

    #[test]
    fn a_stall_holds_the_endpoint_back_for_at_least_the_hold() {
        let now = Instant::now();
        let mut b = Balancer::new("z1", vec![ep("a", "z1"), ep("b", "z2")], ms(100), ms(1000));
        b.on_stall(0, now, 0, ms(30_000));
        assert_eq!(b.failures(0), 1);
        assert_eq!(b.local_candidate(now + ms(29_999)), None);
        assert_eq!(b.local_candidate(now + ms(30_000)), Some(0));
        // a healthy connection to it meanwhile (another slot's) does not lift the hold
        b.on_healthy(0);
        assert_eq!(b.local_candidate(now + ms(29_999)), None);
        // a hold shorter than the backoff (the first failure's: 50-100 ms, 50 with random 0)
        // changes nothing
        let mut b = Balancer::new("z1", vec![ep("a", "z1"), ep("b", "z2")], ms(100), ms(1000));
        b.on_stall(0, now, 0, ms(1));
        assert_eq!(b.local_candidate(now + ms(49)), None);
        assert_eq!(b.local_candidate(now + ms(50)), Some(0));
    }

    #[test]
    fn spread_move_takes_from_the_fullest_and_never_against_assign() {
        let now = Instant::now();
        let mut b = Balancer::new(
            "z1",
            vec![ep("a", "z1"), ep("b", "z1"), ep("c", "z2"), ep("d", "z2")],
            ms(100),
            ms(1000),
        );
        for _ in 0..2 {
            b.claim(1);
        }
        b.claim(0);
        assert_eq!(
            b.spread_move(now),
            None,
            "2 against 1: moving would only swap them"
        );
        b.claim(1);
        assert_eq!(b.spread_move(now), Some(1));
        // remote slots with a usable local endpoint: moved only when 2 above the local target
        let mut r = Balancer::new("z1", vec![ep("a", "z1"), ep("c", "z2")], ms(100), ms(1000));
        r.claim(0);
        r.claim(1);
        r.claim(1);
        assert_eq!(r.spread_move(now), None);
        r.claim(1);
        assert_eq!(r.spread_move(now), Some(1));
        // with the local endpoint held back, local slots are not pulled to a remote target
        r.on_failure(0, now, 0);
        r.claim(0);
        r.claim(0);
        r.release(1);
        r.release(1);
        r.release(1);
        assert_eq!(r.spread_move(now), None);
        // ties go to the lowest index
        let mut t = Balancer::new(
            "z1",
            vec![ep("a", "z2"), ep("b", "z2"), ep("c", "z2")],
            ms(100),
            ms(1000),
        );
        for i in [1, 1, 2, 2] {
            t.claim(i);
        }
        assert_eq!(t.spread_move(now), Some(1));
    }

    /// Many agents with the same sorted list of Dopplers, each with its own seed: their slots
    /// land on every Doppler, not on the list's first ones.
    #[test]
    fn agents_spread_over_every_doppler_not_the_first_few() {
        let now = Instant::now();
        let eps: Vec<Endpoint> = (0..20)
            .map(|i| ep(&format!("10.0.0.{i}:8082"), "z1"))
            .collect();
        let mut per_endpoint = [0usize; 20];
        for seed in 1..=400u64 {
            let mut b = Balancer::new("z1", eps.clone(), ms(100), ms(1000))
                .with_tie_break(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mine: HashSet<usize> = (0..5).map(|_| b.assign(now).unwrap().endpoint).collect();
            assert_eq!(
                mine.len(),
                5,
                "one agent's slots still on distinct Dopplers"
            );
            for e in mine {
                per_endpoint[e] += 1;
            }
        }
        // 2,000 slots over 20 Dopplers: 100 each on average.
        assert!(
            per_endpoint.iter().all(|&n| (60..=140).contains(&n)),
            "{per_endpoint:?}"
        );
        let mut same = Balancer::new("z1", eps.clone(), ms(100), ms(1000));
        assert_eq!(
            same.assign(now).unwrap().endpoint,
            0,
            "seed 0: the list's order"
        );
    }

    proptest! {
        /// Slots spread evenly over the usable local endpoints, and a remote endpoint is chosen
        /// only when no local one is usable.
        #[test]
        fn spreads_and_prefers_local(azs in prop::collection::vec(0u8..3, 1..8),
                                     failed in prop::collection::vec(any::<bool>(), 8),
                                     slots in 1usize..12, seed in any::<u64>()) {
            let now = Instant::now();
            let eps: Vec<Endpoint> = azs.iter().enumerate()
                .map(|(i, z)| ep(&format!("e{i}"), &format!("z{z}"))).collect();
            let mut b = Balancer::new("z0", eps.clone(), ms(100), ms(1000)).with_tie_break(seed);
            for (i, f) in failed.iter().take(eps.len()).enumerate() {
                if *f { b.on_failure(i, now, 0) }
            }
            let usable = |i: usize| !failed[i];
            let local_usable: Vec<usize> = (0..eps.len()).filter(|&i| usable(i) && azs[i] == 0).collect();
            let any_usable: Vec<usize> = (0..eps.len()).filter(|&i| usable(i)).collect();
            for _ in 0..slots {
                let a = b.assign(now).unwrap();
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

        /// Under any churn of discovered endpoints and slots: `assign` never offers a retired
        /// endpoint, an index held by a slot or by a surviving endpoint always means the same
        /// address, and the table grows only while every entry is live or still holds slots.
        #[test]
        fn churn_keeps_indices_stable_and_bounded(
            initial in prop::collection::btree_set(0u8..12, 1..6),
            ops in prop::collection::vec(
                prop_oneof![
                    prop::collection::vec((0u8..12, any::<bool>()), 0..7).prop_map(Op::Update),
                    Just(Op::Assign),
                    any::<prop::sample::Index>().prop_map(Op::Release),
                    any::<prop::sample::Index>().prop_map(Op::Fail),
                ],
                1..60,
            ),
        ) {
            let now = Instant::now();
            let name = |a: u8| format!("10.0.0.{a}:8082");
            let mut b = Balancer::new(
                "z1",
                initial.iter().map(|&a| ep(&name(a), "z1")).collect(),
                ms(100),
                ms(1000),
            );
            // Every slot as (endpoint index, address it was given).
            let mut slots: Vec<(usize, String)> = Vec::new();
            let mut high_water = b.endpoints.len();
            let mut live: Vec<String> = initial.iter().map(|&a| name(a)).collect();
            for op in ops {
                let before: Vec<(usize, String)> = (0..b.endpoints.len())
                    .filter(|&i| !b.is_retired(i))
                    .map(|i| (i, b.endpoint(i).addr.clone()))
                    .collect();
                match op {
                    Op::Update(list) => {
                        let eps: Vec<Endpoint> = list
                            .iter()
                            .map(|&(a, local)| ep(&name(a), if local { "z1" } else { "" }))
                            .collect();
                        b.update_endpoints(eps.clone());
                        if !eps.is_empty() {
                            live = eps.into_iter().map(|e| e.addr).collect();
                        }
                        for (i, addr) in before {
                            if live.contains(&addr) {
                                prop_assert_eq!(&b.endpoint(i).addr, &addr, "survivor moved");
                                prop_assert!(!b.is_retired(i));
                            }
                        }
                        let holding = b.retired_with_slots().len();
                        high_water = high_water.max(b.live_endpoints() + holding);
                    }
                    Op::Assign => {
                        let a = b.assign(now + ms(200)).expect("there is always a live endpoint");
                        prop_assert!(!b.is_retired(a.endpoint), "assigned a retired endpoint");
                        slots.push((a.endpoint, b.endpoint(a.endpoint).addr.clone()));
                    }
                    Op::Release(pick) => {
                        if !slots.is_empty() {
                            let (i, _) = slots.swap_remove(pick.index(slots.len()));
                            b.release(i);
                        }
                    }
                    Op::Fail(pick) => {
                        if !slots.is_empty() {
                            let (i, _) = slots[pick.index(slots.len())];
                            b.on_failure(i, now, 0);
                        }
                    }
                }
                for (i, addr) in &slots {
                    prop_assert_eq!(&b.endpoint(*i).addr, addr, "a held index changed meaning");
                }
                let mut live_now: Vec<String> = (0..b.endpoints.len())
                    .filter(|&i| !b.is_retired(i))
                    .map(|i| b.endpoint(i).addr.clone())
                    .collect();
                live_now.sort();
                let mut want = live.clone();
                want.sort();
                want.dedup();
                prop_assert_eq!(live_now, want);
                prop_assert!(b.endpoints.len() <= high_water,
                    "{} entries, high water {}", b.endpoints.len(), high_water);
                for i in 0..b.endpoints.len() {
                    let held = slots.iter().filter(|(s, _)| *s == i).count();
                    prop_assert_eq!(b.assigned(i), held);
                }
            }
        }

        /// Following `spread_move` (release there, assign) stops within one move per slot,
        /// `assign` never hands the slot straight back, and the usable endpoints of the class
        /// slots go to end up within one slot of each other.
        #[test]
        fn spread_moves_terminate_and_even_out(
            azs in prop::collection::vec(any::<bool>(), 1..7),
            failed in prop::collection::vec(any::<bool>(), 7),
            claims in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
            keep in prop::collection::vec(any::<bool>(), 7),
        ) {
            let now = Instant::now();
            let eps: Vec<Endpoint> = azs.iter().enumerate()
                .map(|(i, &local)| ep(&format!("e{i}"), if local { "z1" } else { "z2" }))
                .collect();
            let mut b = Balancer::new("z1", eps.clone(), ms(100), ms(1000));
            for c in &claims {
                b.claim(c.index(eps.len()));
            }
            for (i, f) in failed.iter().take(eps.len()).enumerate() {
                if *f { b.on_failure(i, now, 0) }
            }
            // some endpoints may have left the pool, slots and all
            let kept: Vec<Endpoint> = eps.iter().zip(&keep).filter(|(_, k)| **k)
                .map(|(e, _)| e.clone()).collect();
            b.update_endpoints(kept);
            let mut moves = 0;
            while let Some(from) = b.spread_move(now) {
                moves += 1;
                prop_assert!(moves <= claims.len(), "no end after {} moves", moves);
                prop_assert!(!b.is_retired(from));
                b.release(from);
                let a = b.assign(now).expect("spread_move implies a target");
                prop_assert_eq!(a.delay, Duration::ZERO);
                prop_assert_ne!(a.endpoint, from, "assign undid the move");
            }
            let usable: Vec<usize> = (0..eps.len())
                .filter(|&i| !b.is_retired(i) && !failed[i])
                .collect();
            let any_local = usable.iter().any(|&i| b.is_local(i));
            let class: Vec<usize> = usable.iter().copied()
                .filter(|&i| b.is_local(i) == any_local).collect();
            if let (Some(lo), Some(hi)) = (
                class.iter().map(|&i| b.assigned(i)).min(),
                class.iter().map(|&i| b.assigned(i)).max(),
            ) {
                prop_assert!(hi - lo <= 1, "uneven: {:?}",
                    class.iter().map(|&i| b.assigned(i)).collect::<Vec<_>>());
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Discovery answered with these (address, local) pairs.
        Update(Vec<(u8, bool)>),
        Assign,
        Release(prop::sample::Index),
        Fail(prop::sample::Index),
    }
}
