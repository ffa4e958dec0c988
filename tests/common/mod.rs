//! Shared integration-test harness: a throwaway PKI, a killable/stallable fake Doppler, condition
//! waits (`assert_eventually!`), mTLS ingress clients, /metrics scraping and envelope builders.
//!
//! Each test binary uses only part of this, hence the blanket `dead_code` allowance and the
//! `unused_imports` one on the re-exports (scoped there so real unused imports still warn).
#![allow(dead_code)]

pub mod agent;
pub mod doppler;
pub mod drain;
pub mod https_drain;
pub mod load;
pub mod otlp;
pub mod pki;
pub mod rsyslog;
pub mod util;

#[allow(unused_imports)]
pub use doppler::{Counts, FakeDoppler};
#[allow(unused_imports)]
pub use pki::{CertFiles, Pki};
#[allow(unused_imports)]
pub use util::*;
