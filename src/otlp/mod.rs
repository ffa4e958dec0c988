//! The OTLP destination (issue 23): envelopes mapped to OpenTelemetry logs, metrics and spans
//! exactly as upstream's forwarder-agent maps them (the rules and their model in `mapping`,
//! the writer in `encode`), and what to do with a collector's answer (`export`).

pub mod encode;
pub mod export;
pub mod mapping;
