//! What the connection actors of the destinations beside the Doppler pool share (a syslog
//! drain, the OTLP collector, a downstream agent): each is a shell around one task that takes
//! from the destination's outbox. A panic in the task is caught where the task ends: reported
//! (`actor_panics`), what it held dropped as `actor_panic`, and the task started again from
//! fresh state; the outbox, and everything still queued in it, is untouched. Shutdown closes
//! the outbox and waits for the task to deliver what is left; a retirement does the same
//! within a grace period, then drops the rest (`drain_removed`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::task::AbortHandle;

use super::drain_connection::Held;
use super::guard::Panicked;
use crate::envelope::outbox::Outlet;
use crate::telemetry::{ActorName, DropReason, Ledger};

/// The task's side of the shell: what it reports when it has delivered everything and ended.
pub type Done = Arc<tokio::sync::watch::Sender<bool>>;

/// An actor around one outbox task.
pub trait OutletActor: Actor<Context = Context<Self>> {
    /// How panics are counted (`actor_panics{actor}`).
    const NAME: ActorName;

    fn shell(&mut self) -> &mut OutletShell;

    /// The task, from fresh state.
    fn task(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The state the shell keeps.
pub struct OutletShell {
    pub outlet: Outlet,
    pub ledger: Arc<Ledger>,
    /// Envelopes (and their budget bytes) the task has taken and not yet settled.
    pub held: Arc<Held>,
    pub done: Done,
    task: Option<AbortHandle>,
}

impl OutletShell {
    pub fn new(outlet: Outlet, ledger: Arc<Ledger>) -> Self {
        Self {
            outlet,
            ledger,
            held: Arc::default(),
            done: Arc::new(tokio::sync::watch::channel(false).0),
            task: None,
        }
    }

    /// Starts `act`'s task, and watches it: a panic restarts it from fresh state.
    pub fn spawn<A: OutletActor>(act: &mut A, ctx: &mut Context<A>) {
        let task = tokio::spawn(act.task());
        act.shell().task = Some(task.abort_handle());
        let ended = async move {
            match task.await {
                Err(e) if e.is_panic() => Some(Panicked::from_payload(&*e.into_panic())),
                _ => None,
            }
        };
        ctx.spawn(
            actix::fut::wrap_future::<_, A>(ended).map(|ended, act, ctx| {
                if let Some(panic) = ended {
                    let s = act.shell();
                    panic.report(A::NAME, s.ledger.metrics());
                    let (n, bytes) = s.held.take();
                    s.outlet.outbox.unroute(bytes);
                    s.ledger
                        .dropped_at(&s.outlet.account, DropReason::ActorPanic, n, bytes);
                    OutletShell::spawn(act, ctx);
                }
            }),
        );
    }

    /// Test-only: the actor panics now (`escape`: outside its guard), or its task at its next
    /// batch.
    #[cfg(feature = "chaos-hooks")]
    pub fn chaos_panic(&self, me: ActorName, escape: bool) {
        if escape {
            super::guard::chaos_panic(me);
        }
        self.held.arm_chaos();
    }

    /// The actor stopped: so does its task.
    pub fn stopped(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Shutdown: the task delivers what is queued, then ends; true once it has.
    pub fn drain(&self) -> ResponseFuture<bool> {
        self.outlet.outbox.close();
        let mut done = self.done.subscribe();
        Box::pin(async move { done.wait_for(|done| *done).await.is_ok() })
    }

    /// A reload removed the destination: the task delivers what it holds within `grace`; then,
    /// or when it has ended, `retire` runs (once: see [`OutletShell::retire`]).
    pub fn retire_after<A: OutletActor>(
        act: &mut A,
        ctx: &mut Context<A>,
        grace: Duration,
        retire: fn(&mut A, &mut Context<A>),
    ) {
        let s = act.shell();
        s.outlet.outbox.close();
        let mut done = s.done.subscribe();
        ctx.spawn(
            actix::fut::wrap_future::<_, A>(async move {
                let _ = done.wait_for(|done| *done).await;
            })
            .map(move |(), act, ctx| retire(act, ctx)),
        );
        ctx.run_later(grace, retire);
    }

    /// Stops the task, drops what it still holds and what is queued (`drain_removed`), and
    /// retires the account; returns the envelopes dropped, or `None` if it was done already.
    pub fn retire(&mut self) -> Option<usize> {
        self.task.take()?.abort();
        let (mut n, mut bytes) = self.held.take();
        for b in self.outlet.outbox.take_all() {
            n += b.len();
            bytes += b.bytes();
        }
        self.outlet.outbox.unroute(bytes);
        self.ledger
            .dropped_at(&self.outlet.account, DropReason::DrainRemoved, n, bytes);
        self.ledger.metrics().retire(&self.outlet.account);
        Some(n)
    }
}
