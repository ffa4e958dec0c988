//! App drains and the binding cache's aggregate drains, as the sequencer routes to them (plain
//! logic; decision 29). The poller hands over a [`DrainTable`]: every application's drains, ready
//! to dial. A drain connection starts on the first envelope of its application (as upstream's
//! syslog-agent creates its writers lazily: the cache lists every binding of the foundation, and
//! this VM runs few of those apps), and closes when the application sent nothing for
//! `syslog.idle_drain_timeout_ms`, when its binding goes, or when its URL or credentials change.
//! The cache's aggregate drains start as soon as an answer lists them. At most
//! `syslog.max_app_drains` app drains are open at once.
//!
//! Generic over what a started drain is (`H`), so the policy is tested without actors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bindings::{AppBindings, Credentials};
use super::drain::DrainUrl;

/// One drain from the binding cache, resolved and ready to dial.
pub struct DrainSpec {
    /// Empty for an aggregate drain.
    pub app_id: String,
    /// HOSTNAME of its messages (the formatter prefers `org.space.app` from the tags).
    pub hostname: String,
    pub url: DrainUrl,
    pub credentials: Credentials,
    /// `syslog-tls://` and `https://`: the TLS client configuration; `None` for `syslog://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl DrainSpec {
    /// Whether `other` is the same drain (a new answer listing it again keeps its connection).
    pub fn same(&self, other: &DrainSpec) -> bool {
        self.app_id == other.app_id
            && self.hostname == other.hostname
            && self.url == other.url
            && self.credentials == other.credentials
    }
}

impl std::fmt::Debug for DrainSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainSpec")
            .field("app_id", &self.app_id)
            .field("url", &self.url.anonymized)
            .finish_non_exhaustive()
    }
}

/// What the binding cache answered, resolved.
#[derive(Debug, Default)]
pub struct DrainTable {
    pub apps: HashMap<String, Vec<Arc<DrainSpec>>>,
    pub aggregate: Vec<Arc<DrainSpec>>,
}

impl DrainTable {
    /// Resolves an answer, reusing `previous`'s specs (and their TLS configurations) for drains
    /// it listed already; `tls` makes the others'. A drain whose credentials cannot be used is
    /// left out and reported, without them.
    pub fn resolve(
        apps: AppBindings,
        aggregate: Vec<(DrainUrl, Credentials)>,
        previous: &DrainTable,
        mut tls: impl FnMut(
            &DrainUrl,
            &Credentials,
        ) -> Result<Option<Arc<rustls::ClientConfig>>, String>,
        mut refused: impl FnMut(&DrainUrl, String),
    ) -> DrainTable {
        let mut make = |spec: DrainSpec, before: Option<&Vec<Arc<DrainSpec>>>| {
            if let Some(kept) = before.into_iter().flatten().find(|s| s.same(&spec)) {
                return Some(kept.clone());
            }
            match tls(&spec.url, &spec.credentials) {
                Ok(t) => Some(Arc::new(DrainSpec { tls: t, ..spec })),
                Err(problem) => {
                    refused(&spec.url, problem);
                    None
                }
            }
        };
        let mut table = DrainTable::default();
        for (app, drains) in apps {
            let before = previous.apps.get(&app);
            let specs: Vec<Arc<DrainSpec>> = drains
                .into_iter()
                .filter_map(|d| {
                    make(
                        DrainSpec {
                            app_id: d.app_id,
                            hostname: d.hostname,
                            url: d.url,
                            credentials: d.credentials,
                            tls: None,
                        },
                        before,
                    )
                })
                .collect();
            if !specs.is_empty() {
                table.apps.insert(app, specs);
            }
        }
        for (url, credentials) in aggregate {
            let spec = DrainSpec {
                app_id: String::new(),
                hostname: String::new(),
                url,
                credentials,
                tls: None,
            };
            if let Some(s) = make(spec, Some(&previous.aggregate)) {
                table.aggregate.push(s);
            }
        }
        table
    }
}

/// Whether two specs are the same drain: the same one of a table, or one a new answer lists
/// again (a poller started over by a reload resolves every spec anew).
fn is(a: &Arc<DrainSpec>, b: &Arc<DrainSpec>) -> bool {
    Arc::ptr_eq(a, b) || a.same(b)
}

/// A drain the router started: its spec and what the starter made of it.
pub struct Started<H> {
    pub spec: Arc<DrainSpec>,
    pub handle: H,
}

/// One application's open drains.
struct Group<H> {
    drains: Vec<Started<H>>,
    /// Drains of its binding not open (the cap was reached); retried by [`AppRouter::sweep`].
    missing: usize,
    last_seen: Instant,
}

/// Which drains each source's envelopes go to. See the module docs.
pub struct AppRouter<H> {
    table: Arc<DrainTable>,
    /// Whether any answer arrived: until then app drains receive nothing (as upstream).
    answered: bool,
    groups: HashMap<Box<[u8]>, Group<H>>,
    aggregate: Vec<Started<H>>,
    idle: Duration,
    max: usize,
    open: usize,
    /// Drains not opened because `max` were open.
    refused: u64,
}

impl<H> AppRouter<H> {
    pub fn new(idle: Duration, max: usize) -> Self {
        Self {
            table: Arc::default(),
            answered: false,
            groups: HashMap::new(),
            aggregate: Vec::new(),
            idle,
            max,
            open: 0,
            refused: 0,
        }
    }

    /// Whether the binding cache answered yet.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// App drains open.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Drains not opened because `syslog.max_app_drains` were open, so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Applications with open drains.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// The cache's aggregate drains, started.
    pub fn aggregate(&self) -> impl Iterator<Item = &H> {
        self.aggregate.iter().map(|s| &s.handle)
    }

    /// Every drain open, the aggregate ones too.
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.groups
            .values()
            .flat_map(|g| g.drains.iter().map(|s| &s.handle))
            .chain(self.aggregate())
    }

    /// The drains `source`'s envelopes go to, opening them on its first envelope (`start` makes
    /// a drain of a spec; `None` when it cannot). Marks the source as seen at `now`.
    pub fn drains_for(
        &mut self,
        source: &[u8],
        now: Instant,
        start: &mut impl FnMut(&Arc<DrainSpec>) -> Option<H>,
    ) -> &[Started<H>] {
        self.lookup(source, Some(now), start)
    }

    /// The drains open for `source`, opening none and leaving its idle clock alone: for the
    /// agent's own notices, which are not the app's activity.
    pub fn open_for(&mut self, source: &[u8]) -> &[Started<H>] {
        self.lookup(source, None, &mut |_| None)
    }

    fn lookup(
        &mut self,
        source: &[u8],
        seen: Option<Instant>,
        start: &mut impl FnMut(&Arc<DrainSpec>) -> Option<H>,
    ) -> &[Started<H>] {
        let Some(now) = seen else {
            return self.groups.get(source).map_or(&[], |g| &g.drains);
        };
        if !self.groups.contains_key(source) {
            let Some(specs) = std::str::from_utf8(source)
                .ok()
                .and_then(|s| self.table.apps.get(s))
            else {
                return &[];
            };
            let specs = specs.clone();
            let mut group = Group {
                drains: Vec::new(),
                missing: 0,
                last_seen: now,
            };
            self.open_missing(&mut group, &specs, start);
            self.groups.insert(source.into(), group);
        }
        let group = self.groups.get_mut(source).expect("inserted above");
        group.last_seen = now;
        &group.drains
    }

    /// Opens what `group` lacks of `specs`, within the cap.
    fn open_missing(
        &mut self,
        group: &mut Group<H>,
        specs: &[Arc<DrainSpec>],
        start: &mut impl FnMut(&Arc<DrainSpec>) -> Option<H>,
    ) {
        let mut missing: usize = 0;
        for spec in specs {
            if group.drains.iter().any(|d| is(&d.spec, spec)) {
                continue;
            }
            if self.open >= self.max {
                missing += 1;
                continue;
            }
            if let Some(handle) = start(spec) {
                self.open += 1;
                group.drains.push(Started {
                    spec: spec.clone(),
                    handle,
                });
            }
        }
        // Counted once per drain held back, not at every retry.
        self.refused += missing.saturating_sub(group.missing) as u64;
        group.missing = missing;
    }

    /// A new answer: returns the drains to retire (their binding went, or changed). The
    /// applications with open drains get their new ones at once; the cache's aggregate drains
    /// start now.
    pub fn set_table(
        &mut self,
        table: Arc<DrainTable>,
        start: &mut impl FnMut(&Arc<DrainSpec>) -> Option<H>,
    ) -> Vec<H> {
        self.answered = true;
        self.table = table;
        let mut retired = Vec::new();
        let mut groups = std::mem::take(&mut self.groups);
        groups.retain(|source, group| {
            let specs = std::str::from_utf8(source)
                .ok()
                .and_then(|s| self.table.apps.get(s))
                .cloned()
                .unwrap_or_default();
            let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut group.drains)
                .into_iter()
                .partition(|d| specs.iter().any(|s| is(s, &d.spec)));
            self.open -= gone.len();
            retired.extend(gone.into_iter().map(|d| d.handle));
            group.drains = keep;
            self.open_missing(group, &specs, start);
            !specs.is_empty()
        });
        self.groups = groups;
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.aggregate)
            .into_iter()
            .partition(|d| self.table.aggregate.iter().any(|s| is(s, &d.spec)));
        retired.extend(gone.into_iter().map(|d| d.handle));
        self.aggregate = keep;
        for spec in &self.table.aggregate {
            if self.aggregate.iter().any(|d| is(&d.spec, spec)) {
                continue;
            }
            if let Some(handle) = start(spec) {
                self.aggregate.push(Started {
                    spec: spec.clone(),
                    handle,
                });
            }
        }
        retired
    }

    /// Closes the drains of sources not seen for the idle timeout (returned, to retire), and
    /// retries the drains the cap kept closed.
    pub fn sweep(
        &mut self,
        now: Instant,
        start: &mut impl FnMut(&Arc<DrainSpec>) -> Option<H>,
    ) -> Vec<H> {
        let mut retired = Vec::new();
        let idle = self.idle;
        let mut groups = std::mem::take(&mut self.groups);
        groups.retain(|_, g| {
            if now.saturating_duration_since(g.last_seen) < idle {
                return true;
            }
            self.open -= g.drains.len();
            retired.extend(g.drains.drain(..).map(|d| d.handle));
            false
        });
        for (source, group) in groups.iter_mut().filter(|(_, g)| g.missing > 0) {
            let specs = std::str::from_utf8(source)
                .ok()
                .and_then(|s| self.table.apps.get(s))
                .cloned()
                .unwrap_or_default();
            self.open_missing(group, &specs, start);
        }
        self.groups = groups;
        retired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syslog::bindings::AppDrain;
    use proptest::prelude::*;

    fn url(s: &str) -> DrainUrl {
        DrainUrl::parse(s, true).unwrap()
    }

    fn answer(apps: &[(&str, &[&str])]) -> AppBindings {
        apps.iter()
            .map(|(app, urls)| {
                let drains = urls
                    .iter()
                    .map(|u| AppDrain {
                        app_id: (*app).into(),
                        hostname: format!("org.space.{app}"),
                        url: url(u),
                        credentials: Credentials::default(),
                    })
                    .collect();
                ((*app).to_string(), drains)
            })
            .collect()
    }

    fn table(apps: &[(&str, &[&str])], previous: &DrainTable) -> Arc<DrainTable> {
        Arc::new(DrainTable::resolve(
            answer(apps),
            Vec::new(),
            previous,
            |_, _| Ok(None),
            |_, _| {},
        ))
    }

    /// A starter naming each drain `app url`, counting starts.
    fn starter(started: &mut Vec<String>) -> impl FnMut(&Arc<DrainSpec>) -> Option<String> + '_ {
        |s: &Arc<DrainSpec>| {
            let name = format!("{} {}", s.app_id, s.url.anonymized);
            started.push(name.clone());
            Some(name)
        }
    }

    #[test]
    fn drains_open_on_the_first_envelope_and_close_when_idle() {
        let t0 = Instant::now();
        let mut r = AppRouter::new(Duration::from_secs(600), 100);
        let mut started = Vec::new();
        assert!(
            r.drains_for(b"app-1", t0, &mut starter(&mut started))
                .is_empty(),
            "nothing before the first answer"
        );
        let t = table(
            &[("app-1", &["syslog://a:1", "syslog://b:1"])],
            &DrainTable::default(),
        );
        assert!(r.set_table(t, &mut starter(&mut started)).is_empty());
        assert!(
            started.is_empty(),
            "app drains wait for their app's envelopes"
        );
        assert_eq!(
            r.drains_for(b"app-1", t0, &mut starter(&mut started)).len(),
            2
        );
        assert_eq!(
            r.drains_for(b"app-1", t0, &mut starter(&mut started)).len(),
            2
        );
        assert!(r
            .drains_for(b"app-2", t0, &mut starter(&mut started))
            .is_empty());
        assert_eq!(started.len(), 2, "opened once");
        assert!(r.open_for(b"app-3").is_empty());
        assert_eq!(
            r.open_for(b"app-1").len(),
            2,
            "a notice sees the open drains"
        );
        assert!(r
            .sweep(t0 + Duration::from_secs(599), &mut starter(&mut started))
            .is_empty());
        let gone = r.sweep(t0 + Duration::from_secs(600), &mut starter(&mut started));
        assert_eq!(gone, ["app-1 syslog://a:1", "app-1 syslog://b:1"]);
        assert_eq!(r.open(), 0);
        assert_eq!(
            r.drains_for(b"app-1", t0, &mut starter(&mut started)).len(),
            2
        );
        assert_eq!(started.len(), 4, "the next envelope opens them again");
    }

    #[test]
    fn a_new_answer_keeps_unchanged_drains_and_retires_the_rest() {
        let t0 = Instant::now();
        let mut r = AppRouter::new(Duration::from_secs(600), 100);
        let mut started = Vec::new();
        let t1 = table(
            &[("app-1", &["syslog://a:1", "syslog://b:1"])],
            &DrainTable::default(),
        );
        r.set_table(t1.clone(), &mut starter(&mut started));
        r.drains_for(b"app-1", t0, &mut starter(&mut started));
        // Resolved without the previous table (a reload started the poller over): the same
        // drains are still recognised.
        let t2 = table(
            &[("app-1", &["syslog://b:1", "syslog://c:1"])],
            &DrainTable::default(),
        );
        let gone = r.set_table(t2.clone(), &mut starter(&mut started));
        assert_eq!(gone, ["app-1 syslog://a:1"]);
        assert_eq!(
            started,
            [
                "app-1 syslog://a:1",
                "app-1 syslog://b:1",
                "app-1 syslog://c:1"
            ],
            "b kept its connection; c opened at once, its app being active"
        );
        let gone = r.set_table(table(&[], &t2), &mut starter(&mut started));
        assert_eq!(gone.len(), 2, "unbound: both retire");
        assert_eq!((r.open(), r.groups()), (0, 0));
    }

    #[test]
    fn the_cap_keeps_drains_closed_until_one_closes() {
        let t0 = Instant::now();
        let mut r = AppRouter::new(Duration::from_secs(10), 2);
        let mut started = Vec::new();
        let t = table(
            &[
                ("app-1", &["syslog://a:1", "syslog://b:1"]),
                ("app-2", &["syslog://c:1"]),
            ],
            &DrainTable::default(),
        );
        r.set_table(t, &mut starter(&mut started));
        assert_eq!(
            r.drains_for(b"app-1", t0, &mut starter(&mut started)).len(),
            2
        );
        let later = t0 + Duration::from_secs(5);
        assert!(r
            .drains_for(b"app-2", later, &mut starter(&mut started))
            .is_empty());
        assert!(r.sweep(later, &mut starter(&mut started)).is_empty());
        assert_eq!(
            r.refused(),
            1,
            "one drain held back, counted once, retried every sweep"
        );
        // app-1 goes idle: its drains close and app-2's opens in the same sweep.
        let gone = r.sweep(t0 + Duration::from_secs(10), &mut starter(&mut started));
        assert_eq!(gone.len(), 2);
        assert_eq!(
            r.drains_for(b"app-2", later, &mut starter(&mut started))
                .len(),
            1
        );
        assert_eq!(r.open(), 1);
    }

    #[test]
    fn aggregate_drains_start_with_the_answer() {
        let mut r: AppRouter<String> = AppRouter::new(Duration::from_secs(10), 2);
        let mut started = Vec::new();
        let resolve = |aggregate: &[&str], previous: &DrainTable| {
            Arc::new(DrainTable::resolve(
                AppBindings::new(),
                aggregate
                    .iter()
                    .map(|u| (url(u), Credentials::default()))
                    .collect(),
                previous,
                |_, _| Ok(None),
                |_, _| {},
            ))
        };
        let t1 = resolve(&["syslog://lc:6067"], &DrainTable::default());
        r.set_table(t1.clone(), &mut starter(&mut started));
        assert_eq!(r.aggregate().count(), 1);
        let gone = r.set_table(
            resolve(&["syslog://lc2:6067"], &t1),
            &mut starter(&mut started),
        );
        assert_eq!(gone, [" syslog://lc:6067"]);
        assert_eq!(r.aggregate().collect::<Vec<_>>(), [" syslog://lc2:6067"]);
        assert_eq!(
            r.open(),
            0,
            "aggregate drains are not under the app drains' cap"
        );
    }

    #[test]
    fn unusable_credentials_leave_the_drain_out_and_say_which() {
        let mut refused = Vec::new();
        let t = DrainTable::resolve(
            answer(&[("app-1", &["syslog-tls://a:1", "syslog://b:1"])]),
            Vec::new(),
            &DrainTable::default(),
            |u, _| {
                if u.host == "a" {
                    Err("key: no usable private key".into())
                } else {
                    Ok(None)
                }
            },
            |u, problem| refused.push(format!("{} {problem}", u.anonymized)),
        );
        assert_eq!(t.apps["app-1"].len(), 1);
        assert_eq!(refused, ["syslog-tls://a:1 key: no usable private key"]);
    }

    proptest! {
        /// Whatever the answers, envelopes and sweeps: never more than the cap open, the count
        /// of open drains is exact, and every drain started is either open or was retired once.
        #[test]
        fn open_drains_are_counted_exactly(ops in prop::collection::vec((0u8..4, 0usize..6, 0u64..30), 1..200)) {
            let urls = ["syslog://a:1", "syslog://b:1", "syslog://c:1"];
            let mut r = AppRouter::new(Duration::from_secs(10), 4);
            let mut previous = Arc::new(DrainTable::default());
            let mut retired = 0usize;
            let t0 = Instant::now();
            let next = std::cell::Cell::new(0usize);
            let mut start = |_: &Arc<DrainSpec>| { next.set(next.get() + 1); Some(next.get()) };
            for (op, n, at) in ops {
                let now = t0 + Duration::from_secs(at);
                match op {
                    0 => {
                        let apps: Vec<(String, Vec<&str>)> = (0..n)
                            .map(|a| (format!("app-{a}"), urls[..1 + (a + n) % 3].to_vec()))
                            .collect();
                        let apps: Vec<(&str, &[&str])> = apps.iter().map(|(a, u)| (a.as_str(), u.as_slice())).collect();
                        let t = table(&apps, &previous);
                        retired += r.set_table(t.clone(), &mut start).len();
                        previous = t;
                    }
                    1 | 2 => { r.drains_for(format!("app-{n}").as_bytes(), now, &mut start); }
                    _ => { retired += r.sweep(now, &mut start).len(); }
                }
                let started = next.get();
                prop_assert!(r.open() <= 4);
                let open: usize = r.handles().count() - r.aggregate().count();
                prop_assert_eq!(open, r.open());
                prop_assert_eq!(started, open + retired);
            }
        }
    }
}
