//! Per-source-id sequencing: each envelope's stream and number (written into the `metron` tag,
//! [`super::tag`]); and [`slot_of`], each source's Doppler connection slot (source affinity).

use std::hash::Hasher;

use super::tag::STREAM_BYTES;
use super::{Batch, KeyMap};

/// A stream id: 64 random bits, new for every agent process (and every table reset, see below).
pub type StreamId = [u8; STREAM_BYTES];

/// Numbers each source's envelopes 1, 2, 3 … within a stream, in the order it sees them.
///
/// Sources are keyed by a 64-bit keyed hash of their id ([`super::key64`]), so each costs a fixed
/// few dozen bytes however long the id. Memory is bounded by `max_sources`: when a new source
/// would exceed it, the table is cleared and a new stream id is taken, so every source restarts
/// at 1 *under a new stream*. A consumer therefore never sees a repeated or skipped number within
/// one stream.
pub struct Sequencer {
    stream_id: StreamId,
    next: KeyMap<u64>,
    max_sources: usize,
    new_stream_id: Box<dyn FnMut() -> StreamId + Send>,
    rotations: u64,
}

impl Sequencer {
    /// `new_stream_id` makes stream ids (random in production, deterministic in tests).
    ///
    /// # Panics
    /// If `max_sources` is zero (the config makes it `NonZero`).
    pub fn new(
        max_sources: usize,
        mut new_stream_id: impl FnMut() -> StreamId + Send + 'static,
    ) -> Self {
        assert!(max_sources > 0);
        Self {
            stream_id: new_stream_id(),
            next: KeyMap::default(),
            max_sources,
            new_stream_id: Box::new(new_stream_id),
            rotations: 0,
        }
    }

    pub fn stream_id(&self) -> StreamId {
        self.stream_id
    }

    /// Starts over after a panic: every source forgotten, numbering from 1 under a new stream,
    /// so a receiver sees a new stream rather than a gap or a repeat.
    pub fn reset(&mut self) {
        self.next = KeyMap::default();
        self.stream_id = (self.new_stream_id)();
    }

    /// How many times the table was reset and a new stream begun.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    pub fn sources(&self) -> usize {
        self.next.len()
    }

    /// The next sequence number of `source_id` (in the stream [`Sequencer::stream_id`] names
    /// afterwards).
    pub fn next(&mut self, source_id: &[u8]) -> u64 {
        let key = source_key(source_id);
        match self.next.get_mut(&key) {
            Some(n) => {
                *n += 1;
                *n
            }
            None => {
                if self.next.len() >= self.max_sources {
                    self.next.clear();
                    self.stream_id = (self.new_stream_id)();
                    self.rotations += 1;
                }
                self.next.insert(key, 1);
                1
            }
        }
    }

    /// Numbers every envelope of `part`, in order: sets each item's `seq` and `stream`.
    pub fn stamp(&mut self, part: &mut Batch) {
        let mut stream = part.add_stream(self.stream_id);
        for i in 0..part.len() {
            let source = part.bytes_of(part.items()[i].source);
            let rotations = self.rotations;
            let seq = self.next(source);
            if self.rotations != rotations {
                stream = part.add_stream(self.stream_id);
            }
            let item = &mut part.items_mut()[i];
            item.seq = seq;
            item.stream = stream;
        }
    }
}

fn source_key(source_id: &[u8]) -> u64 {
    super::key64(|h| h.write(source_id))
}

/// A source's connection slot: FNV-1a of the source id, so it is stable across restarts.
pub fn slot_of(source_id: &[u8], slots: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in source_id {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % slots as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    fn counting_ids() -> impl FnMut() -> StreamId + Send {
        let mut n = 0u64;
        move || {
            n += 1;
            n.to_be_bytes()
        }
    }

    fn stream(n: u64) -> StreamId {
        n.to_be_bytes()
    }

    #[test]
    fn numbers_each_source_from_one() {
        let mut s = Sequencer::new(100, counting_ids());
        let seqs: Vec<u64> = ["a", "b", "a", "a", "b"]
            .iter()
            .map(|src| s.next(src.as_bytes()))
            .collect();
        assert_eq!(seqs, [1, 1, 2, 3, 2]);
    }

    #[test]
    fn a_full_table_starts_a_new_stream() {
        let mut s = Sequencer::new(2, counting_ids());
        s.next(b"a");
        s.next(b"b");
        assert_eq!(s.stream_id(), stream(1));
        assert_eq!(s.next(b"c"), 1);
        assert_eq!(s.stream_id(), stream(2));
        assert_eq!(s.next(b"a"), 1);
        assert_eq!(s.stream_id(), stream(2));
        assert_eq!(s.rotations(), 1);
    }

    #[test]
    fn a_stream_that_rotates_within_a_batch_is_recorded_per_envelope() {
        use crate::proto::Envelope;
        let envs = ["a", "b", "c", "c"]
            .iter()
            .map(|s| Envelope {
                source_id: (*s).into(),
                ..Default::default()
            })
            .collect();
        let (mut batch, _) =
            crate::envelope::read_batch(crate::envelope::encode_batch(envs), 0, usize::MAX)
                .unwrap();
        let mut s = Sequencer::new(2, counting_ids());
        s.stamp(&mut batch);
        let got: Vec<(StreamId, u64)> = batch
            .items()
            .iter()
            .map(|i| (batch.streams()[i.stream as usize], i.seq))
            .collect();
        assert_eq!(
            got,
            [
                (stream(1), 1),
                (stream(1), 1),
                (stream(2), 1),
                (stream(2), 2)
            ]
        );
    }

    proptest! {
        /// Within each stream, each source's numbers are exactly 1..=n in order, the table never
        /// exceeds its bound, and a source always lands on the same slot.
        #[test]
        fn gapless_bounded_and_affine(sources in prop::collection::vec(0u8..20, 1..500),
                                      max in 1usize..8, slots in 1usize..6) {
            let mut s = Sequencer::new(max, counting_ids());
            let mut last: HashMap<(StreamId, String), u64> = HashMap::new();
            let mut slot_of_source: HashMap<u8, usize> = HashMap::new();
            for src in sources {
                let id = src.to_string();
                let seq = s.next(id.as_bytes());
                let slot = slot_of(id.as_bytes(), slots);
                prop_assert!(slot < slots);
                prop_assert_eq!(*slot_of_source.entry(src).or_insert(slot), slot);
                prop_assert!(s.sources() <= max);
                let key = (s.stream_id(), id);
                let prev = last.insert(key, seq).unwrap_or(0);
                prop_assert_eq!(seq, prev + 1);
            }
            let streams: HashSet<_> = last.keys().map(|(st, _)| *st).collect();
            prop_assert_eq!(streams.len() as u64, s.rotations() + 1);
        }
    }
}
