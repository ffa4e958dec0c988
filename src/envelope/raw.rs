//! Reading protobuf wire bytes without decoding them: enough to count the envelopes of an
//! `EnvelopeBatch` (so the edge can shed a batch before spending work on it) and to read a few
//! fields of an encoded envelope (the benchmark's sink).

/// Why a byte string is not a well-formed protobuf message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated varint")]
    Varint,
    #[error("field length runs past the end of the message")]
    Length,
    #[error("unsupported wire type {0}")]
    WireType(u8),
    #[error("field number 0")]
    FieldZero,
    #[error("field key beyond 32 bits")]
    Key,
    #[error("field {0} has the wrong wire type")]
    Mismatch(u32),
}

/// Reads a base-128 varint at `*pos`, advancing it.
#[inline]
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    // Field keys and short lengths fit one byte.
    match buf.get(*pos) {
        Some(&b) if b < 0x80 => {
            *pos += 1;
            Ok(u64::from(b))
        }
        _ => read_long_varint(buf, pos),
    }
}

fn read_long_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(WireError::Varint)?;
        *pos += 1;
        // The tenth byte holds bit 63 only; more would overflow, which prost refuses.
        if shift == 63 && b > 1 {
            return Err(WireError::Varint);
        }
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err(WireError::Varint)
}

/// The `len` bytes at `*pos`, advancing it; `None` when they run past the end of `buf`.
#[inline(always)]
pub(crate) fn take<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = pos.checked_add(len)?;
    let b = buf.get(*pos..end)?;
    *pos = end;
    Some(b)
}

/// The field `number` of wire type varint, fixed64 or length-delimited (0, 1 or 2; another is an
/// error) whose payload is at `*pos`, advancing it. Always inlined: the envelope reader calls it
/// for every field, and as a call it took reading from 100 to 155 ns per envelope.
#[inline(always)]
pub(crate) fn read_payload<'a>(
    buf: &'a [u8],
    pos: &mut usize,
    number: u32,
    wire_type: u8,
) -> Result<Field<'a>, WireError> {
    match wire_type {
        0 => Ok(Field::Varint(number, read_varint(buf, pos)?)),
        1 => {
            let b = take(buf, pos, 8).ok_or(WireError::Length)?;
            Ok(Field::Fixed64(
                number,
                u64::from_le_bytes(b.try_into().expect("8 bytes")),
            ))
        }
        2 => {
            let len = read_varint(buf, pos)?;
            let len = usize::try_from(len).map_err(|_| WireError::Length)?;
            Ok(Field::Bytes(
                number,
                take(buf, pos, len).ok_or(WireError::Length)?,
            ))
        }
        t => Err(WireError::WireType(t)),
    }
}

/// Reads a field key at `*pos`: (field number, wire type). Keys beyond 32 bits and field number 0
/// are errors, as in prost.
fn read_key(buf: &[u8], pos: &mut usize) -> Result<(u32, u8), WireError> {
    let key = u32::try_from(read_varint(buf, pos)?).map_err(|_| WireError::Key)?;
    if key >> 3 == 0 {
        return Err(WireError::FieldZero);
    }
    Ok((key >> 3, (key & 7) as u8))
}

/// One field of a message: its number and where its payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, &'a [u8]),
    /// A (proto2) group: its contents are checked and skipped, as decoders skip unknown ones.
    Group(u32),
}

/// Iterates over the top-level fields of one encoded message. Stops (yielding the error) at the
/// first malformed field.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

/// The fields of `message`, in wire order.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields {
        buf: message,
        pos: 0,
        failed: false,
    }
}

impl<'a> Fields<'a> {
    fn next_field(&mut self) -> Result<Field<'a>, WireError> {
        let (number, wire_type) = read_key(self.buf, &mut self.pos)?;
        match wire_type {
            0..=2 => read_payload(self.buf, &mut self.pos, number, wire_type),
            5 => {
                let b = self.take(4)?;
                Ok(Field::Fixed32(
                    number,
                    u32::from_le_bytes(b.try_into().expect("4 bytes")),
                ))
            }
            3 => {
                self.skip_group(number)?;
                Ok(Field::Group(number))
            }
            t => Err(WireError::WireType(t)),
        }
    }

    /// Skips to the end of the group `number` just opened (nested groups up to prost's depth).
    fn skip_group(&mut self, number: u32) -> Result<(), WireError> {
        let mut open = vec![number];
        while let Some(&current) = open.last() {
            let (n, wire_type) = read_key(self.buf, &mut self.pos)?;
            // prost: every field skipped inside the k-th nested group costs one more level of its
            // 100-level budget (an end-group tag costs none).
            if wire_type != 4 && open.len() >= 100 {
                return Err(WireError::WireType(3));
            }
            match wire_type {
                0 => drop(read_varint(self.buf, &mut self.pos)?),
                1 => self.take(8).map(|_| ())?,
                2 => {
                    let len = read_varint(self.buf, &mut self.pos)?;
                    self.take(usize::try_from(len).map_err(|_| WireError::Length)?)?;
                }
                3 => open.push(n),
                4 if n == current => drop(open.pop()),
                5 => self.take(4).map(|_| ())?,
                t => return Err(WireError::WireType(t)),
            }
        }
        Ok(())
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        take(self.buf, &mut self.pos, len).ok_or(WireError::Length)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let f = self.next_field();
        self.failed = f.is_err();
        Some(f)
    }
}

/// `EnvelopeBatch.batch` is field 1.
pub const BATCH_FIELD: u32 = 1;

/// Counts the envelopes in an encoded `EnvelopeBatch` without decoding them. A batch whose
/// framing is malformed is an error, as prost would make it; the envelopes themselves are not
/// looked into.
///
/// # Errors
/// The first [`WireError`] in the batch's framing.
pub fn count_batch(body: &[u8]) -> Result<usize, WireError> {
    let mut n = 0;
    for f in fields(body) {
        match f? {
            Field::Bytes(BATCH_FIELD, _) => n += 1,
            Field::Varint(BATCH_FIELD, _)
            | Field::Fixed32(BATCH_FIELD, _)
            | Field::Fixed64(BATCH_FIELD, _)
            | Field::Group(BATCH_FIELD) => return Err(WireError::Mismatch(BATCH_FIELD)),
            _ => {}
        }
    }
    Ok(n)
}

/// The envelopes (each still encoded) of an encoded `EnvelopeBatch`; a malformed framing is an
/// error, as in [`count_batch`].
pub fn batch_entries(body: &[u8]) -> impl Iterator<Item = Result<&[u8], WireError>> {
    fields(body).filter_map(|f| match f {
        Ok(Field::Bytes(BATCH_FIELD, env)) => Some(Ok(env)),
        Ok(
            Field::Varint(BATCH_FIELD, _)
            | Field::Fixed32(BATCH_FIELD, _)
            | Field::Fixed64(BATCH_FIELD, _)
            | Field::Group(BATCH_FIELD),
        ) => Some(Err(WireError::Mismatch(BATCH_FIELD))),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    })
}

/// `timestamp` (field 1) and `source_id` (field 2) of an encoded envelope; absent fields read as
/// proto3 defaults.
///
/// # Errors
/// When the envelope is malformed.
pub fn timestamp_and_source(envelope: &[u8]) -> Result<(i64, &[u8]), WireError> {
    let (mut ts, mut source) = (0i64, &[][..]);
    for f in fields(envelope) {
        match f? {
            Field::Varint(1, v) => ts = v as i64,
            Field::Bytes(2, s) => source = s,
            _ => {}
        }
    }
    Ok((ts, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{envelope::Message, Envelope, EnvelopeBatch, Log};
    use proptest::prelude::*;
    use prost::Message as _;

    fn env(ts: i64, source: &str, tags: usize) -> Envelope {
        let mut e = Envelope {
            timestamp: ts,
            source_id: source.into(),
            message: Some(Message::Log(Log {
                payload: vec![7; 40],
                r#type: 1,
            })),
            ..Default::default()
        };
        for i in 0..tags {
            e.tags.insert(format!("k{i}"), format!("v{i}"));
        }
        e
    }

    proptest! {
        #[test]
        fn reads_what_prost_wrote(
            items in prop::collection::vec((any::<i64>(), "[a-z0-9-]{0,40}", 0usize..4), 0..20)
        ) {
            let batch = EnvelopeBatch {
                batch: items.iter().map(|(ts, s, t)| env(*ts, s, *t)).collect(),
            };
            let body = batch.encode_to_vec();
            prop_assert_eq!(count_batch(&body), Ok(items.len()));
            let read: Vec<(i64, Vec<u8>)> = batch_entries(&body)
                .map(|e| {
                    let (ts, s) = timestamp_and_source(e.unwrap()).unwrap();
                    (ts, s.to_vec())
                })
                .collect();
            let want: Vec<(i64, Vec<u8>)> =
                items.iter().map(|(ts, s, _)| (*ts, s.as_bytes().to_vec())).collect();
            prop_assert_eq!(read, want);
        }

        /// Whatever the bytes, counting never panics and agrees with prost on well-formedness of
        /// the batch framing whenever prost accepts the batch.
        #[test]
        fn never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let counted = count_batch(&bytes);
            if let Ok(b) = EnvelopeBatch::decode(&bytes[..]) {
                prop_assert_eq!(counted, Ok(b.batch.len()));
            }
        }
    }

    #[test]
    fn malformed_framing_is_an_error() {
        assert_eq!(count_batch(&[0x0a, 5, 1, 2]), Err(WireError::Length));
        assert_eq!(count_batch(&[0x0a, 0x80]), Err(WireError::Varint));
        assert_eq!(
            count_batch(&[0x0b]),
            Err(WireError::Varint),
            "an unended group"
        );
        assert_eq!(count_batch(&[0x0b, 0x0c]), Err(WireError::Mismatch(1)));
        assert_eq!(
            count_batch(&[0x7b, 0x08, 0x01, 0x7c]),
            Ok(0),
            "unknown groups are skipped"
        );
        assert_eq!(
            count_batch(&[0x7b, 0x6c]),
            Err(WireError::WireType(4)),
            "a mismatched end"
        );
        assert_eq!(count_batch(&[0x08, 1]), Err(WireError::Mismatch(1)));
        assert_eq!(count_batch(&[0x10, 1]), Ok(0), "unknown fields are skipped");
        assert_eq!(count_batch(&[]), Ok(0));
    }
}
