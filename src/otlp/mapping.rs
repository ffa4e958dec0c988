//! Envelope → OTLP, as upstream's OTLP writer does it (loggregator-agent-release
//! `src/pkg/otelcolclient`; `../shared/reference/destinations.md` §1.2, §1.4):
//!
//! - a counter is a cumulative monotonic sum of its total, bit 63 masked (2^63 → 0, `u64::MAX`
//!   → `i64::MAX`); its delta is ignored;
//! - a gauge is one metric per value, named by its key, with the value's unit;
//! - a timer is a span only with non-empty hex `trace_id` and `span_id` tags and a `peer_type`
//!   tag other than `Client`; named by the path of its `uri` tag when that parses as a URL,
//!   server kind for `peer_type` `Server`, status unset;
//! - a log is a log record with INFO (OUT) or ERROR (ERR) severity, its text the enum's name,
//!   the payload as a string body (invalid UTF-8 replaced, where upstream's marshaller would
//!   fail the whole export); an event is a log record whose body is `{title, body}`;
//! - every item carries the attributes `instance_id` and `source_id`, then every tag but
//!   `instance_id`, `source_id`, `__v1_type`, `span_id`, `trace_id`, and the tag metron adds for
//!   sequencing and signing (a unique value per envelope would be an unbounded series), as
//!   strings. Upstream's order among the tags is Go's map order (random); here it is sorted.
//!
//! Metrics of one export go in one `ResourceMetrics` with one scope; each log record and each
//! span in a `ResourceLogs` / `ResourceSpans` of its own, as upstream sends them.
//!
//! The agent writes the protobuf straight from the envelope's bytes ([`super::encode`]); the
//! struct mapping here (`map`, compiled for tests) is the model that both upstream's output
//! and the writer's bytes are checked against (decision 34).

/// The tag metron adds for sequencing and signing (decision 22): never an attribute.
pub const METRON_TAG: &str = "metron";

/// Tags that are never attributes: the two ids (attributes of their own), the v1 type, the
/// trace ids (a span's own fields) and [`METRON_TAG`].
pub const EXCLUDED_TAGS: [&str; 6] = [
    "instance_id",
    "source_id",
    "__v1_type",
    "span_id",
    "trace_id",
    METRON_TAG,
];

/// Which signals are exported (`otlp.signals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals {
    pub logs: bool,
    pub metrics: bool,
    pub traces: bool,
}

impl Default for Signals {
    fn default() -> Self {
        Self {
            logs: true,
            metrics: true,
            traces: true,
        }
    }
}

/// What one envelope became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Mapped into this many items (a gauge with several values makes several metrics).
    Mapped(usize),
    /// Its signal is not exported.
    SignalOff,
    /// Nothing to map: a timer without valid trace tags, or an envelope without a message.
    Unmappable,
}

/// Go's `hex.DecodeString` of a non-empty string: `None` when empty, of odd length or not hex.
pub(crate) fn hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// The path of `uri` as Go's `url.Parse(uri).Path` gives it (unescaped), `None` where Go's
/// parser returns an error: a control character, an empty scheme (`:x`), a colon in the first
/// segment of a relative reference, or a bad `%` escape. An opaque URL (`mailto:x`) has an
/// empty path.
pub(crate) fn url_path(uri: &str) -> Option<String> {
    if uri.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return None;
    }
    let rest = uri.split_once('#').map_or(uri, |(r, _)| r);
    // A scheme: a letter, then letters, digits, `+`, `-`, `.`, up to a colon.
    let mut scheme = false;
    let mut rest = rest;
    for (i, b) in rest.bytes().enumerate() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' => {}
            b'0'..=b'9' | b'+' | b'-' | b'.' if i > 0 => {}
            b':' if i == 0 => return None,
            b':' => {
                scheme = true;
                rest = &rest[i + 1..];
                break;
            }
            _ => break,
        }
    }
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    if scheme && !rest.starts_with('/') {
        return Some(String::new());
    }
    // An authority follows `//` (without a scheme, not `///`).
    let authority = rest.starts_with("//") && (scheme || !rest.starts_with("///"));
    let path = if authority {
        let after = &rest[2..];
        after.find('/').map_or("", |i| &after[i..])
    } else {
        if !scheme && rest.split('/').next().is_some_and(|s| s.contains(':')) {
            return None;
        }
        rest
    };
    unescape(path)
}

/// Percent-decoding as Go's `url.PathUnescape`: `None` on a bad escape.
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = (*b.get(i + 1)? as char).to_digit(16)?;
            let lo = (*b.get(i + 2)? as char).to_digit(16)?;
            out.push((hi << 4 | lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The struct model of the mapping (compiled for tests): what upstream's output and the
/// writer's bytes are checked against.
#[cfg(test)]
mod model {
    use super::{hex, url_path, Outcome, Signals, EXCLUDED_TAGS};
    pub(super) use crate::otlp_proto::collector::logs::v1::ExportLogsServiceRequest;
    pub(super) use crate::otlp_proto::collector::metrics::v1::ExportMetricsServiceRequest;
    pub(super) use crate::otlp_proto::collector::trace::v1::ExportTraceServiceRequest;
    pub(super) use crate::otlp_proto::common::v1::{any_value, AnyValue, KeyValue, KeyValueList};
    pub(super) use crate::otlp_proto::logs::v1::{
        LogRecord, ResourceLogs, ScopeLogs, SeverityNumber,
    };
    pub(super) use crate::otlp_proto::metrics::v1::{
        metric, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum,
    };
    pub(super) use crate::otlp_proto::trace::v1::{
        span, status, ResourceSpans, ScopeSpans, Span, Status,
    };
    pub(super) use crate::proto::envelope::Message;
    pub(super) use crate::proto::{log, Envelope};

    /// Envelopes mapped, by signal, waiting to be exported.
    #[derive(Debug, Default, Clone, PartialEq)]
    pub struct Mapped {
        pub metrics: Vec<Metric>,
        pub logs: Vec<ResourceLogs>,
        pub spans: Vec<ResourceSpans>,
    }

    impl Mapped {
        pub fn is_empty(&self) -> bool {
            self.metrics.is_empty() && self.logs.is_empty() && self.spans.is_empty()
        }

        /// The metrics as one export request (one resource, one scope), leaving none here.
        pub fn take_metrics(&mut self) -> ExportMetricsServiceRequest {
            ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    scope_metrics: vec![ScopeMetrics {
                        metrics: std::mem::take(&mut self.metrics),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
        }

        pub fn take_logs(&mut self) -> ExportLogsServiceRequest {
            ExportLogsServiceRequest {
                resource_logs: std::mem::take(&mut self.logs),
            }
        }

        pub fn take_spans(&mut self) -> ExportTraceServiceRequest {
            ExportTraceServiceRequest {
                resource_spans: std::mem::take(&mut self.spans),
            }
        }
    }

    /// Maps `e` into `out`; `now_ns` is the observed time given to log records. Takes the envelope:
    /// its strings move into the items rather than being copied.
    pub fn map(mut e: Envelope, signals: Signals, now_ns: u64, out: &mut Mapped) -> Outcome {
        // Upstream: `uint64(int64)`, the same bits.
        let time = e.timestamp as u64;
        match e.message.take() {
            Some(Message::Counter(c)) => {
                if !signals.metrics {
                    return Outcome::SignalOff;
                }
                out.metrics.push(Metric {
                    name: c.name,
                    data: Some(metric::Data::Sum(Sum {
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                        data_points: vec![NumberDataPoint {
                            time_unix_nano: time,
                            attributes: attributes(&mut e),
                            value: Some(number_data_point::Value::AsInt(
                                (c.total & 0x7FFF_FFFF_FFFF_FFFF) as i64,
                            )),
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                });
                Outcome::Mapped(1)
            }
            Some(Message::Gauge(g)) => {
                if !signals.metrics {
                    return Outcome::SignalOff;
                }
                let n = g.metrics.len();
                let mut attributes = Some(attributes(&mut e));
                for (i, (name, v)) in g.metrics.into_iter().enumerate() {
                    // The last value takes the attributes; the others a copy.
                    let attributes = if i + 1 == n {
                        attributes.take().unwrap_or_default()
                    } else {
                        attributes.clone().unwrap_or_default()
                    };
                    out.metrics.push(Metric {
                        name,
                        unit: v.unit,
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: vec![NumberDataPoint {
                                time_unix_nano: time,
                                attributes,
                                value: Some(number_data_point::Value::AsDouble(v.value)),
                                ..Default::default()
                            }],
                        })),
                        ..Default::default()
                    });
                }
                Outcome::Mapped(n)
            }
            Some(Message::Timer(t)) => {
                if !signals.traces {
                    return Outcome::SignalOff;
                }
                let tag = |k: &str| e.tags.get(k).map_or("", String::as_str);
                if tag("peer_type") == "Client" {
                    return Outcome::Unmappable;
                }
                let (Some(span_id), Some(trace_id)) = (hex(tag("span_id")), hex(tag("trace_id")))
                else {
                    return Outcome::Unmappable;
                };
                let name = match e.tags.get("uri").map(|u| url_path(u)) {
                    Some(Some(path)) => path,
                    _ => t.name,
                };
                let kind = if tag("peer_type") == "Server" {
                    span::SpanKind::Server
                } else {
                    span::SpanKind::Internal
                };
                out.spans.push(ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![Span {
                            trace_id,
                            span_id,
                            name,
                            kind: kind as i32,
                            start_time_unix_nano: t.start as u64,
                            end_time_unix_nano: t.stop as u64,
                            status: Some(Status {
                                code: status::StatusCode::Unset as i32,
                                ..Default::default()
                            }),
                            attributes: attributes(&mut e),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                Outcome::Mapped(1)
            }
            Some(Message::Log(l)) => {
                if !signals.logs {
                    return Outcome::SignalOff;
                }
                let severity = match log::Type::try_from(l.r#type) {
                    Ok(log::Type::Out) => SeverityNumber::Info,
                    Ok(log::Type::Err) => SeverityNumber::Error,
                    Err(_) => SeverityNumber::Unspecified,
                };
                // Invalid UTF-8 is replaced (upstream's marshaller would fail the whole export).
                let body = String::from_utf8(l.payload)
                    .unwrap_or_else(|bad| String::from_utf8_lossy(bad.as_bytes()).into_owned());
                out.logs.push(log_record(LogRecord {
                    time_unix_nano: time,
                    observed_time_unix_nano: now_ns,
                    severity_number: severity as i32,
                    severity_text: severity.as_str_name().to_owned(),
                    body: Some(string(body)),
                    attributes: attributes(&mut e),
                    ..Default::default()
                }));
                Outcome::Mapped(1)
            }
            Some(Message::Event(ev)) => {
                if !signals.logs {
                    return Outcome::SignalOff;
                }
                out.logs.push(log_record(LogRecord {
                    time_unix_nano: time,
                    observed_time_unix_nano: now_ns,
                    body: Some(AnyValue {
                        value: Some(any_value::Value::KvlistValue(KeyValueList {
                            values: vec![key_value("title", ev.title), key_value("body", ev.body)],
                        })),
                    }),
                    attributes: attributes(&mut e),
                    ..Default::default()
                }));
                Outcome::Mapped(1)
            }
            None => Outcome::Unmappable,
        }
    }

    fn log_record(record: LogRecord) -> ResourceLogs {
        ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: vec![record],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub(super) fn string(s: String) -> AnyValue {
        AnyValue {
            value: Some(any_value::Value::StringValue(s)),
        }
    }

    fn key_value(key: &str, value: String) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(string(value)),
            ..Default::default()
        }
    }

    /// `instance_id`, `source_id`, then the tags (see the module docs), moved out of `e`.
    pub fn attributes(e: &mut Envelope) -> Vec<KeyValue> {
        let tags = std::mem::take(&mut e.tags);
        let mut out = Vec::with_capacity(2 + tags.len());
        out.push(key_value("instance_id", std::mem::take(&mut e.instance_id)));
        out.push(key_value("source_id", std::mem::take(&mut e.source_id)));
        for (k, v) in tags {
            if EXCLUDED_TAGS.contains(&k.as_str()) {
                continue;
            }
            out.push(KeyValue {
                key: k,
                value: Some(string(v)),
                ..Default::default()
            });
        }
        out
    }
}

#[cfg(test)]
pub use model::{map, Mapped};

#[cfg(test)]
mod tests {
    //! Expected values from upstream's real output (`../shared/reference/destinations.md` §1.4,
    //! the converter run on 2026-12-06) and upstream's own test vectors
    //! (`otelcolclient_test.go`: counter totals, dropped timers).

    use std::collections::BTreeMap;

    use super::model::*;
    use super::*;
    use crate::proto::{Counter, Event, Gauge as V2Gauge, GaugeValue, Log, Timer};

    fn envelope(message: Message, tags: &[(&str, &str)]) -> Envelope {
        Envelope {
            timestamp: 1_765_024_201_000_000_000,
            source_id: "app-guid".into(),
            instance_id: String::new(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            message: Some(message),
            ..Default::default()
        }
    }

    fn mapped(e: &Envelope) -> (Outcome, Mapped) {
        let mut out = Mapped::default();
        let outcome = map(e.clone(), Signals::default(), 7, &mut out);
        (outcome, out)
    }

    fn keys(attributes: &[KeyValue]) -> Vec<(&str, &str)> {
        attributes
            .iter()
            .map(|kv| match &kv.value {
                Some(AnyValue {
                    value: Some(any_value::Value::StringValue(s)),
                }) => (kv.key.as_str(), s.as_str()),
                other => panic!("{} is not a string: {other:?}", kv.key),
            })
            .collect()
    }

    fn counter(total: u64) -> Envelope {
        envelope(
            Message::Counter(Counter {
                name: "requests".into(),
                delta: 2,
                total,
            }),
            &[
                ("__v1_type", "CounterEvent"),
                ("deployment", "cf"),
                ("metron", "s1.2"),
            ],
        )
    }

    fn as_int(m: &Mapped) -> i64 {
        match &m.metrics[0].data {
            Some(metric::Data::Sum(s)) => match s.data_points[0].value {
                Some(number_data_point::Value::AsInt(v)) => v,
                ref v => panic!("{v:?}"),
            },
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_counter_is_a_cumulative_monotonic_sum_of_its_total_with_bit_63_masked() {
        // Upstream's output: total 2^63 + 3 → asInt "3".
        let (outcome, m) = mapped(&counter((1 << 63) + 3));
        assert_eq!(outcome, Outcome::Mapped(1));
        assert_eq!(as_int(&m), 3);
        let metric = &m.metrics[0];
        assert_eq!(metric.name, "requests");
        let Some(metric::Data::Sum(sum)) = &metric.data else {
            panic!()
        };
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert!(sum.is_monotonic, "monotonic whatever the delta (7bb6f52)");
        assert_eq!(sum.data_points[0].time_unix_nano, 1_765_024_201_000_000_000);
        // instance_id (even empty), source_id, then the tags: no __v1_type, no metron tag.
        assert_eq!(
            keys(&sum.data_points[0].attributes),
            [
                ("instance_id", ""),
                ("source_id", "app-guid"),
                ("deployment", "cf")
            ]
        );
        // Upstream's vectors.
        assert_eq!(as_int(&mapped(&counter(1 << 63)).1), 0);
        assert_eq!(as_int(&mapped(&counter(u64::MAX)).1), i64::MAX);
        assert_eq!(as_int(&mapped(&counter(42)).1), 42);
    }

    #[test]
    fn a_gauge_is_one_metric_per_value_with_its_unit() {
        let e = envelope(
            Message::Gauge(V2Gauge {
                metrics: BTreeMap::from([
                    (
                        "memory".to_string(),
                        GaugeValue {
                            unit: "bytes".into(),
                            value: 123_456_789.0,
                        },
                    ),
                    (
                        "cpu".to_string(),
                        GaugeValue {
                            unit: "percentage".into(),
                            value: 0.5,
                        },
                    ),
                ]),
            }),
            &[("deployment", "cf")],
        );
        let (outcome, m) = mapped(&e);
        assert_eq!(outcome, Outcome::Mapped(2));
        let got: Vec<(&str, &str, f64)> = m
            .metrics
            .iter()
            .map(|metric| match &metric.data {
                Some(metric::Data::Gauge(g)) => match g.data_points[0].value {
                    Some(number_data_point::Value::AsDouble(v)) => {
                        assert_eq!(
                            keys(&g.data_points[0].attributes),
                            [
                                ("instance_id", ""),
                                ("source_id", "app-guid"),
                                ("deployment", "cf")
                            ]
                        );
                        (metric.name.as_str(), metric.unit.as_str(), v)
                    }
                    ref v => panic!("{v:?}"),
                },
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                ("cpu", "percentage", 0.5),
                ("memory", "bytes", 123_456_789.0)
            ]
        );
    }

    fn log(kind: log::Type) -> LogRecord {
        let e = envelope(
            Message::Log(Log {
                payload: b"err".to_vec(),
                r#type: kind as i32,
            }),
            &[("source_type", "APP/PROC/WEB")],
        );
        let (outcome, m) = mapped(&e);
        assert_eq!(outcome, Outcome::Mapped(1));
        assert_eq!(m.logs.len(), 1, "one ResourceLogs per record");
        assert!(m.logs[0].resource.is_none());
        m.logs[0].scope_logs[0].log_records[0].clone()
    }

    #[test]
    fn a_log_is_a_record_with_upstreams_severity() {
        let err = log(log::Type::Err);
        assert_eq!(err.severity_number, SeverityNumber::Error as i32);
        assert_eq!(err.severity_number, 17);
        assert_eq!(err.severity_text, "SEVERITY_NUMBER_ERROR");
        assert_eq!(err.body, Some(string("err".into())));
        assert_eq!(
            (err.time_unix_nano, err.observed_time_unix_nano),
            (1_765_024_201_000_000_000, 7)
        );
        assert_eq!(
            keys(&err.attributes),
            [
                ("instance_id", ""),
                ("source_id", "app-guid"),
                ("source_type", "APP/PROC/WEB")
            ]
        );
        let out = log(log::Type::Out);
        assert_eq!(
            (out.severity_number, out.severity_text.as_str()),
            (9, "SEVERITY_NUMBER_INFO")
        );
    }

    #[test]
    fn an_event_is_a_record_with_a_title_and_body_and_no_severity() {
        let e = envelope(
            Message::Event(Event {
                title: "t".into(),
                body: "b".into(),
            }),
            &[],
        );
        let (_, m) = mapped(&e);
        let r = &m.logs[0].scope_logs[0].log_records[0];
        assert_eq!((r.severity_number, r.severity_text.as_str()), (0, ""));
        let Some(AnyValue {
            value: Some(any_value::Value::KvlistValue(kv)),
        }) = &r.body
        else {
            panic!("{:?}", r.body)
        };
        assert_eq!(keys(&kv.values), [("title", "t"), ("body", "b")]);
    }

    fn timer(tags: &[(&str, &str)]) -> (Outcome, Mapped) {
        mapped(&envelope(
            Message::Timer(Timer {
                name: "http".into(),
                start: 10,
                stop: 20,
            }),
            tags,
        ))
    }

    const TRACE: (&str, &str) = ("trace_id", "0102030405060708090a0b0c0d0e0f10");
    const SPAN: (&str, &str) = ("span_id", "a1a2a3a4a5a6a7a8");

    #[test]
    fn a_timer_with_trace_tags_is_a_span_named_by_its_uri_path() {
        // Upstream's output: peer_type Server, uri https://x.example/path/a?q=1 → span
        // "/path/a", SPAN_KIND_SERVER, status {}.
        let (outcome, m) = timer(&[
            TRACE,
            SPAN,
            ("peer_type", "Server"),
            ("uri", "https://x.example/path/a?q=1"),
        ]);
        assert_eq!(outcome, Outcome::Mapped(1));
        let s = &m.spans[0].scope_spans[0].spans[0];
        assert_eq!(s.name, "/path/a");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.status, Some(Status::default()));
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 20));
        assert_eq!(s.trace_id, (1..=16).collect::<Vec<u8>>());
        assert_eq!(s.span_id, [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8]);
        // No trace_id / span_id attributes.
        assert_eq!(
            keys(&s.attributes),
            [
                ("instance_id", ""),
                ("source_id", "app-guid"),
                ("peer_type", "Server"),
                ("uri", "https://x.example/path/a?q=1")
            ]
        );
        // Without `uri`, or one that does not parse: the timer's name; not a server: internal.
        let (_, m) = timer(&[TRACE, SPAN]);
        let s = &m.spans[0].scope_spans[0].spans[0];
        assert_eq!(
            (s.name.as_str(), s.kind),
            ("http", span::SpanKind::Internal as i32)
        );
        let (_, m) = timer(&[TRACE, SPAN, ("uri", "/a%zz")]);
        assert_eq!(m.spans[0].scope_spans[0].spans[0].name, "http");
    }

    #[test]
    fn a_client_timer_or_one_without_valid_trace_tags_yields_nothing() {
        for tags in [
            vec![TRACE, SPAN, ("peer_type", "Client")],
            vec![TRACE],
            vec![SPAN],
            vec![("trace_id", "xyz0"), SPAN],
            vec![TRACE, ("span_id", "abc")],
        ] {
            let (outcome, m) = timer(&tags);
            assert_eq!(outcome, Outcome::Unmappable, "{tags:?}");
            assert!(m.is_empty());
        }
    }

    #[test]
    fn a_signal_turned_off_maps_nothing() {
        let mut out = Mapped::default();
        let off = Signals {
            logs: true,
            metrics: false,
            traces: true,
        };
        assert_eq!(map(counter(1), off, 0, &mut out), Outcome::SignalOff);
        assert!(out.is_empty());
    }

    #[test]
    fn uri_paths_as_gos_url_parse() {
        for (uri, path) in [
            ("https://x.example/path/a?q=1", Some("/path/a")),
            ("/path/b#frag", Some("/path/b")),
            ("https://x.example", Some("")),
            ("mailto:someone", Some("")),
            ("/a%20b", Some("/a b")),
            ("relative/path", Some("relative/path")),
            ("///triple", Some("///triple")),
            ("//host/p", Some("/p")),
            (":nope", None),
            ("a:b/c", Some("")),
            ("1a:b", None),
            ("/bad%zz", None),
            ("/ctl\u{7}", None),
        ] {
            assert_eq!(url_path(uri).as_deref(), path, "{uri}");
        }
    }
}
