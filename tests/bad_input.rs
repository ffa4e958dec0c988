//! Bad input at the ingress edge: emitters without an acceptable client certificate are refused
//! before any envelope is counted, and a malformed or oversize message ends only the call that
//! carried it; the agent keeps delivering everything else, exactly.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::agent::{assert_balanced, wait_drained, World};
use common::*;
use metron::config::MAX_GRPC_MESSAGE_BYTES;
use metron::proto::ingress_client::IngressClient;
use metron::proto::{BatchSenderResponse, EnvelopeBatch};
use metron::telemetry::DropReason;
use metron::Agent;
use prost::bytes::BufMut;
use prost::Message as _;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_prost::ProstDecoder;

/// Bounds every network step, so a bug fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(15);

/// Envelopes of the follow-up delivery that proves the agent still works.
const FOLLOW_UP: usize = 25;

fn batch(source_id: &str, n: usize) -> EnvelopeBatch {
    EnvelopeBatch {
        batch: (0..n)
            .map(|i| log_envelope(source_id, &format!("line {i}")))
            .collect(),
    }
}

/// Client TLS for the agent's ingress: the test CA and server name `metron`, presenting
/// `identity` (or no certificate at all).
fn client_tls(w: &World, identity: Option<&CertFiles>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .domain_name("metron")
        .ca_certificate(Certificate::from_pem(&w.pki.ca_pem));
    match identity {
        Some(c) => tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem)),
        None => tls,
    }
}

async fn channel(addr: SocketAddr, tls: ClientTlsConfig) -> Result<Channel, String> {
    install_crypto_provider();
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| format!("endpoint: {e:?}"))?
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e:?}"))?
        .connect_timeout(STEP)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

/// Connects with `tls` and makes one `Send` of `envelopes`. Any failure, at connect or at the RPC
/// (where TLS 1.3 surfaces a refused client certificate), comes back as a string.
async fn try_send(
    addr: SocketAddr,
    tls: ClientTlsConfig,
    envelopes: EnvelopeBatch,
) -> Result<(), String> {
    let work = async {
        let mut client = IngressClient::new(channel(addr, tls).await?);
        client
            .send(envelopes)
            .await
            .map(drop)
            .map_err(|s| format!("rpc: {s:?}"))
    };
    tokio::time::timeout(STEP, work)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

/// A well-behaved emitter's `Send` of `FOLLOW_UP` envelopes, which must succeed.
async fn send_follow_up(w: &World, agent: &Agent) {
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    tokio::time::timeout(STEP, client.send(batch("after", FOLLOW_UP)))
        .await
        .expect("follow-up Send within the step bound")
        .expect("follow-up Send succeeds");
}

/// Waits until the agent holds nothing, then checks the Doppler got exactly `delivered` envelopes
/// and the agent's ledger agrees.
fn assert_delivered_exactly(agent: &Agent, doppler: &FakeDoppler, delivered: usize) {
    assert!(
        doppler.wait_for_count(delivered, STEP),
        "delivered {} of {delivered}",
        doppler.count()
    );
    assert!(
        wait_drained(agent, STEP),
        "still buffered: {:?}",
        agent.buffered()
    );
    assert_eq!(doppler.count(), delivered, "nothing more, nothing less");
    let m = agent.metrics();
    assert_eq!(m.ingress, delivered as u64, "{m:?}");
    assert_eq!(m.egress, delivered as u64, "{m:?}");
    assert_eq!(m.dropped_total(), 0, "{m:?}");
    assert_balanced(agent);
}

/// Refusal is decided by the certificate alone: the same connection code with the emitter's
/// certificate must get through, so a refusal cannot come from a wrong address or server name.
async fn refused_then_control(bad: Option<CertFiles>) {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");

    let refused = try_send(
        agent.ingress_addr(),
        client_tls(&w, bad.as_ref()),
        batch("intruder", 5),
    )
    .await;
    // Only failure is asserted: whether the client reads the server's alert
    // (`CertificateRequired`, `UnknownCA`) or just a closed connection depends on timing.
    assert!(
        refused.is_err(),
        "the agent accepted a bad client: {refused:?}"
    );
    assert_eq!(
        agent.metrics().ingress,
        0,
        "nothing counted from a refused client"
    );

    try_send(
        agent.ingress_addr(),
        client_tls(&w, Some(&w.client_cert)),
        batch("emitter", FOLLOW_UP),
    )
    .await
    .expect("the same call with the emitter's certificate succeeds");
    assert_delivered_exactly(&agent, &doppler, FOLLOW_UP);
    assert!(
        doppler.received().iter().all(|e| e.source_id == "emitter"),
        "nothing from the refused client reached the Doppler"
    );
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    refused_then_control(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused() {
    // Same names as the real emitter; only the issuing CA differs. The PEMs are in memory, so
    // the other CA's directory can go at once.
    let other = Pki::new();
    let cert = other.issue("emitter", &["emitter"]);
    drop(other);
    refused_then_control(Some(cert)).await;
}

// ---------------------------------------------------------------------------------------------
// Raw frames on `BatchSender`: a codec whose encoder writes the given bytes as the message.

/// Writes each item verbatim as one gRPC message; decodes the real response type.
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = BatchSenderResponse;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<BatchSenderResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<BatchSenderResponse> {
        ProstDecoder::default()
    }
}

/// A ready gRPC client with the emitter's certificate, for calls with raw bodies.
async fn raw_client(w: &World, addr: SocketAddr) -> Result<tonic::client::Grpc<Channel>, Status> {
    let channel = channel(addr, client_tls(w, Some(&w.client_cert)))
        .await
        .unwrap_or_else(|e| panic!("raw client: {e}"));
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e:?}")))?;
    Ok(grpc)
}

/// One `BatchSender` stream carrying `frames` as they are, with the emitter's certificate.
async fn raw_batch_sender(w: &World, addr: SocketAddr, frames: Vec<Vec<u8>>) -> Result<(), Status> {
    let work = async {
        raw_client(w, addr)
            .await?
            .client_streaming::<_, Vec<u8>, BatchSenderResponse, _>(
                Request::new(tokio_stream::iter(frames)),
                PathAndQuery::from_static("/loggregator.v2.Ingress/BatchSender"),
                RawCodec,
            )
            .await
            .map(drop)
    };
    tokio::time::timeout(STEP, work)
        .await
        .expect("raw BatchSender within the step bound")
}

/// A unary `Send` of `body` as it is; the answer decoded as an (empty) response.
async fn raw_send(w: &World, addr: SocketAddr, body: Vec<u8>) -> Result<(), Status> {
    let work = async {
        raw_client(w, addr)
            .await?
            .unary::<Vec<u8>, BatchSenderResponse, _>(
                Request::new(body),
                PathAndQuery::from_static("/loggregator.v2.Ingress/Send"),
                RawCodec,
            )
            .await
            .map(drop)
    };
    tokio::time::timeout(STEP, work)
        .await
        .expect("raw Send within the step bound")
}

/// A `Send` the handler refuses (it reads the batch and finds it malformed) is counted once,
/// like one tonic refuses before the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_send_is_counted_once() {
    let w = World::new();
    let agent = w.start(&[(common::agent::unserved_addr(), "z1")], "");
    let status = raw_send(&w, agent.ingress_addr(), vec![0x08, 0x01])
        .await
        .expect_err("a malformed batch fails the call");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(ingress_stream_errors(&agent), Some(1.0));
    assert_eq!(agent.metrics().ingress, 0);
}

fn ingress_stream_errors(agent: &Agent) -> Option<f64> {
    metric_value(
        &scrape(agent.metrics_addr().unwrap()),
        "ingress_stream_errors",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_ends_that_stream_only() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    assert_eq!(ingress_stream_errors(&agent), Some(0.0));

    // A good batch, then field 1 (`batch`, a length-delimited message) sent as a varint.
    let good = batch("before", 3).encode_to_vec();
    let malformed = vec![0x08, 0x01];
    assert!(
        EnvelopeBatch::decode(malformed.as_slice()).is_err(),
        "the frame really is malformed"
    );
    let status = raw_batch_sender(&w, agent.ingress_addr(), vec![good, malformed])
        .await
        .expect_err("a malformed frame fails the call");
    // tonic maps a protobuf decode failure to INTERNAL.
    assert_eq!(status.code(), Code::Internal, "{status:?}");

    send_follow_up(&w, &agent).await;
    // What the stream sent before the bad frame is kept.
    assert_delivered_exactly(&agent, &doppler, 3 + FOLLOW_UP);
    let received = doppler.received();
    assert_eq!(
        received.iter().filter(|e| e.source_id == "before").count(),
        3
    );
    assert_eq!(
        received.iter().filter(|e| e.source_id == "after").count(),
        FOLLOW_UP
    );
    assert_eq!(ingress_stream_errors(&agent), Some(1.0));
    assert!(agent.shutdown().flushed);
}

/// One log envelope whose encoded batch is above the 10 MiB limit.
fn oversize_batch() -> EnvelopeBatch {
    let payload = "x".repeat(MAX_GRPC_MESSAGE_BYTES + 1);
    let b = EnvelopeBatch {
        batch: vec![log_envelope("huge", &payload)],
    };
    assert!(b.encoded_len() > MAX_GRPC_MESSAGE_BYTES);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_on_a_stream_is_refused_and_the_agent_keeps_working() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;

    let stream = vec![batch("before", 3), oversize_batch()];
    let status = tokio::time::timeout(STEP, client.batch_sender(tokio_stream::iter(stream)))
        .await
        .expect("BatchSender within the step bound")
        .expect_err("an oversize message fails the call");
    // tonic's receive limit answers OUT_OF_RANGE, naming the limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status
            .message()
            .contains(&MAX_GRPC_MESSAGE_BYTES.to_string()),
        "{status:?}"
    );

    send_follow_up(&w, &agent).await;
    assert_delivered_exactly(&agent, &doppler, 3 + FOLLOW_UP);
    assert!(doppler.received().iter().all(|e| e.source_id != "huge"));
    assert_eq!(ingress_stream_errors(&agent), Some(1.0));
    assert!(agent.shutdown().flushed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_unary_send_is_refused_and_the_agent_keeps_working() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;

    let status = tokio::time::timeout(STEP, client.send(oversize_batch()))
        .await
        .expect("Send within the step bound")
        .expect_err("an oversize message fails the call");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // tonic refused it before the handler: counted all the same.
    assert_eq!(ingress_stream_errors(&agent), Some(1.0));

    // The refused message was never decoded, so it is not in `ingress` either.
    send_follow_up(&w, &agent).await;
    assert_delivered_exactly(&agent, &doppler, FOLLOW_UP);
    assert!(doppler.received().iter().all(|e| e.source_id == "after"));
    assert!(agent.shutdown().flushed);
}

/// A batch with valid framing whose one envelope is not a valid envelope: `len` bytes of 0xff.
fn undecodable_envelope_frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0x0a];
    prost::encoding::encode_varint(len as u64, &mut frame);
    frame.extend(std::iter::repeat_n(0xff, len));
    assert!(EnvelopeBatch::decode(frame.as_slice()).is_err());
    frame
}

fn dropped_by_reason(agent: &Agent, reason: &str) -> f64 {
    metric_value(
        &scrape(agent.metrics_addr().unwrap()),
        "dropped_by_reason",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Shedding costs no decoding: with room in the budget an undecodable envelope ends its stream
/// (it was decoded), but once the budget is full the same frame is counted from its framing and
/// dropped without being looked into, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_batch_is_counted_from_its_framing_and_never_decoded() {
    let w = World::new();
    let agent = w.start(
        &[(common::agent::unserved_addr(), "z1")],
        "pipeline: { max_buffered_bytes: 10485760 }\n",
    );
    let frame = undecodable_envelope_frame(2_000);

    let status = raw_batch_sender(&w, agent.ingress_addr(), vec![frame.clone()])
        .await
        .expect_err("with room, the batch is decoded and fails");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(
        agent.metrics().ingress,
        0,
        "a batch that does not decode is not counted"
    );
    assert_eq!(ingress_stream_errors(&agent), Some(1.0));

    // Fill the budget (no Doppler takes anything) from many sources, so every slot takes its
    // part: 64 KiB envelopes, then small ones until one is refused at the edge, so what is left
    // is less than any batch's reservation.
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let filler = "x".repeat(64 * 1024);
    for i in 0..170 {
        let big = log_envelope(&format!("filler-{i}"), &filler);
        client
            .send(EnvelopeBatch { batch: vec![big] })
            .await
            .expect("Send never fails for a full pipeline");
    }
    let refused = |a: &Agent| a.metrics().dropped_by(DropReason::NoDoppler);
    let refused_big = refused(&agent);
    for i in 0..100_000 {
        if refused(&agent) > refused_big {
            break;
        }
        let small = log_envelope(&format!("filler-{i}"), "small");
        client
            .send(EnvelopeBatch { batch: vec![small] })
            .await
            .expect("Send never fails for a full pipeline");
    }
    let before = agent.metrics();
    assert!(
        refused(&agent) > refused_big,
        "the budget filled up: {before:?}"
    );
    let shed_before = dropped_by_reason(&agent, "no_doppler");

    raw_batch_sender(
        &w,
        agent.ingress_addr(),
        vec![frame.clone(), frame.clone(), frame],
    )
    .await
    .expect("shed batches are not decoded, so nothing fails");
    let after = agent.metrics();
    assert_eq!(
        after.ingress,
        before.ingress + 3,
        "counted from the framing"
    );
    assert_eq!(dropped_by_reason(&agent, "no_doppler"), shed_before + 3.0);
    assert_eq!(
        ingress_stream_errors(&agent),
        Some(1.0),
        "no new stream error"
    );
    assert_eq!(
        after.ingress,
        after.egress + after.dropped_total() + agent.buffered().0,
        "{after:?}"
    );
    drop(client);
    let report = agent.shutdown();
    let m = report.metrics;
    assert_eq!(m.ingress, m.egress + m.dropped_total(), "{m:?}");
}
