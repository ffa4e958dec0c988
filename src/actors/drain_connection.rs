//! One syslog drain's connection actor: takes what its outbox holds, writes each envelope as
//! upstream's syslog-agent does ([`crate::syslog::rfc5424`], octet-counted), over TCP or TLS
//! ([`crate::syslog::writer`]). A write that fails is retried on a new connection after a capped,
//! jittered backoff ([`crate::routing::backoff`]); meanwhile the outbox fills up to the drain's
//! share of the budget and the sequencer drops what is over it (`drain_queue_full`, in this
//! drain's series only): a dead drain costs the other destinations nothing.
//!
//! The actor is a shell around one task. A panic in the task (a bug) is caught where the task
//! ends: counted (`actor_panics{actor="drain_connection"}`), the batch it held dropped as
//! `actor_panic`, and the task starts again from fresh state; the outbox, and everything still
//! queued in it, is untouched.
//!
//! What `egress` means for a drain: the message was handed to the kernel on a connection that
//! had not failed (a drain acknowledges nothing). A connection that dies can lose what the
//! kernel had accepted and not yet sent (at most a socket buffer); a write that fails is sent
//! again whole on the next connection, so a receiver may see a message twice, never a gap.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::Instrument;

use super::messages::{Drain, DumpState, Retire};
use super::outlet_task::{OutletActor, OutletShell};
use crate::envelope::encoded::EncodedBatch;
use crate::envelope::outbox::Outlet;
use crate::envelope::view::Parsed;
use crate::routing::backoff;
use crate::syslog::drain::DrainUrl;
use crate::syslog::https::{HttpsTarget, HttpsWriter, BATCH_BYTES, BATCH_WAIT};
use crate::syslog::rfc5424::{self, Messages, Options, MAX_MESSAGE_BYTES};
use crate::syslog::writer::{SyslogWriter, WriteError, WriterSettings};
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{ActorName, DropReason, Ledger};
use prost::bytes::Bytes;

const ME: ActorName = ActorName::DrainConnection;

/// The most envelopes written in one go (one system call's worth of frames, about).
const MAX_WRITE_ENVELOPES: usize = 256;

/// Everything a drain's connection needs; fixed for the drain's life.
pub struct DrainSetup {
    pub outlet: Outlet,
    pub url: DrainUrl,
    pub transport: Transport,
    /// `syslog.include_metron_tags`.
    pub metron_tag: bool,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub ledger: Arc<Ledger>,
    /// The binding's hostname (HOSTNAME when the tags do not name the app); empty for an
    /// aggregate drain.
    pub hostname: String,
    /// Dials and TLS handshakes that failed, for the app's "Failed to connect" notice.
    pub connect_failures: Arc<std::sync::atomic::AtomicU64>,
}

/// The actor; see the module docs.
pub struct DrainConnection {
    setup: Arc<DrainSetup>,
    /// The task, what it holds, and its end (see [`super::outlet_task`]).
    shell: OutletShell,
}

#[derive(Default)]
pub struct Held {
    envelopes: AtomicUsize,
    bytes: AtomicUsize,
    /// Test-only: the next batch the task formats panics (chaos hook).
    #[cfg(feature = "chaos-hooks")]
    chaos: std::sync::atomic::AtomicBool,
}

impl Held {
    pub(crate) fn set(&self, n: usize, bytes: usize) {
        self.envelopes.store(n, Ordering::Release);
        self.bytes.store(bytes, Ordering::Release);
    }

    pub(crate) fn take(&self) -> (usize, usize) {
        (
            self.envelopes.swap(0, Ordering::AcqRel),
            self.bytes.swap(0, Ordering::AcqRel),
        )
    }

    /// Envelopes held now (the shutdown barrier counts them as queued).
    pub fn envelopes(&self) -> usize {
        self.envelopes.load(Ordering::Acquire)
    }

    /// Test-only: the task is to panic at its next batch.
    #[cfg(feature = "chaos-hooks")]
    pub(crate) fn arm_chaos(&self) {
        self.chaos.store(true, Ordering::Release);
    }

    /// Test-only: whether the task is to panic now (once).
    #[cfg(feature = "chaos-hooks")]
    pub(crate) fn chaos_due(&self) -> bool {
        self.chaos.swap(false, Ordering::AcqRel)
    }
}

impl DrainConnection {
    pub fn new(setup: DrainSetup) -> Self {
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

    /// Stops the task, drops what it still holds (`drain_removed`), retires the account and
    /// stops the actor. Runs once, whichever comes first: the task ended or the grace ran out.
    fn retire(&mut self, ctx: &mut Context<Self>) {
        if let Some(dropped) = self.shell.retire() {
            tracing::info!(
                drain = %self.setup.url.anonymized,
                dropped,
                "syslog drain removed"
            );
            ctx.stop();
        }
    }
}

impl OutletActor for DrainConnection {
    const NAME: ActorName = ME;

    fn shell(&mut self) -> &mut OutletShell {
        &mut self.shell
    }

    fn task(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let span = tracing::info_span!("drain", url = %self.setup.url.anonymized);
        Box::pin(
            run(
                self.setup.clone(),
                self.shell.held.clone(),
                self.shell.done.clone(),
            )
            .instrument(span),
        )
    }
}

impl Actor for DrainConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        OutletShell::spawn(self, ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.shell.stopped();
    }
}

impl Handler<Drain> for DrainConnection {
    type Result = ResponseFuture<bool>;

    /// Shutdown: the task writes what is queued, then ends; true once it has.
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.shell.drain()
    }
}

impl Handler<Retire> for DrainConnection {
    type Result = ();

    fn handle(&mut self, Retire { grace }: Retire, ctx: &mut Context<Self>) {
        OutletShell::retire_after(self, ctx, grace, Self::retire);
    }
}

impl Handler<DumpState> for DrainConnection {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let s = self.setup.outlet.account.snapshot();
        tracing::info!(
            target: "metron::state",
            actor = "drain_connection",
            drain = %self.setup.url.anonymized,
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
impl Handler<super::messages::ChaosPanic> for DrainConnection {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        self.shell.chaos_panic(ME, msg.escape);
    }
}

/// How a drain's messages travel.
#[derive(Clone)]
pub enum Transport {
    /// `syslog://` or `syslog-tls://` to `host:port`: octet-counted frames on one connection.
    Syslog {
        addr: String,
        settings: WriterSettings,
    },
    /// `https://` (`batch: false`, one message per POST) or `https-batch://`.
    Https {
        target: HttpsTarget,
        batch: bool,
        settings: WriterSettings,
    },
}

/// A drain connection, by transport.
enum Writer {
    Syslog(SyslogWriter),
    Https(HttpsWriter, bool),
}

impl Writer {
    fn new(t: &Transport) -> Writer {
        match t {
            Transport::Syslog { addr, settings } => {
                Writer::Syslog(SyslogWriter::new(addr.clone(), settings.clone()))
            }
            Transport::Https {
                target,
                batch,
                settings,
            } => Writer::Https(
                HttpsWriter::new(
                    target.clone(),
                    settings.dial_timeout,
                    settings.write_timeout,
                    settings.idle_reconnect,
                    settings.send_buffer,
                ),
                *batch,
            ),
        }
    }

    /// Dials (a syslog connection, or an HTTPS keep-alive one) if there is none.
    async fn connect(&mut self) -> Result<(), WriteError> {
        match self {
            Writer::Syslog(w) => w.connect().await,
            Writer::Https(w, _) => w.connect().await,
        }
    }

    /// `https-batch://` gathers messages before it writes.
    fn batches(&self) -> bool {
        matches!(self, Writer::Https(_, true))
    }

    /// Writes messages `*from..`, moving `from` past what the drain took (all or nothing on a
    /// syslog connection; request by request over HTTPS, so a retry sends no message twice
    /// that a drain acknowledged).
    async fn write(&mut self, messages: &Messages, from: &mut usize) -> Result<(), WriteError> {
        match self {
            Writer::Syslog(w) => {
                w.write((*from..messages.len()).map(|i| messages.get(i)))
                    .await?;
                *from = messages.len();
            }
            Writer::Https(w, false) => {
                while *from < messages.len() {
                    w.post(Bytes::copy_from_slice(messages.get(*from))).await?;
                    *from += 1;
                }
            }
            Writer::Https(w, true) => {
                while *from < messages.len() {
                    let mut len = 0;
                    let mut end = *from;
                    while end < messages.len()
                        && (end == *from || len + messages.get(end).len() <= BATCH_BYTES)
                    {
                        len += messages.get(end).len();
                        end += 1;
                    }
                    w.post(Bytes::copy_from_slice(messages.joined(*from, end)))
                        .await?;
                    *from = end;
                }
            }
        }
        Ok(())
    }

    async fn close(&mut self) {
        match self {
            Writer::Syslog(w) => w.close().await,
            Writer::Https(w, _) => w.close(),
        }
    }
}

/// What the task has taken and formatted, not yet settled: the messages, and for each envelope
/// the index one past its last message and its budget bytes.
#[derive(Default)]
struct Pending {
    messages: Messages,
    ends: Vec<usize>,
    costs: Vec<usize>,
    /// Envelopes already settled (delivered or dropped).
    settled: usize,
    /// Reads each envelope in place for the formatter (reused: it allocates nothing once grown).
    parsed: Parsed,
}

impl Pending {
    fn clear(&mut self) {
        self.messages.clear();
        self.ends.clear();
        self.costs.clear();
        self.settled = 0;
    }

    /// Settles the envelopes not settled yet whose every frame is before `frame` (all of them
    /// with `usize::MAX`); returns (envelopes, bytes).
    fn settle_until(&mut self, frame: usize) -> (usize, usize) {
        let start = self.settled;
        while self.settled < self.ends.len() && self.ends[self.settled] <= frame {
            self.settled += 1;
        }
        (
            self.settled - start,
            self.costs[start..self.settled].iter().sum(),
        )
    }

    /// (envelopes, bytes) not settled yet.
    fn unsettled(&self) -> (usize, usize) {
        (
            self.ends.len() - self.settled,
            self.costs[self.settled..].iter().sum(),
        )
    }
}

/// A drain's open connection, counted in `drain_connections` and its account while it lives:
/// dropped on a failure, an abort (retirement) or a panic alike, so the counts never stick.
struct Connected(Arc<DrainSetup>);

impl Connected {
    fn new(setup: &Arc<DrainSetup>) -> Self {
        setup
            .ledger
            .metrics()
            .drain_connections
            .fetch_add(1, Ordering::Relaxed);
        setup.outlet.account.connected(1);
        Connected(setup.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0
            .ledger
            .metrics()
            .drain_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.0.outlet.account.connected(-1);
    }
}

/// Attempts at one batch before it is dropped (`drain_write_failed`): upstream's retry writer
/// gives up after 22 (about 2 minutes at the 15 s backoff cap).
const MAX_ATTEMPTS: u32 = 22;

/// The connection's task: take, format, write; retry a failed write after a backoff, at most
/// [`MAX_ATTEMPTS`] times; drop at once what the drain refuses for good (an HTTP 4xx other than
/// 408 and 429).
async fn run(setup: Arc<DrainSetup>, held: Arc<Held>, done: Arc<tokio::sync::watch::Sender<bool>>) {
    let mut writer = Writer::new(&setup.transport);
    let options = Options {
        hostname: &setup.hostname,
        metadata: !setup.url.omit_metadata,
        metron_tag: setup.metron_tag,
    };
    let outlet = &setup.outlet;
    let warnings = RateLimit::new(Duration::from_secs(10));
    let mut failures: u32 = 0;
    // Dialled at once, so a drain that is up counts as a destination before traffic flows.
    let mut connection = match writer.connect().await {
        Ok(()) => Some(Connected::new(&setup)),
        Err(e) => {
            if e.is_connect_failure() {
                setup.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            None
        }
    };
    let mut pending = Pending::default();
    while let Some(batch) = outlet.outbox.take(MAX_WRITE_ENVELOPES).await {
        #[cfg(feature = "chaos-hooks")]
        if held.chaos_due() {
            held.set(batch.len(), batch.bytes());
            super::guard::chaos_panic(ME);
        }
        pending.clear();
        take_in(&setup, &held, &options, &mut pending, batch);
        if writer.batches() {
            // https-batch: gather up to a request's worth, for at most a second.
            let until = tokio::time::Instant::now() + BATCH_WAIT;
            while pending.messages.bytes() < BATCH_BYTES {
                match tokio::time::timeout_at(until, outlet.outbox.take(MAX_WRITE_ENVELOPES)).await
                {
                    Ok(Some(more)) => take_in(&setup, &held, &options, &mut pending, more),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let mut from = 0;
        let mut attempts = 0;
        while from < pending.messages.len() {
            attempts += 1;
            let result = writer.write(&pending.messages, &mut from).await;
            // What the drain took (all of it, or the requests it answered) is delivered now,
            // so an abort or a panic later cannot count it as lost.
            settle(&setup, &held, &mut pending, from, None);
            let e = match result {
                Ok(()) => {
                    connection.get_or_insert_with(|| Connected::new(&setup));
                    if failures > 0 {
                        tracing::info!(failures, "drain connection recovered");
                        failures = 0;
                    }
                    continue;
                }
                Err(e) => e,
            };
            connection = None;
            failures = failures.saturating_add(1);
            if e.is_connect_failure() {
                setup.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            let refused = e.is_refusal();
            let give_up = refused || attempts >= MAX_ATTEMPTS;
            let wait = backoff::delay(
                failures,
                setup.backoff_initial,
                setup.backoff_max,
                crate::entropy::random_u64(),
            );
            warnings.warn_every(|times| {
                if give_up {
                    tracing::warn!(
                        error = %e,
                        attempts,
                        times,
                        "drain write failed for good; dropping the messages"
                    );
                } else {
                    tracing::warn!(
                        error = %e,
                        failures,
                        times,
                        retry_in_ms = wait.as_millis() as u64,
                        "drain write failed; retrying on a new connection"
                    );
                }
            });
            if give_up {
                let reason = if refused {
                    DropReason::DrainRefused
                } else {
                    DropReason::DrainWriteFailed
                };
                settle(&setup, &held, &mut pending, usize::MAX, Some(reason));
                break;
            }
            tokio::time::sleep(wait).await;
        }
        settle(&setup, &held, &mut pending, usize::MAX, None);
    }
    drop(connection);
    writer.close().await;
    done.send_replace(true);
}

/// Settles what `pending` holds up to frame `until` (everything with `usize::MAX`): delivered,
/// or dropped with `reason`; `held` then says what is left.
fn settle(
    setup: &DrainSetup,
    held: &Held,
    pending: &mut Pending,
    until: usize,
    reason: Option<DropReason>,
) {
    let (ledger, outlet) = (&setup.ledger, &setup.outlet);
    let (n, bytes) = pending.settle_until(until);
    if n > 0 {
        outlet.outbox.unroute(bytes);
        match reason {
            None => ledger.delivered_at(&outlet.account, n, bytes),
            Some(r) => ledger.dropped_at(&outlet.account, r, n, bytes),
        }
    }
    let (n, bytes) = pending.unsettled();
    held.set(n, bytes);
}

/// Formats `batch` onto `pending`, counting what the drain would refuse as dropped; `held` then
/// says what the task holds.
fn take_in(
    setup: &DrainSetup,
    held: &Held,
    options: &Options,
    pending: &mut Pending,
    batch: EncodedBatch,
) {
    let (ledger, outlet) = (&setup.ledger, &setup.outlet);
    let (n, bytes) = pending.unsettled();
    held.set(n + batch.len(), bytes + batch.bytes());
    let refused = format_batch(&batch, options, pending);
    if refused.0 > 0 {
        outlet.outbox.unroute(refused.1);
        ledger.dropped_at(
            &outlet.account,
            DropReason::Unformattable,
            refused.0,
            refused.1,
        );
    }
    let (n, bytes) = pending.unsettled();
    held.set(n, bytes);
}

/// Formats every envelope of `batch` onto `pending`; returns (envelopes, budget bytes) refused.
fn format_batch(batch: &EncodedBatch, options: &Options, pending: &mut Pending) -> (usize, usize) {
    let mut refused = (0, 0);
    for i in 0..batch.len() {
        let cost = batch.costs()[i] as usize;
        let before = pending.messages.len();
        let formatted = rfc5424::format_encoded(
            batch.envelope(i),
            &mut pending.parsed,
            options,
            &mut pending.messages,
        )
        .ok()
        // Log Cache closes the connection on a larger frame, losing what follows it.
        .filter(|()| {
            (before..pending.messages.len())
                .all(|m| pending.messages.get(m).len() <= MAX_MESSAGE_BYTES)
        });
        match formatted {
            Some(()) => {
                pending.ends.push(pending.messages.len());
                pending.costs.push(cost);
            }
            None => {
                pending.messages.truncate(before);
                refused.0 += 1;
                refused.1 += cost;
            }
        }
    }
    refused
}
