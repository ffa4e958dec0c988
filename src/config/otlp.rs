//! The `otlp:` section: an OpenTelemetry collector as a destination (issue 23).

use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, TlsFiles};
use crate::otlp::encode::Layout;
use crate::otlp::mapping::Signals;

/// `otlp:` as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// `host:port` of the collector's OTLP/gRPC receiver.
    pub endpoint: String,
    pub security: OtlpSecurity,
    pub signals: Signals,
    /// Where the Cloud Foundry identity goes (`otlp.attributes`).
    pub attributes: Layout,
    /// Items (metrics, log records, spans) per export request, at most (an envelope's items
    /// are never split: a gauge with many values can go over).
    pub batch_max_items: NonZeroUsize,
    /// An export goes at the latest this long after its first item.
    pub batch_interval: Duration,
    pub retry: Retry,
}

/// How the agent talks to the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtlpSecurity {
    /// mTLS: `otlp.tls`, or the agent's own certificate and CA (`ingress.grpc.tls`) when the
    /// section gives none, as upstream's forwarder does.
    Tls {
        files: Option<TlsFiles>,
        server_name: String,
    },
    /// `otlp.plaintext: true`, loopback only.
    Plaintext,
}

/// Upstream's retry schedule by default: 1, 2, 4, 8, 16, 30, 30 s (about 91 s in all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub initial: Duration,
    pub max: Duration,
    /// A batch is dropped (`drain_write_failed`) once it has been retried for this long.
    pub max_elapsed: Duration,
}

impl Retry {
    /// The wait before retry `n` (1-based): doubling from `initial`, capped at `max`.
    pub fn delay(&self, n: u32) -> Duration {
        let doubled = self
            .initial
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        doubled.min(self.max)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOtlp {
    endpoint: String,
    #[serde(default)]
    tls: Option<RawOtlpTls>,
    #[serde(default)]
    plaintext: bool,
    #[serde(default)]
    signals: RawSignals,
    #[serde(default)]
    attributes: Layout,
    #[serde(default = "default_batch_max_items")]
    batch_max_items: NonZeroUsize,
    #[serde(default = "default_batch_interval_ms")]
    batch_interval_ms: NonZeroU64,
    #[serde(default)]
    retry: RawRetry,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtlpTls {
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default = "default_server_name")]
    server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignals {
    #[serde(default = "super::default_true")]
    logs: bool,
    #[serde(default = "super::default_true")]
    metrics: bool,
    #[serde(default = "super::default_true")]
    traces: bool,
}

impl Default for RawSignals {
    fn default() -> Self {
        Self {
            logs: true,
            metrics: true,
            traces: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "default_initial_ms")]
    initial_ms: NonZeroU64,
    #[serde(default = "default_max_ms")]
    max_ms: NonZeroU64,
    #[serde(default = "default_max_elapsed_ms")]
    max_elapsed_ms: NonZeroU64,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            max_elapsed_ms: default_max_elapsed_ms(),
        }
    }
}

/// Upstream's signal batcher: 100 items or 100 ms.
fn default_batch_max_items() -> NonZeroUsize {
    NonZeroUsize::new(100).expect("not zero")
}
fn default_batch_interval_ms() -> NonZeroU64 {
    NonZeroU64::new(100).expect("not zero")
}
fn default_initial_ms() -> NonZeroU64 {
    NonZeroU64::new(1_000).expect("not zero")
}
fn default_max_ms() -> NonZeroU64 {
    NonZeroU64::new(30_000).expect("not zero")
}
/// 1 + 2 + 4 + 8 + 16 + 30 + 30 s.
fn default_max_elapsed_ms() -> NonZeroU64 {
    NonZeroU64::new(91_000).expect("not zero")
}
/// The collector's certificate name in otel-collector-release.
fn default_server_name() -> String {
    "otel-collector".into()
}

impl OtlpConfig {
    /// The collector an `ingress_port.yml` file announces at `endpoint`: this section's
    /// settings (or the defaults, without one) with that endpoint. Plaintext is kept only for
    /// a loopback endpoint, which an announced one always is.
    pub fn announced(section: Option<&OtlpConfig>, endpoint: String) -> OtlpConfig {
        let mut c = section.cloned().unwrap_or_else(|| {
            RawOtlp {
                endpoint: endpoint.clone(),
                tls: None,
                plaintext: false,
                signals: RawSignals::default(),
                attributes: Layout::default(),
                batch_max_items: default_batch_max_items(),
                batch_interval_ms: default_batch_interval_ms(),
                retry: RawRetry::default(),
            }
            .validate()
            .expect("the defaults are valid")
        });
        c.endpoint = endpoint;
        c
    }
}

impl RawOtlp {
    pub(super) fn validate(self) -> Result<OtlpConfig, ConfigError> {
        let endpoint_err = |problem: String| ConfigError::new("otlp.endpoint", problem);
        let addr = parse_endpoint(&self.endpoint).map_err(endpoint_err)?;
        let security = match (self.plaintext, self.tls) {
            (true, Some(_)) => {
                return Err(ConfigError::new(
                    "otlp.plaintext",
                    "plaintext and otlp.tls together: choose one",
                ))
            }
            (true, None) => {
                if !addr.is_some_and(|a| a.ip().is_loopback()) {
                    return Err(ConfigError::new(
                        "otlp.plaintext",
                        format!(
                            "{} is not a loopback address: a plaintext OTLP endpoint is allowed \
                             on 127.0.0.0/8 or ::1 only",
                            self.endpoint
                        ),
                    ));
                }
                OtlpSecurity::Plaintext
            }
            (false, None) => OtlpSecurity::Tls {
                files: None,
                server_name: default_server_name(),
            },
            (false, Some(t)) => {
                let files = match (t.ca, t.cert, t.key) {
                    (None, None, None) => None,
                    (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
                    _ => {
                        return Err(ConfigError::new(
                            "otlp.tls",
                            "give ca, cert and key together (or none, for the agent's own \
                             ingress.grpc.tls files)",
                        ))
                    }
                };
                if t.server_name.is_empty() {
                    return Err(ConfigError::new(
                        "otlp.tls.server_name",
                        "must not be empty",
                    ));
                }
                OtlpSecurity::Tls {
                    files,
                    server_name: t.server_name,
                }
            }
        };
        let signals = Signals {
            logs: self.signals.logs,
            metrics: self.signals.metrics,
            traces: self.signals.traces,
        };
        let ms = |v: NonZeroU64| Duration::from_millis(v.get());
        let retry = Retry {
            initial: ms(self.retry.initial_ms),
            max: ms(self.retry.max_ms),
            max_elapsed: ms(self.retry.max_elapsed_ms),
        };
        if retry.max < retry.initial {
            return Err(ConfigError::new(
                "otlp.retry.max_ms",
                "must be at least otlp.retry.initial_ms",
            ));
        }
        Ok(OtlpConfig {
            endpoint: self.endpoint,
            security,
            signals,
            attributes: self.attributes,
            batch_max_items: self.batch_max_items,
            batch_interval: ms(self.batch_interval_ms),
            retry,
        })
    }
}

/// `host:port`; the socket address when the host is an IP literal.
fn parse_endpoint(endpoint: &str) -> Result<Option<SocketAddr>, String> {
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    match endpoint.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            if host.contains(['/', ' ']) {
                Err(format!("{endpoint:?} is not host:port"))
            } else {
                Ok(None)
            }
        }
        _ => Err(format!("{endpoint:?} is not host:port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
identity: { deployment: cf, job: diego-cell, index: "0", ip: 10.0.0.5, az: z1 }
ingress: { grpc: { listen: "127.0.0.1:3458" } }
dopplers: { endpoints: [ { addr: "127.0.0.1:8082", az: z1 } ] }
development: { enabled: true }
"#;

    fn load(otlp: &str) -> Result<Option<OtlpConfig>, ConfigError> {
        Config::from_yaml(&format!("{BASE}otlp: {otlp}\n")).map(|c| c.otlp)
    }

    #[test]
    fn defaults_are_upstreams() {
        let c = load(r#"{ endpoint: "127.0.0.1:9100" }"#).unwrap().unwrap();
        assert_eq!(
            c.security,
            OtlpSecurity::Tls {
                files: None,
                server_name: "otel-collector".into()
            }
        );
        assert_eq!(c.signals, Signals::default());
        assert_eq!(
            (c.batch_max_items.get(), c.batch_interval),
            (100, Duration::from_millis(100))
        );
        // 1, 2, 4, 8, 16, 30, 30 s: about 91 s.
        let schedule: Vec<u64> = (1..=7).map(|n| c.retry.delay(n).as_secs()).collect();
        assert_eq!(schedule, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(c.retry.max_elapsed, Duration::from_secs(91));
        assert!(Config::from_yaml(BASE).unwrap().otlp.is_none());
    }

    #[test]
    fn plaintext_only_on_loopback_and_bad_input_names_its_key() {
        let c = load(r#"{ endpoint: "127.0.0.1:4317", plaintext: true }"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.security, OtlpSecurity::Plaintext);
        for (yaml, key) in [
            (
                r#"{ endpoint: "10.0.0.9:4317", plaintext: true }"#,
                "otlp.plaintext",
            ),
            (
                r#"{ endpoint: "collector:4317", plaintext: true }"#,
                "otlp.plaintext",
            ),
            (
                r#"{ endpoint: "127.0.0.1", plaintext: true }"#,
                "otlp.endpoint",
            ),
            (
                r#"{ endpoint: "127.0.0.1:4317", tls: { ca: /a } }"#,
                "otlp.tls",
            ),
            (
                r#"{ endpoint: "127.0.0.1:4317", retry: { initial_ms: 5000, max_ms: 1000 } }"#,
                "otlp.retry.max_ms",
            ),
        ] {
            let e = load(yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
        assert!(load(r#"{ endpoint: "127.0.0.1:4317", colour: red }"#)
            .unwrap_err()
            .to_string()
            .contains("colour"));
    }
}
