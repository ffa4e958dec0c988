//! The signing form: `metron_sig = "<key_id>:<hex HMAC-SHA256 over canonical(envelope)>"`.
//!
//! `canonical` is a byte string defined field by field (README, "Signing"), independent of
//! protobuf's encoding, so another language can rebuild it from a decoded envelope. Every field
//! is covered except the `metron_sig` tag itself.

use prost::Message as _;
use ring::hmac;

use super::encoded::EncodedBatch;
use super::sequence::{SEQ_TAG, STREAM_TAG};
use super::tagging::{Tag, TagFrom, TagResolver};
use super::view::{Layouts, MessageRef, Parsed, ValueRef, COUNTER_KEY, SOURCE_ID_KEY, TAGS_KEY};
use super::Item;
use crate::proto::Envelope;

/// Tag carrying the signature.
pub const SIG_TAG: &str = "metron_sig";
/// The first item of every canonical form; bumped if the form ever changes.
pub const DOMAIN: &[u8] = b"metron-sig-v1";

/// Signs envelopes with one HMAC-SHA256 key, and writes them out with everything the pipeline
/// added. Reuses its buffers, so signing allocates nothing once they have grown.
pub struct Signer {
    key_id: String,
    key: hmac::Key,
    /// The canonical form being signed.
    buf: Vec<u8>,
    /// The fields appended to the envelope being written.
    extra: Vec<u8>,
    /// A rewritten counter field: its body, then its key and length.
    counter: Vec<u8>,
    parsed: Parsed,
    resolver: TagResolver,
}

impl Signer {
    pub fn new(key_id: &str, key: &[u8]) -> Self {
        Self {
            key_id: key_id.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            buf: Vec::with_capacity(1024),
            extra: Vec::with_capacity(512),
            counter: Vec::with_capacity(64),
            parsed: Parsed::default(),
            resolver: TagResolver::default(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Adds (or replaces) the `metron_sig` tag of a decoded envelope (tools and tests; the
    /// pipeline signs encoded envelopes with [`Signer::finish`]).
    pub fn sign(&mut self, env: &mut Envelope) {
        let bytes = env.encode_to_vec();
        self.parsed
            .parse(&bytes)
            .expect("prost's own encoding reads");
        self.parsed.sort_maps(&bytes);
        let (parsed, buf) = (&self.parsed, &mut self.buf);
        self.resolver.with_own(parsed, &bytes, |tags| {
            buf.clear();
            canonical_into(
                buf,
                parsed,
                &bytes,
                parsed.source_id.slice(&bytes),
                tags,
                None,
            );
        });
        let tag = hmac::sign(&self.key, &self.buf);
        let mut value = String::with_capacity(self.key_id.len() + 1 + 64);
        value.push_str(&self.key_id);
        value.push(':');
        push_hex(&mut value, tag.as_ref());
        env.tags.insert(SIG_TAG.to_owned(), value);
    }

    /// Writes the envelope `env` (admitted as `item`, read by the edge into `layouts`) to `out`
    /// as it leaves the agent: as it
    /// came, followed by the fields the ingress rules, the sequencer and the signature add —
    /// its source id from the origin, the missing `defaults`, its deprecated tags as tags, its
    /// counter total, `metron_stream` = `stream`, `metron_seq` and `metron_sig`. A decoder reads
    /// the last of a repeated field or map key, so appended fields win. A counter whose total
    /// changed has its `counter` field rewritten instead, since decoders *merge* a repeated
    /// message field, and not all the same way.
    pub fn finish(
        &mut self,
        env: &[u8],
        item: &Item,
        layouts: &Layouts,
        defaults: &[(String, String)],
        stream: &str,
        out: &mut EncodedBatch,
    ) {
        layouts.load(item.layout, &mut self.parsed);
        self.parsed.sort_maps(env);
        let parsed = &self.parsed;
        let (source, mapped) = parsed.effective_source(env);
        let mut seq = [0u8; 20];
        let seq = itoa(item.seq, &mut seq);
        let agent: [Tag<'_>; 2] = [
            (STREAM_TAG.as_bytes(), stream.as_bytes(), TagFrom::Agent),
            (SEQ_TAG.as_bytes(), seq, TagFrom::Agent),
        ];
        let (buf, extra, key, key_id) = (&mut self.buf, &mut self.extra, &self.key, &self.key_id);
        extra.clear();
        self.resolver
            .with_resolved(parsed, env, defaults, &agent, |tags| {
                buf.clear();
                canonical_into(buf, parsed, env, source.slice(env), tags, item.total);
                let mac = hmac::sign(key, buf);
                if mapped && !source.is_empty() {
                    put_field(extra, SOURCE_ID_KEY, source.slice(env));
                }
                for (k, v, from) in tags {
                    if *from != TagFrom::Wire && *k != SIG_TAG.as_bytes() {
                        put_entry(extra, k, v);
                    }
                }
                // The canonical form is signed: its buffer now holds the tag's value.
                let mut sig = [0u8; 64];
                hex_into(&mut sig, mac.as_ref());
                buf.clear();
                buf.extend_from_slice(key_id.as_bytes());
                buf.push(b':');
                buf.extend_from_slice(&sig);
                put_entry(extra, SIG_TAG.as_bytes(), buf);
            });
        match (item.total, parsed.message) {
            (Some(total), MessageRef::Counter { name, delta, .. }) => {
                let field = parsed.message_field;
                let counter = &mut self.counter;
                counter.clear();
                if !name.is_empty() {
                    put_field(counter, 0x0a, name.slice(env));
                }
                if delta != 0 {
                    counter.push(0x10);
                    put_varint(counter, delta);
                }
                counter.push(0x18);
                put_varint(counter, total);
                // The field's key and length go first, then the body written above.
                let body = counter.len();
                counter.push(COUNTER_KEY);
                put_varint(counter, body as u64);
                let (body, header) = counter.split_at(body);
                out.push_parts(&[
                    &env[..field.start as usize],
                    &env[field.end as usize..],
                    header,
                    body,
                    &self.extra,
                ]);
            }
            _ => out.push_parts(&[env, &self.extra]),
        }
    }

    /// [`Signer::finish`] for `item` of `batch`: its bytes, layout, defaults and stream.
    pub fn finish_item(&mut self, batch: &super::Batch, item: &Item, out: &mut EncodedBatch) {
        self.finish(
            batch.bytes_of(item.env),
            item,
            batch.layouts(),
            batch.defaults(),
            &batch.streams()[item.stream as usize],
            out,
        );
    }
}

/// `n` in decimal, written at the end of `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

pub fn varint_len(v: usize) -> usize {
    prost::encoding::encoded_len_varint(v as u64)
}

/// A varint; inline for the one-byte case, which every tag entry's lengths nearly always are
/// (prost's encoder, a loop behind a call, was 4% of signing).
#[inline]
fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else {
        prost::encoding::encode_varint(v, out);
    }
}

/// A length-delimited field: `key`, length, `b`.
fn put_field(out: &mut Vec<u8>, key: u8, b: &[u8]) {
    out.push(key);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A `tags` map entry.
fn put_entry(out: &mut Vec<u8>, k: &[u8], v: &[u8]) {
    let inner = 2 + varint_len(k.len()) + k.len() + varint_len(v.len()) + v.len();
    out.push(TAGS_KEY);
    put_varint(out, inner as u64);
    put_field(out, 0x0a, k);
    put_field(out, 0x12, v);
}

/// Why an envelope's signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("envelope has no metron_sig tag")]
    Missing,
    #[error("metron_sig is not <key_id>:<64 hex digits>")]
    Malformed,
    #[error("signed with key id {0:?}, which is not among the keys given")]
    UnknownKeyId(String),
    #[error("signature does not match the envelope")]
    Mismatch,
}

/// Checks an envelope's `metron_sig` against `key` (known as `key_id`), in constant time.
///
/// # Errors
/// A [`VerifyError`] saying what is wrong.
pub fn verify(env: &Envelope, key_id: &str, key: &[u8]) -> Result<(), VerifyError> {
    KeyRing::default().with(key_id, key).verify(env).map(drop)
}

/// `metron_sig`'s (key id, MAC).
fn signature(env: &Envelope) -> Result<(&str, Vec<u8>), VerifyError> {
    let sig = env.tags.get(SIG_TAG).ok_or(VerifyError::Missing)?;
    let (id, hex) = sig.rsplit_once(':').ok_or(VerifyError::Malformed)?;
    let mac = decode_hex(hex)
        .filter(|m| m.len() == 32)
        .ok_or(VerifyError::Malformed)?;
    Ok((id, mac))
}

/// The keys a receiver accepts, by key id: the agent's current key and the ones a rotation
/// retired (`signing.previous_keys`), since envelopes signed before a rotation may arrive after
/// it (they were buffered, or in flight).
#[derive(Default)]
pub struct KeyRing {
    keys: Vec<(String, hmac::Key)>,
}

impl KeyRing {
    /// Adds `key`, known as `key_id`.
    pub fn with(mut self, key_id: &str, key: &[u8]) -> Self {
        self.keys
            .push((key_id.to_owned(), hmac::Key::new(hmac::HMAC_SHA256, key)));
        self
    }

    /// Every key an agent's `signing:` section names: the current one and the previous ones.
    pub fn from_config(signing: &crate::config::SigningConfig) -> Self {
        let ring = Self::default().with(&signing.key_id, &signing.key);
        signing
            .previous_keys
            .iter()
            .fold(ring, |ring, (id, key)| ring.with(id, key))
    }

    /// Checks `env`'s `metron_sig` with the key its id names, in constant time; returns that id.
    ///
    /// # Errors
    /// A [`VerifyError`] saying what is wrong.
    pub fn verify<'e>(&self, env: &'e Envelope) -> Result<&'e str, VerifyError> {
        let (id, mac) = signature(env)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| VerifyError::UnknownKeyId(id.to_owned()))?;
        hmac::verify(key, &canonical(env), &mac).map_err(|_| VerifyError::Mismatch)?;
        Ok(id)
    }
}

/// The canonical byte string of a decoded envelope (everything but the `metron_sig` tag).
pub fn canonical(env: &Envelope) -> Vec<u8> {
    let bytes = env.encode_to_vec();
    let mut parsed = Parsed::default();
    parsed.parse(&bytes).expect("prost's own encoding reads");
    parsed.sort_maps(&bytes);
    let mut out = Vec::with_capacity(256);
    TagResolver::default().with_own(&parsed, &bytes, |tags| {
        canonical_into(
            &mut out,
            &parsed,
            &bytes,
            parsed.source_id.slice(&bytes),
            tags,
            None,
        );
    });
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Fields are bounded by the 10 MiB message limit, so a u32 length always fits.
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// IEEE-754 bits, big-endian, with -0.0 written as +0.0: proto3 encoders (prost among them) drop a
/// zero double whatever its sign, so a Doppler can only ever see +0.0.
fn put_f64(out: &mut Vec<u8>, d: f64) {
    let d = if d == 0.0 { 0.0 } else { d };
    out.extend_from_slice(&d.to_bits().to_be_bytes());
}

/// The canonical form of the envelope `parsed` read from `env` (after [`Parsed::sort_maps`]),
/// with `source_id` and `tags` (sorted, one per key) as it will leave, and a counter's `total`
/// when it was changed.
fn canonical_into(
    out: &mut Vec<u8>,
    parsed: &Parsed,
    env: &[u8],
    source_id: &[u8],
    tags: &[Tag<'_>],
    total: Option<u64>,
) {
    put_bytes(out, DOMAIN);
    out.extend_from_slice(&parsed.timestamp.to_be_bytes());
    put_bytes(out, source_id);
    put_bytes(out, parsed.instance_id.slice(env));

    let is_sig = |k: &[u8]| k == SIG_TAG.as_bytes();
    let signed_tags = tags.len() - tags.iter().filter(|t| is_sig(t.0)).count();
    out.extend_from_slice(&(signed_tags as u32).to_be_bytes());
    for (k, v, _) in tags.iter().filter(|t| !is_sig(t.0)) {
        put_bytes(out, k);
        put_bytes(out, v);
    }

    let deprecated = &parsed.deprecated;
    out.extend_from_slice(&(deprecated.len() as u32).to_be_bytes());
    for (k, v) in deprecated {
        put_bytes(out, k.slice(env));
        match v {
            ValueRef::None => out.push(0),
            ValueRef::Text(s) => {
                out.push(1);
                put_bytes(out, s.slice(env));
            }
            ValueRef::Integer(i) => {
                out.push(2);
                out.extend_from_slice(&i.to_be_bytes());
            }
            ValueRef::Decimal(d) => {
                out.push(3);
                put_f64(out, *d);
            }
        }
    }

    match parsed.message {
        MessageRef::None => out.push(0),
        MessageRef::Log { payload, r#type } => {
            out.push(1);
            put_bytes(out, payload.slice(env));
            out.extend_from_slice(&(r#type as u32).to_be_bytes());
        }
        MessageRef::Counter {
            name,
            delta,
            total: sent,
        } => {
            out.push(2);
            put_bytes(out, name.slice(env));
            out.extend_from_slice(&delta.to_be_bytes());
            out.extend_from_slice(&total.unwrap_or(sent).to_be_bytes());
        }
        MessageRef::Gauge => {
            let metrics = &parsed.gauge;
            out.push(3);
            out.extend_from_slice(&(metrics.len() as u32).to_be_bytes());
            for (k, unit, value) in metrics {
                put_bytes(out, k.slice(env));
                put_bytes(out, unit.slice(env));
                put_f64(out, *value);
            }
        }
        MessageRef::Timer { name, start, stop } => {
            out.push(4);
            put_bytes(out, name.slice(env));
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&stop.to_be_bytes());
        }
        MessageRef::Event { title, body } => {
            out.push(5);
            put_bytes(out, title.slice(env));
            put_bytes(out, body.slice(env));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes` into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Lowercase hex of `bytes`, appended to `s`.
pub fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
}

pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

/// Decodes hex (either case); `None` if it is not hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::{envelope::Message, value::Data, Counter, Log};
    use proptest::prelude::*;

    fn env() -> Envelope {
        let mut e = Envelope {
            timestamp: 1_700_000_000_000_000_000,
            source_id: "app".into(),
            instance_id: "0".into(),
            message: Some(Message::Log(Log {
                payload: b"hello".to_vec(),
                r#type: 1,
            })),
            ..Default::default()
        };
        e.tags.insert("b".into(), "2".into());
        e.tags.insert("a".into(), "1".into());
        e
    }

    #[test]
    fn varints_are_written_as_prost_writes_them() {
        for v in [0, 1, 0x7f, 0x80, 300, 1 << 35, u64::MAX] {
            let (mut ours, mut prost) = (vec![9], vec![9]);
            put_varint(&mut ours, v);
            prost::encoding::encode_varint(v, &mut prost);
            assert_eq!(ours, prost, "{v}");
        }
    }

    #[test]
    fn sign_then_verify() {
        let mut s = Signer::new("k1", b"secret");
        let mut e = env();
        s.sign(&mut e);
        assert!(e.tags[SIG_TAG].starts_with("k1:"));
        assert_eq!(e.tags[SIG_TAG].len(), 3 + 64);
        assert_eq!(verify(&e, "k1", b"secret"), Ok(()));
        assert_eq!(verify(&e, "k1", b"other"), Err(VerifyError::Mismatch));
        assert_eq!(
            verify(&e, "k2", b"secret"),
            Err(VerifyError::UnknownKeyId("k1".into()))
        );
        assert_eq!(verify(&env(), "k1", b"secret"), Err(VerifyError::Missing));
    }

    #[test]
    fn canonical_form_starts_as_documented() {
        let c = canonical(&env());
        assert_eq!(&c[..4], &13u32.to_be_bytes());
        assert_eq!(&c[4..17], DOMAIN);
        assert_eq!(&c[17..25], &1_700_000_000_000_000_000i64.to_be_bytes());
    }

    #[test]
    fn negative_zero_signs_like_zero_because_protobuf_drops_it() {
        use crate::proto::{Gauge, GaugeValue};
        use prost::Message as _;
        let gauge = |value: f64| Envelope {
            message: Some(Message::Gauge(Gauge {
                metrics: [(
                    "g".to_string(),
                    GaugeValue {
                        unit: "u".into(),
                        value,
                    },
                )]
                .into(),
            })),
            ..Default::default()
        };
        let mut s = Signer::new("k", b"key");
        let mut e = gauge(-0.0);
        s.sign(&mut e);
        // What a Doppler decodes after prost re-encoded the envelope still verifies.
        let decoded = Envelope::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(verify(&decoded, "k", b"key"), Ok(()));
        assert_eq!(canonical(&gauge(-0.0)), canonical(&gauge(0.0)));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(encode_hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(decode_hex("00ABff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(decode_hex("0g"), None);
    }

    /// Any `message`, or none.
    pub fn any_message() -> impl Strategy<Value = Option<Message>> {
        use crate::proto::{Event, Gauge, GaugeValue, Timer};
        prop_oneof![
            Just(None),
            (any::<Vec<u8>>(), any::<i32>())
                .prop_map(|(payload, r#type)| Some(Message::Log(Log { payload, r#type }))),
            (".{0,4}", any::<u64>(), any::<u64>()).prop_map(|(name, delta, total)| Some(
                Message::Counter(Counter { name, delta, total })
            )),
            prop::collection::btree_map(".{0,3}", (".{0,3}", any::<f64>()), 0..3).prop_map(|m| {
                Some(Message::Gauge(Gauge {
                    metrics: m
                        .into_iter()
                        .map(|(k, (unit, value))| (k, GaugeValue { unit, value }))
                        .collect(),
                }))
            }),
            (".{0,4}", any::<i64>(), any::<i64>())
                .prop_map(|(name, start, stop)| Some(Message::Timer(Timer { name, start, stop }))),
            (".{0,4}", ".{0,4}")
                .prop_map(|(title, body)| Some(Message::Event(Event { title, body }))),
        ]
    }

    fn any_envelope() -> impl Strategy<Value = Envelope> {
        let message = any_message();
        let value = prop_oneof![
            Just(None),
            ".{0,3}".prop_map(|s| Some(Data::Text(s))),
            any::<i64>().prop_map(|i| Some(Data::Integer(i))),
            any::<f64>().prop_map(|d| Some(Data::Decimal(d))),
        ];
        (
            any::<i64>(),
            ".{0,4}",
            ".{0,4}",
            prop::collection::btree_map(".{0,4}", ".{0,4}", 0..4),
            prop::collection::btree_map(".{0,4}", value, 0..3),
            message,
        )
            .prop_map(assemble)
    }

    /// The parts of an envelope that the strategies draw.
    pub type Parts = (
        i64,
        String,
        String,
        std::collections::BTreeMap<String, String>,
        std::collections::BTreeMap<String, Option<Data>>,
        Option<Message>,
    );

    /// An envelope from its drawn parts.
    pub fn assemble((timestamp, source_id, instance_id, tags, dep, message): Parts) -> Envelope {
        Envelope {
            timestamp,
            source_id,
            instance_id,
            tags,
            deprecated_tags: dep
                .into_iter()
                .map(|(k, data)| (k, crate::proto::Value { data }))
                .collect(),
            message,
        }
    }

    proptest! {
        /// What a Doppler decodes from the bytes the agent sends verifies, for any envelope.
        #[test]
        fn signatures_survive_the_wire(mut e in any_envelope()) {
            use prost::Message as _;
            Signer::new("k", b"key").sign(&mut e);
            let decoded = Envelope::decode(e.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(verify(&decoded, "k", b"key"), Ok(()));
        }

        /// Any change to a signed field breaks the signature; re-signing is idempotent.
        #[test]
        fn tampering_is_detected(name in "[a-z]{0,8}", delta in any::<u64>(), tag in "[a-z]{1,4}",
                                 bump in 1u64..1000) {
            let mut s = Signer::new("k", b"key");
            let mut e = Envelope {
                source_id: "s".into(),
                message: Some(Message::Counter(Counter { name, delta, total: 0 })),
                ..Default::default()
            };
            e.tags.insert(tag.clone(), "v".into());
            s.sign(&mut e);
            prop_assert_eq!(verify(&e, "k", b"key"), Ok(()));
            let sig = e.tags[SIG_TAG].clone();
            s.sign(&mut e);
            prop_assert_eq!(&e.tags[SIG_TAG], &sig);

            let mut t = e.clone();
            if let Some(Message::Counter(c)) = &mut t.message { c.total = c.total.wrapping_add(bump) }
            prop_assert_eq!(verify(&t, "k", b"key"), Err(VerifyError::Mismatch));
            let mut t = e.clone();
            t.tags.insert(tag, "w".into());
            prop_assert_eq!(verify(&t, "k", b"key"), Err(VerifyError::Mismatch));
            let mut t = e.clone();
            t.timestamp += bump as i64;
            prop_assert_eq!(verify(&t, "k", b"key"), Err(VerifyError::Mismatch));
        }
    }
}
