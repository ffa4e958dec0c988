//! The sequencer actor: numbers each source's envelopes (stream and number, written into the
//! `metron` tag by the signer) and splits each batch by connection slot, so a source's envelopes
//! stay in order on one connection. A panic while numbering loses that batch (counted
//! `actor_panic`); numbering then starts over under a new stream ([`super::guard`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::guard::{self, catch, Chaos};
use super::messages::{DumpState, SequencedBatch, SetBudget, TaggedBatch};
use crate::envelope::queue::EgressQueue;
use crate::envelope::sequence::{slot_of, Sequencer};
use crate::envelope::Batch;
use crate::telemetry::{ActorName, DropReason, Ledger};

const ME: ActorName = ActorName::Sequencer;

pub struct SequencerActor {
    sequencer: Sequencer,
    /// `sequencing.enabled`: without it, batches are only split by slot, never numbered.
    numbering: bool,
    /// One queue per connection slot, for the share check before stamping.
    queues: Vec<Arc<EgressQueue>>,
    /// Every slot's guaranteed share of the budget (see [`may_route`]).
    slot_share: usize,
    /// The whole budget.
    budget: usize,
    next: Recipient<SequencedBatch>,
    ledger: Arc<Ledger>,
    chaos: Chaos,
}

impl SequencerActor {
    pub fn new(
        sequencer: Sequencer,
        numbering: bool,
        queues: Vec<Arc<EgressQueue>>,
        budget: usize,
        next: Recipient<SequencedBatch>,
        ledger: Arc<Ledger>,
    ) -> Self {
        let mut actor = Self {
            sequencer,
            numbering,
            slot_share: 0,
            budget: 0,
            queues,
            next,
            ledger,
            chaos: Chaos::default(),
        };
        actor.set_budget(budget);
        actor
    }

    /// Every slot is guaranteed half an equal split of `budget` (see [`may_route`]); a stream
    /// carries at most half of that unacknowledged, so a slot always has room to send on while
    /// it waits for an answer.
    fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.slot_share = budget / (2 * self.queues.len());
        for q in &self.queues {
            q.set_window(self.slot_share / 2);
        }
    }
}

impl Actor for SequencerActor {
    type Context = Context<Self>;
}

impl Handler<SetBudget> for SequencerActor {
    type Result = ();

    fn handle(&mut self, SetBudget(budget): SetBudget, _: &mut Context<Self>) {
        self.set_budget(budget);
    }
}

impl Handler<DumpState> for SequencerActor {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let routed: Vec<usize> = self.queues.iter().map(|q| q.routed()).collect();
        tracing::info!(
            target: "metron::state",
            actor = "sequencer",
            numbering = self.numbering,
            stream = %crate::envelope::signing::encode_hex(&self.sequencer.stream_id()),
            sources = self.sequencer.sources(),
            rotations = self.sequencer.rotations(),
            budget_bytes = self.budget,
            slot_share_bytes = self.slot_share,
            routed_bytes_by_slot = ?routed,
            "state"
        );
    }
}

impl SequencerActor {
    /// Splits `batch` by slot into `parts`, each routed to its slot (a part its slot cannot take
    /// is dropped and added to `refused`), then numbers them.
    fn route_and_number(
        &mut self,
        batch: &Batch,
        parts: &mut Vec<(usize, Batch)>,
        refused: &mut (usize, usize),
    ) {
        let slots = self.queues.len();
        // Split by slot first, so a slot over its share is refused before its envelopes are
        // numbered: the drop leaves no gap in the sequence and costs no signing.
        let mut per_slot: Vec<Batch> = (0..slots).map(|_| batch.part()).collect();
        for item in batch.items() {
            per_slot[slot_of(batch.bytes_of(item.source), slots)].push(*item);
        }
        for (slot, part) in per_slot.into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let routed: Vec<usize> = self.queues.iter().map(|q| q.routed()).collect();
            if !may_route(&routed, slot, part.bytes(), self.slot_share, self.budget) {
                self.ledger
                    .dropped(DropReason::SlotQueueFull, part.len(), part.bytes());
                refused.0 += part.len();
                refused.1 += part.bytes();
                continue;
            }
            self.queues[slot].route(part.bytes());
            parts.push((slot, part));
        }
        // The chaos hook strikes where a panic costs the most: with parts already routed.
        self.chaos.strike(ME);
        if self.numbering {
            for (_, part) in parts {
                self.sequencer.stamp(part);
            }
        }
    }
}

impl Handler<TaggedBatch> for SequencerActor {
    type Result = ();

    fn handle(&mut self, TaggedBatch(batch): TaggedBatch, _: &mut Context<Self>) {
        let rotations = self.sequencer.rotations();
        // What a panic would leave behind: the parts routed to a slot, and what was refused.
        let mut parts = Vec::new();
        let mut refused = (0, 0);
        if let Err(panic) = catch(|| self.route_and_number(&batch, &mut parts, &mut refused)) {
            panic.report(ME, self.ledger.metrics());
            for (slot, part) in &parts {
                self.queues[*slot].unroute(part.bytes());
            }
            let (n, bytes) = (batch.len() - refused.0, batch.bytes() - refused.1);
            self.ledger.dropped(DropReason::ActorPanic, n, bytes);
            self.sequencer.reset();
            return;
        }
        let rotated = self.sequencer.rotations() - rotations;
        if rotated > 0 {
            self.ledger
                .metrics()
                .sequence_rotations
                .fetch_add(rotated, Ordering::Relaxed);
        }
        if parts.is_empty() {
            return;
        }
        if let Err(e) = self.next.try_send(SequencedBatch { parts }) {
            let (reason, msg) = guard::refused(e, DropReason::SignerQueueFull);
            for (slot, part) in msg.parts {
                self.queues[slot].unroute(part.bytes());
                self.ledger.dropped(reason, part.len(), part.bytes());
            }
        }
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for SequencerActor {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        if msg.escape {
            super::guard::chaos_panic(ME);
        }
        self.chaos.arm();
    }
}

/// Whether `bytes` more may go to `slot`, given what every slot holds (`routed`).
///
/// Each slot is guaranteed `share` (half an equal split: budget / (2 · slots)), the other half of
/// the budget is a pool. A slot may always fill up to its share (an idle
/// slot takes any batch, so one larger than the share still passes). Beyond its share a slot may
/// borrow, but only from what no other slot could still claim: afterwards the free budget must
/// still cover every other slot's unused share. A burst on one slot can thus use the idle
/// pool, while a stuck Doppler can never take what the healthy slots are owed.
pub fn may_route(routed: &[usize], slot: usize, bytes: usize, share: usize, budget: usize) -> bool {
    let mine = routed[slot];
    if mine == 0 || mine + bytes <= share {
        return true;
    }
    let total: usize = routed.iter().sum();
    let owed: usize = routed
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != slot)
        .map(|(_, r)| share.saturating_sub(*r))
        .sum();
    total + bytes + owed <= budget
}

#[cfg(test)]
mod tests {
    use super::may_route;
    use proptest::prelude::*;

    #[test]
    fn a_slot_borrows_only_what_nobody_else_is_owed() {
        // budget 300, three slots, each guaranteed 50
        assert!(
            may_route(&[0, 0, 0], 0, 500, 50, 300),
            "an idle slot takes any batch"
        );
        assert!(may_route(&[30, 0, 0], 0, 20, 50, 300), "up to the share");
        assert!(
            may_route(&[50, 0, 0], 0, 150, 50, 300),
            "borrows the unowed budget"
        );
        assert!(
            !may_route(&[50, 0, 0], 0, 151, 50, 300),
            "but not what the others are owed"
        );
        assert!(!may_route(&[200, 0, 0], 0, 1, 50, 300));
        assert!(
            may_route(&[200, 0, 0], 1, 50, 50, 300),
            "slot 1 still gets its share"
        );
    }

    proptest! {
        /// Starting from any state where every slot's guarantee is available, routing whatever
        /// `may_route` allows keeps it available: no slot can eat another's share. (Batches here
        /// fit a share; one larger than a share is let through an idle slot on purpose.)
        #[test]
        fn every_share_stays_available(requests in prop::collection::vec((0usize..4, 1usize..=50), 1..200)) {
            let (share, budget) = (50, 400);
            let mut routed = [0usize; 4];
            for (slot, bytes) in requests {
                if may_route(&routed, slot, bytes, share, budget) {
                    routed[slot] += bytes;
                    let total: usize = routed.iter().sum();
                    let owed: usize = routed.iter().map(|r| share.saturating_sub(*r)).sum();
                    prop_assert!(total + owed <= budget, "{routed:?}");
                }
            }
        }
    }
}
