//! The Doppler side of a connection: the slot's queue, the BatchSender request stream that pulls
//! from it, and dialing with mTLS and keepalive.
//!
//! The queue belongs to the slot, not to a connection: when a connection dies, what it had not yet
//! taken stays queued for the next one, wherever the slot reconnects.
//!
//! **Acknowledged delivery.** A BatchSender stream is never answered per message, so an envelope
//! handed to a stream is only *in flight* until the Doppler answers the end of that stream. The
//! connection therefore ends its stream every `dopplers.ack_interval_ms` or `dopplers.ack_bytes`
//! (whichever comes first), waits for the answer and opens the next stream on the same HTTP/2
//! connection. The answer confirms everything the stream carried: only then does it count as
//! `egress`. If the connection dies first, what is in flight is counted as dropped
//! (`connection_lost`): some of it may have arrived, none of it is lost silently, and the amount
//! is bounded by the acknowledgement window.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::bytes::BufMut;
use prost::Message;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::envelope::encoded::EncodedBatch;
use crate::proto::BatchSenderResponse;
use crate::telemetry::{DropReason, Ledger};

/// Limits on one outgoing `EnvelopeBatch`, in envelopes and in bytes. Bytes are counted as the
/// envelopes' admission costs, an upper bound on their size on the wire.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_envelopes: usize,
    pub max_bytes: usize,
}

impl BatchLimits {
    /// How many leading envelopes of `batch` fit in one message (at least one).
    fn fitting_prefix(&self, batch: &EncodedBatch) -> usize {
        let mut bytes = 0;
        for (i, cost) in batch.costs().iter().enumerate() {
            bytes += *cost as usize;
            if i > 0 && (i + 1 > self.max_envelopes || bytes > self.max_bytes) {
                return i;
            }
        }
        batch.len().min(self.max_envelopes).max(1)
    }
}

/// One outgoing `EnvelopeBatch` message: queued batches taken together. They are written one
/// after another into the message body rather than merged first, which would copy every byte
/// once more whenever a backlog lets several go at once.
#[derive(Debug, Default)]
pub struct OutgoingBatch {
    parts: Vec<EncodedBatch>,
    len: usize,
    bytes: usize,
}

impl OutgoingBatch {
    fn add(&mut self, part: EncodedBatch) {
        self.len += part.len();
        self.bytes += part.bytes();
        self.parts.push(part);
    }

    /// Envelopes in the message.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The message's budget cost.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Default)]
struct Inner {
    batches: VecDeque<EncodedBatch>,
    envelopes: usize,
    /// Since when the queue has held data without a stream taking any (progress watchdog).
    waiting_since: Option<Instant>,
    /// The stream's waker while it waits for data.
    waker: Option<Waker>,
    /// Shutdown: the stream ends once the queue is empty.
    closing: bool,
    /// Streams of an older epoch end at their next poll (recycling a connection): nothing is
    /// taken from the queue for them any more.
    epoch: u64,
    /// Taken by a stream whose Doppler has not acknowledged it yet: (envelopes, budget bytes).
    in_flight: (usize, usize),
    /// Since when something has been in flight.
    in_flight_since: Option<Instant>,
}

/// One slot's queue of signed batches, shared by the connection actor (which pushes) and the
/// current BatchSender stream (which pulls).
///
/// The sequencer *routes* bytes to the slot before it stamps them ([`EgressQueue::route`]) and they
/// stay counted until a Doppler acknowledges them, the connection loses them, or they are dropped
/// on the way
/// ([`EgressQueue::unroute`]); the sequencer uses these counts to keep every slot's share of the
/// budget available to it (see `actors::sequencer::may_route`).
#[derive(Default)]
pub struct EgressQueue {
    inner: Mutex<Inner>,
    /// Budget bytes routed to this slot and not yet acknowledged, lost or dropped.
    routed: AtomicUsize,
    /// Bytes a stream may carry before it must be acknowledged, beyond `ack_bytes`: half the
    /// slot's guaranteed share (0: no limit). In flight, bytes hold their share until the
    /// Doppler answers; a window as large as the share would let a slot fill its share with
    /// what it sent, take nothing more, and so never reach the window: only the timer
    /// (`ack_interval_ms`) would end the stream.
    window: AtomicUsize,
}

impl EgressQueue {
    /// Counts `bytes` as routed to this slot.
    pub fn route(&self, bytes: usize) {
        self.routed.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Routed bytes that will never reach the queue (dropped on the way).
    pub fn unroute(&self, bytes: usize) {
        let prev = self.routed.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(prev >= bytes, "unrouted more than was routed");
    }

    /// Budget bytes routed to this slot and not yet taken.
    pub fn routed(&self) -> usize {
        self.routed.load(Ordering::Acquire)
    }

    /// Sets the most a stream may carry unacknowledged, whatever `ack_bytes` says (the sequencer
    /// sets half the slot's share, and again when a reload changes the budget).
    pub fn set_window(&self, bytes: usize) {
        self.window.store(bytes, Ordering::Release);
    }

    /// The acknowledgement window in bytes: `ack_bytes`, or less (see [`EgressQueue::set_window`]).
    fn window_within(&self, ack_bytes: usize) -> usize {
        match self.window.load(Ordering::Acquire) {
            0 => ack_bytes,
            w => w.min(ack_bytes),
        }
    }

    pub fn push(&self, batch: EncodedBatch) {
        if batch.is_empty() {
            return;
        }
        let waker = {
            let mut q = self.inner.lock();
            q.envelopes += batch.len();
            if q.batches.is_empty() {
                q.waiting_since = Some(Instant::now());
            }
            q.batches.push_back(batch);
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn envelopes(&self) -> usize {
        self.inner.lock().envelopes
    }

    /// Batches waiting in the queue.
    pub fn batches(&self) -> usize {
        self.inner.lock().batches.len()
    }

    /// Envelopes taken by a stream and not yet acknowledged by its Doppler.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight.0
    }

    /// Hands over what is in flight (envelopes, budget bytes): acknowledged, or lost with the
    /// connection. Either way it leaves the slot exactly once, and only now stops counting
    /// against the slot's share (a Doppler that stopped reading holds what it was sent).
    pub fn take_in_flight(&self) -> (usize, usize) {
        let mut q = self.inner.lock();
        q.in_flight_since = None;
        let (n, bytes) = std::mem::take(&mut q.in_flight);
        self.unroute(bytes);
        (n, bytes)
    }

    /// How long the slot has gone without progress, zero when empty or progressing: queued data
    /// no stream took, or data in flight longer than `ack_interval` without an acknowledgement.
    pub fn stalled_for(&self, ack_interval: Duration) -> Duration {
        let q = self.inner.lock();
        let waiting = q.waiting_since.map_or(Duration::ZERO, |t| t.elapsed());
        let unacknowledged = q
            .in_flight_since
            .map_or(Duration::ZERO, |t| t.elapsed().saturating_sub(ack_interval));
        waiting.max(unacknowledged)
    }

    /// A new stream starts: what waited for it has not waited on *it*.
    pub fn restart_progress_clock(&self) {
        let mut q = self.inner.lock();
        if q.waiting_since.is_some() {
            q.waiting_since = Some(Instant::now());
        }
    }

    /// Ends the current stream at once, leaving the queue for the slot's next one.
    pub fn end_stream(&self) {
        let waker = {
            let mut q = self.inner.lock();
            q.epoch += 1;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Shutdown has closed the queue and nothing is left in it.
    fn is_drained(&self) -> bool {
        let q = self.inner.lock();
        q.closing && q.batches.is_empty()
    }

    /// Ends the current stream once the queue is empty (shutdown).
    pub fn close(&self) {
        let waker = {
            let mut q = self.inner.lock();
            q.closing = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Takes the next outgoing batch: whole queued batches merged while they fit the limits, or
    /// the fitting prefix of an oversized one.
    fn poll_take(
        &self,
        cx: &mut Context<'_>,
        limits: &BatchLimits,
        epoch: u64,
    ) -> Poll<Option<OutgoingBatch>> {
        let mut q = self.inner.lock();
        if q.epoch != epoch {
            return Poll::Ready(None);
        }
        let Some(mut first) = q.batches.pop_front() else {
            if q.closing {
                return Poll::Ready(None);
            }
            q.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        let fit = limits.fitting_prefix(&first);
        let mut out = OutgoingBatch::default();
        if fit < first.len() {
            let rest = first.split_off(fit);
            q.batches.push_front(rest);
            out.add(first);
        } else {
            out.add(first);
            while let Some(next) = q.batches.front() {
                if out.len() + next.len() > limits.max_envelopes
                    || out.bytes() + next.bytes() > limits.max_bytes
                {
                    break;
                }
                out.add(q.batches.pop_front().expect("front exists"));
            }
        }
        q.envelopes -= out.len();
        let now = Instant::now();
        q.waiting_since = (!q.batches.is_empty()).then_some(now);
        q.in_flight.0 += out.len();
        q.in_flight.1 += out.bytes();
        q.in_flight_since.get_or_insert(now);
        Poll::Ready(Some(out))
    }
}

/// How a connection uses its streams: message limits and the acknowledgement window.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    pub limits: BatchLimits,
    /// A stream ends (and is acknowledged) at most this long after it first carried data...
    pub ack_interval: Duration,
    /// ...or once it has carried this many budget bytes.
    pub ack_bytes: usize,
}

/// The request stream of one `Ingress.BatchSender` call: pulls from the slot's queue until the
/// acknowledgement window is full, the connection is recycled, or the queue is drained.
pub struct EgressStream {
    queue: Arc<EgressQueue>,
    settings: StreamSettings,
    epoch: u64,
    carried: usize,
    /// Armed when the stream first carries data: when the acknowledgement window closes.
    ack_due: Option<Pin<Box<Sleep>>>,
    /// Set when the stream ended because its acknowledgement window was full.
    rotated: Arc<AtomicBool>,
}

impl EgressStream {
    fn new(queue: Arc<EgressQueue>, settings: StreamSettings, rotated: Arc<AtomicBool>) -> Self {
        let epoch = queue.epoch();
        Self {
            queue,
            settings,
            epoch,
            carried: 0,
            ack_due: None,
            rotated,
        }
    }

    fn rotate(&mut self) -> Poll<Option<OutgoingBatch>> {
        self.rotated.store(true, Ordering::Release);
        Poll::Ready(None)
    }
}

impl Stream for EgressStream {
    type Item = OutgoingBatch;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<OutgoingBatch>> {
        let this = self.get_mut();
        let window = this.queue.window_within(this.settings.ack_bytes);
        if this.rotated.load(Ordering::Acquire) || this.carried >= window {
            return this.rotate();
        }
        // The window closes on time even while a backlog keeps the queue non-empty.
        if let Some(due) = this.ack_due.as_mut() {
            if due.as_mut().poll(cx).is_ready() {
                return this.rotate();
            }
        }
        match this.queue.poll_take(cx, &this.settings.limits, this.epoch) {
            Poll::Ready(Some(batch)) => {
                this.carried += batch.bytes();
                if this.ack_due.is_none() {
                    let due = tokio::time::Instant::now() + this.settings.ack_interval;
                    this.ack_due = Some(Box::pin(tokio::time::sleep_until(due)));
                }
                Poll::Ready(Some(batch))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.ack_due.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => this.rotate(),
                _ => Poll::Pending,
            },
        }
    }
}

/// Why a connection's streams stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Shutdown: the queue was closed and everything taken was acknowledged.
    Drained,
    /// The connection was recycled ([`EgressQueue::end_stream`]); everything taken was
    /// acknowledged.
    Recycled,
    /// The Doppler answered before the stream ended; what is in flight was not acknowledged.
    ClosedByDoppler,
    /// The stream failed; what is in flight was not acknowledged (the caller counts it).
    Failed(String),
}

/// Whether `status` is how an upstream Doppler answers a stream the sender ended: its handler
/// returns the `io.EOF` from `Recv`, which gRPC-Go sends as `Unknown: EOF`. It comes only after
/// the handler has read every message, so it acknowledges them like `OK` does.
fn is_upstream_eof(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unknown && status.message() == "EOF"
}

/// `Ingress.BatchSender` with envelopes that are already encoded: the request body is the parts'
/// bodies written as they are (see [`EncodedBatch::as_message_body`]), the response decoded with
/// prost.
#[derive(Debug, Clone, Copy, Default)]
struct PreEncodedCodec;

impl Codec for PreEncodedCodec {
    type Encode = OutgoingBatch;
    type Decode = BatchSenderResponse;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for PreEncodedCodec {
    type Item = OutgoingBatch;
    type Error = tonic::Status;

    fn encode(&mut self, item: OutgoingBatch, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        // One allocation of the message's size: tonic's buffer would otherwise grow by doubling,
        // copying the body each time.
        dst.reserve(item.parts.iter().map(|p| p.as_message_body().len()).sum());
        for part in &item.parts {
            dst.put_slice(part.as_message_body());
        }
        Ok(())
    }
}

impl Decoder for PreEncodedCodec {
    type Item = BatchSenderResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        BatchSenderResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable response: {e}")))
    }
}

const BATCH_SENDER: &str = "/loggregator.v2.Ingress/BatchSender";

/// Opens one BatchSender stream carrying `stream`.
async fn batch_sender(
    grpc: &mut tonic::client::Grpc<Channel>,
    stream: EgressStream,
) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(BATCH_SENDER);
    grpc.client_streaming(tonic::Request::new(stream), path, PreEncodedCodec)
        .await
        .map(|_| ())
}

/// Runs one connection's BatchSender streams, one after another on the same HTTP/2 connection,
/// counting each stream's envelopes as delivered when its Doppler acknowledges its end. Returns
/// when the connection should stop; on failure, what is in flight stays in the queue's count for
/// the caller (see [`EgressQueue::take_in_flight`]).
pub async fn run_streams(
    channel: Channel,
    queue: Arc<EgressQueue>,
    ledger: Arc<Ledger>,
    settings: StreamSettings,
) -> StreamEnd {
    let mut grpc =
        tonic::client::Grpc::new(channel).max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    loop {
        let rotated = Arc::new(AtomicBool::new(false));
        let stream = EgressStream::new(queue.clone(), settings, rotated.clone());
        let epoch = stream.epoch;
        let res = batch_sender(&mut grpc, stream).await;
        let recycled = queue.epoch() != epoch;
        let rotated = rotated.load(Ordering::Acquire);
        let ended_by_us = rotated || recycled || queue.is_drained();
        match res {
            Ok(_) if ended_by_us => {}
            Err(status) if ended_by_us && is_upstream_eof(&status) => {}
            // An answer before the end: gRPC discarded whatever the Doppler had not read, so what
            // is in flight is not acknowledged (the caller counts it as lost).
            Ok(_) => return StreamEnd::ClosedByDoppler,
            Err(status) => return StreamEnd::Failed(status.to_string()),
        }
        let (n, bytes) = queue.take_in_flight();
        ledger.delivered(n, bytes);
        if recycled {
            return StreamEnd::Recycled;
        }
        if queue.is_drained() {
            return StreamEnd::Drained;
        }
    }
}

/// Counts what a dead connection left in flight as lost; returns how many envelopes that was.
pub fn count_lost_in_flight(queue: &EgressQueue, ledger: &Ledger) -> usize {
    let (n, bytes) = queue.take_in_flight();
    if n > 0 {
        ledger.dropped(DropReason::ConnectionLost, n, bytes);
    }
    n
}

/// How to dial a Doppler.
#[derive(Debug, Clone)]
pub struct DialSettings {
    pub tls: ClientTlsConfig,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid Doppler address {0:?}")]
    Address(String),
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
}

/// Opens one HTTP/2 connection (mTLS, keepalive as upstream) to `addr` (`host:port`).
///
/// # Errors
/// When the address is invalid or the TCP/TLS/HTTP2 handshake fails.
pub async fn dial(addr: &str, s: &DialSettings) -> Result<Channel, DialError> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|_| DialError::Address(addr.to_owned()))?
        .tls_config(s.tls.clone())
        .map_err(DialError::Connect)?
        .connect_timeout(s.connect_timeout)
        .http2_keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    endpoint.connect().await.map_err(DialError::Connect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Envelope;
    use crate::telemetry::Metrics;

    fn batch(n: usize, cost: u32) -> EncodedBatch {
        let mut b = EncodedBatch::default();
        for _ in 0..n {
            b.push(&Envelope::default(), cost);
        }
        b
    }

    /// Pushes as the pipeline does: routed by the sequencer first.
    fn push(q: &EgressQueue, b: EncodedBatch) {
        q.route(b.bytes());
        q.push(b);
    }

    fn take(q: &EgressQueue, limits: &BatchLimits) -> Option<OutgoingBatch> {
        let mut cx = Context::from_waker(Waker::noop());
        match q.poll_take(&mut cx, limits, q.epoch()) {
            Poll::Ready(b) => b,
            Poll::Pending => None,
        }
    }

    #[test]
    fn merges_small_batches_and_splits_large_ones() {
        let limits = BatchLimits {
            max_envelopes: 10,
            max_bytes: 1000,
        };
        let q = EgressQueue::default();
        push(&q, batch(3, 10));
        push(&q, batch(3, 10));
        push(&q, batch(25, 10));
        assert_eq!(take(&q, &limits).unwrap().len(), 6);
        assert_eq!(take(&q, &limits).unwrap().len(), 10);
        assert_eq!(take(&q, &limits).unwrap().len(), 10);
        assert_eq!(take(&q, &limits).unwrap().len(), 5);
        assert!(take(&q, &limits).is_none());
        // bytes bound: 300-byte envelopes, 1000 bytes → 3 per message
        push(&q, batch(7, 300));
        assert_eq!(take(&q, &limits).unwrap().len(), 3);
        assert_eq!(q.envelopes(), 4);
        // a single envelope above the bound still goes, alone
        let q = EgressQueue::default();
        push(&q, batch(2, 5000));
        assert_eq!(take(&q, &limits).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn taken_envelopes_stay_in_flight_until_acknowledged_or_lost() {
        use tokio_stream::StreamExt;
        let metrics = Arc::new(Metrics::new());
        let ledger = Arc::new(Ledger::new(metrics.clone(), 1 << 20));
        assert!(ledger.try_admit(6, 60));
        let q = Arc::new(EgressQueue::default());
        let settings = StreamSettings {
            limits: BatchLimits {
                max_envelopes: 4,
                max_bytes: 1 << 20,
            },
            ack_interval: Duration::from_secs(3600),
            ack_bytes: 1 << 20,
        };
        let rotated = Arc::new(AtomicBool::new(false));
        let mut s = EgressStream::new(q.clone(), settings, rotated.clone());
        push(&q, batch(6, 10));
        assert_eq!(s.next().await.unwrap().len(), 4);
        assert_eq!((q.in_flight(), q.envelopes()), (4, 2));
        assert_eq!(metrics.snapshot().egress, 0, "not acknowledged yet");
        q.close();
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert!(
            s.next().await.is_none(),
            "closed and empty: the stream ends"
        );
        assert!(!rotated.load(Ordering::Acquire));
        assert_eq!(count_lost_in_flight(&q, &ledger), 6);
        let snap = metrics.snapshot();
        assert_eq!(snap.dropped_by(DropReason::ConnectionLost), 6);
        assert_eq!(ledger.buffered(), (0, 0));
        assert_eq!(q.take_in_flight(), (0, 0), "counted once");
    }

    #[tokio::test]
    async fn a_full_acknowledgement_window_ends_the_stream() {
        use tokio_stream::StreamExt;
        let q = Arc::new(EgressQueue::default());
        let settings = StreamSettings {
            limits: BatchLimits {
                max_envelopes: 2,
                max_bytes: 1 << 20,
            },
            ack_interval: Duration::from_secs(3600),
            ack_bytes: 30,
        };
        let rotated = Arc::new(AtomicBool::new(false));
        let mut s = EgressStream::new(q.clone(), settings, rotated.clone());
        push(&q, batch(5, 10));
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert!(s.next().await.is_none(), "40 bytes carried, window 30");
        assert!(rotated.load(Ordering::Acquire));
        assert_eq!((q.in_flight(), q.envelopes()), (4, 1));
    }

    /// The slot's window (half its share, set by the sequencer) ends a stream before `ack_bytes`
    /// would: a slot must never hold its whole share in flight and wait for the timer.
    #[tokio::test]
    async fn a_window_smaller_than_ack_bytes_ends_the_stream_first() {
        use tokio_stream::StreamExt;
        let q = Arc::new(EgressQueue::default());
        q.set_window(30);
        let settings = StreamSettings {
            limits: BatchLimits {
                max_envelopes: 2,
                max_bytes: 1 << 20,
            },
            ack_interval: Duration::from_secs(3600),
            ack_bytes: 1 << 20,
        };
        let rotated = Arc::new(AtomicBool::new(false));
        let mut s = EgressStream::new(q.clone(), settings, rotated.clone());
        push(&q, batch(5, 10));
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert!(s.next().await.is_none(), "40 bytes carried, window 30");
        assert!(rotated.load(Ordering::Acquire));
        assert_eq!(q.window_within(20), 20, "ack_bytes still bounds it");
    }

    #[tokio::test]
    async fn an_idle_stream_with_data_in_flight_ends_after_the_interval() {
        use tokio_stream::StreamExt;
        let q = Arc::new(EgressQueue::default());
        let settings = StreamSettings {
            limits: BatchLimits {
                max_envelopes: 10,
                max_bytes: 1 << 20,
            },
            ack_interval: Duration::from_millis(20),
            ack_bytes: 1 << 20,
        };
        let rotated = Arc::new(AtomicBool::new(false));
        let mut s = EgressStream::new(q.clone(), settings, rotated.clone());
        push(&q, batch(3, 10));
        assert_eq!(s.next().await.unwrap().len(), 3);
        // Nothing more is queued: only the acknowledgement timer can end the stream.
        let end = tokio::time::timeout(Duration::from_secs(10), s.next()).await;
        assert!(end.expect("the stream ends by itself").is_none());
        assert!(rotated.load(Ordering::Acquire));
    }
}
