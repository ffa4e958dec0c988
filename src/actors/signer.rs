//! The signer actor: adds `metron_sig` to every envelope, encodes it once (the slot queues keep
//! envelopes encoded, at about a fifth of the memory, see [`crate::envelope::encoded`]) and
//! appends each slot's part to that slot's queue, whose BatchSender stream it wakes. Runs on its
//! own arbiter (thread) so hashing and encoding never stall routing.
//!
//! The queue is written directly rather than through the connection actor's mailbox: that hop
//! woke the system arbiter once per slot per batch (up to 2,500 times a second at 50k
//! envelopes/s) for a push the queue's own lock already makes safe (decision 14). The queue is
//! bounded by the budget, which the sequencer checked before routing.

use std::sync::Arc;

use actix::prelude::*;

use super::messages::{DumpState, SequencedBatch, SetSigner};
use crate::envelope::encoded::EncodedBatch;
use crate::envelope::signing::Signer;
use crate::grpc::egress::EgressQueue;
use crate::telemetry::{DropReason, Ledger};

pub struct SignerActor {
    signer: Signer,
    /// One queue per connection slot.
    queues: Vec<Arc<EgressQueue>>,
    ledger: Arc<Ledger>,
    /// Framed bytes per envelope in the last batch: sizes the next batch's buffer, which
    /// otherwise grows by doubling and copies everything at each step (decision 14, "Since").
    framed_per_envelope: usize,
}

impl SignerActor {
    pub fn new(signer: Signer, queues: Vec<Arc<EgressQueue>>, ledger: Arc<Ledger>) -> Self {
        Self {
            signer,
            queues,
            ledger,
            framed_per_envelope: 512,
        }
    }
}

impl Actor for SignerActor {
    type Context = Context<Self>;
}

impl Handler<SetSigner> for SignerActor {
    type Result = ();

    fn handle(&mut self, SetSigner(signer): SetSigner, _: &mut Context<Self>) {
        self.signer = signer;
    }
}

impl Handler<DumpState> for SignerActor {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        tracing::info!(
            target: "metron::state",
            actor = "signer",
            key_id = self.signer.key_id(),
            framed_bytes_per_envelope = self.framed_per_envelope,
            "state"
        );
    }
}

impl Handler<SequencedBatch> for SignerActor {
    type Result = ();

    fn handle(&mut self, msg: SequencedBatch, _: &mut Context<Self>) {
        for (slot, batch) in msg.parts {
            let priced = batch.bytes();
            // An eighth more than the estimate: batches vary, and a shrink within the block is
            // free while a grow copies.
            let estimate = batch.len() * self.framed_per_envelope;
            let mut encoded = EncodedBatch::with_capacity(batch.len(), estimate + estimate / 8);
            let mut unreadable = (0, 0);
            for item in batch.items() {
                let stream = &batch.streams()[item.stream as usize];
                let env = batch.bytes_of(item.env);
                if !self
                    .signer
                    .finish(env, item, batch.defaults(), stream, &mut encoded)
                {
                    unreadable = (unreadable.0 + 1, unreadable.1 + item.cost as usize);
                }
            }
            if unreadable.0 > 0 {
                // The edge read every envelope it admitted, so this is a bug: count, never lose.
                debug_assert!(false, "an admitted envelope does not read");
                self.ledger
                    .dropped(DropReason::SignerQueueFull, unreadable.0, unreadable.1);
            }
            // The refund assumes the queue holds the framed bytes, not a grown buffer's slack.
            encoded.shrink_to_fit();
            if !encoded.is_empty() {
                self.framed_per_envelope = encoded.as_message_body().len() / encoded.len();
            }
            // The envelopes now hold less than they were priced at: give the difference back to
            // the budget and to the slot's share.
            let refund = priced - unreadable.1 - encoded.bytes();
            self.ledger.shrink(refund);
            self.queues[slot].unroute(refund);
            self.queues[slot].push(encoded);
        }
    }
}
