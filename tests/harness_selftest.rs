//! Tests the shared harness itself: the PKI, the fake Doppler (mTLS, kill, restart, stall),
//! the condition waits, the scrape wrapper and Prometheus parsing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    all_types, connect_ingress, log_envelope, metric_value, scrape, scrape_async, wait_until,
    CertFiles, Counts, FakeDoppler, Pki,
};
use metron::proto::envelope::Message;
use metron::proto::ingress_client::IngressClient;
use metron::proto::{Envelope, EnvelopeBatch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Bounds every network step of these tests so a bug fails them instead of hanging them.
const STEP: Duration = Duration::from_secs(10);

fn batch(envelopes: Vec<Envelope>) -> EnvelopeBatch {
    EnvelopeBatch { batch: envelopes }
}

async fn doppler_client(
    doppler: &FakeDoppler,
    pki: &Pki,
    client: &CertFiles,
) -> Result<IngressClient<Channel>, tonic::transport::Error> {
    connect_ingress(doppler.addr(), "doppler", &pki.ca_pem, client).await
}

/// Connects (trusting `pki`'s CA) and sends `batches` on one `BatchSender` stream; any failure
/// comes back as a string.
async fn send_batches(
    addr: SocketAddr,
    pki: &Pki,
    client: &CertFiles,
    batches: Vec<EnvelopeBatch>,
) -> Result<(), String> {
    let work = async {
        let mut c = connect_ingress(addr, "doppler", &pki.ca_pem, client)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        // The fake answers the end of a stream as an upstream Doppler does: `Unknown: EOF`.
        match c.batch_sender(tokio_stream::iter(batches)).await {
            Ok(_) => Err("an upstream Doppler never answers OK".to_string()),
            Err(s) if s.code() == tonic::Code::Unknown && s.message() == "EOF" => Ok(()),
            Err(s) => Err(format!("rpc: {s:?}")),
        }
    };
    tokio::time::timeout(STEP, work)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arrive_over_mtls_in_order() {
    let pki = Pki::new();
    let doppler = FakeDoppler::start(&pki);
    let emitter = pki.issue("emitter", &["emitter"]);

    let batches = vec![
        batch(all_types("app-1")),
        batch(
            (0..10)
                .map(|i| log_envelope("app-2", &format!("line {i}")))
                .collect(),
        ),
        batch(all_types("app-3")),
    ];
    let expected: Vec<Envelope> = batches.iter().flat_map(|b| b.batch.clone()).collect();
    assert_eq!(expected.len(), 20);

    send_batches(doppler.addr(), &pki, &emitter, batches)
        .await
        .expect("send");

    assert!(doppler.wait_for_count(expected.len(), STEP));
    assert_eq!(doppler.received(), expected);
    assert_eq!(doppler.count(), 20);
    assert_eq!(doppler.batches(), 3);
    assert_eq!(doppler.streams_opened(), 1);
}

/// The subscriber model drops what overflows its buffer: 1,500 envelopes in one message into a
/// 1,000-envelope buffer read at one envelope a second drop 500; a restart empties it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_model_drops_what_overflows_its_buffer() {
    let pki = Pki::new();
    let mut doppler = FakeDoppler::start(&pki);
    doppler.model_subscriber(1_000, 1.0);
    let emitter = pki.issue("emitter", &["emitter"]);
    let lines = |n: usize| batch((0..n).map(|i| log_envelope("a", &i.to_string())).collect());
    send_batches(doppler.addr(), &pki, &emitter, vec![lines(900)])
        .await
        .expect("send");
    assert!(doppler.wait_for_count(900, STEP));
    assert_eq!(doppler.subscriber_drops(), 0, "900 fit");
    send_batches(doppler.addr(), &pki, &emitter, vec![lines(600)])
        .await
        .expect("send");
    assert!(doppler.wait_for_count(1_500, STEP));
    let dropped = doppler.subscriber_drops();
    // Read at 1/s meanwhile: a few may have left the buffer between the two sends.
    assert!((490..=500).contains(&dropped), "{dropped}");
    doppler.restart();
    send_batches(doppler.addr(), &pki, &emitter, vec![lines(1_000)])
        .await
        .expect("send");
    assert!(doppler.wait_for_count(2_500, STEP));
    assert_eq!(
        doppler.subscriber_drops(),
        dropped,
        "restarted empty: 1,000 fit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_and_send_are_recorded_too() {
    let pki = Pki::new();
    let doppler = FakeDoppler::start(&pki);
    let emitter = pki.issue("emitter", &["emitter"]);
    let mut client = doppler_client(&doppler, &pki, &emitter)
        .await
        .expect("connect");

    client
        .sender(tokio_stream::iter(all_types("single")))
        .await
        .expect("Sender");
    client.send(batch(all_types("unary"))).await.expect("Send");

    assert!(doppler.wait_for_count(10, STEP));
    assert_eq!(doppler.batches(), 1, "only Send carries a batch");
    assert_eq!(
        doppler.streams_opened(),
        0,
        "only BatchSender streams count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_another_pki_is_refused() {
    let pki = Pki::new();
    let doppler = FakeDoppler::start(&pki);
    let stranger_pki = Pki::new();
    let stranger = stranger_pki.issue("stranger", &["stranger"]);

    // With TLS 1.3 the server's rejection of the client certificate shows up at the first RPC.
    let result = send_batches(doppler.addr(), &pki, &stranger, vec![batch(all_types("x"))]).await;
    assert!(result.is_err(), "a foreign client certificate was accepted");

    // A client that does not trust the Doppler's CA fails the handshake itself.
    let emitter = pki.issue("emitter", &["emitter"]);
    let distrustful = connect_ingress(doppler.addr(), "doppler", &stranger_pki.ca_pem, &emitter);
    let distrustful = tokio::time::timeout(STEP, distrustful)
        .await
        .expect("bounded");
    assert!(
        distrustful.is_err(),
        "a server outside the client's CA was trusted"
    );

    assert_eq!(doppler.count(), 0);
    assert_eq!(doppler.streams_opened(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_refuses_and_restart_accumulates() {
    let pki = Pki::new();
    let mut doppler = FakeDoppler::start(&pki);
    let addr = doppler.addr();
    let emitter = pki.issue("emitter", &["emitter"]);

    send_batches(addr, &pki, &emitter, vec![batch(all_types("before"))])
        .await
        .expect("send before kill");
    assert!(doppler.wait_for_count(5, STEP));

    doppler.kill();
    doppler.kill(); // idempotent
    assert!(!doppler.is_running());
    let refused = send_batches(addr, &pki, &emitter, vec![batch(all_types("dead"))]).await;
    assert!(refused.is_err(), "a killed Doppler accepted a send");
    assert_eq!(doppler.count(), 5, "recorded data survives a kill");

    doppler.restart();
    assert_eq!(doppler.addr(), addr, "restart keeps the address");
    send_batches(addr, &pki, &emitter, vec![batch(all_types("after"))])
        .await
        .expect("send after restart");
    assert!(doppler.wait_for_count(10, STEP));
    assert_eq!(
        doppler.counts(),
        Counts {
            envelopes: 10,
            batches: 2,
            streams_opened: 2,
            connections: 2
        }
    );
    let sources: Vec<String> = doppler
        .received()
        .into_iter()
        .map(|e| e.source_id)
        .collect();
    assert_eq!(sources, [["before"; 5], ["after"; 5]].concat());
}

/// On a single-threaded runtime, like an actix `System`: the client shares the test's thread, so
/// the waits must be the async ones, and `kill` must work from async code.
#[tokio::test]
async fn kill_breaks_an_open_stream() {
    let pki = Pki::new();
    let mut doppler = FakeDoppler::start(&pki);
    let emitter = pki.issue("emitter", &["emitter"]);
    let mut client = doppler_client(&doppler, &pki, &emitter)
        .await
        .expect("connect");

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let call = tokio::spawn(async move { client.batch_sender(ReceiverStream::new(rx)).await });
    assert!(doppler.wait_for_streams_async(1, STEP).await);
    tx.send(batch(all_types("open"))).await.expect("queue");
    assert!(doppler.wait_for_count_async(5, STEP).await);

    doppler.kill();
    // The stream is still open from the client's side (tx alive): only the kill can end it.
    let outcome = tokio::time::timeout(STEP, call)
        .await
        .expect("the call ends once the Doppler dies")
        .expect("join");
    assert!(outcome.is_err(), "a stream to a killed Doppler succeeded");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_backs_up_flow_control_until_released() {
    const BATCHES: usize = 16;
    const PER_BATCH: usize = 16;
    // 16 x 64 KiB: each batch is about 1 MiB on the wire.
    let payload = "x".repeat(64 * 1024);

    let pki = Pki::new();
    let doppler = FakeDoppler::start(&pki);
    let emitter = pki.issue("emitter", &["emitter"]);
    let mut client = doppler_client(&doppler, &pki, &emitter)
        .await
        .expect("connect");

    doppler.set_stalled(true);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let call = tokio::spawn(async move { client.batch_sender(ReceiverStream::new(rx)).await });
    let queued = Arc::new(AtomicUsize::new(0));
    let producer = {
        let queued = queued.clone();
        tokio::spawn(async move {
            for i in 0..BATCHES {
                let envelopes = (0..PER_BATCH)
                    .map(|j| log_envelope(&format!("stall-{i}-{j}"), &payload))
                    .collect();
                if tx.send(batch(envelopes)).await.is_err() {
                    return;
                }
                queued.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    assert!(doppler.wait_for_streams(1, STEP));
    // Proving that something does not happen needs a window: the producer gets half a second to
    // push all 16 MiB through, which it does in far less once the Doppler reads.
    let all_queued = wait_until(Duration::from_millis(500), || {
        queued.load(Ordering::SeqCst) == BATCHES
    });
    let queued_while_stalled = queued.load(Ordering::SeqCst);
    assert!(!all_queued, "flow control did not hold the sender back");
    // Windows (~1 MiB per stream and connection), h2's one buffered chunk, tonic's encoder and
    // the channel slot hold a handful of 1 MiB batches at most.
    assert!(
        queued_while_stalled <= 8,
        "{queued_while_stalled} batches got past a stalled Doppler"
    );
    assert_eq!(doppler.count(), 0, "a stalled Doppler kept recording");
    assert_eq!(doppler.batches(), 0);

    doppler.set_stalled(false);
    assert!(
        doppler.wait_for_count(BATCHES * PER_BATCH, STEP),
        "only {} of {} arrived after the stall",
        doppler.count(),
        BATCHES * PER_BATCH
    );
    producer.await.expect("producer");
    let end = tokio::time::timeout(STEP, call)
        .await
        .expect("stream completes")
        .expect("join")
        .expect_err("answered the upstream way");
    assert_eq!((end.code(), end.message()), (tonic::Code::Unknown, "EOF"));
    assert_eq!(doppler.batches(), BATCHES);
    assert_eq!(doppler.count(), BATCHES * PER_BATCH);
    eprintln!("batches queued while stalled: {queued_while_stalled}");
}

#[test]
fn pki_writes_files_and_cleans_up() {
    let pki = Pki::new();
    let dir = pki.dir.clone();
    assert!(dir.starts_with(std::env::temp_dir().join("metron-tests")));
    assert_eq!(std::fs::read_to_string(&pki.ca_path).unwrap(), pki.ca_pem);
    let leaf: CertFiles = pki.issue("metron", &["metron", "127.0.0.1"]);
    assert_eq!(leaf.cert_path, dir.join("metron.pem"));
    assert_eq!(leaf.key_path, dir.join("metron-key.pem"));
    assert_eq!(
        std::fs::read_to_string(&leaf.cert_path).unwrap(),
        leaf.cert_pem
    );
    assert_eq!(
        std::fs::read_to_string(&leaf.key_path).unwrap(),
        leaf.key_pem
    );
    assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(leaf.key_pem.contains("PRIVATE KEY"));
    assert_ne!(Pki::new().dir, dir, "every Pki gets its own directory");
    drop(pki);
    assert!(!dir.exists(), "Drop removes the directory");
}

#[test]
fn all_types_has_one_of_each() {
    let envelopes = all_types("src");
    let kinds: Vec<&str> = envelopes
        .iter()
        .map(|e| match e.message.as_ref().expect("message") {
            Message::Log(_) => "log",
            Message::Counter(_) => "counter",
            Message::Gauge(_) => "gauge",
            Message::Timer(_) => "timer",
            Message::Event(_) => "event",
        })
        .collect();
    assert_eq!(kinds, ["log", "counter", "gauge", "timer", "event"]);
    assert!(envelopes
        .iter()
        .all(|e| e.source_id == "src" && e.timestamp > 0));
}

#[test]
fn assert_eventually_forms() {
    let start = std::time::Instant::now();
    assert_eventually!(start.elapsed() >= Duration::from_millis(20));
    assert_eventually!(true, "with a message {}", 1);
    assert_eventually!(true, Duration::from_millis(50));
    assert_eventually!(true, Duration::from_millis(50), "with {} and {}", "a", "b");
    assert!(wait_until(Duration::from_millis(10), || true));
    assert!(!wait_until(Duration::from_millis(10), || false));

    let failed = std::panic::catch_unwind(|| {
        assert_eventually!(1 + 1 == 3, Duration::from_millis(20), "math is {}", "hard");
    });
    let message = failed.expect_err("must panic");
    let message = message
        .downcast_ref::<String>()
        .expect("formatted panic message");
    assert!(message.contains("1 + 1 == 3"), "{message}");
    assert!(message.contains("math is hard"), "{message}");
}

#[test]
fn metric_value_reads_prometheus_text() {
    let text = r#"# HELP dropped Envelopes dropped.
# TYPE dropped counter
dropped{direction="ingress"} 3
dropped{direction="egress",reason="full"} 2
dropped{ direction = "ingress" , reason="other", } 4
dropped_total{direction="ingress"} 100
ingress{} 10
egress 7 1700000000000
odd{label="a \"quoted\", {brace} and \\ slash\nline",x="y"} 1.5e0
unbounded +Inf
"#;
    assert_eq!(
        metric_value(text, "dropped", &[("direction", "ingress")]),
        Some(7.0),
        "two series match: their sum"
    );
    assert_eq!(
        metric_value(text, "dropped", &[("direction", "egress")]),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            text,
            "dropped",
            &[("direction", "ingress"), ("reason", "other")]
        ),
        Some(4.0)
    );
    assert_eq!(metric_value(text, "dropped", &[]), Some(9.0));
    assert_eq!(
        metric_value(text, "dropped_total", &[]),
        Some(100.0),
        "names match exactly"
    );
    assert_eq!(metric_value(text, "ingress", &[]), Some(10.0));
    assert_eq!(metric_value(text, "egress", &[]), Some(7.0));
    assert_eq!(
        metric_value(
            text,
            "odd",
            &[("label", "a \"quoted\", {brace} and \\ slash\nline")]
        ),
        Some(1.5)
    );
    assert_eq!(metric_value(text, "odd", &[("x", "y")]), Some(1.5));
    assert_eq!(metric_value(text, "unbounded", &[]), Some(f64::INFINITY));
    assert_eq!(
        metric_value(text, "dropped", &[("direction", "sideways")]),
        None
    );
    assert_eq!(metric_value(text, "egress", &[("direction", "x")]), None);
    assert_eq!(metric_value(text, "missing", &[]), None);
    assert_eq!(
        metric_value(text, "HELP", &[]),
        None,
        "comments are skipped"
    );
}

/// Serves exactly one HTTP request on a thread with a canned response; returns its address.
fn one_shot_http(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            request.extend_from_slice(&buf[..n]);
        }
        assert!(request.starts_with(b"GET /metrics HTTP/1.1\r\n"));
        // Written in two pieces so the client has to reassemble.
        let (head, tail) = response.split_at(response.len() / 2);
        stream.write_all(head).unwrap();
        stream.flush().unwrap();
        stream.write_all(tail).unwrap();
        // Keep-alive servers do not close: the client must stop at the end of the body. Wait for
        // the client to close first.
        let _ = stream.read(&mut buf);
    });
    addr
}

#[test]
#[should_panic(expected = "status 500")]
fn scrape_panics_on_error_status() {
    let addr = one_shot_http(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom");
    scrape(addr);
}

#[tokio::test]
async fn scrape_async_reads_a_body() {
    let addr = one_shot_http(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ningress 3\n");
    assert_eq!(scrape_async(addr).await, "ingress 3\n");
}
