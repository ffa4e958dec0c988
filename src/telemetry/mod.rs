//! The agent's own telemetry: one metrics struct with upstream's names, the pipeline ledger that
//! keeps `ingress == egress + dropped` exact, rate-limited warnings, logging set-up and the
//! Prometheus endpoint.

pub mod destination;
pub mod health;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod server;

pub use destination::{Account, AccountSnapshot, Destination, DrainScope};
pub use ledger::Ledger;
pub use logging::init_logging;
pub use metrics::{ActorName, DropReason, Metrics, MetricsSnapshot, RestartCause};
