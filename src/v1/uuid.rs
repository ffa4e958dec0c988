//! v1 `UUID` ↔ canonical text, byte for byte as go-loggregator's `uuidToString` / `parseUUID`.

use std::fmt::Write as _;

use crate::envelope::signing::decode_hex;
use crate::proto_v1::Uuid;

/// The canonical 8-4-4-4-12 lowercase hex form. The 16 bytes are `low` then `high`, each
/// little-endian (dropsonde's packing), so `{ low: 0x7243cc580bc17af4, high: 0x79d4c3b2020e67a5 }`
/// is `f47ac10b-58cc-4372-a567-0e02b2c3d479`. An unset half counts as zero, as upstream's getters do.
pub fn uuid_to_string(uuid: &Uuid) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&uuid.low().to_le_bytes());
    bytes[8..].copy_from_slice(&uuid.high().to_le_bytes());
    let mut s = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The inverse of [`uuid_to_string`], or `None` unless `s` is 36 bytes whose 32 non-separator
/// bytes are hex (either case). Like upstream, the four separator positions are skipped, not
/// checked: `f47ac10bX58cc…` parses too.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let digits = [&b[..8], &b[9..13], &b[14..18], &b[19..23], &b[24..]].concat();
    // Non-ASCII bytes are simply not hex digits, so slicing bytes (not chars) is safe here.
    let bytes = decode_hex(std::str::from_utf8(&digits).ok()?)?;
    let (low, high) = bytes.split_at(8);
    Some(Uuid {
        low: Some(u64::from_le_bytes(low.try_into().ok()?)),
        high: Some(u64::from_le_bytes(high.try_into().ok()?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dropsonde_documented_example() {
        let u = Uuid {
            low: Some(0x7243cc580bc17af4),
            high: Some(0x79d4c3b2020e67a5),
        };
        assert_eq!(uuid_to_string(&u), "f47ac10b-58cc-4372-a567-0e02b2c3d479");
        assert_eq!(parse_uuid("F47AC10B-58CC-4372-A567-0E02B2C3D479"), Some(u));
    }

    #[test]
    fn unset_halves_are_zero_and_bad_text_is_none() {
        assert_eq!(
            uuid_to_string(&Uuid::default()),
            "00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(parse_uuid(""), None);
        assert_eq!(parse_uuid("f47ac10b-58cc-4372-a567-0e02b2c3d47"), None);
        assert_eq!(parse_uuid("g47ac10b-58cc-4372-a567-0e02b2c3d479"), None);
        // 36 bytes, but a multi-byte character straddles a separator position.
        assert_eq!(parse_uuid("f47ac10bé8cc-4372-a567-0e02b2c3d479"), None);
        // Upstream does not look at the separators.
        assert!(parse_uuid("f47ac10bX58ccX4372Xa567X0e02b2c3d479").is_some());
    }

    proptest! {
        #[test]
        fn text_round_trips(low in any::<u64>(), high in any::<u64>()) {
            let u = Uuid { low: Some(low), high: Some(high) };
            let s = uuid_to_string(&u);
            prop_assert_eq!(s.len(), 36);
            prop_assert_eq!(parse_uuid(&s), Some(u));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_uuid(&s);
        }
    }
}
