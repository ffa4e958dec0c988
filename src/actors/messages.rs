//! Every message the actors exchange, in one readable place.
//!
//! Data flows one way: edge → [`IngressBatch`] → ingress actor → [`TaggedBatch`] → sequencer →
//! [`SequencedBatch`] → signer → the slot's `EgressQueue` (see `grpc::egress`), which one Doppler
//! connection actor's BatchSender stream drains. Each data message
//! carries a whole batch, never a single envelope. Health and control travel separately:
//! connections report [`ConnectionUp`] / [`ConnectionDown`] to the supervisor, which answers with
//! [`Connect`]; shutdown sends [`Drain`]. A reload sends each actor what changed
//! ([`SetDefaultTags`], [`SetBudget`], [`SetWriter`], [`SetDopplers`], [`SetDial`]); SIGUSR1 sends
//! every actor [`DumpState`].

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;

use crate::envelope::outbox::Outlet;
use crate::envelope::writer::Writer;
use crate::envelope::Batch;
use crate::grpc::egress::DialSettings;
use crate::telemetry::RestartCause;

/// Admitted envelopes from one emitter message (or a run of them), in arrival order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct IngressBatch(pub Batch);

/// Envelopes after origin mapping, tagging and counter totals.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaggedBatch(pub Batch);

/// Sequenced envelopes split by connection slot, with the destinations each part goes to.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SequencedBatch {
    pub parts: Vec<Part>,
    /// Drains a reload removed, to be told once every part routed to them is in their queue:
    /// the sequencer sends this after the last batch it routed to them, so the signer, which
    /// handles batches in order, tells them after the last push.
    pub retire: Vec<(Recipient<Retire>, Duration)>,
}

/// The envelopes of one connection slot (every source in a slot's part keeps its order), and
/// which destinations took which of them. Every envelope here was taken by one destination at
/// least; each destination's pick is already offered to its account and routed to its queue.
pub struct Part {
    pub slot: usize,
    pub batch: Batch,
    /// The Doppler slot's pick; `None` when the Doppler pool takes none of the part.
    pub doppler: Option<Pick>,
    /// How the Doppler slot's pick splits between its queue's lanes; `None`: all of it goes to
    /// bulk. See [`crate::limits::lanes`].
    pub lanes: Option<LaneSplit>,
    /// Every other destination that takes some of the part, with its pick.
    pub outlets: Vec<(Outlet, Pick)>,
}

/// The Doppler slot's pick of a part, by lane: three disjoint picks that make up the whole.
pub struct LaneSplit {
    pub express: Pick,
    pub bulk: Pick,
    /// Released into express once bulk has handed over `barrier` envelopes.
    pub parked: Pick,
    pub barrier: u64,
}

/// Which envelopes of a part a destination takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    All,
    /// The envelopes at these indices (ascending).
    Some(Vec<u32>),
}

impl Pick {
    /// (envelopes, priced bytes) of `batch` this pick takes.
    pub fn cost(&self, batch: &Batch) -> (usize, usize) {
        match self {
            Pick::All => (batch.len(), batch.bytes()),
            Pick::Some(idx) => (
                idx.len(),
                idx.iter()
                    .map(|&i| batch.items()[i as usize].cost as usize)
                    .sum(),
            ),
        }
    }
}

/// Supervisor → connection: dial `addr` (configured endpoint `endpoint`) after `delay`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Connect {
    /// The supervisor's generation (see [`Reset`]); the connection's reports carry it back.
    pub generation: u64,
    pub endpoint: usize,
    pub addr: String,
    /// The Doppler's AZ, for the state dump.
    pub az: String,
    pub delay: Duration,
}

/// Connection → supervisor: the stream to `endpoint` is open.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct ConnectionUp {
    pub generation: u64,
    pub slot: usize,
    pub endpoint: usize,
}

/// Connection → supervisor: the actor restarted and holds no connection; it waits for [`Connect`].
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct ConnectionDown {
    pub generation: u64,
    pub slot: usize,
    pub cause: RestartCause,
    /// How long the connection had been up (zero if it never came up).
    pub lived: Duration,
}

/// Shutdown: finish the stream once the slot's queue is empty (reconnecting if need be). Resolves
/// true when a Doppler has acknowledged the end of the stream; the caller bounds the wait.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Drain;

/// Connection → supervisor: the stream has taken nothing from a non-empty queue for
/// `dopplers.progress_timeout_ms` (the Doppler stopped reading). The supervisor decides whether
/// moving is worth it (only if another endpoint is usable) and answers with [`Abandon`].
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Stalled {
    pub generation: u64,
    pub slot: usize,
    /// The endpoint of the stalled connection (the slot may have moved on by the time the
    /// supervisor reads this).
    pub endpoint: usize,
}

/// Supervisor → connection: give up the stalled stream to `endpoint` and reconnect elsewhere
/// (ignored if the connection is no longer to `endpoint`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abandon {
    pub endpoint: usize,
}

/// Supervisor → connection: end the stream cleanly and reconnect (to move the slot back to the
/// local AZ). Nothing queued is lost.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Recycle;

/// Supervisor → connection, after the supervisor panicked and started over from fresh state:
/// end the stream gracefully (or give up the dial), report [`ConnectionDown`] in `generation`,
/// and wait for the new supervisor's [`Connect`]. Reports from an older generation are ignored:
/// their endpoint numbers belong to the supervisor state that was thrown away.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reset {
    pub generation: u64,
}

/// Reload → ingress actor: the default tags from now on (counter totals are kept).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDefaultTags(pub BTreeMap<String, String>);

/// Reload → sequencer: the destinations beside the Doppler pool from now on (their shares of
/// the budget follow), and the removed drains to retire, each with its grace period. Parts
/// already sequenced carry the outlets they were routed to.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetOutlets {
    pub outlets: Vec<Outlet>,
    pub retire: Vec<(Recipient<Retire>, Duration)>,
}

/// Binding cache poller → sequencer: the drains its last good answer lists (app drains open on
/// their application's next envelope; the cache's aggregate drains at once).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDrainTable(pub std::sync::Arc<crate::syslog::apps::DrainTable>);

/// Reload → sequencer: `pipeline.max_buffered_bytes` changed (each slot's share follows).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetBudget(pub usize);

/// Reload → signer: sign with this key from the next batch on. Envelopes signed before stay
/// signed with the old key, so receivers keep the old key for a while (`signing.previous_keys`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetWriter(pub Writer);

/// Reload → supervisor: the Doppler list or discovery names changed. Slots on a Doppler that is
/// gone move off it gracefully, one per rebalance interval.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDopplers(pub crate::routing::Dopplers);

/// Reload → supervisor: dial Dopplers like this from now on (new TLS material, timeouts). Open
/// connections keep theirs until they next reconnect.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDial(pub DialSettings);

/// Reload → drain connection: the drain was removed. It delivers what it holds within `grace`;
/// whatever is left then is dropped (`drain_removed`). Either way its account is retired (its
/// series go, its totals stay in the balance) and the actor stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire {
    pub grace: Duration,
}

/// SIGUSR1: the actor writes one structured log record of its state (target `metron::state`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DumpState;

/// Test-only (chaos hook): make an actor panic. `escape: false` panics inside the actor's guard:
/// the pipeline actors (ingress, sequencer, signer) while handling their next batch, the
/// supervisor and the connections at once. `escape: true` panics outside any guard, taking the
/// actor down for good.
#[cfg(feature = "chaos-hooks")]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct ChaosPanic {
    pub escape: bool,
}
