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
use super::messages::{DumpState, Part, Pick, Retire, SequencedBatch, SetWriter};
use crate::envelope::encoded::EncodedBatch;
use crate::envelope::queue::{EgressQueue, Lane};
use crate::envelope::writer::Writer;
use crate::envelope::Batch;
use crate::telemetry::{Account, ActorName, DropReason, Ledger};

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
        for (drain, grace) in msg.retire {
            drain.do_send(Retire { grace });
        }
        for part in msg.parts {
            // What of this part reached each destination before a panic: (envelopes, priced
            // bytes), the Doppler slot's first, then each outlet's.
            let mut handed = vec![(0, 0); 1 + part.outlets.len()];
            if let Err(panic) = catch(|| self.write_part(&part, &mut handed)) {
                panic.report(ME, self.ledger.metrics());
                self.drop_rest(&part, &handed);
                self.writer.reset();
                self.framed_per_envelope = FIRST_FRAMED_GUESS;
            }
        }
    }
}

impl SignerActor {
    /// Writes `part` out once and hands each destination its pick: the same bytes, shared, when
    /// it takes the whole part; a copy of what it takes otherwise. Adds what reaches each
    /// destination to `handed`.
    fn write_part(&mut self, part: &Part, handed: &mut [(usize, usize)]) {
        let batch = &part.batch;
        let items = batch.items();
        let mut start = 0;
        while start < items.len() {
            let left =
                (items.len() - start).min(MAX_ENCODED_BODY / self.framed_per_envelope.max(1));
            // An eighth more than the estimate: batches vary, and a shrink within the block
            // is free while a grow copies.
            let estimate = left * self.framed_per_envelope;
            let mut encoded = EncodedBatch::with_capacity(left, estimate + estimate / 8);
            let mut end = start;
            for item in &items[start..] {
                self.writer.finish_item(batch, item, &mut encoded);
                end += 1;
                // The chaos hook strikes with a batch half written.
                self.chaos.strike(ME);
                if encoded.as_message_body().len() >= MAX_ENCODED_BODY {
                    break;
                }
            }
            // The charge assumes the queues hold the framed bytes, not a grown buffer's slack.
            encoded.freeze();
            self.framed_per_envelope = encoded.as_message_body().len() / encoded.len();
            let chunk = start..end;
            // The last destination takes the written batch itself; only the others share it.
            let last = part.outlets.len();
            if let Some(pick) = &part.doppler {
                let queue = &self.queues[part.slot];
                let mut hand = |lane: Lane, pick: &Pick, last: bool| {
                    if matches!(pick, Pick::Some(idx) if idx.is_empty()) {
                        return;
                    }
                    let (mine, priced) = picked(&mut encoded, batch, pick, &chunk, last);
                    settle(
                        &self.ledger,
                        self.ledger.doppler(),
                        &mine,
                        priced,
                        |grow, shrink| {
                            queue.route(grow);
                            queue.unroute(shrink);
                        },
                    );
                    handed[0].0 += mine.len();
                    handed[0].1 += priced;
                    queue.push_to(lane, part.lanes.as_ref().map_or(0, |l| l.barrier), mine);
                };
                match &part.lanes {
                    None => hand(Lane::Bulk, pick, last == 0),
                    // Express, bulk, parked: within a part a source may move from express to
                    // bulk or to parked (never back), and the stream may take between two
                    // pushes; a parked envelope's barrier is in bulk before it, and a parked
                    // batch may be released into express as it is pushed.
                    Some(l) => {
                        hand(Lane::Express, &l.express, false);
                        hand(Lane::Bulk, &l.bulk, last == 0);
                        hand(Lane::Parked, &l.parked, false);
                    }
                }
            }
            for (k, (outlet, pick)) in part.outlets.iter().enumerate() {
                let (mine, priced) = picked(&mut encoded, batch, pick, &chunk, k + 1 == last);
                let outbox = &outlet.outbox;
                settle(
                    &self.ledger,
                    &outlet.account,
                    &mine,
                    priced,
                    |grow, shrink| {
                        outbox.route(grow);
                        outbox.unroute(shrink);
                    },
                );
                handed[1 + k].0 += mine.len();
                handed[1 + k].1 += priced;
                outbox.push(mine);
            }
            start = end;
        }
    }

    /// After a panic: drops what each destination was routed of `part` and has not received.
    fn drop_rest(&self, part: &Part, handed: &[(usize, usize)]) {
        let rest = |pick: &Pick, k: usize| {
            let (n, bytes) = pick.cost(&part.batch);
            (n - handed[k].0, bytes - handed[k].1)
        };
        if let Some(pick) = &part.doppler {
            let (n, bytes) = rest(pick, 0);
            self.queues[part.slot].unroute(bytes);
            self.ledger
                .dropped_at(self.ledger.doppler(), DropReason::ActorPanic, n, bytes);
        }
        for (k, (outlet, pick)) in part.outlets.iter().enumerate() {
            let (n, bytes) = rest(pick, 1 + k);
            outlet.outbox.unroute(bytes);
            self.ledger
                .dropped_at(&outlet.account, DropReason::ActorPanic, n, bytes);
        }
    }
}

/// What a destination with `pick` takes of the `chunk` of the part just written as `encoded`:
/// the envelopes, and what they were priced at. The `last` destination to take the whole chunk
/// takes `encoded` itself rather than a second handle on it (with the Doppler pool alone, every
/// batch).
fn picked(
    encoded: &mut EncodedBatch,
    batch: &Batch,
    pick: &Pick,
    chunk: &std::ops::Range<usize>,
    last: bool,
) -> (EncodedBatch, usize) {
    let items = batch.items();
    let whole = |encoded: &mut EncodedBatch| {
        if last {
            std::mem::take(encoded)
        } else {
            encoded.share()
        }
    };
    match pick {
        Pick::All => {
            let priced = items[chunk.clone()].iter().map(|i| i.cost as usize).sum();
            (whole(encoded), priced)
        }
        Pick::Some(idx) => {
            let idx: Vec<u32> = idx
                .iter()
                .filter(|i| chunk.contains(&(**i as usize)))
                .map(|i| i - chunk.start as u32)
                .collect();
            let priced = idx
                .iter()
                .map(|i| items[chunk.start + *i as usize].cost as usize)
                .sum();
            if idx.len() == encoded.len() {
                (whole(encoded), priced)
            } else {
                (encoded.select(&idx), priced)
            }
        }
    }
}

/// Settles the difference between what `batch` was priced at and what it holds (its encoded
/// bytes) with the budget, `account` and the destination's queue (`requeue(grow, shrink)`).
fn settle(
    ledger: &Ledger,
    account: &Account,
    batch: &EncodedBatch,
    priced: usize,
    requeue: impl FnOnce(usize, usize),
) {
    let holds = batch.bytes();
    // Usually encoded envelopes hold less than their price; more only when a reload lengthened
    // the default tags or the key id after these were priced.
    let (grow, shrink) = (holds.saturating_sub(priced), priced.saturating_sub(holds));
    ledger.resize_at(account, grow, shrink);
    requeue(grow, shrink);
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
