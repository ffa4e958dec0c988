//! One Doppler connection actor per slot: owns one HTTP/2 connection and its `Ingress.BatchSender`
//! stream. Supervised: on any failure it stops itself, actix's `Supervisor` restarts the same
//! struct, `restarting` reports to our supervisor actor, and it waits for a new [`Connect`].
//!
//! State machine: `Idle → Connecting → Connected`; any failure → (restart) → `Idle`. The slot's
//! queue lives outside the connection, so a restart loses nothing that was still queued. A panic
//! in a handler, or in the stream's task, is a failure like any other (cause `panic`,
//! [`super::guard`]): the actor restarts from `Idle` and what its stream had in flight is counted
//! `connection_lost`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinError};
use tracing::Instrument;

use super::guard::{catch, Panicked};
use super::messages::{
    Abandon, Connect, ConnectionDown, ConnectionUp, Drain, DumpState, Recycle, Reset, Stalled,
};
use crate::envelope::queue::{count_lost_in_flight, EgressQueue};
use crate::grpc::egress::{dial, run_streams, DialSettings, StreamEnd, StreamSettings};
use crate::routing::watchdog::{Verdict, Watchdog};
use crate::telemetry::{ActorName, Ledger, RestartCause};

const ME: ActorName = ActorName::DopplerConnection;

enum State {
    /// Waiting for the supervisor's [`Connect`].
    Idle,
    Connecting,
    Connected(Live),
}

/// An open connection and what is known about its stream; all of it goes with the connection, so
/// nothing here needs resetting on restart.
struct Live {
    endpoint: usize,
    since: Instant,
    task: AbortHandle,
    /// The stream was ended on purpose by [`Recycle`].
    recycling: bool,
    watchdog: Watchdog,
    /// The stream's end was acknowledged by the Doppler (nothing it took was lost).
    acknowledged: bool,
}

/// Everything a connection actor needs, shared by every slot.
pub struct ConnectionSetup {
    /// How to dial; a reload replaces it ([`super::messages::SetDial`]), and the next dial of
    /// each slot uses the new one.
    pub dial: parking_lot::RwLock<DialSettings>,
    pub streams: StreamSettings,
    /// See [`crate::config::DopplersConfig::progress_timeout`].
    pub progress_timeout: Duration,
    pub ledger: Arc<Ledger>,
    pub down: Recipient<ConnectionDown>,
    pub up: Recipient<ConnectionUp>,
    pub stalled: Recipient<Stalled>,
}

pub struct DopplerConnection {
    slot: usize,
    queue: Arc<EgressQueue>,
    setup: Arc<ConnectionSetup>,
    state: State,
    /// Why the actor stopped itself, read by `restarting`.
    failure: Option<RestartCause>,
    /// How long the connection `stopped` tore down had been up, reported by `restarting`.
    torn_down: Option<Duration>,
    draining: bool,
    drain_waiters: Vec<oneshot::Sender<bool>>,
    /// A stream was cut off during the drain: what it had taken may be lost.
    drain_lossy: bool,
    /// (address, AZ) of the Doppler last given by [`Connect`], for the state dump.
    doppler: Option<(String, String)>,
    /// Restarts of this slot's actor since start-up (the struct survives them).
    restarts: u64,
    /// The supervisor generation this connection reports in (see [`Reset`]).
    generation: u64,
    /// A [`Reset`] is under way: the next restart reports to the new supervisor, without the
    /// endpoint (its number belonged to the old one).
    resetting: bool,
}

impl DopplerConnection {
    pub fn new(slot: usize, queue: Arc<EgressQueue>, setup: Arc<ConnectionSetup>) -> Self {
        Self {
            slot,
            queue,
            setup,
            state: State::Idle,
            failure: None,
            torn_down: None,
            draining: false,
            drain_waiters: Vec::new(),
            drain_lossy: false,
            doppler: None,
            restarts: 0,
            generation: 0,
            resetting: false,
        }
    }

    /// Runs `f`; a panic in it is a failure of the connection (cause `panic`).
    fn guarded(&mut self, ctx: &mut Context<Self>, f: impl FnOnce(&mut Self, &mut Context<Self>)) {
        if let Err(panic) = catch(|| f(self, ctx)) {
            self.panicked(panic, ctx);
        }
    }

    /// A panic in a handler or in the stream's task: counted, and the connection fails.
    fn panicked(&mut self, panic: Panicked, ctx: &mut Context<Self>) {
        panic.report(ME, self.setup.ledger.metrics());
        self.fail(RestartCause::Panic, &panic.0, ctx);
    }

    fn live(&mut self) -> Option<&mut Live> {
        match &mut self.state {
            State::Connected(live) => Some(live),
            _ => None,
        }
    }

    fn fail(&mut self, cause: RestartCause, detail: &str, ctx: &mut Context<Self>) {
        tracing::debug!(
            slot = self.slot,
            cause = cause.name(),
            detail,
            "doppler connection failed"
        );
        // Also while draining: the restarted actor reconnects and its new stream flushes the queue.
        self.failure = Some(cause);
        ctx.stop();
    }

    /// Drops the connection, if any; returns how long it was up.
    fn teardown(&mut self) -> Duration {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle | State::Connecting => Duration::ZERO,
            State::Connected(live) => {
                live.task.abort();
                // Retire the old stream at once: it must take nothing more from the queue.
                self.queue.end_stream();
                // What the Doppler never acknowledged may be lost: counted, never silent.
                let lost = count_lost_in_flight(&self.queue, &self.setup.ledger);
                if self.draining && (lost > 0 || !live.acknowledged) {
                    self.drain_lossy = true;
                }
                let m = self.setup.ledger.metrics();
                m.doppler_connections.fetch_sub(1, Ordering::Relaxed);
                m.doppler_v2_streams.fetch_sub(1, Ordering::Relaxed);
                live.since.elapsed()
            }
        }
    }

    fn finish_drain(&mut self, flushed: bool) {
        let flushed = flushed && !self.drain_lossy;
        for w in self.drain_waiters.drain(..) {
            let _ = w.send(flushed);
        }
    }

    fn start_stream(
        &mut self,
        channel: tonic::transport::Channel,
        endpoint: usize,
        ctx: &mut Context<Self>,
    ) {
        let span = tracing::info_span!("doppler_stream", slot = self.slot, endpoint);
        let streams = run_streams(
            channel,
            self.queue.clone(),
            self.setup.ledger.clone(),
            self.setup.streams,
        );
        let handle = tokio::spawn(streams.instrument(span));
        let task = handle.abort_handle();
        ctx.spawn(wrap_future(handle).map(
            |res: Result<StreamEnd, JoinError>, act: &mut Self, ctx| {
                act.guarded(ctx, |act, ctx| act.on_stream_end(res, ctx));
            },
        ));
        self.queue.restart_progress_clock();
        let m = self.setup.ledger.metrics();
        m.doppler_connections.fetch_add(1, Ordering::Relaxed);
        m.doppler_v2_streams.fetch_add(1, Ordering::Relaxed);
        self.state = State::Connected(Live {
            endpoint,
            since: Instant::now(),
            task,
            recycling: false,
            watchdog: Watchdog::default(),
            acknowledged: false,
        });
        // Control message: it must reach the supervisor whatever its mailbox holds.
        self.setup.up.do_send(ConnectionUp {
            generation: self.generation,
            slot: self.slot,
            endpoint,
        });
    }

    fn on_stream_end(&mut self, res: Result<StreamEnd, JoinError>, ctx: &mut Context<Self>) {
        let end = match res {
            Ok(end) => end,
            Err(e) if e.is_panic() => {
                return self.panicked(Panicked::from_payload(&*e.into_panic()), ctx);
            }
            Err(e) => StreamEnd::Failed(e.to_string()),
        };
        if let Some(live) = self.live() {
            live.acknowledged = !matches!(end, StreamEnd::Failed(_));
        }
        match end {
            StreamEnd::Drained if self.draining => {
                self.teardown();
                self.finish_drain(true);
            }
            // Drained is only reachable while draining; anything else ends the connection.
            StreamEnd::Drained | StreamEnd::ClosedByDoppler => {
                self.fail(RestartCause::StreamClosed, "doppler ended the stream", ctx)
            }
            StreamEnd::Recycled => {
                self.fail(RestartCause::Recycled, "recycled by the supervisor", ctx)
            }
            StreamEnd::Failed(detail) => self.fail(RestartCause::StreamFailed, &detail, ctx),
        }
    }
}

impl Actor for DopplerConnection {
    type Context = Context<Self>;

    /// Runs again after every restart (the old interval went with the old context).
    fn started(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.setup.progress_timeout;
        ctx.run_interval(timeout / 4, move |act, ctx| {
            act.guarded(ctx, |act, ctx| act.watch(timeout, ctx));
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.torn_down = Some(self.teardown());
    }
}

impl DopplerConnection {
    /// The watchdog's tick: reports a stall to the supervisor, or fails a recycled stream that
    /// is never acknowledged.
    fn watch(&mut self, timeout: Duration, ctx: &mut Context<Self>) {
        let (slot, draining) = (self.slot, self.draining);
        let generation = self.generation;
        let stalled_for = self.queue.stalled_for(self.setup.streams.ack_interval);
        let Some(live) = self.live() else {
            return;
        };
        let verdict = live.watchdog.check(
            stalled_for,
            timeout,
            live.recycling,
            draining,
            Instant::now(),
        );
        let endpoint = live.endpoint;
        match verdict {
            Verdict::Fine => {}
            // Control message: the supervisor decides whether moving is worth a lost window.
            Verdict::Report => self.setup.stalled.do_send(Stalled {
                generation,
                slot,
                endpoint,
            }),
            Verdict::Fail => self.fail(
                RestartCause::Stalled,
                "recycled stream never acknowledged",
                ctx,
            ),
        }
    }
}

impl Supervised for DopplerConnection {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let mut cause = self.failure.take().unwrap_or(RestartCause::Killed);
        let mut lived = self.torn_down.take().unwrap_or(Duration::ZERO);
        if std::mem::take(&mut self.resetting) {
            // The new supervisor knows nothing of this connection's time on the old table.
            (cause, lived) = (RestartCause::SupervisorReset, Duration::ZERO);
        }
        self.restarts += 1;
        self.setup.ledger.metrics().restarted(cause);
        // Control message: it must reach the supervisor whatever its mailbox holds.
        self.setup.down.do_send(ConnectionDown {
            generation: self.generation,
            slot: self.slot,
            cause,
            lived,
        });
    }
}

impl Handler<Connect> for DopplerConnection {
    type Result = ();

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) {
        self.guarded(ctx, |act, ctx| act.connect(msg, ctx));
    }
}

impl DopplerConnection {
    fn connect(&mut self, msg: Connect, ctx: &mut Context<Self>) {
        if !matches!(self.state, State::Idle) || msg.generation != self.generation {
            return;
        }
        let endpoint = msg.endpoint;
        self.state = State::Connecting;
        self.doppler = Some((msg.addr.clone(), msg.az.clone()));
        let dial_settings = self.setup.dial.read().clone();
        let fut = async move {
            tokio::time::sleep(msg.delay).await;
            dial(&msg.addr, &dial_settings).await
        };
        ctx.spawn(wrap_future(fut).map(move |res, act: &mut Self, ctx| {
            act.guarded(ctx, |act, ctx| match res {
                Ok(client) => act.start_stream(client, endpoint, ctx),
                Err(e) => act.fail(RestartCause::ConnectFailed, &e.to_string(), ctx),
            });
        }));
    }
}

impl Handler<DumpState> for DopplerConnection {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let (state, up_for_ms, recycling) = match &self.state {
            State::Idle => ("idle", 0, false),
            State::Connecting => ("connecting", 0, false),
            State::Connected(live) => (
                "connected",
                live.since.elapsed().as_millis() as u64,
                live.recycling,
            ),
        };
        let (doppler, az) = match (&self.state, &self.doppler) {
            (State::Idle, _) | (_, None) => ("", ""),
            (_, Some((addr, az))) => (addr.as_str(), az.as_str()),
        };
        tracing::info!(
            target: "metron::state",
            actor = "doppler_connection",
            slot = self.slot,
            doppler,
            az,
            state,
            up_for_ms,
            recycling,
            draining = self.draining,
            restarts = self.restarts,
            queued_batches = self.queue.batches(),
            queued_envelopes = self.queue.envelopes(),
            in_flight_envelopes = self.queue.in_flight(),
            "state"
        );
    }
}

impl Handler<Recycle> for DopplerConnection {
    type Result = ();

    fn handle(&mut self, _: Recycle, ctx: &mut Context<Self>) {
        self.guarded(ctx, |act, _| act.recycle());
    }
}

impl DopplerConnection {
    /// Ends the stream gracefully (the Doppler acknowledges it), then reconnects.
    fn recycle(&mut self) {
        if self.draining {
            return;
        }
        if let Some(live) = self.live() {
            live.recycling = true;
            self.queue.end_stream();
        }
    }
}

impl Handler<Reset> for DopplerConnection {
    type Result = ();

    /// The supervisor started over: a live stream ends gracefully, anything else restarts now;
    /// either way the restart reports to the new supervisor.
    fn handle(&mut self, msg: Reset, ctx: &mut Context<Self>) {
        self.generation = msg.generation;
        self.resetting = true;
        if self.draining {
            // The drain ends the stream; a restart before it does reports to the new supervisor.
            return;
        }
        if self.live().is_some() {
            self.recycle();
        } else {
            self.fail(
                RestartCause::SupervisorReset,
                "the supervisor started over",
                ctx,
            );
        }
    }
}

impl Handler<Abandon> for DopplerConnection {
    type Result = ();

    fn handle(&mut self, msg: Abandon, ctx: &mut Context<Self>) {
        let same = self.live().is_some_and(|l| l.endpoint == msg.endpoint);
        if same && !self.draining {
            self.fail(
                RestartCause::Stalled,
                "no progress: the Doppler stopped reading",
                ctx,
            );
        }
    }
}

impl Handler<Drain> for DopplerConnection {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        // The stream, this one or one after a reconnect, ends once the queue is empty; the answer
        // comes when the Doppler has acknowledged that end.
        self.draining = true;
        if self.queue.close().is_some() {
            // Shutdown flushes a backlog unpaced.
            let m = self.setup.ledger.metrics();
            m.doppler_replaying.fetch_sub(1, Ordering::Relaxed);
        }
        if self.live().is_none() && self.queue.envelopes() == 0 && self.queue.routed() == 0 {
            // Nothing to flush and no stream to end (nothing is in flight without a live stream:
            // teardown counted it).
            let flushed = !self.drain_lossy;
            return Box::pin(async move { flushed });
        }
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for DopplerConnection {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, ctx: &mut Context<Self>) {
        if msg.escape {
            super::guard::chaos_panic(ME);
        }
        self.guarded(ctx, |_, _| super::guard::chaos_panic(ME));
    }
}
