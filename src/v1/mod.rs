//! Loggregator v1 ("dropsonde") envelopes: decoding a UDP datagram, and converting to and from v2.
//!
//! ```text
//!  datagram ──decode──▶ proto_v1::Envelope ──apply_agent_rules──▶ ──to_v2──▶ proto::Envelope ──▶ ingress
//!                        (validated: rejects   (source_id tag from origin,  (go-loggregator ToV2,
//!                         what upstream does)   the VM's identity)            preferred tags)
//!  proto::Envelope ──to_v1──▶ Vec<proto_v1::Envelope>      (what a Doppler shows on the v1 firehose)
//! ```
//!
//! Everything here is pure and total: no input makes it panic, and the only failure is
//! [`decode`]'s [`V1Error`]. The rules follow go-loggregator's `conversion` package (`ToV2` with
//! `usePreferredTags = true`, and `ToV1`) and loggregator-agent's dropsonde unmarshaller and v1
//! tagger; where they leave a choice, the function documenting it says which was made.

mod agent;
mod decode;
mod to_v1;
mod to_v2;
mod uuid;

pub use agent::{agent_to_v2, apply_agent_rules, V1Identity};
pub use decode::{decode, validate, V1Error};
pub use to_v1::to_v1;
pub use to_v2::{into_v2, to_v2};
pub use uuid::{parse_uuid, uuid_to_string};

use crate::proto_v1::envelope::EventType;

/// The tags a v1 → v2 conversion always sets from the v1 envelope's own fields, and a v2 → v1
/// conversion turns back into fields (so they never survive as v1 tags).
const BASE_TAGS: [&str; 6] = ["origin", "deployment", "job", "index", "ip", "__v1_type"];

/// Upstream's `EventType.String()`: the enum name, or the number for a value the enum lacks.
fn event_type_name(raw: i32) -> String {
    EventType::try_from(raw).map_or_else(|_| raw.to_string(), |t| t.as_str_name().to_owned())
}
