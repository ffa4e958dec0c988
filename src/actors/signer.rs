//! The signer actor: adds `metron_sig` to every envelope, encodes it once (the slot queues keep
//! envelopes encoded, at about a fifth of the memory, see [`crate::envelope::encoded`]) and
//! forwards each slot's part to its Doppler connection actor. Runs on its own arbiter (thread) so
//! hashing and encoding never stall routing.

use std::sync::Arc;

use actix::prelude::*;

use super::messages::{EgressBatch, SequencedBatch};
use crate::envelope::encoded::EncodedBatch;
use crate::envelope::signing::Signer;
use crate::grpc::egress::EgressQueue;
use crate::telemetry::{DropReason, Ledger};

pub struct SignerActor {
    signer: Signer,
    /// One recipient per connection slot.
    slots: Vec<Recipient<EgressBatch>>,
    /// The slots' queues, to give back what could not be handed over.
    queues: Vec<Arc<EgressQueue>>,
    ledger: Arc<Ledger>,
}

impl SignerActor {
    pub fn new(
        signer: Signer,
        slots: Vec<Recipient<EgressBatch>>,
        queues: Vec<Arc<EgressQueue>>,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            signer,
            slots,
            queues,
            ledger,
        }
    }
}

impl Actor for SignerActor {
    type Context = Context<Self>;
}

impl Handler<SequencedBatch> for SignerActor {
    type Result = ();

    fn handle(&mut self, msg: SequencedBatch, _: &mut Context<Self>) {
        for (slot, batch) in msg.parts {
            let priced = batch.bytes();
            let mut encoded = EncodedBatch::with_capacity(batch.len(), 0);
            for (mut env, cost) in batch.into_iter_with_costs() {
                self.signer.sign(&mut env);
                encoded.push_priced(&env, cost);
            }
            // The refund assumes the queue holds the framed bytes, not a grown buffer's slack.
            encoded.shrink_to_fit();
            // The envelopes now hold less than they were priced at: give the difference back to
            // the budget and to the slot's share.
            let refund = priced - encoded.bytes();
            self.ledger.shrink(refund);
            self.queues[slot].unroute(refund);
            let (n, bytes) = (encoded.len(), encoded.bytes());
            if self.slots[slot].try_send(EgressBatch(encoded)).is_err() {
                self.queues[slot].unroute(bytes);
                self.ledger
                    .dropped(DropReason::ConnectionQueueFull, n, bytes);
            }
        }
    }
}
