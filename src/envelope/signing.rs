//! Signatures: the canonical form, the MAC in the `metron` tag, and verifying it.
//!
//! The signature is an HMAC-SHA256 over `canonical(envelope)`, a byte string defined field by
//! field (`docs/signing.md`), independent of protobuf's encoding, so another language can rebuild
//! it from a decoded envelope. Form 2 (what the agent writes) covers every field except the
//! `metron` tag, plus the sequence that tag carries, and keeps the first 16 bytes of the MAC
//! ([`super::tag`]). Form 1 (`metron_sig`, before issue 19) is still verified, so receivers can
//! migrate while older agents run.

use prost::Message as _;
use ring::hmac;

use super::tag::{self, MetronTag, Sequence, MAC_BYTES, TAG};
use super::tagging::{Tag, TagResolver};
use super::view::{MessageRef, Parsed, ValueRef};
use crate::proto::Envelope;

/// Form 1's tag: `<key_id>:<64 hex digits>`, verified but no longer written.
pub const SIG_TAG_V1: &str = "metron_sig";
/// The first item of form 1's canonical form.
pub const DOMAIN_V1: &[u8] = b"metron-sig-v1";
/// The first item of form 2's canonical form; bumped if the form ever changes.
pub const DOMAIN: &[u8] = b"metron-sig-v2";

/// Which canonical form to build.
#[derive(Debug, Clone, Copy)]
enum Form<'a> {
    /// `metron_sig`: every tag but `metron_sig`.
    V1,
    /// `metron`: every tag but `metron`, and the sequence it carries.
    V2(Option<&'a Sequence>),
}

/// A signing key and the id receivers know it by.
pub struct SigningKey {
    id: String,
    key: hmac::Key,
}

impl SigningKey {
    pub fn new(id: &str, key: &[u8]) -> Self {
        Self {
            id: id.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// The id receivers know this key by.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Writes the `metron` tag's value of the envelope `parsed` read from `env` into `value`:
/// `sequence`, and when `key` is given, the MAC of its canonical form (form 2, built in `buf`)
/// with `source_id`, `tags` (sorted, one per key) and a counter's changed `total` as it leaves.
#[allow(clippy::too_many_arguments)]
pub fn write_tag(
    value: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    key: Option<&SigningKey>,
    sequence: Option<&Sequence>,
    parsed: &Parsed,
    env: &[u8],
    source_id: &[u8],
    tags: &[Tag<'_>],
    total: Option<u64>,
) {
    match key {
        Some(k) => {
            buf.clear();
            canonical_into(buf, Form::V2(sequence), parsed, env, source_id, tags, total);
            let mac = hmac::sign(&k.key, buf);
            tag::write_value(
                value,
                k.id.as_bytes(),
                sequence,
                Some(&mac.as_ref()[..MAC_BYTES]),
            );
        }
        None => tag::write_value(value, b"", sequence, None),
    }
}

/// Why an envelope's signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "envelope carries no signature (its metron tag has no key id, or it has neither a metron \
         nor a metron_sig tag)"
    )]
    Missing,
    #[error("the metron tag does not read: {0}")]
    Malformed(#[from] tag::TagError),
    #[error("metron_sig is not <key_id>:<64 hex digits>")]
    MalformedV1,
    #[error("signed with key id {0:?}, which is not among the keys given")]
    UnknownKeyId(String),
    #[error("signature does not match the envelope")]
    Mismatch,
}

/// Checks an envelope's signature against `key` (known as `key_id`), in constant time: the
/// `metron` tag (form 2), or else an older agent's `metron_sig` (form 1).
///
/// # Errors
/// A [`VerifyError`] saying what is wrong.
pub fn verify(env: &Envelope, key_id: &str, key: &[u8]) -> Result<(), VerifyError> {
    KeyRing::default().with(key_id, key).verify(env).map(drop)
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

    fn key(&self, id: &str) -> Result<&hmac::Key, VerifyError> {
        self.keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, key)| key)
            .ok_or_else(|| VerifyError::UnknownKeyId(id.to_owned()))
    }

    /// Checks `env`'s signature with the key its id names, in constant time; returns that id.
    /// Reads the `metron` tag (form 2) when there is one, else `metron_sig` (form 1).
    ///
    /// # Errors
    /// A [`VerifyError`] saying what is wrong.
    pub fn verify<'e>(&self, env: &'e Envelope) -> Result<&'e str, VerifyError> {
        if let Some(value) = env.tags.get(TAG) {
            let tag = MetronTag::parse(value)?;
            let (_, mac) = tag.signature.ok_or(VerifyError::Missing)?;
            // The id as a slice of the envelope's own tag, for the caller.
            let id = &value[1..value.find('.').expect("parsed")];
            let expected = hmac::sign(self.key(id)?, &canonical(env, tag.sequence.as_ref()));
            return if equal(&expected.as_ref()[..MAC_BYTES], &mac) {
                Ok(id)
            } else {
                Err(VerifyError::Mismatch)
            };
        }
        let sig = env.tags.get(SIG_TAG_V1).ok_or(VerifyError::Missing)?;
        let (id, hex) = sig.rsplit_once(':').ok_or(VerifyError::MalformedV1)?;
        let mac = decode_hex(hex)
            .filter(|m| m.len() == 32)
            .ok_or(VerifyError::MalformedV1)?;
        hmac::verify(self.key(id)?, &canonical_v1(env), &mac).map_err(|_| VerifyError::Mismatch)?;
        Ok(id)
    }
}

/// Whether `a == b`, in time that depends only on their lengths.
fn equal(a: &[u8], b: &[u8]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    a.len() == b.len() && std::hint::black_box(diff) == 0
}

/// Form 2's canonical byte string of a decoded envelope: everything but the `metron` tag, and
/// `sequence` (what the tag says of it).
pub fn canonical(env: &Envelope, sequence: Option<&Sequence>) -> Vec<u8> {
    canonical_of(env, Form::V2(sequence))
}

/// Form 1's canonical byte string of a decoded envelope: everything but the `metron_sig` tag.
pub fn canonical_v1(env: &Envelope) -> Vec<u8> {
    canonical_of(env, Form::V1)
}

fn canonical_of(env: &Envelope, form: Form<'_>) -> Vec<u8> {
    let bytes = env.encode_to_vec();
    let mut parsed = Parsed::default();
    parsed.parse(&bytes).expect("prost's own encoding reads");
    parsed.sort_maps(&bytes);
    let mut out = Vec::with_capacity(256);
    TagResolver::default().with_own(&parsed, &bytes, |tags| {
        canonical_into(
            &mut out,
            form,
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

/// The canonical form (`form`) of the envelope `parsed` read from `env` (after
/// [`Parsed::sort_maps`]), with `source_id` and `tags` (sorted, one per key) as it will leave,
/// and a counter's `total` when it was changed.
fn canonical_into(
    out: &mut Vec<u8>,
    form: Form<'_>,
    parsed: &Parsed,
    env: &[u8],
    source_id: &[u8],
    tags: &[Tag<'_>],
    total: Option<u64>,
) {
    let unsigned_tag = match form {
        Form::V1 => {
            put_bytes(out, DOMAIN_V1);
            SIG_TAG_V1.as_bytes()
        }
        Form::V2(sequence) => {
            put_bytes(out, DOMAIN);
            match sequence {
                None => out.push(0),
                Some(s) => {
                    out.push(1);
                    out.extend_from_slice(&s.stream);
                    out.extend_from_slice(&s.seq.to_be_bytes());
                }
            }
            TAG.as_bytes()
        }
    };
    out.extend_from_slice(&parsed.timestamp.to_be_bytes());
    put_bytes(out, source_id);
    put_bytes(out, parsed.instance_id.slice(env));

    let signed = |t: &&Tag<'_>| t.0 != unsigned_tag;
    let signed_tags = tags.iter().filter(signed).count();
    out.extend_from_slice(&(signed_tags as u32).to_be_bytes());
    for (k, v, _) in tags.iter().filter(signed) {
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

/// Lowercase hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
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
    use crate::envelope::writer::Writer as Signer;
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

    fn seq(n: u64) -> Sequence {
        Sequence {
            stream: *b"\x01stream!",
            seq: n,
        }
    }

    /// An older agent's `metron_sig` (form 1), for the verifier's tests.
    pub fn sign_v1(env: &mut Envelope, key_id: &str, key: &[u8]) {
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &canonical_v1(env));
        env.tags.insert(
            SIG_TAG_V1.into(),
            format!("{key_id}:{}", encode_hex(mac.as_ref())),
        );
    }

    #[test]
    fn sign_then_verify() {
        let mut s = Signer::new("k1", b"secret");
        let mut e = env();
        s.stamp(&mut e, Some(seq(42)));
        let tag = MetronTag::parse(&e.tags[TAG]).unwrap();
        assert_eq!(tag.sequence, Some(seq(42)));
        assert_eq!(tag.signature.unwrap().0, "k1");
        assert!(e.tags[TAG].starts_with("2k1."));
        assert_eq!(verify(&e, "k1", b"secret"), Ok(()));
        assert_eq!(verify(&e, "k1", b"other"), Err(VerifyError::Mismatch));
        assert_eq!(
            verify(&e, "k2", b"secret"),
            Err(VerifyError::UnknownKeyId("k1".into()))
        );
        assert_eq!(verify(&env(), "k1", b"secret"), Err(VerifyError::Missing));

        // The sequence is signed: another number under the same MAC does not verify.
        let mut moved = e.clone();
        let mut forged = Vec::new();
        let (id, mac) = tag_parts(&e);
        tag::write_value(&mut forged, id.as_bytes(), Some(&seq(43)), Some(&mac));
        moved
            .tags
            .insert(TAG.into(), String::from_utf8(forged).unwrap());
        assert_eq!(verify(&moved, "k1", b"secret"), Err(VerifyError::Mismatch));
    }

    fn tag_parts(e: &Envelope) -> (String, [u8; MAC_BYTES]) {
        MetronTag::parse(&e.tags[TAG]).unwrap().signature.unwrap()
    }

    #[test]
    fn signing_and_sequencing_each_turn_off_on_their_own() {
        let mut e = env();
        Signer::unsigned().stamp(&mut e, Some(seq(7)));
        let tag = MetronTag::parse(&e.tags[TAG]).unwrap();
        assert_eq!((tag.sequence, tag.signature), (Some(seq(7)), None));
        assert_eq!(verify(&e, "k1", b"secret"), Err(VerifyError::Missing));

        let mut e = env();
        Signer::new("k1", b"secret")
            .with_sequencing(false)
            .stamp(&mut e, Some(seq(7)));
        let tag = MetronTag::parse(&e.tags[TAG]).unwrap();
        assert_eq!(tag.sequence, None);
        assert_eq!(verify(&e, "k1", b"secret"), Ok(()));

        let mut e = env();
        Signer::unsigned()
            .with_sequencing(false)
            .stamp(&mut e, Some(seq(7)));
        assert_eq!(e, env(), "nothing added");
    }

    #[test]
    fn an_older_agents_metron_sig_still_verifies() {
        let mut e = env();
        sign_v1(&mut e, "old-key-id", b"secret");
        assert_eq!(verify(&e, "old-key-id", b"secret"), Ok(()));
        e.timestamp += 1;
        assert_eq!(
            verify(&e, "old-key-id", b"secret"),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn canonical_form_starts_as_documented() {
        let c = canonical(&env(), None);
        assert_eq!(&c[..4], &13u32.to_be_bytes());
        assert_eq!(&c[4..17], DOMAIN);
        assert_eq!(c[17], 0, "no sequence");
        assert_eq!(&c[18..26], &1_700_000_000_000_000_000i64.to_be_bytes());
        let c = canonical(&env(), Some(&seq(258)));
        assert_eq!(&c[17..34], b"\x01\x01stream!\0\0\0\0\0\0\x01\x02");
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
        s.stamp(&mut e, None);
        // What a Doppler decodes after prost re-encoded the envelope still verifies.
        let decoded = Envelope::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(verify(&decoded, "k", b"key"), Ok(()));
        assert_eq!(canonical(&gauge(-0.0), None), canonical(&gauge(0.0), None));
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
        fn signatures_survive_the_wire(mut e in any_envelope(), n in any::<u64>()) {
            use prost::Message as _;
            Signer::new("k", b"key").stamp(&mut e, Some(seq(n)));
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
            s.stamp(&mut e, Some(seq(bump)));
            prop_assert_eq!(verify(&e, "k", b"key"), Ok(()));
            let sig = e.tags[TAG].clone();
            s.stamp(&mut e, Some(seq(bump)));
            prop_assert_eq!(&e.tags[TAG], &sig);

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
