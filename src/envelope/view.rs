//! An encoded envelope read in place: every field the agent's rules look at, as offsets into the
//! envelope's bytes, so the pipeline never decodes an envelope into owned strings and maps.
//!
//! [`Parsed::parse`] accepts the encodings real emitters produce: every known field in its
//! proto3 wire type with its one-byte key, in any order, repeated scalars and map keys resolved
//! as a decoder resolves them (the last one wins). Anything else (an unknown field, a wire type
//! that does not match, a key written in more bytes than it needs, a string that is not UTF-8, a
//! message field given twice, which decoders *merge*) is
//! [`Unusual`]: the edge then lets prost decode the envelope and re-encodes it, and prost's
//! verdict (an error, or a canonical encoding this parser reads) decides. The rules applied to the
//! bytes therefore see exactly the envelope a decoder would.

use super::raw::{read_payload, Field};

/// A byte range `start..end` within the envelope being read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    /// Where `part`, a slice of `whole`, lies in it.
    pub fn of(whole: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - whole.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(self) -> bool {
        self.end == self.start
    }

    /// The bytes this span covers in `envelope`.
    pub fn slice(self, envelope: &[u8]) -> &[u8] {
        &envelope[self.start as usize..self.end as usize]
    }
}

/// A `Value` (a deprecated tag's value) as read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef {
    None,
    Text(Span),
    Integer(i64),
    Decimal(f64),
}

/// The envelope's `message`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum MessageRef {
    #[default]
    None,
    Log {
        payload: Span,
        r#type: i32,
    },
    Counter {
        name: Span,
        delta: u64,
        total: u64,
    },
    /// Its metrics are [`Parsed::gauge`].
    Gauge,
    Timer {
        name: Span,
        start: i64,
        stop: i64,
    },
    Event {
        title: Span,
        body: Span,
    },
}

/// The envelope is well-formed protobuf only if prost says so, or uses an encoding this reader
/// leaves to prost (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unusual;

/// One read envelope. Reused from envelope to envelope, so reading allocates nothing once its
/// vectors have grown.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub timestamp: i64,
    pub source_id: Span,
    pub instance_id: Span,
    /// `tags` entries in wire order (a key may repeat: the last one wins).
    pub tags: Vec<(Span, Span)>,
    /// `deprecated_tags` entries in wire order (the last one of a key wins).
    pub deprecated: Vec<(Span, ValueRef)>,
    pub message: MessageRef,
    /// Where the whole `message` field (key, length and body) is, to replace it.
    pub message_field: Span,
    /// A gauge's `metrics` entries in wire order: (name, unit, value).
    pub gauge: Vec<(Span, Span, f64)>,
}

// Field numbers of `loggregator.v2.Envelope`.
const TIMESTAMP: u32 = 1;
const SOURCE_ID: u32 = 2;
const DEPRECATED_TAGS: u32 = 3;
const LOG: u32 = 4;
const COUNTER: u32 = 5;
const GAUGE: u32 = 6;
const TIMER: u32 = 7;
const TAGS: u32 = 9;
const INSTANCE_ID: u32 = 8;
const EVENT: u32 = 10;

/// `Counter` is field 5, length-delimited.
pub const COUNTER_KEY: u8 = (COUNTER as u8) << 3 | 2;
/// `source_id` is field 2, length-delimited.
pub const SOURCE_ID_KEY: u8 = (SOURCE_ID as u8) << 3 | 2;
/// `tags` is field 9, length-delimited.
pub const TAGS_KEY: u8 = (TAGS as u8) << 3 | 2;

/// A string field, checked to be UTF-8 as prost checks it.
fn text(whole: &[u8], b: &[u8]) -> Result<Span, Unusual> {
    // Tags and ids are nearly always ASCII, which this checks a word at a time, inline.
    if !b.is_ascii() {
        std::str::from_utf8(b).map_err(|_| Unusual)?;
    }
    Ok(Span::of(whole, b))
}

impl Parsed {
    /// Reads `envelope` (one envelope's bytes, without framing).
    ///
    /// # Errors
    /// [`Unusual`] when the envelope must go through prost (see the module documentation).
    pub fn parse(&mut self, envelope: &[u8]) -> Result<(), Unusual> {
        self.timestamp = 0;
        self.source_id = Span::default();
        self.instance_id = Span::default();
        self.tags.clear();
        self.deprecated.clear();
        self.gauge.clear();
        self.message = MessageRef::None;
        self.message_field = Span::default();
        let mut pos = 0;
        let mut fields = fields_of(envelope);
        while let Some(f) = fields.next() {
            let field = f?;
            let field_start = pos;
            pos = fields.pos;
            match field {
                Field::Varint(TIMESTAMP, v) => self.timestamp = v as i64,
                Field::Bytes(SOURCE_ID, b) => self.source_id = text(envelope, b)?,
                Field::Bytes(INSTANCE_ID, b) => self.instance_id = text(envelope, b)?,
                Field::Bytes(TAGS, b) => {
                    let (mut k, mut v) = (Span::of(envelope, &b[..0]), Span::of(envelope, &b[..0]));
                    for f in fields_of(b) {
                        match f? {
                            Field::Bytes(1, s) => k = text(envelope, s)?,
                            Field::Bytes(2, s) => v = text(envelope, s)?,
                            _ => return Err(Unusual),
                        }
                    }
                    self.tags.push((k, v));
                }
                Field::Bytes(DEPRECATED_TAGS, b) => {
                    let (mut k, mut v) = (Span::of(envelope, &b[..0]), None);
                    for f in fields_of(b) {
                        match f? {
                            Field::Bytes(1, s) => k = text(envelope, s)?,
                            Field::Bytes(2, s) if v.is_none() => v = Some(value(envelope, s)?),
                            _ => return Err(Unusual),
                        }
                    }
                    self.deprecated.push((k, v.unwrap_or(ValueRef::None)));
                }
                Field::Bytes(n @ (LOG | COUNTER | GAUGE | TIMER | EVENT), b) => {
                    if self.message_field.end != 0 {
                        // Decoders merge a repeated message field; prost does that for us.
                        return Err(Unusual);
                    }
                    self.message = self.message_of(n, envelope, b)?;
                    self.message_field = Span {
                        start: field_start as u32,
                        end: pos as u32,
                    };
                }
                _ => return Err(Unusual),
            }
        }
        Ok(())
    }

    fn message_of(&mut self, n: u32, whole: &[u8], b: &[u8]) -> Result<MessageRef, Unusual> {
        let empty = Span::of(whole, &b[..0]);
        Ok(match n {
            LOG => {
                let (mut payload, mut r#type) = (empty, 0);
                for f in fields_of(b) {
                    match f? {
                        Field::Bytes(1, s) => payload = Span::of(whole, s),
                        Field::Varint(2, v) => r#type = v as i32,
                        _ => return Err(Unusual),
                    }
                }
                MessageRef::Log { payload, r#type }
            }
            COUNTER => {
                let (mut name, mut delta, mut total) = (empty, 0, 0);
                for f in fields_of(b) {
                    match f? {
                        Field::Bytes(1, s) => name = text(whole, s)?,
                        Field::Varint(2, v) => delta = v,
                        Field::Varint(3, v) => total = v,
                        _ => return Err(Unusual),
                    }
                }
                MessageRef::Counter { name, delta, total }
            }
            GAUGE => {
                for f in fields_of(b) {
                    let Field::Bytes(1, entry) = f? else {
                        return Err(Unusual);
                    };
                    let (mut name, mut metric) = (Span::of(whole, &entry[..0]), None);
                    for f in fields_of(entry) {
                        match f? {
                            Field::Bytes(1, s) => name = text(whole, s)?,
                            Field::Bytes(2, s) if metric.is_none() => {
                                let (mut unit, mut value) = (Span::of(whole, &s[..0]), 0.0);
                                for f in fields_of(s) {
                                    match f? {
                                        Field::Bytes(1, u) => unit = text(whole, u)?,
                                        Field::Fixed64(2, v) => value = f64::from_bits(v),
                                        _ => return Err(Unusual),
                                    }
                                }
                                metric = Some((unit, value));
                            }
                            _ => return Err(Unusual),
                        }
                    }
                    let (unit, value) = metric.unwrap_or((empty, 0.0));
                    self.gauge.push((name, unit, value));
                }
                MessageRef::Gauge
            }
            TIMER => {
                let (mut name, mut start, mut stop) = (empty, 0, 0);
                for f in fields_of(b) {
                    match f? {
                        Field::Bytes(1, s) => name = text(whole, s)?,
                        Field::Varint(2, v) => start = v as i64,
                        Field::Varint(3, v) => stop = v as i64,
                        _ => return Err(Unusual),
                    }
                }
                MessageRef::Timer { name, start, stop }
            }
            _ => {
                let (mut title, mut body) = (empty, empty);
                for f in fields_of(b) {
                    match f? {
                        Field::Bytes(1, s) => title = text(whole, s)?,
                        Field::Bytes(2, s) => body = text(whole, s)?,
                        _ => return Err(Unusual),
                    }
                }
                MessageRef::Event { title, body }
            }
        })
    }

    /// Sorts the deprecated tags and a gauge's metrics by key, one per key (the last one read
    /// wins, as a decoder reads them): the order of the signing form. The origin rule and the
    /// tag rules give the same results before and after.
    pub fn sort_maps(&mut self, envelope: &[u8]) {
        sort_last_wins(&mut self.deprecated, |(k, _)| k.slice(envelope));
        sort_last_wins(&mut self.gauge, |(k, _, _)| k.slice(envelope));
    }

    /// The source id after upstream's origin rule: `source_id`, or when it is empty
    /// `tags["origin"]`, else the text of `deprecated_tags["origin"]` ("" when not text). The
    /// flag says whether the rule applied.
    pub fn effective_source(&self, envelope: &[u8]) -> (Span, bool) {
        if !self.source_id.is_empty() {
            return (self.source_id, false);
        }
        let origin = |k: &Span| k.slice(envelope) == b"origin";
        if let Some((_, v)) = self.tags.iter().rev().find(|(k, _)| origin(k)) {
            return (*v, true);
        }
        if let Some((_, v)) = self.deprecated.iter().rev().find(|(k, _)| origin(k)) {
            let text = match v {
                ValueRef::Text(s) => *s,
                _ => Span::default(),
            };
            return (text, true);
        }
        (self.source_id, false)
    }
}

/// What [`Parsed`] found in each envelope of a batch, kept with the batch so the signer need not
/// read the envelopes again: the edge reads every envelope to check and price it, and the signer
/// needs the same offsets. Each envelope's entries follow the previous one's in the three
/// vectors.
#[derive(Debug, Default)]
pub struct Layouts {
    heads: Vec<Head>,
    tags: Vec<(Span, Span)>,
    deprecated: Vec<(Span, ValueRef)>,
    gauge: Vec<(Span, Span, f64)>,
}

/// One envelope's scalars in [`Layouts`], and where its entries end in each vector.
#[derive(Debug, Clone, Copy)]
struct Head {
    timestamp: i64,
    source_id: Span,
    instance_id: Span,
    message: MessageRef,
    message_field: Span,
    tags_end: u32,
    deprecated_end: u32,
    gauge_end: u32,
}

impl Layouts {
    /// Bytes the layout of the envelope `parsed` describes takes here, once
    /// [`Layouts::shrink_to_fit`] has run: part of the envelope's admission cost.
    pub fn bytes_for(parsed: &Parsed) -> usize {
        use std::mem::size_of;
        size_of::<Head>()
            + parsed.tags.len() * size_of::<(Span, Span)>()
            + parsed.deprecated.len() * size_of::<(Span, ValueRef)>()
            + parsed.gauge.len() * size_of::<(Span, Span, f64)>()
    }

    /// What kind of envelope the one at `layout` is.
    pub fn kind(&self, layout: u32) -> super::Kind {
        use super::Kind;
        match self.heads[layout as usize].message {
            MessageRef::None => Kind::None,
            MessageRef::Log { .. } => Kind::Log,
            MessageRef::Counter { .. } => Kind::Counter,
            MessageRef::Gauge => Kind::Gauge,
            MessageRef::Timer { .. } => Kind::Timer,
            MessageRef::Event { .. } => Kind::Event,
        }
    }

    /// Keeps what `parsed` read; returns its index for [`Layouts::load`].
    pub fn push(&mut self, parsed: &Parsed) -> u32 {
        self.tags.extend_from_slice(&parsed.tags);
        self.deprecated.extend_from_slice(&parsed.deprecated);
        self.gauge.extend_from_slice(&parsed.gauge);
        let end = |v: usize| u32::try_from(v).expect("a batch's entries fit 32 bits");
        self.heads.push(Head {
            timestamp: parsed.timestamp,
            source_id: parsed.source_id,
            instance_id: parsed.instance_id,
            message: parsed.message,
            message_field: parsed.message_field,
            tags_end: end(self.tags.len()),
            deprecated_end: end(self.deprecated.len()),
            gauge_end: end(self.gauge.len()),
        });
        end(self.heads.len() - 1)
    }

    /// Gives back the growth slack, so what is held is what [`Layouts::bytes_for`] priced.
    pub fn shrink_to_fit(&mut self) {
        self.heads.shrink_to_fit();
        self.tags.shrink_to_fit();
        self.deprecated.shrink_to_fit();
        self.gauge.shrink_to_fit();
    }

    /// Sets `parsed` to what [`Layouts::push`] kept as `index`, as if it had read the envelope
    /// again.
    pub fn load(&self, index: u32, parsed: &mut Parsed) {
        let i = index as usize;
        let head = &self.heads[i];
        let before = i.checked_sub(1).map(|p| &self.heads[p]);
        let start = |f: fn(&Head) -> u32| before.map_or(0, |h| f(h) as usize);
        parsed.timestamp = head.timestamp;
        parsed.source_id = head.source_id;
        parsed.instance_id = head.instance_id;
        parsed.message = head.message;
        parsed.message_field = head.message_field;
        parsed.tags.clear();
        parsed
            .tags
            .extend_from_slice(&self.tags[start(|h| h.tags_end)..head.tags_end as usize]);
        parsed.deprecated.clear();
        parsed.deprecated.extend_from_slice(
            &self.deprecated[start(|h| h.deprecated_end)..head.deprecated_end as usize],
        );
        parsed.gauge.clear();
        parsed
            .gauge
            .extend_from_slice(&self.gauge[start(|h| h.gauge_end)..head.gauge_end as usize]);
    }
}

/// The fields of a message, in wire order, as this reader takes them: one-byte keys (every
/// field it knows has one) of wire type varint, fixed64 or length-delimited. Anything else is
/// [`Unusual`], and prost decides: a field this reader does not know, a key written in more bytes
/// than it needs, a group, a malformed field.
fn fields_of(b: &[u8]) -> Cursor<'_> {
    Cursor { buf: b, pos: 0 }
}

struct Cursor<'a> {
    buf: &'a [u8],
    /// Where the next field starts.
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline(always)]
    fn field(&mut self, key: u8) -> Result<Field<'a>, Unusual> {
        // The high bit set: a key of more than one byte.
        if key & 0x80 != 0 {
            return Err(Unusual);
        }
        read_payload(self.buf, &mut self.pos, u32::from(key >> 3), key & 7).map_err(|_| Unusual)
    }
}

impl<'a> Iterator for Cursor<'a> {
    type Item = Result<Field<'a>, Unusual>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let &key = self.buf.get(self.pos)?;
        self.pos += 1;
        Some(self.field(key))
    }
}

fn value(whole: &[u8], b: &[u8]) -> Result<ValueRef, Unusual> {
    let mut v = ValueRef::None;
    for f in fields_of(b) {
        v = match f? {
            Field::Bytes(1, s) => ValueRef::Text(text(whole, s)?),
            Field::Varint(2, i) => ValueRef::Integer(i as i64),
            Field::Fixed64(3, d) => ValueRef::Decimal(f64::from_bits(d)),
            _ => return Err(Unusual),
        };
    }
    Ok(v)
}

/// Sorts `v` by `key` and keeps one element per key: the last one in `v`'s order.
pub fn sort_last_wins<'k, T>(v: &mut Vec<T>, key: impl Fn(&T) -> &'k [u8]) {
    if v.len() < 2 {
        return;
    }
    v.reverse();
    // Stable: of equal keys, the one last in the original order comes first and is kept.
    v.sort_by(|a, b| key(a).cmp(key(b)));
    v.dedup_by(|later, earlier| key(later) == key(earlier));
}

#[cfg(test)]
mod tests {
    use super::sort_last_wins;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// The same result as inserting into a map in order: sorted, one per key, the last wins.
        #[test]
        fn sort_last_wins_is_a_map_insert(pairs in prop::collection::vec((0u8..6, any::<u16>()), 0..24)) {
            let keys: Vec<[u8; 1]> = pairs.iter().map(|(k, _)| [*k]).collect();
            let mut v: Vec<(&[u8], u16)> =
                keys.iter().zip(&pairs).map(|(k, (_, val))| (&k[..], *val)).collect();
            sort_last_wins(&mut v, |t| t.0);
            let expected: BTreeMap<&[u8], u16> =
                keys.iter().zip(&pairs).map(|(k, (_, val))| (&k[..], *val)).collect();
            prop_assert_eq!(v, expected.into_iter().collect::<Vec<_>>());
        }
    }
}
