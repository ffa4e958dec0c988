//! Routing policy: where the Dopplers are, which one a connection slot should use and how long to
//! wait first. No actors, and no I/O beyond discovery's DNS lookups, which go through an injectable
//! resolver: the supervisor actor drives it all and the (property) tests pin it down.

pub mod backoff;
pub mod balancer;
pub mod discovery;
pub mod outage;
