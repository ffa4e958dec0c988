//! Pure logic on envelopes: the batch that travels the pipeline, tagging and counter totals,
//! per-source sequencing, and the signing form. No actors, no I/O: unit- and property-tested.

pub mod encoded;
pub mod raw;
pub mod sequence;
pub mod signing;
pub mod tagging;

use crate::proto::Envelope;
use prost::Message;

/// Envelopes moving through the pipeline together, with what each one cost the pipeline's byte
/// budget at admission (so the exact amount is given back however batches are split or merged).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    envelopes: Vec<Envelope>,
    /// `costs[i]` is the budget cost of `envelopes[i]`; see [`admission_cost`].
    costs: Vec<u32>,
    bytes: usize,
}

impl Batch {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            envelopes: Vec::with_capacity(n),
            costs: Vec::with_capacity(n),
            bytes: 0,
        }
    }

    pub fn push(&mut self, envelope: Envelope, cost: u32) {
        self.bytes += cost as usize;
        self.envelopes.push(envelope);
        self.costs.push(cost);
    }

    pub fn len(&self) -> usize {
        self.envelopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }

    /// Sum of the admission costs: what this batch holds of the pipeline's byte budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn envelopes(&self) -> &[Envelope] {
        &self.envelopes
    }

    pub fn envelopes_mut(&mut self) -> &mut [Envelope] {
        &mut self.envelopes
    }

    pub fn costs(&self) -> &[u32] {
        &self.costs
    }

    /// Moves every envelope of `other` to the end of `self`.
    pub fn append(&mut self, other: &mut Batch) {
        self.bytes += other.bytes;
        other.bytes = 0;
        self.envelopes.append(&mut other.envelopes);
        self.costs.append(&mut other.costs);
    }

    /// Splits off the envelopes from `at` on (like `Vec::split_off`).
    pub fn split_off(&mut self, at: usize) -> Batch {
        let envelopes = self.envelopes.split_off(at);
        let costs = self.costs.split_off(at);
        let bytes: usize = costs.iter().map(|&c| c as usize).sum();
        self.bytes -= bytes;
        Batch {
            envelopes,
            costs,
            bytes,
        }
    }

    pub fn into_parts(self) -> (Vec<Envelope>, Vec<u32>) {
        (self.envelopes, self.costs)
    }

    pub fn into_iter_with_costs(self) -> impl Iterator<Item = (Envelope, u32)> {
        self.envelopes.into_iter().zip(self.costs)
    }
}

/// A 128-bit key from two independent 64-bit SipHashes of what `feed` writes: collisions between
/// distinct inputs are practically impossible, and the key is 16 bytes however long the input.
/// Used where per-source or per-counter state must stay small (sequencer, counter totals).
pub fn key128(feed: impl Fn(&mut std::hash::DefaultHasher)) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        feed(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// What one map entry (a tag, a deprecated tag, a gauge metric) costs in memory beyond its key and
/// value bytes: the tree node's share, two `String` headers, allocation rounding.
pub const MAP_ENTRY_OVERHEAD: usize = 96;

/// What an envelope costs the pipeline's byte budget: an upper bound on its size when it leaves
/// (so batches sized by cost never exceed a Doppler's limit) and on what holding it costs.
///
/// Its encoded size on arrival, plus what processing can add: each deprecated tag once more as
/// rendered text (tagging copies them into `tags`), its origin once more when it will become the
/// source_id, [`MAP_ENTRY_OVERHEAD`] per map entry (deprecated ones twice), and `fixed` — the
/// agent's own tags, the default tags and the in-memory overhead of a decoded envelope, the same
/// for every envelope (see `wire::fixed_envelope_cost`). Even an empty envelope therefore costs a
/// few hundred bytes, which bounds the envelope count as well.
pub fn admission_cost(envelope: &Envelope, fixed: u32) -> u32 {
    let deprecated: usize = envelope
        .deprecated_tags
        .iter()
        .map(|(k, v)| k.len() + tagging::rendered_len(v) + 8)
        .sum();
    let origin = if envelope.source_id.is_empty() {
        let tag = envelope.tags.get("origin").map_or(0, String::len);
        let dep = envelope
            .deprecated_tags
            .get("origin")
            .map_or(0, tagging::rendered_len);
        tag.max(dep)
    } else {
        0
    };
    let gauge_entries = match &envelope.message {
        Some(crate::proto::envelope::Message::Gauge(g)) => g.metrics.len(),
        _ => 0,
    };
    let entries = envelope.tags.len() + 2 * envelope.deprecated_tags.len() + gauge_entries;
    let variable = envelope.encoded_len() + deprecated + origin + entries * MAP_ENTRY_OVERHEAD;
    u32::try_from(variable)
        .unwrap_or(u32::MAX)
        .saturating_add(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{value::Data, Value};

    #[test]
    fn cost_covers_what_processing_adds() {
        let empty = Envelope::default();
        assert_eq!(
            admission_cost(&empty, 300),
            300,
            "an empty envelope still costs the fixed part"
        );

        let mut mapped = Envelope::default();
        mapped.tags.insert("origin".into(), "x".repeat(1000));
        let plain = mapped.encoded_len() as u32;
        assert!(
            admission_cost(&mapped, 0) >= plain + 1000,
            "the origin becomes the source_id"
        );
        mapped.source_id = "set".into();
        assert_eq!(
            admission_cost(&mapped, 0) as usize,
            mapped.encoded_len() + MAP_ENTRY_OVERHEAD
        );

        let mut dep = Envelope::default();
        dep.deprecated_tags.insert(
            "k".into(),
            Value {
                data: Some(Data::Text("v".repeat(500))),
            },
        );
        assert!(
            admission_cost(&dep, 0) >= 2 * 500,
            "deprecated tags are copied into tags"
        );
    }
}
