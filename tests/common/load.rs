//! Emitter load for tests that fault the Dopplers while envelopes flow.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metron::proto::EnvelopeBatch;
use metron::Agent;

use super::agent::World;
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
}
