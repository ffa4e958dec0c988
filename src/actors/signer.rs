//! The signer actor: writes every envelope out as it leaves ([`crate::envelope::writer`]: the
//! tags the ingress rules decided, its `metron` tag with sequence and signature), encoded once (the
//! slot queues keep envelopes encoded, see [`crate::envelope::encoded`]) and appends each slot's part
//! to that slot's queue, whose BatchSender stream it wakes. It shares the pipeline arbiter with
//! the ingress actor and the sequencer, away from the supervisor and the connections (decision 5).
//!
//! The queue is written directly rather than through the connection actor's mailbox: that hop
//! woke the system arbiter once per slot per batch for a push the queue's own lock already makes
//! safe (decision 14). The queue is bounded by the budget, which the sequencer checked before
//! routing.

use std::sync::Arc;

use actix::prelude::*;

use super::guard::{catch, Chaos};
use super::messages::{DumpState, SequencedBatch, SetWriter};
use crate::envelope::encoded::EncodedBatch;
use crate::envelope::queue::EgressQueue;
use crate::envelope::writer::Writer;
use crate::envelope::Batch;
use crate::telemetry::{ActorName, DropReason, Ledger};

const ME: ActorName = ActorName::Signer;

/// The first guess of framed bytes per envelope, before a batch has been written.
const FIRST_FRAMED_GUESS: usize = 512;

pub struct SignerActor {
    writer: Writer,
    /// One queue per connection slot.
    queues: Vec<Arc<EgressQueue>>,
    ledger: Arc<Ledger>,
    /// Framed bytes per envelope in the last batch: sizes the next batch's buffer, which
    /// otherwise grows by doubling and copies everything at each step (decision 14, "Since").
    framed_per_envelope: usize,
    chaos: Chaos,
}

impl SignerActor {
    pub fn new(writer: Writer, queues: Vec<Arc<EgressQueue>>, ledger: Arc<Ledger>) -> Self {
        Self {
            writer,
            queues,
            ledger,
            framed_per_envelope: FIRST_FRAMED_GUESS,
            chaos: Chaos::default(),
        }
    }
}

impl Actor for SignerActor {
    type Context = Context<Self>;
}

impl Handler<SetWriter> for SignerActor {
    type Result = ();

    fn handle(&mut self, SetWriter(writer): SetWriter, _: &mut Context<Self>) {
        self.writer = writer;
    }
}

impl Handler<DumpState> for SignerActor {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        tracing::info!(
            target: "metron::state",
            actor = "signer",
            key_id = self.writer.key_id(),
            framed_bytes_per_envelope = self.framed_per_envelope,
            "state"
        );
    }
}

/// An encoded batch is handed to its queue once its body reaches this size, so one emitter
/// message of tiny envelopes with long default tags can never grow a body past the 4 GiB its
/// offsets can address (a 10 MiB message of empty envelopes could otherwise write gigabytes).
const MAX_ENCODED_BODY: usize = 64 << 20;

impl Handler<SequencedBatch> for SignerActor {
    type Result = ();

    fn handle(&mut self, msg: SequencedBatch, _: &mut Context<Self>) {
        for (slot, batch) in msg.parts {
            // What of this part reached its queue before a panic: (envelopes, priced bytes).
            let mut handed = (0, 0);
            if let Err(panic) = catch(|| self.write_part(slot, &batch, &mut handed)) {
                panic.report(ME, self.ledger.metrics());
                let (n, bytes) = (batch.len() - handed.0, batch.bytes() - handed.1);
                self.queues[slot].unroute(bytes);
                self.ledger.dropped(DropReason::ActorPanic, n, bytes);
                self.writer.reset();
                self.framed_per_envelope = FIRST_FRAMED_GUESS;
            }
        }
    }
}

impl SignerActor {
    /// Writes `batch` out into `slot`'s queue, adding what reaches it to `handed`.
    fn write_part(&mut self, slot: usize, batch: &Batch, handed: &mut (usize, usize)) {
        let mut items = batch.items().iter().peekable();
        while items.peek().is_some() {
            let left = batch
                .len()
                .min(MAX_ENCODED_BODY / self.framed_per_envelope.max(1));
            // An eighth more than the estimate: batches vary, and a shrink within the block
            // is free while a grow copies.
            let estimate = left * self.framed_per_envelope;
            let mut encoded = EncodedBatch::with_capacity(left, estimate + estimate / 8);
            let mut priced = 0;
            for item in items.by_ref() {
                priced += item.cost as usize;
                self.writer.finish_item(batch, item, &mut encoded);
                // The chaos hook strikes with a batch half written.
                self.chaos.strike(ME);
                if encoded.as_message_body().len() >= MAX_ENCODED_BODY {
                    break;
                }
            }
            let n = encoded.len();
            self.enqueue(slot, encoded, priced);
            handed.0 += n;
            handed.1 += priced;
        }
    }

    /// Hands `encoded` (priced `priced` at the edge) to `slot`'s queue, settling the difference
    /// between the price and what it now holds with the budget and the slot's share.
    fn enqueue(&mut self, slot: usize, mut encoded: EncodedBatch, priced: usize) {
        // The charge assumes the queue holds the framed bytes, not a grown buffer's slack.
        encoded.freeze();
        if !encoded.is_empty() {
            self.framed_per_envelope = encoded.as_message_body().len() / encoded.len();
        }
        let holds = encoded.bytes();
        if holds <= priced {
            // The usual case: encoded envelopes hold less than their price.
            self.ledger.shrink(priced - holds);
            self.queues[slot].unroute(priced - holds);
        } else {
            // A reload lengthened the default tags or the key id after these were priced.
            self.ledger.grow(holds - priced);
            self.queues[slot].route(holds - priced);
        }
        self.queues[slot].push(encoded);
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for SignerActor {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        if msg.escape {
            super::guard::chaos_panic(ME);
        }
        self.chaos.arm();
    }
}
