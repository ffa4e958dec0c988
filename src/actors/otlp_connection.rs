//! The OTLP collector's connection actor (issue 23): takes what its outbox holds, writes each
//! envelope into its signal's export request as upstream's OTLP writer maps it
//! ([`crate::otlp::encode`], the rules in [`crate::otlp::mapping`]), batches per signal
//! (`otlp.batch_max_items` items or `otlp.batch_interval_ms`) and exports over OTLP/gRPC, one
//! export in flight per signal (exports queued behind it go together, up to 512 KiB).
//!
//! - A retryable failure (the OTLP specification's codes; `RESOURCE_EXHAUSTED` only with a
//!   `RetryInfo`, whose delay is honoured) is retried on `otlp.retry`'s schedule until
//!   `otlp.retry.max_elapsed_ms`, then dropped (`drain_write_failed`). Meanwhile the outbox
//!   fills up to the collector's share of the budget and the sequencer drops what is over it
//!   (`drain_queue_full`): a dead collector costs the other destinations nothing.
//! - A signal answered `UNIMPLEMENTED` (a collector without that pipeline) is paused for 5
//!   minutes: its envelopes are counted `signal_unimplemented`, one warning per pause, and the
//!   other signals go on.
//! - `partial_success` rejections are counted `otlp_rejected`; any other failure drops the batch
//!   (`drain_refused`). An envelope with nothing to export (a timer without trace tags) is
//!   counted `unformattable`.
//!
//! What `egress` means here: the collector answered the export without rejecting it.
//!
//! As a drain's, the actor is a shell around one task; a panic in the task drops what it held
//! (`actor_panic`) and the task starts again.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use prost::bytes::Bytes;
use prost::Message as _;
use tokio::time::Instant as TokioInstant;
use tonic::transport::Channel;

use super::drain_connection::Held;
use super::messages::{Drain, DumpState};
use super::outlet_task::{OutletActor, OutletShell};
use crate::config::OtlpConfig;
use crate::envelope::encoded::EncodedBatch;
use crate::envelope::fields::{fields_in_place, Fields};
use crate::envelope::outbox::Outlet;
use crate::envelope::view::Parsed;
use crate::envelope::{Kind, Kinds};
use crate::grpc::egress::unary_encoded;
use crate::otlp::encode::{Batch, Signal, Writer};
use crate::otlp::export::{classify, Pause, Verdict};
use crate::otlp::mapping::{Outcome, Signals};
use crate::otlp_proto::collector::logs::v1::ExportLogsServiceResponse;
use crate::otlp_proto::collector::metrics::v1::ExportMetricsServiceResponse;
use crate::otlp_proto::collector::trace::v1::ExportTraceServiceResponse;
use crate::proto::Envelope;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{ActorName, DropReason, Ledger};

const ME: ActorName = ActorName::OtlpConnection;

/// The most envelopes taken from the outbox at once.
const MAX_TAKE: usize = 256;

/// What the OTLP destination takes: the kinds of the signals exported.
pub fn kinds(signals: Signals) -> Kinds {
    let mut kinds = Vec::new();
    if signals.logs {
        kinds.extend([Kind::Log, Kind::Event]);
    }
    if signals.metrics {
        kinds.extend([Kind::Counter, Kind::Gauge]);
    }
    if signals.traces {
        kinds.push(Kind::Timer);
    }
    Kinds::of(&kinds)
}

/// Everything the connection needs; fixed for its life.
pub struct OtlpSetup {
    pub outlet: Outlet,
    pub config: OtlpConfig,
    /// Connected lazily, reconnected by tonic as needed.
    pub channel: Channel,
    pub ledger: Arc<Ledger>,
}

/// The actor; see the module docs.
pub struct OtlpConnection {
    setup: Arc<OtlpSetup>,
    shell: OutletShell,
}

impl OtlpConnection {
    pub fn new(setup: OtlpSetup) -> Self {
        let shell = OutletShell::new(setup.outlet.clone(), setup.ledger.clone());
        Self {
            setup: Arc::new(setup),
            shell,
        }
    }

    /// What the connection holds in hand, for the shutdown barrier.
    pub fn held(&self) -> Arc<Held> {
        self.shell.held.clone()
    }

    /// Retired: what it still holds is dropped (once).
    fn retire(&mut self, ctx: &mut Context<Self>) {
        if let Some(dropped) = self.shell.retire() {
            tracing::info!(endpoint = %self.setup.config.endpoint, dropped, "OTLP collector removed");
            ctx.stop();
        }
    }
}

impl OutletActor for OtlpConnection {
    const NAME: ActorName = ME;

    fn shell(&mut self) -> &mut OutletShell {
        &mut self.shell
    }

    fn task(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(run(
            self.setup.clone(),
            self.shell.held.clone(),
            self.shell.done.clone(),
        ))
    }
}

impl Actor for OtlpConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        OutletShell::spawn(self, ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.shell.stopped();
    }
}

impl Handler<Drain> for OtlpConnection {
    type Result = ResponseFuture<bool>;

    /// Shutdown: the task exports what is queued, then ends; true once it has.
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.shell.drain()
    }
}

impl Handler<super::messages::Retire> for OtlpConnection {
    type Result = ();

    /// Its file is gone: export what it holds within `grace`, then stop.
    fn handle(&mut self, msg: super::messages::Retire, ctx: &mut Context<Self>) {
        OutletShell::retire_after(self, ctx, msg.grace, Self::retire);
    }
}

impl Handler<DumpState> for OtlpConnection {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let s = self.setup.outlet.account.snapshot();
        tracing::info!(
            target: "metron::state",
            actor = "otlp_connection",
            endpoint = %self.setup.config.endpoint,
            queued = self.setup.outlet.outbox.envelopes(),
            held = self.shell.held.envelopes(),
            routed_bytes = self.setup.outlet.outbox.routed(),
            offered = s.offered,
            egress = s.egress,
            dropped = s.dropped_total(),
            "state"
        );
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for OtlpConnection {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        self.shell.chaos_panic(ME, msg.escape);
    }
}

/// Budget bytes taken from the outbox at once, and the most envelopes' budget bytes one export
/// settles (what it holds of the budget while it waits).
const MAX_TAKE_BYTES: usize = 512 << 10;
const MAX_EXPORT_BYTES: usize = 512 << 10;
/// The most request bytes one export carries (its items are larger than the envelopes they
/// come from: a gauge's values each carry the attributes): half a collector's default 4 MiB
/// receive limit. An envelope is never split, so one envelope over it goes alone.
const MAX_REQUEST_BYTES: usize = 2 << 20;

/// Each signal's export call in flight, polled by the exporter's own task (no task spawned
/// per export).
type Calls = [Option<Pin<Box<dyn Future<Output = Result<i64, tonic::Status>> + Send>>>; 3];

/// The first call of `calls` to have finished: its signal and its answer.
fn poll_calls(
    calls: &mut Calls,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<(Signal, Result<i64, tonic::Status>)> {
    for s in Signal::ALL {
        let slot = &mut calls[s as usize];
        if let Some(call) = slot {
            if let std::task::Poll::Ready(result) = call.as_mut().poll(cx) {
                *slot = None;
                return std::task::Poll::Ready((s, result));
            }
        }
    }
    std::task::Poll::Pending
}

/// One export call of `signal`'s `request`: the items the collector rejected, or why it failed
/// (within [`EXPORT_TIMEOUT`]).
async fn call(
    mut grpc: tonic::client::Grpc<Channel>,
    signal: Signal,
    request: Vec<Bytes>,
) -> Result<i64, tonic::Status> {
    let grpc = &mut grpc;
    let path = PATHS[signal as usize];
    let call = async move {
        match signal {
            Signal::Logs => unary_encoded::<ExportLogsServiceResponse>(grpc, path, request)
                .await
                .map(|r| r.partial_success.map_or(0, |p| p.rejected_log_records)),
            Signal::Metrics => unary_encoded::<ExportMetricsServiceResponse>(grpc, path, request)
                .await
                .map(|r| r.partial_success.map_or(0, |p| p.rejected_data_points)),
            Signal::Traces => unary_encoded::<ExportTraceServiceResponse>(grpc, path, request)
                .await
                .map(|r| r.partial_success.map_or(0, |p| p.rejected_spans)),
        }
    };
    tokio::time::timeout(EXPORT_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {} s",
                EXPORT_TIMEOUT.as_secs()
            )))
        })
}

/// The longest one export call may take before it counts as failed (and is retried).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

const PATHS: [&str; 3] = [
    "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
];

/// One signal's export being written: its items, and the envelopes (and budget bytes) they came
/// from, settled together.
#[derive(Default)]
struct Pending {
    batch: Batch,
    envelopes: usize,
    bytes: usize,
    since: Option<Instant>,
}

/// One export request and what it settles; kept while it waits for its turn or its next
/// attempt.
struct Export {
    /// The request's bytes: one export request, or several joined (see
    /// [`Exporter::start_due`]).
    request: Vec<Bytes>,
    items: usize,
    envelopes: usize,
    bytes: usize,
    /// Failed attempts so far, and the time they made it wait in all.
    attempts: u32,
    waited: Duration,
    /// When it may be tried (again).
    due: Instant,
}

/// An export's request bytes.
fn request_len(export: &Export) -> usize {
    export.request.iter().map(Bytes::len).sum()
}

/// The task's state.
struct Exporter {
    setup: Arc<OtlpSetup>,
    held: Arc<Held>,
    grpc: tonic::client::Grpc<Channel>,
    writer: Writer,
    parsed: Parsed,
    pending: [Pending; 3],
    /// Each signal's exports, oldest first, each at most [`MAX_EXPORT_BYTES`] of envelopes.
    /// The first one may be waiting for its next attempt: meanwhile the signal gathers but does
    /// not export (its order is kept), and the other signals go on.
    ready: [VecDeque<Export>; 3],
    /// Per signal: the export in flight.
    flying: [Option<Export>; 3],
    paused: [Pause; 3],
    warnings: RateLimit,
    /// Per signal: consecutive failed exports, for the "recovered" line.
    failures: [u32; 3],
    /// Set while exports succeed: counted as an open connection (`drain_connections`, the
    /// account's), so the edge knows something drains.
    connected: Option<Connected>,
}

/// An open connection in the counts (`drain_connections`, the destination's account), for as
/// long as it lives: dropped on a failure, an abort or a panic alike.
pub(crate) struct Connected(Arc<crate::telemetry::Account>, Arc<Ledger>);

impl Connected {
    pub(crate) fn new(outlet: &Outlet, ledger: &Arc<Ledger>) -> Self {
        let m = ledger.metrics();
        m.drain_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        outlet.account.connected(1);
        Connected(outlet.account.clone(), ledger.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        let m = self.1.metrics();
        m.drain_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.connected(-1);
    }
}

async fn run(setup: Arc<OtlpSetup>, held: Arc<Held>, done: Arc<tokio::sync::watch::Sender<bool>>) {
    let grpc = tonic::client::Grpc::new(setup.channel.clone())
        .max_encoding_message_size(crate::config::MAX_GRPC_MESSAGE_BYTES);
    let writer = Writer::new(setup.config.attributes, setup.config.signals);
    let mut x = Exporter {
        setup,
        held,
        grpc,
        writer,
        parsed: Parsed::default(),
        pending: Default::default(),
        ready: Default::default(),
        flying: Default::default(),
        paused: [Pause::default(); 3],
        warnings: RateLimit::new(Duration::from_secs(10)),
        failures: [0; 3],
        connected: None,
    };
    let setup = x.setup.clone();
    let mut calls: Calls = Default::default();
    let mut closed = false;
    loop {
        // Shutdown: everything gathered goes, each failed export on its schedule; the
        // shutdown's grace period bounds how long that may take.
        x.seal_due(closed);
        x.start_due(&mut calls);
        x.held_now();
        if closed && x.is_idle() {
            break;
        }
        let due = x.next_due();
        tokio::select! {
            taken = setup.outlet.outbox.take_within(MAX_TAKE, MAX_TAKE_BYTES), if !closed => {
                match taken {
                    Some(batch) => {
                        x.take_in(&batch);
                        #[cfg(feature = "chaos-hooks")]
                        if x.held.chaos_due() {
                            super::guard::chaos_panic(ME);
                        }
                    }
                    // Closed and empty.
                    None => closed = true,
                }
            }
            (signal, result) = std::future::poll_fn(|cx| poll_calls(&mut calls, cx)),
                if calls.iter().any(Option::is_some) => x.finished(signal, result),
            () = tokio::time::sleep_until(TokioInstant::from_std(due)) => {}
        }
    }
    done.send_replace(true);
}

impl Exporter {
    /// (envelopes, budget bytes) gathered or waiting to be exported.
    fn holding(&self) -> (usize, usize) {
        let gathered = self.pending.iter().map(|p| (p.envelopes, p.bytes));
        let ready = self.ready.iter().flatten().map(|w| (w.envelopes, w.bytes));
        let flying = self.flying.iter().flatten().map(|w| (w.envelopes, w.bytes));
        gathered
            .chain(ready)
            .chain(flying)
            .fold((0, 0), |(n, b), (m, c)| (n + m, b + c))
    }

    fn held_now(&self) {
        let (n, bytes) = self.holding();
        self.held.set(n, bytes);
    }

    fn is_idle(&self) -> bool {
        self.pending.iter().all(|p| p.envelopes == 0)
            && self.ready.iter().all(VecDeque::is_empty)
            && self.flying.iter().all(Option::is_none)
    }

    /// When something is next due: a gathered batch's interval, or the first export of a signal
    /// with none in flight (far away when nothing is).
    fn next_due(&self) -> Instant {
        let interval = self.setup.config.batch_interval;
        let gathered = self
            .pending
            .iter()
            .filter_map(|p| p.since.map(|t| t + interval));
        let waiting = Signal::ALL
            .iter()
            .map(|&s| s as usize)
            .filter(|&i| self.flying[i].is_none())
            .filter_map(|i| self.ready[i].front().map(|w| w.due));
        gathered
            .chain(waiting)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// Closes every gathered batch that is full or old enough (every one with `all`) into an
    /// export.
    fn seal_due(&mut self, all: bool) {
        let interval = self.setup.config.batch_interval;
        let max_items = self.setup.config.batch_max_items.get();
        let now = Instant::now();
        for s in Signal::ALL {
            let p = &self.pending[s as usize];
            let full = p.batch.items() >= max_items
                || p.bytes >= MAX_EXPORT_BYTES
                || p.batch.len() >= MAX_REQUEST_BYTES;
            if p.envelopes > 0 && (all || full || p.since.is_some_and(|t| now >= t + interval)) {
                self.seal(s, now);
            }
        }
    }

    /// Starts each signal's first export if it is due and the signal has none in flight: one
    /// at a time per signal, so the collector gets a signal's exports in order (a counter's
    /// totals never go back), and the signals side by side.
    fn start_due(&mut self, calls: &mut Calls) {
        let now = Instant::now();
        for s in Signal::ALL {
            let i = s as usize;
            if self.flying[i].is_some() || self.ready[i].front().is_none_or(|w| w.due > now) {
                continue;
            }
            let Some(mut export) = self.ready[i].pop_front() else {
                continue;
            };
            // Exports that queued behind the last one go together, up to the cap: a
            // collector slower than one export per batch gets fewer, larger ones. (Requests
            // concatenated are one request with their resources one after another; the call
            // writes the parts one after another.)
            if export.attempts == 0 {
                while let Some(next) = self.ready[i].front().filter(|n| {
                    n.attempts == 0
                        && n.due <= now
                        && export.bytes + n.bytes <= MAX_EXPORT_BYTES
                        && request_len(&export) + request_len(n) <= MAX_REQUEST_BYTES
                }) {
                    export.items += next.items;
                    export.envelopes += next.envelopes;
                    export.bytes += next.bytes;
                    let next = self.ready[i].pop_front().expect("just seen");
                    export.request.extend(next.request);
                }
            }
            calls[i] = Some(Box::pin(call(self.grpc.clone(), s, export.request.clone())));
            self.flying[i] = Some(export);
        }
    }

    /// The signal's gathered batch becomes its last export.
    fn seal(&mut self, s: Signal, now: Instant) {
        let p = std::mem::take(&mut self.pending[s as usize]);
        let items = p.batch.items();
        self.ready[s as usize].push_back(Export {
            request: vec![p.batch.finish(s)],
            items,
            envelopes: p.envelopes,
            bytes: p.bytes,
            attempts: 0,
            waited: Duration::ZERO,
            due: now,
        });
    }

    fn drop_now(&self, reason: DropReason, n: usize, bytes: usize) {
        if n == 0 {
            return;
        }
        let outlet = &self.setup.outlet;
        outlet.outbox.unroute(bytes);
        self.setup
            .ledger
            .dropped_at(&outlet.account, reason, n, bytes);
    }

    /// Writes `batch` into the signals' gathered batches; counts what cannot be exported.
    fn take_in(&mut self, batch: &EncodedBatch) {
        let (n, bytes) = self.holding();
        self.held.set(n + batch.len(), bytes + batch.bytes());
        let now = Instant::now();
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut unformattable = (0, 0);
        let mut unimplemented = (0, 0);
        for i in 0..batch.len() {
            let cost = batch.costs()[i] as usize;
            let bytes = batch.envelope(i);
            let decoded;
            let fields = match fields_in_place(bytes, &mut self.parsed) {
                Some(f) => Some(f),
                // An encoding the in-place reader leaves to prost.
                None => {
                    decoded = Envelope::decode(bytes).ok();
                    decoded.as_ref().and_then(Fields::of)
                }
            };
            let Some(f) = fields else {
                unformattable.0 += 1;
                unformattable.1 += cost;
                continue;
            };
            let signal = Signal::of(&f.body);
            if self.paused[signal as usize].paused(now) {
                unimplemented.0 += 1;
                unimplemented.1 += cost;
                continue;
            }
            let p = &mut self.pending[signal as usize];
            match self.writer.write(&f, now_ns, &mut p.batch) {
                Outcome::Mapped(k) if k > 0 => {
                    p.envelopes += 1;
                    p.bytes += cost;
                    p.since.get_or_insert(now);
                    if p.batch.len() >= MAX_REQUEST_BYTES {
                        self.seal(signal, now);
                    }
                }
                _ => {
                    unformattable.0 += 1;
                    unformattable.1 += cost;
                }
            }
        }
        self.drop_now(DropReason::Unformattable, unformattable.0, unformattable.1);
        self.drop_now(
            DropReason::SignalUnimplemented,
            unimplemented.0,
            unimplemented.1,
        );
        self.held_now();
    }

    /// An export answered, failed or timed out: settled, or kept first for its next attempt.
    fn finished(&mut self, signal: Signal, result: Result<i64, tonic::Status>) {
        let Some(mut export) = self.flying[signal as usize].take() else {
            return;
        };
        let status = match result {
            Ok(rejected) => {
                if self.connected.is_none() {
                    self.connected = Some(Connected::new(&self.setup.outlet, &self.setup.ledger));
                }
                self.settle(signal, &export, rejected);
                return;
            }
            Err(status) => status,
        };
        let failures = &mut self.failures[signal as usize];
        *failures = failures.saturating_add(1);
        let retry = self.setup.config.retry;
        let reason = match classify(&status) {
            Verdict::Retry(delay) => {
                self.connected = None;
                export.attempts += 1;
                let wait = delay.unwrap_or_else(|| retry.delay(export.attempts));
                // The schedule's waits, not the calls' time, count against max_elapsed
                // (upstream's 7 retries fit its 91 s).
                if export.waited + wait <= retry.max_elapsed {
                    self.warnings.warn_every(|times| {
                        tracing::warn!(
                            signal = signal.name(),
                            error = %status,
                            attempt = export.attempts,
                            times,
                            retry_in_ms = wait.as_millis() as u64,
                            "OTLP export failed; retrying"
                        );
                    });
                    export.waited += wait;
                    export.due = Instant::now() + wait;
                    self.ready[signal as usize].push_front(export);
                    return;
                }
                DropReason::DrainWriteFailed
            }
            Verdict::Unimplemented => {
                if self.paused[signal as usize].start(Instant::now()) {
                    tracing::warn!(
                        signal = signal.name(),
                        error = %status,
                        pause_s = crate::otlp::export::PAUSE.as_secs(),
                        "the OTLP collector does not take this signal; pausing it (its \
                         envelopes are counted as dropped, signal_unimplemented)"
                    );
                }
                DropReason::SignalUnimplemented
            }
            Verdict::Refused => DropReason::DrainRefused,
        };
        if reason == DropReason::SignalUnimplemented {
            // What else the signal holds would be answered the same.
            let p = std::mem::take(&mut self.pending[signal as usize]);
            let (mut n, mut bytes) = (p.envelopes, p.bytes);
            for w in std::mem::take(&mut self.ready[signal as usize]) {
                n += w.envelopes;
                bytes += w.bytes;
            }
            self.drop_now(reason, n, bytes);
        } else {
            self.warnings.warn_every(|times| {
                tracing::warn!(
                    signal = signal.name(),
                    error = %status,
                    reason = reason.name(),
                    times,
                    "OTLP export failed for good; dropping the batch"
                );
            });
        }
        self.drop_now(reason, export.envelopes, export.bytes);
    }

    /// An export answered: delivered, but for what the collector rejected.
    fn settle(&mut self, signal: Signal, export: &Export, rejected: i64) {
        let failures = &mut self.failures[signal as usize];
        if *failures > 0 {
            tracing::info!(
                signal = signal.name(),
                failures = *failures,
                "OTLP export recovered"
            );
            *failures = 0;
        }
        let (ledger, outlet) = (&self.setup.ledger, &self.setup.outlet);
        let n = export.envelopes;
        // Rejections come in items; as envelopes, in proportion, rounded up.
        let rejected_items = u128::try_from(rejected.max(0)).unwrap_or(0);
        let rejected = (rejected_items * n as u128)
            .div_ceil(export.items.max(1) as u128)
            .min(n as u128) as usize;
        let rejected_bytes = (export.bytes as u128 * rejected as u128 / n.max(1) as u128) as usize;
        outlet.outbox.unroute(export.bytes);
        ledger.dropped_at(
            &outlet.account,
            DropReason::OtlpRejected,
            rejected,
            rejected_bytes,
        );
        ledger.delivered_at(&outlet.account, n - rejected, export.bytes - rejected_bytes);
        if rejected > 0 {
            self.warnings.warn_every(|times| {
                tracing::warn!(
                    signal = signal.name(),
                    rejected,
                    times,
                    "the OTLP collector rejected part of an export"
                );
            });
        }
    }
}
