//! One destination's account: what it was offered, delivered, dropped (by reason) and holds.
//! Every destination has one — the Doppler pool and each syslog drain — so that for each of them
//! `offered == egress + dropped + buffered` holds exactly, and a drain's losses show in its own
//! series only (decision 27).
//!
//! The Doppler pool's deliveries and drops are also the agent's unlabelled `egress` and
//! `dropped` series (upstream's classic agent's meaning, unchanged); a drain's are series of the
//! same families labelled `drain_scope` and `drain_url` (upstream's syslog-agent's), so summing a
//! family counts every delivery or drop once.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use super::metrics::DropReason;
use super::ratelimit::RateLimit;

/// Which destination an account belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The Doppler pool (every connection slot).
    Doppler,
    /// A syslog drain: `scope` is `aggregate` or `app`; `url` is the anonymized URL (no
    /// credentials, no query) or `other` once `syslog.max_drain_series` drains have a series.
    Drain { scope: DrainScope, url: String },
    /// The OTLP collector at `endpoint` (`otlp.endpoint`, or an `ingress_port.yml` file's).
    Otlp { endpoint: String },
    /// A downstream v2 agent announced by an `ingress_port.yml` file (the forwarder's fan-out).
    Forward { addr: String },
}

/// Upstream's `drain_scope` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainScope {
    /// Every source's envelopes (`syslog.aggregate_drains`).
    Aggregate,
    /// One application's envelopes (a binding).
    App,
}

impl DrainScope {
    pub fn name(self) -> &'static str {
        match self {
            DrainScope::Aggregate => "aggregate",
            DrainScope::App => "app",
        }
    }
}

impl Destination {
    /// The Prometheus labels of this destination's series (empty for the Doppler pool, whose
    /// series keep upstream's classic-agent labels).
    pub fn labels(&self) -> String {
        match self {
            Destination::Doppler => String::new(),
            Destination::Drain { scope, url } => format!(
                "drain_scope=\"{}\",drain_url=\"{}\"",
                scope.name(),
                super::metrics::escape_label(url)
            ),
            Destination::Otlp { endpoint } => format!(
                "otlp_endpoint=\"{}\"",
                super::metrics::escape_label(endpoint)
            ),
            Destination::Forward { addr } => format!(
                "forward_destination=\"{}\"",
                super::metrics::escape_label(addr)
            ),
        }
    }

    /// How logs and the state dump name it.
    pub fn name(&self) -> String {
        match self {
            Destination::Doppler => "doppler".into(),
            Destination::Drain { scope, url } => format!("{} drain {url}", scope.name()),
            Destination::Otlp { endpoint } => format!("otlp {endpoint}"),
            Destination::Forward { addr } => format!("forward {addr}"),
        }
    }
}

/// A destination's counters. Changed only through the [`super::Ledger`], which keeps the budget
/// and the agent-wide counters in step with them.
#[derive(Debug)]
pub struct Account {
    destination: Destination,
    offered: AtomicU64,
    egress: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    buffered: AtomicU64,
    buffered_bytes: AtomicU64,
    /// Open connections (a drain's; the Doppler pool's are `doppler_v2_streams`).
    connections: AtomicI64,
    warnings: RateLimit,
}

/// A point-in-time copy of an [`Account`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub destination: Destination,
    pub offered: u64,
    pub egress: u64,
    /// Per reason, only reasons with drops.
    pub dropped: Vec<(DropReason, u64)>,
    pub buffered: u64,
    pub buffered_bytes: u64,
    pub connections: i64,
}

impl AccountSnapshot {
    pub fn dropped_total(&self) -> u64 {
        super::metrics::total(&self.dropped)
    }

    pub fn dropped_by(&self, reason: DropReason) -> u64 {
        super::metrics::count_of(&self.dropped, reason)
    }
}

impl Account {
    pub fn new(destination: Destination) -> Self {
        Self {
            destination,
            offered: AtomicU64::new(0),
            egress: AtomicU64::new(0),
            dropped: Default::default(),
            buffered: AtomicU64::new(0),
            buffered_bytes: AtomicU64::new(0),
            connections: AtomicI64::new(0),
            warnings: RateLimit::new(Duration::from_secs(10)),
        }
    }

    /// Envelopes delivered so far.
    pub fn egress(&self) -> u64 {
        self.egress.load(Ordering::Relaxed)
    }

    /// Connections open now (drains; the Doppler pool counts its streams in the metrics).
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    pub fn is_doppler(&self) -> bool {
        self.destination == Destination::Doppler
    }

    pub(super) fn offer(&self, n: usize, bytes: usize) {
        self.offered.fetch_add(n as u64, Ordering::Relaxed);
        self.buffered.fetch_add(n as u64, Ordering::Relaxed);
        self.buffered_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn resize(&self, grow: usize, shrink: usize) {
        self.buffered_bytes
            .fetch_add(grow as u64, Ordering::Relaxed);
        self.buffered_bytes
            .fetch_sub(shrink as u64, Ordering::Relaxed);
    }

    fn leave(&self, n: usize, bytes: usize) {
        let prev = self.buffered.fetch_sub(n as u64, Ordering::Relaxed);
        debug_assert!(
            prev >= n as u64,
            "{}: left more than offered",
            self.destination.name()
        );
        self.buffered_bytes
            .fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn delivered(&self, n: usize, bytes: usize) {
        self.egress.fetch_add(n as u64, Ordering::Relaxed);
        self.leave(n, bytes);
    }

    pub(super) fn dropped(&self, reason: DropReason, n: usize, bytes: usize) {
        self.dropped[reason.index()].fetch_add(n as u64, Ordering::Relaxed);
        self.leave(n, bytes);
        if !self.is_doppler() && n > 0 {
            if let Some(times) = self.warnings.check() {
                tracing::warn!(
                    destination = %self.destination.name(),
                    reason = reason.name(),
                    batches = times,
                    total_dropped = self.snapshot().dropped_total(),
                    "dropping envelopes for a drain"
                );
            }
        }
    }

    /// A connection of this destination opened (`+1`) or closed (`-1`).
    pub fn connected(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
    }

    /// (envelopes, budget bytes) offered and not yet delivered or dropped.
    pub fn buffered(&self) -> (u64, u64) {
        (
            self.buffered.load(Ordering::Relaxed),
            self.buffered_bytes.load(Ordering::Relaxed),
        )
    }

    pub fn snapshot(&self) -> AccountSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AccountSnapshot {
            destination: self.destination.clone(),
            offered: get(&self.offered),
            egress: get(&self.egress),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, get(&self.dropped[r.index()])))
                .filter(|(_, n)| *n > 0)
                .collect(),
            buffered: get(&self.buffered),
            buffered_bytes: get(&self.buffered_bytes),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}
