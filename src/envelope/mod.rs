//! Pure logic on envelopes: the batch that travels the pipeline, tagging and counter totals,
//! per-source sequencing, and the signing form. No actors, no I/O: unit- and property-tested.

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

    /// Builds a batch, pricing each envelope with [`admission_cost`].
    pub fn priced(envelopes: Vec<Envelope>) -> Self {
        let costs: Vec<u32> = envelopes.iter().map(admission_cost).collect();
        let bytes = costs.iter().map(|&c| c as usize).sum();
        Self {
            envelopes,
            costs,
            bytes,
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

/// What an envelope costs the pipeline's byte budget: its encoded size on arrival, plus its
/// deprecated tags once more, because tagging copies them into `tags`. Together with the agent's
/// fixed per-envelope overhead this bounds the envelope's size when it leaves.
pub fn admission_cost(envelope: &Envelope) -> u32 {
    let deprecated: usize = envelope
        .deprecated_tags
        .iter()
        .map(|(k, v)| k.len() + v.encoded_len() + 8)
        .sum();
    u32::try_from(envelope.encoded_len() + deprecated).unwrap_or(u32::MAX)
}
