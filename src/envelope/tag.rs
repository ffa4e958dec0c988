//! The one tag the agent adds to every envelope, `metron`: its sequence number and its signature
//! in one short value (form 2; `docs/signing.md`). Writing it, and reading it back for
//! receivers (gap detection, [`super::signing::verify`]).
//!
//! ```text
//! metron = "2" key_id "." base64url(stream ‖ uvarint(seq) ‖ mac)      no padding
//!          └ form      └ absent when signing is off
//!                            └ 8 random bytes per sequence stream, then the number (both absent
//!                              when sequencing is off); mac: HMAC-SHA256 truncated to 16 bytes
//! ```
//!
//! A parser needs no flag: the MAC is the last 16 bytes exactly when a key id is present, and
//! whatever precedes it is either empty or the stream and the number.

/// The tag's key.
pub const TAG: &str = "metron";
/// The first character of every form-2 value.
pub const FORM: u8 = b'2';
/// Bytes of the truncated HMAC-SHA256 (RFC 2104 §5: at least half the hash, here 128 bits).
pub const MAC_BYTES: usize = 16;
/// Bytes of a stream id: 64 random bits.
pub const STREAM_BYTES: usize = 8;
/// The longest `signing.key_id` the form allows, so that the whole tag stays within 56 bytes on
/// the wire for sequence numbers below 2^21 (issue 19's budget; `wire_bytes`).
pub const MAX_KEY_ID: usize = 6;

/// A sequence stream: an id drawn at random when the stream begins, and the envelope's number in
/// it (1, 2, 3, … per source id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    pub stream: [u8; STREAM_BYTES],
    pub seq: u64,
}

/// What a `metron` tag says, as read by [`MetronTag::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetronTag {
    /// Present when the agent numbered the envelope (`sequencing.enabled`).
    pub sequence: Option<Sequence>,
    /// `(key id, truncated MAC)` when the agent signed it (`signing.enabled`).
    pub signature: Option<(String, [u8; MAC_BYTES])>,
}

/// Why a `metron` tag does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("the metron tag is not form 2 (it does not start with \"2\")")]
    UnknownForm,
    #[error("the metron tag has no '.' after its key id")]
    NoSeparator,
    #[error("the metron tag's payload is not unpadded base64url")]
    NotBase64,
    #[error("the metron tag's payload has the wrong length for what it holds")]
    BadLength,
}

impl MetronTag {
    /// Reads a `metron` tag's value.
    ///
    /// # Errors
    /// A [`TagError`] when it is not a well-formed form-2 value.
    pub fn parse(value: &str) -> Result<MetronTag, TagError> {
        let rest = value
            .strip_prefix(FORM as char)
            .ok_or(TagError::UnknownForm)?;
        let (key_id, payload) = rest.split_once('.').ok_or(TagError::NoSeparator)?;
        let payload = base64url_decode(payload).ok_or(TagError::NotBase64)?;
        let (sequenced, signature) = if key_id.is_empty() {
            (&payload[..], None)
        } else {
            let at = payload
                .len()
                .checked_sub(MAC_BYTES)
                .ok_or(TagError::BadLength)?;
            let mac: [u8; MAC_BYTES] = payload[at..].try_into().expect("MAC_BYTES long");
            (&payload[..at], Some((key_id.to_owned(), mac)))
        };
        let sequence = match sequenced {
            [] => None,
            _ if sequenced.len() <= STREAM_BYTES => return Err(TagError::BadLength),
            _ => {
                let (stream, number) = sequenced.split_at(STREAM_BYTES);
                let mut rest = number;
                let seq =
                    prost::encoding::decode_varint(&mut rest).map_err(|_| TagError::BadLength)?;
                // The number must use up the payload, in as few bytes as it needs: one spelling
                // per value, as for the base64url around it.
                let used = number.len() - rest.len();
                if !rest.is_empty() || used != prost::encoding::encoded_len_varint(seq) {
                    return Err(TagError::BadLength);
                }
                Some(Sequence {
                    stream: stream.try_into().expect("STREAM_BYTES long"),
                    seq,
                })
            }
        };
        if sequence.is_none() && signature.is_none() {
            return Err(TagError::BadLength);
        }
        Ok(MetronTag {
            sequence,
            signature,
        })
    }
}

/// Writes a form-2 value into `out` (cleared first): `key_id` and `mac` when signed, `sequence`
/// when numbered. `key_id` is empty exactly when `mac` is `None`.
pub fn write_value(
    out: &mut Vec<u8>,
    key_id: &[u8],
    sequence: Option<&Sequence>,
    mac: Option<&[u8]>,
) {
    debug_assert_eq!(key_id.is_empty(), mac.is_none(), "a key id goes with a MAC");
    let mut payload = [0u8; STREAM_BYTES + 10 + MAC_BYTES];
    let mut n = 0;
    if let Some(s) = sequence {
        payload[..STREAM_BYTES].copy_from_slice(&s.stream);
        n = STREAM_BYTES;
        let mut v = s.seq;
        while v >= 0x80 {
            payload[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        payload[n] = v as u8;
        n += 1;
    }
    if let Some(mac) = mac {
        payload[n..n + MAC_BYTES].copy_from_slice(&mac[..MAC_BYTES]);
        n += MAC_BYTES;
    }
    out.clear();
    out.push(FORM);
    out.extend_from_slice(key_id);
    out.push(b'.');
    base64url_encode(&payload[..n], out);
}

/// The longest value [`write_value`] can write with a key id of `key_id_len` bytes.
pub fn max_value_len(key_id_len: usize) -> usize {
    2 + key_id_len + base64url_len(STREAM_BYTES + 10 + MAC_BYTES)
}

/// Bytes the tag takes on the wire as one `tags` map entry: the entry's key and length, the map
/// key's and value's keys and lengths, `metron` and the value (all lengths one byte: the value is
/// far below 128 bytes).
pub fn wire_bytes(value_len: usize) -> usize {
    2 + 2 + TAG.len() + 2 + value_len
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Characters of unpadded base64url for `n` bytes.
pub fn base64url_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// Unpadded base64url (RFC 4648 §5) of `bytes`, appended to `out`.
pub fn base64url_encode(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(BASE64URL[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
}

/// Decodes unpadded base64url; `None` for any other character, padding, a length no encoding
/// has, or bits set beyond the last byte (so every byte string has exactly one spelling).
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let sextet = |c: u8| BASE64URL.iter().position(|&a| a == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c)? << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        if n & (0x00ff_ffff >> (8 * bytes)) != 0 {
            return None;
        }
        out.extend((0..bytes).map(|i| (n >> (16 - 8 * i)) as u8));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn base64url_matches_rfc_4648_without_padding() {
        let enc = |b: &[u8]| {
            let mut v = Vec::new();
            base64url_encode(b, &mut v);
            String::from_utf8(v).unwrap()
        };
        for (plain, coded) in [
            (&b""[..], ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff], "-_8"),
        ] {
            assert_eq!(enc(plain), coded);
            assert_eq!(base64url_decode(coded).as_deref(), Some(plain));
            assert_eq!(base64url_len(plain.len()), coded.len());
        }
        for bad in ["Zg==", "Z", "Zh", "Zm9v+", "Zm/v"] {
            assert_eq!(base64url_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        for (bad, why) in [
            ("3k1.AAAA", TagError::UnknownForm),
            ("2k1AAAA", TagError::NoSeparator),
            ("2.", TagError::BadLength),
            ("2k1.AAAA", TagError::BadLength),
            (
                "2k1.nyxOGgt9TD4qM5h3VSNdALxUU6DBrMTQrR",
                TagError::NotBase64,
            ),
            (
                "2k1.nyxOGgt9TD4qM5h3VSNdALxUU6DBrMTQrQ==",
                TagError::NotBase64,
            ),
            // The stream, then 42 written in two bytes (0xaa 0x00): an overlong varint.
            ("2.nyxOGgt9TD6qAA", TagError::BadLength),
        ] {
            assert_eq!(MetronTag::parse(bad), Err(why), "{bad}");
        }
        assert!(MetronTag::parse("2k1.nyxOGgt9TD4qM5h3VSNdALxUU6DBrMTQrQ").is_ok());
    }

    #[test]
    fn the_whole_tag_stays_within_56_bytes_below_a_million() {
        let seq = Sequence {
            stream: [0xff; 8],
            seq: 999_999,
        };
        let mut v = Vec::new();
        write_value(&mut v, b"abcdef", Some(&seq), Some(&[7; 32]));
        assert_eq!(v.len(), 44);
        assert_eq!(wire_bytes(v.len()), 56);
        assert!(max_value_len(6) >= v.len());
    }

    fn any_tag() -> impl Strategy<Value = MetronTag> {
        let sequence = prop::option::of(
            (any::<[u8; 8]>(), any::<u64>()).prop_map(|(stream, seq)| Sequence { stream, seq }),
        );
        let signature = prop::option::of(("[A-Za-z0-9_-]{1,6}", any::<[u8; 16]>()));
        (sequence, signature)
            .prop_filter("something to say", |(a, b)| a.is_some() || b.is_some())
            .prop_map(|(sequence, signature)| MetronTag {
                sequence,
                signature,
            })
    }

    proptest! {
        /// Whatever the agent writes reads back as written, and within its bound.
        #[test]
        fn a_written_tag_reads_back(t in any_tag()) {
            let mut v = Vec::new();
            let (id, mac) = match &t.signature {
                Some((id, mac)) => (id.as_bytes(), Some(&mac[..])),
                None => (&b""[..], None),
            };
            write_value(&mut v, id, t.sequence.as_ref(), mac);
            prop_assert!(v.len() <= max_value_len(id.len()));
            let s = String::from_utf8(v).unwrap();
            prop_assert_eq!(MetronTag::parse(&s), Ok(t));
        }

        /// No input makes the parser panic, and what it accepts it would write the same way;
        /// base64url round-trips.
        #[test]
        fn parsing_is_total_and_exact(s in prop_oneof![
                ".{0,60}",
                "2[A-Za-z0-9_-]{0,7}\\.[A-Za-z0-9_-]{0,60}",
            ], bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(t) = MetronTag::parse(&s) {
                let mut again = Vec::new();
                let (id, mac) = match &t.signature {
                    Some((id, mac)) => (id.as_bytes(), Some(&mac[..])),
                    None => (&b""[..], None),
                };
                write_value(&mut again, id, t.sequence.as_ref(), mac);
                prop_assert_eq!(String::from_utf8(again).unwrap(), s);
            }
            let mut v = Vec::new();
            base64url_encode(&bytes, &mut v);
            prop_assert_eq!(base64url_decode(std::str::from_utf8(&v).unwrap()), Some(bytes));
        }
    }
}
