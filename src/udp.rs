//! The v1 (dropsonde) UDP edge: reads datagrams into a bounded buffer, converts them to v2 and
//! hands them to the same [`Edge`] as gRPC, so they are tagged, sequenced, signed and accounted
//! like every other envelope.
//!
//! Two tasks, so that reading never waits on anything but the socket:
//! - the **reader** counts every datagram in `ingress{metric_version="1.0"}` and appends it to the
//!   [`DatagramQueue`], or drops it (`udp_buffer_full`) when the queue already holds
//!   `ingress.udp.buffer_bytes`. Emptying the socket promptly is what keeps losses *counted*:
//!   what overflows the kernel's socket buffer is lost without a trace.
//! - the **converter** takes up to [`BATCH_DATAGRAMS`] datagrams at a time, decodes and validates
//!   each ([`crate::v1::decode`]; rejects are counted by reason and warned about at most once per
//!   10 s), applies the upstream agent's v1 rules and converts the rest
//!   ([`crate::v1::agent_to_v2`]: source id from the origin, the VM's identity where the emitter
//!   gave none, then go-loggregator's `ToV2`) and admits them as one batch, waiting for room like
//!   a gRPC emitter would. While it waits, the queue absorbs the burst.
//!
//! A flood of garbage therefore costs one copy and one failed decode per datagram and fills at
//! most the bounded queue; it never reaches the pipeline's budget.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::net::UdpSocket;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::actors::guard::catch;
use crate::grpc::ingress::Edge;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{ActorName, DropReason, Ledger, Metrics};
use crate::v1::{self, V1Error, V1Identity};

/// Datagrams converted and admitted together: upstream's batch size, and small enough that one
/// batch never holds the converter long.
pub const BATCH_DATAGRAMS: usize = 100;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// What each queued datagram costs beyond its bytes (its `Vec` header and sender address), so a
/// flood of empty datagrams is bounded too.
const DATAGRAM_OVERHEAD: usize = 64;

/// Datagrams received and not yet converted, bounded in bytes.
#[derive(Debug)]
pub struct DatagramQueue {
    inner: Mutex<QueueInner>,
    /// Wakes the converter when a datagram arrives or the queue closes.
    ready: Notify,
    limit_bytes: usize,
}

#[derive(Debug, Default)]
struct QueueInner {
    datagrams: VecDeque<(Vec<u8>, SocketAddr)>,
    bytes: usize,
    closed: bool,
}

impl DatagramQueue {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            inner: Mutex::default(),
            ready: Notify::new(),
            limit_bytes,
        }
    }

    /// Appends a copy of `datagram`; false (and nothing kept) when it does not fit.
    pub fn push(&self, datagram: &[u8], from: SocketAddr) -> bool {
        let cost = datagram.len() + DATAGRAM_OVERHEAD;
        {
            let mut q = self.inner.lock();
            if q.bytes + cost > self.limit_bytes {
                return false;
            }
            q.bytes += cost;
            q.datagrams.push_back((datagram.to_vec(), from));
        }
        self.ready.notify_one();
        true
    }

    /// Takes up to `max` datagrams, waiting for the first; `None` once closed and empty.
    pub async fn pop_batch(&self, max: usize) -> Option<Vec<(Vec<u8>, SocketAddr)>> {
        loop {
            {
                let mut q = self.inner.lock();
                if !q.datagrams.is_empty() {
                    let n = q.datagrams.len().min(max);
                    let batch: Vec<_> = q.datagrams.drain(..n).collect();
                    q.bytes -= batch
                        .iter()
                        .map(|(d, _)| d.len() + DATAGRAM_OVERHEAD)
                        .sum::<usize>();
                    return Some(batch);
                }
                if q.closed {
                    return None;
                }
            }
            // A `notify_one` between the check and here is kept as a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    /// No more datagrams will come: the converter finishes what is queued, then stops.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.ready.notify_one();
    }

    /// (datagrams, bytes) queued now.
    pub fn len(&self) -> (usize, usize) {
        let q = self.inner.lock();
        (q.datagrams.len(), q.bytes)
    }
}

/// The drop reason for a rejected datagram.
fn rejected(e: &V1Error) -> DropReason {
    match e {
        V1Error::Undecodable(_) => DropReason::V1Undecodable,
        V1Error::MissingField(_) => DropReason::V1MissingField,
        V1Error::MissingEvent { .. } => DropReason::V1MissingEvent,
        V1Error::UnknownEventType(_) => DropReason::V1UnknownEventType,
    }
}

/// Decodes and converts `datagrams` as the agent `identity` (see [`v1::agent_to_v2`]), counting
/// each reject by reason.
pub fn convert(
    datagrams: Vec<(Vec<u8>, SocketAddr)>,
    identity: &V1Identity,
    metrics: &Metrics,
) -> Vec<crate::proto::Envelope> {
    let mut envelopes = Vec::with_capacity(datagrams.len());
    for (bytes, from) in datagrams {
        // The decoder faces the network: a panic in it costs that datagram, counted, and not
        // the converter task (which would leave the UDP edge reading into a buffer nobody empties).
        match catch(|| v1::decode(&bytes).map(|e| v1::agent_to_v2(e, identity))) {
            Ok(Ok(e)) => envelopes.push(e),
            Ok(Err(e)) => metrics.dropped_because(
                rejected(&e),
                1,
                Some(&format_args!("{e} (datagram from {from})")),
            ),
            Err(panic) => {
                panic.report(ActorName::Edge, metrics);
                metrics.dropped_because(
                    DropReason::ActorPanic,
                    1,
                    Some(&format_args!("datagram from {from}")),
                );
            }
        }
    }
    envelopes
}

/// The running UDP edge: its two tasks.
pub struct UdpIngress {
    reader: JoinHandle<()>,
    converter: JoinHandle<()>,
    queue: Arc<DatagramQueue>,
}

impl UdpIngress {
    /// Starts reading `socket` until `closed` turns true. Must run inside a tokio runtime.
    /// `identity` is the agent's (a reload may change it; each batch reads it once).
    pub fn start(
        socket: UdpSocket,
        buffer_bytes: usize,
        identity: Arc<RwLock<V1Identity>>,
        edge: Edge,
        ledger: Arc<Ledger>,
        closed: watch::Receiver<bool>,
    ) -> Self {
        let queue = Arc::new(DatagramQueue::new(buffer_bytes));
        let reader = tokio::spawn(read(socket, queue.clone(), ledger.clone(), closed));
        let waiting = queue.clone();
        let converter = tokio::spawn(async move {
            while let Some(datagrams) = waiting.pop_batch(BATCH_DATAGRAMS).await {
                let envelopes = convert(datagrams, &identity.read(), ledger.metrics());
                edge.accept_converted(envelopes).await;
            }
        });
        Self {
            reader,
            converter,
            queue,
        }
    }

    /// (datagrams, bytes) read and not converted yet.
    pub fn queued(&self) -> (usize, usize) {
        self.queue.len()
    }

    /// Waits until both tasks are done (after `closed`): everything that was read has been
    /// admitted or counted as dropped. Aborts them at `deadline`.
    pub async fn finish(self, deadline: tokio::time::Instant) {
        for mut task in [self.reader, self.converter] {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!("v1 UDP ingress did not finish within the shutdown grace period");
                task.abort();
            }
        }
    }
}

async fn read(
    socket: UdpSocket,
    queue: Arc<DatagramQueue>,
    ledger: Arc<Ledger>,
    mut closed: watch::Receiver<bool>,
) {
    let metrics = ledger.metrics();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let errors = RateLimit::new(Duration::from_secs(10));
    loop {
        if *closed.borrow() {
            break;
        }
        let received = tokio::select! {
            biased;
            changed = closed.changed() => match changed {
                Ok(()) => continue,
                Err(_) => break,
            },
            r = socket.recv_from(&mut buf) => r,
        };
        match received {
            Ok((n, from)) => {
                metrics.ingress_v1.fetch_add(1, Ordering::Relaxed);
                if !queue.push(&buf[..n], from) {
                    metrics.dropped(DropReason::UdpBufferFull, 1);
                }
            }
            Err(e) => {
                if let Some(times) = errors.check() {
                    tracing::warn!(error = %e, times, "v1 UDP ingress: receive failed");
                }
                // Whatever it is, do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    queue.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_drains_after_close() {
        let q = DatagramQueue::new(3 * (100 + DATAGRAM_OVERHEAD));
        for _ in 0..3 {
            assert!(q.push(&[0; 100], from()));
        }
        assert!(!q.push(&[0; 100], from()), "a fourth does not fit");
        assert!(
            !q.push(&[], from()),
            "nor an empty one: the overhead counts"
        );
        assert_eq!(q.len(), (3, 3 * (100 + DATAGRAM_OVERHEAD)));
        assert_eq!(q.pop_batch(2).await.unwrap().len(), 2);
        assert!(q.push(&[1; 100], from()), "room again");
        q.close();
        let rest = q.pop_batch(10).await.unwrap();
        assert_eq!(rest.len(), 2, "closing keeps what is queued");
        assert_eq!(rest[1].0, vec![1; 100], "in arrival order");
        assert!(q.pop_batch(10).await.is_none());
        assert_eq!(q.len(), (0, 0));
    }

    #[tokio::test]
    async fn a_waiting_converter_is_woken_by_a_push() {
        let q = Arc::new(DatagramQueue::new(1 << 20));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop_batch(10).await }
        });
        tokio::task::yield_now().await;
        assert!(q.push(b"x", from()));
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![(b"x".to_vec(), from())]);
    }

    /// The reader on a real socket with nobody converting: it keeps reading, counts every
    /// datagram, keeps what the buffer holds and counts the rest as `udp_buffer_full`.
    #[tokio::test]
    async fn a_full_buffer_drops_new_datagrams_counted_and_holds_no_more_than_its_bound() {
        const SIZE: usize = 2_000;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queue = Arc::new(DatagramQueue::new(MAX_DATAGRAM));
        let ledger = Arc::new(Ledger::new(Arc::new(Metrics::new()), 1 << 20));
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read(socket, queue.clone(), ledger.clone(), closed));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let metrics = ledger.metrics();
        for i in 1..=100u64 {
            sender.send_to(&[i as u8; SIZE], addr).unwrap();
            // One at a time, so the kernel's socket buffer never overflows.
            let read = async {
                while metrics.ingress_v1.load(Ordering::Relaxed) < i {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("the reader keeps reading");
        }
        let held = MAX_DATAGRAM / (SIZE + DATAGRAM_OVERHEAD);
        assert_eq!(queue.len().0, held);
        assert!(queue.len().1 <= MAX_DATAGRAM);
        assert_eq!(
            metrics.snapshot().dropped_by(DropReason::UdpBufferFull),
            100 - held as u64
        );
        closed_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the reader stops when closed")
            .unwrap();
        let first = queue.pop_batch(1).await.unwrap();
        assert_eq!(first[0].0, vec![1; SIZE], "the oldest are kept");
        assert_eq!(queue.pop_batch(usize::MAX).await.unwrap().len(), held - 1);
        assert!(queue.pop_batch(1).await.is_none(), "closed by the reader");
    }

    #[test]
    fn rejects_are_counted_by_reason() {
        let m = Metrics::new();
        let out = convert(
            vec![(vec![0xff, 0xff, 0xff], from()), (Vec::new(), from())],
            &V1Identity::default(),
            &m,
        );
        assert!(out.is_empty());
        let s = m.snapshot();
        assert_eq!(s.dropped_by(DropReason::V1Undecodable), 1);
        assert_eq!(
            s.dropped_by(DropReason::V1MissingField),
            1,
            "an empty datagram is an envelope without origin"
        );
    }
}
