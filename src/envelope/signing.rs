//! The signing form: `metron_sig = "<key_id>:<hex HMAC-SHA256 over canonical(envelope)>"`.
//!
//! `canonical` is a byte string defined field by field (README, "Signing"), independent of
//! protobuf's encoding, so another language can rebuild it from a decoded envelope. Every field
//! is covered except the `metron_sig` tag itself.

use ring::hmac;

use crate::proto::{envelope::Message, value::Data, Envelope};

/// Tag carrying the signature.
pub const SIG_TAG: &str = "metron_sig";
/// The first item of every canonical form; bumped if the form ever changes.
pub const DOMAIN: &[u8] = b"metron-sig-v1";

/// Signs envelopes with one HMAC-SHA256 key. Reuses one buffer, so signing allocates only the
/// tag value.
pub struct Signer {
    key_id: String,
    key: hmac::Key,
    buf: Vec<u8>,
}

impl Signer {
    pub fn new(key_id: &str, key: &[u8]) -> Self {
        Self {
            key_id: key_id.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            buf: Vec::with_capacity(1024),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Adds (or replaces) the `metron_sig` tag.
    pub fn sign(&mut self, env: &mut Envelope) {
        self.buf.clear();
        canonical_into(env, &mut self.buf);
        let tag = hmac::sign(&self.key, &self.buf);
        let mut value = String::with_capacity(self.key_id.len() + 1 + 64);
        value.push_str(&self.key_id);
        value.push(':');
        push_hex(&mut value, tag.as_ref());
        env.tags.insert(SIG_TAG.to_owned(), value);
    }
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

/// The canonical byte string of an envelope (everything but the `metron_sig` tag).
pub fn canonical(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    canonical_into(env, &mut out);
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

fn canonical_into(env: &Envelope, out: &mut Vec<u8>) {
    put_bytes(out, DOMAIN);
    out.extend_from_slice(&env.timestamp.to_be_bytes());
    put_bytes(out, env.source_id.as_bytes());
    put_bytes(out, env.instance_id.as_bytes());

    // BTreeMap iterates in ascending byte order of the keys: the order the form requires.
    let signed_tags = env.tags.len() - usize::from(env.tags.contains_key(SIG_TAG));
    out.extend_from_slice(&(signed_tags as u32).to_be_bytes());
    for (k, v) in env.tags.iter().filter(|(k, _)| k.as_str() != SIG_TAG) {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }

    out.extend_from_slice(&(env.deprecated_tags.len() as u32).to_be_bytes());
    for (k, v) in &env.deprecated_tags {
        put_bytes(out, k.as_bytes());
        match &v.data {
            None => out.push(0),
            Some(Data::Text(s)) => {
                out.push(1);
                put_bytes(out, s.as_bytes());
            }
            Some(Data::Integer(i)) => {
                out.push(2);
                out.extend_from_slice(&i.to_be_bytes());
            }
            Some(Data::Decimal(d)) => {
                out.push(3);
                put_f64(out, *d);
            }
        }
    }

    match &env.message {
        None => out.push(0),
        Some(Message::Log(l)) => {
            out.push(1);
            put_bytes(out, &l.payload);
            out.extend_from_slice(&(l.r#type as u32).to_be_bytes());
        }
        Some(Message::Counter(c)) => {
            out.push(2);
            put_bytes(out, c.name.as_bytes());
            out.extend_from_slice(&c.delta.to_be_bytes());
            out.extend_from_slice(&c.total.to_be_bytes());
        }
        Some(Message::Gauge(g)) => {
            out.push(3);
            out.extend_from_slice(&(g.metrics.len() as u32).to_be_bytes());
            for (k, v) in &g.metrics {
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.unit.as_bytes());
                put_f64(out, v.value);
            }
        }
        Some(Message::Timer(t)) => {
            out.push(4);
            put_bytes(out, t.name.as_bytes());
            out.extend_from_slice(&t.start.to_be_bytes());
            out.extend_from_slice(&t.stop.to_be_bytes());
        }
        Some(Message::Event(e)) => {
            out.push(5);
            put_bytes(out, e.title.as_bytes());
            put_bytes(out, e.body.as_bytes());
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

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
mod tests {
    use super::*;
    use crate::proto::{Counter, Log};
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

    fn any_envelope() -> impl Strategy<Value = Envelope> {
        use crate::proto::{Event, Gauge, GaugeValue, Timer, Value};
        let message = prop_oneof![
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
        ];
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
            .prop_map(
                |(timestamp, source_id, instance_id, tags, dep, message)| Envelope {
                    timestamp,
                    source_id,
                    instance_id,
                    tags,
                    deprecated_tags: dep
                        .into_iter()
                        .map(|(k, data)| (k, Value { data }))
                        .collect(),
                    message,
                },
            )
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
