//! The upstream agent's ingress rules, exactly: origin → source_id, tag merging, counter totals.
//! See `../shared/reference/upstream-agent.md` ("Ingress processing, in order").

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use crate::proto::{envelope::Message, value::Data, Envelope, Value};

/// What processing one envelope did, for the `origin_mappings` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    pub origin_mapped: bool,
}

/// Applies the ingress rules in upstream's order. Owns the counter-total table, so exactly one
/// `Tagger` must see every envelope (it lives inside the ingress actor).
#[derive(Debug)]
pub struct Tagger {
    default_tags: Vec<(String, String)>,
    totals: CounterTotals,
}

impl Tagger {
    pub fn new(default_tags: &BTreeMap<String, String>, max_counter_keys: usize) -> Self {
        Self {
            default_tags: default_tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            totals: CounterTotals::new(max_counter_keys),
        }
    }

    pub fn process(&mut self, env: &mut Envelope) -> Processed {
        let origin_mapped = map_origin(env);
        copy_deprecated_tags(env);
        for (k, v) in &self.default_tags {
            if !env.tags.contains_key(k) {
                env.tags.insert(k.clone(), v.clone());
            }
        }
        self.totals.apply(env);
        Processed { origin_mapped }
    }

    /// Replaces the default tags (a reload); the counter totals are kept.
    pub fn set_default_tags(&mut self, default_tags: &BTreeMap<String, String>) {
        self.default_tags = default_tags
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }

    /// Number of default tags.
    pub fn default_tags(&self) -> usize {
        self.default_tags.len()
    }

    /// Number of counter keys currently tracked (for tests and the bound's metric).
    pub fn counter_keys(&self) -> usize {
        self.totals.table.len()
    }
}

/// Rule 1: an empty source_id is taken from `tags["origin"]`, else `deprecated_tags["origin"]`.
fn map_origin(env: &mut Envelope) -> bool {
    if !env.source_id.is_empty() {
        return false;
    }
    if let Some(origin) = env.tags.get("origin") {
        env.source_id = origin.clone();
        return true;
    }
    if let Some(origin) = env.deprecated_tags.get("origin") {
        // Upstream takes `GetText()`: a non-text origin maps to "".
        env.source_id = match &origin.data {
            Some(Data::Text(s)) => s.clone(),
            _ => String::new(),
        };
        return true;
    }
    false
}

/// Rule 2: every deprecated tag is copied into `tags`, the deprecated value winning a clash.
/// Upstream leaves `deprecated_tags` on the envelope too, and so do we.
fn copy_deprecated_tags(env: &mut Envelope) {
    for (k, v) in &env.deprecated_tags {
        env.tags.insert(k.clone(), value_to_tag(v));
    }
}

/// A deprecated tag's value as upstream renders it: text as is, integers in base 10, decimals in
/// the shortest plain decimal form (Go's `strconv.FormatFloat(f, 'f', -1, 64)`), unset as "".
pub fn value_to_tag(v: &Value) -> String {
    match &v.data {
        Some(Data::Text(s)) => s.clone(),
        Some(Data::Integer(i)) => i.to_string(),
        Some(Data::Decimal(d)) => format_decimal(*d),
        None => String::new(),
    }
}

/// The length of [`value_to_tag`]'s result, without allocating for the common cases.
pub fn rendered_len(v: &Value) -> usize {
    match &v.data {
        Some(Data::Text(s)) => s.len(),
        Some(Data::Integer(i)) => {
            let digits = i
                .unsigned_abs()
                .checked_ilog10()
                .map_or(1, |d| d as usize + 1);
            digits + usize::from(*i < 0)
        }
        Some(Data::Decimal(d)) => format_decimal(*d).len(),
        None => 0,
    }
}

/// Rust's `Display` for f64 is already shortest-round-trip and never uses an exponent, like Go's
/// 'f' format with precision -1; only the non-finite spellings differ.
pub fn format_decimal(d: f64) -> String {
    if d.is_nan() {
        "NaN".into()
    } else if d == f64::INFINITY {
        "+Inf".into()
    } else if d == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        d.to_string()
    }
}

/// Rule 3: running counter totals keyed by (name, source_id, all tags), bounded like upstream:
/// the table is cleared when it would exceed `max_keys`.
#[derive(Debug)]
struct CounterTotals {
    max_keys: usize,
    table: HashMap<u128, u64>,
}

impl CounterTotals {
    fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            table: HashMap::new(),
        }
    }

    fn apply(&mut self, env: &mut Envelope) {
        let Some(Message::Counter(counter)) = &env.message else {
            return;
        };
        let key = counter_key(&counter.name, &env.source_id, &env.tags);
        if !self.table.contains_key(&key) && self.table.len() >= self.max_keys {
            self.table.clear();
        }
        let running = self.table.entry(key).or_insert(0);
        let Some(Message::Counter(counter)) = &mut env.message else {
            unreachable!("checked above");
        };
        if counter.total == 0 && counter.delta != 0 {
            *running = running.wrapping_add(counter.delta);
        } else {
            *running = counter.total;
        }
        counter.total = *running;
    }
}

/// The counter's identity as a 128-bit key, without keeping the strings themselves.
fn counter_key(name: &str, source_id: &str, tags: &BTreeMap<String, String>) -> u128 {
    super::key128(|h| {
        name.hash(h);
        source_id.hash(h);
        tags.hash(h);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Counter, Log};
    use proptest::prelude::*;

    fn tagger() -> Tagger {
        let mut d = BTreeMap::new();
        d.insert("deployment".to_string(), "cf".to_string());
        d.insert("job".to_string(), "diego".to_string());
        Tagger::new(&d, 10_000)
    }

    fn counter(name: &str, delta: u64, total: u64) -> Envelope {
        Envelope {
            source_id: "s".into(),
            message: Some(Message::Counter(Counter {
                name: name.into(),
                delta,
                total,
            })),
            ..Default::default()
        }
    }

    fn total_of(e: &Envelope) -> u64 {
        match &e.message {
            Some(Message::Counter(c)) => c.total,
            _ => panic!("not a counter"),
        }
    }

    #[test]
    fn origin_from_tags_then_deprecated_tags() {
        let mut t = tagger();
        let mut e = Envelope::default();
        e.tags.insert("origin".into(), "rep".into());
        e.deprecated_tags.insert(
            "origin".into(),
            Value {
                data: Some(Data::Text("old".into())),
            },
        );
        assert!(t.process(&mut e).origin_mapped);
        assert_eq!(e.source_id, "rep");
        // the deprecated value then wins the tag clash
        assert_eq!(e.tags["origin"], "old");

        let mut e = Envelope::default();
        e.deprecated_tags.insert(
            "origin".into(),
            Value {
                data: Some(Data::Text("old".into())),
            },
        );
        assert!(t.process(&mut e).origin_mapped);
        assert_eq!(e.source_id, "old");

        let mut e = Envelope {
            source_id: "app".into(),
            ..Default::default()
        };
        e.tags.insert("origin".into(), "rep".into());
        assert!(!t.process(&mut e).origin_mapped);
        assert_eq!(e.source_id, "app");

        let mut e = Envelope::default();
        assert!(!t.process(&mut e).origin_mapped);
        assert_eq!(e.source_id, "");
    }

    #[test]
    fn deprecated_values_are_rendered_like_go() {
        for (v, want) in [
            (Data::Integer(-42), "-42"),
            (Data::Decimal(0.23), "0.23"),
            (Data::Decimal(1e21), "1000000000000000000000"),
            (Data::Decimal(2.0), "2"),
            (Data::Decimal(f64::INFINITY), "+Inf"),
            (Data::Text("x y".into()), "x y"),
        ] {
            assert_eq!(value_to_tag(&Value { data: Some(v) }), want);
        }
    }

    #[test]
    fn rendered_len_matches_rendering() {
        for data in [
            Data::Integer(0),
            Data::Integer(-7),
            Data::Integer(i64::MIN),
            Data::Integer(i64::MAX),
            Data::Decimal(1e308),
            Data::Decimal(-0.5),
            Data::Text("héllo".into()),
        ] {
            let v = Value { data: Some(data) };
            assert_eq!(rendered_len(&v), value_to_tag(&v).len(), "{v:?}");
        }
    }

    #[test]
    fn default_tags_only_where_absent() {
        let mut t = tagger();
        let mut e = Envelope {
            message: Some(Message::Log(Log::default())),
            ..Default::default()
        };
        e.tags.insert("job".into(), "mine".into());
        t.process(&mut e);
        assert_eq!(e.tags["job"], "mine");
        assert_eq!(e.tags["deployment"], "cf");
    }

    #[test]
    fn counter_totals_follow_upstream() {
        let mut t = tagger();
        let mut seen = vec![];
        for (delta, total) in [(5, 0), (3, 0), (0, 100), (2, 0), (0, 0), (7, 0)] {
            let mut e = counter("c", delta, total);
            t.process(&mut e);
            seen.push(total_of(&e));
        }
        assert_eq!(seen, vec![5, 8, 100, 102, 0, 7]);
        // another name or other tags: another running total
        let mut e = counter("d", 1, 0);
        t.process(&mut e);
        assert_eq!(total_of(&e), 1);
        let mut e = counter("c", 1, 0);
        e.tags.insert("x".into(), "y".into());
        t.process(&mut e);
        assert_eq!(total_of(&e), 1);
    }

    #[test]
    fn counter_table_is_bounded() {
        let mut t = Tagger::new(&BTreeMap::new(), 3);
        for i in 0..10 {
            let mut e = counter(&format!("c{i}"), 1, 0);
            t.process(&mut e);
            assert!(t.counter_keys() <= 3);
        }
    }

    proptest! {
        /// Against a naive model: per key, the running total follows the rule exactly.
        #[test]
        fn totals_match_model(ops in prop::collection::vec((0u8..3, 0u64..5, 0u64..5), 1..200)) {
            let mut t = Tagger::new(&BTreeMap::new(), 10_000);
            let mut model: HashMap<u8, u64> = HashMap::new();
            for (name, delta, total) in ops {
                let mut e = counter(&name.to_string(), delta, total);
                t.process(&mut e);
                let r = model.entry(name).or_insert(0);
                if total == 0 && delta != 0 { *r += delta } else { *r = total }
                prop_assert_eq!(total_of(&e), *r);
            }
        }

        /// Tags end up as: deprecated tags (winning), then the envelope's own, then defaults.
        #[test]
        fn tag_precedence(own in prop::collection::btree_map("[a-e]", "[a-z]{0,3}", 0..5),
                          dep in prop::collection::btree_map("[a-e]", any::<i64>(), 0..5)) {
            let mut t = tagger();
            let mut e = Envelope { source_id: "s".into(), tags: own.clone(), ..Default::default() };
            for (k, v) in &dep {
                e.deprecated_tags.insert(k.clone(), Value { data: Some(Data::Integer(*v)) });
            }
            t.process(&mut e);
            for (k, v) in &e.tags {
                let want = dep.get(k).map(|i| i.to_string())
                    .or_else(|| own.get(k).cloned())
                    .or_else(|| match k.as_str() { "deployment" => Some("cf".into()), "job" => Some("diego".into()), _ => None });
                prop_assert_eq!(Some(v.clone()), want);
            }
            prop_assert_eq!(e.tags.len(), own.keys().chain(dep.keys()).chain(["deployment".to_string(), "job".to_string()].iter()).collect::<std::collections::BTreeSet<_>>().len());
        }
    }
}
