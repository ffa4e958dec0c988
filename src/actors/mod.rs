//! The actors: thin shells (mailbox, lifecycle, forwarding) around the plain logic in
//! `envelope/` and `routing/`. One file per actor; every message type is in `messages.rs`.

pub mod doppler_connection;
pub mod drain_connection;
pub mod forward_connection;
pub mod guard;
pub mod ingress;
pub mod messages;
pub mod otlp_connection;
pub mod outlet_task;
pub mod sequencer;
pub mod signer;
pub mod supervisor;
