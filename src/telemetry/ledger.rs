//! The pipeline's ledger: a byte budget shared by every queue between the edge and the
//! destinations, and the bookkeeping that makes the balance exact:
//!
//! ```text
//! ingress + destination_copies == Σ egress + Σ dropped + filtered + buffered
//! ```
//!
//! An envelope is *admitted* at the edge (taking its cost from the budget) and owes one outcome.
//! Before the fan-out it can be *dropped* (a pipeline reason). At the fan-out it is *offered* to
//! every destination whose filter takes it ([`Ledger::fan_out`] adds an obligation, and its
//! cost, per destination beyond the first; [`Ledger::filtered`] settles one no destination
//! takes), and from then on each destination's [`Account`] settles its own obligation: delivered
//! or dropped with a reason. Envelopes refused at the edge are dropped without being admitted.
//! Every destination pays the budget for what it holds, shared bytes included, so a destination
//! that keeps what the others have delivered pays for it alone (decision 27).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::destination::{Account, Destination};
use super::metrics::{DropReason, Metrics};

#[derive(Debug)]
pub struct Ledger {
    metrics: Arc<Metrics>,
    /// The Doppler pool's account (also registered with `metrics`).
    doppler: Arc<Account>,
    /// One permit per budget byte.
    budget: Semaphore,
    /// `pipeline.max_buffered_bytes`; changed by a reload ([`Ledger::set_max_bytes`]).
    max_bytes: AtomicUsize,
    /// Bytes a shrunk budget could not take back at once because they were in use: paid off
    /// from what is released before any permit is given back.
    debt: AtomicUsize,
    in_flight: AtomicU64,
    /// See [`Ledger::freed`].
    freed: AtomicU64,
    /// Budget bytes the destinations other than the Doppler pool hold (see [`Ledger::pressure`]).
    beside_doppler: std::sync::atomic::AtomicI64,
    /// Woken whenever envelopes leave, for the shutdown drain.
    released: Notify,
}

impl Ledger {
    pub fn new(metrics: Arc<Metrics>, max_bytes: usize) -> Self {
        let doppler = Arc::new(Account::new(Destination::Doppler));
        metrics.register(doppler.clone());
        Self {
            metrics,
            doppler,
            budget: Semaphore::new(max_bytes),
            max_bytes: AtomicUsize::new(max_bytes),
            debt: AtomicUsize::new(0),
            in_flight: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            beside_doppler: std::sync::atomic::AtomicI64::new(0),
            released: Notify::new(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The Doppler pool's account.
    pub fn doppler(&self) -> &Arc<Account> {
        &self.doppler
    }

    /// Admits `n` envelopes costing `bytes` if the budget has room now.
    pub fn try_admit(&self, n: usize, bytes: usize) -> bool {
        let Ok(permits) = u32::try_from(bytes) else {
            return false;
        };
        match self.budget.try_acquire_many(permits) {
            Ok(p) => {
                p.forget();
                self.admitted(n);
                true
            }
            Err(_) => false,
        }
    }

    /// Admits, waiting at most `wait` for room. False if the batch could never fit or the wait ran
    /// out; the caller then drops it as [`DropReason::PipelineFull`].
    pub async fn admit(&self, n: usize, bytes: usize, wait: Duration) -> bool {
        if self.try_admit(n, bytes) {
            return true;
        }
        if wait.is_zero() || bytes > self.max_bytes() {
            return false;
        }
        let Ok(permits) = u32::try_from(bytes) else {
            return false;
        };
        match tokio::time::timeout(wait, self.budget.acquire_many(permits)).await {
            Ok(Ok(p)) => {
                p.forget();
                self.admitted(n);
                true
            }
            _ => false,
        }
    }

    /// Takes `bytes` from the budget for a batch not decoded yet (at most the whole budget: the
    /// estimate must not refuse a batch whose exact price would fit), waiting at most `wait` for
    /// room; its envelopes are admitted when the reservation is [settled](Ledger::settle).
    /// Returns what was reserved, or `None` if the wait ran out.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Option<usize> {
        let bytes = bytes.min(self.max_bytes());
        self.admit(0, bytes, wait).await.then_some(bytes)
    }

    /// Turns a reservation of `reserved` bytes into `n` admitted envelopes costing `bytes`: gives
    /// back what was reserved too much, or takes what is missing if the budget has room *now*.
    /// When it has not, the whole reservation is given back and nothing is admitted (false).
    pub fn settle(&self, reserved: usize, n: usize, bytes: usize) -> bool {
        if bytes <= reserved {
            self.shrink(reserved - bytes);
        } else if !self.try_admit(0, bytes - reserved) {
            self.shrink(reserved);
            return false;
        }
        self.admitted(n);
        true
    }

    fn admitted(&self, n: usize) {
        self.in_flight.fetch_add(n as u64, Ordering::Relaxed);
        let held = self.buffered().1;
        self.metrics
            .peak_buffered_bytes
            .fetch_max(held, Ordering::Relaxed);
    }

    /// The budget now in force.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// Changes the budget (a reload). Growing frees room at once; shrinking takes back what is
    /// free now and the rest as envelopes leave, so nothing buffered is dropped for it.
    ///
    /// The steps are ordered so that a concurrent [`Ledger::buffered`] can only read too little,
    /// never too much (which would stick in `buffered_bytes_peak`). Called by one reload at a time.
    pub fn set_max_bytes(&self, new: usize) {
        let old = self.max_bytes();
        if new >= old {
            self.give_back(new - old);
            self.max_bytes.store(new, Ordering::Relaxed);
        } else {
            let cut = old - new;
            self.max_bytes.store(new, Ordering::Relaxed);
            let taken = self.budget.forget_permits(cut);
            self.debt.fetch_add(cut - taken, Ordering::Relaxed);
        }
    }

    /// Returns `bytes` to the budget, paying off any debt first.
    fn give_back(&self, mut bytes: usize) {
        if self.debt.load(Ordering::Relaxed) > 0 {
            let mut paid = 0;
            let _ = self
                .debt
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |debt| {
                    paid = debt.min(bytes);
                    Some(debt - paid)
                });
            bytes -= paid;
        }
        if bytes > 0 {
            self.budget.add_permits(bytes);
            self.released.notify_waiters();
        }
    }

    /// Budget bytes the Doppler pool delivered so far: how fast the destinations fair shedding
    /// answers for take envelopes (drains, copies and drops left out: decision 30).
    pub fn freed(&self) -> u64 {
        self.freed.load(Ordering::Relaxed)
    }

    /// Budget bytes free now.
    pub fn free_bytes(&self) -> usize {
        self.budget.available_permits()
    }

    fn release(&self, n: usize, bytes: usize) {
        let prev = self.in_flight.fetch_sub(n as u64, Ordering::Relaxed);
        debug_assert!(prev >= n as u64, "released more envelopes than admitted");
        self.give_back(bytes);
        self.released.notify_waiters();
    }

    /// Buffered envelopes now hold `bytes` more than they were priced at (a reload gave them
    /// longer tags or a longer key id after they were priced). The bytes are charged whether or
    /// not the budget has room: what is free now is taken, the rest is held as debt, paid off as
    /// envelopes leave, so `buffered` always says what is held.
    pub fn grow(&self, bytes: usize) {
        let taken = self.budget.forget_permits(bytes);
        self.debt.fetch_add(bytes - taken, Ordering::Relaxed);
        self.admitted(0);
    }

    /// Buffered envelopes now hold `bytes` less than they were priced at (they were encoded).
    pub fn shrink(&self, bytes: usize) {
        self.give_back(bytes);
    }

    /// The fan-out: `n` more obligations costing `bytes`, because envelopes were offered to more
    /// than one destination. Charged whether or not the budget has room (the destinations'
    /// shares were checked first); what is not free now is held as debt.
    pub fn fan_out(&self, n: usize, bytes: usize) {
        if n == 0 {
            return;
        }
        self.in_flight.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics
            .destination_copies
            .fetch_add(n as u64, Ordering::Relaxed);
        self.grow(bytes);
    }

    /// Admitted envelopes no destination takes.
    pub fn filtered(&self, n: usize, bytes: usize) {
        self.metrics.filtered.fetch_add(n as u64, Ordering::Relaxed);
        self.release(n, bytes);
    }

    /// `n` envelopes costing `bytes` offered to `to`: from now on its account settles them.
    pub fn offer(&self, to: &Account, n: usize, bytes: usize) {
        to.offer(n, bytes);
        self.beside(to, bytes as i64);
    }

    /// Counts `bytes` more (or fewer) held by `at`, when it is not the Doppler pool.
    fn beside(&self, at: &Account, bytes: i64) {
        if !at.is_doppler() {
            self.beside_doppler.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The share of the budget held by everything but the drains (the pipeline's mailboxes and
    /// the Doppler pool): the pressure fair shedding answers (decision 30). A drain over its
    /// share sheds its own envelopes; it must not make the edge shed anyone's.
    pub fn pressure(&self) -> f64 {
        let beside = self.beside_doppler.load(Ordering::Relaxed).max(0) as u64;
        let held = self.buffered().1.saturating_sub(beside);
        held as f64 / self.max_bytes().max(1) as f64
    }

    /// What `at` holds changed size (its envelopes were encoded after they were priced).
    pub fn resize_at(&self, at: &Account, grow: usize, shrink: usize) {
        at.resize(grow, shrink);
        self.beside(at, grow as i64 - shrink as i64);
        if grow > 0 {
            self.grow(grow);
        }
        if shrink > 0 {
            self.shrink(shrink);
        }
    }

    /// Envelopes `at` delivered (a Doppler acknowledged them; written to a drain's connection).
    pub fn delivered_at(&self, at: &Account, n: usize, bytes: usize) {
        at.delivered(n, bytes);
        self.beside(at, -(bytes as i64));
        if at.is_doppler() {
            self.freed.fetch_add(bytes as u64, Ordering::Relaxed);
            self.metrics.egress.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.release(n, bytes);
    }

    /// Envelopes `at` dropped. The Doppler pool's drops are the agent's unlabelled `dropped`
    /// series too, as upstream's classic agent counts them.
    pub fn dropped_at(&self, at: &Account, reason: DropReason, n: usize, bytes: usize) {
        at.dropped(reason, n, bytes);
        self.beside(at, -(bytes as i64));
        if at.is_doppler() {
            self.metrics.dropped(reason, n as u64);
        }
        self.release(n, bytes);
    }

    /// Admitted envelopes dropped before the fan-out.
    pub fn dropped(&self, reason: DropReason, n: usize, bytes: usize) {
        self.metrics.dropped(reason, n as u64);
        self.release(n, bytes);
    }

    /// Envelopes dropped at the edge, never admitted.
    pub fn refused(&self, reason: DropReason, n: usize) {
        self.metrics.dropped(reason, n as u64);
    }

    /// After shutdown, with nothing moving: drops what every destination, then the pipeline,
    /// still holds (`shutdown_grace_expired`). Returns how many envelopes that was.
    pub fn expire_all(&self) -> u64 {
        let mut left = 0;
        for account in self.metrics.accounts() {
            let (n, bytes) = account.buffered();
            if n > 0 {
                left += n;
                self.dropped_at(
                    &account,
                    DropReason::ShutdownGraceExpired,
                    n as usize,
                    bytes as usize,
                );
            }
        }
        let (n, bytes) = self.buffered();
        if n > 0 {
            left += n;
            self.dropped(DropReason::ShutdownGraceExpired, n as usize, bytes as usize);
        }
        left
    }

    /// (envelopes, budget bytes) admitted and not yet delivered or dropped.
    pub fn buffered(&self) -> (u64, u64) {
        // Debt is held beyond the (shrunk) budget.
        let held = self.max_bytes() + self.debt.load(Ordering::Relaxed);
        let bytes = held.saturating_sub(self.budget.available_permits());
        (self.in_flight.load(Ordering::Relaxed), bytes as u64)
    }

    /// Waits until nothing is buffered or `deadline` passes; true if drained.
    pub async fn wait_drained(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.released.notified();
            if self.buffered().0 == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.buffered().0 == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers admitted envelopes to the Doppler pool, which delivers them.
    fn deliver(l: &Ledger, n: usize, bytes: usize) {
        l.offer(l.doppler(), n, bytes);
        l.delivered_at(l.doppler(), n, bytes);
    }

    #[test]
    fn a_fanned_out_envelope_owes_one_outcome_per_destination() {
        let m = Arc::new(Metrics::new());
        let l = Ledger::new(m.clone(), 1000);
        let drain = Arc::new(Account::new(Destination::Drain {
            scope: super::super::DrainScope::Aggregate,
            url: "syslog://d:1".into(),
        }));
        m.register(drain.clone());
        assert!(l.try_admit(3, 300));
        // one envelope to both, one to the drain only, one to nobody
        l.fan_out(1, 100);
        l.filtered(1, 100);
        l.offer(l.doppler(), 1, 100);
        l.offer(&drain, 2, 200);
        assert_eq!(l.buffered(), (3, 300), "three obligations, each paid for");
        l.resize_at(&drain, 0, 50);
        l.delivered_at(l.doppler(), 1, 100);
        l.dropped_at(&drain, DropReason::DrainQueueFull, 1, 75);
        assert_eq!(drain.buffered(), (1, 75));
        assert_eq!(l.expire_all(), 1);
        assert_eq!(l.buffered(), (0, 0));
        let s = m.snapshot();
        assert_eq!(
            3 + s.destination_copies,
            s.egress + s.drain_egress() + s.dropped_total() + s.drain_dropped() + s.filtered,
            "3 admitted (this test counts no ingress)"
        );
        let d = s.account(drain.destination()).unwrap();
        assert_eq!(
            (d.offered, d.egress, d.dropped_total(), d.buffered),
            (2, 0, 2, 0)
        );
        assert_eq!(
            s.dropped_total(),
            0,
            "a drain's drops are not the Doppler pool's"
        );
        assert!(l.try_admit(1, 1000), "the whole budget is free again");
    }

    #[test]
    fn growth_beyond_the_price_is_charged_even_over_the_budget() {
        let l = Ledger::new(Arc::new(Metrics::new()), 100);
        assert!(l.try_admit(2, 80));
        l.grow(50);
        assert_eq!(l.buffered(), (2, 130), "charged in full, 30 of it as debt");
        assert!(!l.try_admit(1, 1), "no room until the debt is paid");
        deliver(&l, 1, 60);
        assert_eq!(l.buffered(), (1, 70));
        assert!(
            l.try_admit(1, 30) && !l.try_admit(1, 1),
            "the debt was paid first"
        );
        deliver(&l, 2, 100);
        assert_eq!(l.buffered(), (0, 0));
        assert!(l.try_admit(1, 100), "the whole budget is free again");
    }

    #[tokio::test]
    async fn a_reservation_settles_to_the_exact_price() {
        let l = Ledger::new(Arc::new(Metrics::new()), 100);
        assert_eq!(
            l.reserve(500, Duration::ZERO).await,
            Some(100),
            "an estimate above the budget reserves the whole budget, no more"
        );
        assert!(l.settle(100, 2, 70), "a surplus is given back");
        assert_eq!(l.buffered(), (2, 70));
        assert_eq!(l.reserve(20, Duration::ZERO).await, Some(20));
        assert!(
            !l.settle(20, 1, 40),
            "the shortfall does not fit: nothing admitted"
        );
        assert_eq!(l.buffered(), (2, 70), "and the reservation is given back");
        assert_eq!(l.reserve(20, Duration::ZERO).await, Some(20));
        assert!(l.settle(20, 1, 30), "the shortfall fits");
        assert_eq!(l.buffered(), (3, 100));
    }

    #[tokio::test]
    async fn admitted_envelopes_leave_exactly_once() {
        let m = Arc::new(Metrics::new());
        let l = Ledger::new(m.clone(), 100);
        assert!(l.try_admit(3, 60));
        assert!(!l.try_admit(1, 50), "over budget");
        assert!(!l.admit(1, 50, Duration::from_millis(5)).await);
        l.refused(DropReason::PipelineFull, 1);
        deliver(&l, 2, 40);
        l.dropped(DropReason::SignerQueueFull, 1, 20);
        assert_eq!(l.buffered(), (0, 0));
        let s = m.snapshot();
        assert_eq!((s.egress, s.dropped_total()), (2, 2));
        assert!(l.try_admit(1, 100));
    }

    #[tokio::test]
    async fn a_waiting_admission_gets_in_when_room_appears() {
        let l = Arc::new(Ledger::new(Arc::new(Metrics::new()), 100));
        assert!(l.try_admit(1, 100));
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.admit(1, 10, Duration::from_secs(10)).await });
        deliver(&l, 1, 100);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn a_reload_resizes_the_budget_without_dropping_what_it_holds() {
        let l = Ledger::new(Arc::new(Metrics::new()), 100);
        assert!(l.try_admit(1, 80));
        l.set_max_bytes(50);
        assert_eq!(
            l.buffered(),
            (1, 80),
            "held beyond the new budget, not dropped"
        );
        assert!(!l.try_admit(1, 1), "no room until the debt is paid");
        deliver(&l, 1, 80);
        assert_eq!(l.buffered(), (0, 0));
        assert!(l.try_admit(1, 50), "the whole new budget");
        assert!(!l.try_admit(1, 1));
        l.set_max_bytes(70);
        assert!(l.try_admit(1, 20), "growing frees room at once");
        assert_eq!(l.buffered(), (2, 70));
        deliver(&l, 2, 70);
        assert_eq!(l.max_bytes(), 70);
        assert!(l.try_admit(1, 70));
    }
}
