//! Who loses what under overload (issue 22): fair shedding between sources ([`fair`]) and
//! per-source rate limits ([`rate`]).

pub mod fair;
pub mod lanes;
pub mod rate;
