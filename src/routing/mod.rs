//! Pure routing policy: which Doppler a connection slot should use and how long to wait first.
//! No actors, no I/O: the supervisor actor drives it and the property tests pin it down.

pub mod backoff;
pub mod balancer;
