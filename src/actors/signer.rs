//! The signer actor: adds `metron_sig` to every envelope and forwards each slot's part to its
//! Doppler connection actor. Runs on its own arbiter (thread) so hashing never stalls routing.

use std::sync::Arc;

use actix::prelude::*;

use super::messages::{EgressBatch, SequencedBatch};
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
        for (slot, mut batch) in msg.parts {
            for env in batch.envelopes_mut() {
                self.signer.sign(env);
            }
            let (n, bytes) = (batch.len(), batch.bytes());
            if self.slots[slot].try_send(EgressBatch(batch)).is_err() {
                self.queues[slot].unroute(bytes);
                self.ledger
                    .dropped(DropReason::ConnectionQueueFull, n, bytes);
            }
        }
    }
}
