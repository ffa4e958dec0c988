//! Syslog drains: envelopes as upstream's syslog-agent writes them. Plain logic — the formatter
//! ([`rfc5424`], tested with upstream's golden vectors), Go's float layout ([`gofloat`]), drain
//! URLs ([`drain`]), the binding cache's answers ([`bindings`]), client ([`cache`]) and poller
//! ([`poller`]), which drains each source's envelopes go to ([`apps`]) — and the connections
//! ([`writer`] for syslog over TCP or TLS, [`https`]). The drain's actor is
//! `actors::drain_connection`.

pub mod apps;
pub mod bindings;
pub mod cache;
pub mod drain;
pub mod gofloat;
pub mod https;
pub mod poller;
pub mod rfc5424;
pub mod writer;
