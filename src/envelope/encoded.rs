//! Signed envelopes, encoded once and kept encoded while they wait for a Doppler.
//!
//! A decoded envelope costs about five times its encoded size in memory (the struct, a B-tree
//! node per map, one allocation per tag string), so the slot queues, which hold everything the
//! agent buffers while Dopplers are away, keep envelopes *framed*: each one is an
//! `EnvelopeBatch.batch` entry (field 1, length-delimited). An outgoing message's body is then
//! just the concatenation of framed envelopes, so batches merge and split at envelope boundaries
//! without re-encoding, and the budget held per queued envelope drops to its framed size.
//!
//! Once written, a batch's bytes are frozen into a shared buffer ([`EncodedBatch::freeze`]):
//! every destination that takes the whole batch holds the same bytes ([`EncodedBatch::share`]),
//! and a queue splits a batch without copying what follows the cut.

use prost::bytes::Bytes;
#[cfg(test)]
use {crate::proto::Envelope, prost::Message as _};

/// Budget bytes per queued envelope beyond its framed bytes: its entries in `ends` and `costs`,
/// rounded up.
pub const QUEUED_OVERHEAD: u32 = 16;

/// `EnvelopeBatch.batch` is field 1, length-delimited: tag byte `(1 << 3) | 2`.
const BATCH_FIELD_KEY: u8 = 0x0a;

/// Framed envelopes with the budget cost of each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    buf: Body,
    /// End offset in `buf` of each framed envelope.
    ends: Vec<u32>,
    costs: Vec<u32>,
    bytes: usize,
}

/// A batch's bytes: being written, or frozen and shareable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Open(Vec<u8>),
    Frozen(Bytes),
}

impl Default for Body {
    fn default() -> Self {
        Body::Open(Vec::new())
    }
}

impl Body {
    /// The buffer to append to; a frozen body is copied back into one (only tests append to a
    /// batch once it is queued).
    fn open(&mut self) -> &mut Vec<u8> {
        if let Body::Frozen(b) = self {
            *self = Body::Open(b.to_vec());
        }
        match self {
            Body::Open(v) => v,
            Body::Frozen(_) => unreachable!("opened above"),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Body::Open(v) => v,
            Body::Frozen(b) => b,
        }
    }

    fn freeze(&mut self) -> &mut Bytes {
        if let Body::Open(v) = self {
            v.shrink_to_fit();
            *self = Body::Frozen(Bytes::from(std::mem::take(v)));
        }
        match self {
            Body::Frozen(b) => b,
            Body::Open(_) => unreachable!("frozen above"),
        }
    }
}

impl EncodedBatch {
    pub fn with_capacity(envelopes: usize, bytes: usize) -> Self {
        Self {
            buf: Body::Open(Vec::with_capacity(bytes)),
            ends: Vec::with_capacity(envelopes),
            costs: Vec::with_capacity(envelopes),
            bytes: 0,
        }
    }

    /// Appends `envelope`, framed, costing `cost` budget bytes.
    #[cfg(test)]
    pub fn push(&mut self, envelope: &Envelope, cost: u32) {
        let buf = self.buf.open();
        buf.push(BATCH_FIELD_KEY);
        envelope
            .encode_length_delimited(buf)
            .expect("a Vec grows as needed");
        self.end_envelope(cost);
    }

    /// Appends the envelope whose bytes are `parts` written in turn, framed, costing what it
    /// holds: its framed bytes plus [`QUEUED_OVERHEAD`].
    pub fn push_parts(&mut self, parts: &[&[u8]]) {
        let buf = self.buf.open();
        let start = buf.len();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        buf.push(BATCH_FIELD_KEY);
        prost::encoding::encode_varint(len as u64, buf);
        for p in parts {
            buf.extend_from_slice(p);
        }
        let framed = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
        self.end_envelope(framed.saturating_add(QUEUED_OVERHEAD));
    }

    fn end_envelope(&mut self, cost: u32) {
        let end = self.buf.as_slice().len();
        self.ends
            .push(u32::try_from(end).expect("a batch stays far below 4 GiB"));
        self.costs.push(cost);
        self.bytes += cost as usize;
    }

    /// Ends the writing: gives back spare capacity, so the batch holds what its costs say, and
    /// makes its bytes shareable ([`EncodedBatch::share`]).
    pub fn freeze(&mut self) {
        self.buf.freeze();
        self.ends.shrink_to_fit();
        self.costs.shrink_to_fit();
    }

    /// Another handle on the same envelopes: the bytes are shared, not copied (the batch is
    /// frozen first if it was not).
    pub fn share(&mut self) -> EncodedBatch {
        self.freeze();
        self.clone()
    }

    /// A new batch holding the envelopes at `picks` (ascending indices), copied: for a
    /// destination that takes only some of a batch, so what it keeps is what it is charged.
    pub fn select(&self, picks: &[u32]) -> EncodedBatch {
        let body = self.buf.as_slice();
        let len: usize = picks.iter().map(|&i| self.span(i as usize).len()).sum();
        let mut out = EncodedBatch::with_capacity(picks.len(), len);
        let buf = out.buf.open();
        for &i in picks {
            let (i, span) = (i as usize, self.span(i as usize));
            buf.extend_from_slice(&body[span]);
            let end = u32::try_from(buf.len()).expect("a subset of a batch");
            out.ends.push(end);
            out.costs.push(self.costs[i]);
            out.bytes += self.costs[i] as usize;
        }
        out
    }

    /// Where envelope `i`'s framed bytes lie in the body.
    fn span(&self, i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        start..self.ends[i] as usize
    }

    /// Envelope `i` without its framing (an encoded `Envelope`).
    pub fn envelope(&self, i: usize) -> &[u8] {
        let framed = &self.buf.as_slice()[self.span(i)];
        let mut rest = &framed[1..];
        let _ = prost::encoding::decode_varint(&mut rest).expect("framed by this batch");
        rest
    }

    /// Heap bytes the batch holds (for tests of the budget's accuracy).
    pub fn heap_bytes(&self) -> usize {
        let body = match &self.buf {
            Body::Open(v) => v.capacity(),
            Body::Frozen(b) => b.len(),
        };
        body + 4 * (self.ends.capacity() + self.costs.capacity())
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The batch's total budget cost.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn costs(&self) -> &[u32] {
        &self.costs
    }

    /// The body of an `EnvelopeBatch` message holding these envelopes.
    pub fn as_message_body(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// Splits off the envelopes from index `at` on.
    pub fn split_off(&mut self, at: usize) -> EncodedBatch {
        if at >= self.len() {
            return EncodedBatch::default();
        }
        let cut = if at == 0 { 0 } else { self.ends[at - 1] };
        // Frozen, the cut costs no copy of what follows it.
        let buf = Body::Frozen(self.buf.freeze().split_off(cut as usize));
        let ends = self
            .ends
            .split_off(at)
            .into_iter()
            .map(|e| e - cut)
            .collect();
        let costs = self.costs.split_off(at);
        let bytes = costs.iter().map(|c| *c as usize).sum();
        self.bytes -= bytes;
        EncodedBatch {
            buf,
            ends,
            costs,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::EnvelopeBatch;
    use prost::Message;

    /// What `push_parts` should charge, computed independently of the buffer.
    fn queued_cost(envelope: &Envelope) -> u32 {
        let len = envelope.encoded_len();
        let framed = 1 + prost::length_delimiter_len(len) + len;
        u32::try_from(framed)
            .unwrap_or(u32::MAX)
            .saturating_add(QUEUED_OVERHEAD)
    }

    fn env(i: usize) -> Envelope {
        let mut e = Envelope {
            source_id: format!("src-{i}"),
            timestamp: i as i64,
            ..Default::default()
        };
        e.tags.insert("k".into(), "v".repeat(i));
        e
    }

    #[test]
    fn the_body_decodes_as_the_envelope_batch_through_splits() {
        let envs: Vec<Envelope> = (0..7).map(env).collect();
        let mut a = EncodedBatch::default();
        for e in &envs {
            a.push(e, queued_cost(e));
        }
        let decoded = EnvelopeBatch::decode(a.as_message_body()).unwrap();
        assert_eq!(decoded.batch, envs);
        let total = a.bytes();
        let rest = a.split_off(2);
        assert_eq!(a.bytes() + rest.bytes(), total);
        assert_eq!(
            EnvelopeBatch::decode(a.as_message_body()).unwrap().batch,
            envs[..2]
        );
        assert_eq!(
            EnvelopeBatch::decode(rest.as_message_body()).unwrap().batch,
            envs[2..]
        );
        let mut whole = rest.clone();
        let none = whole.split_off(whole.len());
        assert!(none.is_empty());
        let all = whole.split_off(0);
        assert!(whole.is_empty() && whole.bytes() == 0);
        assert_eq!(all, rest);
    }

    #[test]
    fn shared_batches_hold_the_same_bytes_and_selections_copy_what_they_pick() {
        let envs: Vec<Envelope> = (0..5).map(env).collect();
        let mut a = EncodedBatch::default();
        for e in &envs {
            a.push_parts(&[&e.encode_to_vec()]);
        }
        let b = a.share();
        assert_eq!(
            a.as_message_body().as_ptr(),
            b.as_message_body().as_ptr(),
            "shared, not copied"
        );
        for (i, e) in envs.iter().enumerate() {
            assert_eq!(Envelope::decode(b.envelope(i)).unwrap(), *e);
        }
        let picked = b.select(&[1, 3]);
        assert_eq!(
            EnvelopeBatch::decode(picked.as_message_body())
                .unwrap()
                .batch,
            vec![envs[1].clone(), envs[3].clone()]
        );
        assert_eq!(
            picked.bytes(),
            b.costs()[1] as usize + b.costs()[3] as usize
        );
        assert_eq!(
            picked.heap_bytes() - 8 * picked.len(),
            picked.as_message_body().len()
        );
    }

    #[test]
    fn the_cost_covers_the_framed_bytes() {
        let e = env(300);
        let mut b = EncodedBatch::default();
        b.push(&e, queued_cost(&e));
        assert!(b.bytes() >= b.as_message_body().len());
        assert_eq!(
            b.bytes(),
            b.as_message_body().len() + QUEUED_OVERHEAD as usize
        );
        // What the budget is charged covers what the batch holds, once shrunk.
        let mut many = EncodedBatch::default();
        for i in 0..100 {
            let e = env(i);
            many.push_parts(&[&e.encode_to_vec()]);
            assert_eq!(*many.costs().last().unwrap(), queued_cost(&e));
        }
        many.freeze();
        assert!(
            many.heap_bytes() <= many.bytes(),
            "{} > {}",
            many.heap_bytes(),
            many.bytes()
        );
    }
}
