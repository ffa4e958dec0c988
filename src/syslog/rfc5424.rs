//! Envelopes as RFC 5424 syslog messages, byte for byte as upstream's syslog-agent writes them
//! (its `Converter.ToRFC5424` and go-loggregator's marshaller; the rules and golden outputs are
//! in `shared/reference/destinations.md` §1.3-1.4, and the tests below are upstream's own
//! vectors):
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID - STRUCTURED-DATA[ MSG]
//! ```
//!
//! One message per envelope, except a gauge: one per metric (in name order; upstream's order is
//! Go's random map order). Two departures, both where upstream would send what Log Cache's
//! parser refuses and so close the drain's connection: a log whose type is neither OUT nor ERR
//! (upstream writes PRI `-1`) and a field upstream's marshaller refuses are [`Unformattable`],
//! for the caller to count as dropped.

use std::fmt::Write as _;

use super::gofloat::format_g;
use crate::envelope::tag::TAG;
use crate::envelope::view::{sort_last_wins, MessageRef, Parsed, Span};
use crate::proto::envelope::Message;
use crate::proto::Envelope;
use crate::telemetry::logging::write_date_time;

/// The Cloud Foundry Foundation's enterprise number, in every structured-data ID.
const TAGS_ID: &str = "tags@47450";

/// How a drain formats (its binding and its URL's parameters).
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    /// The binding's hostname; replaced by `org.space.app` built from the envelope's tags when
    /// any of them is there.
    pub hostname: &'a str,
    /// Whether the tags go out as `[tags@47450 …]` (`disable-metadata` turns it off).
    pub metadata: bool,
    /// Whether the `metron` tag (sequence and signature) goes out with the other tags
    /// (`syslog.include_metron_tags`; off by default: a unique value per message).
    pub metron_tag: bool,
}

/// Why an envelope cannot be written as syslog without the receiver refusing it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unformattable {
    #[error("log type {0} is neither OUT nor ERR")]
    LogType(i32),
    #[error("{0} is not printable US-ASCII")]
    NotPrintable(&'static str),
    #[error("PROCID is longer than 128 bytes")]
    ProcIdTooLong,
    #[error("tag key {0:?} cannot be a structured-data parameter name")]
    TagKey(String),
    #[error("the envelope has no message")]
    NoMessage,
    #[error("the bytes are no envelope")]
    Undecodable,
}

/// The longest message metron sends (without its octet count): Log Cache's syslog server takes
/// no more, and closes the connection on a longer frame, losing everything after it (reference
/// §1.5). A longer one is dropped and counted (`unformattable`), never truncated: upstream does
/// not truncate payloads either, and a cut message would pass for a whole one.
pub const MAX_MESSAGE_BYTES: usize = 65_536;

/// Upstream's limits (RFC 5424's): HOSTNAME 255, APP-NAME 48, PROCID 128 bytes.
const MAX_HOSTNAME: usize = 255;
const MAX_APP_NAME: usize = 48;
const MAX_PROCID: usize = 128;
/// The longest part of `org.space.app` (a DNS label).
const MAX_LABEL: usize = 63;
/// PROCID: the most of the instance id kept when the source type is long too.
const MAX_SOURCE_INSTANCE: usize = 36;

/// An envelope's fields as the formatter reads them, borrowed: from a decoded envelope
/// ([`format()`]) or in place from its bytes ([`format_encoded`], which allocates nothing per
/// field).
#[derive(Debug)]
pub struct Fields<'a> {
    pub timestamp: i64,
    pub source_id: &'a str,
    pub instance_id: &'a str,
    /// Sorted by key, one entry per key.
    pub tags: Vec<(&'a str, &'a str)>,
    pub body: Body<'a>,
}

/// The envelope's message, borrowed.
#[derive(Debug)]
pub enum Body<'a> {
    Log {
        payload: &'a [u8],
        r#type: i32,
    },
    Counter {
        name: &'a str,
        delta: u64,
        total: u64,
    },
    /// (name, value, unit), sorted by name, one entry per name.
    Gauge(Vec<(&'a str, f64, &'a str)>),
    Timer {
        name: &'a str,
        start: i64,
        stop: i64,
    },
    Event {
        title: &'a str,
        body: &'a str,
    },
}

impl<'a> Fields<'a> {
    /// A decoded envelope's fields (`None` without a message).
    pub fn of(env: &'a Envelope) -> Option<Fields<'a>> {
        let body = match env.message.as_ref()? {
            Message::Log(l) => Body::Log {
                payload: &l.payload,
                r#type: l.r#type,
            },
            Message::Counter(c) => Body::Counter {
                name: &c.name,
                delta: c.delta,
                total: c.total,
            },
            Message::Gauge(g) => Body::Gauge(
                g.metrics
                    .iter()
                    .map(|(name, v)| (name.as_str(), v.value, v.unit.as_str()))
                    .collect(),
            ),
            Message::Timer(t) => Body::Timer {
                name: &t.name,
                start: t.start,
                stop: t.stop,
            },
            Message::Event(e) => Body::Event {
                title: &e.title,
                body: &e.body,
            },
        };
        Some(Fields {
            timestamp: env.timestamp,
            source_id: &env.source_id,
            instance_id: &env.instance_id,
            tags: env
                .tags
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            body,
        })
    }

    fn tag(&self, key: &str) -> Option<&'a str> {
        self.tags
            .binary_search_by(|(k, _)| (*k).cmp(key))
            .ok()
            .map(|i| self.tags[i].1)
    }
}

/// Appends `env`'s messages to `out`, each without framing.
///
/// # Errors
/// When the receiver would refuse the message (see [`Unformattable`]); nothing is appended.
pub fn format(env: &Envelope, opts: &Options, out: &mut Vec<Vec<u8>>) -> Result<(), Unformattable> {
    let fields = Fields::of(env).ok_or(Unformattable::NoMessage)?;
    format_fields(&fields, opts, out)
}

/// [`format()`] for an encoded envelope, read in place with `parsed` (reused from envelope to
/// envelope); one the in-place reader cannot take is decoded instead.
///
/// # Errors
/// As [`format()`]; also [`Unformattable::Undecodable`] for bytes that are no envelope.
pub fn format_encoded(
    envelope: &[u8],
    parsed: &mut Parsed,
    opts: &Options,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), Unformattable> {
    match fields_in_place(envelope, parsed) {
        Some(fields) => format_fields(&fields, opts, out),
        None => {
            use prost::Message as _;
            let env = Envelope::decode(envelope).map_err(|_| Unformattable::Undecodable)?;
            format(&env, opts, out)
        }
    }
}

/// The fields of `envelope` read in place; `None` when the reader hands it to prost.
fn fields_in_place<'a>(envelope: &'a [u8], parsed: &mut Parsed) -> Option<Fields<'a>> {
    parsed.parse(envelope).ok()?;
    parsed.sort_maps(envelope);
    sort_last_wins(&mut parsed.tags, |(k, _)| k.slice(envelope));
    // The reader checked every string field to be UTF-8.
    let text = |s: Span| std::str::from_utf8(s.slice(envelope)).ok();
    let body = match parsed.message {
        MessageRef::None => return None,
        MessageRef::Log { payload, r#type } => Body::Log {
            payload: payload.slice(envelope),
            r#type,
        },
        MessageRef::Counter { name, delta, total } => Body::Counter {
            name: text(name)?,
            delta,
            total,
        },
        MessageRef::Gauge => Body::Gauge(
            parsed
                .gauge
                .iter()
                .map(|(name, unit, value)| Some((text(*name)?, *value, text(*unit)?)))
                .collect::<Option<_>>()?,
        ),
        MessageRef::Timer { name, start, stop } => Body::Timer {
            name: text(name)?,
            start,
            stop,
        },
        MessageRef::Event { title, body } => Body::Event {
            title: text(title)?,
            body: text(body)?,
        },
    };
    Some(Fields {
        timestamp: parsed.timestamp,
        source_id: text(parsed.source_id)?,
        instance_id: text(parsed.instance_id)?,
        tags: parsed
            .tags
            .iter()
            .map(|(k, v)| Some((text(*k)?, text(*v)?)))
            .collect::<Option<_>>()?,
        body,
    })
}

/// Appends the messages of `env` to `out`, each without framing.
fn format_fields(
    env: &Fields,
    opts: &Options,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), Unformattable> {
    let message = &env.body;
    let pri = match message {
        Body::Log { r#type, .. } => match r#type {
            0 => 14,
            1 => 11,
            other => return Err(Unformattable::LogType(*other)),
        },
        _ => 14,
    };
    let procid = match message {
        Body::Log { .. } => log_procid(env),
        _ => format!("[{}]", env.instance_id),
    };
    if procid.len() > MAX_PROCID {
        return Err(Unformattable::ProcIdTooLong);
    }
    let hostname = hostname(env, opts.hostname);
    let app_name = truncate(env.source_id, MAX_APP_NAME);
    let mut header = String::with_capacity(128);
    let _ = write!(header, "<{pri}>1 ");
    timestamp(env.timestamp, &mut header);
    for (field, value) in [
        ("HOSTNAME", hostname.as_str()),
        ("APP-NAME", app_name),
        ("PROCID", procid.as_str()),
    ] {
        if !value.bytes().all(printable) {
            return Err(Unformattable::NotPrintable(field));
        }
        header.push(' ');
        header.push_str(if value.is_empty() { "-" } else { value });
    }
    header.push_str(" - ");
    let tags = tags_element(env, opts)?;
    let with_sd = |element: Option<String>| {
        let sd_len = element.as_ref().map_or(1, String::len) + tags.as_ref().map_or(0, String::len);
        // Room for the rest too: the payload (logs) or upstream's `" \n"` (metrics).
        let payload = match message {
            Body::Log { payload, .. } => payload.len() + 2,
            _ => 2,
        };
        let mut m = Vec::with_capacity(header.len() + sd_len + payload);
        m.extend_from_slice(header.as_bytes());
        match (element, &tags) {
            (None, None) => m.push(b'-'),
            (element, tags) => {
                m.extend(element.iter().flat_map(|e| e.bytes()));
                m.extend(tags.iter().flat_map(|t| t.bytes()));
            }
        }
        m
    };
    match message {
        Body::Log { payload, .. } => {
            let mut m = with_sd(None);
            m.push(b' ');
            m.extend(payload.iter().copied().filter(|b| *b != 0));
            if m.last() != Some(&b'\n') {
                m.push(b'\n');
            }
            out.push(m);
        }
        Body::Counter { name, delta, total } => {
            let sd = element(
                "counter@47450",
                &[
                    ("name", name),
                    ("total", &total.to_string()),
                    ("delta", &delta.to_string()),
                ],
            );
            out.push(metric(with_sd(Some(sd))));
        }
        Body::Gauge(metrics) => {
            for (name, value, unit) in metrics {
                let mut v = String::new();
                format_g(*value, &mut v);
                let sd = element(
                    "gauge@47450",
                    &[("name", name), ("value", &v), ("unit", unit)],
                );
                out.push(metric(with_sd(Some(sd))));
            }
        }
        Body::Timer { name, start, stop } => {
            let sd = element(
                "timer@47450",
                &[
                    ("name", name),
                    ("start", &start.to_string()),
                    ("stop", &stop.to_string()),
                ],
            );
            out.push(metric(with_sd(Some(sd))));
        }
        Body::Event { title, body } => {
            let sd = element("event@47450", &[("title", title), ("body", body)]);
            out.push(metric(with_sd(Some(sd))));
        }
    }
    Ok(())
}

/// RFC 6587 octet counting, as upstream frames every message on TCP and TLS: `LEN SP MSG`.
pub fn frame(message: &[u8], out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(out, "{} ", message.len());
    out.extend_from_slice(message);
}

/// A metric message ends with an empty MSG and upstream's `" \n"`.
fn metric(mut m: Vec<u8>) -> Vec<u8> {
    m.extend_from_slice(b" \n");
    m
}

/// Printable US-ASCII (33-126), what RFC 5424 allows in its header fields.
fn printable(b: u8) -> bool {
    b.is_ascii_graphic()
}

/// At most `max` bytes of `s`, cut on a character boundary (a cut character would not be
/// printable US-ASCII anyway, which the caller refuses).
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `org.space.app` from the tags when any of the three is there, each part sanitized as a DNS
/// label; the binding's hostname otherwise. At most 255 bytes.
fn hostname(env: &Fields, binding: &str) -> String {
    let part = |key: &str| env.tag(key);
    let (org, space, app) = (
        part("organization_name"),
        part("space_name"),
        part("app_name"),
    );
    let name = if org.is_some() || space.is_some() || app.is_some() {
        let label = |s: Option<&str>| {
            let mut l = label(s.unwrap_or(""));
            l.truncate(MAX_LABEL);
            l
        };
        format!("{}.{}.{}", label(org), label(space), label(app))
    } else {
        binding.to_string()
    };
    truncate(&name, MAX_HOSTNAME).to_string()
}

/// Upstream's hostname sanitizing: runs of whitespace become `-`, anything outside
/// `[-a-zA-Z0-9]` goes, trailing dashes go.
fn label(s: &str) -> String {
    sanitize(s, |c| c == '-' || c.is_ascii_alphanumeric())
}

/// Upstream's sanitizing: runs of whitespace (Go regexp's `\s`) become `-`, characters `keep`
/// refuses go, trailing dashes go.
fn sanitize(s: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_space = false;
    for c in s.chars() {
        if go_space(c) {
            if !in_space {
                out.push('-');
            }
            in_space = true;
            continue;
        }
        in_space = false;
        if keep(c) {
            out.push(c);
        }
    }
    out.truncate(out.trim_end_matches('-').len());
    out
}

/// Go regexp's `\s`: ASCII space, tab, newline, form feed, carriage return.
fn go_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r')
}

/// A log's PROCID: `[SOURCE_TYPE/instance]`, the source type sanitized (what is not printable
/// US-ASCII goes) and upper-cased, both cut as upstream cuts them to fit 128 bytes.
fn log_procid(env: &Fields) -> String {
    let raw = env.tag("source_type").unwrap_or("");
    let mut source_type = sanitize(raw, |c| c.is_ascii_graphic());
    source_type.make_ascii_uppercase();
    let mut instance = env.instance_id;
    let mut max = MAX_PROCID - 2;
    if instance.is_empty() {
        source_type.truncate(max);
        return format!("[{source_type}]");
    }
    max -= 1;
    if instance.len() + source_type.len() > max {
        instance = truncate(instance, MAX_SOURCE_INSTANCE);
    }
    if instance.len() + source_type.len() > max {
        source_type.truncate(max.saturating_sub(instance.len()));
    }
    format!("[{source_type}/{instance}]")
}

/// `[ID name="value" …]`, values escaped.
fn element(id: &str, params: &[(&str, &str)]) -> String {
    let mut sd = String::with_capacity(64);
    sd.push('[');
    sd.push_str(id);
    for (name, value) in params {
        param(&mut sd, name, value);
    }
    sd.push(']');
    sd
}

fn param(sd: &mut String, name: &str, value: &str) {
    sd.push(' ');
    sd.push_str(name);
    sd.push_str("=\"");
    for c in value.chars() {
        if matches!(c, '\\' | '"' | ']') {
            sd.push('\\');
        }
        sd.push(c);
    }
    sd.push('"');
}

/// `[tags@47450 k="v" …]` in key order, or nothing (no tags, metadata off).
fn tags_element(env: &Fields, opts: &Options) -> Result<Option<String>, Unformattable> {
    if !opts.metadata {
        return Ok(None);
    }
    let mut sd = String::new();
    for (k, v) in &env.tags {
        if *k == TAG && !opts.metron_tag {
            continue;
        }
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| printable(b) && !matches!(b, b'=' | b']' | b'"'))
        {
            return Err(Unformattable::TagKey(k.to_string()));
        }
        if sd.is_empty() {
            sd.push('[');
            sd.push_str(TAGS_ID);
        }
        param(&mut sd, k, v);
    }
    if sd.is_empty() {
        return Ok(None);
    }
    sd.push(']');
    Ok(Some(sd))
}

/// Go's `time.Unix(0, ns).UTC().Format("2006-01-02T15:04:05.999999-07:00")`: microseconds
/// (truncated) without trailing zeros, no fraction at all when they are zero, `+00:00`.
fn timestamp(ns: i64, out: &mut String) {
    let _ = write_date_time(out, ns.div_euclid(1_000_000_000));
    let mut micros = ns.rem_euclid(1_000_000_000) / 1_000;
    if micros > 0 {
        let mut width = 6;
        while micros % 10 == 0 {
            micros /= 10;
            width -= 1;
        }
        let _ = write!(out, ".{micros:0width$}");
    }
    out.push_str("+00:00");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ns: i64) -> String {
        let mut s = String::new();
        timestamp(ns, &mut s);
        s
    }

    #[test]
    fn agent_written_envelopes_are_read_in_place_not_decoded() {
        use prost::Message as _;
        let mut e = Envelope {
            source_id: "app".into(),
            message: Some(Message::Log(crate::proto::Log {
                payload: b"hi".to_vec(),
                r#type: 0,
            })),
            ..Default::default()
        };
        e.tags.insert("b".into(), "1".into());
        e.tags.insert("a".into(), "2".into());
        let mut bytes = e.encode_to_vec();
        // What the agent appends: a tag entry that replaces one already there.
        let mut later = Envelope::default();
        later.tags.insert("b".into(), "3".into());
        bytes.extend(later.encode_to_vec());
        let mut parsed = Parsed::default();
        let fields = fields_in_place(&bytes, &mut parsed).expect("read in place");
        assert_eq!(
            fields.tags,
            [("a", "2"), ("b", "3")],
            "sorted, the last one wins"
        );
        assert_eq!(fields.tag("b"), Some("3"));
    }

    /// Go's layout: microseconds truncated, trailing zeros and a bare point dropped; dates
    /// before 1970 and leap days right.
    #[test]
    fn timestamps_as_go_formats_them() {
        assert_eq!(ts(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(ts(999), "1970-01-01T00:00:00+00:00");
        assert_eq!(ts(1_000), "1970-01-01T00:00:00.000001+00:00");
        assert_eq!(ts(120_000_000), "1970-01-01T00:00:00.12+00:00");
        assert_eq!(ts(-1), "1969-12-31T23:59:59.999999+00:00");
        assert_eq!(ts(951_782_400_000_000_000), "2000-02-29T00:00:00+00:00");
        assert_eq!(ts(i64::MAX), "2262-04-11T23:47:16.854775+00:00");
        assert_eq!(ts(i64::MIN), "1677-09-21T00:12:43.145224+00:00");
    }
}
