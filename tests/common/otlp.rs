//! A fake OpenTelemetry collector: the three OTLP/gRPC export services (logs, metrics, traces)
//! on 127.0.0.1, over mTLS or plaintext, recording what they receive and answering as a test
//! scripts them (accept, refuse with UNAVAILABLE / UNIMPLEMENTED / RESOURCE_EXHAUSTED with an
//! optional `RetryInfo`, or accept with a partial success). Killable and restartable on the same
//! address, like [`super::doppler::FakeDoppler`].

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metron::otlp_proto::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use metron::otlp_proto::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use metron::otlp_proto::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use metron::otlp_proto::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use metron::otlp_proto::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use metron::otlp_proto::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use metron::otlp_proto::metrics::v1::metric::Data;
use parking_lot::{Condvar, Mutex, MutexGuard};
use prost::Message as _;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

use super::pki::Pki;
use super::util::install_crypto_provider;

/// The DNS name on the collector's server certificate: what a client verifies it as.
pub const COLLECTOR_SERVER_NAME: &str = "otel-collector";

/// The largest message the fake collector accepts: the OpenTelemetry Collector's default
/// (`max_recv_msg_size_mib: 4`), which is also tonic's.
pub const COLLECTOR_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long `serve` keeps retrying a bind while the port is still held (by the listener of a
/// collector that was just killed, for instance).
const BIND_RETRY_FOR: Duration = Duration::from_secs(2);

/// Bounds `kill`: the runtime's workers normally exit within milliseconds.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Gives every collector started from one `Pki` its own certificate files.
static COLLECTOR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The three OTLP signals, one export service each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    Logs,
    Metrics,
    Traces,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::Logs, Signal::Metrics, Signal::Traces];

    fn index(self) -> usize {
        match self {
            Signal::Logs => 0,
            Signal::Metrics => 1,
            Signal::Traces => 2,
        }
    }
}

/// How the collector answers the next `Export` calls of one signal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Records the request and answers success (no `partial_success`).
    #[default]
    Ok,
    /// Answers UNAVAILABLE (retryable) without recording the request.
    Unavailable,
    /// Answers UNIMPLEMENTED (a collector without this signal's pipeline) without recording.
    Unimplemented,
    /// Answers RESOURCE_EXHAUSTED without recording; with `retry_after`, the status details carry
    /// a `google.rpc.RetryInfo` whose `retry_delay` is that long (the OTLP throttling signal).
    ResourceExhausted { retry_after: Option<Duration> },
    /// Records the request and answers success with `partial_success` saying `rejected` items
    /// (log records, data points or spans) were rejected.
    PartialSuccess { rejected: i64 },
}

/// The counters of a `FakeCollector`, as one consistent snapshot. Accumulate across
/// `kill`/`restart`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests recorded (answered `Ok` or `PartialSuccess`), per signal.
    pub logs: usize,
    pub metrics: usize,
    pub traces: usize,
    /// `LogRecord`s in the recorded log requests.
    pub log_records: usize,
    /// `NumberDataPoint`s of sums and gauges in the recorded metric requests (histograms and
    /// summaries are not counted).
    pub data_points: usize,
    /// `Span`s in the recorded trace requests.
    pub spans: usize,
    /// Every `Export` call per signal (indexed as [`Signal::ALL`]), refused ones included.
    pub requests: [usize; 3],
    /// Distinct client connections (peer addresses) that made an `Export` call.
    pub connections: usize,
}

impl Counts {
    /// Every `Export` call of `signal`, refused ones included.
    pub fn requests(&self, signal: Signal) -> usize {
        self.requests[signal.index()]
    }

    /// Recorded requests of `signal`.
    pub fn recorded(&self, signal: Signal) -> usize {
        match signal {
            Signal::Logs => self.logs,
            Signal::Metrics => self.metrics,
            Signal::Traces => self.traces,
        }
    }

    /// Recorded items of `signal`: log records, data points or spans.
    pub fn items(&self, signal: Signal) -> usize {
        match signal {
            Signal::Logs => self.log_records,
            Signal::Metrics => self.data_points,
            Signal::Traces => self.spans,
        }
    }
}

#[derive(Default)]
struct Recorded {
    logs: Vec<ExportLogsServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    traces: Vec<ExportTraceServiceRequest>,
    counts: Counts,
    behaviours: [Behaviour; 3],
    peers: std::collections::HashSet<SocketAddr>,
}

/// Everything a `FakeCollector` has recorded, and its script. Outlives its runtimes.
struct Store {
    state: Mutex<Recorded>,
    /// Notified on every change of `state`, so waits are condition waits rather than polls.
    changed: Condvar,
    /// Mirrors `state.counts` for async waiters, who must not block on `changed`.
    counts: watch::Sender<Counts>,
}

impl Store {
    fn update<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        let mut state = self.state.lock();
        let out = f(&mut state);
        state.counts.connections = state.peers.len();
        self.counts.send_replace(state.counts);
        drop(state);
        self.changed.notify_all();
        out
    }

    /// Counts the call, then records the request if the signal's behaviour accepts it. `Ok(n)`
    /// is the number of rejected items to report (`None`: full success).
    fn export<R>(
        &self,
        signal: Signal,
        peer: Option<SocketAddr>,
        request: R,
        items: usize,
        push: impl FnOnce(&mut Recorded, R),
    ) -> Result<Option<i64>, Status> {
        let behaviour = self.update(|s| {
            s.peers.extend(peer);
            s.counts.requests[signal.index()] += 1;
            let behaviour = s.behaviours[signal.index()];
            if !matches!(behaviour, Behaviour::Ok | Behaviour::PartialSuccess { .. }) {
                return behaviour;
            }
            match signal {
                Signal::Logs => {
                    s.counts.logs += 1;
                    s.counts.log_records += items;
                }
                Signal::Metrics => {
                    s.counts.metrics += 1;
                    s.counts.data_points += items;
                }
                Signal::Traces => {
                    s.counts.traces += 1;
                    s.counts.spans += items;
                }
            }
            push(s, request);
            behaviour
        });
        match behaviour {
            Behaviour::Ok => Ok(None),
            Behaviour::PartialSuccess { rejected } => Ok(Some(rejected)),
            Behaviour::Unavailable => Err(Status::unavailable("fake collector: unavailable")),
            Behaviour::Unimplemented => Err(Status::unimplemented(format!(
                "fake collector: no {signal:?} pipeline"
            ))),
            Behaviour::ResourceExhausted { retry_after } => Err(resource_exhausted(retry_after)),
        }
    }

    /// Waits until `done` holds or `timeout` passes; returns whether it holds.
    fn wait(&self, timeout: Duration, mut done: impl FnMut(&Counts) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state: MutexGuard<'_, Recorded> = self.state.lock();
        while !done(&state.counts) {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return done(&state.counts);
            }
        }
        true
    }
}

/// The three export services the fake collector serves (one value, cloned into each).
#[derive(Clone)]
struct Recorder {
    store: Arc<Store>,
}

fn message(rejected: i64) -> String {
    format!("fake collector rejected {rejected}")
}

#[tonic::async_trait]
impl LogsService for Recorder {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let items = log_records_in(&request);
        let rejected = self
            .store
            .export(Signal::Logs, peer, request, items, |s, r| s.logs.push(r))?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: rejected.map(|n| ExportLogsPartialSuccess {
                rejected_log_records: n,
                error_message: message(n),
            }),
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Recorder {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let items = data_points_in(&request);
        let rejected = self
            .store
            .export(Signal::Metrics, peer, request, items, |s, r| {
                s.metrics.push(r)
            })?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: rejected.map(|n| ExportMetricsPartialSuccess {
                rejected_data_points: n,
                error_message: message(n),
            }),
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let items = spans_in(&request);
        let rejected = self
            .store
            .export(Signal::Traces, peer, request, items, |s, r| {
                s.traces.push(r)
            })?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: rejected.map(|n| ExportTracePartialSuccess {
                rejected_spans: n,
                error_message: message(n),
            }),
        }))
    }
}

/// `LogRecord`s in one request.
pub fn log_records_in(r: &ExportLogsServiceRequest) -> usize {
    r.resource_logs
        .iter()
        .flat_map(|rl| &rl.scope_logs)
        .map(|sl| sl.log_records.len())
        .sum()
}

/// `NumberDataPoint`s of sums and gauges in one request.
pub fn data_points_in(r: &ExportMetricsServiceRequest) -> usize {
    r.resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .map(|m| match &m.data {
            Some(Data::Gauge(g)) => g.data_points.len(),
            Some(Data::Sum(s)) => s.data_points.len(),
            _ => 0,
        })
        .sum()
}

/// `Span`s in one request.
pub fn spans_in(r: &ExportTraceServiceRequest) -> usize {
    r.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

// The few google.rpc / google.protobuf messages a throttling answer carries, by hand (tonic has
// them only in tonic-types, which is not a dependency).

/// `google.rpc.Status`: what `grpc-status-details-bin` holds.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ProtoAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// RESOURCE_EXHAUSTED, with a `RetryInfo` detail when `retry_after` is given.
fn resource_exhausted(retry_after: Option<Duration>) -> Status {
    let message = "fake collector: resource exhausted";
    let Some(delay) = retry_after else {
        return Status::resource_exhausted(message);
    };
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    let details = RpcStatus {
        code: Code::ResourceExhausted as i32,
        message: message.to_string(),
        details: vec![ProtoAny {
            type_url: RETRY_INFO_TYPE_URL.to_string(),
            value: info.encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::ResourceExhausted,
        message,
        bytes::Bytes::from(details.encode_to_vec()),
    )
}

/// The `retry_delay` of the first `RetryInfo` in `status`'s details, if any: the reading a client
/// does of a throttling answer, for tests to check the fake's own answers.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    let rpc = RpcStatus::decode(status.details()).ok()?;
    let any = rpc
        .details
        .iter()
        .find(|a| a.type_url == RETRY_INFO_TYPE_URL)?;
    let d = RetryInfo::decode(any.value.as_slice()).ok()?.retry_delay?;
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// The server certificate, key and client CA of an mTLS collector.
struct Tls {
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

/// An OpenTelemetry collector stand-in on `127.0.0.1`, serving OTLP/gRPC `LogsService`,
/// `MetricsService` and `TraceService`: over mTLS with a server certificate for
/// `otel-collector` and client certificates required from the test `Pki` ([`Self::start`]), or
/// in plaintext ([`Self::start_plaintext`]).
///
/// It runs on its own multi-thread runtime, so it keeps serving whatever runtime (or none) the
/// test uses, and `kill` can take it down like a crashed process.
pub struct FakeCollector {
    addr: SocketAddr,
    store: Arc<Store>,
    /// `None` for plaintext. Kept so `restart` serves the same identity.
    tls: Option<Tls>,
    /// `None` once killed.
    runtime: Option<Runtime>,
}

impl FakeCollector {
    /// Starts an mTLS collector on an ephemeral port of 127.0.0.1.
    ///
    /// # Panics
    /// If the certificate, the listener or the runtime cannot be set up.
    pub fn start(pki: &Pki) -> FakeCollector {
        let n = COLLECTOR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let cert = pki.issue(&format!("otel-collector-{n}"), &[COLLECTOR_SERVER_NAME]);
        FakeCollector::start_with(Some(Tls {
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            ca_pem: pki.ca_pem.clone(),
        }))
    }

    /// Starts a plaintext (no TLS) collector on an ephemeral port of 127.0.0.1.
    ///
    /// # Panics
    /// If the listener or the runtime cannot be set up.
    pub fn start_plaintext() -> FakeCollector {
        FakeCollector::start_with(None)
    }

    fn start_with(tls: Option<Tls>) -> FakeCollector {
        let (counts, _) = watch::channel(Counts::default());
        let mut collector = FakeCollector {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: Arc::new(Store {
                state: Mutex::new(Recorded::default()),
                changed: Condvar::new(),
                counts,
            }),
            tls,
            runtime: None,
        };
        collector.serve();
        collector
    }

    /// Binds `self.addr`, records the actual address and serves on a fresh runtime. The port is
    /// listening (connections queue in the backlog) by the time this returns.
    fn serve(&mut self) {
        install_crypto_provider();
        let listener = bind_with_retry(self.addr);
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        self.addr = listener.local_addr().expect("listener address");

        let mut builder = Server::builder();
        if let Some(tls) = &self.tls {
            let config = ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .client_ca_root(Certificate::from_pem(&tls.ca_pem));
            builder = builder
                .tls_config(config)
                .expect("fake collector TLS config");
        }
        let recorder = Recorder {
            store: self.store.clone(),
        };
        let router = builder
            .add_service(
                LogsServiceServer::new(recorder.clone())
                    .max_decoding_message_size(COLLECTOR_MAX_MESSAGE_BYTES),
            )
            .add_service(
                MetricsServiceServer::new(recorder.clone())
                    .max_decoding_message_size(COLLECTOR_MAX_MESSAGE_BYTES),
            )
            .add_service(
                TraceServiceServer::new(recorder)
                    .max_decoding_message_size(COLLECTOR_MAX_MESSAGE_BYTES),
            );

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-collector")
            .enable_all()
            .build()
            .expect("fake collector runtime");
        let addr = self.addr;
        runtime.spawn(async move {
            // `from_std` needs the runtime's reactor, hence inside the task.
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return eprintln!("fake collector {addr}: listener: {e}"),
            };
            if let Err(e) = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("fake collector {addr}: server stopped: {e}");
            }
        });
        self.runtime = Some(runtime);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>` (mTLS) or `http://127.0.0.1:<port>` (plaintext). Over TLS the
    /// client must verify the server as [`COLLECTOR_SERVER_NAME`], not as the IP.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// From the next `Export` call of `signal` on, answers as `behaviour` says. Survives
    /// restarts. Every signal starts as [`Behaviour::Ok`].
    pub fn set_behaviour(&self, signal: Signal, behaviour: Behaviour) {
        self.store
            .update(|s| s.behaviours[signal.index()] = behaviour);
    }

    /// `set_behaviour` for all three signals at once.
    pub fn set_behaviour_all(&self, behaviour: Behaviour) {
        self.store.update(|s| s.behaviours = [behaviour; 3]);
    }

    pub fn behaviour(&self, signal: Signal) -> Behaviour {
        self.store.state.lock().behaviours[signal.index()]
    }

    /// Every recorded log export request, in arrival order (across restarts).
    pub fn logs(&self) -> Vec<ExportLogsServiceRequest> {
        self.store.state.lock().logs.clone()
    }

    /// Every recorded metric export request, in arrival order.
    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.store.state.lock().metrics.clone()
    }

    /// Every recorded trace export request, in arrival order.
    pub fn traces(&self) -> Vec<ExportTraceServiceRequest> {
        self.store.state.lock().traces.clone()
    }

    /// `LogRecord`s in the recorded log requests.
    pub fn log_records(&self) -> usize {
        self.counts().log_records
    }

    /// `NumberDataPoint`s of sums and gauges in the recorded metric requests.
    pub fn data_points(&self) -> usize {
        self.counts().data_points
    }

    /// `Span`s in the recorded trace requests.
    pub fn spans(&self) -> usize {
        self.counts().spans
    }

    /// `Export` calls of `signal` so far, refused ones included.
    pub fn requests(&self, signal: Signal) -> usize {
        self.counts().requests(signal)
    }

    /// All counters at once, consistent with each other.
    pub fn counts(&self) -> Counts {
        self.store.state.lock().counts
    }

    /// Forgets every recorded request and zeroes the counters (not the behaviours).
    pub fn clear(&self) {
        self.store.update(|s| {
            s.logs.clear();
            s.metrics.clear();
            s.traces.clear();
            s.peers.clear();
            s.counts = Counts::default();
        });
    }

    /// Waits until `done` holds of the counters or `timeout` passes; returns whether it held. A
    /// condition wait, woken on every call. Blocks the calling thread: from async code on a
    /// runtime that also runs the sender, use [`Self::wait_for_async`].
    pub fn wait_for(&self, timeout: Duration, done: impl FnMut(&Counts) -> bool) -> bool {
        self.store.wait(timeout, done)
    }

    /// `wait_for` for async code: awaits instead of blocking the thread. Needs a runtime with
    /// time enabled.
    pub async fn wait_for_async(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Counts) -> bool,
    ) -> bool {
        let mut counts = self.store.counts.subscribe();
        tokio::time::timeout(timeout, counts.wait_for(|c| done(c)))
            .await
            .is_ok_and(|woke| woke.is_ok())
    }

    /// Takes the collector down abruptly: every task is dropped and every socket closed without
    /// a goodbye, like a crashed process. When this returns the sockets are closed. Recorded
    /// data stays readable. Idempotent; safe to call from async code.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Waiting for the workers has to happen off any async context (tokio panics
            // otherwise), hence the plain thread.
            let waited = std::thread::Builder::new()
                .name("fake-collector-kill".into())
                .spawn(move || runtime.shutdown_timeout(SHUTDOWN_WAIT))
                .expect("spawn kill thread")
                .join();
            if waited.is_err() {
                eprintln!("fake collector {}: runtime shutdown panicked", self.addr);
            }
        }
    }

    /// Kills (if running) and starts again on the same address with the same certificate, the
    /// same behaviours and the same recorded data, so counts accumulate across restarts.
    pub fn restart(&mut self) {
        self.kill();
        self.serve();
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind_with_retry(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + BIND_RETRY_FOR;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                // A bounded retry, not synchronisation: nothing to wait on for a port to free.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("fake collector: bind {addr}: {e}"),
        }
    }
}
