//! The emitter-facing edge: `loggregator.v2.Ingress` (`Sender`, `BatchSender`, `Send`) and the
//! admission decision every envelope passes before any work is spent on it.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::actors::messages::IngressBatch;
use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::envelope::{admission_cost, Batch};
use crate::proto::ingress_server::{Ingress, IngressServer};
use crate::proto::{BatchSenderResponse, Envelope, EnvelopeBatch, IngressResponse, SendResponse};
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{DropReason, Ledger};

/// An envelope costing more can never be sent to a Doppler (its cost bounds its final size; the
/// margin covers the batch's own framing).
const MAX_ENVELOPE_COST: usize = MAX_GRPC_MESSAGE_BYTES - 64 * 1024;
/// `Sender` streams carry one envelope per message: gather up to this many already-arrived ones
/// into a batch (never waiting for more).
const SENDER_BATCH: usize = 100;

/// Admission: counts `ingress`, prices each envelope, takes room in the budget (waiting at most
/// `max_wait`, and not at all while no Doppler stream is open) and hands the batch to the ingress
/// actor. Whatever is refused is counted by reason; nothing here blocks longer than `max_wait`.
#[derive(Clone)]
pub struct Edge {
    ingress: Recipient<IngressBatch>,
    ledger: Arc<Ledger>,
    max_wait: Duration,
    /// What every envelope costs on top of its own size (see [`admission_cost`]).
    fixed_cost: u32,
    /// `true` once shutdown began: new envelopes are refused.
    closed: watch::Receiver<bool>,
}

impl Edge {
    pub fn new(
        ingress: Recipient<IngressBatch>,
        ledger: Arc<Ledger>,
        max_wait: Duration,
        fixed_cost: u32,
        closed: watch::Receiver<bool>,
    ) -> Self {
        Self {
            ingress,
            ledger,
            max_wait,
            fixed_cost,
            closed,
        }
    }

    /// Takes responsibility for `envelopes`: each is then counted in `ingress` and ends up
    /// delivered or counted as dropped.
    ///
    /// Cancel-safe: the counts are made together with the decision, after the only `.await`, so a
    /// call cut short (an emitter's RPC dropped mid-way, or shutdown) has counted nothing.
    pub async fn accept(&self, envelopes: Vec<Envelope>) {
        let total = envelopes.len();
        if total == 0 {
            return;
        }
        let metrics = self.ledger.metrics();
        if *self.closed.borrow() {
            metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
            self.ledger.refused(DropReason::ShuttingDown, total);
            return;
        }
        let mut batch = Batch::with_capacity(total);
        let mut oversize = 0;
        for env in envelopes {
            let cost = admission_cost(&env, self.fixed_cost);
            if cost as usize > MAX_ENVELOPE_COST {
                oversize += 1;
            } else {
                batch.push(env, cost);
            }
        }
        let (n, bytes) = (batch.len(), batch.bytes());
        // Waiting only helps while a stream is draining the pipeline; with every Doppler down the
        // budget frees up only on reconnect, and the emitter must not pay for that.
        let streams_open = metrics.doppler_v2_streams.load(Ordering::Relaxed) > 0;
        let wait = if streams_open {
            self.max_wait
        } else {
            Duration::ZERO
        };
        let admitted = n > 0 && self.ledger.admit(n, bytes, wait).await;
        // From here on no `.await`: decision and counts land together.
        metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
        self.ledger.refused(DropReason::Oversize, oversize);
        if admitted && *self.closed.borrow() {
            // Shutdown began while this call waited: the drain may already be past its barrier.
            self.ledger.dropped(DropReason::ShuttingDown, n, bytes);
            return;
        }
        if !admitted {
            let reason = if streams_open {
                DropReason::PipelineFull
            } else {
                DropReason::NoDoppler
            };
            self.ledger.refused(reason, n);
            return;
        }
        if let Err(e) = self.ingress.try_send(IngressBatch(batch)) {
            let reason = match e {
                SendError::Full(_) => DropReason::IngressQueueFull,
                SendError::Closed(_) => DropReason::ShuttingDown,
            };
            self.ledger.dropped(reason, n, bytes);
        }
    }
}

/// The gRPC service. Malformed or oversize messages end that emitter's stream (as upstream);
/// envelopes it sent before are kept.
pub struct IngressService {
    edge: Edge,
    stream_errors: Arc<RateLimit>,
}

impl IngressService {
    pub fn new(edge: Edge) -> IngressServer<Self> {
        IngressServer::new(Self {
            edge,
            stream_errors: Arc::new(RateLimit::new(Duration::from_secs(10))),
        })
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    }

    fn stream_error(&self, status: &Status) {
        // An emitter that went away is not a bad message.
        if !matches!(
            status.code(),
            Code::Internal | Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
        ) {
            return;
        }
        self.edge
            .ledger
            .metrics()
            .ingress_stream_errors
            .fetch_add(1, Ordering::Relaxed);
        if let Some(times) = self.stream_errors.check() {
            tracing::warn!(error = %status.message(), streams = times, "ending an emitter's stream on a bad message");
        }
    }

    /// Reads `stream` until it ends, the emitter errs or shutdown begins, handing each run of
    /// already-arrived messages to the edge as one batch.
    async fn pump<T: Send + 'static>(
        &self,
        mut stream: Streaming<T>,
        max_per_batch: usize,
        mut into: impl FnMut(T, &mut Vec<Envelope>),
    ) -> Result<(), Status>
    where
        Streaming<T>: Stream<Item = Result<T, Status>> + Unpin,
    {
        let mut closed = self.edge.closed.clone();
        loop {
            let first = tokio::select! {
                m = stream.message() => m,
                _ = closed.wait_for(|c| *c) => return Ok(()),
            };
            let mut batch = Vec::new();
            let mut result = match first {
                Ok(Some(m)) => {
                    into(m, &mut batch);
                    None
                }
                Ok(None) => return Ok(()),
                Err(status) => Some(Err(status)),
            };
            while result.is_none() && batch.len() < max_per_batch {
                let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut stream).poll_next(cx))).await;
                match next {
                    Poll::Pending => break,
                    Poll::Ready(Some(Ok(m))) => into(m, &mut batch),
                    Poll::Ready(None) => result = Some(Ok(())),
                    Poll::Ready(Some(Err(status))) => result = Some(Err(status)),
                }
            }
            self.edge.accept(batch).await;
            match result {
                None => {}
                Some(Ok(())) => return Ok(()),
                Some(Err(status)) => {
                    self.stream_error(&status);
                    return Err(status);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Ingress for IngressService {
    async fn sender(
        &self,
        request: Request<Streaming<Envelope>>,
    ) -> Result<Response<IngressResponse>, Status> {
        self.pump(request.into_inner(), SENDER_BATCH, |e, out| out.push(e))
            .await?;
        Ok(Response::new(IngressResponse {}))
    }

    async fn batch_sender(
        &self,
        request: Request<Streaming<EnvelopeBatch>>,
    ) -> Result<Response<BatchSenderResponse>, Status> {
        // One emitter message is already a batch: hand each over as it comes.
        self.pump(request.into_inner(), 1, |b, out| out.extend(b.batch))
            .await?;
        Ok(Response::new(BatchSenderResponse {}))
    }

    async fn send(
        &self,
        request: Request<EnvelopeBatch>,
    ) -> Result<Response<SendResponse>, Status> {
        self.edge.accept(request.into_inner().batch).await;
        Ok(Response::new(SendResponse {}))
    }
}
