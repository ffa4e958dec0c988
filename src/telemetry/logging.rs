//! Log output: the global tracing subscriber, its two formats (text, JSON lines) and the handle
//! that changes the log level while the agent runs.
//!
//! # The JSON format is an interface
//!
//! Operators feed `log.format: json` into log pipelines that parse it, so its shape is stable:
//! renaming a field or changing its type breaks someone's parser. Each event is exactly one JSON
//! object on one line, with these fields:
//!
//! | field   | type   | content |
//! |---------|--------|---------|
//! | `ts`    | string | when the event was formatted, RFC 3339 UTC with microseconds: `2026-11-21T12:00:00.123456Z` |
//! | `level` | string | `"error"`, `"warn"`, `"info"`, `"debug"` or `"trace"` |
//! | `msg`   | string | the event's message; `""` when the event has none |
//! | *name*  | any    | every other field of the event, then the fields of the spans it happened in (the innermost span first), under their own names |
//!
//! The first three always come first and in that order; the order of the rest is not part of the
//! interface. Field values: integers and finite floats are JSON numbers, bools are bools, anything
//! else (strings, `%display` and `?debug` values, errors, non-finite floats such as `"NaN"`) is a
//! string. A name appears once: an event field hides a span field of the same name, and an inner
//! span's field hides an outer one's. A field that would be called `ts`, `level` or `msg` is written
//! as `field_ts`, `field_level` or `field_msg`. Control characters are always escaped, so a JSON
//! line never carries an ANSI escape. For example:
//!
//! ```text
//! {"ts":"2026-11-21T12:00:00.123456Z","level":"warn","msg":"stream ended","error":"connection reset","slot":2,"endpoint":1}
//! ```
//!
//! Span fields are there only when the filter lets the span itself through: at `warn`, an event
//! inside the `info`-level `doppler_stream` span carries no `slot` or `endpoint` (the text format
//! leaves them out just the same).
//!
//! The text format is tracing-subscriber's default one, without targets, and makes no such promise.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::ParseError;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::{reload, EnvFilter};

/// How log lines look (`log.format` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal unless `NO_COLOR` is set.
    #[default]
    Text,
    /// One JSON object per line; see the module documentation for its fields.
    Json,
}

impl LogFormat {
    /// Parses the config spelling: `"text"` or `"json"`.
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// The config spelling, the inverse of [`LogFormat::parse`].
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{filter:?} is not a log level or filter: {source}")]
    InvalidFilter { filter: String, source: ParseError },
    /// Another global subscriber was in place before ours, so there is no level of ours to change.
    #[error("the log level cannot be changed: the global logger was not installed by metron")]
    NotInstalled,
    #[error("cannot change the log level: {0}")]
    Reload(#[from] reload::Error),
}

/// Changes the level (an `EnvFilter` directive string such as `"info"` or
/// `"warn,metron::grpc=debug"`) of the subscriber it came from. Cheap to clone; every clone
/// controls the same subscriber.
#[derive(Debug, Clone)]
pub struct LogHandle {
    /// `None` when [`init`] found a subscriber it did not install (see [`LogError::NotInstalled`]).
    reload: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogHandle {
    /// Replaces the filter for every event and span from now on.
    ///
    /// # Errors
    ///
    /// [`LogError::InvalidFilter`] when `filter` does not parse (the old level stays), and
    /// [`LogError::NotInstalled`] when this handle controls nothing.
    pub fn set_level(&self, filter: &str) -> Result<(), LogError> {
        // Parse first: a typo in a SIGHUP reload must leave the running level alone.
        let new = EnvFilter::try_new(filter).map_err(|source| LogError::InvalidFilter {
            filter: filter.to_owned(),
            source,
        })?;
        let reload = self.reload.as_ref().ok_or(LogError::NotInstalled)?;
        // `reload` also rebuilds tracing's per-callsite interest cache; without that, callsites
        // already evaluated would keep the old level's verdict.
        reload.reload(new)?;
        Ok(())
    }
}

/// The handle of the subscriber that [`init`] installed, shared by every later call.
static GLOBAL: OnceLock<LogHandle> = OnceLock::new();

/// Installs the global subscriber, writing to stdout in `format` at level `filter`, and returns
/// the handle that changes its level.
///
/// Only the first call in a process installs anything; later calls (tests start many agents in
/// one process) ignore their arguments and return a handle to the first call's subscriber, so a
/// later `set_level` still works. An invalid `filter` falls back to `info` with a warning (the
/// config has already rejected it by then; this is the last line of defence, not validation).
/// If some other code set a global subscriber before the first call, the returned handle's
/// `set_level` fails with [`LogError::NotInstalled`].
pub fn init(filter: &str, format: LogFormat) -> LogHandle {
    GLOBAL
        .get_or_init(|| {
            let (env_filter, invalid) = match EnvFilter::try_new(filter) {
                Ok(f) => (f, None),
                Err(e) => (EnvFilter::new("info"), Some(e)),
            };
            // Colours only for a person at a terminal: journald, bpm and pipes get plain lines.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            let (subscriber, handle) = build(env_filter, format, ansi, std::io::stdout);
            if tracing::subscriber::set_global_default(subscriber).is_err() {
                return LogHandle { reload: None };
            }
            if let Some(e) = invalid {
                tracing::warn!("log filter {filter:?} is invalid ({e}); logging at info");
            }
            handle
        })
        .clone()
}

/// Sends every panic's message and place to the log (target `metron::panic`, level ERROR), at
/// most one line per 10 s, instead of the default hook's unbounded lines on stderr: a panic an
/// actor's guard catches is counted and the daemon goes on (`actor_panics`), so an input that
/// panics every time must not flood the log. The daemon installs it; tests keep the default.
pub fn install_panic_hook() {
    static LIMIT: OnceLock<super::ratelimit::RateLimit> = OnceLock::new();
    std::panic::set_hook(Box::new(|info| {
        let limit = LIMIT
            .get_or_init(|| super::ratelimit::RateLimit::new(std::time::Duration::from_secs(10)));
        let Some(times) = limit.check() else {
            return;
        };
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            target: "metron::panic",
            thread = thread.name().unwrap_or("unnamed"),
            location,
            panics = times,
            "panic: {message}"
        );
    }));
}

/// A panic's message, from its payload (`panic!` makes a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// [`init`] in the text format, for callers that never change the level (tests, and `main` until
/// it reads `log.format`).
pub fn init_logging(filter: &str) {
    init(filter, LogFormat::Text);
}

/// The whole subscriber, writing to `writer`: one function so that the unit tests exercise
/// exactly the stack that [`init`] installs.
fn build<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> (impl Subscriber + Send + Sync + 'static, LogHandle)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // The filter sits directly on the registry so that the handle's type does not depend on the
    // format chosen above it.
    let (filter, handle) = reload::Layer::new(filter);
    let base = Registry::default().with(filter);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonFormat)
            .with_ansi(false)
            .with_writer(writer)
            .and_then(SpanFieldsLayer)
            .boxed(),
    };
    let handle = LogHandle {
        reload: Some(handle),
    };
    (base.with(output), handle)
}

/// Field names the JSON format uses itself; an event or span field with one of these names gets
/// the `field_` prefix.
const RESERVED: [&str; 3] = ["ts", "level", "msg"];

/// The JSON-lines event formatter (see the module documentation for the shape).
struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        w.write_str("{\"ts\":\"")?;
        write_rfc3339_micros(&mut w, SystemTime::now())?;
        write!(
            w,
            "\",\"level\":\"{}\",\"msg\":",
            level_name(event.metadata().level())
        )?;

        // Two passes over the event's fields so that `msg` comes third whatever position the
        // message has among the fields.
        let mut result = Ok(());
        let mut found = false;
        event.record(&mut Visitor(|field: &Field, value: Value<'_>| {
            if field.name() == "message" && !found {
                found = true;
                result = write_json_string(&mut w, format_args!("{value}"));
            }
        }));
        result?;
        if !found {
            w.write_str("\"\"")?;
        }

        let mut written: Vec<&'static str> = Vec::new();
        let mut result = Ok(());
        event.record(&mut Visitor(|field: &Field, value: Value<'_>| {
            let name = field.name();
            if name == "message" || written.contains(&name) || result.is_err() {
                return;
            }
            written.push(name);
            result = write_key(&mut w, name).and_then(|()| write_json_value(&mut w, value));
        }));
        result?;

        // Innermost span first, so that with "first one wins" an inner span hides an outer one.
        for span in ctx.event_scope().into_iter().flatten() {
            let extensions = span.extensions();
            let Some(fields) = extensions.get::<SpanFields>() else {
                continue;
            };
            for (name, json) in &fields.0 {
                if written.contains(name) {
                    continue;
                }
                written.push(*name);
                write_key(&mut w, name)?;
                w.write_str(json)?;
            }
        }
        w.write_str("}\n")
    }
}

/// A span's fields already rendered as JSON values, kept in the span's extensions by
/// [`SpanFieldsLayer`]. The fmt layer's own copy of span fields is a text string meant for
/// printing, which would have to be parsed back to find the names.
struct SpanFields(Vec<(&'static str, String)>);

impl SpanFields {
    /// A visitor that adds or replaces fields (a later `span.record` replaces a value).
    fn recorder(&mut self) -> impl Visit + '_ {
        Visitor(|field: &Field, value: Value<'_>| {
            let mut json = String::new();
            // Writing to a String cannot fail.
            let _ = write_json_value(&mut json, value);
            match self.0.iter_mut().find(|(name, _)| *name == field.name()) {
                Some((_, old)) => *old = json,
                None => self.0.push((field.name(), json)),
            }
        })
    }
}

/// Records every span's fields as [`SpanFields`] for [`JsonFormat`].
struct SpanFieldsLayer;

impl<S> Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = SpanFields(Vec::new());
        attrs.record(&mut fields.recorder());
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut fields.recorder());
        }
    }
}

/// One field value, as tracing hands it over.
#[derive(Clone, Copy)]
enum Value<'a> {
    I64(i64),
    U64(u64),
    I128(i128),
    U128(u128),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    Debug(&'a dyn fmt::Debug),
}

impl fmt::Display for Value<'_> {
    /// The text a JSON string holds for this value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::I64(n) => write!(f, "{n}"),
            Value::U64(n) => write!(f, "{n}"),
            Value::I128(n) => write!(f, "{n}"),
            Value::U128(n) => write!(f, "{n}"),
            Value::F64(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => f.write_str(s),
            Value::Debug(d) => write!(f, "{d:?}"),
        }
    }
}

/// Turns tracing's typed `record_*` callbacks into one closure over [`Value`].
struct Visitor<F>(F);

impl<F: FnMut(&Field, Value<'_>)> Visit for Visitor<F> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        (self.0)(field, Value::F64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        (self.0)(field, Value::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        (self.0)(field, Value::U64(value));
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        (self.0)(field, Value::I128(value));
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        (self.0)(field, Value::U128(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        (self.0)(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        (self.0)(field, Value::Str(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        (self.0)(field, Value::Debug(value));
    }
    // Errors, `%display` values and byte slices arrive through `record_debug` (tracing's default
    // methods wrap them), so they become strings too.
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Writes `,"name":`, prefixing the names the format reserves for itself.
fn write_key(w: &mut impl fmt::Write, name: &str) -> fmt::Result {
    let prefix = if RESERVED.contains(&name) {
        "field_"
    } else {
        ""
    };
    w.write_str(",")?;
    write_json_string(w, format_args!("{prefix}{name}"))?;
    w.write_str(":")
}

fn write_json_value(w: &mut impl fmt::Write, value: Value<'_>) -> fmt::Result {
    match value {
        Value::I64(_) | Value::U64(_) | Value::I128(_) | Value::U128(_) | Value::Bool(_) => {
            write!(w, "{value}")
        }
        // Debug keeps a float recognisable as one (`1.0`, `1e300`) and is valid JSON for every
        // finite value; JSON has no NaN or infinity, so those are strings.
        Value::F64(x) if x.is_finite() => write!(w, "{x:?}"),
        Value::F64(_) | Value::Str(_) | Value::Debug(_) => {
            write_json_string(w, format_args!("{value}"))
        }
    }
}

/// Writes `text` as a quoted JSON string, formatting straight into the escaper so that Debug and
/// Display values need no intermediate String. Also used by the health endpoint's bodies.
pub fn write_json_string(w: &mut impl fmt::Write, text: fmt::Arguments<'_>) -> fmt::Result {
    w.write_char('"')?;
    Escaper(&mut *w).write_fmt(text)?;
    w.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaper<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean_from = 0;
        for (i, c) in s.char_indices() {
            let short = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                // JSON requires escaping U+0000..U+001F. DEL and the C1 range are escaped as well
                // because some terminals act on them (U+009B is a one-character CSI), and a log
                // line must not be able to drive the terminal that displays it.
                '\0'..='\u{1f}' | '\u{7f}'..='\u{9f}' => "",
                _ => continue,
            };
            self.0.write_str(&s[clean_from..i])?;
            if short.is_empty() {
                write!(self.0, "\\u{:04x}", u32::from(c))?;
            } else {
                self.0.write_str(short)?;
            }
            clean_from = i + c.len_utf8();
        }
        self.0.write_str(&s[clean_from..])
    }
}

/// Writes `t` as `YYYY-MM-DDThh:mm:ss.uuuuuuZ`. A clock set before 1970 prints as the epoch.
fn write_rfc3339_micros(w: &mut impl fmt::Write, t: SystemTime) -> fmt::Result {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    write_date_time(w, i64::try_from(since.as_secs()).unwrap_or(i64::MAX))?;
    write!(w, ".{:06}Z", since.subsec_micros())
}

/// Writes the UTC date and time `secs` seconds after 1970-01-01 (before it when negative) as
/// `YYYY-MM-DDThh:mm:ss`. Shared with the syslog formatter.
pub(crate) fn write_date_time(w: &mut impl fmt::Write, secs: i64) -> fmt::Result {
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let second_of_day = secs.rem_euclid(86_400);
    write!(
        w,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    )
}

/// The proleptic Gregorian date (year, month 1..=12, day 1..=31) `days` days after 1970-01-01
/// (before it when negative).
///
/// Howard Hinnant's `civil_from_days`: the calendar repeats every 400 years (146 097 days), and
/// counting years from 1 March puts the leap day at the end of the year, where it cannot shift
/// any month's start.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Days since 0000-03-01: 1970-01-01 is day 719 468 of that count.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11], 0 = March
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = (if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    }) as u32;
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    debug_assert!((1..=12).contains(&month) && (1..=31).contains(&day));
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use proptest::prelude::*;
    use std::io;
    use std::sync::Arc;
    use std::time::Duration;

    /// An in-memory log sink for one test's scoped subscriber.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().clone()).expect("log output is UTF-8")
        }
    }

    /// Runs `f` under the same stack `init` installs, scoped to this thread, and returns what it
    /// logged.
    fn capture(format: LogFormat, filter: &str, f: impl FnOnce(&LogHandle)) -> String {
        let buffer = Buffer::default();
        let (subscriber, handle) = build(EnvFilter::new(filter), format, false, buffer.clone());
        tracing::subscriber::with_default(subscriber, || f(&handle));
        buffer.text()
    }

    /// Splits one JSON line into its timestamp and the rest after `"ts":"…",`, checking the
    /// parts around them.
    fn split_ts(line: &str) -> (&str, &str) {
        let rest = line
            .strip_prefix("{\"ts\":\"")
            .expect("line starts with ts");
        let (ts, rest) = rest.split_at(27);
        let rest = rest.strip_prefix("\",").expect("ts is 27 characters");
        (ts, rest)
    }

    /// The one line `f` logs, without its timestamp.
    fn one_json_line(f: impl FnOnce()) -> String {
        let out = capture(LogFormat::Json, "trace", |_| f());
        assert_eq!(out.matches('\n').count(), 1, "exactly one line: {out:?}");
        let line = out.strip_suffix('\n').expect("line ends with a newline");
        split_ts(line).1.to_owned()
    }

    #[test]
    fn format_names_round_trip() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(LogFormat::parse(format.name()), Some(format));
        }
        assert_eq!(LogFormat::parse("JSON"), None);
        assert_eq!(LogFormat::parse(""), None);
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }

    #[test]
    fn message_is_escaped() {
        let rest = one_json_line(|| {
            tracing::info!("say \"hi\"\\ now\nthen\ttab\r é ✓ \u{1}\u{1b}[31m\u{7f}\u{9b}")
        });
        assert_eq!(
            rest,
            r#""level":"info","msg":"say \"hi\"\\ now\nthen\ttab\r é ✓ \u0001\u001b[31m\u007f\u009b"}"#
        );
    }

    #[test]
    fn numbers_bools_and_strings() {
        let addr: std::net::SocketAddr = "127.0.0.1:8082".parse().unwrap();
        let rest = one_json_line(|| {
            tracing::warn!(
                count = 3u64,
                delta = -2i64,
                big = u128::MAX,
                ratio = 0.5,
                whole = 1.0,
                nan = f64::NAN,
                inf = f64::NEG_INFINITY,
                ok = true,
                name = "a\"b",
                addr = %addr,
                opt = ?Some("x"),
                "done"
            )
        });
        assert_eq!(
            rest,
            concat!(
                r#""level":"warn","msg":"done","count":3,"delta":-2,"#,
                r#""big":340282366920938463463374607431768211455,"ratio":0.5,"whole":1.0,"#,
                r#""nan":"NaN","inf":"-inf","ok":true,"name":"a\"b","addr":"127.0.0.1:8082","#,
                r#""opt":"Some(\"x\")"}"#
            )
        );
    }

    #[test]
    fn errors_are_strings_and_a_missing_message_is_empty() {
        let err = io::Error::other("disk \"full\"");
        let rest = one_json_line(|| tracing::error!(error = &err as &dyn std::error::Error));
        assert_eq!(rest, r#""level":"error","msg":"","error":"disk \"full\""}"#);
    }

    #[test]
    fn every_level_is_lowercase() {
        let out = capture(LogFormat::Json, "trace", |_| {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        let levels: Vec<&str> = out
            .lines()
            .map(|l| split_ts(l).1.split('"').nth(3).unwrap())
            .collect();
        assert_eq!(levels, ["error", "warn", "info", "debug", "trace"]);
    }

    #[test]
    fn timestamp_shape() {
        let out = capture(LogFormat::Json, "info", |_| tracing::info!("x"));
        let (ts, _) = split_ts(out.trim_end());
        assert_eq!(ts.len(), 27, "{ts}");
        for (i, c) in ts.char_indices() {
            let expected = match i {
                4 | 7 => '-',
                10 => 'T',
                13 | 16 => ':',
                19 => '.',
                26 => 'Z',
                _ => {
                    assert!(c.is_ascii_digit(), "{ts}: position {i} is {c:?}");
                    continue;
                }
            };
            assert_eq!(c, expected, "{ts}: position {i}");
        }
        let year: u32 = ts[..4].parse().unwrap();
        assert!((2024..3000).contains(&year), "{ts}");
    }

    #[test]
    fn known_instants() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
            write_rfc3339_micros(&mut s, t).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2000 is a leap year although divisible by 100 (it is divisible by 400).
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(at(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(at(951_868_800, 0), "2000-03-01T00:00:00.000000Z");
        // 2026-11-21 is 20 778 days after 1970-01-01 (56 years of 365 days, 14 leap days from 1972
        // to 2024, and 324 days into 2026), times 86 400 s.
        assert_eq!(at(1_795_219_200, 0), "2026-11-21T00:00:00.000000Z");
        assert_eq!(
            at(1_795_219_200 + 43_200, 123_456),
            "2026-11-21T12:00:00.123456Z"
        );
        // 2100 is not a leap year.
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        // Sub-microsecond parts are cut, never rounded up into the next second.
        let mut s = String::new();
        write_rfc3339_micros(&mut s, UNIX_EPOCH + Duration::from_nanos(999_999_999)).unwrap();
        assert_eq!(s, "1970-01-01T00:00:00.999999Z");
        // A clock before 1970 prints as the epoch rather than panicking.
        let mut s = String::new();
        write_rfc3339_micros(&mut s, UNIX_EPOCH - Duration::from_secs(1)).unwrap();
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
    }

    fn is_leap(year: i64) -> bool {
        year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
    }

    fn month_len(year: i64, month: u32) -> u32 {
        match month {
            2 if is_leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    proptest! {
        // With day 0 anchored at 1970-01-01 (known_instants), "each day is the calendar successor
        // of the one before" pins down every date by induction.
        #[test]
        fn each_day_follows_the_one_before(days in -4_000_000i64..4_000_000) {
            let (y, m, d) = civil_from_days(days);
            let next = civil_from_days(days + 1);
            let expected = if d < month_len(y, m) {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
            prop_assert_eq!(next, expected);
        }
    }

    #[test]
    fn span_fields_inner_wins_and_event_wins() {
        let rest = one_json_line(|| {
            let outer = tracing::info_span!("doppler_stream", slot = 2, endpoint = "10.0.0.5:8082");
            let _outer = outer.enter();
            let inner = tracing::info_span!("attempt", slot = 7, try_no = tracing::field::Empty);
            inner.record("try_no", 3);
            let _inner = inner.enter();
            tracing::info!(endpoint = "event", "sent");
        });
        assert_eq!(
            rest,
            r#""level":"info","msg":"sent","endpoint":"event","slot":7,"try_no":3}"#
        );
    }

    #[test]
    fn span_fields_recorded_later_replace_earlier_values() {
        let rest = one_json_line(|| {
            let span = tracing::info_span!("doppler_stream", slot = 2);
            span.record("slot", 4);
            let _g = span.enter();
            tracing::info!("x");
        });
        assert_eq!(rest, r#""level":"info","msg":"x","slot":4}"#);
    }

    #[test]
    fn reserved_names_are_prefixed() {
        let rest = one_json_line(|| {
            let span = tracing::info_span!("s", msg = "from span", ts = 9);
            let _g = span.enter();
            tracing::info!(ts = 1, level = "loud", "real");
        });
        assert_eq!(
            rest,
            r#""level":"info","msg":"real","field_ts":1,"field_level":"loud","field_msg":"from span"}"#
        );
    }

    #[test]
    fn text_format_keeps_the_fmt_look_without_targets() {
        let out = capture(LogFormat::Text, "info", |_| tracing::info!(n = 1, "hello"));
        assert_eq!(out.lines().count(), 1);
        assert!(out.contains("INFO"), "{out:?}");
        assert!(out.contains("hello"), "{out:?}");
        assert!(!out.contains("logging"), "no target: {out:?}");
    }

    #[test]
    fn set_level_changes_what_is_logged_and_rejects_bad_filters() {
        let out = capture(LogFormat::Json, "info", |handle| {
            tracing::debug!("hidden");
            handle.set_level("debug").unwrap();
            tracing::debug!("shown");
            let err = handle.set_level("debug,metron=loud").unwrap_err();
            assert!(matches!(err, LogError::InvalidFilter { .. }), "{err}");
            assert!(err.to_string().contains("metron=loud"), "{err}");
            // The bad filter left the level at debug.
            tracing::debug!("still shown");
            handle.set_level("warn").unwrap();
            tracing::info!("hidden again");
        });
        let msgs: Vec<&str> = out.lines().map(|l| split_ts(l).1).collect();
        assert_eq!(
            msgs,
            [
                r#""level":"debug","msg":"shown"}"#,
                r#""level":"debug","msg":"still shown"}"#
            ]
        );
    }

    #[test]
    fn a_handle_without_a_subscriber_says_so() {
        let handle = LogHandle { reload: None };
        assert!(matches!(
            handle.set_level("info"),
            Err(LogError::NotInstalled)
        ));
        assert!(matches!(
            handle.set_level("info,x=nope"),
            Err(LogError::InvalidFilter { .. })
        ));
    }

    #[test]
    fn init_twice_installs_once_and_both_handles_work() {
        // The global subscriber lives for the rest of this test binary; at "off" it prints
        // nothing into other tests' output.
        let first = init("off", LogFormat::Json);
        let second = init("debug", LogFormat::Text);
        first.set_level("off").unwrap();
        second.set_level("off").unwrap();
        assert!(matches!(
            second.set_level("off,x=nope"),
            Err(LogError::InvalidFilter { .. })
        ));
        // Both handles point at the same filter: after a change through one, the other sees it
        // (a target no code logs under, so nothing is printed meanwhile).
        first.set_level("off,no_such_target=error").unwrap();
        let level = second
            .reload
            .as_ref()
            .unwrap()
            .with_current(|f| f.to_string())
            .unwrap();
        assert!(level.contains("no_such_target=error"), "{level}");
        first.set_level("off").unwrap();
    }
}
