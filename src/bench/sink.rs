//! The benchmark's Doppler: serves `loggregator.v2.Ingress/BatchSender` over mTLS and, without
//! decoding envelopes, reads each one's timestamp and source id to count it, measure its latency
//! (the sink's clock minus the envelope's timestamp) and notice envelopes out of order within
//! their source. Answers `OK` when a stream ends, as a Doppler does.
//!
//! With [`SinkStats::decoding`] it also does what a Doppler does to every envelope for each
//! subscriber: decodes each message fully with prost and re-encodes every envelope, so that its
//! CPU per envelope shows what an envelope's form costs downstream (`metron bench --only
//! downstream`).
//!
//! With [`SinkStats::cap_rate`] it takes at most so many envelopes a second (all streams
//! together): it reads nothing until the last batch's share of time has passed, so HTTP/2 flow
//! control pushes back on the sender, as a saturated Doppler does (`bench --only noisy`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use prost::Message as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::now_ns;
use super::subscriber::SubscriberBuffer;
use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::envelope::raw::{batch_entries, timestamp_and_source};
use crate::proto::BatchSenderResponse;

/// Latency histogram in microseconds: 10 µs steps to 1 ms, 100 µs steps to 100 ms, 10 ms steps
/// to 10 s, then one overflow bucket.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

const FINE: u64 = 100;
const MID: u64 = 990;
const COARSE: u64 = 990;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..FINE + MID + COARSE + 1)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        let i = if us < 1_000 {
            us / 10
        } else if us < 100_000 {
            FINE + (us - 1_000) / 100
        } else if us < 10_000_000 {
            FINE + MID + (us - 100_000) / 10_000
        } else {
            FINE + MID + COARSE
        };
        i as usize
    }

    /// The upper bound (µs) of bucket `i`.
    fn upper(i: u64) -> u64 {
        if i < FINE {
            (i + 1) * 10
        } else if i < FINE + MID {
            1_000 + (i - FINE + 1) * 100
        } else if i < FINE + MID + COARSE {
            100_000 + (i - FINE - MID + 1) * 10_000
        } else {
            u64::MAX
        }
    }

    pub fn record(&self, us: u64, n: u64) {
        self.buckets[Self::index(us)].fetch_add(n, Ordering::Relaxed);
    }

    /// The smallest bucket bound below which at least `q` (0..1) of the samples lie, in µs.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(Self::upper(i as u64));
            }
        }
        None
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }
}

/// What the sink has seen since the last [`SinkStats::reset`].
#[derive(Default)]
pub struct SinkStats {
    pub received: AtomicU64,
    /// Encoded bytes of the envelopes received (without the batch's framing).
    pub bytes: AtomicU64,
    /// Decode and re-encode every envelope, as a Doppler does.
    decode: bool,
    pub out_of_order: AtomicU64,
    pub malformed: AtomicU64,
    pub latency: Histogram,
    /// The newest timestamp seen per source id, and the envelopes received from it.
    newest: Mutex<HashMap<Vec<u8>, (i64, u64)>>,
    /// Source ids starting with this are a watched group (`None`: none), whose latency is also
    /// recorded in `watched_latency`.
    watched: Mutex<Option<Vec<u8>>>,
    pub watched_latency: Histogram,
    /// Envelopes a second the sink takes (0: as fast as it can), and when it may read the next
    /// batch.
    pacer: super::pacer::ReadPacer,
    /// A subscriber's buffer behind the sink, if modelled (`bench --only outage`).
    subscriber: Mutex<Option<SubscriberBuffer>>,
    /// Whether `subscriber` is set: the other runs take no lock for it.
    modelled: std::sync::atomic::AtomicBool,
}

impl SinkStats {
    /// Stats of a sink that decodes and re-encodes every envelope.
    pub fn decoding() -> Self {
        Self {
            decode: true,
            ..Self::default()
        }
    }

    pub fn reset(&self) {
        self.received.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.out_of_order.store(0, Ordering::Relaxed);
        self.malformed.store(0, Ordering::Relaxed);
        self.latency.reset();
        self.watched_latency.reset();
        self.newest.lock().clear();
    }

    /// At most `per_second` envelopes a second from now on (0: no cap).
    pub fn cap_rate(&self, per_second: u64) {
        self.pacer.set(per_second);
    }

    /// Records the latency of sources whose id starts with `prefix` in `watched_latency` too
    /// (`None`: no group).
    pub fn watch(&self, prefix: Option<&[u8]>) {
        *self.watched.lock() = prefix.map(<[u8]>::to_vec);
    }

    /// Envelopes received per source id since the last reset.
    pub fn received_by_source(&self) -> HashMap<Vec<u8>, u64> {
        self.newest
            .lock()
            .iter()
            .map(|(k, (_, n))| (k.clone(), *n))
            .collect()
    }

    /// Waits until the sink may read more after a batch of `n`, when its rate is capped.
    async fn pace(&self, n: u64) {
        self.pacer.after(n).await;
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Puts a modelled subscriber's buffer behind the sink (`None`: none).
    pub fn model_subscriber(&self, model: Option<SubscriberBuffer>) {
        self.modelled.store(model.is_some(), Ordering::Release);
        *self.subscriber.lock() = model;
    }

    /// The modelled subscriber: a restarted Doppler's buffers are empty.
    pub fn empty_subscriber(&self) {
        if let Some(s) = self.subscriber.lock().as_mut() {
            s.empty();
        }
    }

    /// What the modelled subscriber's buffer dropped.
    pub fn subscriber_drops(&self) -> u64 {
        self.subscriber.lock().map_or(0, |s| s.dropped())
    }

    /// Records one batch; returns the envelopes in it.
    fn record_batch(&self, body: &[u8]) -> u64 {
        if self.decode {
            match crate::proto::EnvelopeBatch::decode(body) {
                Ok(batch) => {
                    for e in &batch.batch {
                        std::hint::black_box(e.encode_to_vec());
                    }
                }
                Err(_) => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let now = now_ns();
        let mut n = 0;
        let mut bytes = 0;
        let mut late = 0;
        let watched = self.watched.lock();
        let watched = watched.as_deref();
        let mut newest = self.newest.lock();
        for entry in batch_entries(body) {
            let Ok((ts, source)) = entry.and_then(|e| {
                bytes += e.len() as u64;
                timestamp_and_source(e)
            }) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            n += 1;
            late += u64::from(self.note(&mut newest, now, ts, source, watched));
        }
        drop(newest);
        if self.modelled.load(Ordering::Acquire) {
            if let Some(s) = self.subscriber.lock().as_mut() {
                s.arrive(n as usize, std::time::Instant::now());
            }
        }
        self.out_of_order.fetch_add(late, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.received.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Records messages another kind of sink has already read (the syslog sink): each one's
    /// timestamp (ns since the epoch) and source, and `bytes` in all. One lock per call, so a
    /// caller passes everything one read brought.
    pub fn record(&self, seen: &[(i64, &[u8])], bytes: u64) {
        let now = now_ns();
        let mut late = 0;
        let mut newest = self.newest.lock();
        for &(ts, source) in seen {
            late += u64::from(self.note(&mut newest, now, ts, source, None));
        }
        drop(newest);
        self.out_of_order.fetch_add(late, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.received
            .fetch_add(seen.len() as u64, Ordering::Relaxed);
    }

    /// One message's latency, and whether it is older than one seen before from its source.
    /// Counts it for its source, and records its latency in `watched_latency` too when the
    /// source id starts with `watched`.
    fn note(
        &self,
        newest: &mut HashMap<Vec<u8>, (i64, u64)>,
        now: i64,
        ts: i64,
        source: &[u8],
        watched: Option<&[u8]>,
    ) -> bool {
        let us = u64::try_from(now - ts).unwrap_or(0) / 1_000;
        self.latency.record(us, 1);
        if watched.is_some_and(|w| source.starts_with(w)) {
            self.watched_latency.record(us, 1);
        }
        match newest.get_mut(source) {
            Some((t, n)) => {
                *n += 1;
                if ts < *t {
                    return true;
                }
                *t = ts;
            }
            None => {
                newest.insert(source.to_vec(), (ts, 1));
            }
        }
        false
    }
}

/// Decodes each `EnvelopeBatch` message straight into the stats.
#[derive(Clone)]
struct SinkCodec(Arc<SinkStats>);

impl Codec for SinkCodec {
    type Encode = BatchSenderResponse;
    type Decode = u64;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        self.clone()
    }

    fn decoder(&mut self) -> Self {
        self.clone()
    }
}

impl Encoder for SinkCodec {
    type Item = BatchSenderResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for SinkCodec {
    type Item = u64;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<u64>, Status> {
        use prost::bytes::Buf;
        use tonic::codegen::Bytes;
        let len = src.remaining();
        let n = if src.chunk().len() == len {
            let n = self.0.record_batch(src.chunk());
            src.advance(len);
            n
        } else {
            let b: Bytes = src.copy_to_bytes(len);
            self.0.record_batch(&b)
        };
        Ok(Some(n))
    }
}

struct BatchSender(Arc<SinkStats>);

impl tonic::server::ClientStreamingService<u64> for BatchSender {
    type Response = BatchSenderResponse;
    type Future = BoxFuture<Response<BatchSenderResponse>, Status>;

    fn call(&mut self, request: Request<Streaming<u64>>) -> Self::Future {
        let stats = self.0.clone();
        Box::pin(async move {
            let mut s = request.into_inner();
            while let Some(n) = s.message().await? {
                stats.pace(n).await;
            }
            Ok(Response::new(BatchSenderResponse {}))
        })
    }
}

/// The sink as a tonic service (only `BatchSender`; anything else is `Unimplemented`).
#[derive(Clone)]
pub struct SinkService(Arc<SinkStats>);

impl NamedService for SinkService {
    const NAME: &'static str = "loggregator.v2.Ingress";
}

impl<B> Service<http::Request<B>> for SinkService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let codec = SinkCodec(self.0.clone());
        let stats = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != "/loggregator.v2.Ingress/BatchSender" {
                return Ok(Status::unimplemented("the sink only serves BatchSender").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_GRPC_MESSAGE_BYTES), None);
            Ok(grpc.client_streaming(BatchSender(stats), req).await)
        })
    }
}

/// Serves the sink on `listener` until the task is dropped.
///
/// # Errors
/// When the TLS configuration is unusable.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: ServerTlsConfig,
    stats: Arc<SinkStats>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .tls_config(tls)?
        .add_service(SinkService(stats))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
}

/// Binds `addr` for the sink.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
