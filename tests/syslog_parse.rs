//! The syslog formatter's output, read back by others: every message parses with a strict RFC
//! 5424 parser (`syslog_rfc5424`), and Log Cache's rules for what it stores (reference
//! `destinations.md` §1.3, §1.5: source id from APP-NAME, instance id after the last `/` of
//! PROCID, ERR for PRI 11, the trimmed MSG, `tags@47450` as tags, the metric elements' fields)
//! recover the envelope's fields exactly. The rules are written here from the reference, not
//! taken from the formatter.

use std::collections::BTreeMap;

use metron::envelope::view::Parsed;
use metron::proto::envelope::Message;
use metron::proto::{Counter, Envelope, Event, Gauge, GaugeValue, Log, Timer};
use metron::syslog::rfc5424::{format, format_encoded, Messages, Options};
use proptest::prelude::*;
use syslog_rfc5424::message::ProcId;
use syslog_rfc5424::SyslogMessage;

/// What Log Cache stores for one message.
#[derive(Debug, PartialEq)]
struct Stored {
    source_id: String,
    instance_id: String,
    /// `Some(true)` for ERR; logs only.
    err: Option<bool>,
    payload: Option<String>,
    tags: BTreeMap<String, String>,
    /// (element id without `@47450`, its parameters).
    metric: Option<(String, BTreeMap<String, String>)>,
}

/// Log Cache's syslog server's rules (reference §1.3, §1.5).
fn log_cache_reads(m: &SyslogMessage) -> Stored {
    let procid = match m.procid.as_ref().expect("PROCID present") {
        ProcId::PID(p) => p.to_string(),
        ProcId::Name(n) => n.clone(),
    };
    let trimmed = procid.trim_start_matches('[').trim_end_matches(']');
    let instance_id = trimmed.rsplit('/').next().unwrap_or("").to_string();
    let mut tags = BTreeMap::new();
    let mut metric = None;
    for (id, params) in m.sd.iter() {
        let kind = id.strip_suffix("@47450").expect("only the @47450 elements");
        match kind {
            "tags" => tags = params.clone(),
            "counter" | "gauge" | "timer" | "event" => {
                metric = Some((kind.to_string(), params.clone()));
            }
            other => panic!("Log Cache refuses SD-ID {other}"),
        }
    }
    let is_log = metric.is_none();
    Stored {
        source_id: m.appname.clone().expect("APP-NAME present"),
        instance_id,
        err: is_log.then(|| m.severity == syslog_rfc5424::SyslogSeverity::SEV_ERR),
        payload: is_log.then(|| m.msg.trim().to_string()),
        tags,
        metric,
    }
}

/// What the envelope says Log Cache should store, one per message (a gauge: one per metric).
fn expected(e: &Envelope) -> Vec<Stored> {
    let tags: BTreeMap<String, String> = e
        .tags
        .iter()
        .filter(|(k, _)| k.as_str() != "metron")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let stored = |err, payload, metric| Stored {
        source_id: e.source_id.clone(),
        instance_id: e.instance_id.clone(),
        err,
        payload,
        tags: tags.clone(),
        metric,
    };
    let params = |kvs: &[(&str, String)]| {
        kvs.iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    match e.message.as_ref().expect("a message") {
        Message::Log(l) => vec![stored(
            Some(l.r#type == 1),
            Some(
                String::from_utf8(l.payload.clone())
                    .unwrap()
                    .trim()
                    .to_string(),
            ),
            None,
        )],
        Message::Counter(c) => vec![stored(
            None,
            None,
            Some((
                "counter".into(),
                params(&[
                    ("name", c.name.clone()),
                    ("delta", c.delta.to_string()),
                    ("total", c.total.to_string()),
                ]),
            )),
        )],
        Message::Timer(t) => vec![stored(
            None,
            None,
            Some((
                "timer".into(),
                params(&[
                    ("name", t.name.clone()),
                    ("start", t.start.to_string()),
                    ("stop", t.stop.to_string()),
                ]),
            )),
        )],
        Message::Event(ev) => vec![stored(
            None,
            None,
            Some((
                "event".into(),
                params(&[("title", ev.title.clone()), ("body", ev.body.clone())]),
            )),
        )],
        // The value is compared as a number below; here it is left out.
        Message::Gauge(g) => g
            .metrics
            .iter()
            .map(|(name, v)| {
                stored(
                    None,
                    None,
                    Some((
                        "gauge".into(),
                        params(&[("name", name.clone()), ("unit", v.unit.clone())]),
                    )),
                )
            })
            .collect(),
    }
}

/// Text a tag, a name or a payload may hold, with what needs escaping in structured data.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["\\PC{0,12}", "[a-z \"\\]\\\\\\[=]{0,8}"]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let message = prop_oneof![
        (text(), 0i32..=1).prop_map(|(p, kind)| Message::Log(Log {
            payload: p.into_bytes(),
            r#type: kind
        })),
        (text(), any::<u64>(), any::<u64>())
            .prop_map(|(name, delta, total)| Message::Counter(Counter { name, delta, total })),
        (text(), any::<i64>(), any::<i64>())
            .prop_map(|(name, start, stop)| Message::Timer(Timer { name, start, stop })),
        (text(), text()).prop_map(|(title, body)| Message::Event(Event { title, body })),
        proptest::collection::btree_map(
            text(),
            (
                text(),
                any::<f64>().prop_filter("finite", |v| v.is_finite())
            ),
            1..4
        )
        .prop_map(|m| Message::Gauge(Gauge {
            metrics: m
                .into_iter()
                .map(|(k, (unit, value))| (k, GaugeValue { unit, value }))
                .collect()
        })),
    ];
    (
        any::<i64>(),
        // `-` is syslog's NILVALUE, which Log Cache refuses as a source id.
        "[!-~]{1,48}".prop_filter("not NILVALUE", |s| s != "-"),
        // Instance ids as Cloud Foundry makes them (indexes, GUIDs): Log Cache trims `[]` and
        // takes what follows the last `/`.
        "[a-zA-Z0-9-]{1,36}",
        proptest::collection::btree_map("[a-zA-Z0-9_.:@-]{1,32}", text(), 0..5),
        prop_oneof![Just("APP/PROC/WEB"), Just("STG"), Just("my task"), Just("")],
        message,
    )
        .prop_map(
            |(timestamp, source_id, instance_id, mut tags, source_type, message)| {
                if !source_type.is_empty() {
                    tags.insert("source_type".into(), source_type.into());
                }
                tags.insert("metron".into(), "2k.abc".into());
                Envelope {
                    timestamp,
                    source_id,
                    instance_id,
                    tags,
                    message: Some(message),
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_message_parses_strictly_and_log_cache_recovers_the_envelope(e in envelope()) {
        let opts = Options { hostname: "org.space.app", metadata: true, metron_tag: false };
        let mut out = Vec::new();
        format(&e, &opts, &mut out).expect("formattable");
        let want = expected(&e);
        prop_assert_eq!(out.len(), want.len());
        for (bytes, want) in out.iter().zip(want) {
            let text = std::str::from_utf8(bytes).expect("UTF-8");
            let m = syslog_rfc5424::parse_message(text)
                .map_err(|err| TestCaseError::fail(format!("{err}: {text:?}")))?;
            // Microseconds, as upstream writes them.
            let micros = e.timestamp.div_euclid(1_000);
            prop_assert_eq!(m.timestamp, Some(micros.div_euclid(1_000_000)));
            prop_assert_eq!(
                m.timestamp_nanos,
                Some((micros.rem_euclid(1_000_000) * 1_000) as u32)
            );
            let mut got = log_cache_reads(&m);
            if let Some(("gauge", params)) = got.metric.as_mut().map(|(k, p)| (k.as_str(), p)) {
                let value: f64 = params.remove("value").expect("a value").parse().expect("a float");
                let name = &params["name"];
                let Some(Message::Gauge(g)) = &e.message else { unreachable!() };
                prop_assert_eq!(value.to_bits(), g.metrics[name].value.to_bits());
            }
            prop_assert_eq!(got, want, "{}", text);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The drains format envelopes in place from their bytes (`format_encoded`); the formatter
    /// on a decoded envelope (`format`, checked against upstream's vectors) is the oracle. Two
    /// encodings written one after the other are one envelope to a decoder (repeated fields and
    /// map keys: the last wins; message fields merge), as the agent's own appended tags are:
    /// the in-place reader must agree, or hand the bytes to prost.
    #[test]
    fn formatting_in_place_gives_the_bytes_of_formatting_the_decoded_envelope(
        a in envelope(),
        b in envelope(),
        merged in any::<bool>(),
        metadata in any::<bool>(),
        metron_tag in any::<bool>(),
    ) {
        use prost::Message as _;
        let mut bytes = a.encode_to_vec();
        if merged {
            let mut second = b.clone();
            // Without a second message field, only the scalars and the maps merge.
            if a.message.is_some() && b.message.is_some() && a.tags.len() % 2 == 0 {
                second.message = None;
            }
            bytes.extend(second.encode_to_vec());
        }
        let decoded = Envelope::decode(bytes.as_slice()).expect("decodes");
        let opts = Options { hostname: "host", metadata, metron_tag };
        let mut want = Vec::new();
        let want_result = format(&decoded, &opts, &mut want);
        let mut got = Messages::default();
        let mut parsed = Parsed::default();
        let got_result = format_encoded(&bytes, &mut parsed, &opts, &mut got);
        prop_assert_eq!(got_result, want_result);
        let got: Vec<Vec<u8>> = got.iter().map(<[u8]>::to_vec).collect();
        prop_assert_eq!(got, want);
    }
}
