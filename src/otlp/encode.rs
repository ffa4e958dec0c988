//! The OTLP writer: an envelope's fields, read in place ([`crate::envelope::fields`]), written
//! straight into the protobuf bytes of an export request, with no message structs in between
//! and no allocation per item once the buffers have grown. The rules are [`super::mapping`]'s;
//! a property test checks that the bytes decode to what the struct model maps.
//!
//! Layouts (`otlp.attributes`):
//! - [`Layout::Upstream`] (the default), upstream's: every log record and span in a
//!   `ResourceLogs` / `ResourceSpans` of its own, the metrics of an export in one
//!   `ResourceMetrics`, nothing on the resources;
//! - [`Layout::Semconv`]: the Cloud Foundry identity (source and instance ids and the app, org,
//!   space and process tags) on the Resource under the semantic conventions' names
//!   ([`SEMCONV_TAGS`]), one resource per identity in each batch, the other tags per item.

use std::collections::HashMap;

use prost::bytes::Bytes;

use super::mapping::{hex, url_path, Outcome, Signals, EXCLUDED_TAGS};
use crate::envelope::fields::{Body, Fields};

/// Where the Cloud Foundry identity goes (`otlp.attributes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Per item, as upstream: `instance_id`, `source_id`, then the tags.
    #[default]
    Upstream,
    /// On the Resource, under the semantic conventions' names.
    Semconv,
}

/// The tags that become resource attributes in [`Layout::Semconv`], and their names there
/// (open-telemetry/semantic-conventions, `model/cloudfoundry`). The envelope's `source_id` is
/// `cloudfoundry.system.id` and its `instance_id` `cloudfoundry.system.instance.id`; for an
/// app's envelope (one with an `app_id` tag) the instance id is also the app instance's index,
/// `cloudfoundry.app.instance.id`.
pub const SEMCONV_TAGS: [(&str, &str); 8] = [
    ("app_id", "cloudfoundry.app.id"),
    ("app_name", "cloudfoundry.app.name"),
    ("organization_id", "cloudfoundry.org.id"),
    ("organization_name", "cloudfoundry.org.name"),
    ("process_id", "cloudfoundry.process.id"),
    ("process_type", "cloudfoundry.process.type"),
    ("space_id", "cloudfoundry.space.id"),
    ("space_name", "cloudfoundry.space.name"),
];

/// The signal an envelope's message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Logs = 0,
    Metrics = 1,
    Traces = 2,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::Logs, Signal::Metrics, Signal::Traces];

    pub fn of(body: &Body) -> Signal {
        match body {
            Body::Log { .. } | Body::Event { .. } => Signal::Logs,
            Body::Counter { .. } | Body::Gauge(_) => Signal::Metrics,
            Body::Timer { .. } => Signal::Traces,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
        }
    }

    fn on(self, signals: Signals) -> bool {
        match self {
            Signal::Logs => signals.logs,
            Signal::Metrics => signals.metrics,
            Signal::Traces => signals.traces,
        }
    }
}

// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// Room kept in front of an upstream-layout metrics body for the two headers that wrap it
/// (two keys and two lengths of at most five bytes).
const HEADROOM: usize = 12;

fn key(field: u8, wire: u8) -> u8 {
    field << 3 | wire
}

fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field of `len` bytes: its key and length, then (the caller's) body.
fn put_len(out: &mut Vec<u8>, field: u8, len: usize) {
    out.push(key(field, LEN));
    put_varint(out, len as u64);
}

/// The bytes a length-delimited field of `len` bytes takes.
fn len_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn put_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
    put_len(out, field, b.len());
    out.extend_from_slice(b);
}

/// A proto3 string or bytes field: left out when empty.
fn put_opt_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
    if !b.is_empty() {
        put_bytes(out, field, b);
    }
}

fn opt_bytes_len(b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        len_field(b.len())
    }
}

fn put_fixed64(out: &mut Vec<u8>, field: u8, v: u64) {
    out.push(key(field, FIXED64));
    out.extend_from_slice(&v.to_le_bytes());
}

/// A proto3 fixed64 field: left out when zero.
fn put_opt_fixed64(out: &mut Vec<u8>, field: u8, v: u64) {
    if v != 0 {
        put_fixed64(out, field, v);
    }
}

/// `AnyValue{string_value}`'s body (a oneof member: written even when empty).
fn string_value_len(v: &[u8]) -> usize {
    len_field(v.len())
}

/// `KeyValue{key, value: AnyValue{string_value}}`'s body.
fn key_value_len(k: &[u8], v: &[u8]) -> usize {
    opt_bytes_len(k) + len_field(string_value_len(v))
}

/// A `KeyValue` with a string value, as field `field` of its container.
fn put_key_value(out: &mut Vec<u8>, field: u8, k: &[u8], v: &[u8]) {
    put_len(out, field, key_value_len(k, v));
    put_opt_bytes(out, 1, k);
    put_len(out, 2, string_value_len(v));
    put_bytes(out, 1, v);
}

/// One signal's export request being written: its items as protobuf, by resource.
#[derive(Debug, Default)]
pub struct Batch {
    /// Upstream layout: the request's body (logs and spans: whole `ResourceLogs` /
    /// `ResourceSpans` entries; metrics: [`HEADROOM`], then the one scope's `Metric` entries).
    body: Vec<u8>,
    /// Semconv layout: each resource (its `Resource` message's body) and its scope's items, in
    /// the order the resources first came.
    groups: Vec<(Vec<u8>, Vec<u8>)>,
    index: HashMap<Vec<u8>, usize>,
    items: usize,
}

impl Batch {
    /// Items written: log records, metrics (a gauge's values are one each) or spans.
    pub fn items(&self) -> usize {
        self.items
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// Bytes written so far: about the size of the request [`Batch::finish`] makes.
    pub fn len(&self) -> usize {
        self.body.len()
            + self
                .groups
                .iter()
                .map(|(r, items)| r.len() + items.len() + 16)
                .sum::<usize>()
    }

    /// The export request: `Export{Logs,Metrics,Trace}ServiceRequest`'s bytes.
    pub fn finish(self, signal: Signal) -> Bytes {
        if !self.groups.is_empty() {
            let mut out = Vec::with_capacity(
                self.groups
                    .iter()
                    .map(|(r, items)| len_field(len_field(r.len()) + len_field(items.len())))
                    .sum(),
            );
            // Resource{resource, scope: {items}}: the items are the scope's fields already.
            for (resource, items) in &self.groups {
                put_len(
                    &mut out,
                    1,
                    len_field(resource.len()) + len_field(items.len()),
                );
                put_bytes(&mut out, 1, resource);
                put_bytes(&mut out, 2, items);
            }
            return out.into();
        }
        if signal != Signal::Metrics || self.body.is_empty() {
            return self.body.into();
        }
        // ExportMetricsServiceRequest{resource_metrics: [{scope_metrics: [{metrics}]}]}, the
        // headers written into the room kept in front.
        let metrics = self.body.len() - HEADROOM;
        let mut header = Vec::with_capacity(HEADROOM);
        put_len(&mut header, 1, len_field(metrics));
        put_len(&mut header, 2, metrics);
        let start = HEADROOM - header.len();
        let mut body = self.body;
        body[start..HEADROOM].copy_from_slice(&header);
        Bytes::from(body).slice(start..)
    }
}

/// Writes envelopes into [`Batch`]es, reusing its buffers from envelope to envelope.
#[derive(Debug, Default)]
pub struct Writer {
    layout: Layout,
    signals: Signals,
    /// The envelope's attributes, written once as the fields of their container.
    attributes: Vec<u8>,
    /// The item being written.
    item: Vec<u8>,
    /// Semconv: the envelope's resource.
    resource: Vec<u8>,
}

impl Writer {
    pub fn new(layout: Layout, signals: Signals) -> Self {
        Self {
            layout,
            signals,
            ..Default::default()
        }
    }

    /// Writes `f` into `out`, the batch of its signal ([`Signal::of`]); `now_ns` is the observed
    /// time of log records.
    pub fn write(&mut self, f: &Fields, now_ns: u64, out: &mut Batch) -> Outcome {
        let signal = Signal::of(&f.body);
        if !signal.on(self.signals) {
            return Outcome::SignalOff;
        }
        let time = f.timestamp as u64;
        let n = match &f.body {
            Body::Counter { name, total, .. } => {
                self.attributes(f, 7);
                let point = self.attributes.len()
                    + opt_fixed64_len(time)
                    + 9 /* as_int */;
                let item = &mut self.item;
                item.clear();
                put_opt_bytes(item, 1, name.as_bytes());
                // Sum{data_points, CUMULATIVE, monotonic}.
                put_len(item, 7, len_field(point) + 4);
                put_len(item, 1, point);
                item.extend_from_slice(&self.attributes);
                put_opt_fixed64(item, 3, time);
                put_fixed64(item, 6, total & 0x7FFF_FFFF_FFFF_FFFF);
                item.extend_from_slice(&[key(2, VARINT), 2, key(3, VARINT), 1]);
                self.place(signal, out);
                1
            }
            Body::Gauge(values) => {
                self.attributes(f, 7);
                let point = self.attributes.len() + opt_fixed64_len(time) + 9 /* as_double */;
                for (name, value, unit) in values {
                    let item = &mut self.item;
                    item.clear();
                    put_opt_bytes(item, 1, name.as_bytes());
                    put_opt_bytes(item, 3, unit.as_bytes());
                    // Gauge{data_points}.
                    put_len(item, 5, len_field(point));
                    put_len(item, 1, point);
                    item.extend_from_slice(&self.attributes);
                    put_opt_fixed64(item, 3, time);
                    put_fixed64(item, 4, value.to_bits());
                    self.place(signal, out);
                }
                values.len()
            }
            Body::Timer { name, start, stop } => {
                let tag = |k: &str| f.tag(k).unwrap_or("");
                if tag("peer_type") == "Client" {
                    return Outcome::Unmappable;
                }
                let (Some(span_id), Some(trace_id)) = (hex(tag("span_id")), hex(tag("trace_id")))
                else {
                    return Outcome::Unmappable;
                };
                let path = f.tag("uri").and_then(url_path);
                let name = path.as_deref().unwrap_or(name);
                let kind = if tag("peer_type") == "Server" { 2 } else { 1 };
                self.attributes(f, 9);
                let item = &mut self.item;
                item.clear();
                put_bytes(item, 1, &trace_id);
                put_bytes(item, 2, &span_id);
                put_opt_bytes(item, 5, name.as_bytes());
                item.extend_from_slice(&[key(6, VARINT), kind]);
                put_opt_fixed64(item, 7, *start as u64);
                put_opt_fixed64(item, 8, *stop as u64);
                item.extend_from_slice(&self.attributes);
                // status: {code: UNSET}, present and empty.
                item.extend_from_slice(&[key(15, LEN), 0]);
                self.place(signal, out);
                1
            }
            Body::Log { payload, r#type } => {
                let (number, text): (u8, &[u8]) = match r#type {
                    0 => (9, b"SEVERITY_NUMBER_INFO"),
                    1 => (17, b"SEVERITY_NUMBER_ERROR"),
                    _ => (0, b"SEVERITY_NUMBER_UNSPECIFIED"),
                };
                // Invalid UTF-8 is replaced (upstream's marshaller would fail the whole export).
                let replaced;
                let body = match std::str::from_utf8(payload) {
                    Ok(_) => payload,
                    Err(_) => {
                        replaced = String::from_utf8_lossy(payload).into_owned();
                        replaced.as_bytes()
                    }
                };
                self.attributes(f, 6);
                let item = &mut self.item;
                item.clear();
                put_opt_fixed64(item, 1, time);
                if number != 0 {
                    item.extend_from_slice(&[key(2, VARINT), number]);
                }
                put_bytes(item, 3, text);
                put_len(item, 5, string_value_len(body));
                put_bytes(item, 1, body);
                item.extend_from_slice(&self.attributes);
                put_opt_fixed64(item, 11, now_ns);
                self.place(signal, out);
                1
            }
            Body::Event { title, body } => {
                self.attributes(f, 6);
                let (title, body) = (title.as_bytes(), body.as_bytes());
                let list = len_field(key_value_len(b"title", title))
                    + len_field(key_value_len(b"body", body));
                let item = &mut self.item;
                item.clear();
                put_opt_fixed64(item, 1, time);
                // body: AnyValue{kvlist_value: {values: [title, body]}}.
                put_len(item, 5, len_field(list));
                put_len(item, 6, list);
                put_key_value(item, 1, b"title", title);
                put_key_value(item, 1, b"body", body);
                item.extend_from_slice(&self.attributes);
                put_opt_fixed64(item, 11, now_ns);
                self.place(signal, out);
                1
            }
        };
        out.items += n;
        Outcome::Mapped(n)
    }

    /// The envelope's per-item attributes as fields `field` of their container, and in the
    /// semconv layout its resource.
    fn attributes(&mut self, f: &Fields, field: u8) {
        let a = &mut self.attributes;
        a.clear();
        let semconv = self.layout == Layout::Semconv;
        if semconv {
            let r = &mut self.resource;
            r.clear();
            put_key_value(r, 1, b"cloudfoundry.system.id", f.source_id.as_bytes());
            let instance = f.instance_id.as_bytes();
            put_key_value(r, 1, b"cloudfoundry.system.instance.id", instance);
            if f.tag("app_id").is_some() {
                put_key_value(r, 1, b"cloudfoundry.app.instance.id", instance);
            }
            for (tag, name) in SEMCONV_TAGS {
                if let Some(v) = f.tag(tag) {
                    put_key_value(r, 1, name.as_bytes(), v.as_bytes());
                }
            }
        } else {
            put_key_value(a, field, b"instance_id", f.instance_id.as_bytes());
            put_key_value(a, field, b"source_id", f.source_id.as_bytes());
        }
        for (k, v) in &f.tags {
            if EXCLUDED_TAGS.contains(k)
                || (semconv && SEMCONV_TAGS.iter().any(|(tag, _)| tag == k))
            {
                continue;
            }
            put_key_value(a, field, k.as_bytes(), v.as_bytes());
        }
    }

    /// Appends the item just written to `out`, as its layout places it.
    fn place(&mut self, signal: Signal, out: &mut Batch) {
        let item = &self.item;
        if self.layout == Layout::Semconv {
            let i = match out.index.get(self.resource.as_slice()) {
                Some(&i) => i,
                None => {
                    out.groups.push((self.resource.clone(), Vec::new()));
                    out.index
                        .insert(self.resource.clone(), out.groups.len() - 1);
                    out.groups.len() - 1
                }
            };
            put_bytes(&mut out.groups[i].1, 2, item);
            return;
        }
        let body = &mut out.body;
        match signal {
            Signal::Metrics => {
                if body.is_empty() {
                    body.resize(HEADROOM, 0);
                }
                put_bytes(body, 2, item);
            }
            // Resource{scope: {items: [item]}}, one per item.
            Signal::Logs | Signal::Traces => {
                let scope = len_field(item.len());
                put_len(body, 1, len_field(scope));
                put_len(body, 2, scope);
                put_bytes(body, 2, item);
            }
        }
    }
}

fn opt_fixed64_len(v: u64) -> usize {
    if v == 0 {
        0
    } else {
        9
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;
    use crate::envelope::fields::fields_in_place;
    use crate::envelope::view::Parsed;
    use crate::otlp::mapping::{map, Mapped};
    use crate::otlp_proto::collector::logs::v1::ExportLogsServiceRequest;
    use crate::otlp_proto::collector::metrics::v1::ExportMetricsServiceRequest;
    use crate::otlp_proto::collector::trace::v1::ExportTraceServiceRequest;
    use crate::otlp_proto::common::v1::{any_value, KeyValue};
    use crate::proto::envelope::Message;
    use crate::proto::{Counter, Envelope, Log};

    /// Writes `envelopes` as the agent does (read in place from their bytes, or through prost
    /// with `decoded`), returning each signal's finished request.
    fn written(envelopes: &[Envelope], layout: Layout, decoded: bool) -> [Bytes; 3] {
        let mut writer = Writer::new(layout, Signals::default());
        let mut batches: [Batch; 3] = Default::default();
        let mut parsed = Parsed::default();
        for e in envelopes {
            let bytes = e.encode_to_vec();
            let through_prost = Envelope::decode(&bytes[..]).unwrap();
            let fields = if decoded {
                Fields::of(&through_prost)
            } else {
                fields_in_place(&bytes, &mut parsed)
            };
            let Some(f) = fields else { continue };
            let s = Signal::of(&f.body);
            writer.write(&f, 7, &mut batches[s as usize]);
        }
        let [logs, metrics, traces] = batches;
        [
            logs.finish(Signal::Logs),
            metrics.finish(Signal::Metrics),
            traces.finish(Signal::Traces),
        ]
    }

    /// A tag strategy that sometimes gives a timer what it needs to be a span.
    fn any_tags() -> impl Strategy<Value = BTreeMap<String, String>> {
        let special = prop_oneof![
            Just(("trace_id".to_string(), "0a1b".to_string())),
            Just(("span_id".to_string(), "ff00ee".to_string())),
            Just(("trace_id".to_string(), "zz".to_string())),
            Just(("peer_type".to_string(), "Client".to_string())),
            Just(("peer_type".to_string(), "Server".to_string())),
            Just(("uri".to_string(), "http://h/p%20q?x".to_string())),
            Just(("metron".to_string(), "s1".to_string())),
            Just(("__v1_type".to_string(), "LogMessage".to_string())),
            Just(("app_id".to_string(), "guid".to_string())),
            Just(("space_name".to_string(), "dev".to_string())),
            (".{0,4}", ".{0,4}"),
        ];
        prop::collection::vec(special, 0..8).prop_map(|v| v.into_iter().collect())
    }

    fn any_envelope() -> impl Strategy<Value = Envelope> {
        // Long strings too, whose lengths take more than one byte.
        let long = prop_oneof![3 => ".{0,4}", 1 => "[a-z\u{e9}]{100,300}"];
        let many_values =
            prop::collection::btree_map("[a-z]{1,3}", any::<f64>(), 0..40).prop_map(|m| {
                Some(Message::Gauge(crate::proto::Gauge {
                    metrics: m
                        .into_iter()
                        .map(|(k, value)| {
                            let unit = "ms".to_string();
                            (k, crate::proto::GaugeValue { unit, value })
                        })
                        .collect(),
                }))
            });
        let message = prop_oneof![
            4 => crate::envelope::signing::tests::any_message(),
            1 => many_values,
        ];
        (any::<i64>(), long.clone(), long, any_tags(), message).prop_map(
            |(timestamp, source_id, instance_id, tags, message)| Envelope {
                timestamp,
                source_id,
                instance_id,
                tags,
                message,
                ..Default::default()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// The bytes written decode to exactly what the struct model (checked against
        /// upstream's output in `mapping`) maps, read in place or decoded alike.
        #[test]
        fn the_bytes_are_the_models_export_requests(
            envelopes in prop::collection::vec(any_envelope(), 0..6),
            decoded in any::<bool>(),
        ) {
            let mut model = Mapped::default();
            for e in &envelopes {
                // As the agent sees it: through its bytes (a -0.0 gauge value, say, is 0.0).
                let e = Envelope::decode(&e.encode_to_vec()[..]).unwrap();
                map(e, Signals::default(), 7, &mut model);
            }
            let [logs, metrics, traces] = written(&envelopes, Layout::Upstream, decoded);
            // Decoded and encoded again, the bytes are the model's; and they are exactly as
            // long as the model's encoding (no stray bytes a decoder would skip).
            let model_logs = model.take_logs().encode_to_vec();
            prop_assert_eq!(
                ExportLogsServiceRequest::decode(&logs[..]).unwrap().encode_to_vec(),
                model_logs.clone()
            );
            prop_assert_eq!(logs.len(), model_logs.len());
            let model_spans = model.take_spans().encode_to_vec();
            prop_assert_eq!(
                ExportTraceServiceRequest::decode(&traces[..]).unwrap().encode_to_vec(),
                model_spans.clone()
            );
            prop_assert_eq!(traces.len(), model_spans.len());
            let model_metrics = if model.metrics.is_empty() {
                Vec::new()
            } else {
                model.take_metrics().encode_to_vec()
            };
            prop_assert_eq!(
                ExportMetricsServiceRequest::decode(&metrics[..]).unwrap().encode_to_vec(),
                model_metrics.clone()
            );
            prop_assert_eq!(metrics.len(), model_metrics.len());
        }
    }

    /// Every item's attributes with its resource's mapped back to the tags they came from
    /// (sorted, as a multiset over the items), and whether each resource came once.
    fn items_back(requests: &[Bytes; 3]) -> (Vec<Vec<(String, String)>>, bool) {
        use crate::otlp_proto::common::v1::KeyValue as Kv;
        use crate::otlp_proto::metrics::v1::metric::Data;
        let pair = |kv: &Kv| {
            let (k, v) = strings(std::slice::from_ref(kv))[0];
            (k.to_string(), v.to_string())
        };
        let back = |resource: Option<&crate::otlp_proto::resource::v1::Resource>, item: &[Kv]| {
            let mut out: Vec<(String, String)> = Vec::new();
            for kv in resource.map_or(&[][..], |r| &r.attributes) {
                let (k, v) = pair(kv);
                let tag = match k.as_str() {
                    "cloudfoundry.system.id" => "source_id",
                    "cloudfoundry.system.instance.id" => "instance_id",
                    "cloudfoundry.app.instance.id" => continue,
                    other => {
                        SEMCONV_TAGS
                            .iter()
                            .find(|(_, n)| *n == other)
                            .expect("known")
                            .0
                    }
                };
                out.push((tag.to_string(), v));
            }
            out.extend(item.iter().map(pair));
            out.sort();
            out
        };
        let (mut items, mut unique) = (Vec::new(), true);
        let mut once = |resources: Vec<Option<Vec<u8>>>| {
            let n = resources.len();
            let set: std::collections::HashSet<_> = resources.into_iter().collect();
            unique &= set.len() == n;
        };
        let logs = ExportLogsServiceRequest::decode(&requests[0][..]).unwrap();
        once(
            logs.resource_logs
                .iter()
                .map(|r| r.resource.as_ref().map(|x| x.encode_to_vec()))
                .collect(),
        );
        for r in &logs.resource_logs {
            for l in r.scope_logs.iter().flat_map(|s| &s.log_records) {
                items.push(back(r.resource.as_ref(), &l.attributes));
            }
        }
        let metrics = ExportMetricsServiceRequest::decode(&requests[1][..]).unwrap();
        once(
            metrics
                .resource_metrics
                .iter()
                .map(|r| r.resource.as_ref().map(|x| x.encode_to_vec()))
                .collect(),
        );
        for r in &metrics.resource_metrics {
            for m in r.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let points = match &m.data {
                    Some(Data::Sum(s)) => &s.data_points,
                    Some(Data::Gauge(g)) => &g.data_points,
                    other => panic!("{other:?}"),
                };
                for p in points {
                    items.push(back(r.resource.as_ref(), &p.attributes));
                }
            }
        }
        let traces = ExportTraceServiceRequest::decode(&requests[2][..]).unwrap();
        once(
            traces
                .resource_spans
                .iter()
                .map(|r| r.resource.as_ref().map(|x| x.encode_to_vec()))
                .collect(),
        );
        for r in &traces.resource_spans {
            for s in r.scope_spans.iter().flat_map(|s| &s.spans) {
                items.push(back(r.resource.as_ref(), &s.attributes));
            }
        }
        items.sort();
        (items, unique)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The semconv layout carries the same attributes as upstream's, each item's split
        /// between its resource and itself, one resource per identity in a batch.
        #[test]
        fn semconv_is_upstreams_attributes_regrouped(
            envelopes in prop::collection::vec(any_envelope(), 0..8),
        ) {
            let (upstream, _) = items_back(&written(&envelopes, Layout::Upstream, false));
            let (semconv, unique) = items_back(&written(&envelopes, Layout::Semconv, false));
            prop_assert_eq!(semconv, upstream);
            prop_assert!(unique, "a resource twice in one batch");
        }
    }

    fn strings(attributes: &[KeyValue]) -> Vec<(&str, &str)> {
        attributes
            .iter()
            .map(
                |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => (kv.key.as_str(), s.as_str()),
                    other => panic!("{} is not a string: {other:?}", kv.key),
                },
            )
            .collect()
    }

    fn app_log(source: &str, instance: &str, text: &str) -> Envelope {
        Envelope {
            timestamp: 1,
            source_id: source.into(),
            instance_id: instance.into(),
            tags: [
                ("app_id", source),
                ("app_name", "shop"),
                ("organization_name", "acme"),
                ("space_id", "s-guid"),
                ("process_type", "web"),
                ("process_instance_id", "p-1"),
                ("metron", "seq"),
                ("deployment", "cf"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            message: Some(Message::Log(Log {
                payload: text.as_bytes().to_vec(),
                r#type: 0,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn semconv_puts_the_cloud_foundry_identity_on_the_resource() {
        let envelopes = [
            app_log("app-1", "0", "a"),
            app_log("app-1", "0", "b"),
            app_log("app-2", "3", "c"),
        ];
        for decoded in [false, true] {
            let [logs, _, _] = written(&envelopes, Layout::Semconv, decoded);
            let r = ExportLogsServiceRequest::decode(&logs[..]).unwrap();
            // One resource per identity, its records together.
            assert_eq!(r.resource_logs.len(), 2);
            let first = &r.resource_logs[0];
            assert_eq!(
                strings(&first.resource.as_ref().unwrap().attributes),
                [
                    ("cloudfoundry.system.id", "app-1"),
                    ("cloudfoundry.system.instance.id", "0"),
                    ("cloudfoundry.app.instance.id", "0"),
                    ("cloudfoundry.app.id", "app-1"),
                    ("cloudfoundry.app.name", "shop"),
                    ("cloudfoundry.org.name", "acme"),
                    ("cloudfoundry.process.type", "web"),
                    ("cloudfoundry.space.id", "s-guid"),
                ]
            );
            let records = &first.scope_logs[0].log_records;
            assert_eq!(records.len(), 2);
            // The other tags stay on the record; the metron tag nowhere.
            assert_eq!(
                strings(&records[1].attributes),
                [("deployment", "cf"), ("process_instance_id", "p-1")]
            );
            let second = &r.resource_logs[1];
            assert_eq!(second.scope_logs[0].log_records.len(), 1);
            assert_eq!(
                strings(&second.resource.as_ref().unwrap().attributes)[..3],
                [
                    ("cloudfoundry.system.id", "app-2"),
                    ("cloudfoundry.system.instance.id", "3"),
                    ("cloudfoundry.app.instance.id", "3"),
                ]
            );
        }
    }

    #[test]
    fn semconv_gives_a_platform_component_its_system_ids_only() {
        let counter = Envelope {
            timestamp: 5,
            source_id: "cf/gorouter".into(),
            instance_id: "vm-guid".into(),
            tags: [("job".to_string(), "router".to_string())].into(),
            message: Some(Message::Counter(Counter {
                name: "requests".into(),
                delta: 1,
                total: 9,
            })),
            ..Default::default()
        };
        let [_, metrics, _] = written(&[counter.clone(), counter], Layout::Semconv, false);
        let r = ExportMetricsServiceRequest::decode(&metrics[..]).unwrap();
        assert_eq!(r.resource_metrics.len(), 1);
        let rm = &r.resource_metrics[0];
        assert_eq!(
            strings(&rm.resource.as_ref().unwrap().attributes),
            [
                ("cloudfoundry.system.id", "cf/gorouter"),
                ("cloudfoundry.system.instance.id", "vm-guid"),
            ]
        );
        let metrics = &rm.scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 2);
        let Some(crate::otlp_proto::metrics::v1::metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("not a sum: {:?}", metrics[0]);
        };
        assert_eq!(strings(&sum.data_points[0].attributes), [("job", "router")]);
    }
}
