//! The OTLP destination (issue 23): envelopes mapped to OpenTelemetry logs, metrics and spans
//! exactly as upstream's forwarder-agent maps them (`mapping`).

pub mod encode;
pub mod export;
pub mod mapping;
