//! Routing policy: where the Dopplers are, which one a connection slot should use and how long to
//! wait first. No actors, and no I/O beyond discovery's DNS lookups, which go through an injectable
//! resolver: the supervisor actor drives it all and the (property) tests pin it down.

use std::sync::Arc;
use std::time::Duration;

pub mod backoff;
pub mod balancer;
pub mod discovery;
pub mod outage;
pub mod slots;
pub mod watchdog;

/// Where the Dopplers come from, as the supervisor takes it (at start-up and on a reload).
pub enum Dopplers {
    /// A fixed list (`dopplers.endpoints`).
    Static(Vec<balancer::Endpoint>),
    /// DNS names, re-resolved every `interval` and after failures.
    Discovered {
        discovery: Arc<discovery::Discovery>,
        interval: Duration,
    },
}
