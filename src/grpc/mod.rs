//! The tonic edges: the `loggregator.v2.Ingress` service emitters talk to, the Doppler client
//! side (per-connection queue and BatchSender stream), and the development Doppler.

pub mod dev_doppler;
pub mod egress;
pub mod ingress;
