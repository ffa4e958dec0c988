//! The benchmark's OpenTelemetry collector: serves OTLP/gRPC `LogsService` and `MetricsService`
//! over mTLS (the Doppler sink's certificate) and counts every log record and data point into a
//! [`SinkStats`] of its own: its timestamp for the latency, its `source_id` attribute for the
//! order check. It decodes each request with prost, as a collector must.

use std::net::SocketAddr;
use std::sync::Arc;

use prost::Message as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::sink::SinkStats;
use super::BenchError;
use crate::otlp_proto::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use crate::otlp_proto::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use crate::otlp_proto::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use crate::otlp_proto::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use crate::otlp_proto::common::v1::{any_value, KeyValue};
use crate::otlp_proto::metrics::v1::metric;

/// The running sink.
pub struct OtlpSink {
    pub addr: SocketAddr,
    pub stats: Arc<SinkStats>,
}

#[derive(Clone)]
struct Counter(Arc<SinkStats>);

fn source(attributes: &[KeyValue]) -> &[u8] {
    attributes
        .iter()
        .find(|kv| kv.key == "source_id")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_bytes()),
            _ => None,
        })
        .unwrap_or(b"")
}

#[tonic::async_trait]
impl LogsService for Counter {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let r = request.into_inner();
        let seen: Vec<(i64, &[u8])> = r
            .resource_logs
            .iter()
            .flat_map(|rl| &rl.scope_logs)
            .flat_map(|sl| &sl.log_records)
            .map(|l| (l.time_unix_nano as i64, source(&l.attributes)))
            .collect();
        self.0.record(&seen, r.encoded_len() as u64);
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Counter {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let r = request.into_inner();
        let seen: Vec<(i64, &[u8])> = r
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .flat_map(|m| match &m.data {
                Some(metric::Data::Sum(s)) => s.data_points.as_slice(),
                Some(metric::Data::Gauge(g)) => g.data_points.as_slice(),
                _ => &[],
            })
            .map(|p| (p.time_unix_nano as i64, source(&p.attributes)))
            .collect();
        self.0.record(&seen, r.encoded_len() as u64);
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl OtlpSink {
    /// Starts on an ephemeral port of 127.0.0.1 on `rt`.
    ///
    /// # Errors
    /// When it cannot bind or its TLS is unusable.
    pub fn start(rt: &tokio::runtime::Runtime, tls: ServerTlsConfig) -> Result<Self, BenchError> {
        let stats = Arc::new(SinkStats::default());
        let counter = Counter(stats.clone());
        let addr = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| BenchError::Setup(format!("OTLP sink: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            let server = Server::builder()
                .tls_config(tls)
                .map_err(|e| BenchError::Setup(format!("OTLP sink TLS: {e}")))?
                .add_service(LogsServiceServer::new(counter.clone()))
                .add_service(MetricsServiceServer::new(counter))
                .serve_with_incoming(TcpListenerStream::new(listener));
            tokio::spawn(server);
            Ok::<_, BenchError>(addr)
        })?;
        Ok(Self { addr, stats })
    }
}
