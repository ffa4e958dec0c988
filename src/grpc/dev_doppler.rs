//! A development Doppler: accepts `Ingress.BatchSender` over mTLS and logs a summary of what it
//! receives every few seconds, so a newcomer running the shipped config sees envelopes flow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::proto::envelope::Message;
use crate::proto::ingress_server::{Ingress, IngressServer};
use crate::proto::{BatchSenderResponse, Envelope, EnvelopeBatch, IngressResponse, SendResponse};

#[derive(Default)]
struct Seen {
    total: u64,
    since_report: u64,
    by_source: BTreeMap<String, u64>,
    latest: Option<Envelope>,
}

#[derive(Clone, Default)]
struct DevDoppler {
    seen: Arc<Mutex<Seen>>,
}

impl DevDoppler {
    fn record(&self, batch: Vec<Envelope>) {
        let mut s = self.seen.lock();
        s.total += batch.len() as u64;
        s.since_report += batch.len() as u64;
        for e in &batch {
            *s.by_source.entry(e.source_id.clone()).or_default() += 1;
        }
        s.latest = batch.into_iter().last();
    }

    fn report(&self) {
        let mut s = self.seen.lock();
        if s.since_report == 0 {
            return;
        }
        let latest = s.latest.as_ref().map(describe).unwrap_or_default();
        tracing::info!(
            target: "dev_doppler",
            received = s.since_report,
            total = s.total,
            by_source = ?s.by_source,
            "development Doppler received envelopes; latest: {latest}"
        );
        s.since_report = 0;
    }
}

fn describe(e: &Envelope) -> String {
    let what = match &e.message {
        Some(Message::Counter(c)) => format!("counter {}={}", c.name, c.total),
        Some(Message::Gauge(g)) => format!("gauge {:?}", g.metrics.keys().collect::<Vec<_>>()),
        Some(Message::Log(l)) => format!("log {:?}", String::from_utf8_lossy(&l.payload)),
        Some(Message::Timer(t)) => format!("timer {}", t.name),
        Some(Message::Event(ev)) => format!("event {}", ev.title),
        None => "empty".into(),
    };
    format!("source_id={} {what} tags={:?}", e.source_id, e.tags)
}

#[tonic::async_trait]
impl Ingress for DevDoppler {
    async fn sender(
        &self,
        request: Request<Streaming<Envelope>>,
    ) -> Result<Response<IngressResponse>, Status> {
        let mut s = request.into_inner();
        while let Some(e) = s.message().await? {
            self.record(vec![e]);
        }
        Ok(Response::new(IngressResponse {}))
    }

    async fn batch_sender(
        &self,
        request: Request<Streaming<EnvelopeBatch>>,
    ) -> Result<Response<BatchSenderResponse>, Status> {
        let mut s = request.into_inner();
        while let Some(b) = s.message().await? {
            self.record(b.batch);
        }
        Ok(Response::new(BatchSenderResponse {}))
    }

    async fn send(
        &self,
        _request: Request<EnvelopeBatch>,
    ) -> Result<Response<SendResponse>, Status> {
        // Like a real Doppler.
        Err(Status::unimplemented("Dopplers accept BatchSender only"))
    }
}

/// Serves until the task is aborted, logging a summary every `report_every`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: ServerTlsConfig,
    report_every: Duration,
) {
    let doppler = DevDoppler::default();
    let reporter = doppler.clone();
    let report = tokio::spawn(async move {
        let mut tick = tokio::time::interval(report_every);
        loop {
            tick.tick().await;
            reporter.report();
        }
    });
    let server = Server::builder().tls_config(tls).map(|mut b| {
        b.add_service(IngressServer::new(doppler).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES))
            .serve_with_incoming(TcpListenerStream::new(listener))
    });
    match server {
        Ok(fut) => {
            if let Err(e) = fut.await {
                tracing::error!(error = %e, "development Doppler stopped");
            }
        }
        Err(e) => tracing::error!(error = %e, "development Doppler TLS set-up failed"),
    }
    report.abort();
}
