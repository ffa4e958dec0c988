//! Loggregator v1 ("dropsonde") envelopes: decoding a UDP datagram and converting it to v2.
//!
//! ```text
//!  datagram ──decode──▶ proto_v1::Envelope (validated) ──to_v2──▶ proto::Envelope ──▶ ingress
//!                        (rejects what upstream rejects)   (go-loggregator ToV2,
//!                                                            preferred tags)
//! ```
//!
//! Everything here is pure and total: no input makes it panic, and the only failure is
//! [`decode`]'s [`V1Error`]. The rules follow go-loggregator's `conversion` package (`ToV2` with
//! `usePreferredTags = true`) and loggregator-agent's dropsonde unmarshaller; where
//! they leave a choice, the function documenting it says which was made.

mod decode;
mod to_v2;
mod uuid;

pub use decode::{decode, validate, V1Error};
pub use to_v2::{into_v2, to_v2};
pub use uuid::{parse_uuid, uuid_to_string};

use crate::proto_v1::envelope::EventType;

/// Upstream's `EventType.String()`: the enum name, or the number for a value the enum lacks.
fn event_type_name(raw: i32) -> String {
    EventType::try_from(raw).map_or_else(|_| raw.to_string(), |t| t.as_str_name().to_owned())
}
