//! Pure logic on envelopes: the batch that travels the pipeline, tagging and counter totals,
//! per-source sequencing, and the signing form. No actors, no I/O: unit- and property-tested.

pub mod encoded;
pub mod fields;
pub mod outbox;
pub mod pacer;
pub mod queue;
pub mod raw;
pub mod sequence;
pub mod signing;
pub mod tag;
pub mod tagging;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
pub mod view;
pub mod writer;

use std::sync::Arc;

use prost::bytes::Bytes;

use view::{Layouts, MessageRef, Parsed, Span};

/// Budget bytes routed to one destination (a Doppler slot, a drain) and not yet delivered,
/// dropped or found smaller once encoded: what its share of the budget is checked against.
#[derive(Debug, Default)]
pub struct Routed(std::sync::atomic::AtomicUsize);

impl Routed {
    pub fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn sub(&self, bytes: usize) {
        let prev = self.0.fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
        debug_assert!(prev >= bytes, "unrouted more than was routed");
    }

    pub fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What an envelope carries, for the destinations' filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Log,
    Counter,
    Gauge,
    Timer,
    Event,
    /// No message at all (the Doppler pool passes it on; a drain cannot format it).
    None,
}

/// The kinds a destination takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub const ALL: Kinds = Kinds(0b11_1111);

    pub fn of(kinds: &[Kind]) -> Kinds {
        Kinds(kinds.iter().fold(0, |bits, k| bits | Self::bit(*k)))
    }

    pub fn without(self, kind: Kind) -> Kinds {
        Kinds(self.0 & !Self::bit(kind))
    }

    pub fn takes(self, kind: Kind) -> bool {
        self.0 & Self::bit(kind) != 0
    }

    fn bit(kind: Kind) -> u8 {
        1 << kind as u8
    }
}

/// One envelope of a [`Batch`]: where its bytes are, what it cost, and what the pipeline decided
/// about it so far. The envelope itself is never decoded: the signer writes it out as it came,
/// with the agent's additions appended (see [`writer::Writer::finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// The envelope's bytes in the batch's body.
    pub env: Span,
    /// What it holds of the pipeline's byte budget; see [`admission_cost`].
    pub cost: u32,
    /// Its source id after the origin rule, in the batch's body.
    pub source: Span,
    /// The origin rule gave it its source id (which the signer writes into `source_id`).
    pub origin_mapped: bool,
    /// It is a counter (the tagger keeps its running total).
    pub counter: bool,
    /// The counter total to write, when the tagger changed it.
    pub total: Option<u64>,
    /// Its number in its stream, set by the sequencer (0 when sequencing is off).
    pub seq: u64,
    /// Its stream: an index into the batch's streams.
    pub stream: u32,
    /// What the edge read of it: an index into the batch's [`Layouts`].
    pub layout: u32,
}

/// Envelopes moving through the pipeline together, still encoded: a shared body (an
/// `EnvelopeBatch` as it arrived, or as the edge re-encoded it) and one [`Item`] per envelope,
/// with what each one cost the pipeline's byte budget at admission (so the exact amount is given
/// back however batches are split).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    body: Bytes,
    items: Vec<Item>,
    bytes: usize,
    /// The default tags the ingress actor applied (the signer writes the missing ones).
    defaults: Arc<[(String, String)]>,
    /// The stream ids [`Item::stream`] indexes.
    streams: Vec<sequence::StreamId>,
    /// What the edge read of each envelope, which [`Item::layout`] indexes.
    layouts: Arc<Layouts>,
    /// A notice about a drain (its outbox's id): the sequencer does not route it to that drain
    /// (decision 29).
    notice_about: Option<u64>,
}

impl Batch {
    /// The batch the edge read from `body`: its items and what it read of each.
    fn read(body: Bytes, items: Vec<Item>, layouts: Layouts) -> Self {
        Self {
            body,
            bytes: items.iter().map(|i| i.cost as usize).sum(),
            items,
            defaults: Arc::default(),
            streams: Vec::new(),
            layouts: Arc::new(layouts),
            notice_about: None,
        }
    }

    /// An empty batch sharing this one's body and tags, for items moved out of it.
    pub fn part(&self) -> Self {
        Self {
            body: self.body.clone(),
            items: Vec::new(),
            bytes: 0,
            defaults: self.defaults.clone(),
            streams: Vec::new(),
            layouts: self.layouts.clone(),
            notice_about: self.notice_about,
        }
    }

    /// The drain this batch is a notice about (see [`Batch::mark_notice`]).
    pub fn notice_about(&self) -> Option<u64> {
        self.notice_about
    }

    /// Marks the batch as a notice about the drain whose outbox has id `outbox`.
    pub fn mark_notice(&mut self, outbox: u64) {
        self.notice_about = Some(outbox);
    }

    pub fn push(&mut self, item: Item) {
        self.bytes += item.cost as usize;
        self.items.push(item);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sum of the admission costs: what this batch holds of the pipeline's byte budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    pub fn items_mut(&mut self) -> &mut [Item] {
        &mut self.items
    }

    /// The bytes `span` covers in the body.
    pub fn bytes_of(&self, span: Span) -> &[u8] {
        span.slice(&self.body)
    }

    /// What the edge read of the envelopes (see [`Item::layout`]).
    pub fn layouts(&self) -> &Layouts {
        &self.layouts
    }

    pub fn defaults(&self) -> &[(String, String)] {
        &self.defaults
    }

    pub fn set_defaults(&mut self, defaults: Arc<[(String, String)]>) {
        self.defaults = defaults;
    }

    pub fn streams(&self) -> &[sequence::StreamId] {
        &self.streams
    }

    /// Adds a stream id; returns its index for [`Item::stream`].
    pub fn add_stream(&mut self, stream: sequence::StreamId) -> u32 {
        self.streams.push(stream);
        u32::try_from(self.streams.len() - 1).expect("at most one stream per envelope")
    }
}

/// A 64-bit key for what `feed` writes: SipHash under a key drawn at random once per process, so
/// the key is 8 bytes however long the input, and no emitter can choose inputs that collide (nor
/// crowd one bucket of a [`KeyMap`]). Two distinct inputs collide with probability 2^-64: in a
/// full table of 100,000 sources, about 3 in 10^10. Used where per-source or per-counter state
/// must stay small (sequencer, counter totals).
pub fn key64(feed: impl FnOnce(&mut std::hash::DefaultHasher)) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let mut h = KEY.get_or_init(std::hash::RandomState::new).build_hasher();
    feed(&mut h);
    h.finish()
}

/// A map keyed by [`key64`] outputs. They are uniform already, so the map uses them as its hash
/// instead of hashing them again (that second SipHash was a third of the hashing per envelope).
pub type KeyMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<Prehashed>>;

/// The hasher of [`KeyMap`]: a `u64` key is its own hash.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    /// Only `u64` keys are written in practice; anything else still hashes to something usable.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Bytes one appended map entry takes beyond its key and value: the entry's field key and
/// length, and the key's and value's field keys and lengths (lengths up to 10 MiB).
pub const ENTRY_FRAMING: usize = 16;

/// What an item costs while it waits for the signer beyond its bytes and its layout
/// ([`Layouts::bytes_for`]): the [`Item`] itself and its share of the batch's vectors, rounded
/// up.
pub const ITEM_OVERHEAD: usize = 64;

/// What an envelope costs the pipeline's byte budget: an upper bound on its size when it leaves
/// (so batches sized by cost never exceed a Doppler's limit) and on what holding it costs.
///
/// Its framed size on arrival (plus room for the framing to grow), plus what processing can
/// append: each deprecated tag once more as a rendered tag, its origin once more when it becomes
/// the source_id, a counter's total, and `fixed` — the agent's own tags, the default tags and
/// [`ITEM_OVERHEAD`], the same for every envelope (see `wire::fixed_envelope_cost`). Even an
/// empty envelope therefore costs a couple of hundred bytes, which bounds the envelope count as
/// well.
pub fn admission_cost(parsed: &Parsed, envelope: &[u8], fixed: u32) -> u32 {
    let deprecated: usize = parsed
        .deprecated
        .iter()
        .map(|(k, v)| k.len() + tagging::rendered_len(v) + ENTRY_FRAMING)
        .sum();
    let (source, mapped) = parsed.effective_source(envelope);
    let origin = if mapped { source.len() + 6 } else { 0 };
    // A counter whose total the tagger sets: the total's varint, and the message's length growing.
    let counter = match parsed.message {
        MessageRef::Counter { .. } => 16,
        _ => 0,
    };
    // The field key, and a length that may grow to 5 bytes as tags are appended.
    let framed = 1 + 5 + envelope.len();
    let variable = framed + deprecated + origin + counter + Layouts::bytes_for(parsed);
    u32::try_from(variable)
        .unwrap_or(u32::MAX)
        .saturating_add(fixed)
}

/// Why [`read_batch`] refused a batch.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// prost's own message says "failed to decode Protobuf message".
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
    #[error("failed to decode Protobuf message: EnvelopeBatch.batch: {0}")]
    Framing(#[from] raw::WireError),
    /// prost decoded an envelope that, once re-encoded, still did not read (a bug).
    #[error("failed to decode Protobuf message: an envelope re-encoded by prost does not read")]
    Unreadable,
    /// The reader panicked (a bug; the edge catches it and counts it in `actor_panics`).
    #[error("internal error while reading the batch: {0}")]
    Panicked(String),
}

/// Reads an encoded `EnvelopeBatch` body into a [`Batch`]: each envelope priced
/// ([`admission_cost`] with `fixed`), its origin rule applied, and left out (counted in the
/// second value) when its price exceeds `max_cost`. Envelopes this reader leaves to prost
/// ([`view::Unusual`]) are decoded and re-encoded by prost, into a new body.
///
/// # Errors
/// prost's error when an envelope (or the batch's framing) does not decode.
pub fn read_batch(body: Bytes, fixed: u32, max_cost: usize) -> Result<(Batch, usize), ReadError> {
    let mut parsed = Parsed::default();
    if let Some(read) = read_items(&body, &mut parsed, fixed, max_cost) {
        return Ok(read);
    }
    let mut canonical = Vec::with_capacity(body.len() + body.len() / 8);
    for entry in raw::batch_entries(&body) {
        let entry = entry?;
        if parsed.parse(entry).is_ok() {
            canonical.push(0x0a);
            prost::encoding::encode_varint(entry.len() as u64, &mut canonical);
            canonical.extend_from_slice(entry);
        } else {
            // Decoded as the one entry of a batch, so prost's recursion budget is the one it has
            // inside an EnvelopeBatch.
            let mut framed = vec![0x0a];
            prost::encoding::encode_varint(entry.len() as u64, &mut framed);
            framed.extend_from_slice(entry);
            let one = <crate::proto::EnvelopeBatch as prost::Message>::decode(framed.as_slice())?;
            canonical.extend_from_slice(&prost::Message::encode_to_vec(&one));
        }
    }
    read_items(&Bytes::from(canonical), &mut parsed, fixed, max_cost).ok_or(ReadError::Unreadable)
}

/// [`read_batch`] when every envelope reads; `None` otherwise.
fn read_items(
    body: &Bytes,
    parsed: &mut Parsed,
    fixed: u32,
    max_cost: usize,
) -> Option<(Batch, usize)> {
    let mut items = Vec::new();
    let mut layouts = Layouts::default();
    let mut oversize = 0;
    for entry in raw::batch_entries(body) {
        let entry = entry.ok()?;
        parsed.parse(entry).ok()?;
        let cost = admission_cost(parsed, entry, fixed);
        if cost as usize > max_cost {
            oversize += 1;
            continue;
        }
        let env = Span::of(body, entry);
        let (source, origin_mapped) = parsed.effective_source(entry);
        items.push(Item {
            env,
            cost,
            source: Span {
                start: env.start + source.start,
                end: env.start + source.end,
            },
            origin_mapped,
            counter: matches!(parsed.message, MessageRef::Counter { .. }),
            total: None,
            seq: 0,
            stream: 0,
            layout: layouts.push(parsed),
        });
    }
    layouts.shrink_to_fit();
    Some((Batch::read(body.clone(), items, layouts), oversize))
}

/// Encodes decoded envelopes (`Sender`, v1, the agent's own) as a batch body for [`read_batch`].
pub fn encode_batch(envelopes: Vec<crate::proto::Envelope>) -> Bytes {
    let batch = crate::proto::EnvelopeBatch { batch: envelopes };
    Bytes::from(prost::Message::encode_to_vec(&batch))
}

#[cfg(test)]
mod tests {
    use super::testing::{as_sent, default_tags as defaults, Model, Stages};
    use super::*;
    use crate::proto::{envelope::Message, value::Data, Counter, Envelope, Value};
    use proptest::prelude::*;
    use prost::Message as _;

    /// Envelopes that exercise every rule: origins in tags and deprecated tags, tag clashes with
    /// the defaults and the agent's own tags, counters sharing names and sources.
    fn any_envelope() -> impl Strategy<Value = Envelope> {
        let key = prop_oneof![
            Just("origin".to_string()),
            Just("job".to_string()),
            Just("metron".to_string()),
            Just("metron_sig".to_string()),
            "[a-c]{1,2}",
        ];
        let value = prop_oneof![
            Just(None),
            "[a-z]{0,3}".prop_map(|s| Some(Data::Text(s))),
            any::<i64>().prop_map(|i| Some(Data::Integer(i))),
            any::<f64>().prop_map(|d| Some(Data::Decimal(d))),
        ];
        let message = prop_oneof![
            crate::envelope::signing::tests::any_message(),
            ("[ab]", 0u64..3, 0u64..3).prop_map(|(name, delta, total)| Some(Message::Counter(
                Counter { name, delta, total }
            ))),
        ];
        (
            any::<i64>(),
            prop_oneof![Just(String::new()), "[xy]"],
            ".{0,3}",
            prop::collection::btree_map(key.clone(), "[a-z]{0,3}", 0..4),
            prop::collection::btree_map(key, value, 0..3),
            message,
        )
            .prop_map(crate::envelope::signing::tests::assemble)
    }

    proptest! {
        /// The pipeline over encoded envelopes gives exactly what the rules give over decoded
        /// ones: source id, tags, counter totals, sequence numbers and the signature.
        #[test]
        fn the_byte_pipeline_matches_the_rules(batches in prop::collection::vec(
            prop::collection::vec(any_envelope(), 0..6), 1..5)) {
            let mut stages = Stages::new(&defaults());
            let mut model = Model::new(&defaults());
            for batch in batches {
                let got = stages.run(batch.clone());
                prop_assert_eq!(got.len(), batch.len());
                for (mut want, got) in batch.into_iter().zip(got) {
                    model.process(&mut want);
                    prop_assert_eq!(as_sent(&got), as_sent(&want), "{:?}", got);
                    prop_assert!(crate::verify(&got, "k", b"key").is_ok());
                }
            }
        }

        /// What the edge keeps of each envelope of a batch gives the signer exactly what
        /// reading that envelope again gives, whatever came before it in the batch.
        #[test]
        fn layouts_give_back_what_was_read(batch in prop::collection::vec(any_envelope(), 0..8)) {
            let body = encode_batch(batch);
            let (read, _) = read_batch(body.clone(), 0, usize::MAX).unwrap();
            let mut loaded = Parsed::default();
            let mut again = Parsed::default();
            for item in read.items() {
                read.layouts().load(item.layout, &mut loaded);
                again.parse(read.bytes_of(item.env)).unwrap();
                prop_assert_eq!(&loaded, &again);
            }
        }

        /// Encodings other than prost's read the same as prost decodes them: fields out of order,
        /// repeated fields and map keys (the last wins), unknown fields, merged messages, keys
        /// longer than they need be, and strings that are UTF-8 but not ASCII.
        #[test]
        fn unusual_encodings_read_as_prost_decodes_them(
            e in any_envelope(),
            extra in prop::collection::vec(prop_oneof![
                Just(vec![0x08, 0x05]),                         // timestamp again
                Just(vec![0x12, 0x01, b'z']),                   // source_id again
                Just(vec![0x4a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b']), // tag a=b
                Just(vec![0x4a, 0x03, 0x0a, 0x01, b'a']),       // tag a="" (no value field)
                Just(vec![0x58, 0x01]),                          // unknown field 11
                Just(vec![0x88, 0x00, 0x05]),                    // timestamp, key in 2 bytes
                Just(vec![0x4a, 0x08, 0x0a, 0x02, 0xc3, 0xa9, 0x12, 0x02, 0xc3, 0xbc]), // tag é=ü
                Just(vec![0x2a, 0x02, 0x10, 0x07]),              // a counter's delta, merged
                Just(vec![0x22, 0x02, 0x10, 0x01]),              // a log's type, merged
                Just(vec![0x1a, 0x07, 0x0a, 0x01, b'd', 0x12, 0x02, 0x10, 0x03]), // deprecated d=3
            ], 0..4),
            front in any::<bool>(),
        ) {
            let plain = e.encode_to_vec();
            let extra: Vec<u8> = extra.concat();
            let bytes = if front { [extra, plain].concat() } else { [plain, extra].concat() };
            let decoded = Envelope::decode(bytes.as_slice()).unwrap();
            let mut body = vec![0x0a];
            prost::encoding::encode_varint(bytes.len() as u64, &mut body);
            body.extend_from_slice(&bytes);
            let got = Stages::new(&defaults()).run_body(Bytes::from(body)).unwrap().0;
            let mut want = decoded;
            Model::new(&defaults()).process(&mut want);
            prop_assert_eq!(as_sent(&got[0]), as_sent(&want));
        }

        /// Whatever the bytes, reading a batch never panics, and refuses it exactly when prost
        /// does.
        #[test]
        fn reading_agrees_with_prost(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let prost = crate::proto::EnvelopeBatch::decode(bytes.as_slice());
            let read = read_batch(Bytes::from(bytes), 0, usize::MAX);
            prop_assert_eq!(prost.is_ok(), read.is_ok(), "{:?}", read.err());
            if let Ok(b) = prost {
                prop_assert_eq!(b.batch.len(), read.unwrap().0.len());
            }
        }
    }

    /// `n` nested groups of field 15 around `inner`.
    fn nested_groups(n: usize, inner: &[u8]) -> Vec<u8> {
        let mut v = vec![0x7b; n];
        v.extend_from_slice(inner);
        v.extend(std::iter::repeat_n(0x7c, n));
        v
    }

    /// prost bounds group nesting by its recursion budget, in the batch and in each envelope.
    #[test]
    fn group_depth_boundaries_agree_with_prost() {
        for n in 95..=102 {
            for inner in [&[][..], &[0x08, 0x01][..]] {
                let body = nested_groups(n, inner);
                let prost = crate::proto::EnvelopeBatch::decode(body.as_slice()).is_ok();
                let read = read_batch(Bytes::from(body), 0, usize::MAX).is_ok();
                assert_eq!(prost, read, "batch level n={n} inner={inner:?}");
                let env = nested_groups(n, inner);
                let mut body = vec![0x0a];
                prost::encoding::encode_varint(env.len() as u64, &mut body);
                body.extend_from_slice(&env);
                let prost = crate::proto::EnvelopeBatch::decode(body.as_slice()).is_ok();
                let read = read_batch(Bytes::from(body), 0, usize::MAX).is_ok();
                assert_eq!(prost, read, "envelope level n={n} inner={inner:?}");
            }
        }
    }

    #[test]
    fn invalid_utf8_is_refused_like_prost_refuses_it() {
        // source_id = 0xff
        let body = Bytes::from_static(&[0x0a, 0x03, 0x12, 0x01, 0xff]);
        assert!(crate::proto::EnvelopeBatch::decode(&body[..]).is_err());
        assert!(matches!(
            read_batch(body, 0, usize::MAX),
            Err(ReadError::Decode(_))
        ));
    }

    #[test]
    fn cost_covers_what_processing_adds() {
        let price = |e: &Envelope| {
            let bytes = e.encode_to_vec();
            let mut p = Parsed::default();
            p.parse(&bytes).unwrap();
            admission_cost(&p, &bytes, 300)
        };
        let empty = Envelope::default();
        let head = Layouts::bytes_for(&Parsed::default()) as u32;
        assert_eq!(
            price(&empty),
            300 + 6 + head,
            "an empty envelope still costs the fixed part and its layout"
        );

        let mut mapped = Envelope::default();
        mapped.tags.insert("origin".into(), "x".repeat(1000));
        let plain = mapped.encoded_len() as u32;
        assert!(
            price(&mapped) >= 300 + plain + 1000,
            "the origin becomes the source_id"
        );
        mapped.source_id = "set".into();
        let entry = Layouts::bytes_for(&{
            let mut p = Parsed::default();
            p.parse(&mapped.encode_to_vec()).unwrap();
            p
        }) as u32;
        assert_eq!(
            price(&mapped),
            300 + 6 + mapped.encoded_len() as u32 + entry
        );

        let mut dep = Envelope::default();
        dep.deprecated_tags.insert(
            "k".into(),
            Value {
                data: Some(Data::Text("v".repeat(500))),
            },
        );
        assert!(
            price(&dep) >= 300 + 2 * 500,
            "deprecated tags are copied into tags"
        );
    }
}
