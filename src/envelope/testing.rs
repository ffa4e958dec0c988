//! Test support: the pipeline's stages run in a row as the actors run them, and a model of the
//! ingress rules written plainly over decoded envelopes (the form the rules had before the
//! pipeline kept envelopes encoded), to check the byte pipeline against.

use std::collections::{BTreeMap, HashMap};

use prost::bytes::Bytes;
use prost::Message as _;

use super::encoded::EncodedBatch;
use super::sequence::{Sequencer, StreamId};
use super::tag::Sequence;
use super::tagging::{value_to_tag, Tagger};
use super::writer::Writer;
use super::{encode_batch, read_batch, ReadError};
use crate::proto::{envelope::Message, value::Data, Envelope, EnvelopeBatch};

/// The one stream id the test stages number envelopes in.
pub const STREAM: StreamId = *b"stream-1";

/// The stages after the edge, as the actors hold them.
pub struct Stages {
    pub tagger: Tagger,
    pub sequencer: Sequencer,
    pub signer: Writer,
}

impl Stages {
    pub fn new(defaults: &BTreeMap<String, String>) -> Self {
        Self {
            tagger: Tagger::new(defaults, 10_000),
            sequencer: Sequencer::new(10_000, || STREAM),
            signer: Writer::new("k", b"key"),
        }
    }

    /// Runs an `EnvelopeBatch` body through every stage on one slot; returns the envelopes as a
    /// Doppler decodes them, and how many took their source id from their origin.
    ///
    /// # Errors
    /// When the edge refuses the batch.
    pub fn run_body(&mut self, body: Bytes) -> Result<(Vec<Envelope>, u64), ReadError> {
        let (mut batch, oversize) = read_batch(body, 300, usize::MAX)?;
        assert_eq!(oversize, 0);
        let mapped = self.tagger.process(&mut batch);
        self.sequencer.stamp(&mut batch);
        let mut out = EncodedBatch::default();
        for item in batch.items() {
            self.signer.finish_item(&batch, item, &mut out);
            assert!(
                *out.costs().last().unwrap() <= item.cost,
                "the price covers what leaves"
            );
        }
        let decoded = EnvelopeBatch::decode(out.as_message_body()).expect("the output decodes");
        Ok((decoded.batch, mapped))
    }

    pub fn run(&mut self, envelopes: Vec<Envelope>) -> Vec<Envelope> {
        self.run_body(encode_batch(envelopes)).expect("reads").0
    }
}

/// A counter's identity: name, source id, every tag.
type CounterKey = (String, String, Vec<(String, String)>);

/// The ingress rules, sequencing and signing over a decoded envelope, as plainly as they can be
/// written (upstream-agent.md, "Ingress processing, in order").
pub struct Model {
    defaults: BTreeMap<String, String>,
    totals: HashMap<CounterKey, u64>,
    seq: HashMap<String, u64>,
    signer: Writer,
}

impl Model {
    pub fn new(defaults: &BTreeMap<String, String>) -> Self {
        Self {
            defaults: defaults.clone(),
            totals: HashMap::new(),
            seq: HashMap::new(),
            signer: Writer::new("k", b"key"),
        }
    }

    pub fn process(&mut self, env: &mut Envelope) {
        if env.source_id.is_empty() {
            if let Some(origin) = env.tags.get("origin") {
                env.source_id = origin.clone();
            } else if let Some(origin) = env.deprecated_tags.get("origin") {
                env.source_id = match &origin.data {
                    Some(Data::Text(s)) => s.clone(),
                    _ => String::new(),
                };
            }
        }
        for (k, v) in &env.deprecated_tags {
            env.tags.insert(k.clone(), value_to_tag(v));
        }
        for (k, v) in &self.defaults {
            env.tags.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if let Some(Message::Counter(c)) = &mut env.message {
            let key = (
                c.name.clone(),
                env.source_id.clone(),
                env.tags
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            let running = self.totals.entry(key).or_insert(0);
            if c.total == 0 && c.delta != 0 {
                *running = running.wrapping_add(c.delta);
            } else {
                *running = c.total;
            }
            c.total = *running;
        }
        let n = self.seq.entry(env.source_id.clone()).or_insert(0);
        *n += 1;
        let sequence = Sequence {
            stream: STREAM,
            seq: *n,
        };
        self.signer.stamp(env, Some(sequence));
    }
}

/// The default tags the pipeline checks run with: they clash with emitters' tags now and then.
pub fn default_tags() -> BTreeMap<String, String> {
    [
        ("deployment", "cf"),
        ("job", "diego"),
        ("origin", "default"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// `e` as a Doppler decodes it: prost normalises what the wire allows to vary (-0.0 and the
/// like), so two envelopes that mean the same compare equal.
pub fn as_sent(e: &Envelope) -> Vec<u8> {
    Envelope::decode(e.encode_to_vec().as_slice())
        .expect("prost reads its own encoding")
        .encode_to_vec()
}
