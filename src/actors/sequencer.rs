//! The sequencer actor: stamps `metron_stream` / `metron_seq` per source and splits each batch by
//! connection slot, so a source's envelopes stay in order on one connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::messages::{SequencedBatch, TaggedBatch};
use crate::envelope::sequence::{slot_of, Sequencer};
use crate::envelope::Batch;
use crate::grpc::egress::EgressQueue;
use crate::telemetry::{DropReason, Ledger};

pub struct SequencerActor {
    sequencer: Sequencer,
    /// One queue per connection slot, for the share check before stamping.
    queues: Vec<Arc<EgressQueue>>,
    /// The most budget bytes one slot may hold (see [`EgressQueue::try_route`]).
    slot_share: usize,
    next: Recipient<SequencedBatch>,
    ledger: Arc<Ledger>,
}

impl SequencerActor {
    pub fn new(
        sequencer: Sequencer,
        queues: Vec<Arc<EgressQueue>>,
        slot_share: usize,
        next: Recipient<SequencedBatch>,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            sequencer,
            queues,
            slot_share,
            next,
            ledger,
        }
    }
}

impl Actor for SequencerActor {
    type Context = Context<Self>;
}

impl Handler<TaggedBatch> for SequencerActor {
    type Result = ();

    fn handle(&mut self, TaggedBatch(batch): TaggedBatch, _: &mut Context<Self>) {
        let slots = self.queues.len();
        // Split by slot first, so a slot over its share is refused before its envelopes are
        // numbered: the drop leaves no gap in metron_seq and costs no signing.
        let mut per_slot: Vec<Batch> = (0..slots).map(|_| Batch::default()).collect();
        for (env, cost) in batch.into_iter_with_costs() {
            per_slot[slot_of(&env.source_id, slots)].push(env, cost);
        }
        let rotations = self.sequencer.rotations();
        let mut parts = Vec::new();
        for (slot, mut part) in per_slot.into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            if !self.queues[slot].try_route(part.bytes(), self.slot_share) {
                self.ledger
                    .dropped(DropReason::SlotQueueFull, part.len(), part.bytes());
                continue;
            }
            for env in part.envelopes_mut() {
                let stamped = self.sequencer.stamp(env);
                debug_assert_eq!(stamped, slot);
            }
            parts.push((slot, part));
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
            let (SendError::Full(msg) | SendError::Closed(msg)) = e;
            for (slot, part) in msg.parts {
                self.queues[slot].unroute(part.bytes());
                self.ledger
                    .dropped(DropReason::SignerQueueFull, part.len(), part.bytes());
            }
        }
    }
}
