//! The supervisor's policy, as plain logic: which Doppler each connection slot uses, what happens
//! when a connection comes up, fails or stalls, and which one graceful move (if any) each
//! rebalance tick makes. No actors and no I/O: time and randomness are arguments, and every
//! decision comes back as a [`Command`] for the supervisor actor to carry out, so the property
//! tests below drive it directly.
//!
//! A rebalance tick makes at most one move, in this order of importance:
//! 1. a slot on a Doppler that left DNS is recycled (it reconnects elsewhere);
//! 2. a slot in another AZ goes back home once a local Doppler answers a probe dial;
//! 3. a slot on a doubled-up Doppler moves to an unused one (a scaled-up fleet gets used);
//! 4. a slot whose periodic recycle is due is recycled.

use std::time::{Duration, Instant};

use super::balancer::{Balancer, Endpoint};
use super::outage::{Outage, Recovered};
use crate::telemetry::RestartCause;

/// A connection that stayed up this long counts as healthy: its endpoint's backoff resets.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// What the supervisor actor is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Tell `slot`'s connection to dial `addr` (endpoint `endpoint`, in `az`) after `delay`.
    Connect {
        slot: usize,
        endpoint: usize,
        addr: String,
        az: String,
        delay: Duration,
    },
    /// End `slot`'s stream gracefully and reconnect: a move that costs no envelope.
    Recycle { slot: usize, why: Move },
    /// Dial `addr` (endpoint `local`) and report with [`SlotTable::on_probe`]: if it answers,
    /// slot `away` goes home.
    Probe {
        away: usize,
        local: usize,
        addr: String,
    },
    /// Give up `slot`'s stalled stream to `endpoint` and reconnect elsewhere.
    Abandon { slot: usize, endpoint: usize },
}

/// Why a slot moves (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Its Doppler left DNS.
    Retired,
    /// Back to the local AZ.
    Home,
    /// Onto a less used Doppler.
    Spread,
    /// The periodic recycle.
    Periodic,
}

/// What the supervisor knows about one slot.
#[derive(Debug, Clone, Default)]
struct Slot {
    /// The endpoint the slot holds in the balancer's count.
    assigned: Option<usize>,
    /// Its open stream.
    up: Option<Up>,
    /// Waiting for the first resolution (nothing to dial yet).
    pending: bool,
}

#[derive(Debug, Clone)]
struct Up {
    endpoint: usize,
    az: String,
    /// When the periodic recycle is due; `None` = never.
    recycle_at: Option<Instant>,
}

/// A connection came up ([`SlotTable::on_up`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpEvent {
    /// The AZ of the Doppler it is on now, and of the one it was on before (the open-connections
    /// gauge per AZ moves by one each).
    pub az: String,
    pub replaced_az: Option<String>,
    /// Every slot is up again after failures.
    pub recovered: Option<Recovered>,
}

/// A connection went down ([`SlotTable::on_down`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownEvent {
    /// The AZ of the stream it had open, if any (the gauge per AZ moves down by one).
    pub closed_az: Option<String>,
    /// A failure (not a move, a recycle, a panic or a reset): logged, counted, and a reason to
    /// re-resolve.
    pub failed: bool,
    /// The endpoint it had, for the log line: (address, AZ, consecutive failures).
    pub endpoint: Option<(String, String, u32)>,
    /// What to dial next (`None`: no endpoint known yet; the slot waits for discovery).
    pub connect: Option<Command>,
    /// The slot failed over to another Doppler, its queue with it.
    pub failover: bool,
}

/// A slot reported a stall ([`SlotTable::on_stalled`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallEvent {
    /// Another endpoint is usable: the slot gives up its stream and moves.
    pub abandon: Option<Command>,
    /// The stalled Doppler: (address, AZ).
    pub endpoint: (String, String),
}

/// The slot table: every slot's endpoint and state, and the balancer they are assigned from.
#[derive(Debug)]
pub struct SlotTable {
    balancer: Balancer,
    slots: Vec<Slot>,
    /// A return-home probe is under way (it is the tick's move until it answers).
    probing: bool,
    /// The last set of endpoints (sorted), to tell whether a resolution changed anything.
    known: Vec<Endpoint>,
    /// Every connection is recycled after about this long (±25%, so a fleet's connections do not
    /// recycle in step); `None` = never.
    recycle_interval: Option<Duration>,
    /// How long a stalled Doppler, or one that refuses every stream, is held out.
    stall_hold: Duration,
    outage: Outage,
}

impl SlotTable {
    /// `slots` slots over `balancer`'s endpoints (`known`; empty until discovery answers).
    pub fn new(
        balancer: Balancer,
        slots: usize,
        known: Vec<Endpoint>,
        recycle_interval: Option<Duration>,
        stall_hold: Duration,
    ) -> Self {
        Self {
            balancer,
            slots: vec![Slot::default(); slots],
            probing: false,
            known,
            recycle_interval,
            stall_hold,
            outage: Outage::default(),
        }
    }

    /// The last set of endpoints taken (sorted).
    pub fn known(&self) -> &[Endpoint] {
        &self.known
    }

    /// The first assignments: every slot dials, or waits for discovery (`discovered`).
    pub fn start(&mut self, discovered: bool, now: Instant) -> Vec<Command> {
        if discovered {
            self.slots.iter_mut().for_each(|s| s.pending = true);
            return Vec::new();
        }
        (0..self.slots.len())
            .filter_map(|slot| self.connect(slot, now))
            .collect()
    }

    /// Gives `slot` an endpoint: the [`Command::Connect`], or `None` when no endpoint is known
    /// yet (the slot waits for the next resolution).
    fn connect(&mut self, slot: usize, now: Instant) -> Option<Command> {
        if let Some(old) = self.slots[slot].assigned.take() {
            self.balancer.release(old);
        }
        let Some(a) = self.balancer.assign(now) else {
            self.slots[slot].pending = true;
            return None;
        };
        let s = &mut self.slots[slot];
        s.pending = false;
        s.assigned = Some(a.endpoint);
        let ep = self.balancer.endpoint(a.endpoint);
        Some(Command::Connect {
            slot,
            endpoint: a.endpoint,
            addr: ep.addr.clone(),
            az: ep.az.clone(),
            delay: a.delay,
        })
    }

    /// `slot`'s stream to `endpoint` is open; `held` envelopes wait in the slot queues (for the
    /// recovery's report). Its periodic recycle falls due at a `random` point of the middle half
    /// of `recycle_interval` around it.
    pub fn on_up(
        &mut self,
        slot: usize,
        endpoint: usize,
        held: usize,
        now: Instant,
        random: u64,
    ) -> UpEvent {
        let recycle_at = self.recycle_interval.map(|i| {
            let quarter = (i / 4).as_nanos().max(1) as u64;
            now + i - Duration::from_nanos(quarter) + Duration::from_nanos(random % (2 * quarter))
        });
        // A stale Connect may have won a race with a newer one: trust what actually connected.
        if self.slots[slot].assigned != Some(endpoint) {
            if let Some(old) = self.slots[slot].assigned.replace(endpoint) {
                self.balancer.release(old);
            }
            self.balancer.claim(endpoint);
        }
        let az = self.balancer.endpoint(endpoint).az.clone();
        let replaced_az = self.slots[slot]
            .up
            .replace(Up {
                endpoint,
                az: az.clone(),
                recycle_at,
            })
            .map(|u| u.az);
        let up = self.up_count();
        UpEvent {
            az,
            replaced_az,
            recovered: self.outage.on_up(up, self.slots.len(), held, now),
        }
    }

    /// `slot`'s connection actor restarted (`cause`), after its connection had been up for
    /// `lived`: what it had is released and it gets its next endpoint.
    pub fn on_down(
        &mut self,
        slot: usize,
        cause: RestartCause,
        lived: Duration,
        now: Instant,
        random: u64,
    ) -> DownEvent {
        let closed_az = self.slots[slot].up.take().map(|u| u.az);
        // A recycled, reset, panicked or killed actor says nothing about its Doppler; a stalled
        // one was already charged when the supervisor abandoned it.
        let failed = !matches!(
            cause,
            RestartCause::Killed
                | RestartCause::Recycled
                | RestartCause::Panic
                | RestartCause::SupervisorReset
        );
        let previous = self.slots[slot].assigned;
        let mut endpoint = None;
        if let Some(ep) = previous {
            // A stalled connection lived long by definition: that must not clear the hold the
            // stall just put on its Doppler.
            if lived >= HEALTHY_AFTER && cause != RestartCause::Stalled {
                self.balancer.on_healthy(ep);
            }
            if failed && cause != RestartCause::Stalled {
                // A Doppler that takes the dial (TCP, TLS, HTTP/2) but fails the stream at once,
                // again: the return-home probe, a dial, cannot tell it from a healthy one, and
                // would draw a slot back to it every few hundred milliseconds, each time losing
                // that slot's window. Hold it out as a stalled one is held, if another endpoint
                // is usable (holding the only one would only delay its traffic).
                let refused = matches!(
                    cause,
                    RestartCause::StreamFailed | RestartCause::StreamClosed
                ) && lived < HEALTHY_AFTER;
                if refused
                    && self.balancer.failures(ep) > 0
                    && self.balancer.has_alternative(ep, now)
                {
                    self.balancer.on_stall(ep, now, random, self.stall_hold);
                } else {
                    self.balancer.on_failure(ep, now, random);
                }
            }
            if failed {
                self.outage.on_failure(now);
                let e = self.balancer.endpoint(ep);
                endpoint = Some((e.addr.clone(), e.az.clone(), self.balancer.failures(ep)));
            }
        }
        let connect = self.connect(slot, now);
        let next = self.slots[slot].assigned;
        DownEvent {
            closed_az,
            failed,
            endpoint,
            failover: failed && previous.is_some() && next.is_some() && next != previous,
            connect,
        }
    }

    /// `slot` reported its stream to `endpoint` stalled. Moving costs what the stream had in
    /// flight, so it is worth it only if another endpoint is usable; otherwise the connection
    /// stays (the Doppler may resume). `None` when the report is stale (the slot moved on).
    pub fn on_stalled(
        &mut self,
        slot: usize,
        endpoint: usize,
        now: Instant,
        random: u64,
    ) -> Option<StallEvent> {
        let ep = self.slots[slot].assigned.filter(|&e| e == endpoint)?;
        let abandon = self.balancer.has_alternative(ep, now).then(|| {
            self.balancer.on_stall(ep, now, random, self.stall_hold);
            Command::Abandon { slot, endpoint: ep }
        });
        let e = self.balancer.endpoint(ep);
        Some(StallEvent {
            abandon,
            endpoint: (e.addr.clone(), e.az.clone()),
        })
    }

    /// Takes `endpoints` as the Doppler set (resolved, or a reloaded fixed list): slots on one
    /// that left move off it at the next ticks; slots waiting for an endpoint dial. Returns
    /// whether the set changed, and what to dial.
    pub fn use_endpoints(
        &mut self,
        endpoints: Vec<Endpoint>,
        now: Instant,
    ) -> (bool, Vec<Command>) {
        let changed = endpoints != self.known;
        if changed {
            self.known = endpoints.clone();
            self.balancer.update_endpoints(endpoints);
        }
        let waiting: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].pending)
            .collect();
        let dials = waiting
            .into_iter()
            .filter_map(|s| self.connect(s, now))
            .collect();
        (changed, dials)
    }

    /// The tick's move, at most one (see the module documentation for the order). The first
    /// slot up in another AZ asks for a probe of the local endpoint it would get, and the
    /// probe is the tick's move until [`SlotTable::on_probe`] answers.
    pub fn rebalance(&mut self, now: Instant) -> Option<Command> {
        let on = |t: &Self, endpoint: usize| {
            (0..t.slots.len()).find(|&s| {
                t.slots[s]
                    .up
                    .as_ref()
                    .is_some_and(|u| u.endpoint == endpoint)
            })
        };
        // 1. Off a Doppler that left DNS.
        for e in self.balancer.retired_with_slots() {
            if let Some(slot) = on(self, e) {
                return Some(Command::Recycle {
                    slot,
                    why: Move::Retired,
                });
            }
        }
        // 2. Home to the local AZ, after a probe.
        if self.probing {
            return None;
        }
        if let Some(away) = (0..self.slots.len()).find(|&s| self.is_away(s)) {
            if let Some(local) = self.balancer.local_candidate(now) {
                self.probing = true;
                return Some(Command::Probe {
                    away,
                    local,
                    addr: self.balancer.endpoint(local).addr.clone(),
                });
            }
        }
        // 3. Onto an unused Doppler.
        if let Some(slot) = self.balancer.spread_move(now).and_then(|e| on(self, e)) {
            return Some(Command::Recycle {
                slot,
                why: Move::Spread,
            });
        }
        // 4. Periodic recycle.
        let due = (0..self.slots.len()).find(|&s| {
            self.slots[s]
                .up
                .as_ref()
                .and_then(|u| u.recycle_at)
                .is_some_and(|t| t <= now)
        })?;
        if let Some(u) = self.slots[due].up.as_mut() {
            u.recycle_at = None;
        }
        Some(Command::Recycle {
            slot: due,
            why: Move::Periodic,
        })
    }

    /// The probe of endpoint `local` (address `addr`) for slot `away` answered (`reachable`): the
    /// move home, if the slot is still away and the endpoint is still the one probed.
    pub fn on_probe(
        &mut self,
        away: usize,
        local: usize,
        addr: &str,
        reachable: bool,
        now: Instant,
        random: u64,
    ) -> Option<Command> {
        self.probing = false;
        // DNS may have retired the endpoint meanwhile and its index gone to another address.
        let same = !self.balancer.is_retired(local) && self.balancer.endpoint(local).addr == addr;
        if !reachable {
            if same {
                self.balancer.on_failure(local, now, random);
            }
            return None;
        }
        // Still away? (It may have failed over or been moved meanwhile.)
        self.is_away(away).then_some(Command::Recycle {
            slot: away,
            why: Move::Home,
        })
    }

    /// Whether `slot` has an open stream to an endpoint outside the local AZ.
    pub fn is_away(&self, slot: usize) -> bool {
        self.slots[slot]
            .up
            .as_ref()
            .is_some_and(|u| !self.balancer.is_local(u.endpoint))
    }

    /// Whether connections failed and not all are back yet (what [`SlotTable::on_up`]'s `held`
    /// is for).
    pub fn outage_ongoing(&self) -> bool {
        self.outage.ongoing()
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Slots with an open stream.
    pub fn up_count(&self) -> usize {
        self.slots.iter().filter(|s| s.up.is_some()).count()
    }

    /// Slots with an open stream outside the local AZ.
    pub fn away_count(&self) -> usize {
        (0..self.slots.len()).filter(|&s| self.is_away(s)).count()
    }

    /// Slots waiting for discovery to name a Doppler.
    pub fn pending_count(&self) -> usize {
        self.slots.iter().filter(|s| s.pending).count()
    }

    /// Endpoints that may get slots.
    pub fn live_endpoints(&self) -> usize {
        self.balancer.live_endpoints()
    }

    /// The endpoint `slot` holds, if any.
    pub fn assigned(&self, slot: usize) -> Option<usize> {
        self.slots[slot].assigned
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ep(i: usize, az: &str) -> Endpoint {
        Endpoint {
            addr: format!("10.0.0.{i}:8082"),
            az: az.into(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn table(endpoints: Vec<Endpoint>, slots: usize, seed: u64) -> SlotTable {
        let mut balancer = Balancer::empty("z1", ms(50), ms(150)).with_tie_break(seed | 1);
        balancer.update_endpoints(endpoints.clone());
        SlotTable::new(balancer, slots, endpoints, Some(ms(600_000)), ms(5_000))
    }

    /// Plays the connections' side: every Connect comes up at once.
    fn connect_all(t: &mut SlotTable, commands: Vec<Command>, now: Instant) {
        for c in commands {
            if let Command::Connect { slot, endpoint, .. } = c {
                t.on_up(slot, endpoint, 0, now, 0);
            }
        }
    }

    #[test]
    fn a_fixed_list_dials_every_slot_and_discovery_waits() {
        let now = Instant::now();
        let mut t = table(vec![ep(0, "z1"), ep(1, "z1")], 3, 7);
        let dials = t.start(false, now);
        assert_eq!(dials.len(), 3);
        let mut d = table(vec![], 3, 7);
        assert!(d.start(true, now).is_empty());
        assert_eq!(d.pending_count(), 3);
        let (changed, dials) = d.use_endpoints(vec![ep(0, "z1")], now);
        assert!(changed);
        assert_eq!(
            dials.len(),
            3,
            "every waiting slot dials once there is an endpoint"
        );
        assert_eq!(d.pending_count(), 0);
    }

    #[test]
    fn a_probe_is_the_ticks_move_until_it_answers_then_the_slot_goes_home() {
        let now = Instant::now();
        let mut t = table(vec![ep(0, "z1"), ep(1, "z2")], 1, 3);
        let dials = t.start(false, now);
        // The local endpoint fails: the slot lands in the other AZ.
        connect_all(&mut t, dials, now);
        let down = t.on_down(0, RestartCause::StreamFailed, ms(10), now, 0);
        assert!(down.failed);
        connect_all(&mut t, down.connect.into_iter().collect(), now);
        assert!(t.is_away(0));
        let later = now + ms(1_000);
        let probe = t.rebalance(later);
        let Some(Command::Probe { away, local, addr }) = probe else {
            panic!("a probe: {probe:?}")
        };
        assert_eq!(
            t.rebalance(later),
            None,
            "one move at a time: the probe is under way"
        );
        assert_eq!(
            t.on_probe(away, local, &addr, true, later, 0),
            Some(Command::Recycle {
                slot: 0,
                why: Move::Home
            })
        );
    }

    #[test]
    fn a_failure_then_every_slot_back_is_a_recovery() {
        let now = Instant::now();
        let mut t = table(vec![ep(0, "z1")], 2, 1);
        let dials = t.start(false, now);
        connect_all(&mut t, dials, now);
        let down = t.on_down(1, RestartCause::StreamFailed, ms(5_000), now, 0);
        let Some(Command::Connect { endpoint, .. }) = down.connect else {
            panic!("reconnects")
        };
        let up = t.on_up(1, endpoint, 42, now + ms(300), 0);
        assert_eq!(up.recovered.map(|r| (r.failures, r.held)), Some((1, 42)));
    }

    /// What can happen to a slot table, for the property tests.
    #[derive(Debug, Clone)]
    enum Event {
        Down(usize, RestartCause, u64),
        Stalled(usize),
        Tick,
        ProbeAnswer(bool),
        Endpoints(Vec<usize>),
        Wait(u64),
    }

    fn any_event(slots: usize) -> impl Strategy<Value = Event> {
        let cause = prop_oneof![
            Just(RestartCause::ConnectFailed),
            Just(RestartCause::StreamFailed),
            Just(RestartCause::StreamClosed),
            Just(RestartCause::Recycled),
            Just(RestartCause::Killed),
            Just(RestartCause::Panic),
        ];
        prop_oneof![
            (0..slots, cause, 0u64..3_000).prop_map(|(s, c, l)| Event::Down(s, c, l)),
            (0..slots).prop_map(Event::Stalled),
            Just(Event::Tick),
            any::<bool>().prop_map(Event::ProbeAnswer),
            prop::collection::vec(0usize..6, 1..6).prop_map(Event::Endpoints),
            (1u64..2_000).prop_map(Event::Wait),
        ]
    }

    /// Endpoint `i` of the pool the tests draw from: even ones local.
    fn pool(i: usize) -> Endpoint {
        ep(i, if i.is_multiple_of(2) { "z1" } else { "z2" })
    }

    proptest! {
        /// Under any sequence of failures, stalls, resolutions, probes and ticks:
        /// - every slot holds an endpoint whenever one is known;
        /// - a slot that gives up a stalled Doppler is not sent straight back to it, and no slot
        ///   dials a stalled Doppler before its hold ends (one that leaves the set and comes back
        ///   starts afresh);
        /// - each tick makes at most one move (by type), and while a probe is under way only the
        ///   move off a Doppler that left DNS.
        #[test]
        fn the_table_keeps_its_promises(
            initial in prop::collection::vec(0usize..6, 1..5),
            slots in 1usize..5,
            seed in any::<u64>(),
            events in prop::collection::vec(any_event(4), 0..60),
        ) {
            let mut now = Instant::now();
            let endpoints: Vec<Endpoint> = initial.iter().map(|&i| pool(i)).collect();
            let mut t = table(endpoints, slots, seed);
            let dials = t.start(false, now);
            connect_all(&mut t, dials, now);
            let mut probe: Option<(usize, usize, String)> = None;
            // Stalled endpoints (by address: indices are reused) and until when they are held.
            let mut held: Vec<(String, Instant)> = Vec::new();
            let check = |held: &[(String, Instant)], c: &Option<Command>, now: Instant| {
                if let Some(Command::Connect { addr, delay, .. }) = c {
                    for (a, until) in held {
                        if a == addr && now + *delay < *until {
                            return Err(format!("{addr} dialled {delay:?} from now, held until {until:?}"));
                        }
                    }
                }
                Ok(())
            };
            for event in events {
                match event {
                    Event::Down(s, cause, lived) if s < slots => {
                        let down = t.on_down(s, cause, ms(lived), now, seed);
                        prop_assert_eq!(check(&held, &down.connect, now), Ok(()));
                        connect_all(&mut t, down.connect.into_iter().collect(), now);
                    }
                    Event::Stalled(s) if s < slots => {
                        if let Some(ep) = t.assigned(s) {
                            let stall = t.on_stalled(s, ep, now, seed).expect("current");
                            if let Some(Command::Abandon { slot, endpoint }) = stall.abandon {
                                held.push((stall.endpoint.0.clone(), now + ms(5_000)));
                                let down = t.on_down(slot, RestartCause::Stalled, ms(3_000), now, seed);
                                if let Some(Command::Connect { endpoint: next, .. }) = &down.connect {
                                    prop_assert_ne!(*next, endpoint, "not straight back to the stalled one");
                                }
                                connect_all(&mut t, down.connect.into_iter().collect(), now);
                            }
                        }
                    }
                    Event::Tick => {
                        let was_probing = probe.is_some();
                        match t.rebalance(now) {
                            Some(Command::Probe { away, local, addr }) => {
                                prop_assert!(!was_probing, "one probe at a time");
                                probe = Some((away, local, addr));
                            }
                            Some(Command::Recycle { slot, why }) => {
                                prop_assert!(
                                    !was_probing || why == Move::Retired,
                                    "{:?} while a probe is under way", why
                                );
                                let down = t.on_down(slot, RestartCause::Recycled, ms(2_000), now, seed);
                                connect_all(&mut t, down.connect.into_iter().collect(), now);
                            }
                            Some(other) => prop_assert!(false, "a tick cannot {:?}", other),
                            None => {}
                        }
                    }
                    Event::ProbeAnswer(reachable) => {
                        if let Some((away, local, addr)) = probe.take() {
                            if let Some(Command::Recycle { slot, .. }) =
                                t.on_probe(away, local, &addr, reachable, now, seed)
                            {
                                let down = t.on_down(slot, RestartCause::Recycled, ms(2_000), now, seed);
                                connect_all(&mut t, down.connect.into_iter().collect(), now);
                            }
                        }
                    }
                    Event::Endpoints(list) => {
                        let list: Vec<Endpoint> = list.iter().map(|&i| pool(i)).collect();
                        held.retain(|(a, _)| list.iter().any(|e| e.addr == *a));
                        let (_, dials) = t.use_endpoints(list, now);
                        for d in &dials {
                            prop_assert_eq!(check(&held, &Some(d.clone()), now), Ok(()));
                        }
                        connect_all(&mut t, dials, now);
                    }
                    Event::Wait(n) => now += ms(n),
                    _ => {}
                }
                if t.live_endpoints() > 0 {
                    for s in 0..slots {
                        prop_assert!(t.assigned(s).is_some(), "slot {} has no endpoint", s);
                    }
                }
            }
        }

        /// Slots over endpoints that are all local and usable land on distinct ones while
        /// there are enough, and spread evenly otherwise.
        #[test]
        fn slots_spread_over_distinct_dopplers(n in 1usize..8, slots in 1usize..8, seed in any::<u64>()) {
            let now = Instant::now();
            let mut t = table((0..n).map(|i| ep(i, "z1")).collect(), slots, seed);
            let dials = t.start(false, now);
            let mut per = vec![0usize; n];
            for c in dials {
                if let Command::Connect { endpoint, .. } = c {
                    per[endpoint] += 1;
                }
            }
            let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "{:?}", per);
        }
    }
}
