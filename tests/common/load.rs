//! Emitter load for tests that fault the Dopplers while envelopes flow.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metron::proto::EnvelopeBatch;
use metron::telemetry::{DropReason, MetricsSnapshot};
use metron::Agent;

use super::agent::{assert_balanced, assert_losses_accounted, wait_drained, World};
use super::doppler::FakeDoppler;
use super::util::{ingress_client, log_envelope};

/// Emitter load: `streams` connections, each sending 40-envelope batches over its own 6 sources
/// until stopped (or a hard cap), optionally paced.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Envelopes per emitter message.
pub const PER_BATCH: u64 = 40;

impl Load {
    pub async fn start(agent: &Agent, w: &World, streams: usize, pace: Option<Duration>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for k in 0..streams {
            let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
            let (stop, sent) = (stop.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                // Pacing sets the offered rate (one batch per period); it synchronises nothing.
                let mut tick = pace.map(tokio::time::interval);
                let mut i = 0u64;
                // Bounded whatever happens: at most 10,000 batches per stream.
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch: Vec<_> = (0..PER_BATCH)
                        .map(|_| {
                            i += 1;
                            log_envelope(&format!("s{k}-{}", i % 6), &format!("{i}"))
                        })
                        .collect();
                    client
                        .send(EnvelopeBatch { batch })
                        .await
                        .expect("Send succeeds whatever the Dopplers do");
                    sent.fetch_add(PER_BATCH, Ordering::Relaxed);
                    match tick.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => tokio::task::yield_now().await,
                    }
                }
            }));
        }
        Load { stop, sent, tasks }
    }

    /// Stops every emitter; returns how many envelopes the agent accepted.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        self.sent.load(Ordering::Relaxed)
    }

    /// The end of a fault scenario: the emitters stop, the agent drains (balanced while it holds
    /// nothing) and shuts down gracefully (its final drain acknowledged, no actor gone), and the
    /// balance is exact: every accepted envelope counted, and delivered or dropped.
    pub async fn finish(self, agent: Agent) -> MetricsSnapshot {
        let sent = self.stop().await;
        assert!(wait_drained(&agent, Duration::from_secs(20)), "drained");
        assert_balanced(&agent);
        let report = agent.shutdown();
        assert!(report.flushed, "the final drain was acknowledged");
        assert_eq!(report.actors_gone, None, "no actor is gone");
        let m = report.metrics;
        assert_eq!(m.ingress, sent, "every accepted envelope was counted");
        assert_eq!(
            m.ingress,
            m.egress + m.dropped_total(),
            "ingress == egress + dropped: {m:?}"
        );
        m
    }

    /// [`Load::finish`] with one Doppler, where only `connection_lost` may be counted (what a
    /// stream had in flight at a fault): nothing out of order or twice, every gap a counted
    /// loss.
    pub async fn finish_losing_only_in_flight(
        self,
        agent: Agent,
        doppler: &FakeDoppler,
    ) -> MetricsSnapshot {
        let m = self.finish(agent).await;
        assert_eq!(
            m.dropped_total(),
            m.dropped_by(DropReason::ConnectionLost),
            "only what was in flight at a fault is lost: {m:?}"
        );
        assert_losses_accounted(&doppler.received(), &m);
        m
    }
}
