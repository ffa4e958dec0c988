//! Fuzzing the UDP decoder with proptest: arbitrary bytes, protobuf-shaped random fields, and
//! valid datagrams with bytes flipped, cut, inserted or deleted. `decode` never panics, whatever
//! it accepts converts to v2 and back to v1 without panicking, and re-encodes to itself.
//! `to_v1` is fuzzed over arbitrary v2 envelopes too.
//!
//! Cases per property: 1,000 by default; a long run:
//! `PROPTEST_CASES=200000 nice -n 19 cargo test --release --test v1_fuzz`.

#[path = "common/v1_gen.rs"]
mod v1_gen;

use metron::proto::envelope::Message;
use metron::proto::{self, value::Data, Counter, Event, Gauge, GaugeValue, Log, Timer, Value};
use metron::v1::{self, V1Error};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use prost::Message as _;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// What every datagram must satisfy.
fn check(datagram: &[u8]) -> Result<(), TestCaseError> {
    match v1::decode(datagram) {
        Ok(e) => {
            let v2 = v1::to_v2(&e);
            prop_assert_eq!(&v1::into_v2(e.clone()), &v2);
            for back in v1::to_v1(&v2) {
                let _ = back.encode_to_vec();
            }
            prop_assert_eq!(v1::decode(&e.encode_to_vec()), Ok(e));
        }
        Err(err) => {
            prop_assert!(!err.to_string().is_empty());
            if let V1Error::UnknownEventType(t) = err {
                prop_assert!(!(4..=9).contains(&t));
            }
        }
    }
    Ok(())
}

/// One protobuf field with a random number (mostly the envelope's and event messages') and a
/// random value of a random wire type; length-delimited values may nest further fields.
fn raw_fields() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..12).prop_recursive(3, 64, 6, |inner| {
        vec(
            (
                prop_oneof![4 => 1u32..=18, 1 => any::<u32>()],
                prop_oneof![
                    any::<u64>().prop_map(Wire::Varint),
                    any::<u64>().prop_map(Wire::Fixed64),
                    any::<u32>().prop_map(Wire::Fixed32),
                    inner.prop_map(Wire::Len),
                    "\\PC{0,6}".prop_map(|s| Wire::Len(s.into_bytes())),
                    (0u8..8).prop_map(Wire::Raw),
                ],
            ),
            0..6,
        )
        .prop_map(|fields| {
            let mut out = Vec::new();
            for (number, value) in fields {
                value.write(number, &mut out);
            }
            out
        })
    })
}

#[derive(Debug, Clone)]
enum Wire {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(Vec<u8>),
    /// A tag with this wire type (including the invalid 6 and 7, and groups) and nothing after it.
    Raw(u8),
}

impl Wire {
    fn write(&self, number: u32, out: &mut Vec<u8>) {
        let key = |wire_type: u8| (u64::from(number) << 3) | u64::from(wire_type);
        match self {
            Wire::Varint(v) => {
                prost::encoding::encode_varint(key(0), out);
                prost::encoding::encode_varint(*v, out);
            }
            Wire::Fixed64(v) => {
                prost::encoding::encode_varint(key(1), out);
                out.extend(v.to_le_bytes());
            }
            Wire::Fixed32(v) => {
                prost::encoding::encode_varint(key(5), out);
                out.extend(v.to_le_bytes());
            }
            Wire::Len(bytes) => {
                prost::encoding::encode_varint(key(2), out);
                prost::encoding::encode_varint(bytes.len() as u64, out);
                out.extend(bytes);
            }
            Wire::Raw(wire_type) => prost::encoding::encode_varint(key(*wire_type), out),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, b) if len > 0 => bytes[i % len] ^= b,
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Delete(i) if len > 0 => {
                bytes.remove(i % len);
            }
            _ => {}
        }
    }
    bytes
}

fn text() -> BoxedStrategy<String> {
    v1_gen::text()
}

/// Arbitrary v2 envelopes, leaning towards what `to_v1` looks at.
fn v2_envelope() -> impl Strategy<Value = proto::Envelope> {
    let value = prop_oneof![
        text().prop_map(Data::Text),
        any::<i64>().prop_map(Data::Integer),
        any::<f64>().prop_map(Data::Decimal),
    ];
    let gauge_key = prop_oneof![
        prop::sample::select(vec![
            "cpu",
            "memory",
            "disk",
            "memory_quota",
            "disk_quota",
            "instance_index",
        ])
        .prop_map(str::to_owned),
        "[a-z]{1,4}",
    ];
    let message = prop_oneof![
        (vec(any::<u8>(), 0..8), any::<i32>())
            .prop_map(|(payload, r#type)| Message::Log(Log { payload, r#type })),
        (text(), any::<u64>(), any::<u64>())
            .prop_map(|(name, delta, total)| Message::Counter(Counter { name, delta, total })),
        btree_map(
            gauge_key,
            (prop_oneof![Just(String::new()), text()], any::<f64>())
                .prop_map(|(unit, value)| GaugeValue { unit, value }),
            0..8
        )
        .prop_map(|metrics| Message::Gauge(Gauge { metrics })),
        (text(), any::<i64>(), any::<i64>())
            .prop_map(|(name, start, stop)| Message::Timer(Timer { name, start, stop })),
        (text(), text()).prop_map(|(title, body)| Message::Event(Event { title, body })),
    ];
    (
        any::<i64>(),
        text(),
        prop_oneof![text(), any::<i64>().prop_map(|i| i.to_string())],
        btree_map(v1_gen::tag_key(), text(), 0..6),
        btree_map(
            v1_gen::tag_key(),
            prop::option::of(value).prop_map(|data| Value { data }),
            0..4,
        ),
        prop::option::of(message),
    )
        .prop_map(
            |(timestamp, source_id, instance_id, tags, deprecated_tags, message)| proto::Envelope {
                timestamp,
                source_id,
                instance_id,
                tags,
                deprecated_tags,
                message,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(datagram in vec(any::<u8>(), 0..512)) {
        check(&datagram)?;
    }

    #[test]
    fn protobuf_shaped_fields(datagram in raw_fields()) {
        check(&datagram)?;
    }

    #[test]
    fn mutated_valid_datagrams(
        e in v1_gen::valid_envelope(),
        mutations in vec(mutation(), 1..4),
    ) {
        let datagram = e.encode_to_vec();
        prop_assert_eq!(v1::decode(&datagram), Ok(e));
        check(&mutate(datagram, &mutations))?;
    }

    #[test]
    fn to_v1_of_any_v2_envelope(e in v2_envelope()) {
        for v1 in v1::to_v1(&e) {
            let _ = v1.encode_to_vec();
        }
    }
}
