//! The benchmark: `metron bench` starts a sink (a Doppler stand-in), the agent (this very binary,
//! as a separate process, with mTLS on both sides, sequencing and signing on) and a load
//! generator, runs the fixed workload ([`workload`]) through it and prints a table. Also runs
//! the load generator straight into the sink, so the agent's figures can be read against what
//! the machine manages without it. Everything stays on 127.0.0.1.
//!
//! `metron sink` and `metron load` run the two halves on their own.
//!
//! `metron bench --only syslog` ([`syslog_runs`]) adds a syslog sink ([`syslog_sink`], TCP and
//! TLS) and a load straight into it ([`syslog_load`]), to measure the agent fanning out to an
//! aggregate drain beside the Doppler sink.
//!
//! `metron bench --only noisy` ([`noisy_runs`]) measures noisy neighbours: a flood beside quiet
//! sources into a rate-capped sink, and a per-source rate limit held (issue 22).

pub mod downstream;
pub mod load;
pub mod noisy_runs;
pub mod otlp_runs;
pub mod otlp_sink;
pub mod outage;
pub mod pacer;
pub mod run;
pub mod sink;
pub mod subscriber;
pub mod syslog_load;
pub mod syslog_runs;
pub mod syslog_sink;
pub mod workload;

use std::time::{SystemTime, UNIX_EPOCH};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("load generator: {0}")]
    Load(String),
    #[error("agent: {0}")]
    Agent(String),
    #[error("{0}")]
    Setup(String),
    #[error("bad argument: {0}")]
    Usage(String),
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
