//! A development Doppler: accepts `Ingress.BatchSender` over mTLS and logs a summary of what it
//! receives every few seconds, so a newcomer running the shipped config sees envelopes flow. The
//! latest envelope is shown as received (v2) and as the v1 firehose would show it
//! ([`crate::v1::to_v1`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
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
        let v1 = s.latest.as_ref().map(describe_v1).unwrap_or_default();
        tracing::info!(
            target: "dev_doppler",
            received = s.since_report,
            total = s.total,
            by_source = ?s.by_source,
            "development Doppler received envelopes; latest: {latest}; on the v1 firehose: {v1}"
        );
        s.since_report = 0;
    }
}

fn describe(e: &Envelope) -> String {
    use crate::envelope::tag::{MetronTag, TAG};
    let what = match &e.message {
        Some(Message::Counter(c)) => format!("counter {}={}", c.name, c.total),
        Some(Message::Gauge(g)) => format!("gauge {:?}", g.metrics.keys().collect::<Vec<_>>()),
        Some(Message::Log(l)) => format!("log {:?}", String::from_utf8_lossy(&l.payload)),
        Some(Message::Timer(t)) => format!("timer {}", t.name),
        Some(Message::Event(ev)) => format!("event {}", ev.title),
        None => "empty".into(),
    };
    let tag = e.tags.get(TAG).map(|v| match MetronTag::parse(v) {
        Ok(t) => format!(
            " (metron tag: stream {}, number {}, {})",
            t.sequence
                .map_or("-".into(), |s| crate::envelope::signing::encode_hex(
                    &s.stream
                )),
            t.sequence.map_or("-".into(), |s| s.seq.to_string()),
            t.signature.map_or("unsigned".into(), |(id, _)| format!(
                "signed with key id {id:?}"
            ))
        ),
        Err(err) => format!(" ({err})"),
    });
    format!(
        "source_id={} {what} tags={:?}{}",
        e.source_id,
        e.tags,
        tag.unwrap_or_default()
    )
}

/// The envelope as a Doppler's v1 firehose would show it: one line per v1 envelope.
fn describe_v1(e: &Envelope) -> String {
    let v1 = crate::v1::to_v1(e);
    if v1.is_empty() {
        return "nothing (v2 events have no v1 form)".into();
    }
    let one = |e: &crate::proto_v1::Envelope| {
        let kind = crate::proto_v1::envelope::EventType::try_from(e.event_type.unwrap_or(0))
            .map_or("?", |t| t.as_str_name());
        let what = if let Some(l) = &e.log_message {
            let text = l.message.as_deref().unwrap_or_default();
            format!(
                "app_id={} {:?}",
                l.app_id.as_deref().unwrap_or_default(),
                String::from_utf8_lossy(text)
            )
        } else if let Some(c) = &e.counter_event {
            format!("{}={}", c.name(), c.total())
        } else if let Some(v) = &e.value_metric {
            format!("{}={}{}", v.name(), v.value(), v.unit())
        } else if let Some(c) = &e.container_metric {
            format!("app={} cpu={}%", c.application_id(), c.cpu_percentage())
        } else if let Some(h) = &e.http_start_stop {
            format!("{} {}", h.status_code(), h.uri())
        } else if let Some(x) = &e.error {
            format!("{}: {}", x.source(), x.message())
        } else {
            String::new()
        };
        format!("{kind} origin={} {what}", e.origin())
    };
    v1.iter().map(one).collect::<Vec<_>>().join("; ")
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
    tls: crate::tls::ServerConfig,
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
    let incoming = crate::tls::ReloadableAcceptor::new(tls).incoming(
        listener,
        Duration::from_secs(10),
        "development.doppler_listen",
    );
    let served = Server::builder()
        .add_service(IngressServer::new(doppler).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES))
        .serve_with_incoming(ReceiverStream::new(incoming))
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "development Doppler stopped");
    }
    report.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Counter, Event};

    #[test]
    fn the_latest_envelope_is_also_shown_in_its_v1_form() {
        let mut e = Envelope {
            source_id: "app".into(),
            message: Some(Message::Counter(Counter {
                name: "requests".into(),
                delta: 1,
                total: 5,
            })),
            ..Default::default()
        };
        e.tags.insert("origin".into(), "rep".into());
        assert_eq!(describe_v1(&e), "CounterEvent origin=rep requests=5");
        e.message = Some(Message::Event(Event::default()));
        assert!(describe_v1(&e).contains("no v1 form"));
    }
}
