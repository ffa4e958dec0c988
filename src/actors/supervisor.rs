//! The supervisor actor: starts one supervised connection actor per slot, and carries out what the
//! slot table ([`SlotTable`], plain logic in `routing::slots`) decides: which Doppler each slot
//! dials, what follows a connection coming up, failing or stalling, and the one graceful move per
//! `rebalance_interval`. The actor owns the effects: messages to the connections, the probe dial,
//! DNS resolution (every `resolve_interval` and after a failure), metrics and rate-limited logs
//! (an hour without any Doppler writes a bounded number of lines).
//!
//! Moves are graceful ([`Recycle`]: the stream ends, the Doppler acknowledges, the slot
//! reconnects), so they cost no envelopes.
//!
//! A panic in any of its handlers is caught ([`super::guard`]): the supervisor starts over from a
//! fresh slot table in a new generation and sends every connection [`Reset`]. Each ends its stream
//! gracefully and reports in again; reports from the old generation are ignored, since their
//! endpoint numbers belonged to the table that was thrown away. No envelope is lost by it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;

use super::doppler_connection::{ConnectionSetup, DopplerConnection};
use super::guard::catch;
use super::messages::{
    Abandon, Connect, ConnectionDown, ConnectionUp, DumpState, Recycle, Reset, SetDial,
    SetDopplers, Stalled,
};
use crate::envelope::queue::EgressQueue;
use crate::grpc::egress::{dial, DialSettings, StreamSettings};
use crate::routing::balancer::{Balancer, Endpoint};
use crate::routing::discovery::{Discovery, DiscoveryError};
use crate::routing::slots::{Command, SlotTable};
use crate::routing::Dopplers;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{ActorName, Ledger};

const ME: ActorName = ActorName::Supervisor;

/// A failure triggers a re-resolution at most this often (the periodic one runs regardless).
const RESOLVE_AFTER_FAILURE_EVERY: Duration = Duration::from_secs(1);

/// How many progress timeouts a Doppler that stopped reading (or refuses every stream) is kept
/// out of the way: it accepts connections, so a probe alone would send the slot straight back.
const STALL_HOLD_TIMEOUTS: u32 = 10;

pub struct DopplerSupervisor {
    /// Every slot's endpoint and state, and the policy (`routing::slots`).
    table: SlotTable,
    /// Makes the empty table a panic starts over from.
    fresh_table: Box<dyn Fn() -> SlotTable>,
    /// Bumped when the supervisor starts over; connections report in the generation they were
    /// last given, and reports from an older one are ignored.
    generation: u64,
    slots: Vec<Addr<DopplerConnection>>,
    queues: Vec<Arc<EgressQueue>>,
    rebalance_interval: Duration,
    /// What the connections share; its dial settings also probe a local endpoint before a
    /// connection is moved back to it.
    setup: Arc<ConnectionSetup>,
    discovery: Option<Arc<Discovery>>,
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
    recoveries: RateLimit,
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
        // Never 0, which would keep the list's order.
        let tie_break = crate::entropy::random_u64() | 1;
        let balancer = Balancer::empty(&s.local_az, s.backoff_initial, s.backoff_max)
            .with_tie_break(tie_break);
        let (known, discovery, resolve_interval) = match s.dopplers {
            // A fixed list is known from the start; a resolved set once DNS answers.
            Dopplers::Static(list) => (list, None, Duration::ZERO),
            Dopplers::Discovered {
                discovery,
                interval,
            } => (Vec::new(), Some(discovery), interval),
        };
        let (recycle, hold) = (s.recycle_interval, s.progress_timeout * STALL_HOLD_TIMEOUTS);
        let fresh_table =
            move || SlotTable::new(balancer.clone(), connections, Vec::new(), recycle, hold);
        let mut table = fresh_table();
        table.use_endpoints(known, Instant::now());
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
                table,
                fresh_table: Box::new(fresh_table),
                generation: 0,
                slots: slots.clone(),
                queues: s.queues,
                rebalance_interval: s.rebalance_interval,
                setup,
                discovery,
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
                recoveries: RateLimit::new(Duration::from_secs(30)),
            }
        });
        (sup, slots)
    }

    /// Carries out what the slot table decided.
    fn run(&mut self, command: Command, ctx: &mut Context<Self>) {
        // Every one is a control message (connection mailboxes carry nothing else): `do_send`,
        // so it gets through whatever the mailbox holds.
        match command {
            Command::Connect {
                slot,
                endpoint,
                addr,
                az,
                delay,
            } => self.slots[slot].do_send(Connect {
                generation: self.generation,
                endpoint,
                addr,
                az,
                delay,
            }),
            Command::Recycle { slot, why } => {
                tracing::debug!(slot, ?why, "moving a connection");
                self.slots[slot].do_send(Recycle);
            }
            Command::Abandon { slot, endpoint } => {
                self.slots[slot].do_send(Abandon { endpoint });
            }
            Command::Probe { away, local, addr } => {
                // A full mTLS dial, so a still-dead AZ costs the running connections nothing.
                let settings = self.setup.dial.read().clone();
                let target = addr.clone();
                let probe = async move { dial(&target, &settings).await.is_ok() };
                let generation = self.generation;
                ctx.spawn(
                    wrap_future(probe).map(move |reachable, act: &mut Self, ctx| {
                        if act.generation != generation {
                            return;
                        }
                        act.guarded(ctx, |act, ctx| {
                            let now = Instant::now();
                            let random = crate::entropy::random_u64();
                            if let Some(c) = act
                                .table
                                .on_probe(away, local, &addr, reachable, now, random)
                            {
                                act.run(c, ctx);
                            }
                        });
                    }),
                );
            }
        }
    }

    /// Runs `f`; a panic in it makes the supervisor start over ([`DopplerSupervisor::reset`]).
    fn guarded(&mut self, ctx: &mut Context<Self>, f: impl FnOnce(&mut Self, &mut Context<Self>)) {
        if let Err(panic) = catch(|| f(self, ctx)) {
            panic.report(ME, self.setup.ledger.metrics());
            self.reset(ctx);
        }
    }

    /// Starts over after a panic: a fresh slot table over the last known Dopplers, in a new
    /// generation. Every connection is told to end its stream gracefully and report in; each
    /// then gets its Doppler from the fresh table as it reports.
    fn reset(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        self.stop_resolving(ctx);
        let known = self.table.known().to_vec();
        self.table = (self.fresh_table)();
        // Nothing to dial yet: no slot is waiting until it reports in.
        let _ = self.table.use_endpoints(known, Instant::now());
        // Connections count themselves in again as they come up in the new generation.
        self.setup.ledger.metrics().reset_connections_by_az();
        for slot in &self.slots {
            // Control message: it must get through whatever the mailbox holds.
            slot.do_send(Reset {
                generation: self.generation,
            });
        }
        if self.discovery.is_some() {
            self.start_resolving(ctx);
        }
        tracing::warn!(
            generation = self.generation,
            connections = self.slots.len(),
            "the supervisor started over from fresh state; every connection reconnects gracefully"
        );
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
        self.lookup = Some(
            ctx.spawn(wrap_future(lookup).map(|res, act: &mut Self, ctx| {
                act.guarded(ctx, |act, ctx| act.on_resolved(res, ctx));
            })),
        );
    }

    fn on_resolved(&mut self, res: Result<Vec<Endpoint>, DiscoveryError>, ctx: &mut Context<Self>) {
        self.resolving = false;
        self.lookup = None;
        match res {
            Ok(endpoints) => self.use_endpoints(endpoints, ctx),
            Err(e) => {
                // Keep the Dopplers we know: DNS trouble must not take working connections down.
                if let Some(times) = self.resolve_failures.check() {
                    tracing::warn!(error = %e, failures = times, "cannot resolve the Dopplers; keeping the last known set");
                }
            }
        }
    }

    /// Takes `endpoints` as the Doppler set (resolved, or a reloaded fixed list).
    fn use_endpoints(&mut self, endpoints: Vec<Endpoint>, ctx: &mut Context<Self>) {
        let (total, local) = (
            endpoints.len(),
            endpoints.iter().filter(|e| e.az == self.local_az).count(),
        );
        let before = self.table.live_endpoints();
        let (changed, dials) = self.table.use_endpoints(endpoints, Instant::now());
        if changed {
            tracing::info!(dopplers = total, local, before, "doppler set changed");
        }
        for c in dials {
            self.run(c, ctx);
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
        self.resolve_timer = Some(ctx.run_interval(self.resolve_interval, |act, ctx| {
            act.guarded(ctx, |act, ctx| act.resolve(ctx));
        }));
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
}

impl Actor for DopplerSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.guarded(ctx, |act, ctx| {
            let discovered = act.discovery.is_some();
            for c in act.table.start(discovered, Instant::now()) {
                act.run(c, ctx);
            }
            if discovered {
                act.start_resolving(ctx);
            }
        });
        ctx.run_interval(self.rebalance_interval, |act, ctx| {
            act.guarded(ctx, |act, ctx| {
                if let Some(c) = act.table.rebalance(Instant::now()) {
                    act.run(c, ctx);
                }
            });
        });
    }
}

impl Handler<ConnectionUp> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionUp, ctx: &mut Context<Self>) {
        // A report from before the supervisor started over names endpoints it forgot.
        if msg.generation != self.generation {
            return;
        }
        self.guarded(ctx, move |act, _| {
            // Only a recovery reports what was held: no need to lock every queue otherwise.
            let held = if act.table.outage_ongoing() {
                act.queues.iter().map(|q| q.envelopes()).sum()
            } else {
                0
            };
            let up = act.table.on_up(
                msg.slot,
                msg.endpoint,
                held,
                Instant::now(),
                crate::entropy::random_u64(),
            );
            let metrics = act.setup.ledger.metrics();
            metrics.connection_in_az(&up.az, 1);
            if let Some(old) = &up.replaced_az {
                metrics.connection_in_az(old, -1);
            }
            if let Some(times) = act.connects.check() {
                let b = act.table.balancer();
                let ep = b.endpoint(msg.endpoint);
                tracing::info!(
                    slot = msg.slot,
                    doppler = %ep.addr,
                    az = %ep.az,
                    local = b.is_local(msg.endpoint),
                    connections_opened = times,
                    "doppler stream open"
                );
            }
            if let Some(back) = up.recovered {
                if let Some(times) = act.recoveries.check() {
                    tracing::info!(
                        down_ms = back.down_for.as_millis() as u64,
                        failures = back.failures,
                        held_envelopes = back.held,
                        connections = act.table.up_count(),
                        recoveries = times,
                        "doppler connections back after failures"
                    );
                }
            }
        });
    }
}

impl Handler<ConnectionDown> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionDown, ctx: &mut Context<Self>) {
        // A report from before the supervisor started over names endpoints it forgot.
        if msg.generation != self.generation {
            return;
        }
        self.guarded(ctx, move |act, ctx| {
            let down = act.table.on_down(
                msg.slot,
                msg.cause,
                msg.lived,
                Instant::now(),
                crate::entropy::random_u64(),
            );
            let metrics = act.setup.ledger.metrics();
            if let Some(az) = &down.closed_az {
                metrics.connection_in_az(az, -1);
            }
            if let Some((addr, az, consecutive)) = &down.endpoint {
                if let Some(times) = act.failures.check() {
                    tracing::warn!(
                        slot = msg.slot,
                        doppler = %addr,
                        az = %az,
                        cause = msg.cause.name(),
                        failures = times,
                        consecutive,
                        "doppler connection lost; reconnecting with backoff"
                    );
                }
            }
            if down.failover {
                // The slot's queue goes with it: what was waiting for the failed Doppler is re-routed
                // to the next one instead of being dropped.
                metrics.failovers.fetch_add(1, Ordering::Relaxed);
                let queued = act.queues[msg.slot].batches() as u64;
                metrics
                    .rerouted_batches
                    .fetch_add(queued, Ordering::Relaxed);
            }
            if let Some(c) = down.connect {
                act.run(c, ctx);
            }
            if down.failed {
                act.resolve_after_failure(ctx);
            }
        });
    }
}

impl Handler<SetDopplers> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, SetDopplers(dopplers): SetDopplers, ctx: &mut Context<Self>) {
        self.guarded(ctx, move |act, ctx| match dopplers {
            Dopplers::Static(list) => {
                act.stop_resolving(ctx);
                act.discovery = None;
                act.use_endpoints(list, ctx);
            }
            Dopplers::Discovered {
                discovery,
                interval,
            } => {
                act.discovery = Some(discovery);
                act.resolve_interval = interval;
                act.start_resolving(ctx);
            }
        });
    }
}

impl Handler<SetDial> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, SetDial(dial): SetDial, ctx: &mut Context<Self>) {
        self.guarded(ctx, move |act, _| {
            *act.setup.dial.write() = dial;
        });
    }
}

impl Handler<DumpState> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, _: DumpState, ctx: &mut Context<Self>) {
        self.guarded(ctx, move |act, _| {
            let t = &act.table;
            tracing::info!(
                target: "metron::state",
                actor = "supervisor",
                local_az = %act.local_az,
                discovery = act.discovery.is_some(),
                dopplers = t.live_endpoints(),
                slots = t.slots(),
                slots_up = t.up_count(),
                slots_away_from_local_az = t.away_count(),
                slots_waiting_for_dopplers = t.pending_count(),
                "state"
            );
        });
    }
}

impl Handler<Stalled> for DopplerSupervisor {
    type Result = ();

    /// Moving a stalled slot costs what its stream had in flight (counted as `connection_lost`);
    /// worth it only if another endpoint is usable. Otherwise keep the connection: the Doppler
    /// may resume.
    fn handle(&mut self, msg: Stalled, ctx: &mut Context<Self>) {
        // A report from before the supervisor started over names endpoints it forgot.
        if msg.generation != self.generation {
            return;
        }
        self.guarded(ctx, move |act, ctx| {
            let now = Instant::now();
            let random = crate::entropy::random_u64();
            // Stale if the slot has moved on since the report.
            let Some(stall) = act.table.on_stalled(msg.slot, msg.endpoint, now, random) else {
                return;
            };
            let moving = stall.abandon.is_some();
            if let Some(times) = act.stalls.check() {
                let (addr, az) = &stall.endpoint;
                tracing::warn!(
                    slot = msg.slot,
                    doppler = %addr,
                    az = %az,
                    moving,
                    stalls = times,
                    "doppler stopped reading"
                );
            }
            if let Some(c) = stall.abandon {
                act.run(c, ctx);
            }
        });
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, ctx: &mut Context<Self>) {
        if msg.escape {
            super::guard::chaos_panic(ME);
        }
        self.guarded(ctx, |_, _| super::guard::chaos_panic(ME));
    }
}
