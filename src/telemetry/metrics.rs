//! Every metric the agent exposes, named in one place with upstream's names and labels, so
//! existing Loggregator dashboards keep working. Counters are atomics: cheap to bump from any
//! thread, read by the Prometheus endpoint and by tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use super::destination::{Account, AccountSnapshot, Destination, DrainScope};
use super::ratelimit::RateLimit;
use crate::limits::fair::Heavy;
use std::sync::Arc;

/// Why envelopes were dropped. Each reason belongs to one `direction`, with upstream's meaning:
/// `egress` when no Doppler could take the envelope, `ingress` when the agent shed it. Whether a
/// drop leaves a gap in the sequence depends on the reason: only `signer_queue_full`,
/// `shutdown_grace_expired` and `connection_lost` happen after sequencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The pipeline's byte budget stayed full for `ingress.grpc.max_wait_ms` (drop newest, at the
    /// edge, before any work is spent on it).
    PipelineFull,
    /// Refused at the edge while no Doppler stream was open and the budget was full: upstream's
    /// "no Doppler accepted it" (direction `egress`), decided before sequencing.
    NoDoppler,
    /// A single envelope too large to ever fit in a Doppler message.
    Oversize,
    /// The ingress actor's mailbox was full.
    IngressQueueFull,
    /// The sequencer's mailbox was full.
    SequencerQueueFull,
    /// Arrived while the agent was shutting down.
    ShuttingDown,
    /// The signer's mailbox was full (after sequencing).
    SignerQueueFull,
    /// The source's connection slot already held its share of the budget (its Doppler is slow or
    /// gone), so one stuck slot cannot starve the others. Decided before sequencing.
    SlotQueueFull,
    /// Still buffered when the shutdown grace period ran out.
    ShutdownGraceExpired,
    /// Written to a Doppler stream whose connection died before the Doppler acknowledged the
    /// stream's end. Some may have arrived; at most one acknowledgement window per failure.
    ConnectionLost,
    /// A v1 datagram arrived while the UDP buffer (`ingress.udp.buffer_bytes`) was full.
    UdpBufferFull,
    /// A v1 datagram that is not a protobuf `events.Envelope`.
    V1Undecodable,
    /// A v1 envelope without a field upstream declares required.
    V1MissingField,
    /// A v1 envelope whose `eventType`'s message is absent.
    V1MissingEvent,
    /// A v1 envelope with an event type upstream no longer accepts.
    V1UnknownEventType,
    /// A bug: an actor panicked while it held these envelopes, and went on from fresh state
    /// (`actor_panics`); nothing else was touched. Also what reaches the mailbox of an actor a
    /// panic took down for good (the agent then stops itself, see the README).
    ActorPanic,
    /// A drain's queue already held its share of the budget (the drain is slow, blackholed or
    /// gone). Counted in that drain's series only; the other destinations took the envelope.
    DrainQueueFull,
    /// The receiver would refuse the envelope as syslog (a log type neither OUT nor ERR, a
    /// field its parser refuses): never sent, since Log Cache closes the connection on it.
    Unformattable,
    /// A reload removed the drain, and it could not deliver what it held within
    /// `shutdown.grace_period_ms`.
    DrainRemoved,
    /// A drain failed every write of them, 22 times (about 2 minutes at the 15 s backoff cap):
    /// upstream's retry writer's limit, so one message a drain chokes on cannot hold its queue.
    DrainWriteFailed,
    /// An HTTPS drain refused them for good (a 4xx answer other than 408 and 429): not retried.
    DrainRefused,
    /// Fair shedding (decision 30): the budget was under pressure and their source was sending
    /// more than its fair share of what the pipeline drains; refused at the edge, before any
    /// work, so the sources within their share lose nothing.
    FairShare,
    /// Over its source's rate limit (`limits.per_source` / `limits.overrides`).
    SourceRateLimited,
    /// The OTLP collector answered `UNIMPLEMENTED` for their signal (it has no pipeline for
    /// it): the signal is paused for 5 minutes, its envelopes counted here meanwhile.
    SignalUnimplemented,
    /// The OTLP collector accepted the export but rejected these (`partial_success`).
    OtlpRejected,
}

impl DropReason {
    pub const ALL: [DropReason; 25] = [
        DropReason::PipelineFull,
        DropReason::NoDoppler,
        DropReason::Oversize,
        DropReason::IngressQueueFull,
        DropReason::SequencerQueueFull,
        DropReason::ShuttingDown,
        DropReason::SignerQueueFull,
        DropReason::SlotQueueFull,
        DropReason::ShutdownGraceExpired,
        DropReason::ConnectionLost,
        DropReason::UdpBufferFull,
        DropReason::V1Undecodable,
        DropReason::V1MissingField,
        DropReason::V1MissingEvent,
        DropReason::V1UnknownEventType,
        DropReason::ActorPanic,
        DropReason::DrainQueueFull,
        DropReason::Unformattable,
        DropReason::DrainRemoved,
        DropReason::DrainWriteFailed,
        DropReason::DrainRefused,
        DropReason::FairShare,
        DropReason::SourceRateLimited,
        DropReason::SignalUnimplemented,
        DropReason::OtlpRejected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::PipelineFull => "pipeline_full",
            DropReason::NoDoppler => "no_doppler",
            DropReason::Oversize => "oversize",
            DropReason::IngressQueueFull => "ingress_queue_full",
            DropReason::SequencerQueueFull => "sequencer_queue_full",
            DropReason::ShuttingDown => "shutting_down",
            DropReason::SignerQueueFull => "signer_queue_full",
            DropReason::SlotQueueFull => "slot_queue_full",
            DropReason::ShutdownGraceExpired => "shutdown_grace_expired",
            DropReason::ConnectionLost => "connection_lost",
            DropReason::UdpBufferFull => "udp_buffer_full",
            DropReason::V1Undecodable => "v1_undecodable",
            DropReason::V1MissingField => "v1_missing_field",
            DropReason::V1MissingEvent => "v1_missing_event",
            DropReason::V1UnknownEventType => "v1_unknown_event_type",
            DropReason::ActorPanic => "actor_panic",
            DropReason::DrainQueueFull => "drain_queue_full",
            DropReason::Unformattable => "unformattable",
            DropReason::DrainRemoved => "drain_removed",
            DropReason::DrainWriteFailed => "drain_write_failed",
            DropReason::DrainRefused => "drain_refused",
            DropReason::FairShare => "fair_share",
            DropReason::SourceRateLimited => "source_rate_limited",
            DropReason::SignalUnimplemented => "signal_unimplemented",
            DropReason::OtlpRejected => "otlp_rejected",
        }
    }

    pub fn direction(self) -> &'static str {
        match self {
            DropReason::PipelineFull
            | DropReason::Oversize
            | DropReason::IngressQueueFull
            | DropReason::SequencerQueueFull
            | DropReason::SlotQueueFull
            | DropReason::ShuttingDown
            | DropReason::UdpBufferFull
            | DropReason::V1Undecodable
            | DropReason::V1MissingField
            | DropReason::V1MissingEvent
            | DropReason::V1UnknownEventType
            | DropReason::ActorPanic
            | DropReason::FairShare
            | DropReason::SourceRateLimited => "ingress",
            DropReason::NoDoppler
            | DropReason::DrainQueueFull
            | DropReason::Unformattable
            | DropReason::DrainRemoved
            | DropReason::DrainWriteFailed
            | DropReason::DrainRefused
            | DropReason::SignalUnimplemented
            | DropReason::OtlpRejected
            | DropReason::SignerQueueFull
            | DropReason::ShutdownGraceExpired
            | DropReason::ConnectionLost => "egress",
        }
    }

    /// Upstream's `metric_version` label: `1.0` for what the v1 (UDP) path drops before an
    /// envelope becomes v2, `2.0` for everything else.
    pub fn metric_version(self) -> &'static str {
        match self {
            DropReason::UdpBufferFull
            | DropReason::V1Undecodable
            | DropReason::V1MissingField
            | DropReason::V1MissingEvent
            | DropReason::V1UnknownEventType => "1.0",
            _ => "2.0",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("in ALL")
    }
}

/// Every drop in a per-reason list.
pub(crate) fn total(dropped: &[(DropReason, u64)]) -> u64 {
    dropped.iter().map(|(_, n)| n).sum()
}

/// The drops of one reason in a per-reason list.
pub(crate) fn count_of(dropped: &[(DropReason, u64)], reason: DropReason) -> u64 {
    dropped
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

/// The `drain_url` of drains beyond `syslog.max_drain_series`.
pub const OTHER_DRAINS: &str = "other";

/// Why a Doppler connection actor was restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartCause {
    /// Dialing or the TLS handshake failed.
    ConnectFailed,
    /// The BatchSender stream ended with an error (Doppler died, refused us, or keepalive expired).
    StreamFailed,
    /// The Doppler closed the stream without an error.
    StreamClosed,
    /// Stopped without a recorded cause (it should not happen; kept so such a stop is counted).
    Killed,
    /// Ended on purpose by the supervisor to move the slot back to the local AZ.
    Recycled,
    /// The stream took nothing from a non-empty queue for `dopplers.progress_timeout_ms`.
    Stalled,
    /// The actor, or its stream task, panicked (a bug; also counted in `actor_panics`).
    Panic,
    /// The supervisor panicked and started over from fresh state: every connection ends its
    /// stream gracefully and takes its Doppler from the new supervisor.
    SupervisorReset,
}

impl RestartCause {
    pub const ALL: [RestartCause; 8] = [
        RestartCause::ConnectFailed,
        RestartCause::StreamFailed,
        RestartCause::StreamClosed,
        RestartCause::Killed,
        RestartCause::Recycled,
        RestartCause::Stalled,
        RestartCause::Panic,
        RestartCause::SupervisorReset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RestartCause::ConnectFailed => "connect_failed",
            RestartCause::StreamFailed => "stream_failed",
            RestartCause::StreamClosed => "stream_closed",
            RestartCause::Killed => "killed",
            RestartCause::Recycled => "recycled",
            RestartCause::Stalled => "stalled",
            RestartCause::Panic => "panic",
            RestartCause::SupervisorReset => "supervisor_reset",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("in ALL")
    }
}

/// The agent's actors, as the `actor` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorName {
    /// Not an actor: the gRPC and UDP edges, where envelopes are read off the network.
    Edge,
    Ingress,
    Sequencer,
    Signer,
    Supervisor,
    DopplerConnection,
    DrainConnection,
    OtlpConnection,
    ForwardConnection,
}

impl ActorName {
    pub const ALL: [ActorName; 9] = [
        ActorName::Edge,
        ActorName::Ingress,
        ActorName::Sequencer,
        ActorName::Signer,
        ActorName::Supervisor,
        ActorName::DopplerConnection,
        ActorName::DrainConnection,
        ActorName::OtlpConnection,
        ActorName::ForwardConnection,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ActorName::Edge => "edge",
            ActorName::Ingress => "ingress",
            ActorName::Sequencer => "sequencer",
            ActorName::Signer => "signer",
            ActorName::Supervisor => "supervisor",
            ActorName::DopplerConnection => "doppler_connection",
            ActorName::DrainConnection => "drain_connection",
            ActorName::OtlpConnection => "otlp_connection",
            ActorName::ForwardConnection => "forward_connection",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("in ALL")
    }
}

/// The one metrics struct. Fields are public counters/gauges; drops and restarts go through
/// [`Metrics::dropped`] / [`Metrics::restarted`], which also decide the (rate-limited) log line.
#[derive(Debug)]
pub struct Metrics {
    /// `ingress{metric_version="2.0"}`: envelopes received (v2 gRPC, plus the agent's own when
    /// `metrics.envelope_interval_ms` is set).
    pub ingress: AtomicU64,
    /// `ingress{metric_version="1.0"}`: v1 datagrams received on UDP (each one envelope, valid or
    /// not: the invalid ones are counted as dropped).
    pub ingress_v1: AtomicU64,
    /// `origin_mappings{metric_version="2.0"}`: source_id taken from the origin tag.
    pub origin_mappings: AtomicU64,
    /// `egress{metric_version="2.0"}`: envelopes written to a Doppler stream whose Doppler
    /// acknowledged them.
    pub egress: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    drop_warnings: [RateLimit; DropReason::ALL.len()],
    /// `doppler_connections{metric_version="2.0"}`: open Doppler connections.
    pub doppler_connections: AtomicI64,
    /// `doppler_v2_streams{metric_version="2.0"}`: open BatchSender streams.
    pub doppler_v2_streams: AtomicI64,
    restarts: [AtomicU64; RestartCause::ALL.len()],
    /// `actor_panics{actor}`: panics caught inside an actor, which went on from fresh state.
    actor_panics: [AtomicU64; ActorName::ALL.len()],
    panic_logs: [RateLimit; ActorName::ALL.len()],
    /// `ingress_stream_errors`: client streams ended by a malformed or oversize message.
    pub ingress_stream_errors: AtomicU64,
    /// `sequence_stream_rotations`: times the per-source table filled and a new stream began.
    pub sequence_rotations: AtomicU64,
    /// `binding_cache_polls{result}`: the binding cache's answers, read (`ok`) or not (`failed`).
    pub binding_polls: AtomicU64,
    pub binding_poll_failures: AtomicU64,
    /// `app_bindings`: applications the last good answer binds drains to (the whole foundation's).
    pub app_bindings: AtomicU64,
    /// `app_drains_open`: app drain connections open (their app sent within the idle timeout).
    pub app_drains_open: AtomicI64,
    /// `app_drains_refused`: app drains not opened because `syslog.max_app_drains` were open.
    pub app_drains_refused: AtomicU64,
    /// `app_notices`: notices (`LGR` log lines) sent into applications' streams.
    pub app_notices: AtomicU64,
    /// The heaviest sources as last reported by the edge (at most `limits.top_sources`).
    heaviest: Mutex<Vec<Heavy>>,
    /// `doppler_failovers`: a connection that failed reconnected to a different Doppler.
    pub failovers: AtomicU64,
    /// `doppler_rerouted_batches`: batches queued for a failed connection that went on to the
    /// Doppler it failed over to (rather than being dropped).
    pub rerouted_batches: AtomicU64,
    /// `doppler_replays`: connections that started with a backlog and replayed it paced.
    pub doppler_replays: AtomicU64,
    /// `doppler_replaying`: slots replaying a backlog now.
    pub doppler_replaying: AtomicI64,
    /// `buffered_bytes_peak`: the most budget bytes ever held at once.
    pub peak_buffered_bytes: AtomicU64,
    /// `doppler_connections_by_az{az}`: open connections per Doppler AZ (`""`: not known, from
    /// `router_addr` only).
    connections_by_az: Mutex<BTreeMap<String, i64>>,
    /// `destination_copies`: deliveries owed beyond one per envelope, because more than one
    /// destination takes it (the fan-out's term in the balance).
    pub destination_copies: AtomicU64,
    /// `filtered`: envelopes no destination takes (every destination's filter leaves them out,
    /// e.g. logs with `dopplers.disable_logs` and no drain): not a loss, nobody asked for them.
    pub filtered: AtomicU64,
    /// `drain_connections`: open syslog drain connections.
    pub drain_connections: AtomicI64,
    /// Every destination's account, the Doppler pool's first.
    accounts: Mutex<Vec<Arc<Account>>>,
    /// What drains a reload removed delivered and dropped (their series are gone; the balance
    /// keeps them).
    /// One merged account per removed drain's destination: its series stay (counters never go
    /// back) and its totals stay in the balance.
    retired: Mutex<Vec<AccountSnapshot>>,
}

/// One metric family for the exposition: name, type, help, and (labels, value) samples.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(String, String)>,
);

/// A point-in-time copy of the counters, for tests and the shutdown report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub ingress: u64,
    pub ingress_v1: u64,
    pub origin_mappings: u64,
    pub egress: u64,
    /// Per reason, every reason listed (zeros included).
    pub dropped: Vec<(DropReason, u64)>,
    pub restarts: Vec<(RestartCause, u64)>,
    /// Per actor, every actor listed (zeros included).
    pub actor_panics: Vec<(ActorName, u64)>,
    pub doppler_connections: i64,
    pub doppler_v2_streams: i64,
    pub failovers: u64,
    pub rerouted_batches: u64,
    pub doppler_replays: u64,
    pub doppler_replaying: i64,
    pub peak_buffered_bytes: u64,
    /// Open connections per Doppler AZ; AZs with none are left out.
    pub connections_by_az: BTreeMap<String, i64>,
    pub destination_copies: u64,
    pub filtered: u64,
    pub drain_connections: i64,
    /// Every destination's account, the Doppler pool's first.
    pub accounts: Vec<AccountSnapshot>,
    /// Deliveries and drops of drains a reload removed.
    pub retired_drain_egress: u64,
    pub retired_drain_dropped: u64,
    /// The removed drains' totals, one per destination.
    pub retired: Vec<AccountSnapshot>,
}

impl MetricsSnapshot {
    /// Everything that entered: v2 envelopes and v1 datagrams.
    pub fn ingress_total(&self) -> u64 {
        self.ingress + self.ingress_v1
    }

    pub fn dropped_total(&self) -> u64 {
        total(&self.dropped)
    }

    pub fn dropped_by(&self, reason: DropReason) -> u64 {
        count_of(&self.dropped, reason)
    }

    pub fn restarts_total(&self) -> u64 {
        self.restarts.iter().map(|(_, n)| n).sum()
    }

    pub fn restarts_by(&self, cause: RestartCause) -> u64 {
        self.restarts
            .iter()
            .find(|(c, _)| *c == cause)
            .map_or(0, |(_, n)| *n)
    }

    pub fn panics_of(&self, actor: ActorName) -> u64 {
        self.actor_panics
            .iter()
            .find(|(a, _)| *a == actor)
            .map_or(0, |(_, n)| *n)
    }

    pub fn panics_total(&self) -> u64 {
        self.actor_panics.iter().map(|(_, n)| n).sum()
    }

    /// Open connections to Dopplers in `az`.
    pub fn connections_in(&self, az: &str) -> i64 {
        self.connections_by_az.get(az).copied().unwrap_or(0)
    }

    /// The account of the first destination that is `d`.
    pub fn account(&self, d: &Destination) -> Option<&AccountSnapshot> {
        self.accounts.iter().find(|a| a.destination == *d)
    }

    /// Every drain's deliveries (removed drains' included).
    pub fn drain_egress(&self) -> u64 {
        self.drains().map(|a| a.egress).sum::<u64>() + self.retired_drain_egress
    }

    /// Every drain's drops (removed drains' included).
    pub fn drain_dropped(&self) -> u64 {
        self.drains().map(|a| a.dropped_total()).sum::<u64>() + self.retired_drain_dropped
    }

    fn drains(&self) -> impl Iterator<Item = &AccountSnapshot> {
        self.accounts
            .iter()
            .filter(|a| a.destination != Destination::Doppler)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            ingress: AtomicU64::new(0),
            ingress_v1: AtomicU64::new(0),
            origin_mappings: AtomicU64::new(0),
            egress: AtomicU64::new(0),
            dropped: Default::default(),
            drop_warnings: std::array::from_fn(|_| RateLimit::new(Duration::from_secs(10))),
            doppler_connections: AtomicI64::new(0),
            doppler_v2_streams: AtomicI64::new(0),
            restarts: Default::default(),
            actor_panics: Default::default(),
            panic_logs: std::array::from_fn(|_| RateLimit::new(Duration::from_secs(10))),
            ingress_stream_errors: AtomicU64::new(0),
            sequence_rotations: AtomicU64::new(0),
            binding_polls: AtomicU64::new(0),
            binding_poll_failures: AtomicU64::new(0),
            app_bindings: AtomicU64::new(0),
            app_drains_open: AtomicI64::new(0),
            app_drains_refused: AtomicU64::new(0),
            app_notices: AtomicU64::new(0),
            heaviest: Mutex::default(),
            failovers: AtomicU64::new(0),
            rerouted_batches: AtomicU64::new(0),
            doppler_replays: AtomicU64::new(0),
            doppler_replaying: AtomicI64::new(0),
            peak_buffered_bytes: AtomicU64::new(0),
            connections_by_az: Mutex::default(),
            destination_copies: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            drain_connections: AtomicI64::new(0),
            accounts: Mutex::default(),
            retired: Mutex::default(),
        }
    }

    /// Adds a destination's account to what `/metrics` shows.
    pub fn register(&self, account: Arc<Account>) {
        self.accounts.lock().push(account);
    }

    /// Removes a destination's account (a drain removed by a reload, once it holds nothing):
    /// its series go, its totals stay in the balance.
    pub fn retire(&self, account: &Arc<Account>) {
        let mut accounts = self.accounts.lock();
        let before = accounts.len();
        accounts.retain(|a| !Arc::ptr_eq(a, account));
        if accounts.len() < before {
            let s = account.snapshot();
            debug_assert_eq!(s.buffered, 0, "retired while holding envelopes");
            let mut retired = self.retired.lock();
            match retired.iter_mut().find(|r| r.destination == s.destination) {
                Some(r) => merge(r, &s),
                None => retired.push(s),
            }
        }
    }

    pub fn accounts(&self) -> Vec<Arc<Account>> {
        self.accounts.lock().clone()
    }

    /// The destination a new drain's series are labelled with: its anonymized URL while fewer
    /// than `max_series` URLs have a series of their own, `other` beyond. A removed drain's
    /// series stays (its counters never go back), so its URL keeps counting.
    pub fn drain_destination(
        &self,
        scope: DrainScope,
        url: &str,
        max_series: usize,
    ) -> Destination {
        let accounts = self.accounts.lock();
        let retired = self.retired.lock();
        let live = accounts.iter().map(|a| a.destination().clone());
        let gone = retired.iter().map(|r| r.destination.clone());
        let destinations: Vec<Destination> = live.chain(gone).collect();
        let mut urls: Vec<&str> = destinations
            .iter()
            .filter_map(|d| match d {
                Destination::Drain { url, .. } if url != OTHER_DRAINS => Some(url.as_str()),
                _ => None,
            })
            .collect();
        urls.sort_unstable();
        urls.dedup();
        let url = if urls.contains(&url) || urls.len() < max_series {
            url.to_owned()
        } else {
            OTHER_DRAINS.to_owned()
        };
        Destination::Drain { scope, url }
    }

    /// A connection to a Doppler in `az` opened (`+1`) or closed (`-1`).
    pub fn connection_in_az(&self, az: &str, delta: i64) {
        let mut map = self.connections_by_az.lock();
        let n = map.entry(az.to_owned()).or_default();
        *n += delta;
        if *n == 0 {
            map.remove(az);
        }
    }

    /// Forgets every connection per AZ: the supervisor started over, and its connections count
    /// themselves in again as they come up.
    pub fn reset_connections_by_az(&self) {
        self.connections_by_az.lock().clear();
    }

    /// Counts `n` dropped envelopes and warns at most once per 10 s per reason. The only place
    /// drops are counted, so the log and the counter cannot disagree.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped_because(reason, n, None);
    }

    /// [`Metrics::dropped`], with what went wrong with the latest of them (e.g. which field a v1
    /// envelope lacked, and who sent it) for the warning.
    pub fn dropped_because(
        &self,
        reason: DropReason,
        n: u64,
        detail: Option<&dyn std::fmt::Display>,
    ) {
        if n == 0 {
            return;
        }
        let i = reason.index();
        self.dropped[i].fetch_add(n, Ordering::Relaxed);
        if let Some(times) = self.drop_warnings[i].check() {
            let total = self.dropped[i].load(Ordering::Relaxed);
            let (reason, direction) = (reason.name(), reason.direction());
            match detail {
                Some(d) => tracing::warn!(
                    reason,
                    direction,
                    batches = times,
                    total_dropped = total,
                    latest = %d,
                    "dropping envelopes"
                ),
                None => tracing::warn!(
                    reason,
                    direction,
                    batches = times,
                    total_dropped = total,
                    "dropping envelopes"
                ),
            }
        }
    }

    pub fn restarted(&self, cause: RestartCause) {
        self.restarts[cause.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a panic caught in `actor` (`message` is the panic's) and logs it at most once per
    /// 10 s per actor. The only place panics are counted.
    pub fn panicked(&self, actor: ActorName, message: &str) {
        let i = actor.index();
        let total = self.actor_panics[i].fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(times) = self.panic_logs[i].check() {
            tracing::error!(
                actor = actor.name(),
                panic = message,
                panics = times,
                total_panics = total,
                "an actor panicked (a bug: please report it); it goes on from fresh state"
            );
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        // Taken once: the lock is not reentrant, and a struct literal's temporaries live to its end.
        let retired = self.retired.lock().clone();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            ingress: get(&self.ingress),
            ingress_v1: get(&self.ingress_v1),
            origin_mappings: get(&self.origin_mappings),
            egress: get(&self.egress),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, get(&self.dropped[r.index()])))
                .collect(),
            restarts: RestartCause::ALL
                .iter()
                .map(|c| (*c, get(&self.restarts[c.index()])))
                .collect(),
            actor_panics: ActorName::ALL
                .iter()
                .map(|a| (*a, get(&self.actor_panics[a.index()])))
                .collect(),
            doppler_connections: self.doppler_connections.load(Ordering::Relaxed),
            doppler_v2_streams: self.doppler_v2_streams.load(Ordering::Relaxed),
            failovers: get(&self.failovers),
            rerouted_batches: get(&self.rerouted_batches),
            doppler_replays: get(&self.doppler_replays),
            doppler_replaying: self.doppler_replaying.load(Ordering::Relaxed),
            peak_buffered_bytes: get(&self.peak_buffered_bytes),
            connections_by_az: self.connections_by_az.lock().clone(),
            destination_copies: get(&self.destination_copies),
            filtered: get(&self.filtered),
            drain_connections: self.drain_connections.load(Ordering::Relaxed),
            accounts: self.accounts.lock().iter().map(|a| a.snapshot()).collect(),
            retired_drain_egress: retired.iter().map(|r| r.egress).sum(),
            retired_drain_dropped: retired.iter().map(|r| r.dropped_total()).sum(),
            retired,
        }
    }

    /// Prometheus text exposition (format 0.0.4). `buffered` is the ledger's (envelopes, bytes),
    /// `limit` its budget in force.
    pub fn render(&self, buffered: (u64, u64), limit: usize) -> String {
        const V2: &str = "metric_version=\"2.0\"";
        let s = self.snapshot();
        let one = |labels: &str, v: String| vec![(labels.to_string(), v)];
        let by_direction = |d: &str, version: &str| -> u64 {
            s.dropped
                .iter()
                .filter(|(r, _)| r.direction() == d && r.metric_version() == version)
                .map(|(_, n)| n)
                .sum()
        };
        let drains = drain_series(&s.accounts, &s.retired);
        let per_drain = |f: &dyn Fn(&DrainSeries) -> u64| -> Vec<(String, String)> {
            drains
                .iter()
                .map(|(labels, d)| (labels.clone(), f(d).to_string()))
                .collect()
        };
        let per_destination = |f: &dyn Fn(&AccountSnapshot) -> u64| -> Vec<(String, String)> {
            let mut doppler = s
                .accounts
                .iter()
                .filter(|a| a.destination == Destination::Doppler);
            doppler
                .next()
                .map(|a| ("destination=\"doppler\"".to_string(), f(a).to_string()))
                .into_iter()
                .chain(
                    drains
                        .iter()
                        .map(|(labels, d)| (labels.clone(), f(&d.sum).to_string())),
                )
                .collect()
        };
        let families: Vec<Family> = vec![
            (
                "ingress",
                "counter",
                "Envelopes received (metric_version 1.0: v1 datagrams on UDP).",
                vec![
                    (V2.to_string(), s.ingress.to_string()),
                    (
                        "metric_version=\"1.0\"".to_string(),
                        s.ingress_v1.to_string(),
                    ),
                ],
            ),
            (
                "origin_mappings",
                "counter",
                "Envelopes whose source_id was taken from the origin tag.",
                one(V2, s.origin_mappings.to_string()),
            ),
            (
                "egress",
                "counter",
                "Envelopes written to a Doppler stream and acknowledged by the Doppler; with drain_scope and drain_url, written to that syslog drain's connection.",
                one(V2, s.egress.to_string())
                    .into_iter()
                    .chain(per_drain(&|d| d.sum.egress))
                    .collect(),
            ),
            (
                "dropped",
                "counter",
                "Envelopes dropped, by direction (egress: no Doppler could take them; ingress: shed by the agent); with drain_scope and drain_url, dropped for that syslog drain.",
                [("ingress", "2.0"), ("egress", "2.0"), ("ingress", "1.0")]
                    .iter()
                    .map(|(d, v)| {
                        (
                            format!("direction=\"{d}\",metric_version=\"{v}\""),
                            by_direction(d, v).to_string(),
                        )
                    })
                    .chain(drains.iter().map(|(labels, d)| {
                        (
                            format!("direction=\"egress\",{labels}"),
                            d.sum.dropped_total().to_string(),
                        )
                    }))
                    .collect(),
            ),
            (
                "messages_dropped_per_drain",
                "counter",
                "Envelopes dropped for a syslog drain (upstream's syslog-agent family; the same drops as dropped{drain_url}).",
                drains
                    .iter()
                    .filter(|(_, d)| d.scope.is_some())
                    .map(|(labels, d)| {
                        (
                            format!("direction=\"egress\",{labels}"),
                            d.sum.dropped_total().to_string(),
                        )
                    })
                    .collect(),
            ),
            (
                "egress_expired_total",
                "counter",
                "Envelopes dropped for a destination the forwarder-agent would fan out to (upstream's forwarder-agent family; the same drops as dropped{otlp_endpoint} or dropped{forward_destination}).",
                s.accounts
                    .iter()
                    .filter_map(|a| match &a.destination {
                        Destination::Otlp { endpoint } => Some(("otelcol", endpoint, a)),
                        Destination::Forward { addr } => Some(("", addr, a)),
                        _ => None,
                    })
                    .map(|(protocol, destination, a)| {
                        (
                            format!(
                                "protocol=\"{protocol}\",destination=\"{}\"",
                                escape_label(destination)
                            ),
                            a.dropped_total().to_string(),
                        )
                    })
                    .collect(),
            ),
            (
                "dropped_by_reason",
                "counter",
                "Envelopes dropped, by the named policy that dropped them.",
                s.dropped
                    .iter()
                    .map(|(r, n)| {
                        let labels = format!(
                            "direction=\"{}\",reason=\"{}\",metric_version=\"{}\"",
                            r.direction(),
                            r.name(),
                            r.metric_version()
                        );
                        (labels, n.to_string())
                    })
                    .chain(drains.iter().flat_map(|(labels, d)| {
                        d.sum.dropped.iter().map(move |(r, n)| {
                            (
                                format!("direction=\"egress\",reason=\"{}\",{labels}", r.name()),
                                n.to_string(),
                            )
                        })
                    }))
                    .collect(),
            ),
            (
                "destination_offered",
                "counter",
                "Envelopes handed to a destination (its filter took them): offered = egress + dropped + buffered, per destination.",
                per_destination(&|a| a.offered),
            ),
            (
                "destination_buffered_envelopes",
                "gauge",
                "Envelopes a destination holds, not yet delivered or dropped.",
                per_destination(&|a| a.buffered),
            ),
            (
                "destination_buffered_bytes",
                "gauge",
                "Budget bytes a destination holds (each destination pays for what it holds, shared or not).",
                per_destination(&|a| a.buffered_bytes),
            ),
            (
                "destination_copies",
                "counter",
                "Deliveries owed beyond one per envelope because several destinations take it (ingress + destination_copies = every egress + every dropped + filtered + buffered_envelopes).",
                one("", s.destination_copies.to_string()),
            ),
            (
                "filtered",
                "counter",
                "Envelopes no destination takes (every destination's filter leaves them out): not a loss.",
                one("", s.filtered.to_string()),
            ),
            (
                "drains",
                "gauge",
                "Syslog drains configured, by scope.",
                [DrainScope::Aggregate, DrainScope::App]
                    .iter()
                    .map(|scope| {
                        let n = drains.iter().filter(|(_, d)| d.scope == Some(*scope)).map(|(_, d)| d.drains).sum::<u64>();
                        (format!("drain_scope=\"{}\"", scope.name()), n.to_string())
                    })
                    .collect(),
            ),
            (
                "drain_connections",
                "gauge",
                "Open syslog drain connections.",
                one("", s.drain_connections.to_string()),
            ),
            (
                "doppler_connections",
                "gauge",
                "Open Doppler connections.",
                one(V2, s.doppler_connections.to_string()),
            ),
            (
                "doppler_v2_streams",
                "gauge",
                "Open BatchSender streams to Dopplers.",
                one(V2, s.doppler_v2_streams.to_string()),
            ),
            (
                "doppler_connections_by_az",
                "gauge",
                "Open Doppler connections per Doppler AZ (az=\"\": known only from router_addr).",
                s.connections_by_az
                    .iter()
                    .map(|(az, n)| (format!("az=\"{}\"", escape_label(az)), n.to_string()))
                    .collect(),
            ),
            (
                "doppler_failovers",
                "counter",
                "Failed Doppler connections that reconnected to a different Doppler.",
                one("", s.failovers.to_string()),
            ),
            (
                "doppler_rerouted_batches",
                "counter",
                "Batches queued for a failed connection, carried on to the Doppler it failed over to.",
                one("", s.rerouted_batches.to_string()),
            ),
            (
                "doppler_replays",
                "counter",
                "Doppler connections that started with a backlog and replayed it paced (dopplers.replay_*).",
                one("", s.doppler_replays.to_string()),
            ),
            (
                "doppler_replaying",
                "gauge",
                "Connection slots replaying a backlog now, paced.",
                one("", s.doppler_replaying.to_string()),
            ),
            (
                "doppler_connection_restarts",
                "counter",
                "Doppler connection actors restarted, by cause.",
                s.restarts
                    .iter()
                    .map(|(c, n)| (format!("cause=\"{}\"", c.name()), n.to_string()))
                    .collect(),
            ),
            (
                "actor_panics",
                "counter",
                "Panics caught inside an actor (a bug), which went on from fresh state.",
                s.actor_panics
                    .iter()
                    .map(|(a, n)| (format!("actor=\"{}\"", a.name()), n.to_string()))
                    .collect(),
            ),
            (
                "buffered_envelopes",
                "gauge",
                "Envelopes admitted and not yet written to a Doppler or dropped.",
                one("", buffered.0.to_string()),
            ),
            (
                "buffered_bytes",
                "gauge",
                "Budget bytes held by buffered envelopes (see pipeline.max_buffered_bytes).",
                one("", buffered.1.to_string()),
            ),
            (
                "buffered_bytes_peak",
                "gauge",
                "The most budget bytes ever held at once (never above pipeline.max_buffered_bytes).",
                one("", s.peak_buffered_bytes.to_string()),
            ),
            (
                "buffered_bytes_limit",
                "gauge",
                "The byte budget in force (pipeline.max_buffered_bytes; a reload may change it).",
                one("", limit.to_string()),
            ),
            (
                "ingress_stream_errors",
                "counter",
                "Emitter streams ended by a malformed or oversize message.",
                one(
                    "",
                    self.ingress_stream_errors
                        .load(Ordering::Relaxed)
                        .to_string(),
                ),
            ),
            (
                "sequence_stream_rotations",
                "counter",
                "Times the per-source sequence table filled and a new sequence stream began.",
                one(
                    "",
                    self.sequence_rotations.load(Ordering::Relaxed).to_string(),
                ),
            ),
            (
                "binding_cache_polls",
                "counter",
                "Polls of syslog.binding_cache, by result (a failed one keeps the last good answer).",
                vec![
                    (
                        "result=\"ok\"".to_string(),
                        self.binding_polls.load(Ordering::Relaxed).to_string(),
                    ),
                    (
                        "result=\"failed\"".to_string(),
                        self.binding_poll_failures.load(Ordering::Relaxed).to_string(),
                    ),
                ],
            ),
            (
                "app_bindings",
                "gauge",
                "Applications the binding cache's last good answer binds drains to.",
                one("", self.app_bindings.load(Ordering::Relaxed).to_string()),
            ),
            (
                "app_drains_open",
                "gauge",
                "App drain connections open (their application sent within syslog.idle_drain_timeout_ms).",
                one("", self.app_drains_open.load(Ordering::Relaxed).to_string()),
            ),
            (
                "app_drains_refused",
                "counter",
                "App drains not opened because syslog.max_app_drains were open.",
                one("", self.app_drains_refused.load(Ordering::Relaxed).to_string()),
            ),
            (
                "app_notices",
                "counter",
                "Notices (LGR log lines: drain losses, failed connections, rate limits) sent into sources' streams.",
                one("", self.app_notices.load(Ordering::Relaxed).to_string()),
            ),
            (
                "heaviest_source_envelopes",
                "gauge",
                "The heaviest sources now (at most limits.top_sources; series come and go with the ranking): envelopes/s offered.",
                self.heaviest_series(|h| h.envelopes_per_second),
            ),
            (
                "heaviest_source_bytes",
                "gauge",
                "The same sources: bytes/s offered.",
                self.heaviest_series(|h| h.bytes_per_second),
            ),
            (
                "heaviest_source_dropped",
                "gauge",
                "The same sources: envelopes/s refused (fair_share + source_rate_limited; /readyz and the state dump split them).",
                self.heaviest_series(|h| h.fair_share_per_second + h.rate_limited_per_second),
            ),
        ];
        let mut out = String::with_capacity(4096);
        for (name, kind, help, samples) in &families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        }
        out
    }
}

impl Metrics {
    /// The edge's latest report of the heaviest sources.
    pub fn set_heaviest(&self, heaviest: Vec<Heavy>) {
        *self.heaviest.lock() = heaviest;
    }

    pub fn heaviest(&self) -> Vec<Heavy> {
        self.heaviest.lock().clone()
    }

    /// One series per heaviest source, `{rank, source_id}`, of `value`.
    fn heaviest_series(&self, value: impl Fn(&Heavy) -> f64) -> Vec<(String, String)> {
        self.heaviest
            .lock()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                (
                    format!(
                        "rank=\"{}\",source_id=\"{}\"",
                        i + 1,
                        escape_label(&h.source_id)
                    ),
                    format!("{:.1}", value(h)),
                )
            })
            .collect()
    }
}

/// Drains summed by their series' labels (drains beyond `syslog.max_drain_series` share one).
struct DrainSeries {
    /// `None`: not a syslog drain (an OTLP collector, a downstream v2 agent).
    scope: Option<DrainScope>,
    /// Drains counted in this series.
    drains: u64,
    sum: AccountSnapshot,
}

/// Drains summed by their series' labels: the live ones, and the removed ones (`retired`, which
/// count towards the totals but not towards `drains`).
fn drain_series(
    accounts: &[AccountSnapshot],
    retired: &[AccountSnapshot],
) -> BTreeMap<String, DrainSeries> {
    let mut out: BTreeMap<String, DrainSeries> = BTreeMap::new();
    let live = accounts.iter().map(|a| (a, 1));
    for (a, count) in live.chain(retired.iter().map(|a| (a, 0))) {
        let scope = match &a.destination {
            Destination::Drain { scope, .. } => Some(*scope),
            Destination::Otlp { .. } | Destination::Forward { .. } => None,
            Destination::Doppler => continue,
        };
        let labels = a.destination.labels();
        match out.get_mut(&labels) {
            None => {
                out.insert(
                    labels,
                    DrainSeries {
                        scope,
                        drains: count,
                        sum: a.clone(),
                    },
                );
            }
            Some(d) => {
                d.drains += count;
                merge(&mut d.sum, a);
            }
        }
    }
    out
}

/// Adds `a`'s counts to `into`.
fn merge(into: &mut AccountSnapshot, a: &AccountSnapshot) {
    into.offered += a.offered;
    into.egress += a.egress;
    into.buffered += a.buffered;
    into.buffered_bytes += a.buffered_bytes;
    into.connections += a.connections;
    for (r, n) in &a.dropped {
        match into.dropped.iter_mut().find(|(x, _)| x == r) {
            Some((_, m)) => *m += n,
            None => into.dropped.push((*r, *n)),
        }
    }
}

/// Prometheus label value escaping: backslash, double quote, newline.
pub(crate) fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_upstream_names_and_sums_directions() {
        let m = Metrics::new();
        m.ingress.fetch_add(10, Ordering::Relaxed);
        m.dropped(DropReason::PipelineFull, 2);
        m.dropped(DropReason::Oversize, 1);
        m.dropped(DropReason::SignerQueueFull, 3);
        let text = m.render((0, 0), 1 << 20);
        assert!(text.contains("ingress{metric_version=\"2.0\"} 10\n"));
        assert!(text.contains("dropped{direction=\"ingress\",metric_version=\"2.0\"} 3\n"));
        assert!(text.contains("dropped{direction=\"egress\",metric_version=\"2.0\"} 3\n"));
        assert!(text.contains("reason=\"pipeline_full\""));
        assert_eq!(m.snapshot().dropped_total(), 6);
        // v1 datagrams: their own ingress and ingress-drop samples, as upstream labels them.
        m.ingress_v1.fetch_add(4, Ordering::Relaxed);
        m.dropped(DropReason::V1Undecodable, 1);
        m.dropped(DropReason::UdpBufferFull, 1);
        let text = m.render((0, 0), 1 << 20);
        assert!(
            text.contains("ingress{metric_version=\"1.0\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("dropped{direction=\"ingress\",metric_version=\"1.0\"} 2\n"));
        assert!(text.contains("dropped{direction=\"ingress\",metric_version=\"2.0\"} 3\n"));
        assert!(text.contains(
            "dropped_by_reason{direction=\"ingress\",reason=\"v1_undecodable\",metric_version=\"1.0\"} 1\n"
        ));
        assert_eq!(m.snapshot().ingress_total(), 14);
        m.connection_in_az("z\"1", 2);
        m.connection_in_az("z2", 1);
        m.connection_in_az("z2", -1);
        let text = m.render((0, 0), 1 << 20);
        assert!(
            text.contains("doppler_connections_by_az{az=\"z\\\"1\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("az=\"z2\""), "closed AZs disappear");
    }
}
