//! A slot's queue of signed batches: the pipeline's last stage, shared by the signer (which
//! appends) and the slot's current BatchSender stream (which takes). It belongs to the slot, not to
//! a connection: when a connection dies, what it had not yet taken stays queued for the next one,
//! wherever the slot reconnects. Bounded by the budget, which the sequencer checks per slot
//! before it routes anything here. A connection that starts with a backlog replays it paced
//! ([`super::pacer`]).
//!
//! Two lanes (decision 32): bulk, and express for the sources within their fair share while the
//! slot has a backlog (the sequencer chooses, [`crate::limits::lanes`]). A take starts with
//! express. Parked batches wait for bulk to hand over everything up to their barrier (or to
//! empty), then join express.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::encoded::EncodedBatch;
use super::pacer::{Pacer, ReplayRate, Replayed};
pub use crate::limits::lanes::Lane;
use crate::telemetry::{DropReason, Ledger};

/// Limits on one outgoing `EnvelopeBatch`, in envelopes and in bytes. Bytes are counted as the
/// envelopes' admission costs, an upper bound on their size on the wire.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_envelopes: usize,
    pub max_bytes: usize,
}

/// How many leading envelopes of `batch` fit in `out` within `limits`; at least one when `out`
/// is empty.
fn fitting_prefix(out: &OutgoingBatch, limits: &BatchLimits, batch: &EncodedBatch) -> usize {
    let room = limits.max_envelopes.saturating_sub(out.len());
    let mut bytes = out.bytes();
    for (i, cost) in batch.costs().iter().enumerate() {
        bytes += *cost as usize;
        if i + 1 > room || bytes > limits.max_bytes {
            return if i == 0 && out.is_empty() { 1 } else { i };
        }
    }
    batch.len()
}

/// Moves batches from the front of `lane` into `out` while they fit `limits`: whole ones, or
/// the fitting prefix of the first (at least one envelope when `out` is empty). Returns how
/// many envelopes it moved.
fn take_lane(
    lane: &mut VecDeque<EncodedBatch>,
    out: &mut OutgoingBatch,
    limits: &BatchLimits,
) -> usize {
    let before = out.len();
    let mut first = true;
    while let Some(front) = lane.front_mut() {
        let fit = fitting_prefix(out, limits, front);
        if fit == front.len() {
            out.add(lane.pop_front().expect("front exists"));
        } else {
            // Only the lane's first batch is cut: later ones wait whole for the next message.
            if first && fit > 0 {
                let rest = front.split_off(fit);
                out.add(std::mem::replace(front, rest));
            }
            break;
        }
        first = false;
    }
    out.len() - before
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
    pub fn add(&mut self, part: EncodedBatch) {
        self.len += part.len();
        self.bytes += part.bytes();
        self.parts.push(part);
    }

    /// The encoded envelope runs in this batch, in queue order.
    pub fn parts(&self) -> &[EncodedBatch] {
        &self.parts
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
    /// The bulk lane.
    batches: VecDeque<EncodedBatch>,
    /// The express lane: taken first.
    express: VecDeque<EncodedBatch>,
    /// Batches for express, waiting for bulk's handed-over count to reach their barrier.
    parked: VecDeque<(u64, EncodedBatch)>,
    envelopes: usize,
    /// Since when the queue has held data without a stream taking any (progress watchdog).
    waiting_since: Option<Instant>,
    /// Since when the queue has not been empty: how long a backlog took to build up.
    nonempty_since: Option<Instant>,
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
    /// Paces the backlog a connection starts with.
    pacer: Pacer,
}

impl Inner {
    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.express.is_empty() && self.parked.is_empty()
    }

    /// Moves the parked batches whose barrier bulk has reached (all of them once bulk is
    /// empty) to express, in order.
    fn release(&mut self, taken: u64) {
        if self.parked.is_empty() {
            return;
        }
        let empty = self.batches.is_empty();
        let mut kept = VecDeque::new();
        for (barrier, batch) in self.parked.drain(..) {
            if empty || barrier <= taken {
                self.express.push_back(batch);
            } else {
                kept.push_back((barrier, batch));
            }
        }
        self.parked = kept;
    }
}

/// What [`EgressQueue::poll_take`] gives the stream.
#[derive(Debug)]
pub enum Take {
    /// The next outgoing batch; with the replay this take ended, if any.
    Batch(OutgoingBatch, Option<Replayed>),
    /// The stream is over: recycled, or shut down with the queue empty.
    End,
    /// Nothing queued: the next push wakes the stream.
    Empty,
    /// A replay holds the queue back: the next push wakes the stream, or this long passing.
    Paced(Duration),
}

/// One slot's queue of signed batches, shared by the signer (which pushes) and the slot's
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
    routed: super::Routed,
    /// Bytes a stream may carry before it must be acknowledged, beyond `ack_bytes`: half the
    /// slot's guaranteed share (0: no limit). In flight, bytes hold their share until the
    /// Doppler answers; a window as large as the share would let a slot fill its share with
    /// what it sent, take nothing more, and so never reach the window: only the timer
    /// (`ack_interval_ms`) would end the stream.
    window: AtomicUsize,
    /// Envelopes handed to streams from bulk since the start: the sequencer's lane positions
    /// ([`crate::limits::lanes`]). Written under the lock, after parked batches it releases
    /// have moved.
    taken: AtomicU64,
    /// Budget bytes waiting in the lanes (not yet taken by a stream).
    queued_bytes: AtomicUsize,
}

impl EgressQueue {
    /// Counts `bytes` as routed to this slot.
    pub fn route(&self, bytes: usize) {
        self.routed.add(bytes);
    }

    /// Routed bytes that will never reach the queue (dropped on the way).
    pub fn unroute(&self, bytes: usize) {
        self.routed.sub(bytes);
    }

    /// Budget bytes routed to this slot and not yet acknowledged, lost or dropped.
    pub fn routed(&self) -> usize {
        self.routed.get()
    }

    /// Sets the most a stream may carry unacknowledged, whatever `ack_bytes` says (the sequencer
    /// sets half the slot's share, and again when a reload changes the budget).
    pub fn set_window(&self, bytes: usize) {
        self.window.store(bytes, Ordering::Release);
    }

    /// The acknowledgement window in bytes: `ack_bytes`, or less (see [`EgressQueue::set_window`]).
    pub fn window_within(&self, ack_bytes: usize) -> usize {
        match self.window.load(Ordering::Acquire) {
            0 => ack_bytes,
            w => w.min(ack_bytes),
        }
    }

    /// Sets how fast a backlog is replayed (at start-up and on reload; a replay under way
    /// goes on at the new rate).
    pub fn set_replay_rate(&self, rate: ReplayRate) {
        self.inner.lock().pacer.set_rate(rate);
    }

    /// A connection's first stream starts: if anything waits for it, it is a backlog, replayed
    /// paced (not during shutdown, which flushes as fast as the Doppler takes it). Returns the
    /// backlog in envelopes (0: none) and whether a replay was already under way (its
    /// connection died before it ended; this one takes over).
    pub fn start_replay(&self) -> (usize, bool) {
        let mut q = self.inner.lock();
        let was = q.pacer.replaying();
        let queued = if q.closing { 0 } else { q.envelopes };
        let now = Instant::now();
        let built_up = q
            .nonempty_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        q.pacer.start(now, queued, built_up);
        (queued, was)
    }

    pub fn replaying(&self) -> bool {
        self.inner.lock().pacer.replaying()
    }

    /// Unit tests: as if what is queued had been building up for `by` longer.
    #[cfg(test)]
    pub(crate) fn backdate(&self, by: Duration) {
        let mut q = self.inner.lock();
        q.nonempty_since = q.nonempty_since.and_then(|t| t.checked_sub(by));
    }

    /// Queues `batch` in the bulk lane.
    pub fn push(&self, batch: EncodedBatch) {
        self.push_to(Lane::Bulk, 0, batch);
    }

    /// Queues `batch` in `lane`; a parked one waits for bulk to hand over `barrier` envelopes
    /// in all (or to empty).
    pub fn push_to(&self, lane: Lane, barrier: u64, batch: EncodedBatch) {
        if batch.is_empty() {
            return;
        }
        let waker = {
            let mut q = self.inner.lock();
            q.envelopes += batch.len();
            q.pacer.pushed(batch.len());
            if q.is_empty() {
                let now = Instant::now();
                q.waiting_since = Some(now);
                q.nonempty_since = Some(now);
            }
            self.queued_bytes
                .fetch_add(batch.bytes(), Ordering::Relaxed);
            match lane {
                Lane::Bulk => q.batches.push_back(batch),
                Lane::Express => q.express.push_back(batch),
                Lane::Parked => {
                    q.parked.push_back((barrier, batch));
                    q.release(self.taken.load(Ordering::Acquire));
                }
            }
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
        let q = self.inner.lock();
        q.batches.len() + q.express.len() + q.parked.len()
    }

    /// Budget bytes waiting in the queue (not yet taken by a stream).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Envelopes handed to streams from bulk since the start.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
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

    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Shutdown has closed the queue and nothing is left in it.
    pub fn is_drained(&self) -> bool {
        let q = self.inner.lock();
        q.closing && q.is_empty()
    }

    /// Ends the current stream once the queue is empty (shutdown), flushing it unpaced; returns
    /// the replay this ended, if any.
    pub fn close(&self) -> Option<Replayed> {
        let (waker, replay) = {
            let mut q = self.inner.lock();
            q.closing = true;
            let replay = q.pacer.stop();
            (q.waker.take(), replay)
        };
        if let Some(w) = waker {
            w.wake();
        }
        replay
    }

    /// Takes the next outgoing batch: whole queued batches merged while they fit the limits, or
    /// the fitting prefix of an oversized one; during a replay, no more than its pace allows.
    /// Express first; bulk fills the rest.
    pub fn poll_take(&self, cx: &mut Context<'_>, limits: &BatchLimits, epoch: u64) -> Take {
        let mut q = self.inner.lock();
        if q.epoch != epoch {
            return Take::End;
        }
        if q.is_empty() {
            if q.closing {
                return Take::End;
            }
            q.waker = Some(cx.waker().clone());
            return Take::Empty;
        }
        let now = Instant::now();
        let mut limits = *limits;
        let queued = q.envelopes;
        let replay_ended = match q.pacer.allowance(now, queued) {
            Ok(None) => None,
            Ok(Some(0)) => {
                let wait = q.pacer.wait().unwrap_or(Duration::from_millis(1));
                q.waker = Some(cx.waker().clone());
                // The stream asked and the pace held it back: that is progress, not a stall.
                q.waiting_since = Some(now);
                return Take::Paced(wait);
            }
            Ok(Some(allowed)) => {
                limits.max_envelopes = limits.max_envelopes.min(allowed);
                None
            }
            Err(done) => Some(done),
        };
        let mut out = OutgoingBatch::default();
        let q = &mut *q;
        take_lane(&mut q.express, &mut out, &limits);
        // Bulk only once express is empty: a source moving from express to bulk is in order
        // only because nothing of bulk ever leaves before what express held (a review found
        // a message cut short in express and filled from bulk).
        let bulk = if q.express.is_empty() {
            take_lane(&mut q.batches, &mut out, &limits)
        } else {
            0
        };
        if bulk > 0 || !q.parked.is_empty() {
            let taken = self.taken.load(Ordering::Acquire) + bulk as u64;
            q.release(taken);
            self.taken.store(taken, Ordering::Release);
        }
        self.queued_bytes.fetch_sub(out.bytes(), Ordering::Relaxed);
        q.envelopes -= out.len();
        q.pacer.took(out.len());
        q.waiting_since = (!q.is_empty()).then_some(now);
        if q.is_empty() {
            q.nonempty_since = None;
        }
        q.in_flight.0 += out.len();
        q.in_flight.1 += out.bytes();
        q.in_flight_since.get_or_insert(now);
        Take::Batch(out, replay_ended)
    }
}

/// Counts what a dead connection left in flight as lost; returns how many envelopes that was.
pub fn count_lost_in_flight(queue: &EgressQueue, ledger: &Ledger) -> usize {
    let (n, bytes) = queue.take_in_flight();
    if n > 0 {
        ledger.dropped_at(ledger.doppler(), DropReason::ConnectionLost, n, bytes);
    }
    n
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::Envelope;

    pub fn batch(n: usize, cost: u32) -> EncodedBatch {
        let mut b = EncodedBatch::default();
        for _ in 0..n {
            b.push(&Envelope::default(), cost);
        }
        b
    }

    /// Pushes as the pipeline does: routed by the sequencer first.
    pub fn push(q: &EgressQueue, b: EncodedBatch) {
        q.route(b.bytes());
        q.push(b);
    }

    fn take(q: &EgressQueue, limits: &BatchLimits) -> Option<OutgoingBatch> {
        let mut cx = Context::from_waker(Waker::noop());
        match q.poll_take(&mut cx, limits, q.epoch()) {
            Take::Batch(b, _) => Some(b),
            _ => None,
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

    fn push_to(q: &EgressQueue, lane: Lane, barrier: u64, b: EncodedBatch) {
        q.route(b.bytes());
        q.push_to(lane, barrier, b);
    }

    /// Envelopes of cost `cost` tell the lanes apart in what a take returns.
    fn costs(b: &OutgoingBatch) -> Vec<u32> {
        b.parts().iter().flat_map(|p| p.costs().to_vec()).collect()
    }

    #[test]
    fn express_goes_first_and_parked_batches_wait_for_their_barrier() {
        let limits = BatchLimits {
            max_envelopes: 4,
            max_bytes: 1000,
        };
        let q = EgressQueue::default();
        push_to(&q, Lane::Bulk, 0, batch(3, 1));
        push_to(&q, Lane::Bulk, 0, batch(3, 2));
        // Parked until bulk has handed over 3 envelopes.
        push_to(&q, Lane::Parked, 3, batch(1, 9));
        push_to(&q, Lane::Express, 0, batch(1, 7));
        assert_eq!(q.queued_bytes(), 3 + 6 + 9 + 7);
        // Express first, then bulk fills the message (its first batch only, whole).
        assert_eq!(costs(&take(&q, &limits).unwrap()), [7, 1, 1, 1]);
        assert_eq!(q.taken(), 3);
        // Bulk reached the barrier: the parked batch went to express, ahead of bulk's rest.
        assert_eq!(costs(&take(&q, &limits).unwrap()), [9, 2, 2, 2]);
        assert_eq!(q.taken(), 6);
        assert!(take(&q, &limits).is_none());
        assert_eq!((q.queued_bytes(), q.envelopes()), (0, 0));
    }

    #[test]
    fn a_parked_batch_goes_once_bulk_is_empty_whatever_its_barrier() {
        let limits = BatchLimits {
            max_envelopes: 10,
            max_bytes: 1000,
        };
        let q = EgressQueue::default();
        // Bulk is empty: nothing of its sources can be ahead in it (positions lost on the way).
        push_to(&q, Lane::Parked, 50, batch(2, 9));
        assert_eq!(costs(&take(&q, &limits).unwrap()), [9, 9]);
        push_to(&q, Lane::Bulk, 0, batch(1, 1));
        push_to(&q, Lane::Parked, 50, batch(1, 9));
        assert_eq!(costs(&take(&q, &limits).unwrap()), [1]);
        // Bulk emptied by that take: released.
        assert_eq!(costs(&take(&q, &limits).unwrap()), [9]);
    }
}
