//! The ingress actor: applies upstream's ingress rules (origin mapping, tags, counter totals) to
//! every admitted envelope, then hands the batch to the sequencer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::messages::{DumpState, IngressBatch, SetDefaultTags, TaggedBatch};
use crate::envelope::tagging::Tagger;
use crate::telemetry::{DropReason, Ledger};

pub struct IngressActor {
    tagger: Tagger,
    next: Recipient<TaggedBatch>,
    ledger: Arc<Ledger>,
}

impl IngressActor {
    pub fn new(tagger: Tagger, next: Recipient<TaggedBatch>, ledger: Arc<Ledger>) -> Self {
        Self {
            tagger,
            next,
            ledger,
        }
    }
}

impl Actor for IngressActor {
    type Context = Context<Self>;
}

impl Handler<SetDefaultTags> for IngressActor {
    type Result = ();

    fn handle(&mut self, SetDefaultTags(tags): SetDefaultTags, _: &mut Context<Self>) {
        self.tagger.set_default_tags(&tags);
    }
}

impl Handler<DumpState> for IngressActor {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        tracing::info!(
            target: "metron::state",
            actor = "ingress",
            default_tags = self.tagger.default_tags(),
            counter_keys = self.tagger.counter_keys(),
            "state"
        );
    }
}

impl Handler<IngressBatch> for IngressActor {
    type Result = ();

    fn handle(&mut self, IngressBatch(mut batch): IngressBatch, _: &mut Context<Self>) {
        let mapped = self.tagger.process(&mut batch);
        self.ledger
            .metrics()
            .origin_mappings
            .fetch_add(mapped, Ordering::Relaxed);
        let (n, bytes) = (batch.len(), batch.bytes());
        if self.next.try_send(TaggedBatch(batch)).is_err() {
            self.ledger
                .dropped(DropReason::SequencerQueueFull, n, bytes);
        }
    }
}
