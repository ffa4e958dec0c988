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

/// Appends `env`'s messages to `out`, each without framing.
///
/// # Errors
/// When the receiver would refuse the message (see [`Unformattable`]); nothing is appended.
pub fn format(env: &Envelope, opts: &Options, out: &mut Vec<Vec<u8>>) -> Result<(), Unformattable> {
    let message = env.message.as_ref().ok_or(Unformattable::NoMessage)?;
    let pri = match message {
        Message::Log(log) => match log.r#type {
            0 => 14,
            1 => 11,
            other => return Err(Unformattable::LogType(other)),
        },
        _ => 14,
    };
    let procid = match message {
        Message::Log(_) => log_procid(env),
        _ => format!("[{}]", env.instance_id),
    };
    if procid.len() > MAX_PROCID {
        return Err(Unformattable::ProcIdTooLong);
    }
    let hostname = hostname(env, opts.hostname);
    let app_name = truncate(&env.source_id, MAX_APP_NAME);
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
            Message::Log(log) => log.payload.len() + 2,
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
        Message::Log(log) => {
            let mut m = with_sd(None);
            m.push(b' ');
            m.extend(log.payload.iter().copied().filter(|b| *b != 0));
            if m.last() != Some(&b'\n') {
                m.push(b'\n');
            }
            out.push(m);
        }
        Message::Counter(c) => {
            let sd = element(
                "counter@47450",
                &[
                    ("name", &c.name),
                    ("total", &c.total.to_string()),
                    ("delta", &c.delta.to_string()),
                ],
            );
            out.push(metric(with_sd(Some(sd))));
        }
        Message::Gauge(g) => {
            for (name, value) in &g.metrics {
                let mut v = String::new();
                format_g(value.value, &mut v);
                let sd = element(
                    "gauge@47450",
                    &[("name", name), ("value", &v), ("unit", &value.unit)],
                );
                out.push(metric(with_sd(Some(sd))));
            }
        }
        Message::Timer(t) => {
            let sd = element(
                "timer@47450",
                &[
                    ("name", &t.name),
                    ("start", &t.start.to_string()),
                    ("stop", &t.stop.to_string()),
                ],
            );
            out.push(metric(with_sd(Some(sd))));
        }
        Message::Event(e) => {
            let sd = element("event@47450", &[("title", &e.title), ("body", &e.body)]);
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
fn hostname(env: &Envelope, binding: &str) -> String {
    let part = |key: &str| env.tags.get(key).map(String::as_str);
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
fn log_procid(env: &Envelope) -> String {
    let raw = env.tags.get("source_type").map_or("", String::as_str);
    let mut source_type = sanitize(raw, |c| c.is_ascii_graphic());
    source_type.make_ascii_uppercase();
    let mut instance = env.instance_id.as_str();
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
fn tags_element(env: &Envelope, opts: &Options) -> Result<Option<String>, Unformattable> {
    if !opts.metadata {
        return Ok(None);
    }
    let mut sd = String::new();
    for (k, v) in &env.tags {
        if k == TAG && !opts.metron_tag {
            continue;
        }
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| printable(b) && !matches!(b, b'=' | b']' | b'"'))
        {
            return Err(Unformattable::TagKey(k.clone()));
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
