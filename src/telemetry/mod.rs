//! The agent's own telemetry: one metrics struct with upstream's names, the pipeline ledger that
//! keeps `ingress == egress + dropped` exact, rate-limited warnings, logging set-up and the
//! Prometheus endpoint.

pub mod health;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod server;

pub use ledger::Ledger;
pub use metrics::{DropReason, Metrics, MetricsSnapshot, RestartCause};

/// Installs the global tracing subscriber (idempotent: a second call is ignored, which per-test
/// agents rely on).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}
