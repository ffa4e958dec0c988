//! The YAML config: parse → validate → typed [`Config`]. The only caller of `serde_yaml`.
//!
//! Every error names the YAML key it is about (`dopplers.endpoints[1].addr: ...`) so an operator can
//! fix the file from one line on stderr; `main` exits with code 64 on any of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::envelope::pacer::ReplayRate;
use crate::envelope::tag::{MAX_KEY_ID, TAG};

mod changes;
pub mod limits;
pub mod otlp;
pub mod syslog;

pub use changes::{Changes, Live, RESTART_SIGNING, RESTART_SIGNING_ENABLED};
pub use limits::{Limit, LimitsConfig};
pub use otlp::{OtlpConfig, OtlpSecurity, Retry};
pub use syslog::{AggregateDrain, BindingCache, SyslogConfig};

pub use crate::telemetry::logging::LogFormat;

/// The largest message a Doppler (and this agent's ingress) accepts.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// The largest byte budget accepted: far beyond any sensible setting, and well inside what the
/// ledger's semaphore can count.
const MAX_BUFFERED_BYTES: usize = 16 << 30;

/// The most `dopplers.replay_extra_percent` may say: 11 × the live rate.
const MAX_REPLAY_EXTRA_PERCENT: u32 = 1_000;
/// The most `dopplers.replay_min_rate` may say.
const MAX_REPLAY_MIN_RATE: u32 = 1_000_000;

/// A config problem, always tied to the YAML key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// Dotted YAML path, e.g. `dopplers.tls.ca`; `<file>` for the file as a whole.
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// The validated config the agent runs from. Built only by [`Config::load`] / [`Config::from_yaml`].
#[derive(Debug, Clone)]
pub struct Config {
    pub identity: Identity,
    /// Default tags added where an envelope lacks the key (identity tags first, then `tags:`).
    pub default_tags: BTreeMap<String, String>,
    pub ingress: IngressConfig,
    pub dopplers: DopplersConfig,
    pub metrics: MetricsConfig,
    /// The `signing:` section's keys, when it names one (it must while signing is on). `None`
    /// without the section: the agent then signs with a random per-process key.
    pub signing: Option<SigningConfig>,
    /// `signing.enabled`: envelopes carry a signature in their `metron` tag (default true).
    pub signing_enabled: bool,
    /// `sequencing.enabled`: envelopes carry their stream and number in their `metron` tag
    /// (default true).
    pub sequencing_enabled: bool,
    pub pipeline: PipelineConfig,
    pub shutdown_grace: Duration,
    pub log: LogConfig,
    pub health: HealthConfig,
    pub development: DevelopmentConfig,
    /// Syslog drains beside the Doppler pool.
    pub syslog: SyslogConfig,
    /// Per-source rate limits (off by default).
    pub limits: LimitsConfig,
    /// An OpenTelemetry collector beside the Doppler pool (`None`: none).
    pub otlp: Option<OtlpConfig>,
    /// `forwarding.ingress_port_glob`: where downstream agents announce their ports (`None`:
    /// no fan-out to them).
    pub ingress_port_glob: Option<String>,
}

/// `log`: what the agent writes about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter (`info`, `warn,metron=debug`); live on SIGHUP.
    pub level: String,
    pub format: LogFormat,
}

/// `health`: liveness and readiness for a supervisor (monit, systemd, a load balancer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Where `GET /livez` and `GET /readyz` are served; `None` turns the endpoint off.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(default)]
    pub deployment: String,
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub index: String,
    #[serde(default)]
    pub ip: String,
    /// The agent's availability zone: Dopplers with the same `az` are preferred.
    #[serde(default)]
    pub az: String,
}

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub listen: SocketAddr,
    /// `None` only in development mode, where credentials are generated at start-up.
    pub tls: Option<TlsFiles>,
    /// The longest an emitter's call waits for room in the pipeline before its envelopes are dropped.
    pub max_wait: Duration,
    /// v1 (dropsonde) datagrams; `None` when `ingress.udp.enabled` is false.
    pub udp: Option<UdpIngressConfig>,
}

/// `ingress.udp`: legacy emitters' v1 envelopes, one per datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpIngressConfig {
    /// A loopback address: dropsonde has no authentication, so upstream listens on 127.0.0.1 only.
    pub listen: SocketAddr,
    /// Bytes of datagrams received and not yet converted; beyond it new datagrams are dropped
    /// (`udp_buffer_full`) rather than left to overflow the kernel's socket buffer uncounted.
    pub buffer_bytes: NonZeroUsize,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DopplersConfig {
    /// Where the Dopplers are: a fixed list, or DNS names re-resolved while running.
    pub source: DopplerSource,
    pub tls: Option<TlsFiles>,
    /// The name the Doppler's certificate must be valid for.
    pub server_name: String,
    /// How many Doppler connections (each one actor, one HTTP/2 connection, one BatchSender stream).
    pub connections: NonZeroUsize,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often the supervisor reviews where its connections are: it moves at most one per
    /// interval (back to the local AZ, off a retired Doppler, onto an unused one, or a periodic
    /// recycle).
    pub rebalance_interval: Duration,
    /// A slot whose data makes no progress for this long (nothing taken from a non-empty queue,
    /// or a stream left unacknowledged) has its connection replaced.
    pub progress_timeout: Duration,
    /// A stream is ended and acknowledged by its Doppler at most this long after it first
    /// carried data; until then its envelopes are in flight.
    pub ack_interval: Duration,
    /// ... or once it has carried this many budget bytes.
    pub ack_bytes: NonZeroUsize,
    /// Every connection is recycled (gracefully) after about this long, jittered; `None` = never.
    pub recycle_interval: Option<Duration>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub batch_max_envelopes: NonZeroUsize,
    pub batch_max_bytes: NonZeroUsize,
    /// A connection that starts with a backlog sends at most this much more than the live rate
    /// until the backlog is gone, in percent of the live rate (decisions.md 25).
    pub replay_extra_percent: u32,
    /// ... and at least this many envelopes a second, the agent's connections together, however
    /// quiet the live traffic.
    pub replay_min_rate: NonZeroU32,
    /// Upstream's `disable_logs`: no v2 `Log` envelope goes to a Doppler (counters, gauges,
    /// timers and events still do); logs reach Log Cache through a syslog drain instead.
    pub disable_logs: bool,
}

impl DopplersConfig {
    /// The kinds of envelope the Doppler pool takes.
    pub fn kinds(&self) -> crate::envelope::Kinds {
        use crate::envelope::{Kind, Kinds};
        if self.disable_logs {
            Kinds::ALL.without(Kind::Log)
        } else {
            Kinds::ALL
        }
    }
}

impl DopplersConfig {
    /// The replay pace of one of `slots` connection slots (`connections` needs a restart, so
    /// a reload passes the running count).
    pub fn replay_rate(&self, slots: usize) -> ReplayRate {
        ReplayRate {
            extra: f64::from(self.replay_extra_percent) / 100.0,
            floor: f64::from(self.replay_min_rate.get()) / slots.max(1) as f64,
        }
    }
}

/// Where the Dopplers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DopplerSource {
    /// No `dopplers` section: no Doppler pool (a drain takes the envelopes).
    None,
    /// `dopplers.endpoints`: a fixed list, each with its AZ.
    Static(Vec<EndpointConfig>),
    /// `dopplers.router_addr` (every Doppler) and optionally `dopplers.router_addr_with_az` (the
    /// local AZ's), both `host:port`, re-resolved every `resolve_interval` and after a failure.
    Dns {
        router_addr: String,
        router_addr_with_az: Option<String>,
        resolve_interval: Duration,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `host:port`; resolved when a connection is made.
    pub addr: String,
    #[serde(default)]
    pub az: String,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Where `/metrics` is served; `None` turns the endpoint off.
    pub listen: Option<SocketAddr>,
    /// Serve `/metrics` over mTLS (client certificate required, verified against `ca`), as
    /// upstream's default deployment does; plain HTTP when `None`.
    pub tls: Option<TlsFiles>,
    /// How often the agent's own counters are also sent through the pipeline as envelopes
    /// (source_id `metron`); `None` = never.
    pub envelope_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningConfig {
    /// Signs every envelope.
    pub key_id: String,
    pub key: Vec<u8>,
    /// `signing.previous_keys`: keys retired by a rotation, (key id, key). The agent no longer
    /// signs with them, but envelopes it signed before the rotation may still be buffered or in
    /// flight, so receivers must keep accepting them; listed here so a receiver's key ring can be
    /// derived from the agent's config ([`crate::envelope::signing::KeyRing`]).
    pub previous_keys: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Budget of encoded envelope bytes admitted and not yet written to a Doppler or dropped.
    pub max_buffered_bytes: NonZeroUsize,
    /// Capacity, in batches, of each actor mailbox on the data path.
    pub mailbox_capacity: NonZeroUsize,
    /// Per-source sequence state kept before a new sequence stream is started.
    pub max_sources: NonZeroUsize,
    /// Counter-total keys kept before the table is reset (upstream: 10,000).
    pub max_counter_keys: NonZeroUsize,
    /// The Linux scheduling policy the daemon's threads run under.
    pub scheduling: Scheduling,
}

/// `pipeline.scheduling`: the Linux scheduling policy of every thread of the daemon (decision 21).
/// Set by `metron --config` before its first thread starts; a library [`crate::Agent`] leaves
/// its caller's policy alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_BATCH` at the same priority as `SCHED_OTHER`: a thread of the agent that wakes never
    /// preempts the thread running on that core (an app's, or the agent's other thread); it runs
    /// when that thread sleeps or its time slice ends, or on an idle core.
    Batch,
    /// Whatever policy the process was started with (systemd's `CPUSchedulingPolicy=`, `chrt`;
    /// normally `SCHED_OTHER`).
    Inherit,
}

impl Scheduling {
    /// Parses the config spelling: `"batch"` or `"inherit"`.
    pub fn parse(s: &str) -> Option<Scheduling> {
        match s {
            "batch" => Some(Scheduling::Batch),
            "inherit" => Some(Scheduling::Inherit),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevelopmentConfig {
    /// Generate a throwaway CA and certificates for any `tls:` block that is absent.
    pub enabled: bool,
    pub credentials_dir: PathBuf,
    /// Run an in-process development Doppler here that logs what it receives.
    pub doppler_listen: Option<SocketAddr>,
}

// ---------------------------------------------------------------------------------------------
// The YAML shape. Defaults are named functions so the README and the code cannot disagree.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    identity: Identity,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    ingress: RawIngress,
    #[serde(default)]
    dopplers: Option<RawDopplers>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    signing: Option<RawSigning>,
    #[serde(default)]
    sequencing: RawSequencing,
    #[serde(default)]
    pipeline: RawPipeline,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    log: Option<RawLog>,
    /// The old name of `log`, still accepted.
    #[serde(default)]
    logging: Option<RawLog>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    development: RawDevelopment,
    #[serde(default)]
    syslog: syslog::RawSyslog,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    otlp: Option<otlp::RawOtlp>,
    #[serde(default)]
    forwarding: RawForwarding,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarding {
    #[serde(default)]
    ingress_port_glob: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngress {
    grpc: RawGrpcIngress,
    #[serde(default)]
    udp: RawUdpIngress,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUdpIngress {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_udp_listen")]
    listen: String,
    #[serde(default = "default_udp_buffer_bytes")]
    buffer_bytes: NonZeroUsize,
}

impl Default for RawUdpIngress {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_udp_listen(),
            buffer_bytes: default_udp_buffer_bytes(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_udp_listen() -> String {
    "127.0.0.1:3457".into()
}
fn default_udp_buffer_bytes() -> NonZeroUsize {
    NonZeroUsize::new(4 * 1024 * 1024).unwrap()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcIngress {
    #[serde(default = "default_ingress_listen")]
    listen: String,
    #[serde(default)]
    tls: Option<TlsFiles>,
    #[serde(default = "default_ingress_max_wait_ms")]
    max_wait_ms: u64,
}

fn default_ingress_listen() -> String {
    "127.0.0.1:3458".into()
}
fn default_ingress_max_wait_ms() -> u64 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDopplers {
    #[serde(default)]
    endpoints: Vec<EndpointConfig>,
    #[serde(default)]
    router_addr: Option<String>,
    #[serde(default)]
    router_addr_with_az: Option<String>,
    #[serde(default = "default_resolve_interval_ms")]
    resolve_interval_ms: NonZeroU64,
    #[serde(default)]
    tls: Option<RawDopplerTls>,
    #[serde(default = "default_connections")]
    connections: NonZeroUsize,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: NonZeroU64,
    #[serde(default = "default_backoff_initial_ms")]
    backoff_initial_ms: NonZeroU64,
    #[serde(default = "default_backoff_max_ms")]
    backoff_max_ms: NonZeroU64,
    #[serde(default = "default_rebalance_interval_ms")]
    rebalance_interval_ms: NonZeroU64,
    #[serde(default = "default_progress_timeout_ms")]
    progress_timeout_ms: NonZeroU64,
    #[serde(default = "default_ack_interval_ms")]
    ack_interval_ms: NonZeroU64,
    #[serde(default = "default_ack_bytes")]
    ack_bytes: NonZeroUsize,
    #[serde(default = "default_recycle_interval_ms")]
    recycle_interval_ms: u64,
    #[serde(default = "default_keepalive_interval_ms")]
    keepalive_interval_ms: NonZeroU64,
    #[serde(default = "default_keepalive_timeout_ms")]
    keepalive_timeout_ms: NonZeroU64,
    #[serde(default = "default_batch_max_envelopes")]
    batch_max_envelopes: NonZeroUsize,
    #[serde(default = "default_batch_max_bytes")]
    batch_max_bytes: NonZeroUsize,
    #[serde(default = "default_replay_extra_percent")]
    replay_extra_percent: u32,
    #[serde(default = "default_replay_min_rate")]
    replay_min_rate: NonZeroU32,
    #[serde(default)]
    disable_logs: bool,
}

/// The section when the YAML leaves it out: no Dopplers at all (another destination must be
/// configured; [`RawConfig::validate`] checks it).
impl Default for RawDopplers {
    fn default() -> Self {
        Self {
            endpoints: Default::default(),
            router_addr: Default::default(),
            router_addr_with_az: Default::default(),
            resolve_interval_ms: default_resolve_interval_ms(),
            tls: Default::default(),
            connections: default_connections(),
            connect_timeout_ms: default_connect_timeout_ms(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            rebalance_interval_ms: default_rebalance_interval_ms(),
            progress_timeout_ms: default_progress_timeout_ms(),
            ack_interval_ms: default_ack_interval_ms(),
            ack_bytes: default_ack_bytes(),
            recycle_interval_ms: default_recycle_interval_ms(),
            keepalive_interval_ms: default_keepalive_interval_ms(),
            keepalive_timeout_ms: default_keepalive_timeout_ms(),
            batch_max_envelopes: default_batch_max_envelopes(),
            batch_max_bytes: default_batch_max_bytes(),
            replay_extra_percent: default_replay_extra_percent(),
            replay_min_rate: default_replay_min_rate(),
            disable_logs: Default::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDopplerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_server_name")]
    server_name: String,
}

fn default_server_name() -> String {
    "doppler".into()
}
fn default_connections() -> NonZeroUsize {
    NonZeroUsize::new(5).unwrap()
}
fn default_connect_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(2_000).unwrap()
}
fn default_backoff_initial_ms() -> NonZeroU64 {
    NonZeroU64::new(50).unwrap()
}
/// Capped low so delivery resumes within ~200 ms of a Doppler coming back; a refused dial costs
/// next to nothing, and the warnings about it are rate-limited.
fn default_backoff_max_ms() -> NonZeroU64 {
    NonZeroU64::new(150).unwrap()
}
fn default_resolve_interval_ms() -> NonZeroU64 {
    NonZeroU64::new(5_000).unwrap()
}
fn default_ack_interval_ms() -> NonZeroU64 {
    NonZeroU64::new(1_000).unwrap()
}
fn default_ack_bytes() -> NonZeroUsize {
    NonZeroUsize::new(1024 * 1024).unwrap()
}
/// Upstream recycles after ~100k writes; decision 12 says why metron uses time.
fn default_recycle_interval_ms() -> u64 {
    600_000
}
fn default_progress_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(2_000).unwrap()
}
fn default_rebalance_interval_ms() -> NonZeroU64 {
    NonZeroU64::new(200).unwrap()
}
fn default_keepalive_interval_ms() -> NonZeroU64 {
    NonZeroU64::new(15_000).unwrap()
}
fn default_keepalive_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(15_000).unwrap()
}
fn default_batch_max_envelopes() -> NonZeroUsize {
    NonZeroUsize::new(1_000).unwrap()
}
fn default_batch_max_bytes() -> NonZeroUsize {
    NonZeroUsize::new(1024 * 1024).unwrap()
}
/// `dopplers.replay_extra_percent` when not configured (decisions.md 25 says why).
pub const DEFAULT_REPLAY_EXTRA_PERCENT: u32 = 50;
/// `dopplers.replay_min_rate` when not configured.
pub const DEFAULT_REPLAY_MIN_RATE: u32 = 100;

fn default_replay_extra_percent() -> u32 {
    DEFAULT_REPLAY_EXTRA_PERCENT
}
fn default_replay_min_rate() -> NonZeroU32 {
    NonZeroU32::new(DEFAULT_REPLAY_MIN_RATE).expect("not zero")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default = "default_metrics_listen")]
    listen: Option<String>,
    #[serde(default)]
    envelope_interval_ms: Option<NonZeroU64>,
    #[serde(default)]
    tls: Option<TlsFiles>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            envelope_interval_ms: None,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_health_listen")]
    listen: Option<String>,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            listen: default_health_listen(),
        }
    }
}

fn default_health_listen() -> Option<String> {
    Some("127.0.0.1:14825".into())
}

fn default_metrics_listen() -> Option<String> {
    Some("127.0.0.1:14824".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    #[serde(default = "default_true")]
    enabled: bool,
    /// Required while `enabled`.
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    previous_keys: Vec<RawSigningKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSequencing {
    #[serde(default = "default_true")]
    enabled: bool,
}

impl Default for RawSequencing {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigningKey {
    key_id: String,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    #[serde(default = "default_max_buffered_bytes")]
    max_buffered_bytes: NonZeroUsize,
    #[serde(default = "default_mailbox_capacity")]
    mailbox_capacity: NonZeroUsize,
    #[serde(default = "default_max_sources")]
    max_sources: NonZeroUsize,
    #[serde(default = "default_max_counter_keys")]
    max_counter_keys: NonZeroUsize,
    #[serde(default = "default_scheduling")]
    scheduling: String,
}

impl Default for RawPipeline {
    fn default() -> Self {
        Self {
            max_buffered_bytes: default_max_buffered_bytes(),
            mailbox_capacity: default_mailbox_capacity(),
            max_sources: default_max_sources(),
            max_counter_keys: default_max_counter_keys(),
            scheduling: default_scheduling(),
        }
    }
}

fn default_max_buffered_bytes() -> NonZeroUsize {
    NonZeroUsize::new(32 * 1024 * 1024).unwrap()
}
fn default_mailbox_capacity() -> NonZeroUsize {
    NonZeroUsize::new(1024).unwrap()
}
fn default_max_sources() -> NonZeroUsize {
    NonZeroUsize::new(100_000).unwrap()
}
fn default_max_counter_keys() -> NonZeroUsize {
    NonZeroUsize::new(10_000).unwrap()
}
fn default_scheduling() -> String {
    "batch".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(default = "default_grace_period_ms")]
    grace_period_ms: NonZeroU32,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self {
            grace_period_ms: default_grace_period_ms(),
        }
    }
}

fn default_grace_period_ms() -> NonZeroU32 {
    NonZeroU32::new(5_000).unwrap()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_log_level")]
    level: String,
    #[serde(default = "default_log_format")]
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> String {
    "text".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDevelopment {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "default_credentials_dir")]
    credentials_dir: PathBuf,
    #[serde(default)]
    doppler_listen: Option<String>,
}

fn default_credentials_dir() -> PathBuf {
    PathBuf::from(".metron-dev")
}

// ---------------------------------------------------------------------------------------------

impl Config {
    /// Reads and validates the config file at `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key at fault, or `<file>` when the file cannot be read.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("<file>", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and validates YAML text; relative paths are taken as they are (relative to the
    /// working directory, as operators write them in job specs).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key at fault.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
        raw.validate()
    }
}

/// serde_yaml's messages read `ingress.grpc: unknown field `lisen`, ...`; turn them into the same
/// `key: problem` shape as every other error, naming the full key where the message names a field.
fn yaml_error(e: serde_yaml::Error) -> ConfigError {
    let msg = e.to_string();
    let (path, problem) = match msg.split_once(": ") {
        Some((key, problem)) if !key.contains(' ') => (key.to_string(), problem.to_string()),
        _ => (String::new(), msg),
    };
    let field = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|p| problem.strip_prefix(p))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    let key = match (path.is_empty(), field) {
        (true, Some(f)) => f.to_string(),
        (false, Some(f)) => format!("{path}.{f}"),
        (true, None) => "<file>".to_string(),
        (false, None) => path,
    };
    ConfigError::new(key, problem)
}

fn parse_socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::new(key, format!("{value:?} is not an ip:port address")))
}

fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// Checks the id the agent signs with: it travels in every envelope's `metron` tag, whose budget
/// (56 bytes) leaves it [`MAX_KEY_ID`] characters, and it must not need escaping there.
/// `eph`, the id of the random per-process key, is reserved: envelopes signed with a configured
/// key must not look like ones nobody can verify.
fn check_signing_key_id(key_id: &str) -> Result<(), ConfigError> {
    let fits = (1..=MAX_KEY_ID).contains(&key_id.len())
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !fits {
        return Err(ConfigError::new(
            "signing.key_id",
            format!(
                "{key_id:?} must be 1 to {MAX_KEY_ID} characters of A-Z, a-z, 0-9, '-' and '_': \
                 it is written into every envelope's metron tag"
            ),
        ));
    }
    if key_id == crate::EPHEMERAL_KEY_ID {
        return Err(ConfigError::new(
            "signing.key_id",
            format!(
                "{key_id:?} is reserved for the random key of an agent without a signing section"
            ),
        ));
    }
    Ok(())
}

/// Reads a signing key (`<at>.key_file`; one trailing newline is not part of it) and checks its
/// id (`<at>.key_id`) as `metron_sig` needs it: the id the agent signs with is checked further
/// by [`check_signing_key_id`]; previous keys' ids may be anything an older agent signed
/// `metron_sig` with.
fn read_signing_key(at: &str, key_id: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    if key_id.is_empty() || key_id.contains(':') {
        return Err(ConfigError::new(
            format!("{at}.key_id"),
            "must be non-empty and contain no ':'",
        ));
    }
    let mut key = std::fs::read(path).map_err(|e| {
        ConfigError::new(
            format!("{at}.key_file"),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if key.last() == Some(&b'\n') {
        key.pop();
    }
    if key.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.key_file"),
            "the key is empty",
        ));
    }
    Ok(key)
}

fn check_tls_files(key: &str, tls: &TlsFiles) -> Result<(), ConfigError> {
    check_readable(&format!("{key}.ca"), &tls.ca)?;
    check_readable(&format!("{key}.cert"), &tls.cert)?;
    check_readable(&format!("{key}.key"), &tls.key)
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let development = DevelopmentConfig {
            enabled: self.development.enabled,
            credentials_dir: self.development.credentials_dir,
            doppler_listen: self
                .development
                .doppler_listen
                .as_deref()
                .map(|a| parse_socket_addr("development.doppler_listen", a))
                .transpose()?,
        };

        for (k, v) in [
            ("identity.deployment", &self.identity.deployment),
            ("identity.job", &self.identity.job),
            ("identity.index", &self.identity.index),
            ("identity.ip", &self.identity.ip),
        ] {
            if v.is_empty() {
                return Err(ConfigError::new(k, "must not be empty"));
            }
        }
        // Identity tags come first; `tags:` may add more but not silently replace them.
        let mut default_tags = BTreeMap::new();
        default_tags.insert("deployment".into(), self.identity.deployment.clone());
        default_tags.insert("job".into(), self.identity.job.clone());
        default_tags.insert("index".into(), self.identity.index.clone());
        default_tags.insert("ip".into(), self.identity.ip.clone());
        for (k, v) in self.tags {
            if k.is_empty() {
                return Err(ConfigError::new("tags", "a tag name must not be empty"));
            }
            if k == TAG || k.starts_with("metron_") {
                return Err(ConfigError::new(
                    format!("tags.{k}"),
                    "metron and the metron_ prefix are reserved for the agent's own tags",
                ));
            }
            if default_tags.contains_key(&k) {
                return Err(ConfigError::new(
                    format!("tags.{k}"),
                    "already set from identity; change it there",
                ));
            }
            default_tags.insert(k, v);
        }

        let u = self.ingress.udp;
        let udp = if u.enabled {
            let listen = parse_socket_addr("ingress.udp.listen", &u.listen)?;
            if !listen.ip().is_loopback() {
                return Err(ConfigError::new(
                    "ingress.udp.listen",
                    format!(
                        "{listen} is not a loopback address: v1 datagrams carry no authentication, \
                         so the agent takes them from this machine only (as upstream does)"
                    ),
                ));
            }
            if u.buffer_bytes.get() < 65_535 {
                return Err(ConfigError::new(
                    "ingress.udp.buffer_bytes",
                    format!(
                        "{} is below 65535: the largest datagram must fit",
                        u.buffer_bytes
                    ),
                ));
            }
            Some(UdpIngressConfig {
                listen,
                buffer_bytes: u.buffer_bytes,
            })
        } else {
            None
        };
        let g = self.ingress.grpc;
        let ingress_tls = match g.tls {
            Some(t) => {
                check_tls_files("ingress.grpc.tls", &t)?;
                Some(t)
            }
            None if development.enabled => None,
            None => {
                return Err(ConfigError::new(
                    "ingress.grpc.tls",
                    "missing (required unless development.enabled is true)",
                ))
            }
        };
        if g.max_wait_ms > 10_000 {
            return Err(ConfigError::new(
                "ingress.grpc.max_wait_ms",
                format!(
                    "{} is above 10000: emitters must not be stalled that long",
                    g.max_wait_ms
                ),
            ));
        }
        let ingress = IngressConfig {
            listen: parse_socket_addr("ingress.grpc.listen", &g.listen)?,
            tls: ingress_tls,
            max_wait: Duration::from_millis(g.max_wait_ms),
            udp,
        };

        // Without a `dopplers` section the agent has no Doppler pool: another destination must
        // take its envelopes.
        let no_dopplers = self.dopplers.is_none();
        let other_destination = self.syslog.has_drains()
            || self.otlp.is_some()
            || self.forwarding.ingress_port_glob.is_some();
        if no_dopplers && !other_destination {
            return Err(ConfigError::new(
                "dopplers",
                "missing: configure Dopplers, a syslog.aggregate_drains entry, \
                 syslog.binding_cache, otlp or forwarding.ingress_port_glob",
            ));
        }
        let d = self.dopplers.unwrap_or_default();
        let host_port = |key: String, addr: &str| {
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if ok {
                Ok(())
            } else {
                Err(ConfigError::new(
                    key,
                    format!("{addr:?} is not a host:port address"),
                ))
            }
        };
        let source = match (d.endpoints.is_empty(), d.router_addr) {
            _ if no_dopplers => DopplerSource::None,
            (true, None) => {
                return Err(ConfigError::new(
                    "dopplers",
                    "set either endpoints (a list) or router_addr (a DNS name)",
                ))
            }
            (false, Some(_)) => {
                return Err(ConfigError::new(
                    "dopplers.router_addr",
                    "set either endpoints or router_addr, not both",
                ))
            }
            (false, None) => {
                if d.router_addr_with_az.is_some() {
                    return Err(ConfigError::new(
                        "dopplers.router_addr_with_az",
                        "needs dopplers.router_addr (it names the local AZ's share of those Dopplers)",
                    ));
                }
                for (i, ep) in d.endpoints.iter().enumerate() {
                    host_port(format!("dopplers.endpoints[{i}].addr"), &ep.addr)?;
                }
                DopplerSource::Static(d.endpoints)
            }
            (true, Some(router_addr)) => {
                use crate::routing::discovery::{encode_az_addr, split_host_port};
                split_host_port(&router_addr)
                    .map_err(|e| ConfigError::new("dopplers.router_addr", e.to_string()))?;
                if let Some(a) = &d.router_addr_with_az {
                    encode_az_addr(a).map_err(|e| {
                        ConfigError::new("dopplers.router_addr_with_az", e.to_string())
                    })?;
                }
                DopplerSource::Dns {
                    router_addr,
                    router_addr_with_az: d.router_addr_with_az,
                    resolve_interval: Duration::from_millis(d.resolve_interval_ms.get()),
                }
            }
        };
        let (doppler_tls, server_name) = match d.tls {
            Some(t) => {
                let files = TlsFiles {
                    ca: t.ca,
                    cert: t.cert,
                    key: t.key,
                };
                check_tls_files("dopplers.tls", &files)?;
                if t.server_name.is_empty() {
                    return Err(ConfigError::new(
                        "dopplers.tls.server_name",
                        "must not be empty",
                    ));
                }
                (Some(files), t.server_name)
            }
            None if development.enabled || no_dopplers => (None, default_server_name()),
            None => {
                return Err(ConfigError::new(
                    "dopplers.tls",
                    "missing (required unless development.enabled is true)",
                ))
            }
        };
        if d.backoff_max_ms < d.backoff_initial_ms {
            return Err(ConfigError::new(
                "dopplers.backoff_max_ms",
                format!(
                    "{} is below dopplers.backoff_initial_ms ({})",
                    d.backoff_max_ms, d.backoff_initial_ms
                ),
            ));
        }
        // Leave room for the gRPC framing and the tags the agent adds after sizing.
        let batch_limit = MAX_GRPC_MESSAGE_BYTES / 2;
        if d.batch_max_bytes.get() > batch_limit {
            return Err(ConfigError::new(
                "dopplers.batch_max_bytes",
                format!(
                    "{} is above {batch_limit}: a Doppler refuses messages over 10 MiB",
                    d.batch_max_bytes
                ),
            ));
        }
        if d.replay_extra_percent > MAX_REPLAY_EXTRA_PERCENT {
            return Err(ConfigError::new(
                "dopplers.replay_extra_percent",
                format!(
                    "{} is above {MAX_REPLAY_EXTRA_PERCENT}: a replay that fast floods the \
                     Doppler it comes back to",
                    d.replay_extra_percent
                ),
            ));
        }
        if d.replay_min_rate.get() > MAX_REPLAY_MIN_RATE {
            return Err(ConfigError::new(
                "dopplers.replay_min_rate",
                format!(
                    "{} is above {MAX_REPLAY_MIN_RATE} envelopes a second",
                    d.replay_min_rate
                ),
            ));
        }
        let dopplers = DopplersConfig {
            source,
            tls: doppler_tls,
            server_name,
            connections: d.connections,
            connect_timeout: Duration::from_millis(d.connect_timeout_ms.get()),
            backoff_initial: Duration::from_millis(d.backoff_initial_ms.get()),
            backoff_max: Duration::from_millis(d.backoff_max_ms.get()),
            rebalance_interval: Duration::from_millis(d.rebalance_interval_ms.get()),
            progress_timeout: Duration::from_millis(d.progress_timeout_ms.get()),
            ack_interval: Duration::from_millis(d.ack_interval_ms.get()),
            ack_bytes: d.ack_bytes,
            recycle_interval: (d.recycle_interval_ms > 0)
                .then(|| Duration::from_millis(d.recycle_interval_ms)),
            keepalive_interval: Duration::from_millis(d.keepalive_interval_ms.get()),
            keepalive_timeout: Duration::from_millis(d.keepalive_timeout_ms.get()),
            batch_max_envelopes: d.batch_max_envelopes,
            batch_max_bytes: d.batch_max_bytes,
            replay_extra_percent: d.replay_extra_percent,
            replay_min_rate: d.replay_min_rate,
            disable_logs: d.disable_logs,
        };

        if development.doppler_listen.is_some() && dopplers.tls.is_some() {
            return Err(ConfigError::new(
                "development.doppler_listen",
                "the development Doppler uses development credentials: remove dopplers.tls",
            ));
        }
        if let Some(t) = &self.metrics.tls {
            check_tls_files("metrics.tls", t)?;
            if self.metrics.listen.is_none() {
                return Err(ConfigError::new(
                    "metrics.tls",
                    "set, but metrics.listen is null (the endpoint is off)",
                ));
            }
        }
        let metrics = MetricsConfig {
            listen: self
                .metrics
                .listen
                .as_deref()
                .map(|a| parse_socket_addr("metrics.listen", a))
                .transpose()?,
            tls: self.metrics.tls,
            envelope_interval: self
                .metrics
                .envelope_interval_ms
                .map(|ms| Duration::from_millis(ms.get())),
        };

        let signing_enabled = self.signing.as_ref().is_none_or(|s| s.enabled);
        let signing = match self.signing {
            None => None,
            Some(RawSigning {
                enabled,
                key_id: None,
                key_file: None,
                previous_keys,
            }) if !enabled && previous_keys.is_empty() => None,
            Some(s) => {
                let (key_id, key_file) = match (s.key_id, s.key_file) {
                    (Some(id), Some(file)) => (id, file),
                    (id, _) => {
                        let missing = if id.is_none() {
                            "signing.key_id"
                        } else {
                            "signing.key_file"
                        };
                        let why = if s.enabled {
                            "required while signing is enabled (without the signing section the \
                             agent signs with a random per-process key)"
                        } else {
                            "signing.key_id and signing.key_file go together (with previous_keys \
                             too): give both, or neither"
                        };
                        return Err(ConfigError::new(missing, why));
                    }
                };
                // The id travels in every envelope only while signing is on.
                if s.enabled {
                    check_signing_key_id(&key_id)?;
                }
                let key = read_signing_key("signing", &key_id, &key_file)?;
                let mut previous_keys: Vec<(String, Vec<u8>)> = Vec::new();
                for (i, p) in s.previous_keys.iter().enumerate() {
                    let at = format!("signing.previous_keys[{i}]");
                    let old = read_signing_key(&at, &p.key_id, &p.key_file)?;
                    let taken =
                        p.key_id == key_id || previous_keys.iter().any(|(id, _)| *id == p.key_id);
                    if taken {
                        return Err(ConfigError::new(
                            format!("{at}.key_id"),
                            format!(
                                "{:?} is used twice: receivers pick the key by its id",
                                p.key_id
                            ),
                        ));
                    }
                    previous_keys.push((p.key_id.clone(), old));
                }
                Some(SigningConfig {
                    key_id,
                    key,
                    previous_keys,
                })
            }
        };

        let p = self.pipeline;
        if p.max_buffered_bytes.get() < MAX_GRPC_MESSAGE_BYTES {
            return Err(ConfigError::new(
                "pipeline.max_buffered_bytes",
                format!(
                    "{} is below {MAX_GRPC_MESSAGE_BYTES}: one maximal ingress message must fit",
                    p.max_buffered_bytes
                ),
            ));
        }
        if p.max_buffered_bytes.get() > MAX_BUFFERED_BYTES {
            return Err(ConfigError::new(
                "pipeline.max_buffered_bytes",
                format!(
                    "{} is above {MAX_BUFFERED_BYTES} (16 GiB)",
                    p.max_buffered_bytes
                ),
            ));
        }
        let scheduling = Scheduling::parse(&p.scheduling).ok_or_else(|| {
            ConfigError::new(
                "pipeline.scheduling",
                format!("{:?} is neither batch nor inherit", p.scheduling),
            )
        })?;
        let pipeline = PipelineConfig {
            max_buffered_bytes: p.max_buffered_bytes,
            mailbox_capacity: p.mailbox_capacity,
            max_sources: p.max_sources,
            max_counter_keys: p.max_counter_keys,
            scheduling,
        };

        let (log_key, raw_log) = match (self.log, self.logging) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "logging",
                    "is the old name of log: set only log",
                ))
            }
            (Some(l), None) => ("log", l),
            (None, Some(l)) => ("logging", l),
            (None, None) => ("log", RawLog::default()),
        };
        if tracing_subscriber::EnvFilter::try_new(&raw_log.level).is_err() {
            return Err(ConfigError::new(
                format!("{log_key}.level"),
                format!("{:?} is not a log level or filter", raw_log.level),
            ));
        }
        let format = LogFormat::parse(&raw_log.format).ok_or_else(|| {
            ConfigError::new(
                format!("{log_key}.format"),
                format!("{:?} is neither text nor json", raw_log.format),
            )
        })?;
        let log = LogConfig {
            level: raw_log.level,
            format,
        };
        let health = HealthConfig {
            listen: self
                .health
                .listen
                .as_deref()
                .map(|a| parse_socket_addr("health.listen", a))
                .transpose()?,
        };

        Ok(Config {
            identity: self.identity,
            default_tags,
            ingress,
            dopplers,
            metrics,
            signing,
            signing_enabled,
            sequencing_enabled: self.sequencing.enabled,
            pipeline,
            shutdown_grace: Duration::from_millis(u64::from(self.shutdown.grace_period_ms.get())),
            log,
            health,
            development,
            syslog: self.syslog.validate()?,
            limits: self.limits.validate()?,
            otlp: self.otlp.map(otlp::RawOtlp::validate).transpose()?,
            ingress_port_glob: match self.forwarding.ingress_port_glob {
                Some(g) if g.trim().is_empty() => {
                    return Err(ConfigError::new(
                        "forwarding.ingress_port_glob",
                        "must not be empty (leave the key out for no fan-out)",
                    ))
                }
                g => g,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
identity: { deployment: cf, job: diego-cell, index: "0", ip: 10.0.0.5, az: z1 }
ingress: { grpc: { listen: "127.0.0.1:3458" } }
dopplers: { endpoints: [ { addr: "127.0.0.1:8082", az: z1 } ] }
development: { enabled: true }
"#;

    #[test]
    fn minimal_development_config_loads_with_defaults() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.dopplers.connections.get(), 5);
        assert_eq!(c.ingress.max_wait, Duration::from_millis(100));
        assert_eq!(c.default_tags["job"], "diego-cell");
        assert_eq!(c.dopplers.server_name, "doppler");
        assert!(c.signing.is_none());
    }

    #[test]
    fn udp_ingress_is_on_by_default_on_upstreams_port() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        let udp = c.ingress.udp.expect("on by default");
        assert_eq!(udp.listen, "127.0.0.1:3457".parse().unwrap());
        let off = MINIMAL.replace(
            "ingress: { grpc: { listen: \"127.0.0.1:3458\" } }",
            "ingress: { grpc: { listen: \"127.0.0.1:3458\" }, udp: { enabled: false } }",
        );
        assert!(Config::from_yaml(&off).unwrap().ingress.udp.is_none());
    }

    #[test]
    fn udp_ingress_refuses_a_non_loopback_address_and_a_tiny_buffer() {
        let with = |udp: &str| {
            MINIMAL.replace(
                "ingress: { grpc: { listen: \"127.0.0.1:3458\" } }",
                &format!("ingress: {{ grpc: {{ listen: \"127.0.0.1:3458\" }}, udp: {udp} }}"),
            )
        };
        let e = Config::from_yaml(&with("{ listen: \"0.0.0.0:3457\" }")).unwrap_err();
        assert_eq!(e.key, "ingress.udp.listen");
        assert!(e.problem.contains("not a loopback address"), "{e}");
        let e = Config::from_yaml(&with("{ buffer_bytes: 1000 }")).unwrap_err();
        assert_eq!(e.key, "ingress.udp.buffer_bytes");
        let e = Config::from_yaml(&with("{ listen: nowhere }")).unwrap_err();
        assert_eq!(e.key, "ingress.udp.listen");
        let e = Config::from_yaml(&with("{ enable: true }")).unwrap_err();
        assert_eq!(e.key, "ingress.udp.enable");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("listen: \"127.0.0.1:3458\"", "lisen: x");
        let e = Config::from_yaml(&text).unwrap_err();
        assert_eq!(e.key, "ingress.grpc.lisen");
        assert!(e.problem.contains("unknown field `lisen`"), "{e}");
    }

    #[test]
    fn serde_errors_name_the_full_key() {
        let key = |t: &str| Config::from_yaml(t).unwrap_err().key;
        assert_eq!(key("identity: {}\n"), "ingress");
        assert_eq!(key("surprise: 1\n"), "surprise");
        let no_addr = MINIMAL.replace("addr: \"127.0.0.1:8082\", ", "");
        assert_eq!(key(&no_addr), "dopplers.endpoints[0].addr");
        let negative = MINIMAL.replace("az: z1 } ] }", "az: z1 } ], connections: -1 }");
        assert_eq!(key(&negative), "dopplers.connections");
    }

    #[test]
    fn replay_pace_has_defaults_bounds_and_is_shared_among_the_slots() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(
            (
                c.dopplers.replay_extra_percent,
                c.dopplers.replay_min_rate.get()
            ),
            (50, 100)
        );
        let rate = c.dopplers.replay_rate(5);
        assert_eq!((rate.extra, rate.floor), (0.5, 20.0));
        let with = |keys: &str| MINIMAL.replace("az: z1 } ] }", &format!("az: z1 }} ], {keys} }}"));
        let c = Config::from_yaml(&with("replay_extra_percent: 0, replay_min_rate: 7")).unwrap();
        assert_eq!(c.dopplers.replay_rate(1).floor, 7.0);
        let key = |keys: &str| Config::from_yaml(&with(keys)).unwrap_err().key;
        assert_eq!(
            key("replay_extra_percent: 1001"),
            "dopplers.replay_extra_percent"
        );
        assert_eq!(
            key("replay_extra_percent: -1"),
            "dopplers.replay_extra_percent"
        );
        assert_eq!(key("replay_min_rate: 0"), "dopplers.replay_min_rate");
        assert_eq!(key("replay_min_rate: 1000001"), "dopplers.replay_min_rate");
    }

    #[test]
    fn bad_endpoint_is_named_with_its_index() {
        let text = MINIMAL.replace("addr: \"127.0.0.1:8082\"", "addr: \"nope\"");
        let e = Config::from_yaml(&text).unwrap_err();
        assert_eq!(e.key, "dopplers.endpoints[0].addr");
    }

    #[test]
    fn tls_is_required_outside_development() {
        let text = MINIMAL.replace("enabled: true", "enabled: false");
        let e = Config::from_yaml(&text).unwrap_err();
        assert_eq!(e.key, "ingress.grpc.tls");
    }

    #[test]
    fn unreadable_cert_file_is_named() {
        let text = MINIMAL.replace(
            "listen: \"127.0.0.1:3458\"",
            "listen: \"127.0.0.1:3458\", tls: { ca: /nonexistent/ca.pem, cert: /x, key: /y }",
        );
        let e = Config::from_yaml(&text).unwrap_err();
        assert_eq!(e.key, "ingress.grpc.tls.ca");
    }

    #[test]
    fn doppler_discovery_by_dns_is_validated() {
        let dns = MINIMAL.replace(
            "endpoints: [ { addr: \"127.0.0.1:8082\", az: z1 } ]",
            "router_addr: \"doppler.service.cf.internal:8082\", router_addr_with_az: \"z1.doppler.service.cf.internal:8082\"",
        );
        let c = Config::from_yaml(&dns).unwrap();
        assert_eq!(
            c.dopplers.source,
            DopplerSource::Dns {
                router_addr: "doppler.service.cf.internal:8082".into(),
                router_addr_with_az: Some("z1.doppler.service.cf.internal:8082".into()),
                resolve_interval: Duration::from_secs(5),
            }
        );
        let key = |t: &str| Config::from_yaml(t).unwrap_err().key;
        assert_eq!(
            key(&dns.replace(":8082\", router", "\", router")),
            "dopplers.router_addr"
        );
        let both = MINIMAL.replace("az: z1 } ] }", "az: z1 } ], router_addr: \"d:1\" }");
        assert_eq!(key(&both), "dopplers.router_addr");
        let neither = MINIMAL.replace(
            "endpoints: [ { addr: \"127.0.0.1:8082\", az: z1 } ]",
            "connections: 2",
        );
        assert_eq!(key(&neither), "dopplers");
        let az_only = MINIMAL.replace("az: z1 } ] }", "az: z1 } ], router_addr_with_az: \"d:1\" }");
        assert_eq!(key(&az_only), "dopplers.router_addr_with_az");
    }

    #[test]
    fn zero_connections_is_refused() {
        let text = MINIMAL.replace("az: z1 } ] }", "az: z1 } ], connections: 0 }");
        let e = Config::from_yaml(&text).unwrap_err();
        assert_eq!(e.key, "dopplers.connections");
    }

    #[test]
    fn log_takes_a_format_and_still_accepts_its_old_name() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        let json = format!("{MINIMAL}log: {{ level: debug, format: json }}\n");
        let c = Config::from_yaml(&json).unwrap();
        assert_eq!(
            (c.log.level.as_str(), c.log.format),
            ("debug", LogFormat::Json)
        );
        let old = format!("{MINIMAL}logging: {{ level: warn }}\n");
        assert_eq!(Config::from_yaml(&old).unwrap().log.level, "warn");
        let key = |t: &str| Config::from_yaml(t).unwrap_err().key;
        assert_eq!(
            key(&format!("{MINIMAL}log: {{ format: xml }}\n")),
            "log.format"
        );
        assert_eq!(
            key(&format!("{MINIMAL}logging: {{ level: \"[\" }}\n")),
            "logging.level"
        );
        let both = format!("{MINIMAL}log: {{ level: info }}\nlogging: {{ level: info }}\n");
        assert_eq!(key(&both), "logging");
    }

    /// The reload table: one change of each kind lands where the README's reload section says.
    #[test]
    fn every_change_is_classified_live_or_restart() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.changes(&c), Changes::default(), "nothing changed");
        let with = |extra: &str| Config::from_yaml(&format!("{MINIMAL}{extra}\n")).unwrap();
        for (extra, live) in [
            ("tags: { team: a }", Live::Tags),
            ("pipeline: { max_buffered_bytes: 20971520 }", Live::Budget),
            ("log: { level: debug }", Live::LogLevel),
        ] {
            assert_eq!(c.changes(&with(extra)).live, [live], "{extra}");
        }
        let moved = MINIMAL.replace("127.0.0.1:8082", "127.0.0.1:8083");
        let moved = Config::from_yaml(&moved).unwrap();
        assert_eq!(
            c.changes(&moved).live,
            [Live::Dopplers { discovered: false }]
        );
        let paced = MINIMAL.replace(
            "az: z1 } ] }",
            "az: z1 } ], replay_extra_percent: 20, replay_min_rate: 50 }",
        );
        assert_eq!(
            c.changes(&Config::from_yaml(&paced).unwrap()).live,
            [Live::ReplayExtra, Live::ReplayMinRate]
        );
        let timings = MINIMAL.replace(
            "dopplers: { endpoints",
            "dopplers: { connect_timeout_ms: 1, keepalive_interval_ms: 10, connections: 2, ack_bytes: 9, endpoints",
        );
        let d = c.changes(&Config::from_yaml(&timings).unwrap());
        assert_eq!(d.live, [Live::ConnectTimeout, Live::KeepaliveInterval,]);
        assert_eq!(d.restart, ["dopplers.connections", "dopplers.ack_bytes"]);
        for (extra, restart) in [
            ("health: { listen: null }", "health.listen"),
            (
                "shutdown: { grace_period_ms: 1 }",
                "shutdown.grace_period_ms",
            ),
            ("log: { format: json }", "log.format"),
            ("sequencing: { enabled: false }", "sequencing.enabled"),
            ("pipeline: { max_sources: 5 }", "pipeline.max_sources"),
        ] {
            let d = c.changes(&with(extra));
            assert_eq!((d.live.len(), d.restart), (0, vec![restart]), "{extra}");
        }
    }

    #[test]
    fn scheduling_is_batch_unless_inherit_and_restarts_to_change() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.pipeline.scheduling, Scheduling::Batch);
        let inherit = format!("{MINIMAL}pipeline: {{ scheduling: inherit }}\n");
        let d = Config::from_yaml(&inherit).unwrap();
        assert_eq!(d.pipeline.scheduling, Scheduling::Inherit);
        assert_eq!(c.changes(&d).restart, ["pipeline.scheduling"]);
        let bad = format!("{MINIMAL}pipeline: {{ scheduling: fifo }}\n");
        let e = Config::from_yaml(&bad).unwrap_err();
        assert_eq!(e.key, "pipeline.scheduling");
        assert!(e.problem.contains("\"fifo\""), "{e}");
    }

    #[test]
    fn health_listens_on_loopback_by_default_and_can_be_turned_off() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.health.listen, Some("127.0.0.1:14825".parse().unwrap()));
        let off = format!("{MINIMAL}health: {{ listen: null }}\n");
        assert_eq!(Config::from_yaml(&off).unwrap().health.listen, None);
        let bad = format!("{MINIMAL}health: {{ listen: here }}\n");
        assert_eq!(Config::from_yaml(&bad).unwrap_err().key, "health.listen");
    }

    #[test]
    fn metrics_tls_needs_readable_files_and_an_endpoint() {
        let missing =
            format!("{MINIMAL}metrics: {{ tls: {{ ca: /nonexistent, cert: /x, key: /y }} }}\n");
        assert_eq!(
            Config::from_yaml(&missing).unwrap_err().key,
            "metrics.tls.ca"
        );
        let manifest = env!("CARGO_MANIFEST_DIR");
        let off = format!(
            "{MINIMAL}metrics: {{ listen: null, tls: {{ ca: {manifest}/Cargo.toml, cert: {manifest}/Cargo.toml, key: {manifest}/Cargo.toml }} }}\n"
        );
        assert_eq!(Config::from_yaml(&off).unwrap_err().key, "metrics.tls");
    }

    #[test]
    fn previous_signing_keys_are_read_and_their_ids_must_be_distinct() {
        let manifest = env!("CARGO_MANIFEST_DIR");
        let signing = |previous: &str| {
            format!(
                "{MINIMAL}signing: {{ key_id: k2, key_file: {manifest}/Cargo.toml, previous_keys: [{previous}] }}\n"
            )
        };
        let c = Config::from_yaml(&signing(&format!(
            "{{ key_id: k1, key_file: {manifest}/build.rs }}"
        )))
        .unwrap();
        let s = c.signing.unwrap();
        assert_eq!(s.previous_keys.len(), 1);
        assert_eq!(s.previous_keys[0].0, "k1");
        assert!(!s.previous_keys[0].1.is_empty());
        let key = |t: &str| Config::from_yaml(t).unwrap_err().key;
        assert_eq!(
            key(&signing(&format!(
                "{{ key_id: k2, key_file: {manifest}/build.rs }}"
            ))),
            "signing.previous_keys[0].key_id"
        );
        assert_eq!(
            key(&signing("{ key_id: k1, key_file: /nonexistent }")),
            "signing.previous_keys[0].key_file"
        );
    }

    #[test]
    fn signing_and_sequencing_turn_off_each_on_its_own() {
        let manifest = env!("CARGO_MANIFEST_DIR");
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert!(c.signing_enabled && c.sequencing_enabled && c.signing.is_none());
        let c = Config::from_yaml(&format!("{MINIMAL}signing: {{ enabled: false }}\n")).unwrap();
        assert!(!c.signing_enabled && c.sequencing_enabled && c.signing.is_none());
        let c = Config::from_yaml(&format!("{MINIMAL}sequencing: {{ enabled: false }}\n")).unwrap();
        assert!(c.signing_enabled && !c.sequencing_enabled);
        let off_with_key = format!(
            "{MINIMAL}signing: {{ enabled: false, key_id: k1, key_file: {manifest}/build.rs }}\n"
        );
        let c = Config::from_yaml(&off_with_key).unwrap();
        assert!(
            !c.signing_enabled && c.signing.is_some(),
            "the key is kept for later"
        );

        let key = |t: &str| Config::from_yaml(t).unwrap_err();
        let e = key(&format!("{MINIMAL}signing: {{ enabled: true }}\n"));
        assert_eq!(e.key, "signing.key_id");
        assert!(
            e.problem.contains("required while signing is enabled"),
            "{e}"
        );
        let e = key(&format!(
            "{MINIMAL}signing: {{ enabled: false, key_id: k1 }}\n"
        ));
        assert_eq!(e.key, "signing.key_file");
        assert!(e.problem.contains("go together"), "{e}");
        let long_but_off = format!(
            "{MINIMAL}signing: {{ enabled: false, key_id: production-2025, key_file: {manifest}/build.rs }}\n"
        );
        assert!(
            Config::from_yaml(&long_but_off).is_ok(),
            "the id is only checked for the tag while signing is on"
        );
        assert_eq!(
            key(&format!("{MINIMAL}sequencing: {{ enabled: maybe }}\n")).key,
            "sequencing.enabled"
        );
        let c = Config::from_yaml(MINIMAL).unwrap();
        let off = Config::from_yaml(&format!(
            "{MINIMAL}signing: {{ enabled: false }}\nsequencing: {{ enabled: false }}\n"
        ))
        .unwrap();
        assert_eq!(
            c.changes(&off).restart,
            ["signing.enabled", "sequencing.enabled"]
        );
    }

    /// The key id travels in every envelope's `metron` tag: short, and nothing to escape.
    #[test]
    fn the_signing_key_id_is_short_and_plain() {
        let manifest = env!("CARGO_MANIFEST_DIR");
        let with = |id: &str| {
            Config::from_yaml(&format!(
                "{MINIMAL}signing: {{ key_id: \"{id}\", key_file: {manifest}/build.rs }}\n"
            ))
        };
        for good in ["k", "k1", "2026-a", "ab_-Z9"] {
            assert!(with(good).is_ok(), "{good}");
        }
        for bad in ["", "seven77", "k.1", "k:1", "ключ", "k 1"] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.key, "signing.key_id", "{bad}");
            assert!(
                e.problem.contains("1 to 6 characters") || e.problem.contains("no ':'"),
                "{e}"
            );
        }
        let e = with("eph").unwrap_err();
        assert!(e.problem.contains("reserved"), "{e}");
        // A previous key's id may be longer, and hold a '.': an older agent may have signed
        // metron_sig with it.
        let previous = format!(
            "{MINIMAL}signing: {{ key_id: k2, key_file: {manifest}/Cargo.toml, previous_keys: [ {{ key_id: prod.2026-a, key_file: {manifest}/build.rs }} ] }}\n"
        );
        assert!(Config::from_yaml(&previous).is_ok());
    }

    #[test]
    fn the_agents_own_tag_names_are_reserved() {
        for tag in ["metron", "metron_seq"] {
            let e = Config::from_yaml(&format!("{MINIMAL}tags: {{ {tag}: x }}\n")).unwrap_err();
            assert_eq!(e.key, format!("tags.{tag}"));
        }
    }

    #[test]
    fn the_binding_cache_section_is_checked_and_named_in_errors() {
        let manifest = env!("CARGO_MANIFEST_DIR");
        let cache = |url: &str, tls: &str| {
            format!(
                "{MINIMAL}syslog:\n  binding_cache: {{ url: \"{url}\", tls: {tls} }}\n  \
                 blocked_ranges: [ {{ start: 10.0.0.0, end: 10.255.255.255 }} ]\n"
            )
        };
        let files = format!(
            "{{ ca: {manifest}/Cargo.toml, cert: {manifest}/Cargo.toml, key: {manifest}/Cargo.toml }}"
        );
        let c = Config::from_yaml(&cache("https://binding-cache:9000", &files)).unwrap();
        let b = c.syslog.binding_cache.unwrap();
        assert_eq!(
            (
                b.server_name.as_str(),
                b.polling_interval,
                b.per_app_limit.get()
            ),
            ("binding-cache", Duration::from_secs(15), 5),
            "upstream's defaults"
        );
        assert_eq!(c.syslog.idle_drain_timeout, Duration::from_secs(600));
        assert!(c
            .syslog
            .blocked_ranges
            .contains("10.1.2.3".parse().unwrap()));
        let key = |t: String| Config::from_yaml(&t).unwrap_err().key;
        assert_eq!(
            key(cache("http://user:secret@binding-cache:9000", &files)),
            "syslog.binding_cache.url"
        );
        let e =
            Config::from_yaml(&cache("http://user:secret@binding-cache:9000", &files)).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(
            key(cache(
                "https://binding-cache:9000",
                "{ ca: /nope, cert: /nope, key: /nope }"
            )),
            "syslog.binding_cache.tls.ca"
        );
        assert_eq!(
            key(cache("https://binding-cache:9000", "{ ca: /nope }")),
            "syslog.binding_cache.tls.cert"
        );
        let reversed = format!(
            "{MINIMAL}syslog:\n  blocked_ranges: [ {{ start: 10.0.0.9, end: 10.0.0.1 }} ]\n"
        );
        assert_eq!(key(reversed), "syslog.blocked_ranges");
    }

    #[test]
    fn limits_are_off_by_default_and_checked() {
        assert!(!Config::from_yaml(MINIMAL).unwrap().limits.enabled());
        let with = |l: &str| Config::from_yaml(&format!("{MINIMAL}limits: {l}\n"));
        let c = with(
            "{ per_source: { envelopes_per_second: 100 }, overrides: { big: { bytes_per_second: 1e6 } }, exempt: [ router ] }",
        )
        .unwrap();
        let l = c.limits;
        assert_eq!(l.limit_of("app").unwrap().envelopes_per_second, Some(100.0));
        let big = l.limit_of("big").unwrap();
        assert_eq!(
            (
                big.envelopes_per_second,
                big.bytes_per_second,
                big.burst_seconds
            ),
            (Some(100.0), Some(1e6), 1.0),
            "an override keeps what it does not say"
        );
        assert!(l.limit_of("router").is_none(), "exempt");
        let key = |l: &str| with(l).unwrap_err().key;
        assert_eq!(
            key("{ per_source: { envelopes_per_second: 0 } }"),
            "limits.per_source.envelopes_per_second"
        );
        assert_eq!(
            key("{ per_source: { burst_seconds: 2 } }"),
            "limits.per_source"
        );
        assert_eq!(
            key("{ overrides: { app: { bytes_per_second: -1 } } }"),
            "limits.overrides.app.bytes_per_second"
        );
        assert_eq!(key("{ per_sorce: {} }"), "limits.per_sorce");
        assert_eq!(
            key("{ per_source: { envelopes_per_second: 0.5 } }"),
            "limits.per_source.burst_seconds",
            "a burst that never holds one envelope would refuse everything"
        );
        // Live on SIGHUP.
        let a = Config::from_yaml(MINIMAL).unwrap();
        let b = with("{ per_source: { envelopes_per_second: 100 } }").unwrap();
        let changes = a.changes(&b);
        assert_eq!(changes.live, vec![changes::Live::Limits]);
        assert!(changes.restart.is_empty());
    }

    #[test]
    fn shipped_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
        let c = Config::load(&path).unwrap();
        assert!(c.development.enabled);
    }
}
