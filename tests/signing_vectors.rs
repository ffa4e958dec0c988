//! The signing form's test vectors (`tests/vectors/signing.txt`): the library reproduces each
//! canonical form and signature, `verify` accepts them, and an independent Python implementation
//! of the README's description (`tools/verify_signature.py`) agrees byte for byte.
//!
//! Regenerate (only when the form deliberately changes, with a new DOMAIN):
//! `METRON_WRITE_VECTORS=1 cargo test --test signing_vectors`.

#[path = "common/json.rs"]
mod json;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use metron::envelope::signing::{canonical, decode_hex, encode_hex, Signer, SIG_TAG};
use metron::proto::envelope::Message;
use metron::proto::{value::Data, Counter, Envelope, Event, Gauge, GaugeValue, Log, Timer, Value};
use prost::Message as _;

const KEY_ID: &str = "k1";
const KEY: &[u8] = b"loggregator signing key \x00\xff";

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/signing.txt")
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The inputs: envelopes as they reach the signer (already carrying the sequence tags).
fn inputs() -> Vec<(&'static str, Envelope)> {
    let seq = [
        ("metron_stream", "9f2c4e1a0b7d4c3e8a6f5d2b1c0e9f8a"),
        ("metron_seq", "42"),
    ];
    let base = |source: &str, message: Option<Message>| Envelope {
        timestamp: 1_763_712_000_123_456_789,
        source_id: source.into(),
        instance_id: "0".into(),
        tags: tags(&[&seq[..], &[("deployment", "cf"), ("job", "diego-cell")]].concat()),
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
}

fn render() -> String {
    let mut out = String::from(
        "# metron signing test vectors (form metron-sig-v1). One block per vector, fields `name: value`.\n\
         # envelope_pb_hex: the input envelope (protobuf, loggregator.v2.Envelope, without metron_sig);\n\
         # envelope_json: the same envelope as JSON (bytes as hex); key_hex: the HMAC key;\n\
         # canonical_hex: canonical(envelope) as the README defines it; metron_sig: the expected tag value.\n",
    );
    for (name, env) in inputs() {
        let mut signed = env.clone();
        Signer::new(KEY_ID, KEY).sign(&mut signed);
        let _ = write!(
            out,
            "\nname: {name}\nkey_id: {KEY_ID}\nkey_hex: {}\nenvelope_pb_hex: {}\nenvelope_json: {}\ncanonical_hex: {}\nmetron_sig: {}\n",
            encode_hex(KEY),
            encode_hex(&env.encode_to_vec()),
            json::v2_json(&env),
            encode_hex(&canonical(&env)),
            signed.tags[SIG_TAG]
        );
    }
    out
}

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
    if std::env::var_os("METRON_WRITE_VECTORS").is_some() {
        std::fs::write(path(), render()).unwrap();
    }
    let text = std::fs::read_to_string(path()).expect("tests/vectors/signing.txt");
    let vectors = parse(&text);
    let inputs = inputs();
    assert_eq!(vectors.len(), inputs.len());
    for (v, (name, built)) in vectors.iter().zip(inputs) {
        assert_eq!(v["name"], name);
        let key = decode_hex(&v["key_hex"]).unwrap();
        let env = Envelope::decode(decode_hex(&v["envelope_pb_hex"]).unwrap().as_slice()).unwrap();
        assert_eq!(env, built, "{name}: the file holds the documented input");
        assert_eq!(v["envelope_json"], json::v2_json(&env), "{name}");
        assert_eq!(
            encode_hex(&canonical(&env)),
            v["canonical_hex"],
            "{name}: canonical form"
        );
        let mut signed = env.clone();
        Signer::new(&v["key_id"], &key).sign(&mut signed);
        assert_eq!(signed.tags[SIG_TAG], v["metron_sig"], "{name}: signature");
        assert_eq!(metron::verify(&signed, &v["key_id"], &key), Ok(()));
        let mut tampered = signed.clone();
        tampered.timestamp += 1;
        assert!(metron::verify(&tampered, &v["key_id"], &key).is_err());
    }
}

#[test]
fn an_independent_implementation_of_the_readme_agrees() {
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
    assert_eq!(stdout.trim(), format!("{} vectors ok", inputs().len()));
}
