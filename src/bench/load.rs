//! The benchmark's load generator: `streams` mTLS connections, one `BatchSender` stream each,
//! sending the pre-encoded workload at a fixed rate or as fast as the receiver reads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::workload::{templates, BATCH};
use super::{now_ns, BenchError};
use crate::config::MAX_GRPC_MESSAGE_BYTES;
use crate::proto::BatchSenderResponse;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub tls: ClientTlsConfig,
    pub streams: usize,
    /// Envelopes per second over all streams; `None` = as fast as the receiver takes them.
    pub rate: Option<u64>,
    pub duration: Duration,
    /// Tags added to every envelope of the workload (see [`templates`]).
    pub extra_tags: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// Envelopes the receiver's server took (every stream ended with `OK`).
    pub sent: u64,
    pub elapsed: Duration,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

/// Writes pre-encoded `EnvelopeBatch` bodies as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = BatchSenderResponse;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = BatchSenderResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
        use prost::Message as _;
        BatchSenderResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

async fn connect(spec: &LoadSpec) -> Result<Channel, BenchError> {
    let endpoint = Endpoint::from_shared(format!("https://{}", spec.target))
        .map_err(|e| BenchError::Load(e.to_string()))?
        .tls_config(spec.tls.clone())
        .map_err(|e| BenchError::Load(e.to_string()))?
        .connect_timeout(Duration::from_secs(2));
    // The receiver may still be starting: a bounded number of attempts.
    let mut last = String::new();
    for _ in 0..100 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = format!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BenchError::Load(format!(
        "cannot connect to {}: {last}",
        spec.target
    )))
}

/// Runs the load for `spec.duration`, then ends every stream and waits for the receiver's
/// answers.
///
/// # Errors
/// When a connection cannot be made or a stream fails.
pub async fn run(spec: LoadSpec) -> Result<LoadResult, BenchError> {
    let channels = connect_all(&spec).await?;
    send(spec, channels).await
}

/// Makes the load's connections (TCP, TLS and HTTP/2 handshakes), one per stream, so that a
/// measurement can start after them.
///
/// # Errors
/// When a connection cannot be made.
pub async fn connect_all(spec: &LoadSpec) -> Result<Vec<Channel>, BenchError> {
    let mut channels = Vec::with_capacity(spec.streams);
    for _ in 0..spec.streams {
        channels.push(connect(spec).await?);
    }
    Ok(channels)
}

/// [`run`] over connections already made ([`connect_all`]).
///
/// # Errors
/// When a stream fails.
pub async fn send(spec: LoadSpec, channels: Vec<Channel>) -> Result<LoadResult, BenchError> {
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + spec.duration;
    // Batches per second per stream.
    let per_stream = spec
        .rate
        .map(|r| r as f64 / BATCH as f64 / spec.streams as f64);
    let mut tasks = Vec::new();
    for (i, channel) in channels.into_iter().enumerate() {
        let templates = templates(i, spec.streams, &spec.extra_tags);
        let sent = sent.clone();
        // Spread the streams' sends over one interval.
        let pace = per_stream.map(|b| Pace {
            start: start + Duration::from_secs_f64(i as f64 / (b * 4.0)),
            per_second: b,
        });
        tasks.push(tokio::spawn(stream(
            channel,
            pace,
            deadline,
            move |k, base| {
                sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                templates[(k as usize) % templates.len()].stamped(base)
            },
        )));
    }
    let mut failure = None;
    for t in tasks {
        match t.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => failure = Some(status.to_string()),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let elapsed = start
        .elapsed()
        .min(spec.duration)
        .max(Duration::from_millis(1));
    match failure {
        Some(f) => Err(BenchError::Load(format!("a stream failed: {f}"))),
        None => Ok(LoadResult {
            sent: sent.load(Ordering::Relaxed),
            elapsed,
        }),
    }
}

/// When a stream sends its batches: the first at `start`, then `per_second` a second.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub start: Instant,
    pub per_second: f64,
}

/// Timestamps of one batch span at most this many nanoseconds (`base` .. `base + STAMP_SPAN`):
/// the next batch's start later, so that a source's timestamps only grow.
const STAMP_SPAN: i64 = 1_000;

/// One `BatchSender` stream on `channel` until `deadline`: `next(k, base)` makes the `k`-th
/// batch's body, its envelopes stamped from `base` (ns since the epoch) on; sent at `pace`, or
/// as fast as the receiver reads. Ends the stream and waits for the receiver's answer; returns
/// the number of batches sent.
///
/// # Errors
/// When the stream fails.
pub async fn stream(
    channel: Channel,
    pace: Option<Pace>,
    deadline: Instant,
    mut next: impl FnMut(u64, i64) -> Vec<u8> + Send + 'static,
) -> Result<u64, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let mut grpc =
        tonic::client::Grpc::new(channel).max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let call = tokio::spawn(async move {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/loggregator.v2.Ingress/BatchSender",
        );
        grpc.client_streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
            .await
            .map(|_| ())
    });
    let mut k: u64 = 0;
    let mut last_base = 0i64;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Some(p) = pace {
            let due = p.start + Duration::from_secs_f64(k as f64 / p.per_second);
            if due >= deadline {
                break;
            }
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let base = now_ns().max(last_base + STAMP_SPAN);
        last_base = base;
        if tx.send(next(k, base)).await.is_err() {
            break;
        }
        k += 1;
    }
    drop(tx);
    call.await
        .map_err(|e| tonic::Status::internal(e.to_string()))
        .and_then(|r| r)?;
    Ok(k)
}
