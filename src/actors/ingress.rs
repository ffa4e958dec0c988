//! The ingress actor: applies upstream's ingress rules (origin mapping, tags, counter totals) to
//! every admitted envelope, then hands the batch to the sequencer. A panic while tagging loses
//! that batch (counted `actor_panic`) and the counter totals ([`super::guard`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::guard::{catch, refused, Chaos};
use super::messages::{DumpState, IngressBatch, SetDefaultTags, TaggedBatch};
use crate::envelope::tagging::Tagger;
use crate::telemetry::{ActorName, DropReason, Ledger};

const ME: ActorName = ActorName::Ingress;

pub struct IngressActor {
    tagger: Tagger,
    next: Recipient<TaggedBatch>,
    ledger: Arc<Ledger>,
    chaos: Chaos,
}

impl IngressActor {
    pub fn new(tagger: Tagger, next: Recipient<TaggedBatch>, ledger: Arc<Ledger>) -> Self {
        Self {
            tagger,
            next,
            ledger,
            chaos: Chaos::default(),
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
        let (tagger, chaos) = (&mut self.tagger, &mut self.chaos);
        let tagged = catch(|| {
            chaos.strike(ME);
            tagger.process(&mut batch)
        });
        let mapped = match tagged {
            Ok(mapped) => mapped,
            Err(panic) => {
                panic.report(ME, self.ledger.metrics());
                self.ledger
                    .dropped(DropReason::ActorPanic, batch.len(), batch.bytes());
                self.tagger.reset();
                return;
            }
        };
        self.ledger
            .metrics()
            .origin_mappings
            .fetch_add(mapped, Ordering::Relaxed);
        let (n, bytes) = (batch.len(), batch.bytes());
        if let Err(e) = self.next.try_send(TaggedBatch(batch)) {
            let (reason, _) = refused(e, DropReason::SequencerQueueFull);
            self.ledger.dropped(reason, n, bytes);
        }
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for IngressActor {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        if msg.escape {
            super::guard::chaos_panic(ME);
        }
        self.chaos.arm();
    }
}
