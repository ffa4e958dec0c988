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
use crate::envelope::fields::fields_in_place;
pub use crate::envelope::fields::{Body, Fields};
use crate::envelope::tag::TAG;
use crate::envelope::view::Parsed;
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

/// Messages one after another in one buffer (unframed): what [`format_encoded`] writes, with no
/// allocation per message once the buffers have grown.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Messages {
    bytes: Vec<u8>,
    /// One past each message's last byte.
    ends: Vec<usize>,
}

impl Messages {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Message `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// Messages `from..to`, back to back (how `https-batch://` posts them).
    pub fn joined(&self, from: usize, to: usize) -> &[u8] {
        let start = if from == 0 { 0 } else { self.ends[from - 1] };
        let end = if to == 0 { 0 } else { self.ends[to - 1] };
        &self.bytes[start..end]
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Bytes of every message together.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Keeps the first `n` messages.
    pub fn truncate(&mut self, n: usize) {
        if n < self.ends.len() {
            self.ends.truncate(n);
            self.bytes.truncate(self.ends.last().copied().unwrap_or(0));
        }
    }

    /// Ends the message being written.
    fn end(&mut self) {
        self.ends.push(self.bytes.len());
    }
}

/// `fmt::Write` into a byte buffer (no intermediate `String`).
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends `env`'s messages to `out`, each without framing.
///
/// # Errors
/// When the receiver would refuse the message (see [`Unformattable`]); nothing is appended.
pub fn format(env: &Envelope, opts: &Options, out: &mut Vec<Vec<u8>>) -> Result<(), Unformattable> {
    let fields = Fields::of(env).ok_or(Unformattable::NoMessage)?;
    let mut messages = Messages::default();
    format_fields(&fields, opts, &mut messages)?;
    out.extend(messages.iter().map(<[u8]>::to_vec));
    Ok(())
}

/// [`format()`] for an encoded envelope, read in place with `parsed` (reused from envelope to
/// envelope), onto `out`; one the in-place reader cannot take is decoded instead.
///
/// # Errors
/// As [`format()`]; also [`Unformattable::Undecodable`] for bytes that are no envelope.
pub fn format_encoded(
    envelope: &[u8],
    parsed: &mut Parsed,
    opts: &Options,
    out: &mut Messages,
) -> Result<(), Unformattable> {
    match fields_in_place(envelope, parsed) {
        Some(fields) => format_fields(&fields, opts, out),
        None => {
            use prost::Message as _;
            let env = Envelope::decode(envelope).map_err(|_| Unformattable::Undecodable)?;
            let fields = Fields::of(&env).ok_or(Unformattable::NoMessage)?;
            format_fields(&fields, opts, out)
        }
    }
}

/// Appends the messages of `env` to `out`, each without framing; nothing when it fails.
fn format_fields(env: &Fields, opts: &Options, out: &mut Messages) -> Result<(), Unformattable> {
    let (bytes, messages) = (out.bytes.len(), out.len());
    let written = write_fields(env, opts, out);
    if written.is_err() {
        out.bytes.truncate(bytes);
        out.ends.truncate(messages);
    }
    written
}

/// [`format_fields`], written straight into `out` (the caller takes back a failed one): the
/// header and the tags element once, copied into each further message of a gauge.
fn write_fields(env: &Fields, opts: &Options, out: &mut Messages) -> Result<(), Unformattable> {
    let message = &env.body;
    let pri = match message {
        Body::Log { r#type, .. } => match r#type {
            0 => "<14>1 ",
            1 => "<11>1 ",
            other => return Err(Unformattable::LogType(*other)),
        },
        _ => "<14>1 ",
    };
    let start = out.bytes.len();
    let b = &mut out.bytes;
    b.extend_from_slice(pri.as_bytes());
    timestamp(env.timestamp, b);
    // The three header fields, written, then checked as upstream checks them.
    b.push(b' ');
    let host = b.len();
    write_hostname(env, opts.hostname, b);
    let host = host..b.len();
    b.push(b' ');
    let app = b.len();
    b.extend_from_slice(truncate(env.source_id, MAX_APP_NAME).as_bytes());
    let app = app..b.len();
    b.push(b' ');
    let procid = b.len();
    match message {
        Body::Log { .. } => write_log_procid(env, b),
        _ => {
            b.push(b'[');
            b.extend_from_slice(env.instance_id.as_bytes());
            b.push(b']');
        }
    }
    let procid = procid..b.len();
    if procid.len() > MAX_PROCID {
        return Err(Unformattable::ProcIdTooLong);
    }
    for (field, range) in [("HOSTNAME", &host), ("APP-NAME", &app), ("PROCID", &procid)] {
        if !b[range.clone()].iter().copied().all(printable) {
            return Err(Unformattable::NotPrintable(field));
        }
    }
    // Empty HOSTNAME / APP-NAME: `-` (PROCID always has its brackets). Only an empty field is
    // replaced, so the ranges after it move by at most one byte each.
    for range in [&app, &host] {
        if range.is_empty() {
            b.insert(range.start, b'-');
        }
    }
    b.extend_from_slice(b" - ");
    let header = start..b.len();
    match message {
        Body::Log { payload, .. } => {
            if !write_tags(env, opts, b)? {
                b.push(b'-');
            }
            b.push(b' ');
            b.extend(payload.iter().copied().filter(|c| *c != 0));
            if b.last() != Some(&b'\n') {
                b.push(b'\n');
            }
            out.end();
        }
        Body::Counter { name, delta, total } => {
            metric_message(out, env, opts, b"[counter@47450", |b| {
                param(b, "name", name);
                param_display(b, "total", total);
                param_display(b, "delta", delta);
            })?;
        }
        Body::Gauge(metrics) => {
            let mut tags: Option<std::ops::Range<usize>> = None;
            let mut v = String::new();
            for (i, (name, value, unit)) in metrics.iter().enumerate() {
                let b = &mut out.bytes;
                if i > 0 {
                    b.extend_from_within(header.clone());
                }
                b.extend_from_slice(b"[gauge@47450");
                param(b, "name", name);
                b.extend_from_slice(b" value=\"");
                v.clear();
                format_g(*value, &mut v);
                b.extend_from_slice(v.as_bytes());
                b.push(b'"');
                param(b, "unit", unit);
                b.push(b']');
                match &tags {
                    Some(t) => b.extend_from_within(t.clone()),
                    None => {
                        let at = b.len();
                        write_tags(env, opts, b)?;
                        tags = Some(at..b.len());
                    }
                }
                b.extend_from_slice(b" \n");
                out.end();
            }
            if metrics.is_empty() {
                // Nothing to send: take the header back.
                out.bytes.truncate(start);
            }
        }
        Body::Timer { name, start, stop } => {
            metric_message(out, env, opts, b"[timer@47450", |b| {
                param(b, "name", name);
                param_display(b, "start", start);
                param_display(b, "stop", stop);
            })?;
        }
        Body::Event { title, body } => {
            metric_message(out, env, opts, b"[event@47450", |b| {
                param(b, "title", title);
                param(b, "body", body);
            })?;
        }
    }
    Ok(())
}

/// Ends a counter's, timer's or event's message (its header already written): its element
/// (`open`, then what `params` writes), the tags element and upstream's `" \n"`.
fn metric_message(
    out: &mut Messages,
    env: &Fields,
    opts: &Options,
    open: &[u8],
    params: impl FnOnce(&mut Vec<u8>),
) -> Result<(), Unformattable> {
    let b = &mut out.bytes;
    b.extend_from_slice(open);
    params(b);
    b.push(b']');
    write_tags(env, opts, b)?;
    b.extend_from_slice(b" \n");
    out.end();
    Ok(())
}

/// RFC 6587 octet counting, as upstream frames every message on TCP and TLS: `LEN SP MSG`.
pub fn frame(message: &[u8], out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(out, "{} ", message.len());
    out.extend_from_slice(message);
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

/// HOSTNAME: `org.space.app` from the tags when any of the three is there, each part sanitized
/// as a DNS label; the binding's hostname otherwise. At most 255 bytes.
fn write_hostname(env: &Fields, binding: &str, out: &mut Vec<u8>) {
    let part = |key: &str| env.tag(key);
    let (org, space, app) = (
        part("organization_name"),
        part("space_name"),
        part("app_name"),
    );
    if org.is_none() && space.is_none() && app.is_none() {
        out.extend_from_slice(truncate(binding, MAX_HOSTNAME).as_bytes());
        return;
    }
    let start = out.len();
    for (i, p) in [org, space, app].into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        let at = out.len();
        sanitize(
            p.unwrap_or(""),
            |c| c == '-' || c.is_ascii_alphanumeric(),
            out,
        );
        // ASCII only: a byte cut is a character cut.
        out.truncate(at + (out.len() - at).min(MAX_LABEL));
    }
    out.truncate(start + (out.len() - start).min(MAX_HOSTNAME));
}

/// Upstream's sanitizing, appended to `out`: runs of whitespace (Go regexp's `\s`) become `-`,
/// characters `keep` refuses go, trailing dashes go.
fn sanitize(s: &str, keep: impl Fn(char) -> bool, out: &mut Vec<u8>) {
    let start = out.len();
    let mut in_space = false;
    let mut utf8 = [0; 4];
    for c in s.chars() {
        if go_space(c) {
            if !in_space {
                out.push(b'-');
            }
            in_space = true;
            continue;
        }
        in_space = false;
        if keep(c) {
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
    while out.len() > start && out.last() == Some(&b'-') {
        out.pop();
    }
}

/// Go regexp's `\s`: ASCII space, tab, newline, form feed, carriage return.
fn go_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r')
}

/// A log's PROCID: `[SOURCE_TYPE/instance]`, the source type sanitized (what is not printable
/// US-ASCII goes) and upper-cased, both cut as upstream cuts them to fit 128 bytes.
fn write_log_procid(env: &Fields, out: &mut Vec<u8>) {
    let raw = env.tag("source_type").unwrap_or("");
    out.push(b'[');
    let at = out.len();
    sanitize(raw, |c| c.is_ascii_graphic(), out);
    out[at..].make_ascii_uppercase();
    // Printable ASCII only from here: byte cuts are character cuts.
    let source_type = out.len() - at;
    let mut instance = env.instance_id;
    let mut max = MAX_PROCID - 2;
    if instance.is_empty() {
        out.truncate(at + source_type.min(max));
        out.push(b']');
        return;
    }
    max -= 1;
    if instance.len() + source_type > max {
        instance = truncate(instance, MAX_SOURCE_INSTANCE);
    }
    if instance.len() + source_type > max {
        out.truncate(at + source_type.min(max.saturating_sub(instance.len())));
    }
    out.push(b'/');
    out.extend_from_slice(instance.as_bytes());
    out.push(b']');
}

/// ` name="value"`, the value escaped.
fn param(sd: &mut Vec<u8>, name: &str, value: &str) {
    sd.push(b' ');
    sd.extend_from_slice(name.as_bytes());
    sd.extend_from_slice(b"=\"");
    for &c in value.as_bytes() {
        if matches!(c, b'\\' | b'"' | b']') {
            sd.push(b'\\');
        }
        sd.push(c);
    }
    sd.push(b'"');
}

/// ` name="value"` for a number.
fn param_display(sd: &mut Vec<u8>, name: &str, value: &impl std::fmt::Display) {
    sd.push(b' ');
    sd.extend_from_slice(name.as_bytes());
    sd.extend_from_slice(b"=\"");
    let _ = write!(Bytes(sd), "{value}");
    sd.push(b'"');
}

/// `[tags@47450 k="v" …]` in key order, appended; false when there is none (no tags, metadata
/// off).
fn write_tags(env: &Fields, opts: &Options, out: &mut Vec<u8>) -> Result<bool, Unformattable> {
    if !opts.metadata {
        return Ok(false);
    }
    let mut any = false;
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
        if !any {
            out.push(b'[');
            out.extend_from_slice(TAGS_ID.as_bytes());
            any = true;
        }
        param(out, k, v);
    }
    if any {
        out.push(b']');
    }
    Ok(any)
}

/// Go's `time.Unix(0, ns).UTC().Format("2006-01-02T15:04:05.999999-07:00")`: microseconds
/// (truncated) without trailing zeros, no fraction at all when they are zero, `+00:00`.
fn timestamp(ns: i64, out: &mut Vec<u8>) {
    let mut w = Bytes(out);
    let _ = write_date_time(&mut w, ns.div_euclid(1_000_000_000));
    let mut micros = ns.rem_euclid(1_000_000_000) / 1_000;
    if micros > 0 {
        let mut width = 6;
        while micros % 10 == 0 {
            micros /= 10;
            width -= 1;
        }
        let _ = write!(w, ".{micros:0width$}");
    }
    out.extend_from_slice(b"+00:00");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envelope::Message;

    fn ts(ns: i64) -> String {
        let mut s = Vec::new();
        timestamp(ns, &mut s);
        String::from_utf8(s).unwrap()
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
