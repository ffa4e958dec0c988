//! The sequencer actor: stamps `metron_stream` / `metron_seq` per source and splits each batch by
//! connection slot, so a source's envelopes stay in order on one connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::messages::{SequencedBatch, TaggedBatch};
use crate::envelope::sequence::Sequencer;
use crate::envelope::Batch;
use crate::telemetry::{DropReason, Ledger};

pub struct SequencerActor {
    sequencer: Sequencer,
    slots: usize,
    next: Recipient<SequencedBatch>,
    ledger: Arc<Ledger>,
}

impl SequencerActor {
    pub fn new(
        sequencer: Sequencer,
        slots: usize,
        next: Recipient<SequencedBatch>,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            sequencer,
            slots,
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
        let (n, bytes) = (batch.len(), batch.bytes());
        let rotations = self.sequencer.rotations();
        let mut per_slot: Vec<Batch> = (0..self.slots).map(|_| Batch::default()).collect();
        for (mut env, cost) in batch.into_iter_with_costs() {
            let slot = self.sequencer.stamp(&mut env);
            per_slot[slot].push(env, cost);
        }
        let rotated = self.sequencer.rotations() - rotations;
        if rotated > 0 {
            self.ledger
                .metrics()
                .sequence_rotations
                .fetch_add(rotated, Ordering::Relaxed);
        }
        let parts = per_slot
            .into_iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .collect();
        if self.next.try_send(SequencedBatch { parts }).is_err() {
            self.ledger.dropped(DropReason::SignerQueueFull, n, bytes);
        }
    }
}
