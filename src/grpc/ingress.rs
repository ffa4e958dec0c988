//! The emitter-facing edge: `loggregator.v2.Ingress` (`Sender`, `BatchSender`, `Send`) and the
//! admission decision every envelope passes before any work is spent on it.
//!
//! `BatchSender` and `Send` messages are taken undecoded ([`RawBatchCodec`]): the edge counts a
//! batch's envelopes from its framing alone, reserves budget for it, and decodes it only once
//! admitted. Under overload a batch is shed for the price of scanning its framing, never of
//! decoding it (decision 13 in `docs/decisions.md`).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Bytes, Service};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::actors::guard::{catch, refused};
use crate::actors::messages::IngressBatch;
use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::config::{Limit, LimitsConfig};
use crate::envelope::raw::count_batch;
use crate::envelope::{encode_batch, read_batch, Batch, ReadError};
use crate::limits::fair::{self, FairShed, Heavy};
use crate::limits::rate::{RateLimiter, Refusals};
use crate::proto::ingress_server::{Ingress, IngressServer};
use crate::proto::{BatchSenderResponse, Envelope, EnvelopeBatch, IngressResponse, SendResponse};
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{ActorName, DropReason, Ledger};

/// An envelope costing more can never be sent to a Doppler (its cost bounds its final size; the
/// margin covers the batch's own framing).
const MAX_ENVELOPE_COST: usize = MAX_GRPC_MESSAGE_BYTES - 64 * 1024;
/// `Sender` streams carry one envelope per message: gather up to this many already-arrived ones
/// into a batch (never waiting for more).
const SENDER_BATCH: usize = 100;
/// An undecoded batch is reserved at this many times its encoded size (plus the fixed part per
/// envelope) and settled to its exact price once decoded: a decoded envelope with a few tags
/// costs less than twice its encoded size, so settling almost always gives budget back.
const RESERVE_FACTOR: usize = 2;

/// What a reload may change about admission, shared by every clone of the [`Edge`].
#[derive(Debug)]
pub struct EdgeTunables {
    /// `ingress.grpc.max_wait_ms`.
    max_wait_ms: AtomicU64,
    /// What every envelope costs on top of its own size (see
    /// [`crate::envelope::admission_cost`]); depends on the default tags and the signing key id.
    fixed_cost: AtomicU32,
}

impl EdgeTunables {
    pub fn new(max_wait: Duration, fixed_cost: u32) -> Self {
        Self {
            max_wait_ms: AtomicU64::new(max_wait.as_millis() as u64),
            fixed_cost: AtomicU32::new(fixed_cost),
        }
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms.load(Ordering::Relaxed))
    }

    pub fn fixed_cost(&self) -> u32 {
        self.fixed_cost.load(Ordering::Relaxed)
    }

    /// Applies a reload's values to admissions that start from now on.
    pub fn set(&self, max_wait: Duration, fixed_cost: u32) {
        self.max_wait_ms
            .store(max_wait.as_millis() as u64, Ordering::Relaxed);
        self.fixed_cost.store(fixed_cost, Ordering::Relaxed);
    }
}

/// Admission: counts `ingress`, prices each envelope, takes room in the budget (waiting at most
/// `max_wait`, and not at all while no Doppler stream is open) and hands the batch to the ingress
/// actor. Whatever is refused is counted by reason; nothing here blocks longer than `max_wait`.
#[derive(Clone)]
pub struct Edge {
    ingress: Recipient<IngressBatch>,
    ledger: Arc<Ledger>,
    tunables: Arc<EdgeTunables>,
    /// `true` once shutdown began: new envelopes are refused.
    closed: watch::Receiver<bool>,
    /// Fair shedding between sources while the budget is under pressure (decision 30).
    fair: Arc<parking_lot::Mutex<FairShed>>,
    /// Per-source rate limits (`limits:`), and whether any is configured.
    limiter: Arc<parking_lot::Mutex<RateLimiter>>,
    limits_on: Arc<std::sync::atomic::AtomicBool>,
    /// `limits.top_sources`.
    top_sources: Arc<std::sync::atomic::AtomicUsize>,
}

/// The most sources fair shedding tracks at once (the lightest are forgotten beyond).
pub const FAIR_SOURCES: usize = 10_000;
/// The most sources with a rate limit bucket at once (full buckets are forgotten first).
pub const LIMITED_SOURCES: usize = 100_000;

impl Edge {
    pub fn new(
        ingress: Recipient<IngressBatch>,
        ledger: Arc<Ledger>,
        tunables: Arc<EdgeTunables>,
        closed: watch::Receiver<bool>,
        fair: Arc<parking_lot::Mutex<FairShed>>,
    ) -> Self {
        Self {
            ingress,
            ledger,
            tunables,
            closed,
            fair,
            limiter: Arc::new(parking_lot::Mutex::new(RateLimiter::new(
                LimitsConfig::default(),
                LIMITED_SOURCES,
            ))),
            limits_on: Arc::default(),
            top_sources: Arc::new(std::sync::atomic::AtomicUsize::new(10)),
        }
    }

    /// The per-source rate limits from the next batch on (start-up and reloads).
    pub fn set_limits(&self, limits: LimitsConfig) {
        self.top_sources
            .store(limits.top_sources, Ordering::Relaxed);
        let mut l = self.limiter.lock();
        l.set_config(limits, std::time::Instant::now());
        self.limits_on.store(l.enabled(), Ordering::Relaxed);
    }

    /// Up to `max` sources that had envelopes refused by their rate limit since their last
    /// notice, each with how many, and its limit.
    pub fn rate_limited(&self, max: usize) -> Vec<(String, u64, Option<Limit>)> {
        let mut l = self.limiter.lock();
        l.take_pending(max)
            .into_iter()
            .map(|(s, n)| {
                let limit = l.limit_of(&s);
                (s, n, limit)
            })
            .collect()
    }

    /// Takes responsibility for `envelopes`: each is then counted in `ingress` and ends up
    /// delivered or counted as dropped.
    ///
    /// Cancel-safe: the counts are made together with the decision, after the only `.await`, so a
    /// call cut short (an emitter's RPC dropped mid-way, or shutdown) has counted nothing.
    pub async fn accept(&self, envelopes: Vec<Envelope>) {
        self.admit_decoded(envelopes, true, None).await;
    }

    /// [`Edge::accept`] for a notice into an application's stream (about the drain whose outbox
    /// has id `about`, when it is about one: every destination that takes it gets it, but that
    /// drain). Neither rate limits nor fair shedding apply to notices.
    pub async fn accept_notice(&self, notice: Envelope, about: Option<u64>) {
        self.admit_decoded(vec![notice], true, about).await;
    }

    /// [`Edge::accept`] for envelopes converted from v1 datagrams, which were counted in
    /// `ingress{metric_version="1.0"}` when they arrived. Not cancel-safe: the caller lets it
    /// finish (it waits at most `max_wait`).
    pub async fn accept_converted(&self, envelopes: Vec<Envelope>) {
        self.admit_decoded(envelopes, false, None).await;
    }

    async fn admit_decoded(
        &self,
        envelopes: Vec<Envelope>,
        count_ingress: bool,
        notice_about: Option<u64>,
    ) {
        let total = envelopes.len();
        if total == 0 {
            return;
        }
        if self.refused_while_closed(total, count_ingress) {
            return;
        }
        let (mut batch, oversize) = match self.price(encode_batch(envelopes)) {
            Ok(read) => read,
            Err(e) => {
                // prost's own encoding always reads: only a panic in the reader gets here. The
                // envelopes were taken (v1 ones are counted as they arrive), so count them.
                debug_assert!(matches!(e, ReadError::Panicked(_)), "{e}");
                if count_ingress {
                    let metrics = self.ledger.metrics();
                    metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
                }
                self.ledger.refused(DropReason::ActorPanic, total);
                return;
            }
        };
        let (n, bytes) = (batch.len(), batch.bytes());
        let (wait, full) = self.wait_policy();
        let admitted = n > 0 && self.ledger.admit(n, bytes, wait).await;
        // From here on no `.await`: decision and counts land together.
        if count_ingress {
            let metrics = self.ledger.metrics();
            metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
        }
        self.ledger.refused(DropReason::Oversize, oversize);
        if !admitted {
            self.ledger.refused(full, n);
            return;
        }
        if let Some(about) = notice_about {
            batch.mark_notice(about);
        }
        self.hand_over(batch);
    }

    /// After shutdown began, counts `total` new envelopes as refused (`shutting_down`), and in
    /// `ingress` unless they were counted on arrival (v1).
    fn refused_while_closed(&self, total: usize, count_ingress: bool) -> bool {
        if !*self.closed.borrow() {
            return false;
        }
        if count_ingress {
            let metrics = self.ledger.metrics();
            metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
        }
        self.ledger.refused(DropReason::ShuttingDown, total);
        true
    }

    /// How long an admission may wait for room, and the reason to count if it gets none.
    /// Waiting only helps while a destination is draining the pipeline (a Doppler stream or a
    /// drain connection is open); with every destination down the budget frees up only on
    /// reconnect, and the emitter must not pay for that.
    fn wait_policy(&self) -> (Duration, DropReason) {
        let m = self.ledger.metrics();
        let streams_open = m.doppler_v2_streams.load(Ordering::Relaxed) > 0
            || m.drain_connections.load(Ordering::Relaxed) > 0;
        if streams_open {
            (self.tunables.max_wait(), DropReason::PipelineFull)
        } else {
            (Duration::ZERO, DropReason::NoDoppler)
        }
    }

    /// Takes responsibility for the envelopes of an undecoded `EnvelopeBatch` whose framing holds
    /// `raw.count` of them: reserves budget for them first (waiting as [`Edge::accept`] does) and
    /// decodes them only once reserved. A batch refused here is counted by its framing and never
    /// decoded.
    ///
    /// # Errors
    /// When an admitted batch does not decode: nothing of it is counted (as when prost rejects a
    /// message), and the caller ends the emitter's stream.
    pub async fn accept_encoded(&self, raw: RawBatch) -> Result<(), Status> {
        let total = raw.count;
        if total == 0 {
            return Ok(());
        }
        if self.refused_while_closed(total, true) {
            return Ok(());
        }
        let metrics = self.ledger.metrics();
        let estimate = raw
            .body
            .len()
            .saturating_mul(RESERVE_FACTOR)
            .saturating_add(total.saturating_mul(self.tunables.fixed_cost() as usize));
        let (wait, full) = self.wait_policy();
        // Fair shedding (decision 30) while the budget is under pressure but the batch fits and
        // something drains it; a batch that cannot fit is shed whole from its framing, unread.
        let pressure = self.ledger.pressure();
        let now = std::time::Instant::now();
        // One lock per batch while the pipeline is easy: the capacity sample, and whether a
        // destination over its share wants the sources recorded.
        let tracking = {
            let mut fair = self.fair.lock();
            fair.measure(self.ledger.freed(), now);
            fair.tracking_wanted(now)
        };
        if pressure >= fair::TRACK_FROM
            && full != DropReason::NoDoppler
            && self.ledger.free_bytes() >= estimate
        {
            return self.accept_fairly(raw, pressure).await;
        }
        let reserved = self.ledger.reserve(estimate, wait).await;
        // From here on no `.await`: decision and counts land together.
        let Some(reserved) = reserved else {
            metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
            self.ledger.refused(full, total);
            return Ok(());
        };
        let (batch, oversize) = match self.price(raw.body) {
            Ok(read) => read,
            Err(e) => {
                self.ledger.shrink(reserved);
                // prost's message already says "failed to decode Protobuf message".
                return Err(Status::internal(e.to_string()));
            }
        };
        let (batch, limited, refusals) = self.limit(batch);
        if tracking && !self.limits_on() {
            // A destination is over its share: record who sends what, for the sequencer (with
            // limits on, `limit` did).
            self.fair.lock().observe(&offers_of(&batch), now);
        }
        metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
        self.ledger.refused(DropReason::Oversize, oversize);
        self.ledger.refused(DropReason::SourceRateLimited, limited);
        self.note_limited(refusals);
        let (n, bytes) = (batch.len(), batch.bytes());
        if !self.ledger.settle(reserved, n, bytes) {
            self.ledger.refused(full, n);
            return Ok(());
        }
        self.hand_over(batch);
        Ok(())
    }

    /// [`Edge::accept_encoded`] while the budget is under pressure: reads the batch first (the
    /// source ids, in place), leaves out the envelopes of sources over their fair share
    /// (`fair_share`), then admits the rest as [`Edge::accept`] does.
    async fn accept_fairly(&self, raw: RawBatch, pressure: f64) -> Result<(), Status> {
        let total = raw.count;
        let (batch, oversize) = self
            .price(raw.body)
            .map_err(|e| Status::internal(e.to_string()))?;
        let (batch, limited, refusals) = self.limit(batch);
        let (batch, shed) = self.shed_unfairly(batch, pressure, self.limits_on());
        let (n, bytes) = (batch.len(), batch.bytes());
        let (wait, full) = self.wait_policy();
        let admitted = n > 0 && self.ledger.admit(n, bytes, wait).await;
        // From here on no `.await`: decision and counts land together.
        let metrics = self.ledger.metrics();
        metrics.ingress.fetch_add(total as u64, Ordering::Relaxed);
        self.ledger.refused(DropReason::Oversize, oversize);
        self.ledger.refused(DropReason::SourceRateLimited, limited);
        self.note_limited(refusals);
        self.ledger.refused(DropReason::FairShare, shed);
        if !admitted {
            self.ledger.refused(full, n);
            return Ok(());
        }
        self.hand_over(batch);
        Ok(())
    }

    /// `batch` without the envelopes fair shedding refuses, and how many it refused;
    /// `observed`: the rate limits already recorded what it offers.
    fn shed_unfairly(&self, batch: Batch, pressure: f64, observed: bool) -> (Batch, usize) {
        let budget = self.ledger.max_bytes();
        let freed = self.ledger.freed();
        filter(batch, |offers, keep| {
            self.fair.lock().decide(
                offers,
                (pressure, budget),
                freed,
                std::time::Instant::now(),
                keep,
                observed,
            )
        })
    }

    fn limits_on(&self) -> bool {
        self.limits_on.load(Ordering::Relaxed)
    }

    /// `batch` without the envelopes over their source's rate limit, how many those were, and
    /// by source (for [`Edge::note_limited`], once they are counted). What the sources offered
    /// within their limits goes into the fair table (what a limit refuses is no demand).
    fn limit(&self, batch: Batch) -> (Batch, usize, Refusals) {
        let mut refusals = Refusals::new();
        if !self.limits_on() {
            return (batch, 0, refusals);
        }
        let (batch, refused) = filter(batch, |offers, keep| {
            let now = std::time::Instant::now();
            let refused = self.limiter.lock().decide(offers, now, keep, &mut refusals);
            let kept: Vec<fair::Offer> = offers
                .iter()
                .zip(keep.iter())
                .filter(|(_, k)| **k)
                .map(|(o, _)| fair::Offer {
                    source: o.source,
                    bytes: o.bytes,
                })
                .collect();
            self.fair.lock().observe(&kept, now);
            refused
        });
        (batch, refused, refusals)
    }

    /// Counts `refusals` for the sources' notices and the heaviest sources' report: after the
    /// last `.await` of an admission, with the drops.
    fn note_limited(&self, refusals: Refusals) {
        if refusals.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        {
            let mut fair = self.fair.lock();
            for (source, n) in &refusals {
                fair.rate_limited(source, *n as usize, now);
            }
        }
        self.limiter.lock().note(refusals);
    }

    /// The `limits.top_sources` heaviest sources now (tracked while the pipeline is under
    /// pressure or rate limits are configured).
    pub fn heaviest(&self) -> Vec<Heavy> {
        let n = self.top_sources.load(Ordering::Relaxed);
        self.fair.lock().heaviest(n, std::time::Instant::now())
    }

    /// Reads and prices each envelope without decoding it; those too large for any Doppler are
    /// left out and counted in the second value.
    ///
    /// The reader faces the network, so a panic in it is caught: the batch is refused like one
    /// that does not decode, and the caller's reservation and task survive.
    fn price(&self, body: Bytes) -> Result<(Batch, usize), ReadError> {
        catch(|| read_batch(body, self.tunables.fixed_cost(), MAX_ENVELOPE_COST)).unwrap_or_else(
            |panic| {
                panic.report(ActorName::Edge, self.ledger.metrics());
                Err(ReadError::Panicked(panic.0))
            },
        )
    }

    /// Passes an admitted batch to the ingress actor (or drops it, counted, if that cannot be).
    fn hand_over(&self, batch: Batch) {
        let (n, bytes) = (batch.len(), batch.bytes());
        if *self.closed.borrow() {
            // Shutdown began while this call waited: the drain may already be past its barrier.
            self.ledger.dropped(DropReason::ShuttingDown, n, bytes);
            return;
        }
        if let Err(e) = self.ingress.try_send(IngressBatch(batch)) {
            // Closed: not shutting down (checked above), so the ingress actor is gone and the
            // agent is stopping itself over it.
            let (reason, _) = refused(e, DropReason::IngressQueueFull);
            self.ledger.dropped(reason, n, bytes);
        }
    }
}

/// `batch` with only the envelopes `decide` keeps (it fills `keep`, one flag per envelope, and
/// returns how many it refused), and that count.
fn filter(
    batch: Batch,
    decide: impl FnOnce(&[fair::Offer], &mut Vec<bool>) -> usize,
) -> (Batch, usize) {
    let offers = offers_of(&batch);
    let mut keep = Vec::with_capacity(offers.len());
    let refused = decide(&offers, &mut keep);
    drop(offers);
    if refused == 0 {
        return (batch, 0);
    }
    let mut kept = batch.part();
    for (item, k) in batch.items().iter().zip(&keep) {
        if *k {
            kept.push(*item);
        }
    }
    (kept, refused)
}

/// Each envelope of `batch` as the per-source policies see it: its source, read in place, and
/// its cost.
fn offers_of(batch: &Batch) -> Vec<fair::Offer<'_>> {
    batch
        .items()
        .iter()
        .map(|i| fair::Offer {
            source: batch.bytes_of(i.source),
            bytes: i.cost as usize,
        })
        .collect()
}

/// An `EnvelopeBatch` as it arrived: its bytes, and how many envelopes its framing holds.
#[derive(Debug, Clone)]
pub struct RawBatch {
    pub body: Bytes,
    pub count: usize,
}

/// Decodes `EnvelopeBatch` messages only as far as [`RawBatch`]; encodes the (empty) response
/// `R` with prost.
#[derive(Debug)]
pub struct RawBatchCodec<R>(std::marker::PhantomData<fn() -> R>);

impl<R> Default for RawBatchCodec<R> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<R: prost::Message + Send + 'static> Codec for RawBatchCodec<R> {
    type Encode = R;
    type Decode = RawBatch;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self::default()
    }

    fn decoder(&mut self) -> Self {
        Self::default()
    }
}

impl<R: prost::Message> Encoder for RawBatchCodec<R> {
    type Item = R;
    type Error = Status;

    fn encode(&mut self, item: R, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("cannot encode a response: {e}")))
    }
}

impl<R> Decoder for RawBatchCodec<R> {
    type Item = RawBatch;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RawBatch>, Status> {
        use prost::bytes::Buf;
        let body = src.copy_to_bytes(src.remaining());
        let count = count_batch(&body).map_err(|e| {
            Status::internal(format!(
                "failed to decode Protobuf message: EnvelopeBatch.batch: {e}"
            ))
        })?;
        Ok(Some(RawBatch { body, count }))
    }
}

/// The gRPC service. Malformed or oversize messages end that emitter's stream (as upstream);
/// envelopes it sent before are kept.
pub struct IngressService {
    edge: Edge,
    stream_errors: Arc<RateLimit>,
}

impl IngressService {
    /// The service as tonic serves it: `BatchSender` and `Send` on the undecoded path,
    /// `Sender` through the generated server.
    pub fn router(edge: Edge) -> IngressRouter {
        let service = Arc::new(Self {
            edge,
            stream_errors: Arc::new(RateLimit::new(Duration::from_secs(10))),
        });
        IngressRouter {
            generated: IngressServer::from_arc(service.clone())
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            service,
        }
    }

    /// Reads undecoded batches until the stream ends, the emitter errs or shutdown begins.
    async fn pump_encoded(&self, mut stream: Streaming<RawBatch>) -> Result<(), Status> {
        let mut closed = self.edge.closed.clone();
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                _ = closed.wait_for(|c| *c) => return Ok(()),
            };
            let accepted = match next {
                Ok(Some(raw)) => self.edge.accept_encoded(raw).await,
                Ok(None) => return Ok(()),
                Err(status) => Err(status),
            };
            if let Err(status) = accepted {
                self.stream_error(&status);
                return Err(status);
            }
        }
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

/// Routes `BatchSender` and `Send` to the undecoded path and everything else to the generated
/// server, under the one service name `loggregator.v2.Ingress`.
#[derive(Clone)]
pub struct IngressRouter {
    generated: IngressServer<IngressService>,
    service: Arc<IngressService>,
}

impl NamedService for IngressRouter {
    const NAME: &'static str = "loggregator.v2.Ingress";
}

struct EncodedBatchSender(Arc<IngressService>);

impl tonic::server::ClientStreamingService<RawBatch> for EncodedBatchSender {
    type Response = BatchSenderResponse;
    type Future = BoxFuture<Response<BatchSenderResponse>, Status>;

    fn call(&mut self, request: Request<Streaming<RawBatch>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            service.pump_encoded(request.into_inner()).await?;
            Ok(Response::new(BatchSenderResponse {}))
        })
    }
}

/// `Send`. Its errors are counted by the router, with those tonic answers before the handler
/// (oversize, bad framing).
struct EncodedSend(Arc<IngressService>);

impl tonic::server::UnaryService<RawBatch> for EncodedSend {
    type Response = SendResponse;
    type Future = BoxFuture<Response<SendResponse>, Status>;

    fn call(&mut self, request: Request<RawBatch>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            service.edge.accept_encoded(request.into_inner()).await?;
            Ok(Response::new(SendResponse {}))
        })
    }
}

impl<B> Service<http::Request<B>> for IngressRouter
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> Poll<Result<(), std::convert::Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limits = (Some(MAX_GRPC_MESSAGE_BYTES), Some(MAX_GRPC_MESSAGE_BYTES));
        match req.uri().path() {
            "/loggregator.v2.Ingress/BatchSender" => {
                let method = EncodedBatchSender(self.service.clone());
                Box::pin(async move {
                    let mut grpc =
                        tonic::server::Grpc::new(RawBatchCodec::<BatchSenderResponse>::default())
                            .apply_max_message_size_config(limits.0, limits.1);
                    Ok(grpc.client_streaming(method, req).await)
                })
            }
            "/loggregator.v2.Ingress/Send" => {
                let method = EncodedSend(self.service.clone());
                let service = self.service.clone();
                Box::pin(async move {
                    let mut grpc =
                        tonic::server::Grpc::new(RawBatchCodec::<SendResponse>::default())
                            .apply_max_message_size_config(limits.0, limits.1);
                    let response = grpc.unary(method, req).await;
                    // A unary error, the handler's or tonic's, is answered trailers-only: its
                    // status is in the headers. A success carries it in the trailers.
                    if let Some(status) = Status::from_header_map(response.headers()) {
                        service.stream_error(&status);
                    }
                    Ok(response)
                })
            }
            _ => self.generated.call(req),
        }
    }
}

/// The generated server's view; `BatchSender` and `Send` reach [`IngressRouter`]'s undecoded
/// path instead and are served here only if called directly.
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
