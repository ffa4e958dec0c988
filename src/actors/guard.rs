//! The crash policy (docs/decisions.md, "A panic is caught where it happens"): every actor runs
//! its handlers through [`catch`]. A panic is caught there, counted (`actor_panics{actor}`) and
//! logged at most once per 10 s per actor; the actor goes on from fresh state, and whatever it
//! held for the message it was handling is counted as dropped (`actor_panic`). The process and
//! every other actor's buffers are untouched.
//!
//! A panic that escapes a guard (one in actix itself, say) takes its actor down. The agent
//! watches every actor's mailbox: `/livez` and `/readyz` answer 503 naming the actor, and the
//! daemon shuts down gracefully and exits with status 70 so its service manager starts it again.

use std::panic::{catch_unwind, AssertUnwindSafe};

use actix::dev::SendError;

use crate::telemetry::{ActorName, DropReason, Metrics};

/// A panic caught by [`catch`]: its message.
#[derive(Debug)]
pub struct Panicked(pub String);

impl Panicked {
    /// Counts and logs the panic as `actor`'s.
    pub fn report(&self, actor: ActorName, metrics: &Metrics) {
        metrics.panicked(actor, &self.0);
    }
}

/// Runs `f`, catching a panic. What `f` changed before it panicked is the caller's to discard:
/// every caller replaces the state `f` touched with fresh state.
///
/// # Errors
/// [`Panicked`] with the panic's message.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, Panicked> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| Panicked::from_payload(&*payload))
}

impl Panicked {
    /// The panic whose payload is `payload` (from `catch_unwind`, or a task's `JoinError`).
    pub fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        Panicked(crate::telemetry::logging::panic_message(payload))
    }
}

/// The chaos hook's trigger inside a data handler: armed by a `ChaosPanic` message, it makes
/// the actor panic inside its guard while it handles its next batch, so a test sees a real
/// batch lost to a real panic. Zero-sized and inert without the `chaos-hooks` feature.
#[derive(Debug, Default)]
pub struct Chaos {
    #[cfg(feature = "chaos-hooks")]
    armed: bool,
}

impl Chaos {
    /// Panics if armed; does nothing in a build without the `chaos-hooks` feature.
    #[inline(always)]
    pub fn strike(&mut self, _actor: ActorName) {
        #[cfg(feature = "chaos-hooks")]
        if std::mem::take(&mut self.armed) {
            chaos_panic(_actor);
        }
    }

    #[cfg(feature = "chaos-hooks")]
    pub fn arm(&mut self) {
        self.armed = true;
    }
}

/// Why a message handed to the next actor was not taken, and the message back: its mailbox was
/// full (`full`), or the actor is gone, a panic having escaped its guard (`actor_panic`).
pub fn refused<M>(e: SendError<M>, full: DropReason) -> (DropReason, M) {
    match e {
        SendError::Full(msg) => (full, msg),
        SendError::Closed(msg) => (DropReason::ActorPanic, msg),
    }
}

/// Panics on purpose, for the chaos hooks.
#[cfg(feature = "chaos-hooks")]
pub fn chaos_panic(actor: ActorName) -> ! {
    panic!("chaos hook: the {} actor panics on purpose", actor.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_with_its_message() {
        assert_eq!(catch(|| 7).unwrap(), 7);
        let p = catch(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(p.0, "boom 1");
        let p = catch(|| std::panic::panic_any(5u8)).unwrap_err();
        assert_eq!(p.0, "a panic without a message");
        let m = Metrics::new();
        p.report(ActorName::Signer, &m);
        assert_eq!(m.snapshot().panics_of(ActorName::Signer), 1);
    }
}
