//! A destination's queue other than a Doppler slot's (a syslog drain's): the signed batches it
//! was offered, shared with the other destinations that took them ([`EncodedBatch::share`]).
//! The signer pushes, the destination's connection takes. Bounded by the destination's share of
//! the budget, which the sequencer checks before it offers anything ([`Outbox::routed`]); a
//! connection keeps what it took until it is delivered or dropped, so a reconnect loses nothing.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::encoded::EncodedBatch;
use super::{Kinds, Routed};
use crate::telemetry::Account;

/// A destination beside the Doppler pool, as the pipeline sees it: what it takes, its queue and
/// its account.
#[derive(Clone)]
pub struct Outlet {
    pub kinds: Kinds,
    pub outbox: std::sync::Arc<Outbox>,
    pub account: std::sync::Arc<Account>,
}

#[derive(Default)]
struct Inner {
    batches: VecDeque<EncodedBatch>,
    envelopes: usize,
    /// Shutdown: the connection ends once the queue is empty.
    closing: bool,
}

/// One destination's queue of signed batches.
pub struct Outbox {
    /// Unique for the process's life (a notice names its drain by it).
    id: u64,
    inner: Mutex<Inner>,
    /// Budget bytes offered to this destination and not yet delivered or dropped.
    routed: Routed,
    /// The app drains' total, which each app drain's bytes count in too.
    group: Option<std::sync::Arc<Routed>>,
    ready: Notify,
}

impl Default for Outbox {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            inner: Mutex::default(),
            routed: Routed::default(),
            group: None,
            ready: Notify::new(),
        }
    }
}

impl Outbox {
    /// An app drain's outbox: its bytes count in `group` too.
    pub fn in_group(group: std::sync::Arc<Routed>) -> Self {
        Self {
            group: Some(group),
            ..Self::default()
        }
    }

    /// Counts `bytes` as the destination's (the sequencer, before it offers them).
    pub fn route(&self, bytes: usize) {
        self.routed.add(bytes);
        if let Some(g) = &self.group {
            g.add(bytes);
        }
    }

    /// Bytes counted by [`Outbox::route`] that left: delivered, dropped, or found smaller once
    /// encoded.
    pub fn unroute(&self, bytes: usize) {
        self.routed.sub(bytes);
        if let Some(g) = &self.group {
            g.sub(bytes);
        }
    }

    /// Its id, which a notice about its drain carries ([`crate::envelope::Batch::mark_notice`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Budget bytes the destination holds (queued, in the mailboxes before it, or being written).
    pub fn routed(&self) -> usize {
        self.routed.get()
    }

    pub fn push(&self, batch: EncodedBatch) {
        if batch.is_empty() {
            return;
        }
        {
            let mut q = self.inner.lock();
            q.envelopes += batch.len();
            q.batches.push_back(batch);
        }
        self.ready.notify_one();
    }

    /// The next batch, at most `max` envelopes of it (the rest stays at the front), or `None`
    /// when nothing is queued.
    pub fn try_take(&self, max: usize) -> Option<EncodedBatch> {
        self.try_take_within(max, usize::MAX)
    }

    /// As [`Outbox::try_take`], and at most `max_bytes` of budget bytes (at least one envelope).
    pub fn try_take_within(&self, max: usize, max_bytes: usize) -> Option<EncodedBatch> {
        let mut q = self.inner.lock();
        let mut first = q.batches.pop_front()?;
        let mut fit = first.len().min(max.max(1));
        let mut bytes = 0;
        for (i, c) in first.costs().iter().take(fit).enumerate() {
            bytes += *c as usize;
            if i > 0 && bytes > max_bytes {
                fit = i;
                break;
            }
        }
        if first.len() > fit {
            let rest = first.split_off(fit);
            q.batches.push_front(rest);
        }
        q.envelopes -= first.len();
        Some(first)
    }

    /// Waits for the next batch (see [`Outbox::try_take`]); `None` once the outbox is closing
    /// and empty.
    pub async fn take(&self, max: usize) -> Option<EncodedBatch> {
        self.take_within(max, usize::MAX).await
    }

    /// As [`Outbox::take`], at most `max_bytes` of budget bytes (at least one envelope).
    pub async fn take_within(&self, max: usize, max_bytes: usize) -> Option<EncodedBatch> {
        loop {
            let ready = self.ready.notified();
            if let Some(b) = self.try_take_within(max, max_bytes) {
                return Some(b);
            }
            if self.inner.lock().closing {
                return None;
            }
            ready.await;
        }
    }

    /// Shutdown: the connection delivers what is queued, then ends.
    pub fn close(&self) {
        self.inner.lock().closing = true;
        self.ready.notify_waiters();
        self.ready.notify_one();
    }

    /// Everything queued, taken out (a removed drain's backlog, to be counted as dropped).
    pub fn take_all(&self) -> Vec<EncodedBatch> {
        let mut q = self.inner.lock();
        q.envelopes = 0;
        q.batches.drain(..).collect()
    }

    /// Envelopes queued (not counting a batch being written).
    pub fn envelopes(&self) -> usize {
        self.inner.lock().envelopes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::queue::tests::batch;

    #[tokio::test]
    async fn takes_in_order_and_splits() {
        let o = Outbox::default();
        o.push(batch(3, 10));
        o.push(batch(2, 10));
        assert_eq!(o.envelopes(), 5);
        let a = o.take(2).await.unwrap();
        assert_eq!((a.len(), o.envelopes()), (2, 3));
        assert_eq!(
            o.take(10).await.unwrap().len(),
            1,
            "the rest of the split batch first"
        );
        assert_eq!(o.take(10).await.unwrap().len(), 2);
        o.close();
        assert!(o.take(10).await.is_none(), "closed and empty: the end");
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_taker() {
        let o = std::sync::Arc::new(Outbox::default());
        let o2 = o.clone();
        let taker = tokio::spawn(async move { o2.take(10).await.map(|b| b.len()) });
        tokio::task::yield_now().await;
        o.push(batch(4, 10));
        assert_eq!(taker.await.unwrap(), Some(4));
    }
}
