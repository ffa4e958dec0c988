//! The Doppler side of a connection: the slot's queue, the BatchSender request stream that pulls
//! from it, and dialing with mTLS and keepalive.
//!
//! The queue belongs to the slot, not to a connection: when a connection dies, what it had not yet
//! taken stays queued for the next one. An envelope counts as `egress` when the stream hands it to
//! tonic; only those (bounded by HTTP/2 flow control) can be lost with a dying socket.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_stream::Stream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::envelope::Batch;
use crate::proto::{ingress_client::IngressClient, EnvelopeBatch};
use crate::telemetry::Ledger;

/// Limits on one outgoing `EnvelopeBatch`, in envelopes and in bytes. Bytes are counted as the
/// envelopes' admission costs, an upper bound on their size on the wire.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_envelopes: usize,
    pub max_bytes: usize,
}

impl BatchLimits {
    /// How many leading envelopes of `batch` fit in one message (at least one).
    fn fitting_prefix(&self, batch: &Batch) -> usize {
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

#[derive(Default)]
struct Inner {
    batches: VecDeque<Batch>,
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
}

/// One slot's queue of signed batches, shared by the connection actor (which pushes) and the
/// current BatchSender stream (which pulls).
///
/// The sequencer *routes* bytes to the slot before it stamps them ([`EgressQueue::route`]) and they
/// stay counted until a stream takes them or they are dropped on the way
/// ([`EgressQueue::unroute`]); the sequencer uses these counts to keep every slot's share of the
/// budget available to it (see `actors::sequencer::may_route`).
#[derive(Default)]
pub struct EgressQueue {
    inner: Mutex<Inner>,
    /// Budget bytes routed to this slot and not yet taken by a stream or dropped.
    routed: AtomicUsize,
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

    pub fn push(&self, batch: Batch) {
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

    /// How long the queue has held data that no stream took; zero when empty or progressing.
    pub fn stalled_for(&self) -> Duration {
        self.inner
            .lock()
            .waiting_since
            .map_or(Duration::ZERO, |t| t.elapsed())
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
    ) -> Poll<Option<Batch>> {
        let mut q = self.inner.lock();
        if q.epoch != epoch {
            return Poll::Ready(None);
        }
        let Some(mut out) = q.batches.pop_front() else {
            if q.closing {
                return Poll::Ready(None);
            }
            q.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        let fit = limits.fitting_prefix(&out);
        if fit < out.len() {
            let rest = out.split_off(fit);
            q.batches.push_front(rest);
        } else {
            while let Some(next) = q.batches.front() {
                if out.len() + next.len() > limits.max_envelopes
                    || out.bytes() + next.bytes() > limits.max_bytes
                {
                    break;
                }
                let mut next = q.batches.pop_front().expect("front exists");
                out.append(&mut next);
            }
        }
        q.envelopes -= out.len();
        self.unroute(out.bytes());
        q.waiting_since = (!q.batches.is_empty()).then(Instant::now);
        Poll::Ready(Some(out))
    }
}

/// The request stream of one `Ingress.BatchSender` call: pulls from the slot's queue and counts
/// what it hands to tonic as delivered.
pub struct EgressStream {
    queue: Arc<EgressQueue>,
    ledger: Arc<Ledger>,
    limits: BatchLimits,
    epoch: u64,
}

impl EgressStream {
    pub fn new(queue: Arc<EgressQueue>, ledger: Arc<Ledger>, limits: BatchLimits) -> Self {
        let epoch = queue.epoch();
        Self {
            queue,
            ledger,
            limits,
            epoch,
        }
    }
}

impl Stream for EgressStream {
    type Item = EnvelopeBatch;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EnvelopeBatch>> {
        let this = self.get_mut();
        this.queue.poll_take(cx, &this.limits, this.epoch).map(|b| {
            b.map(|batch| {
                let (n, bytes) = (batch.len(), batch.bytes());
                let (envelopes, _) = batch.into_parts();
                this.ledger.delivered(n, bytes);
                EnvelopeBatch { batch: envelopes }
            })
        })
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
pub async fn dial(addr: &str, s: &DialSettings) -> Result<IngressClient<Channel>, DialError> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|_| DialError::Address(addr.to_owned()))?
        .tls_config(s.tls.clone())
        .map_err(DialError::Connect)?
        .connect_timeout(s.connect_timeout)
        .http2_keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(DialError::Connect)?;
    Ok(IngressClient::new(channel)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Envelope;
    use crate::telemetry::Metrics;

    fn batch(n: usize, cost: u32) -> Batch {
        let mut b = Batch::default();
        for _ in 0..n {
            b.push(Envelope::default(), cost);
        }
        b
    }

    /// Pushes as the pipeline does: routed by the sequencer first.
    fn push(q: &EgressQueue, b: Batch) {
        q.route(b.bytes());
        q.push(b);
    }

    fn take(q: &EgressQueue, limits: &BatchLimits) -> Option<Batch> {
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
    async fn stream_counts_delivery_and_ends_when_closed() {
        use tokio_stream::StreamExt;
        let metrics = Arc::new(Metrics::new());
        let ledger = Arc::new(Ledger::new(metrics.clone(), 1 << 20));
        assert!(ledger.try_admit(4, 40));
        let q = Arc::new(EgressQueue::default());
        let limits = BatchLimits {
            max_envelopes: 100,
            max_bytes: 1 << 20,
        };
        let mut s = EgressStream::new(q.clone(), ledger.clone(), limits);
        push(&q, batch(4, 10));
        q.close();
        assert_eq!(s.next().await.unwrap().batch.len(), 4);
        assert!(s.next().await.is_none());
        assert_eq!(metrics.snapshot().egress, 4);
        assert_eq!(ledger.buffered(), (0, 0));
    }
}
