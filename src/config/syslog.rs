//! The `syslog:` section: drains beside the Doppler pool (issue 21). Parsed and validated like
//! the rest of the config; a drain URL's credentials never appear in an error or a `Debug`.

use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::syslog::bindings::BlockedRanges;
use crate::syslog::drain::{DrainUrl, Scheme};

/// The most aggregate drains: each is a destination with its own share of the budget.
pub const MAX_AGGREGATE_DRAINS: usize = 16;

/// `syslog:` as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    /// Drains every source's envelopes go to (e.g. Log Cache's syslog server).
    pub aggregate_drains: Vec<AggregateDrain>,
    /// The `metron` tag (sequence and signature) goes out in `tags@47450` too.
    pub include_metron_tags: bool,
    /// Upstream's `default_drain_metadata`: `tags@47450` unless a URL says `disable-metadata`.
    pub default_drain_metadata: bool,
    /// Drains with a metrics series of their own; the rest share `drain_url="other"`.
    pub max_drain_series: NonZeroUsize,
    pub dial_timeout: Duration,
    pub write_timeout: Duration,
    /// A connection idle this long is replaced before the next write (Log Cache drops idle
    /// connections after 2 minutes without telling the sender).
    pub idle_reconnect: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Each drain connection's socket send buffer (see [`crate::syslog::writer::WriterSettings`]).
    pub send_buffer_bytes: NonZeroUsize,
    /// Where app drains come from; `None`: no app drains.
    pub binding_cache: Option<BindingCache>,
    /// An app drain whose source sent nothing for this long is closed (opened again by its next
    /// envelope).
    pub idle_drain_timeout: Duration,
    /// Drain addresses refused after DNS (upstream's `blacklisted_syslog_ranges`).
    pub blocked_ranges: BlockedRanges,
    /// The most app drain connections open at once; beyond, a newly seen app's drains wait
    /// until one closes (counted in `app_drains_refused`).
    pub max_app_drains: NonZeroUsize,
}

/// `syslog.binding_cache`: the binding cache polled for app drains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingCache {
    /// `https://host[:port]`; `/v2/bindings` and `/v2/aggregate` are appended.
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The name the cache's certificate must carry.
    pub server_name: String,
    pub polling_interval: Duration,
    /// Drains per app (the first by URL).
    pub per_app_limit: NonZeroUsize,
}

impl Default for SyslogConfig {
    fn default() -> Self {
        RawSyslog::default()
            .validate()
            .expect("the defaults are valid")
    }
}

/// One `syslog.aggregate_drains` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct AggregateDrain {
    pub url: DrainUrl,
    /// Trusted beside the public roots (upstream appends a binding's CA to the system roots).
    pub ca: Option<PathBuf>,
    /// A client certificate and key (mTLS drains, e.g. Log Cache's syslog server).
    pub client: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for AggregateDrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateDrain")
            .field("url", &self.url.anonymized)
            .field("ca", &self.ca)
            .field("client", &self.client)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSyslog {
    #[serde(default)]
    aggregate_drains: Vec<RawAggregateDrain>,
    #[serde(default)]
    include_metron_tags: bool,
    #[serde(default = "super::default_true")]
    default_drain_metadata: bool,
    #[serde(default = "default_max_drain_series")]
    max_drain_series: NonZeroUsize,
    #[serde(default = "default_dial_timeout_ms")]
    dial_timeout_ms: NonZeroU64,
    #[serde(default = "default_write_timeout_ms")]
    write_timeout_ms: NonZeroU64,
    #[serde(default = "default_idle_reconnect_ms")]
    idle_reconnect_ms: NonZeroU64,
    #[serde(default = "default_backoff_initial_ms")]
    backoff_initial_ms: NonZeroU64,
    #[serde(default = "default_backoff_max_ms")]
    backoff_max_ms: NonZeroU64,
    #[serde(default = "default_send_buffer_bytes")]
    send_buffer_bytes: NonZeroUsize,
    #[serde(default)]
    binding_cache: Option<RawBindingCache>,
    #[serde(default = "default_idle_drain_timeout_ms")]
    idle_drain_timeout_ms: NonZeroU64,
    #[serde(default)]
    blocked_ranges: Vec<RawRange>,
    #[serde(default = "default_max_app_drains")]
    max_app_drains: NonZeroUsize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBindingCache {
    url: String,
    tls: RawCacheTls,
    #[serde(default = "default_polling_interval_ms")]
    polling_interval_ms: NonZeroU64,
    #[serde(default = "default_per_app_limit")]
    per_app_limit: NonZeroUsize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_cache_server_name")]
    server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    start: String,
    end: String,
}

/// Upstream's `IDLE_DRAIN_TIMEOUT`.
fn default_idle_drain_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(600_000).expect("not zero")
}
/// Decision 29 says why there is a cap at all.
fn default_max_app_drains() -> NonZeroUsize {
    NonZeroUsize::new(500).expect("not zero")
}
/// The syslog-agent job's `cache.polling_interval`.
fn default_polling_interval_ms() -> NonZeroU64 {
    NonZeroU64::new(15_000).expect("not zero")
}
/// Upstream's `BINDING_PER_APP_LIMIT`.
fn default_per_app_limit() -> NonZeroUsize {
    NonZeroUsize::new(5).expect("not zero")
}
/// The binding cache's certificate name in cf-deployment.
fn default_cache_server_name() -> String {
    "binding-cache".into()
}

impl Default for RawSyslog {
    fn default() -> Self {
        Self {
            aggregate_drains: Vec::new(),
            include_metron_tags: false,
            default_drain_metadata: true,
            max_drain_series: default_max_drain_series(),
            dial_timeout_ms: default_dial_timeout_ms(),
            write_timeout_ms: default_write_timeout_ms(),
            idle_reconnect_ms: default_idle_reconnect_ms(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            send_buffer_bytes: default_send_buffer_bytes(),
            binding_cache: None,
            idle_drain_timeout_ms: default_idle_drain_timeout_ms(),
            blocked_ranges: Vec::new(),
            max_app_drains: default_max_app_drains(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregateDrain {
    url: String,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
}

/// Never prints the URL, which may carry credentials.
impl std::fmt::Debug for RawAggregateDrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawAggregateDrain")
            .field("url", &crate::syslog::drain::redact_unparsed(&self.url))
            .finish_non_exhaustive()
    }
}

/// Enough for 20 MB/s to a drain 50 ms away; decision 27 says why it is bounded at all.
fn default_send_buffer_bytes() -> NonZeroUsize {
    NonZeroUsize::new(1 << 20).expect("not zero")
}
fn default_max_drain_series() -> NonZeroUsize {
    NonZeroUsize::new(100).expect("not zero")
}
/// Upstream's dial timeout and write deadline.
fn default_dial_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(10_000).expect("not zero")
}
fn default_write_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(10_000).expect("not zero")
}
/// Half Log Cache's 2-minute idle timeout.
fn default_idle_reconnect_ms() -> NonZeroU64 {
    NonZeroU64::new(60_000).expect("not zero")
}
fn default_backoff_initial_ms() -> NonZeroU64 {
    NonZeroU64::new(100).expect("not zero")
}
/// Upstream's retry writer caps its sleep at 15 s.
fn default_backoff_max_ms() -> NonZeroU64 {
    NonZeroU64::new(15_000).expect("not zero")
}

impl RawSyslog {
    /// Whether any drain is configured.
    pub(super) fn has_drains(&self) -> bool {
        !self.aggregate_drains.is_empty() || self.binding_cache.is_some()
    }

    pub(super) fn validate(self) -> Result<SyslogConfig, ConfigError> {
        if self.aggregate_drains.len() > MAX_AGGREGATE_DRAINS {
            return Err(ConfigError::new(
                "syslog.aggregate_drains",
                format!(
                    "{} drains; at most {MAX_AGGREGATE_DRAINS} (each is a destination with its \
                     own share of pipeline.max_buffered_bytes)",
                    self.aggregate_drains.len()
                ),
            ));
        }
        let mut aggregate_drains = Vec::with_capacity(self.aggregate_drains.len());
        for (i, d) in self.aggregate_drains.into_iter().enumerate() {
            let key = |k: &str| format!("syslog.aggregate_drains[{i}].{k}");
            let url = DrainUrl::parse(&d.url, self.default_drain_metadata).map_err(|e| {
                ConfigError::new(
                    key("url"),
                    format!("{}: {e}", crate::syslog::drain::redact_unparsed(&d.url)),
                )
            })?;
            if url.scheme != Scheme::Syslog
                && rustls::pki_types::ServerName::try_from(url.host.as_str()).is_err()
            {
                return Err(ConfigError::new(
                    key("url"),
                    format!("{}: the host is not a name TLS can verify", url.anonymized),
                ));
            }
            let client = match (d.cert, d.key) {
                (None, None) => None,
                (Some(c), Some(k)) => Some((c, k)),
                (Some(_), None) => {
                    return Err(ConfigError::new(key("key"), "missing (cert is set)"))
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(key("cert"), "missing (key is set)"))
                }
            };
            let tls_only = |what: &str| {
                ConfigError::new(
                    key(what),
                    format!("{}: a syslog:// drain does not use TLS", url.anonymized),
                )
            };
            if url.scheme == Scheme::Syslog {
                if d.ca.is_some() {
                    return Err(tls_only("ca"));
                }
                if client.is_some() {
                    return Err(tls_only("cert"));
                }
            }
            for (what, path) in [("ca", d.ca.as_ref())].into_iter().chain(
                client
                    .iter()
                    .flat_map(|(c, k)| [("cert", Some(c)), ("key", Some(k))]),
            ) {
                if let Some(p) = path {
                    if !p.is_file() {
                        return Err(ConfigError::new(
                            key(what),
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
            // Two drains told apart only by credentials or query would share their metrics
            // series and their name in the logs.
            if aggregate_drains
                .iter()
                .any(|a: &AggregateDrain| a.url.anonymized == url.anonymized)
            {
                return Err(ConfigError::new(
                    key("url"),
                    format!(
                        "{}: listed twice (without credentials and query, which logs and \
                         metrics leave out)",
                        url.anonymized
                    ),
                ));
            }
            aggregate_drains.push(AggregateDrain {
                url,
                ca: d.ca,
                client,
            });
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(ConfigError::new(
                "syslog.backoff_max_ms",
                format!(
                    "{} is below syslog.backoff_initial_ms ({})",
                    self.backoff_max_ms, self.backoff_initial_ms
                ),
            ));
        }
        let ms = |v: NonZeroU64| Duration::from_millis(v.get());
        let blocked_ranges =
            BlockedRanges::new(self.blocked_ranges.iter().map(|r| (&*r.start, &*r.end)))
                .map_err(|e| ConfigError::new("syslog.blocked_ranges", e.to_string()))?;
        let binding_cache = self
            .binding_cache
            .map(|c| -> Result<BindingCache, ConfigError> {
                let uri: hyper::http::Uri = c.url.parse().map_err(|_| {
                    ConfigError::new(
                        "syslog.binding_cache.url",
                        format!(
                            "{}: not a URL",
                            crate::syslog::drain::redact_unparsed(&c.url)
                        ),
                    )
                })?;
                if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
                    return Err(ConfigError::new(
                        "syslog.binding_cache.url",
                        format!(
                            "{}: not an https:// URL with a host",
                            crate::syslog::drain::redact_unparsed(&c.url)
                        ),
                    ));
                }
                if rustls::pki_types::ServerName::try_from(c.tls.server_name.as_str()).is_err() {
                    return Err(ConfigError::new(
                        "syslog.binding_cache.tls.server_name",
                        format!("{:?} is not a name TLS can verify", c.tls.server_name),
                    ));
                }
                for (what, p) in [
                    ("ca", &c.tls.ca),
                    ("cert", &c.tls.cert),
                    ("key", &c.tls.key),
                ] {
                    if !p.is_file() {
                        return Err(ConfigError::new(
                            format!("syslog.binding_cache.tls.{what}"),
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
                Ok(BindingCache {
                    url: c.url,
                    ca: c.tls.ca,
                    cert: c.tls.cert,
                    key: c.tls.key,
                    server_name: c.tls.server_name,
                    polling_interval: ms(c.polling_interval_ms),
                    per_app_limit: c.per_app_limit,
                })
            })
            .transpose()?;
        Ok(SyslogConfig {
            aggregate_drains,
            include_metron_tags: self.include_metron_tags,
            default_drain_metadata: self.default_drain_metadata,
            max_drain_series: self.max_drain_series,
            dial_timeout: ms(self.dial_timeout_ms),
            write_timeout: ms(self.write_timeout_ms),
            idle_reconnect: ms(self.idle_reconnect_ms),
            backoff_initial: ms(self.backoff_initial_ms),
            backoff_max: ms(self.backoff_max_ms),
            send_buffer_bytes: self.send_buffer_bytes,
            binding_cache,
            idle_drain_timeout: ms(self.idle_drain_timeout_ms),
            blocked_ranges,
            max_app_drains: self.max_app_drains,
        })
    }
}
