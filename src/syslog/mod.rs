//! Syslog drains (issue 21): envelopes as upstream's syslog-agent writes them. So far the
//! formatter ([`rfc5424`]), Go's float layout ([`gofloat`]) and drain URLs ([`drain`]), plain
//! logic with upstream's golden vectors; the drain writers and their actors come next.

pub mod drain;
pub mod gofloat;
pub mod https;
pub mod rfc5424;
pub mod writer;
