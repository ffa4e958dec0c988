//! The upstream agent's ingress rules, exactly: origin → source_id, tag merging, counter totals.
//! See `../shared/reference/upstream-agent.md` ("Ingress processing, in order").
//!
//! The rules are applied to envelopes as they arrived, encoded ([`super::view`]): the edge
//! applies the origin rule when it reads a batch ([`super::Item::source`]), the [`Tagger`] keeps
//! counter totals and fixes the default tags of each batch, and the signer appends what the rules
//! add ([`TagResolver`] says what that is; [`super::writer`] writes it).

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::Write as _;
use std::sync::Arc;

use super::view::{sort_last_wins, MessageRef, Parsed, ValueRef};
use super::Batch;
use crate::proto::{value::Data, Value};

/// Where one of an envelope's final tags comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFrom {
    /// A default tag the envelope did not have.
    Default,
    /// The envelope's own `tags`.
    Wire,
    /// A deprecated tag, rendered as text (it wins over the envelope's own tag).
    Deprecated,
    /// The agent's sequencing tags (they win over everything).
    Agent,
}

/// One final tag: key, value, origin.
pub type Tag<'a> = (&'a [u8], &'a [u8], TagFrom);

/// Works out an envelope's final tags, reusing its buffers from envelope to envelope.
#[derive(Debug, Default)]
pub struct TagResolver {
    rendered: Vec<u8>,
    spans: Vec<(usize, usize)>,
    own: Vec<Tag<'static>>,
    list: Vec<Tag<'static>>,
}

impl TagResolver {
    /// Calls `f` with the tags `parsed` (read from `env`) ends up with, in upstream's order of
    /// precedence: its deprecated tags rendered as text win over its own tags, which win over
    /// `defaults`; `agent` tags win over all. Sorted by key, one per key (the last of a repeated
    /// key wins, as a decoder reads it). `defaults` must be sorted by key, one per key, as the
    /// config's map gives them.
    pub fn with_resolved<'s, R>(
        &mut self,
        parsed: &Parsed,
        env: &'s [u8],
        defaults: &'s [(String, String)],
        agent: &[Tag<'s>],
        f: impl FnOnce(&[Tag<'_>]) -> R,
    ) -> R {
        self.resolve(parsed, env, defaults, agent, true, f)
    }

    /// Calls `f` with the envelope's own tags as a decoder reads them (sorted, one per key), no
    /// rule applied: what a receiver checks a signature against.
    pub fn with_own<R>(
        &mut self,
        parsed: &Parsed,
        env: &[u8],
        f: impl FnOnce(&[Tag<'_>]) -> R,
    ) -> R {
        self.resolve(parsed, env, &[], &[], false, f)
    }

    fn resolve<'s, R>(
        &mut self,
        parsed: &Parsed,
        env: &'s [u8],
        defaults: &'s [(String, String)],
        agent: &[Tag<'s>],
        copy_deprecated: bool,
        f: impl FnOnce(&[Tag<'_>]) -> R,
    ) -> R {
        self.rendered.clear();
        self.spans.clear();
        let deprecated = if copy_deprecated {
            &parsed.deprecated[..]
        } else {
            &[]
        };
        for (_, v) in deprecated {
            let start = self.rendered.len();
            render_into(env, v, &mut self.rendered);
            self.spans.push((start, self.rendered.len()));
        }
        let rendered = &self.rendered;
        // The envelope's own tags, few and in any order, are sorted; the defaults already are,
        // so the two merge in one pass, and the agent's two tags go in by binary search. Sorting
        // the whole list instead took three times the comparisons.
        let mut own: Vec<Tag<'_>> = recycle(std::mem::take(&mut self.own));
        own.extend(
            parsed
                .tags
                .iter()
                .map(|(k, v)| (k.slice(env), v.slice(env), TagFrom::Wire)),
        );
        own.extend(
            deprecated
                .iter()
                .zip(&self.spans)
                .map(|((k, _), (a, b))| (k.slice(env), &rendered[*a..*b], TagFrom::Deprecated)),
        );
        sort_last_wins(&mut own, |t| t.0);
        debug_assert!(
            defaults.windows(2).all(|w| w[0].0 < w[1].0),
            "defaults sorted, one per key"
        );
        let mut list: Vec<Tag<'_>> = recycle(std::mem::take(&mut self.list));
        let defaults = defaults
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes(), TagFrom::Default));
        merge_sorted(&mut list, defaults, &own);
        for &tag in agent {
            match list.binary_search_by(|t| t.0.cmp(tag.0)) {
                Ok(i) => list[i] = tag,
                Err(i) => list.insert(i, tag),
            }
        }
        let r = f(&list);
        self.own = recycle(own);
        self.list = recycle(list);
        r
    }
}

/// Appends to `out` the union of `low` and `high`, each sorted by key with one element per key,
/// in key order; where both have a key, `high`'s element is kept.
fn merge_sorted<'a>(out: &mut Vec<Tag<'a>>, low: impl Iterator<Item = Tag<'a>>, high: &[Tag<'a>]) {
    let mut low = low.peekable();
    let mut high = high.iter().copied().peekable();
    while let (Some(l), Some(h)) = (low.peek(), high.peek()) {
        match l.0.cmp(h.0) {
            std::cmp::Ordering::Less => out.extend(low.next()),
            std::cmp::Ordering::Greater => out.extend(high.next()),
            std::cmp::Ordering::Equal => {
                low.next();
                out.extend(high.next());
            }
        }
    }
    out.extend(low);
    out.extend(high);
}

/// An empty vector with `v`'s allocation, for elements that borrow something else: the buffers
/// of the last envelope are reused for the next one.
pub fn recycle<'b>(mut v: Vec<Tag<'_>>) -> Vec<Tag<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}

/// Applies the ingress rules that need state or the configuration: counter totals, and which
/// default tags apply. Owns the counter-total table, so exactly one `Tagger` must see every
/// envelope (it lives inside the ingress actor).
#[derive(Debug)]
pub struct Tagger {
    default_tags: Arc<[(String, String)]>,
    totals: CounterTotals,
    parsed: Parsed,
    resolver: TagResolver,
}

impl Tagger {
    pub fn new(default_tags: &BTreeMap<String, String>, max_counter_keys: usize) -> Self {
        Self {
            default_tags: to_list(default_tags),
            totals: CounterTotals::new(max_counter_keys),
            parsed: Parsed::default(),
            resolver: TagResolver::default(),
        }
    }

    /// Starts over after a panic: counter totals forgotten (as when the table fills), the
    /// default tags kept.
    pub fn reset(&mut self) {
        self.totals = CounterTotals::new(self.totals.max_keys);
        self.parsed = Parsed::default();
        self.resolver = TagResolver::default();
    }

    /// Gives `batch` the default tags and its counters their running totals; returns how many
    /// of its envelopes took their source id from their origin.
    pub fn process(&mut self, batch: &mut Batch) -> u64 {
        batch.set_defaults(self.default_tags.clone());
        let mut mapped = 0;
        for i in 0..batch.len() {
            let item = batch.items()[i];
            mapped += u64::from(item.origin_mapped);
            if !item.counter {
                continue;
            }
            let env = batch.bytes_of(item.env);
            batch.layouts().load(item.layout, &mut self.parsed);
            let MessageRef::Counter { name, delta, total } = self.parsed.message else {
                continue;
            };
            let source = batch.bytes_of(item.source);
            let key =
                self.resolver
                    .with_resolved(&self.parsed, env, &self.default_tags, &[], |tags| {
                        counter_key(name.slice(env), source, tags)
                    });
            let running = self.totals.apply(key, delta, total);
            if running != total {
                batch.items_mut()[i].total = Some(running);
            }
        }
        mapped
    }

    /// Replaces the default tags (a reload); the counter totals are kept.
    pub fn set_default_tags(&mut self, default_tags: &BTreeMap<String, String>) {
        self.default_tags = to_list(default_tags);
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

fn to_list(tags: &BTreeMap<String, String>) -> Arc<[(String, String)]> {
    tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
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

/// [`value_to_tag`] of a value read in place, appended to `out`.
pub fn render_into(env: &[u8], v: &ValueRef, out: &mut Vec<u8>) {
    match v {
        ValueRef::Text(s) => out.extend_from_slice(s.slice(env)),
        ValueRef::Integer(i) => write!(out, "{i}").expect("a Vec grows as needed"),
        ValueRef::Decimal(d) => out.extend_from_slice(format_decimal(*d).as_bytes()),
        ValueRef::None => {}
    }
}

/// The length of [`render_into`]'s output, without allocating for the common cases.
pub fn rendered_len(v: &ValueRef) -> usize {
    match v {
        ValueRef::Text(s) => s.len(),
        ValueRef::Integer(i) => {
            let digits = i
                .unsigned_abs()
                .checked_ilog10()
                .map_or(1, |d| d as usize + 1);
            digits + usize::from(*i < 0)
        }
        ValueRef::Decimal(d) => format_decimal(*d).len(),
        ValueRef::None => 0,
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
    table: super::KeyMap<u64>,
}

impl CounterTotals {
    fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            table: super::KeyMap::default(),
        }
    }

    /// The total to write for a counter with this key, delta and total as sent.
    fn apply(&mut self, key: u64, delta: u64, total: u64) -> u64 {
        if !self.table.contains_key(&key) && self.table.len() >= self.max_keys {
            self.table.clear();
        }
        let running = self.table.entry(key).or_insert(0);
        if total == 0 && delta != 0 {
            *running = running.wrapping_add(delta);
        } else {
            *running = total;
        }
        *running
    }
}

/// The counter's identity as a 64-bit key ([`super::key64`]), without keeping the strings
/// themselves.
fn counter_key(name: &[u8], source_id: &[u8], tags: &[Tag<'_>]) -> u64 {
    let put = |h: &mut std::hash::DefaultHasher, b: &[u8]| {
        h.write_usize(b.len());
        h.write(b);
    };
    super::key64(|h| {
        put(h, name);
        put(h, source_id);
        h.write_usize(tags.len());
        for (k, v, _) in tags {
            put(h, k);
            put(h, v);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::testing::Stages;
    use super::*;
    use crate::envelope::tag::TAG;
    use crate::proto::{envelope::Message, Counter, Envelope, Log};
    use proptest::prelude::*;

    fn tagger() -> Stages {
        let mut d = BTreeMap::new();
        d.insert("deployment".to_string(), "cf".to_string());
        d.insert("job".to_string(), "diego".to_string());
        Stages::new(&d)
    }

    /// Runs `e` through the pipeline and replaces it with what leaves, without the agent's own
    /// tags; true if its origin became its source id.
    fn process(t: &mut Stages, e: &mut Envelope) -> bool {
        let body = crate::envelope::encode_batch(vec![e.clone()]);
        let (mut out, mapped) = t.run_body(body).unwrap();
        *e = out.remove(0);
        e.tags.remove(TAG);
        mapped > 0
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
        assert!(process(&mut t, &mut e));
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
        assert!(process(&mut t, &mut e));
        assert_eq!(e.source_id, "old");

        let mut e = Envelope {
            source_id: "app".into(),
            ..Default::default()
        };
        e.tags.insert("origin".into(), "rep".into());
        assert!(!process(&mut t, &mut e));
        assert_eq!(e.source_id, "app");

        let mut e = Envelope::default();
        assert!(!process(&mut t, &mut e));
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
        use crate::envelope::view::Span;
        let env = "héllo".as_bytes();
        let text = Span {
            start: 0,
            end: env.len() as u32,
        };
        for v in [
            ValueRef::Integer(0),
            ValueRef::Integer(-7),
            ValueRef::Integer(i64::MIN),
            ValueRef::Integer(i64::MAX),
            ValueRef::Decimal(1e308),
            ValueRef::Decimal(-0.5),
            ValueRef::Text(text),
            ValueRef::None,
        ] {
            let mut out = Vec::new();
            render_into(env, &v, &mut out);
            assert_eq!(rendered_len(&v), out.len(), "{v:?}");
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
        process(&mut t, &mut e);
        assert_eq!(e.tags["job"], "mine");
        assert_eq!(e.tags["deployment"], "cf");
    }

    #[test]
    fn counter_totals_follow_upstream() {
        let mut t = tagger();
        let mut seen = vec![];
        for (delta, total) in [(5, 0), (3, 0), (0, 100), (2, 0), (0, 0), (7, 0)] {
            let mut e = counter("c", delta, total);
            process(&mut t, &mut e);
            seen.push(total_of(&e));
        }
        assert_eq!(seen, vec![5, 8, 100, 102, 0, 7]);
        // another name or other tags: another running total
        let mut e = counter("d", 1, 0);
        process(&mut t, &mut e);
        assert_eq!(total_of(&e), 1);
        let mut e = counter("c", 1, 0);
        e.tags.insert("x".into(), "y".into());
        process(&mut t, &mut e);
        assert_eq!(total_of(&e), 1);
    }

    #[test]
    fn counter_table_is_bounded() {
        let mut t = Stages {
            tagger: Tagger::new(&BTreeMap::new(), 3),
            ..Stages::new(&BTreeMap::new())
        };
        for i in 0..10 {
            let mut e = counter(&format!("c{i}"), 1, 0);
            process(&mut t, &mut e);
            assert!(t.tagger.counter_keys() <= 3);
        }
    }

    proptest! {
        /// Against a naive model: per key, the running total follows the rule exactly.
        #[test]
        fn totals_match_model(ops in prop::collection::vec((0u8..3, 0u64..5, 0u64..5), 1..200)) {
            let mut t = Stages::new(&BTreeMap::new());
            let mut model: HashMap<u8, u64> = HashMap::new();
            for (name, delta, total) in ops {
                let mut e = counter(&name.to_string(), delta, total);
                process(&mut t, &mut e);
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
            process(&mut t, &mut e);
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
