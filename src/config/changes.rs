//! How a SIGHUP treats every config key: the one table. [`Config::changes`] destructures the
//! running config field by field, with no `..`, so a field added to [`Config`] (or to any of its
//! sections) does not compile until it is classified here as applied live or kept until a
//! restart; and the reload matches [`Live`] exhaustively, so a key classified live does not
//! compile until the reload applies it.

use super::{
    Config, DevelopmentConfig, DopplerSource, DopplersConfig, HealthConfig, Identity,
    IngressConfig, LogConfig, MetricsConfig, PipelineConfig, SigningConfig, SyslogConfig,
};

/// Restart-only keys the reload itself looks at.
pub const RESTART_SIGNING: &str = "signing";
pub const RESTART_SIGNING_ENABLED: &str = "signing.enabled";

/// A key a reload applies while the agent runs. Declared in the order the reload applies and
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Live {
    /// `identity.deployment`, `.job`, `.index`, `.ip` and `tags`: the default tags.
    Tags,
    /// `ingress.grpc.tls` (also when the files changed under the same paths).
    IngressTls,
    /// `ingress.grpc.max_wait_ms`.
    IngressMaxWait,
    /// `dopplers.endpoints`, or `dopplers.router_addr` with `router_addr_with_az` and
    /// `resolve_interval_ms` (`discovered`).
    Dopplers { discovered: bool },
    /// `dopplers.tls` and `dopplers.server_name` (also when the files changed).
    DopplersTls,
    /// `dopplers.connect_timeout_ms`.
    ConnectTimeout,
    /// `dopplers.keepalive_interval_ms`.
    KeepaliveInterval,
    /// `dopplers.keepalive_timeout_ms`.
    KeepaliveTimeout,
    /// `metrics.tls` while it stays on (also when the files changed).
    MetricsTls,
    /// `signing.key_id` / `signing.key_file`: a new key.
    Signing,
    /// `signing.previous_keys`.
    SigningPreviousKeys,
    /// `pipeline.max_buffered_bytes`.
    Budget,
    /// `log.level`.
    LogLevel,
    /// `dopplers.replay_extra_percent`.
    ReplayExtra,
    /// `dopplers.replay_min_rate`.
    ReplayMinRate,
    /// `syslog.aggregate_drains` and `syslog.default_drain_metadata` (also when a drain's TLS
    /// files changed): drains added start,
    /// drains removed deliver what they hold within `shutdown.grace_period_ms`, unchanged ones
    /// keep their connection and queue.
    AggregateDrains,
    /// `syslog.binding_cache`'s settings (and `syslog.default_drain_metadata`, read into every
    /// app drain's URL): the poller starts over with them, and its first answer replaces the
    /// drains (unchanged ones keep their connection). Adding or removing the section needs a
    /// restart.
    BindingCache,
    /// `limits`: the per-source rate limits, from the next batch on (each source's bucket keeps
    /// what it holds, up to its new burst).
    Limits,
    /// The `ingress_port.yml` files (`forwarding.ingress_port_glob`, read again at every
    /// reload): downstream agents announced since start, those gone deliver what they hold
    /// within `shutdown.grace_period_ms`.
    Forwarding,
}

impl Live {
    /// The key as the reload's log line names it.
    pub fn key(self) -> &'static str {
        match self {
            Live::Tags => "tags",
            Live::IngressTls => "ingress.grpc.tls",
            Live::IngressMaxWait => "ingress.grpc.max_wait_ms",
            Live::Dopplers { discovered: false } => "dopplers.endpoints",
            Live::Dopplers { discovered: true } => "dopplers.router_addr",
            Live::DopplersTls => "dopplers.tls",
            Live::ConnectTimeout => "dopplers.connect_timeout_ms",
            Live::KeepaliveInterval => "dopplers.keepalive_interval_ms",
            Live::KeepaliveTimeout => "dopplers.keepalive_timeout_ms",
            Live::MetricsTls => "metrics.tls",
            Live::Signing => "signing",
            Live::SigningPreviousKeys => "signing.previous_keys",
            Live::Budget => "pipeline.max_buffered_bytes",
            Live::LogLevel => "log.level",
            Live::ReplayExtra => "dopplers.replay_extra_percent",
            Live::ReplayMinRate => "dopplers.replay_min_rate",
            Live::AggregateDrains => "syslog.aggregate_drains",
            Live::BindingCache => "syslog.binding_cache",
            Live::Limits => "limits",
            Live::Forwarding => "forwarding.ingress_port_glob files",
        }
    }
}

/// What differs between two configs, by how a reload treats it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Applied while running, in the table's order.
    pub live: Vec<Live>,
    /// Kept at their running values until a restart, in the table's order.
    pub restart: Vec<&'static str>,
}

impl Changes {
    fn live(&mut self, changed: bool, key: Live) {
        if changed && !self.live.contains(&key) {
            self.live.push(key);
        }
    }

    fn restart(&mut self, changed: bool, key: &'static str) {
        if changed {
            self.restart.push(key);
        }
    }

    /// Adds `key` to what is applied live, if it is not there yet (TLS files that changed under
    /// the same paths, which only reading them tells).
    pub fn add_live(&mut self, key: Live) {
        self.live(true, key);
        self.live.sort();
    }
}

impl Config {
    /// Every key that differs between `self` and `new`, classified (see the module docs).
    pub fn changes(&self, new: &Config) -> Changes {
        let Config {
            identity:
                Identity {
                    // These four are in `default_tags`.
                    deployment: _,
                    job: _,
                    index: _,
                    ip: _,
                    az,
                },
            default_tags,
            ingress:
                IngressConfig {
                    listen,
                    tls: ingress_tls,
                    max_wait,
                    udp,
                },
            dopplers:
                DopplersConfig {
                    source,
                    tls: doppler_tls,
                    server_name,
                    connections,
                    connect_timeout,
                    backoff_initial,
                    backoff_max,
                    rebalance_interval,
                    progress_timeout,
                    ack_interval,
                    ack_bytes,
                    recycle_interval,
                    keepalive_interval,
                    keepalive_timeout,
                    batch_max_envelopes,
                    batch_max_bytes,
                    replay_extra_percent,
                    replay_min_rate,
                    disable_logs,
                },
            metrics:
                MetricsConfig {
                    listen: metrics_listen,
                    tls: metrics_tls,
                    envelope_interval,
                },
            signing,
            signing_enabled,
            sequencing_enabled,
            pipeline:
                PipelineConfig {
                    max_buffered_bytes,
                    mailbox_capacity,
                    max_sources,
                    max_counter_keys,
                    scheduling,
                },
            shutdown_grace,
            log: LogConfig { level, format },
            health: HealthConfig {
                listen: health_listen,
            },
            development:
                DevelopmentConfig {
                    enabled: development_enabled,
                    credentials_dir,
                    doppler_listen,
                },
            syslog:
                SyslogConfig {
                    aggregate_drains,
                    include_metron_tags,
                    default_drain_metadata,
                    max_drain_series,
                    dial_timeout: drain_dial_timeout,
                    write_timeout: drain_write_timeout,
                    idle_reconnect,
                    backoff_initial: drain_backoff_initial,
                    backoff_max: drain_backoff_max,
                    send_buffer_bytes,
                    binding_cache,
                    idle_drain_timeout,
                    blocked_ranges,
                    max_app_drains,
                },
            limits,
            otlp,
            ingress_port_glob,
        } = self;
        let (d, m, p) = (&new.dopplers, &new.metrics, &new.pipeline);
        let mut c = Changes::default();
        c.restart(*az != new.identity.az, "identity.az");
        c.restart(*otlp != new.otlp, "otlp");
        c.restart(
            *ingress_port_glob != new.ingress_port_glob,
            "forwarding.ingress_port_glob",
        );
        c.live(*default_tags != new.default_tags, Live::Tags);
        c.restart(*listen != new.ingress.listen, "ingress.grpc.listen");
        c.live(*ingress_tls != new.ingress.tls, Live::IngressTls);
        c.live(*max_wait != new.ingress.max_wait, Live::IngressMaxWait);
        c.restart(*udp != new.ingress.udp, "ingress.udp");
        c.live(
            *source != d.source,
            Live::Dopplers {
                discovered: matches!(d.source, DopplerSource::Dns { .. }),
            },
        );
        c.live(
            *doppler_tls != d.tls || *server_name != d.server_name,
            Live::DopplersTls,
        );
        c.restart(*connections != d.connections, "dopplers.connections");
        c.live(*connect_timeout != d.connect_timeout, Live::ConnectTimeout);
        c.restart(
            *backoff_initial != d.backoff_initial,
            "dopplers.backoff_initial_ms",
        );
        c.restart(*backoff_max != d.backoff_max, "dopplers.backoff_max_ms");
        c.restart(
            *rebalance_interval != d.rebalance_interval,
            "dopplers.rebalance_interval_ms",
        );
        c.restart(
            *progress_timeout != d.progress_timeout,
            "dopplers.progress_timeout_ms",
        );
        c.restart(*ack_interval != d.ack_interval, "dopplers.ack_interval_ms");
        c.restart(*ack_bytes != d.ack_bytes, "dopplers.ack_bytes");
        c.restart(
            *recycle_interval != d.recycle_interval,
            "dopplers.recycle_interval_ms",
        );
        c.live(
            *keepalive_interval != d.keepalive_interval,
            Live::KeepaliveInterval,
        );
        c.live(
            *keepalive_timeout != d.keepalive_timeout,
            Live::KeepaliveTimeout,
        );
        c.restart(
            *batch_max_envelopes != d.batch_max_envelopes,
            "dopplers.batch_max_envelopes",
        );
        c.restart(
            *batch_max_bytes != d.batch_max_bytes,
            "dopplers.batch_max_bytes",
        );
        c.live(
            *replay_extra_percent != d.replay_extra_percent,
            Live::ReplayExtra,
        );
        c.live(*replay_min_rate != d.replay_min_rate, Live::ReplayMinRate);
        c.restart(*disable_logs != d.disable_logs, "dopplers.disable_logs");
        c.live(*limits != new.limits, Live::Limits);
        let s = &new.syslog;
        // The default metadata is read into every drain's URL: a change restarts the drains.
        c.live(
            *aggregate_drains != s.aggregate_drains
                || *default_drain_metadata != s.default_drain_metadata,
            Live::AggregateDrains,
        );
        // Turning app drains on or off changes how the budget is shared: a restart.
        let toggled = binding_cache.is_some() != s.binding_cache.is_some();
        c.restart(toggled, "syslog.binding_cache");
        c.live(
            !toggled
                && s.binding_cache.is_some()
                && (*binding_cache != s.binding_cache
                    || *default_drain_metadata != s.default_drain_metadata),
            Live::BindingCache,
        );
        for (changed, key) in [
            (
                *idle_drain_timeout != s.idle_drain_timeout,
                "syslog.idle_drain_timeout_ms",
            ),
            (*blocked_ranges != s.blocked_ranges, "syslog.blocked_ranges"),
            (*max_app_drains != s.max_app_drains, "syslog.max_app_drains"),
            (
                *include_metron_tags != s.include_metron_tags,
                "syslog.include_metron_tags",
            ),
            (
                *max_drain_series != s.max_drain_series,
                "syslog.max_drain_series",
            ),
            (
                *drain_dial_timeout != s.dial_timeout,
                "syslog.dial_timeout_ms",
            ),
            (
                *drain_write_timeout != s.write_timeout,
                "syslog.write_timeout_ms",
            ),
            (
                *idle_reconnect != s.idle_reconnect,
                "syslog.idle_reconnect_ms",
            ),
            (
                *drain_backoff_initial != s.backoff_initial,
                "syslog.backoff_initial_ms",
            ),
            (*drain_backoff_max != s.backoff_max, "syslog.backoff_max_ms"),
            (
                *send_buffer_bytes != s.send_buffer_bytes,
                "syslog.send_buffer_bytes",
            ),
        ] {
            c.restart(changed, key);
        }
        c.restart(*metrics_listen != m.listen, "metrics.listen");
        // Turning /metrics' TLS on or off needs a restart; new files while it stays on do not.
        match (metrics_tls, &m.tls) {
            (Some(a), Some(b)) => c.live(a != b, Live::MetricsTls),
            (a, b) => c.restart(a.is_some() != b.is_some(), "metrics.tls"),
        }
        c.restart(
            *envelope_interval != m.envelope_interval,
            "metrics.envelope_interval_ms",
        );
        // A removed section needs a restart (the key in use stays); a new key or new previous
        // keys are applied (the reload checks the key id rule).
        match (signing, &new.signing) {
            (Some(_), None) => c.restart(true, RESTART_SIGNING),
            (None, Some(_)) => c.live(true, Live::Signing),
            (Some(a), Some(b)) => {
                let SigningConfig {
                    key_id,
                    key,
                    previous_keys,
                } = a;
                c.live(*key_id != b.key_id || *key != b.key, Live::Signing);
                c.live(*previous_keys != b.previous_keys, Live::SigningPreviousKeys);
            }
            (None, None) => {}
        }
        c.restart(
            *signing_enabled != new.signing_enabled,
            RESTART_SIGNING_ENABLED,
        );
        c.restart(
            *sequencing_enabled != new.sequencing_enabled,
            "sequencing.enabled",
        );
        c.live(*max_buffered_bytes != p.max_buffered_bytes, Live::Budget);
        c.restart(
            *mailbox_capacity != p.mailbox_capacity,
            "pipeline.mailbox_capacity",
        );
        c.restart(*max_sources != p.max_sources, "pipeline.max_sources");
        c.restart(
            *max_counter_keys != p.max_counter_keys,
            "pipeline.max_counter_keys",
        );
        c.restart(*scheduling != p.scheduling, "pipeline.scheduling");
        c.restart(
            *shutdown_grace != new.shutdown_grace,
            "shutdown.grace_period_ms",
        );
        c.live(*level != new.log.level, Live::LogLevel);
        c.restart(*format != new.log.format, "log.format");
        c.restart(*health_listen != new.health.listen, "health.listen");
        let dev = &new.development;
        c.restart(
            *development_enabled != dev.enabled
                || *credentials_dir != dev.credentials_dir
                || *doppler_listen != dev.doppler_listen,
            "development",
        );
        // In the table's order (the enum's), whatever the order of the fields above.
        c.live.sort();
        c
    }
}
