//! Per-source-id sequencing: stamps `metron_stream` and `metron_seq`; and [`slot_of`], each
//! source's Doppler connection slot (source affinity).

use std::collections::HashMap;

use crate::proto::Envelope;

/// Tag naming the sequence stream: unique per agent process (and per table reset, see below).
pub const STREAM_TAG: &str = "metron_stream";
/// Tag holding the per-source sequence number, decimal, starting at 1 in each stream.
pub const SEQ_TAG: &str = "metron_seq";

/// Numbers each source's envelopes 1, 2, 3 … within a stream, in the order it sees them.
///
/// Sources are keyed by a 128-bit hash of their id, so each costs a fixed few dozen bytes however
/// long the id. Memory is bounded by `max_sources`: when a new source would exceed it, the table is cleared and
/// a new stream id is taken, so every source restarts at 1 *under a new `metron_stream`*. A
/// consumer therefore never sees a repeated or skipped number within one stream.
pub struct Sequencer {
    stream_id: String,
    next: HashMap<u128, u64>,
    max_sources: usize,
    new_stream_id: Box<dyn FnMut() -> String + Send>,
    rotations: u64,
}

impl Sequencer {
    /// `new_stream_id` makes stream ids (random in production, deterministic in tests).
    ///
    /// # Panics
    /// If `max_sources` is zero (the config makes it `NonZero`).
    pub fn new(
        max_sources: usize,
        mut new_stream_id: impl FnMut() -> String + Send + 'static,
    ) -> Self {
        assert!(max_sources > 0);
        Self {
            stream_id: new_stream_id(),
            next: HashMap::new(),
            max_sources,
            new_stream_id: Box::new(new_stream_id),
            rotations: 0,
        }
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// How many times the table was reset and a new stream begun.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    pub fn sources(&self) -> usize {
        self.next.len()
    }

    /// Stamps the two sequence tags.
    pub fn stamp(&mut self, env: &mut Envelope) {
        let key = source_key(&env.source_id);
        let seq = match self.next.get_mut(&key) {
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
        };
        env.tags.insert(STREAM_TAG.into(), self.stream_id.clone());
        env.tags.insert(SEQ_TAG.into(), seq.to_string());
    }
}

fn source_key(source_id: &str) -> u128 {
    use std::hash::Hash;
    super::key128(|h| source_id.hash(h))
}

/// A source's connection slot: FNV-1a of the source id, so it is stable across restarts.
pub fn slot_of(source_id: &str, slots: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source_id.bytes() {
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

    fn counting_ids() -> impl FnMut() -> String + Send {
        let mut n = 0;
        move || {
            n += 1;
            format!("stream-{n}")
        }
    }

    fn env(source: &str) -> Envelope {
        Envelope {
            source_id: source.into(),
            ..Default::default()
        }
    }

    #[test]
    fn numbers_each_source_from_one() {
        let mut s = Sequencer::new(100, counting_ids());
        let seqs: Vec<(String, String)> = ["a", "b", "a", "a", "b"]
            .iter()
            .map(|src| {
                let mut e = env(src);
                s.stamp(&mut e);
                (e.source_id.clone(), e.tags[SEQ_TAG].clone())
            })
            .collect();
        let want = [("a", "1"), ("b", "1"), ("a", "2"), ("a", "3"), ("b", "2")];
        for ((gs, gq), (ws, wq)) in seqs.iter().zip(want) {
            assert_eq!((gs.as_str(), gq.as_str()), (ws, wq));
        }
    }

    #[test]
    fn a_full_table_starts_a_new_stream() {
        let mut s = Sequencer::new(2, counting_ids());
        let mut e = env("a");
        s.stamp(&mut e);
        let mut e = env("b");
        s.stamp(&mut e);
        assert_eq!(e.tags[STREAM_TAG], "stream-1");
        let mut e = env("c");
        s.stamp(&mut e);
        assert_eq!(e.tags[STREAM_TAG], "stream-2");
        assert_eq!(e.tags[SEQ_TAG], "1");
        let mut e = env("a");
        s.stamp(&mut e);
        assert_eq!(
            (e.tags[STREAM_TAG].as_str(), e.tags[SEQ_TAG].as_str()),
            ("stream-2", "1")
        );
        assert_eq!(s.rotations(), 1);
    }

    proptest! {
        /// Within each stream, each source's numbers are exactly 1..=n in order, the table never
        /// exceeds its bound, and a source always lands on the same slot.
        #[test]
        fn gapless_bounded_and_affine(sources in prop::collection::vec(0u8..20, 1..500),
                                      max in 1usize..8, slots in 1usize..6) {
            let mut s = Sequencer::new(max, counting_ids());
            let mut last: HashMap<(String, String), u64> = HashMap::new();
            let mut slot_of_source: HashMap<u8, usize> = HashMap::new();
            for src in sources {
                let mut e = env(&src.to_string());
                s.stamp(&mut e);
                let slot = slot_of(&e.source_id, slots);
                prop_assert!(slot < slots);
                prop_assert_eq!(*slot_of_source.entry(src).or_insert(slot), slot);
                prop_assert!(s.sources() <= max);
                let key = (e.tags[STREAM_TAG].clone(), e.source_id.clone());
                let seq: u64 = e.tags[SEQ_TAG].parse().unwrap();
                let prev = last.insert(key, seq).unwrap_or(0);
                prop_assert_eq!(seq, prev + 1);
            }
            let streams: HashSet<_> = last.keys().map(|(st, _)| st.clone()).collect();
            prop_assert_eq!(streams.len() as u64, s.rotations() + 1);
        }
    }
}
