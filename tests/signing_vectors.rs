//! The signing form's test vectors (`tests/vectors/signing.txt`): form 2 (the `metron` tag the
//! agent writes) and form 1 (`metron_sig`, written by agents before issue 19 and still verified).
//! The library reproduces each canonical form and tag, `verify` accepts them, and an independent
//! Python implementation of `docs/signing.md` (`tools/verify_signature.py`) agrees byte
//! for byte.
//!
//! Regenerate form 2's blocks (only when the form deliberately changes, with a new DOMAIN):
//! `METRON_WRITE_VECTORS=1 cargo test --test signing_vectors`. Form 1's blocks are history: the
//! writer copies them as they are.

#[path = "common/json.rs"]
mod json;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use metron::envelope::signing::{canonical, canonical_v1, decode_hex, encode_hex};
use metron::envelope::tag::{MetronTag, Sequence, TagError, TAG};
use metron::envelope::writer::Writer;
use metron::proto::envelope::Message;
use metron::proto::{value::Data, Counter, Envelope, Event, Gauge, GaugeValue, Log, Timer, Value};
use prost::Message as _;

const KEY_ID: &str = "k1";
const KEY: &[u8] = b"loggregator signing key \x00\xff";
const STREAM: [u8; 8] = [0x9f, 0x2c, 0x4e, 0x1a, 0x0b, 0x7d, 0x4c, 0x3e];

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/signing.txt")
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the agent adds to a vector's envelope: (key id, sequence number), each when on.
type Stamp = (Option<&'static str>, Option<u64>);

/// Form 2's inputs: envelopes as they reach the signer, and what is on.
fn inputs() -> Vec<(&'static str, Envelope, Stamp)> {
    let base = |source: &str, message: Option<Message>| Envelope {
        timestamp: 1_763_712_000_123_456_789,
        source_id: source.into(),
        instance_id: "0".into(),
        tags: tags(&[("deployment", "cf"), ("job", "diego-cell")]),
        message,
        ..Default::default()
    };
    let mut deprecated = base("legacy", None);
    deprecated.deprecated_tags = [
        ("origin", Some(Data::Text("rep".into()))),
        ("count", Some(Data::Integer(-7))),
        ("ratio", Some(Data::Decimal(0.23))),
        ("unset", None),
    ]
    .into_iter()
    .map(|(k, data)| (k.to_string(), Value { data }))
    .collect();
    deprecated.message = Some(Message::Log(Log {
        payload: vec![0, 159, 146, 150, 255],
        r#type: 0,
    }));
    // An emitter's own `metron` tag: replaced, and never signed.
    let mut emitters_tag = base("app-a", None);
    emitters_tag
        .tags
        .insert(TAG.into(), "2fake.from-the-emitter".into());
    let mut unicode = base(
        "app-ü",
        Some(Message::Event(Event {
            title: "déploiement \"quoted\"".into(),
            body: "line one\nline two\ttab".into(),
        })),
    );
    unicode.tags.insert("zeta".into(), "ζ".into());
    unicode
        .tags
        .insert("Alpha".into(), "upper case sorts first".into());
    vec![
        (
            "log",
            base(
                "app-a",
                Some(Message::Log(Log {
                    payload: b"hello world".to_vec(),
                    r#type: 1,
                })),
            ),
        ),
        (
            "counter",
            base(
                "app-a",
                Some(Message::Counter(Counter {
                    name: "requests".into(),
                    delta: 3,
                    total: u64::MAX - 1,
                })),
            ),
        ),
        (
            "gauge",
            base(
                "app-b",
                Some(Message::Gauge(Gauge {
                    metrics: [
                        ("memory", "bytes", 1.5e9),
                        ("cpu", "percentage", 0.1),
                        ("disk", "bytes", 0.0),
                    ]
                    .into_iter()
                    .map(|(k, unit, value)| {
                        (
                            k.to_string(),
                            GaugeValue {
                                unit: unit.into(),
                                value,
                            },
                        )
                    })
                    .collect(),
                })),
            ),
        ),
        (
            "timer",
            base(
                "gorouter",
                Some(Message::Timer(Timer {
                    name: "http".into(),
                    start: -5,
                    stop: 1_763_712_000_000_000_000,
                })),
            ),
        ),
        ("event-unicode", unicode),
        ("deprecated-tags", deprecated),
        ("no-message", base("", None)),
    ]
    .into_iter()
    .map(|(name, env)| (name, env, (Some(KEY_ID), Some(42))))
    .chain([
        (
            "seq-999999-key-id-6",
            base("app-a", None),
            (Some("abc-_9"), Some(999_999)),
        ),
        ("sequencing-only", base("app-a", None), (None, Some(1))),
        ("signing-only", base("app-a", None), (Some(KEY_ID), None)),
        ("emitter-metron-tag", emitters_tag, (Some(KEY_ID), Some(7))),
    ])
    .collect()
}

/// Tag values a receiver must refuse, and why (`MetronTag::parse`'s error).
const MALFORMED: &[(&str, &str, TagError)] = &[
    ("other-form", "3k1.AAAA", TagError::UnknownForm),
    ("no-separator", "2k1AAAA", TagError::NoSeparator),
    ("nothing-in-it", "2.", TagError::BadLength),
    ("mac-too-short", "2k1.AAAA", TagError::BadLength),
    (
        "stray-bits",
        "2k1.nyxOGgt9TD4qM5h3VSNdALxUU6DBrMTQrR",
        TagError::NotBase64,
    ),
    (
        "padded",
        "2k1.nyxOGgt9TD4qM5h3VSNdALxUU6DBrMTQrQ==",
        TagError::NotBase64,
    ),
    (
        "standard-alphabet",
        "2k1.nyxOGgt9TD4+M5h3VSNdALxUU6DBrMTQrQ",
        TagError::NotBase64,
    ),
    ("overlong-number", "2.nyxOGgt9TD6qAA", TagError::BadLength),
    ("stream-too-short", "2.nyxOGgt9TA", TagError::BadLength),
];

const HEADER: &str = "\
# metron signing test vectors. One block per vector, fields `name: value`.
# form: 2 (the `metron` tag the agent writes) or 1 (`metron_sig`, written by agents before issue 19).
# Form 2: key_id and key_hex (absent: signing off), stream_hex and seq (absent: sequencing off),
#   envelope_pb_hex: the input envelope (protobuf, loggregator.v2.Envelope, without the metron tag),
#   envelope_json: the same as JSON (bytes as hex), canonical_hex: canonical(envelope) as the
#   docs/signing.md defines it (absent when unsigned), metron: the expected tag value.
# Form 1: key_id, key_hex, envelope_pb_hex and envelope_json (without metron_sig), canonical_hex,
#   metron_sig: the expected tag value.
# form: malformed: a metron tag value a receiver must refuse.
";

/// The tag the agent writes for `env` with `stamp`.
fn stamped(env: &Envelope, (key_id, seq): Stamp) -> Envelope {
    let mut out = env.clone();
    let signer = match key_id {
        Some(id) => Writer::new(id, KEY),
        None => Writer::unsigned(),
    };
    signer.with_sequencing(seq.is_some()).stamp(
        &mut out,
        seq.map(|seq| Sequence {
            stream: STREAM,
            seq,
        }),
    );
    out
}

fn render(existing: &[Block]) -> String {
    let mut out = String::from(HEADER);
    for (name, env, (key_id, seq)) in inputs() {
        let _ = write!(out, "\nname: {name}\nform: 2\n");
        if let Some(id) = key_id {
            let _ = write!(out, "key_id: {id}\nkey_hex: {}\n", encode_hex(KEY));
        }
        if let Some(n) = seq {
            let _ = write!(out, "stream_hex: {}\nseq: {n}\n", encode_hex(&STREAM));
        }
        let _ = write!(
            out,
            "envelope_pb_hex: {}\nenvelope_json: {}\n",
            encode_hex(&env.encode_to_vec()),
            json::v2_json(&env)
        );
        if key_id.is_some() {
            let sequence = seq.map(|seq| Sequence {
                stream: STREAM,
                seq,
            });
            let _ = writeln!(
                out,
                "canonical_hex: {}",
                encode_hex(&canonical(&env, sequence.as_ref()))
            );
        }
        let _ = writeln!(out, "metron: {}", stamped(&env, (key_id, seq)).tags[TAG]);
    }
    for (name, value, _) in MALFORMED {
        let _ = write!(out, "\nname: {name}\nform: malformed\nmetron: {value}\n");
    }
    for old in existing.iter().filter(|b| b["form"] == "1") {
        out.push('\n');
        for key in [
            "name",
            "form",
            "key_id",
            "key_hex",
            "envelope_pb_hex",
            "envelope_json",
            "canonical_hex",
            "metron_sig",
        ] {
            let _ = writeln!(out, "{key}: {}", old[key]);
        }
    }
    out
}

type Block = BTreeMap<String, String>;

fn parse(text: &str) -> Vec<BTreeMap<String, String>> {
    text.split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| l.split_once(": "))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn library_reproduces_every_vector() {
    let text = std::fs::read_to_string(path()).expect("tests/vectors/signing.txt");
    if std::env::var_os("METRON_WRITE_VECTORS").is_some() {
        std::fs::write(path(), render(&parse(&text))).unwrap();
    }
    let text = std::fs::read_to_string(path()).expect("tests/vectors/signing.txt");
    let vectors = parse(&text);
    let inputs = inputs();
    let form2: Vec<_> = vectors.iter().filter(|v| v["form"] == "2").collect();
    let form1: Vec<_> = vectors.iter().filter(|v| v["form"] == "1").collect();
    let malformed: Vec<_> = vectors
        .iter()
        .filter(|v| v["form"] == "malformed")
        .collect();
    assert_eq!(form2.len(), inputs.len());
    assert_eq!(malformed.len(), MALFORMED.len());
    for (v, (name, value, why)) in malformed.into_iter().zip(MALFORMED) {
        assert_eq!((v["name"].as_str(), v["metron"].as_str()), (*name, *value));
        assert_eq!(MetronTag::parse(value), Err(why.clone()), "{name}");
    }
    assert!(form1.len() >= 7, "form 1's vectors are kept");
    for (v, (name, built, stamp)) in form2.into_iter().zip(inputs) {
        assert_eq!(v["name"], name);
        let env = Envelope::decode(decode_hex(&v["envelope_pb_hex"]).unwrap().as_slice()).unwrap();
        assert_eq!(env, built, "{name}: the file holds the documented input");
        assert_eq!(v["envelope_json"], json::v2_json(&env), "{name}");
        assert_eq!(v.get("key_id").map(String::as_str), stamp.0, "{name}");
        let sequence = v.get("seq").map(|n| Sequence {
            stream: decode_hex(&v["stream_hex"]).unwrap().try_into().unwrap(),
            seq: n.parse().unwrap(),
        });
        assert_eq!(sequence.map(|s| s.seq), stamp.1, "{name}");
        let signed = stamped(&env, stamp);
        assert_eq!(signed.tags[TAG], v["metron"], "{name}: the tag");
        let tag = MetronTag::parse(&v["metron"]).unwrap();
        assert_eq!(tag.sequence, sequence, "{name}: the tag reads back");
        match stamp.0 {
            Some(id) => {
                let key = decode_hex(&v["key_hex"]).unwrap();
                assert_eq!(
                    encode_hex(&canonical(&env, sequence.as_ref())),
                    v["canonical_hex"],
                    "{name}: canonical form"
                );
                assert_eq!(metron::verify(&signed, id, &key), Ok(()), "{name}");
                let mut tampered = signed.clone();
                tampered.timestamp += 1;
                assert!(metron::verify(&tampered, id, &key).is_err());
            }
            None => assert!(!v.contains_key("canonical_hex"), "{name}"),
        }
    }
    // Form 1: what older agents wrote still verifies, and its canonical form is reproduced.
    for v in form1 {
        let name = &v["name"];
        let key = decode_hex(&v["key_hex"]).unwrap();
        let mut env =
            Envelope::decode(decode_hex(&v["envelope_pb_hex"]).unwrap().as_slice()).unwrap();
        assert_eq!(v["envelope_json"], json::v2_json(&env), "{name}");
        assert_eq!(
            encode_hex(&canonical_v1(&env)),
            v["canonical_hex"],
            "{name}"
        );
        env.tags
            .insert("metron_sig".into(), v["metron_sig"].clone());
        assert_eq!(metron::verify(&env, &v["key_id"], &key), Ok(()), "{name}");
        env.timestamp += 1;
        assert!(metron::verify(&env, &v["key_id"], &key).is_err(), "{name}");
    }
}

#[test]
fn an_independent_implementation_of_the_specification_agrees() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/verify_signature.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(path())
        .output()
        .expect("python3 runs (it is on every machine of this kind)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(path()).unwrap();
    assert_eq!(
        stdout.trim(),
        format!("{} vectors ok", parse(&text).len()),
        "every vector, both forms"
    );
}
