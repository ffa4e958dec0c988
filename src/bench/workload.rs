//! The benchmark's fixed workload, pre-encoded so the load generator spends almost nothing per
//! envelope: 100-envelope batches, 70% logs with 200-byte payloads and 10% each counters, gauges
//! and timers, 100 source ids (each emitted by exactly one client stream, as one emitter process
//! would), 3 tags per envelope.

use std::collections::BTreeMap;

use prost::Message as _;

use crate::proto::envelope::Message;
use crate::proto::{Counter, Envelope, Gauge, GaugeValue, Log, Timer};

pub const BATCH: usize = 100;
pub const SOURCES: usize = 100;
/// Batch templates per stream (the sources' share of each batch rotates between them).
const TEMPLATES: usize = 4;
/// A placeholder timestamp whose varint takes the same 9 bytes as every real one this century.
const PLACEHOLDER_TS: i64 = 1 << 60;

/// The source id of source `i`: shaped like an application GUID.
pub fn source_id(i: usize) -> String {
    format!("{:08x}-be7c-4c4e-9a1b-{:012x}", 0xb0_0000 + i, i)
}

/// Envelope `n` of the workload's mix (`kind` 0-6 a log, 7 a counter, 8 a gauge, 9 a timer) from
/// source `source`.
pub fn envelope(kind: usize, source: usize, n: usize, extra_tags: &[(String, String)]) -> Envelope {
    let message = match kind {
        0..=6 => Message::Log(Log {
            payload: format!("{n:>8} GET /v2/apps 200 {}", "x".repeat(200)).as_bytes()[..200]
                .to_vec(),
            r#type: 0,
        }),
        7 => Message::Counter(Counter {
            name: "requests".into(),
            delta: 1,
            total: 0,
        }),
        8 => Message::Gauge(Gauge {
            metrics: BTreeMap::from([(
                "cpu".into(),
                GaugeValue {
                    unit: "percentage".into(),
                    value: 12.5,
                },
            )]),
        }),
        _ => Message::Timer(Timer {
            name: "http".into(),
            start: PLACEHOLDER_TS - 1_000_000,
            stop: PLACEHOLDER_TS,
        }),
    };
    let mut tags = BTreeMap::from([
        ("app_name".into(), format!("bench-app-{source}")),
        ("space_name".into(), "bench-space".into()),
        ("organization_name".into(), "bench-org".into()),
    ]);
    tags.extend(extra_tags.iter().cloned());
    Envelope {
        timestamp: PLACEHOLDER_TS,
        source_id: source_id(source),
        instance_id: (source % 4).to_string(),
        tags,
        message: Some(message),
        ..Default::default()
    }
}

/// An encoded `EnvelopeBatch` body with the offset of every envelope's 9-byte timestamp varint.
#[derive(Clone)]
pub struct Template {
    pub body: Vec<u8>,
    ts_at: Vec<usize>,
}

impl Template {
    /// The encoded batch of `envelopes` (each with a timestamp in 2^56..2^63, e.g. the
    /// workload's placeholder: every real one this century encodes to 9 bytes too).
    pub fn of(envelopes: impl IntoIterator<Item = Envelope>) -> Self {
        let mut body = Vec::with_capacity(BATCH * 400);
        let mut ts_at = Vec::with_capacity(BATCH);
        for e in envelopes {
            let e = e.encode_to_vec();
            debug_assert_eq!(e[0], 0x08, "timestamp first");
            body.push(0x0a);
            prost::encoding::encode_varint(e.len() as u64, &mut body);
            ts_at.push(body.len() + 1);
            body.extend_from_slice(&e);
        }
        Template { body, ts_at }
    }

    /// Envelopes in the batch.
    pub fn len(&self) -> usize {
        self.ts_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts_at.is_empty()
    }

    /// A copy with the envelopes stamped `base`, `base + 1`, … (`base` in 2^56..2^63, i.e. any
    /// Unix time in nanoseconds between 2002 and 2262).
    pub fn stamped(&self, base: i64) -> Vec<u8> {
        let mut body = self.body.clone();
        for (i, &at) in self.ts_at.iter().enumerate() {
            put_varint9(&mut body[at..at + 9], (base + i as i64) as u64);
        }
        body
    }
}

fn put_varint9(dst: &mut [u8], mut v: u64) {
    debug_assert!((1 << 56..1 << 63).contains(&v), "not a 9-byte varint");
    for (i, b) in dst.iter_mut().enumerate() {
        *b = (v & 0x7f) as u8 | if i < 8 { 0x80 } else { 0 };
        v >>= 7;
    }
}

/// The batch templates of client stream `stream` of `streams`: its sources are those with
/// `source % streams == stream`. `extra_tags` are added to every envelope (the identity tags an
/// agent would add, to send the workload straight to a sink as it looks behind an agent).
pub fn templates(stream: usize, streams: usize, extra_tags: &[(String, String)]) -> Vec<Template> {
    let mine: Vec<usize> = (0..SOURCES).filter(|s| s % streams == stream).collect();
    (0..TEMPLATES)
        .map(|t| {
            Template::of((0..BATCH).map(|i| {
                let source = mine[(t * BATCH + i) % mine.len()];
                envelope(i % 10, source, t * BATCH + i, extra_tags)
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::EnvelopeBatch;

    #[test]
    fn templates_decode_to_the_workload() {
        let all: Vec<Envelope> = (0..4)
            .flat_map(|s| templates(s, 4, &[]))
            .flat_map(|t| {
                EnvelopeBatch::decode(&t.stamped(1_800_000_000_000_000_000)[..])
                    .unwrap()
                    .batch
            })
            .collect();
        assert_eq!(all.len(), 4 * TEMPLATES * BATCH);
        let logs = all
            .iter()
            .filter(|e| matches!(&e.message, Some(Message::Log(l)) if l.payload.len() == 200))
            .count();
        assert_eq!(logs * 10, all.len() * 7);
        assert!(all.iter().all(|e| e.tags.len() == 3));
        let sources: std::collections::BTreeSet<_> = all.iter().map(|e| &e.source_id).collect();
        assert_eq!(sources.len(), SOURCES);
        let t = &templates(1, 4, &[("job".into(), "j".into())])[0];
        let b = EnvelopeBatch::decode(&t.stamped(1_800_000_000_000_000_000)[..]).unwrap();
        let ts: Vec<i64> = b.batch.iter().map(|e| e.timestamp).collect();
        assert_eq!(ts[0], 1_800_000_000_000_000_000);
        assert_eq!(ts[99], 1_800_000_000_000_000_099);
        assert!(b
            .batch
            .iter()
            .all(|e| e.tags.len() == 4 && e.tags["job"] == "j"));
    }
}
