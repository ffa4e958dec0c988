//! An envelope's fields as the destinations' formatters read them (the syslog formatter, the
//! OTLP writer), borrowed: from a decoded envelope ([`Fields::of`]) or in place from its bytes
//! ([`fields_in_place`], which allocates nothing per field once `Parsed`'s vectors have grown).

use super::view::{sort_last_wins, MessageRef, Parsed, Span};
use crate::proto::envelope::Message;
use crate::proto::Envelope;

/// An envelope's fields, borrowed.
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

    pub fn tag(&self, key: &str) -> Option<&'a str> {
        self.tags
            .binary_search_by(|(k, _)| (*k).cmp(key))
            .ok()
            .map(|i| self.tags[i].1)
    }
}

/// The fields of `envelope` read in place; `None` when the reader hands it to prost.
pub fn fields_in_place<'a>(envelope: &'a [u8], parsed: &mut Parsed) -> Option<Fields<'a>> {
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
