//! The Doppler side of a connection: the BatchSender request stream that pulls from the slot's
//! queue ([`crate::envelope::queue`]), and dialing with mTLS and keepalive.
//!
//! **Acknowledged delivery.** A BatchSender stream is never answered per message, so an envelope
//! handed to a stream is only *in flight* until the Doppler answers the end of that stream. The
//! connection therefore ends its stream every `dopplers.ack_interval_ms` or `dopplers.ack_bytes`
//! (whichever comes first; less than `ack_bytes` when half the slot's budget share is smaller,
//! see [`EgressQueue::window_within`]), waits for the answer and opens the next stream on the same HTTP/2
//! connection. The answer confirms everything the stream carried: only then does it count as
//! `egress`. If the connection dies first, what is in flight is counted as dropped
//! (`connection_lost`): some of it may have arrived, none of it is lost silently, and the amount
//! is bounded by the acknowledgement window.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prost::bytes::BufMut;
use prost::Message;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::envelope::pacer::Replayed;
use crate::envelope::queue::{BatchLimits, EgressQueue, OutgoingBatch, Take};
use crate::proto::BatchSenderResponse;
use crate::telemetry::{Ledger, Metrics};

/// How a connection uses its streams: message limits and the acknowledgement window.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    pub limits: BatchLimits,
    /// A stream ends (and is acknowledged) at most this long after it first carried data...
    pub ack_interval: Duration,
    /// ...or once it has carried this many budget bytes (or the slot's window, if smaller).
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
    /// While a replay holds the queue back: when the pace allows the next envelope.
    paced: Option<Pin<Box<Sleep>>>,
    ledger: Arc<Ledger>,
}

impl EgressStream {
    fn new(
        queue: Arc<EgressQueue>,
        settings: StreamSettings,
        rotated: Arc<AtomicBool>,
        ledger: Arc<Ledger>,
    ) -> Self {
        let epoch = queue.epoch();
        Self {
            queue,
            settings,
            epoch,
            carried: 0,
            ack_due: None,
            rotated,
            paced: None,
            ledger,
        }
    }

    /// Waits `wait` for the pace (or, sooner, for a push: the queue holds the waker).
    fn pace(&mut self, wait: Duration, cx: &mut Context<'_>) {
        let due = tokio::time::Instant::now() + wait;
        let sleep = self
            .paced
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        sleep.as_mut().reset(due);
        if sleep.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    /// Nothing to send now: the stream waits, unless its acknowledgement window is due.
    fn idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<OutgoingBatch>> {
        match self.ack_due.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => self.rotate(),
            _ => Poll::Pending,
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
            Take::Batch(batch, replayed) => {
                if let Some(done) = replayed {
                    replay_ended(this.ledger.metrics(), done);
                }
                this.carried += batch.bytes();
                if this.ack_due.is_none() {
                    let due = tokio::time::Instant::now() + this.settings.ack_interval;
                    this.ack_due = Some(Box::pin(tokio::time::sleep_until(due)));
                }
                Poll::Ready(Some(batch))
            }
            Take::End => Poll::Ready(None),
            Take::Paced(wait) => {
                this.pace(wait, cx);
                this.idle(cx)
            }
            Take::Empty => this.idle(cx),
        }
    }
}

/// A connection starts: what its slot holds is a backlog, replayed paced
/// ([`crate::envelope::pacer`]). Returns the backlog in envelopes.
fn begin_replay(queue: &EgressQueue, metrics: &Metrics) -> usize {
    let (backlog, was) = queue.start_replay();
    match (backlog, was) {
        (0, true) => {
            metrics.doppler_replaying.fetch_sub(1, Ordering::Relaxed);
        }
        (0, false) => {}
        (_, was) => {
            metrics.doppler_replays.fetch_add(1, Ordering::Relaxed);
            if !was {
                metrics.doppler_replaying.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(backlog, "replaying the backlog, paced");
        }
    }
    backlog
}

/// A slot's replay ended: its backlog is sent.
fn replay_ended(metrics: &Metrics, done: Replayed) {
    metrics.doppler_replaying.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(
        envelopes = done.envelopes,
        took_ms = done.took.as_millis() as u64,
        "backlog replayed"
    );
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
        dst.reserve(item.parts().iter().map(|p| p.as_message_body().len()).sum());
        for part in item.parts() {
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

/// A unary request already encoded (the OTLP writer's export requests,
/// [`crate::otlp::encode`]), its answer `R` decoded with prost.
struct RawRequestCodec<R>(std::marker::PhantomData<fn() -> R>);

impl<R> Clone for RawRequestCodec<R> {
    fn clone(&self) -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<R: Message + Default + Send + 'static> Codec for RawRequestCodec<R> {
    type Encode = Vec<prost::bytes::Bytes>;
    type Decode = R;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        self.clone()
    }

    fn decoder(&mut self) -> Self {
        self.clone()
    }
}

impl<R> Encoder for RawRequestCodec<R> {
    type Item = Vec<prost::bytes::Bytes>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.reserve(item.iter().map(|b| b.len()).sum());
        for part in &item {
            dst.put_slice(part);
        }
        Ok(())
    }
}

impl<R: Message + Default> Decoder for RawRequestCodec<R> {
    type Item = R;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Self::Error> {
        R::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable response: {e}")))
    }
}

/// One unary call of `path` with `request` already encoded (in parts written one after
/// another: concatenated protobuf messages are one message); the answer decoded as `R`.
///
/// # Errors
/// The connection is not ready or the call fails.
pub async fn unary_encoded<R: Message + Default + Send + 'static>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    request: Vec<prost::bytes::Bytes>,
) -> Result<R, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(
        tonic::Request::new(request),
        path,
        RawRequestCodec(std::marker::PhantomData),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// `Ingress.Send` with envelopes already encoded: one batch, acknowledged by its answer (the
/// fan-out to downstream v2 agents, [`crate::actors::forward_connection`]).
///
/// # Errors
/// The connection is not ready or the call fails.
pub async fn send_batch(
    grpc: &mut tonic::client::Grpc<Channel>,
    batch: OutgoingBatch,
) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/loggregator.v2.Ingress/Send");
    grpc.unary(tonic::Request::new(batch), path, PreEncodedCodec)
        .await
        .map(|_| ())
}

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
    begin_replay(&queue, ledger.metrics());
    loop {
        let rotated = Arc::new(AtomicBool::new(false));
        let stream = EgressStream::new(queue.clone(), settings, rotated.clone(), ledger.clone());
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
        ledger.delivered_at(ledger.doppler(), n, bytes);
        if recycled {
            return StreamEnd::Recycled;
        }
        if queue.is_drained() {
            return StreamEnd::Drained;
        }
    }
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
    use crate::envelope::queue::count_lost_in_flight;
    use crate::envelope::queue::tests::{batch, push};
    use crate::telemetry::DropReason;
    use crate::telemetry::Metrics;

    fn test_ledger() -> Arc<Ledger> {
        Arc::new(Ledger::new(Arc::new(Metrics::new()), 1 << 20))
    }

    /// A stream on `q` (messages of at most `max_envelopes`), and its `rotated` flag.
    fn stream(
        q: &Arc<EgressQueue>,
        max_envelopes: usize,
        ack_interval: Duration,
        ack_bytes: usize,
        ledger: Arc<Ledger>,
    ) -> (EgressStream, Arc<AtomicBool>) {
        let settings = StreamSettings {
            limits: BatchLimits {
                max_envelopes,
                max_bytes: 1 << 20,
            },
            ack_interval,
            ack_bytes,
        };
        let rotated = Arc::new(AtomicBool::new(false));
        let s = EgressStream::new(q.clone(), settings, rotated.clone(), ledger);
        (s, rotated)
    }

    /// A connection that starts with a backlog sends it no faster than the pace: 200 held that
    /// built up over 10 s (20 a second: 30 a second of replay), 400 a second of floor; 100
    /// arriving meanwhile let one and a half times as many go.
    #[tokio::test]
    async fn a_backlog_at_the_start_of_a_connection_goes_at_the_replay_pace() {
        use crate::envelope::pacer::ReplayRate;
        use tokio_stream::StreamExt;
        let ledger = test_ledger();
        let q = Arc::new(EgressQueue::default());
        q.set_replay_rate(ReplayRate {
            extra: 0.5,
            floor: 400.0,
        });
        push(&q, batch(200, 10));
        q.backdate(Duration::from_secs(10));
        assert_eq!(begin_replay(&q, ledger.metrics()), 200);
        assert!(q.replaying());
        assert_eq!(ledger.metrics().snapshot().doppler_replaying, 1);
        let (mut s, _) = stream(&q, 1000, Duration::from_secs(3600), 1 << 30, ledger.clone());
        let started = std::time::Instant::now();
        let first = s.next().await.unwrap();
        assert!(first.len() < 200, "paced: not the whole backlog at once");
        // 100 arrive: 150 more may go at once, the backlog still first.
        push(&q, batch(100, 10));
        let mut taken = first.len();
        while taken < 300 {
            taken += s.next().await.unwrap().len();
        }
        assert_eq!(taken, 300);
        let elapsed = started.elapsed();
        assert!(!q.replaying(), "the backlog is sent: unpaced again");
        // 300 sent, 150 of them credited by the arrivals: time paid for the rest, at 430/s.
        assert!(
            elapsed >= Duration::from_millis(300),
            "150 envelopes at 430/s take 350 ms; took {elapsed:?}"
        );
        let m = ledger.metrics().snapshot();
        assert_eq!((m.doppler_replays, m.doppler_replaying), (1, 0));
    }

    #[tokio::test]
    async fn taken_envelopes_stay_in_flight_until_acknowledged_or_lost() {
        use tokio_stream::StreamExt;
        let metrics = Arc::new(Metrics::new());
        let ledger = Arc::new(Ledger::new(metrics.clone(), 1 << 20));
        assert!(ledger.try_admit(6, 60));
        ledger.offer(ledger.doppler(), 6, 60);
        let q = Arc::new(EgressQueue::default());
        let (mut s, rotated) = stream(&q, 4, Duration::from_secs(3600), 1 << 20, ledger.clone());
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
        let (mut s, rotated) = stream(&q, 2, Duration::from_secs(3600), 30, test_ledger());
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
        let (mut s, rotated) = stream(&q, 2, Duration::from_secs(3600), 1 << 20, test_ledger());
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
        let (mut s, rotated) = stream(&q, 10, Duration::from_millis(20), 1 << 20, test_ledger());
        push(&q, batch(3, 10));
        assert_eq!(s.next().await.unwrap().len(), 3);
        // Nothing more is queued: only the acknowledgement timer can end the stream.
        let end = tokio::time::timeout(Duration::from_secs(10), s.next()).await;
        assert!(end.expect("the stream ends by itself").is_none());
        assert!(rotated.load(Ordering::Acquire));
    }
}
