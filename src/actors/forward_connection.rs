//! A downstream v2 agent's connection actor (the forwarder's fan-out, issue 23): takes what its
//! outbox holds and sends it, as signed and tagged (every tag kept), in `Ingress.Send` calls to
//! `127.0.0.1:PORT` over mTLS (server name `metron`, the agent's own certificate and CA, as
//! upstream's forwarder-agent). Each call's answer acknowledges its batch (`egress`).
//!
//! A failed call is retried after a capped backoff (`syslog.backoff_*`), at most 22 times
//! (`drain_write_failed` after); a call refused for good (a code the OTLP specification would
//! not retry either) drops its batch (`drain_refused`). Meanwhile the outbox fills to the
//! destination's share and the sequencer drops what is over it (`drain_queue_full`): a dead
//! downstream costs the others nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tonic::transport::Channel;

use super::drain_connection::Held;
use super::messages::{Drain, DumpState};
use super::otlp_connection::Connected;
use super::outlet_task::{OutletActor, OutletShell};
use crate::envelope::outbox::Outlet;
use crate::envelope::queue::OutgoingBatch;
use crate::grpc::egress::send_batch;
use crate::otlp::export::{classify, Verdict};
use crate::routing::backoff;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{ActorName, DropReason, Ledger};

const ME: ActorName = ActorName::ForwardConnection;

/// Envelopes per `Send` call at most (upstream's client batches 100; a call carries what has
/// queued up, within the gRPC message limit).
const MAX_CALL_ENVELOPES: usize = 1000;

/// Budget bytes per call at most (an envelope's budget cost is at least its encoded size): well
/// under a receiver's 10 MiB gRPC limit.
const MAX_CALL_BYTES: usize = 4 << 20;

/// Attempts at one batch before it is dropped (as a drain's).
const MAX_ATTEMPTS: u32 = 22;

/// Everything the connection needs; fixed for its life.
pub struct ForwardSetup {
    pub outlet: Outlet,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub channel: Channel,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub ledger: Arc<Ledger>,
}

/// The actor; see the module docs.
pub struct ForwardConnection {
    setup: Arc<ForwardSetup>,
    shell: OutletShell,
}

impl ForwardConnection {
    pub fn new(setup: ForwardSetup) -> Self {
        let shell = OutletShell::new(setup.outlet.clone(), setup.ledger.clone());
        Self {
            setup: Arc::new(setup),
            shell,
        }
    }

    pub fn held(&self) -> Arc<Held> {
        self.shell.held.clone()
    }

    /// Retired: what it still holds is dropped (once).
    fn retire(&mut self, ctx: &mut Context<Self>) {
        if let Some(dropped) = self.shell.retire() {
            tracing::info!(destination = %self.setup.addr, dropped, "downstream agent removed");
            ctx.stop();
        }
    }
}

impl OutletActor for ForwardConnection {
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

impl Actor for ForwardConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        OutletShell::spawn(self, ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.shell.stopped();
    }
}

impl Handler<Drain> for ForwardConnection {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.shell.drain()
    }
}

impl Handler<super::messages::Retire> for ForwardConnection {
    type Result = ();

    /// Its file is gone: deliver what it holds within `grace`, then stop.
    fn handle(&mut self, msg: super::messages::Retire, ctx: &mut Context<Self>) {
        OutletShell::retire_after(self, ctx, msg.grace, Self::retire);
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for ForwardConnection {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        self.shell.chaos_panic(ME, msg.escape);
    }
}

impl Handler<DumpState> for ForwardConnection {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let s = self.setup.outlet.account.snapshot();
        tracing::info!(
            target: "metron::state",
            actor = "forward_connection",
            destination = %self.setup.addr,
            queued = self.setup.outlet.outbox.envelopes(),
            held = self.shell.held.envelopes(),
            offered = s.offered,
            egress = s.egress,
            dropped = s.dropped_total(),
            "state"
        );
    }
}

async fn run(
    setup: Arc<ForwardSetup>,
    held: Arc<Held>,
    done: Arc<tokio::sync::watch::Sender<bool>>,
) {
    let mut grpc = tonic::client::Grpc::new(setup.channel.clone())
        .max_encoding_message_size(crate::config::MAX_GRPC_MESSAGE_BYTES);
    let (ledger, outlet) = (&setup.ledger, &setup.outlet);
    let warnings = RateLimit::new(Duration::from_secs(10));
    let mut failures: u32 = 0;
    let mut connected: Option<Connected> = None;
    while let Some(batch) = outlet
        .outbox
        .take_within(MAX_CALL_ENVELOPES, MAX_CALL_BYTES)
        .await
    {
        let (n, bytes) = (batch.len(), batch.bytes());
        held.set(n, bytes);
        #[cfg(feature = "chaos-hooks")]
        if held.chaos_due() {
            super::guard::chaos_panic(ME);
        }
        let mut attempts = 0;
        let dropped = loop {
            attempts += 1;
            let mut call = OutgoingBatch::default();
            call.add(batch.clone());
            let status = match send_batch(&mut grpc, call).await {
                Ok(()) => {
                    connected.get_or_insert_with(|| Connected::new(outlet, ledger));
                    if failures > 0 {
                        tracing::info!(destination = %setup.addr, failures, "forwarding recovered");
                        failures = 0;
                    }
                    break None;
                }
                Err(status) => status,
            };
            connected = None;
            failures = failures.saturating_add(1);
            let retry = matches!(classify(&status), Verdict::Retry(_));
            if !retry {
                break Some((DropReason::DrainRefused, status));
            }
            if attempts >= MAX_ATTEMPTS {
                break Some((DropReason::DrainWriteFailed, status));
            }
            let wait = backoff::delay(
                failures,
                setup.backoff_initial,
                setup.backoff_max,
                crate::entropy::random_u64(),
            );
            warnings.warn_every(|times| {
                tracing::warn!(
                    destination = %setup.addr,
                    error = %status,
                    failures,
                    times,
                    retry_in_ms = wait.as_millis() as u64,
                    "forwarding failed; retrying"
                );
            });
            tokio::time::sleep(wait).await;
        };
        outlet.outbox.unroute(bytes);
        match dropped {
            None => ledger.delivered_at(&outlet.account, n, bytes),
            Some((reason, status)) => {
                warnings.warn_every(|times| {
                    tracing::warn!(
                        destination = %setup.addr,
                        error = %status,
                        reason = reason.name(),
                        times,
                        "forwarding failed for good; dropping the batch"
                    );
                });
                ledger.dropped_at(&outlet.account, reason, n, bytes);
            }
        }
        held.set(0, 0);
    }
    drop(connected);
    done.send_replace(true);
}
