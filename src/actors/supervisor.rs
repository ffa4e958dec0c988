//! The supervisor actor: starts one supervised connection actor per slot, tells each which Doppler
//! to dial (via the [`Balancer`]: local AZ first, spread, backoff), and re-assigns a slot whenever
//! its actor reports that it restarted. Warnings are rate-limited: an hour without any Doppler
//! writes a bounded number of lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;

use super::doppler_connection::{ConnectionSetup, DopplerConnection};
use super::messages::{Abandon, Connect, ConnectionDown, ConnectionUp, Recycle, Stalled};
use crate::grpc::egress::{dial, DialSettings, EgressQueue, StreamSettings};
use crate::routing::balancer::Balancer;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{Ledger, RestartCause};

/// A connection that stayed up this long counts as healthy: its endpoint's backoff resets.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

pub struct DopplerSupervisor {
    balancer: Balancer,
    slots: Vec<Addr<DopplerConnection>>,
    /// The endpoint each slot holds in the balancer's count.
    assigned: Vec<Option<usize>>,
    /// Slots whose stream is open.
    up: Vec<bool>,
    rebalance_interval: Duration,
    /// What the connections share; its dial settings also probe a local endpoint before a
    /// connection is moved back to it.
    setup: Arc<ConnectionSetup>,
    probing: bool,
    failures: RateLimit,
    connects: RateLimit,
    stalls: RateLimit,
}

/// What the supervisor needs to build its connections.
pub struct SupervisorSetup {
    pub balancer: Balancer,
    pub mailbox_capacity: usize,
    pub rebalance_interval: Duration,
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
        let sup = DopplerSupervisor::create(|ctx| {
            let me = ctx.address();
            let setup = Arc::new(ConnectionSetup {
                dial: s.dial,
                streams: s.streams,
                progress_timeout: s.progress_timeout,
                ledger: s.ledger,
                down: me.clone().recipient(),
                up: me.clone().recipient(),
                stalled: me.recipient(),
            });
            for (slot, queue) in s.queues.into_iter().enumerate() {
                let shared = setup.clone();
                let cap = s.mailbox_capacity;
                slots.push(actix::Supervisor::start(
                    move |c: &mut Context<DopplerConnection>| {
                        c.set_mailbox_capacity(cap);
                        DopplerConnection::new(slot, queue, shared)
                    },
                ));
            }
            DopplerSupervisor {
                balancer: s.balancer,
                slots: slots.clone(),
                assigned: vec![None; connections],
                up: vec![false; connections],
                rebalance_interval: s.rebalance_interval,
                setup,
                probing: false,
                failures: RateLimit::new(Duration::from_secs(30)),
                connects: RateLimit::new(Duration::from_secs(30)),
                stalls: RateLimit::new(Duration::from_secs(30)),
            }
        });
        (sup, slots)
    }

    /// Moves one slot that is up in another AZ back home once a local endpoint answers a probe
    /// (a full mTLS dial, so a still-dead AZ costs the running connections nothing). One slot per
    /// interval, so a recovering AZ gets its connections back gradually.
    fn rebalance(&mut self, ctx: &mut Context<Self>) {
        if self.probing {
            return;
        }
        let Some(away) = (0..self.slots.len()).find(|&s| self.is_away(s)) else {
            return;
        };
        let Some(local) = self.balancer.local_candidate(Instant::now()) else {
            return;
        };
        self.probing = true;
        let addr = self.balancer.endpoint(local).addr.clone();
        let settings = self.setup.dial.clone();
        let probe = async move { dial(&addr, &settings).await.is_ok() };
        ctx.spawn(wrap_future(probe).map(move |reachable, act: &mut Self, _| {
            act.probing = false;
            if !reachable {
                act.balancer
                    .on_failure(local, Instant::now(), crate::entropy::random_u64());
                return;
            }
            // Still away? (It may have failed over or been moved meanwhile.)
            if act.is_away(away) {
                tracing::debug!(slot = away, "moving a connection back to the local AZ");
                // Control message: it must get through even when the slot's mailbox is full.
                act.slots[away].do_send(Recycle);
            }
        }));
    }

    /// Whether `slot` has an open stream to an endpoint outside the local AZ.
    fn is_away(&self, slot: usize) -> bool {
        self.up[slot] && self.assigned[slot].is_some_and(|e| !self.balancer.is_local(e))
    }

    fn connect(&mut self, slot: usize) {
        if let Some(old) = self.assigned[slot].take() {
            self.balancer.release(old);
        }
        let a = self.balancer.assign(Instant::now());
        self.assigned[slot] = Some(a.endpoint);
        // Control message: it must get through even when the slot's mailbox is full of data.
        self.slots[slot].do_send(Connect {
            endpoint: a.endpoint,
            addr: self.balancer.endpoint(a.endpoint).addr.clone(),
            delay: a.delay,
        });
    }
}

impl Actor for DopplerSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for slot in 0..self.slots.len() {
            self.connect(slot);
        }
        ctx.run_interval(self.rebalance_interval, |act, ctx| act.rebalance(ctx));
    }
}

impl Handler<ConnectionUp> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionUp, _: &mut Context<Self>) {
        self.up[msg.slot] = true;
        // A stale Connect may have won a race with a newer one: trust what actually connected.
        if self.assigned[msg.slot] != Some(msg.endpoint) {
            if let Some(old) = self.assigned[msg.slot].replace(msg.endpoint) {
                self.balancer.release(old);
            }
            self.balancer.claim(msg.endpoint);
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
    }
}

impl Handler<ConnectionDown> for DopplerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionDown, _: &mut Context<Self>) {
        self.up[msg.slot] = false;
        if let Some(ep) = self.assigned[msg.slot] {
            if msg.lived >= HEALTHY_AFTER {
                self.balancer.on_healthy(ep);
            }
            // A killed or recycled actor says nothing about its Doppler; a stalled one was
            // already charged when the supervisor abandoned it.
            let failed = !matches!(msg.cause, RestartCause::Killed | RestartCause::Recycled);
            if failed && msg.cause != RestartCause::Stalled {
                self.balancer
                    .on_failure(ep, Instant::now(), crate::entropy::random_u64());
            }
            if failed {
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
        self.connect(msg.slot);
    }
}

impl Handler<Stalled> for DopplerSupervisor {
    type Result = ();

    /// Moving a stalled slot costs what its stream had taken (one HTTP/2 window); worth it only if
    /// another endpoint is usable. Otherwise keep the connection: the Doppler may resume.
    fn handle(&mut self, msg: Stalled, _: &mut Context<Self>) {
        let Some(ep) = self.assigned[msg.slot] else {
            return;
        };
        let now = Instant::now();
        let moving = self.balancer.has_alternative(ep, now);
        if moving {
            self.balancer
                .on_failure(ep, now, crate::entropy::random_u64());
            // Control message: it must get through even when the slot's mailbox is full.
            self.slots[msg.slot].do_send(Abandon);
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
