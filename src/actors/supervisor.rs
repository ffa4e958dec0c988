//! The supervisor actor: starts one supervised connection actor per slot, tells each which Doppler
//! to dial (via the [`Balancer`]: local AZ first, spread, backoff), and re-assigns a slot whenever
//! its actor reports that it restarted. With DNS discovery it re-resolves the Doppler names every
//! `resolve_interval` and after a connection failure, and feeds the result to the balancer.
//!
//! Every `rebalance_interval` it makes at most one move, in this order of importance:
//! 1. a slot on a Doppler that left DNS is recycled (it reconnects elsewhere);
//! 2. a slot in another AZ goes back home once a local Doppler answers a probe dial;
//! 3. a slot on a doubled-up Doppler moves to an unused one (a scaled-up fleet gets used);
//! 4. a slot whose periodic recycle is due is recycled.
//!
//! Moves are graceful ([`Recycle`]: the stream ends, the Doppler acknowledges, the slot
//! reconnects), so they cost no envelopes. Warnings are rate-limited: an hour without any Doppler
//! writes a bounded number of lines.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;

use super::doppler_connection::{ConnectionSetup, DopplerConnection};
use super::messages::{
    Abandon, Connect, ConnectionDown, ConnectionUp, DumpState, Recycle, SetDial, SetDopplers,
    Stalled,
};
use crate::grpc::egress::{dial, DialSettings, EgressQueue, StreamSettings};
use crate::routing::balancer::{Balancer, Endpoint};
use crate::routing::discovery::{Discovery, DiscoveryError};
use crate::routing::outage::Outage;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{Ledger, RestartCause};

/// A connection that stayed up this long counts as healthy: its endpoint's backoff resets.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// A failure triggers a re-resolution at most this often (the periodic one runs regardless).
const RESOLVE_AFTER_FAILURE_EVERY: Duration = Duration::from_secs(1);

/// How many progress timeouts a Doppler that stopped reading is kept out of the return-home
/// probe: it accepts connections, so a probe alone would send the slot straight back to it.
const STALL_HOLD_TIMEOUTS: u32 = 10;

/// What the supervisor knows about one slot's open stream.
struct Up {
    endpoint: usize,
    az: String,
    /// When the periodic recycle is due; `None` = never.
    recycle_at: Option<Instant>,
}

pub struct DopplerSupervisor {
    balancer: Balancer,
    slots: Vec<Addr<DopplerConnection>>,
    queues: Vec<Arc<EgressQueue>>,
    /// The endpoint each slot holds in the balancer's count.
    assigned: Vec<Option<usize>>,
    /// Slots whose stream is open.
    up: Vec<Option<Up>>,
    /// Slots waiting for the first resolution (nothing to dial yet).
    pending: Vec<bool>,
    rebalance_interval: Duration,
    recycle_interval: Option<Duration>,
    progress_timeout: Duration,
    /// What the connections share; its dial settings also probe a local endpoint before a
    /// connection is moved back to it.
    setup: Arc<ConnectionSetup>,
    probing: bool,
    discovery: Option<Arc<Discovery>>,
    /// The last resolved set (sorted), to tell whether a resolution changed anything.
    known: Vec<Endpoint>,
    local_az: String,
    resolve_interval: Duration,
    /// The periodic resolution, while discovery is on (a reload may turn it on or off).
    resolve_timer: Option<SpawnHandle>,
    /// The lookup under way, cancelled when a reload changes the names: its answer would be
    /// for the old ones.
    lookup: Option<SpawnHandle>,
    resolving: bool,
    last_resolve: Option<Instant>,
    failures: RateLimit,
    connects: RateLimit,
    stalls: RateLimit,
    resolve_failures: RateLimit,
    /// Failures until every connection is back, for the recovery's log line.
    outage: Outage,
    recoveries: RateLimit,
}

/// Where the Dopplers come from.
pub enum Dopplers {
    /// A fixed list (`dopplers.endpoints`).
    Static(Vec<Endpoint>),
    /// DNS names, re-resolved every `interval` and after failures.
    Discovered {
        discovery: Arc<Discovery>,
        interval: Duration,
    },
}

/// What the supervisor needs to build its connections.
pub struct SupervisorSetup {
    pub local_az: String,
    pub dopplers: Dopplers,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub mailbox_capacity: usize,
    pub rebalance_interval: Duration,
    pub recycle_interval: Option<Duration>,
    pub dial: DialSettings,
    pub streams: StreamSettings,
    /// One queue per slot, created by the caller (the sequencer and signer share them).
    pub queues: Vec<Arc<EgressQueue>>,
    pub progress_timeout: Duration,
    pub ledger: Arc<Ledger>,
}

impl DopplerSupervisor {
    /// Starts the supervisor and its connection actors on the current arbiter; returns the
    /// supervisor and the connection actors, indexed by slot.
    pub fn launch(s: SupervisorSetup) -> (Addr<Self>, Vec<Addr<DopplerConnection>>) {
        let connections = s.queues.len();
        let mut slots = Vec::with_capacity(connections);
        // A fixed list is known from the start; a resolved set once DNS answers.
        let known = match &s.dopplers {
            Dopplers::Static(list) => list.clone(),
            Dopplers::Discovered { .. } => Vec::new(),
        };
        // Never 0, which would keep the list's order.
        let tie_break = crate::entropy::random_u64() | 1;
        let (balancer, discovery, resolve_interval) = match s.dopplers {
            Dopplers::Static(list) => (
                Balancer::new(&s.local_az, list, s.backoff_initial, s.backoff_max)
                    .with_tie_break(tie_break),
                None,
                Duration::ZERO,
            ),
            Dopplers::Discovered {
                discovery,
                interval,
            } => (
                Balancer::empty(&s.local_az, s.backoff_initial, s.backoff_max)
                    .with_tie_break(tie_break),
                Some(discovery),
                interval,
            ),
        };
        let sup = DopplerSupervisor::create(|ctx| {
            let me = ctx.address();
            let setup = Arc::new(ConnectionSetup {
                dial: parking_lot::RwLock::new(s.dial),
                streams: s.streams,
                progress_timeout: s.progress_timeout,
                ledger: s.ledger,
                down: me.clone().recipient(),
                up: me.clone().recipient(),
                stalled: me.recipient(),
            });
            for (slot, queue) in s.queues.iter().enumerate() {
                let shared = setup.clone();
                let queue = queue.clone();
                let cap = s.mailbox_capacity;
                slots.push(actix::Supervisor::start(
                    move |c: &mut Context<DopplerConnection>| {
                        c.set_mailbox_capacity(cap);
                        DopplerConnection::new(slot, queue, shared)
                    },
                ));
            }
            DopplerSupervisor {
                balancer,
                slots: slots.clone(),
                queues: s.queues,
                assigned: vec![None; connections],
                up: (0..connections).map(|_| None).collect(),
                pending: vec![false; connections],
                rebalance_interval: s.rebalance_interval,
                recycle_interval: s.recycle_interval,
                progress_timeout: s.progress_timeout,
                setup,
                probing: false,
                discovery,
                known,
                local_az: s.local_az,
                resolve_interval,
                resolve_timer: None,
                lookup: None,
                resolving: false,
                last_resolve: None,
                failures: RateLimit::new(Duration::from_secs(30)),
                connects: RateLimit::new(Duration::from_secs(30)),
                stalls: RateLimit::new(Duration::from_secs(30)),
                resolve_failures: RateLimit::new(Duration::from_secs(60)),
                outage: Outage::default(),
                recoveries: RateLimit::new(Duration::from_secs(30)),
            }
        });
        (sup, slots)
    }

    /// At most one move per interval (see the module documentation for the order).
    fn rebalance(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let on = |act: &Self, endpoint: usize| {
            (0..act.slots.len())
                .find(|&s| act.up[s].as_ref().is_some_and(|u| u.endpoint == endpoint))
        };
        // 1. Off a Doppler that left DNS.
        for e in self.balancer.retired_with_slots() {
            if let Some(slot) = on(self, e) {
                tracing::debug!(slot, "moving a connection off a Doppler that left DNS");
                self.slots[slot].do_send(Recycle);
                return;
            }
        }
        // 2. Home to the local AZ.
        if self.try_return_home(ctx, now) {
            return;
        }
        // 3. Onto an unused Doppler.
        if let Some(slot) = self.balancer.spread_move(now).and_then(|e| on(self, e)) {
            tracing::debug!(slot, "moving a connection to spread the load");
            self.slots[slot].do_send(Recycle);
            return;
        }
        // 4. Periodic recycle.
        let due = (0..self.slots.len()).find(|&s| {
            self.up[s]
                .as_ref()
                .and_then(|u| u.recycle_at)
                .is_some_and(|t| t <= now)
        });
        if let Some(slot) = due {
            if let Some(u) = self.up[slot].as_mut() {
                u.recycle_at = None;
            }
            tracing::debug!(slot, "periodic recycle");
            self.slots[slot].do_send(Recycle);
        }
    }

    /// Moves one slot that is up in another AZ back home once a local endpoint answers a probe
    /// (a full mTLS dial, so a still-dead AZ costs the running connections nothing). Returns
    /// whether a probe is under way (the tick's move).
    fn try_return_home(&mut self, ctx: &mut Context<Self>, now: Instant) -> bool {
        if self.probing {
            return true;
        }
        let Some(away) = (0..self.slots.len()).find(|&s| self.is_away(s)) else {
            return false;
        };
        let Some(local) = self.balancer.local_candidate(now) else {
            return false;
        };
        self.probing = true;
        let addr = self.balancer.endpoint(local).addr.clone();
        let probed = addr.clone();
        let settings = self.setup.dial.read().clone();
        let probe = async move { dial(&addr, &settings).await.is_ok() };
        ctx.spawn(wrap_future(probe).map(move |reachable, act: &mut Self, _| {
            act.probing = false;
            // DNS may have retired the endpoint meanwhile and its index gone to another address.
            let same =
                !act.balancer.is_retired(local) && act.balancer.endpoint(local).addr == probed;
            if !reachable {
                if same {
                    act.balancer
                        .on_failure(local, Instant::now(), crate::entropy::random_u64());
                }
                return;
            }
            // Still away? (It may have failed over or been moved meanwhile.)
            if act.is_away(away) {
                tracing::debug!(slot = away, "moving a connection back to the local AZ");
                // Control message: it must get through even when the slot's mailbox is full.
                act.slots[away].do_send(Recycle);
            }
        }));
        true
    }

    /// Whether `slot` has an open stream to an endpoint outside the local AZ.
    fn is_away(&self, slot: usize) -> bool {
        self.up[slot]
            .as_ref()
            .is_some_and(|u| !self.balancer.is_local(u.endpoint))
    }

    /// Gives `slot` an endpoint and tells its actor to dial; returns the endpoint, or `None` when
    /// no endpoint is known yet (the slot waits for the next resolution).
    fn connect(&mut self, slot: usize) -> Option<usize> {
        if let Some(old) = self.assigned[slot].take() {
            self.balancer.release(old);
        }
        let Some(a) = self.balancer.assign(Instant::now()) else {
            self.pending[slot] = true;
            return None;
        };
        self.pending[slot] = false;
        self.assigned[slot] = Some(a.endpoint);
        // Control message: it must get through even when the slot's mailbox is full of data.
        let ep = self.balancer.endpoint(a.endpoint);
        self.slots[slot].do_send(Connect {
            endpoint: a.endpoint,
            addr: ep.addr.clone(),
            az: ep.az.clone(),
            delay: a.delay,
        });
        Some(a.endpoint)
    }

    /// Resolves the Doppler names now, unless a resolution is already under way.
    fn resolve(&mut self, ctx: &mut Context<Self>) {
        let Some(discovery) = self.discovery.clone() else {
            return;
        };
        if self.resolving {
            return;
        }
        self.resolving = true;
        self.last_resolve = Some(Instant::now());
        let lookup = async move { discovery.resolve().await };
        self.lookup =
            Some(ctx.spawn(wrap_future(lookup).map(|res, act: &mut Self, _| act.on_resolved(res))));
    }

    fn on_resolved(&mut self, res: Result<Vec<Endpoint>, DiscoveryError>) {
        self.resolving = false;
        self.lookup = None;
        let endpoints = match res {
            Ok(e) => e,
            Err(e) => {
                // Keep the Dopplers we know: DNS trouble must not take working connections down.
                if let Some(times) = self.resolve_failures.check() {
                    tracing::warn!(error = %e, failures = times, "cannot resolve the Dopplers; keeping the last known set");
                }
                return;
            }
        };
        self.use_endpoints(endpoints);
    }

    /// Takes `endpoints` as the Doppler set (resolved, or a reloaded fixed list): slots on one
    /// that left move off it at the next rebalance; slots waiting for an endpoint dial.
    fn use_endpoints(&mut self, endpoints: Vec<Endpoint>) {
        if endpoints != self.known {
            let local = endpoints.iter().filter(|e| e.az == self.local_az).count();
            tracing::info!(
                dopplers = endpoints.len(),
                local,
                before = self.known.len(),
                "doppler set changed"
            );
            self.known = endpoints.clone();
            self.balancer.update_endpoints(endpoints);
        }
        for slot in 0..self.slots.len() {
            if self.pending[slot] {
                self.connect(slot);
            }
        }
    }

    /// Stops the periodic resolution and cancels a lookup under way.
    fn stop_resolving(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.resolve_timer.take() {
            ctx.cancel_future(timer);
        }
        if let Some(lookup) = self.lookup.take() {
            ctx.cancel_future(lookup);
        }
        self.resolving = false;
    }

    /// Resolves now and every `resolve_interval` while discovery is on.
    fn start_resolving(&mut self, ctx: &mut Context<Self>) {
        self.stop_resolving(ctx);
        self.resolve(ctx);
        self.resolve_timer =
            Some(ctx.run_interval(self.resolve_interval, |act, ctx| act.resolve(ctx)));
    }

    /// A failure may mean the Doppler set changed: re-resolve, at most once a second.
    fn resolve_after_failure(&mut self, ctx: &mut Context<Self>) {
        let recent = self
            .last_resolve
            .is_some_and(|t| t.elapsed() < RESOLVE_AFTER_FAILURE_EVERY);
        if !recent {
            self.resolve(ctx);
        }
    }

    fn recycle_deadline(&self) -> Option<Instant> {
        // Uniform in [¾, 1¼] of the interval, so the connections of a fleet do not recycle in step.
        self.recycle_interval.map(|i| {
            let quarter = (i / 4).as_nanos().max(1) as u64;
            let jitter = Duration::from_nanos(crate::entropy::random_u64() % (2 * quarter));
            Instant::now() + i - Duration::from_nanos(quarter) + jitter
        })
    }
}

impl Actor for DopplerSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.discovery.is_some() {
            self.pending.iter_mut().for_each(|p| *p = true);
            self.start_resolving(ctx);
        } else {
            for slot in 0..self.slots.len() {
                self.connect(slot);
            }
        }
        ctx.run_interval(self.rebalance_interval, |act, ctx| act.rebalance(ctx));
    }
}

impl Handler<ConnectionUp> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionUp, _: &mut Context<Self>) {
        // A stale Connect may have won a race with a newer one: trust what actually connected.
        if self.assigned[msg.slot] != Some(msg.endpoint) {
            if let Some(old) = self.assigned[msg.slot].replace(msg.endpoint) {
                self.balancer.release(old);
            }
            self.balancer.claim(msg.endpoint);
        }
        let az = self.balancer.endpoint(msg.endpoint).az.clone();
        let metrics = self.setup.ledger.metrics();
        metrics.connection_in_az(&az, 1);
        let recycle_at = self.recycle_deadline();
        if let Some(old) = self.up[msg.slot].replace(Up {
            endpoint: msg.endpoint,
            az,
            recycle_at,
        }) {
            metrics.connection_in_az(&old.az, -1);
        }
        if let Some(times) = self.connects.check() {
            let ep = self.balancer.endpoint(msg.endpoint);
            tracing::info!(
                slot = msg.slot,
                doppler = %ep.addr,
                az = %ep.az,
                local = self.balancer.is_local(msg.endpoint),
                connections_opened = times,
                "doppler stream open"
            );
        }
        let up = self.up.iter().filter(|u| u.is_some()).count();
        let held = self.queues.iter().map(|q| q.envelopes()).sum();
        if let Some(back) = self
            .outage
            .on_up(up, self.slots.len(), held, Instant::now())
        {
            if let Some(times) = self.recoveries.check() {
                tracing::info!(
                    down_ms = back.down_for.as_millis() as u64,
                    failures = back.failures,
                    held_envelopes = back.held,
                    connections = up,
                    recoveries = times,
                    "doppler connections back after failures"
                );
            }
        }
    }
}

impl Handler<ConnectionDown> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionDown, ctx: &mut Context<Self>) {
        let ledger = self.setup.ledger.clone();
        let metrics = ledger.metrics();
        if let Some(old) = self.up[msg.slot].take() {
            metrics.connection_in_az(&old.az, -1);
        }
        // A killed or recycled actor says nothing about its Doppler; a stalled one was already
        // charged when the supervisor abandoned it.
        let failed = !matches!(msg.cause, RestartCause::Killed | RestartCause::Recycled);
        let previous = self.assigned[msg.slot];
        if let Some(ep) = previous {
            // A stalled connection lived long by definition: that must not clear the hold the
            // stall just put on its Doppler.
            if msg.lived >= HEALTHY_AFTER && msg.cause != RestartCause::Stalled {
                self.balancer.on_healthy(ep);
            }
            if failed && msg.cause != RestartCause::Stalled {
                let now = Instant::now();
                // A Doppler that takes the dial (TCP, TLS, HTTP/2) but fails the stream at once,
                // again: the return-home probe, a dial, cannot tell it from a healthy one, and
                // would draw a slot back to it every few hundred milliseconds, each time losing
                // that slot's window. Hold it out as a stalled one is held, if another endpoint
                // is usable (holding the only one would only delay its traffic).
                let refused = matches!(
                    msg.cause,
                    RestartCause::StreamFailed | RestartCause::StreamClosed
                ) && msg.lived < HEALTHY_AFTER;
                if refused
                    && self.balancer.failures(ep) > 0
                    && self.balancer.has_alternative(ep, now)
                {
                    let hold = self.progress_timeout * STALL_HOLD_TIMEOUTS;
                    self.balancer
                        .on_stall(ep, now, crate::entropy::random_u64(), hold);
                } else {
                    self.balancer
                        .on_failure(ep, now, crate::entropy::random_u64());
                }
            }
            if failed {
                self.outage.on_failure(Instant::now());
                if let Some(times) = self.failures.check() {
                    let e = self.balancer.endpoint(ep);
                    tracing::warn!(
                        slot = msg.slot,
                        doppler = %e.addr,
                        az = %e.az,
                        cause = msg.cause.name(),
                        failures = times,
                        consecutive = self.balancer.failures(ep),
                        "doppler connection lost; reconnecting with backoff"
                    );
                }
            }
        }
        let next = self.connect(msg.slot);
        if failed && previous.is_some() && next.is_some() && next != previous {
            // The slot's queue goes with it: what was waiting for the failed Doppler is re-routed
            // to the next one instead of being dropped.
            metrics.failovers.fetch_add(1, Ordering::Relaxed);
            let queued = self.queues[msg.slot].batches() as u64;
            metrics
                .rerouted_batches
                .fetch_add(queued, Ordering::Relaxed);
        }
        if failed {
            self.resolve_after_failure(ctx);
        }
    }
}

impl Handler<SetDopplers> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, SetDopplers(dopplers): SetDopplers, ctx: &mut Context<Self>) {
        match dopplers {
            Dopplers::Static(list) => {
                self.stop_resolving(ctx);
                self.discovery = None;
                self.use_endpoints(list);
            }
            Dopplers::Discovered {
                discovery,
                interval,
            } => {
                self.discovery = Some(discovery);
                self.resolve_interval = interval;
                self.start_resolving(ctx);
            }
        }
    }
}

impl Handler<SetDial> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, SetDial(dial): SetDial, _: &mut Context<Self>) {
        *self.setup.dial.write() = dial;
    }
}

impl Handler<DumpState> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let up = self.up.iter().filter(|u| u.is_some()).count();
        let away = (0..self.slots.len()).filter(|&s| self.is_away(s)).count();
        tracing::info!(
            target: "metron::state",
            actor = "supervisor",
            local_az = %self.local_az,
            discovery = self.discovery.is_some(),
            dopplers = self.balancer.live_endpoints(),
            slots = self.slots.len(),
            slots_up = up,
            slots_away_from_local_az = away,
            slots_waiting_for_dopplers = self.pending.iter().filter(|p| **p).count(),
            "state"
        );
    }
}

impl Handler<Stalled> for DopplerSupervisor {
    type Result = ();

    /// Moving a stalled slot costs what its stream had in flight (counted as `connection_lost`);
    /// worth it only if another endpoint is usable. Otherwise keep the connection: the Doppler
    /// may resume.
    fn handle(&mut self, msg: Stalled, _: &mut Context<Self>) {
        // Stale if the slot has moved on since the report.
        let Some(ep) = self.assigned[msg.slot].filter(|&e| e == msg.endpoint) else {
            return;
        };
        let now = Instant::now();
        let moving = self.balancer.has_alternative(ep, now);
        if moving {
            let hold = self.progress_timeout * STALL_HOLD_TIMEOUTS;
            self.balancer
                .on_stall(ep, now, crate::entropy::random_u64(), hold);
            // Control message: it must get through even when the slot's mailbox is full.
            self.slots[msg.slot].do_send(Abandon { endpoint: ep });
        }
        if let Some(times) = self.stalls.check() {
            let e = self.balancer.endpoint(ep);
            tracing::warn!(
                slot = msg.slot,
                doppler = %e.addr,
                az = %e.az,
                moving,
                stalls = times,
                "doppler stopped reading"
            );
        }
    }
}
