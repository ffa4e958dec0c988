//! The last stage: each envelope written out as it leaves the agent, with everything the
//! pipeline decided for it. The signer actor runs it.
//!
//! An envelope leaves as it came, followed by the fields the agent adds — its source id from the
//! origin, the default and deprecated tags ([`super::tagging::TagResolver`] says which), its
//! counter total, and the `metron` tag ([`super::signing::write_tag`]: its sequence and
//! signature). Nothing is decoded and re-encoded: the output is the input's bytes plus appended
//! fields ([`super::encoded::EncodedBatch`]).

use prost::Message as _;

use super::encoded::EncodedBatch;
use super::signing::{self, SigningKey};
use super::tag::{self, Sequence, TAG};
use super::tagging::{Tag, TagFrom, TagResolver};
use super::view::{Layouts, MessageRef, Parsed, COUNTER_KEY, SOURCE_ID_KEY, TAGS_KEY};
use super::Item;
use crate::proto::Envelope;

/// Writes envelopes out as they leave the agent (see [`Writer::finish`]): numbered when
/// sequencing is on, signed when signing is on. Reuses its buffers, so writing allocates nothing
/// once they have grown.
pub struct Writer {
    /// `None` with `signing.enabled: false`.
    key: Option<SigningKey>,
    /// `sequencing.enabled`: the envelopes carry their stream and number.
    sequenced: bool,
    /// The canonical form being signed.
    buf: Vec<u8>,
    /// The `metron` tag's value being written.
    value: Vec<u8>,
    /// The fields appended to the envelope being written.
    extra: Vec<u8>,
    /// A rewritten counter field: its body, then its key and length.
    counter: Vec<u8>,
    parsed: Parsed,
    resolver: TagResolver,
}

impl Writer {
    /// Signs with `key`, known to receivers as `key_id`, and numbers envelopes (see
    /// [`Writer::with_sequencing`]).
    pub fn new(key_id: &str, key: &[u8]) -> Self {
        Self::with_key(Some(SigningKey::new(key_id, key)))
    }

    /// Does not sign (`signing.enabled: false`); numbers envelopes unless told otherwise.
    pub fn unsigned() -> Self {
        Self::with_key(None)
    }

    fn with_key(key: Option<SigningKey>) -> Self {
        Self {
            key,
            sequenced: true,
            buf: Vec::with_capacity(1024),
            value: Vec::with_capacity(64),
            extra: Vec::with_capacity(512),
            counter: Vec::with_capacity(64),
            parsed: Parsed::default(),
            resolver: TagResolver::default(),
        }
    }

    /// Starts over after a panic: fresh buffers, the same key and settings.
    pub fn reset(&mut self) {
        let key = self.key.take();
        *self = Self::with_key(key).with_sequencing(self.sequenced);
    }

    /// Whether envelopes carry their sequence (`sequencing.enabled`); on by default.
    #[must_use]
    pub fn with_sequencing(mut self, on: bool) -> Self {
        self.sequenced = on;
        self
    }

    /// The key id signing now, `None` when signing is off.
    pub fn key_id(&self) -> Option<&str> {
        self.key.as_ref().map(SigningKey::id)
    }

    /// Sets (or replaces) the `metron` tag of a decoded envelope: `sequence` when sequencing is
    /// on, the signature when signing is on; nothing when both are off. Tools and tests; the
    /// pipeline writes encoded envelopes with [`Writer::finish`].
    pub fn stamp(&mut self, env: &mut Envelope, sequence: Option<Sequence>) {
        let sequence = sequence.filter(|_| self.sequenced);
        if self.key.is_none() && sequence.is_none() {
            return;
        }
        let bytes = env.encode_to_vec();
        self.parsed
            .parse(&bytes)
            .expect("prost's own encoding reads");
        self.parsed.sort_maps(&bytes);
        let (parsed, buf, value) = (&self.parsed, &mut self.buf, &mut self.value);
        let key = self.key.as_ref();
        self.resolver.with_own(parsed, &bytes, |tags| {
            let source = parsed.source_id.slice(&bytes);
            signing::write_tag(
                value,
                buf,
                key,
                sequence.as_ref(),
                parsed,
                &bytes,
                source,
                tags,
                None,
            );
        });
        env.tags.insert(
            TAG.to_owned(),
            String::from_utf8(self.value.clone()).expect("base64url is ASCII"),
        );
    }

    /// Writes the envelope `env` (admitted as `item`, read by the edge into `layouts`) to `out`
    /// as it leaves the agent: as it came, followed by the fields the ingress rules, the
    /// sequencer and the signature add — its source id from the origin, the missing `defaults`,
    /// its deprecated tags as tags, its counter total, and the `metron` tag (its `stream` and
    /// number, and its signature; absent when sequencing and signing are both off). A decoder
    /// reads the last of a repeated field or map key, so appended fields win. A counter whose
    /// total changed has its `counter` field rewritten instead, since decoders *merge* a
    /// repeated message field, and not all the same way.
    pub fn finish(
        &mut self,
        env: &[u8],
        item: &Item,
        layouts: &Layouts,
        defaults: &[(String, String)],
        stream: [u8; tag::STREAM_BYTES],
        out: &mut EncodedBatch,
    ) {
        layouts.load(item.layout, &mut self.parsed);
        self.parsed.sort_maps(env);
        let parsed = &self.parsed;
        let (source, mapped) = parsed.effective_source(env);
        let sequence = self.sequenced.then_some(Sequence {
            stream,
            seq: item.seq,
        });
        let key = self.key.as_ref();
        // The agent's tag, when it writes one, replaces any the emitter sent; its value is
        // written last, once the canonical form (which leaves it out) is signed.
        let ours: &[Tag<'_>] = if key.is_some() || sequence.is_some() {
            &[(TAG.as_bytes(), b"", TagFrom::Agent)]
        } else {
            &[]
        };
        let (buf, extra, value) = (&mut self.buf, &mut self.extra, &mut self.value);
        extra.clear();
        self.resolver
            .with_resolved(parsed, env, defaults, ours, |tags| {
                if mapped && !source.is_empty() {
                    put_field(extra, SOURCE_ID_KEY, source.slice(env));
                }
                for (k, v, from) in tags {
                    if !matches!(from, TagFrom::Wire | TagFrom::Agent) {
                        put_entry(extra, k, v);
                    }
                }
                if !ours.is_empty() {
                    let (source, total) = (source.slice(env), item.total);
                    signing::write_tag(
                        value,
                        buf,
                        key,
                        sequence.as_ref(),
                        parsed,
                        env,
                        source,
                        tags,
                        total,
                    );
                    put_entry(extra, TAG.as_bytes(), value);
                }
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

    /// [`Writer::finish`] for `item` of `batch`: its bytes, layout, defaults and stream.
    pub fn finish_item(&mut self, batch: &super::Batch, item: &Item, out: &mut EncodedBatch) {
        let stream = batch
            .streams()
            .get(item.stream as usize)
            .copied()
            .unwrap_or_default();
        self.finish(
            batch.bytes_of(item.env),
            item,
            batch.layouts(),
            batch.defaults(),
            stream,
            out,
        );
    }
}

fn varint_len(v: usize) -> usize {
    prost::encoding::encoded_len_varint(v as u64)
}

/// A varint; inline for the one-byte case, which every tag entry's lengths nearly always are
/// (prost's encoder is a loop behind a call; decision 20 has what inlining saved).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_written_as_prost_writes_them() {
        for v in [0, 1, 0x7f, 0x80, 300, 1 << 35, u64::MAX] {
            let (mut ours, mut prost) = (vec![9], vec![9]);
            put_varint(&mut ours, v);
            prost::encoding::encode_varint(v, &mut prost);
            assert_eq!(ours, prost, "{v}");
        }
    }
}
