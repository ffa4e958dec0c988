//! Small test helpers: condition waits, mTLS clients, /metrics scraping and parsing, envelopes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metron::proto::envelope::Message;
use metron::proto::ingress_client::IngressClient;
use metron::proto::{log, Counter, Envelope, EnvelopeBatch, Event, Gauge, GaugeValue, Log, Timer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pki::{CertFiles, Pki};

/// Time between two checks of a condition in `wait_until`.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// How long `ingress_client` keeps trying to connect (the agent may still be starting).
const CONNECT_FOR: Duration = Duration::from_secs(5);

/// Bounds every step of a scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs rustls' ring provider as the process default. Idempotent.
pub fn install_crypto_provider() {
    // Errs only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Checks `cond` every 5 ms until it holds or `timeout` passes; returns whether it held.
///
/// Blocks the calling thread: from async code on a single-threaded runtime that also runs the
/// thing being waited for, use `wait_until_async`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// `wait_until` for async tests: yields to the runtime between checks instead of blocking it.
pub async fn wait_until_async(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Panics unless the condition becomes true within the timeout (10 s by default). Blocks the
/// calling thread between checks, like `wait_until`.
///
/// ```ignore
/// assert_eventually!(doppler.count() == 5);
/// assert_eventually!(doppler.count() == 5, "only {} arrived", doppler.count());
/// assert_eventually!(doppler.count() == 5, Duration::from_secs(2));
/// assert_eventually!(doppler.count() == 5, Duration::from_secs(2), "got {}", doppler.count());
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (@wait $cond:expr, $timeout:expr, $($detail:tt)*) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = ::std::time::Instant::now() + timeout;
        while !($cond) {
            if ::std::time::Instant::now() >= deadline {
                panic!(
                    "condition `{}` did not hold within {:?}{}",
                    stringify!($cond),
                    timeout,
                    $($detail)*
                );
            }
            ::std::thread::sleep(::std::time::Duration::from_millis(5));
        }
    }};
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(@wait $cond, ::std::time::Duration::from_secs(10), "")
    };
    ($cond:expr, $msg:literal $(, $arg:expr)* $(,)?) => {
        $crate::assert_eventually!(
            @wait $cond, ::std::time::Duration::from_secs(10),
            format_args!(": {}", format_args!($msg $(, $arg)*))
        )
    };
    ($cond:expr, $timeout:expr $(,)?) => {
        $crate::assert_eventually!(@wait $cond, $timeout, "")
    };
    ($cond:expr, $timeout:expr, $msg:literal $(, $arg:expr)* $(,)?) => {
        $crate::assert_eventually!(
            @wait $cond, $timeout, format_args!(": {}", format_args!($msg $(, $arg)*))
        )
    };
}

/// Connects an mTLS `Ingress` client to `addr`, verifying the server as `server_name` against
/// `ca_pem` and presenting `client`. One attempt; the error says why it failed.
///
/// # Errors
/// When the TCP connection or the TLS handshake fails. A client certificate the server rejects
/// usually surfaces only at the first RPC (TLS 1.3), not here.
pub async fn connect_ingress(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    client: &CertFiles,
) -> Result<IngressClient<Channel>, tonic::transport::Error> {
    install_crypto_provider();
    let tls = ClientTlsConfig::new()
        .domain_name(server_name)
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(IngressClient::new(channel))
}

/// An emitter's client to an agent's ingress at `addr`: server name `metron`, the `pki` CA, and
/// `client` as its certificate. Retries for up to 5 s while the agent comes up.
///
/// # Panics
/// If no connection succeeds within 5 s, with the last error.
pub async fn ingress_client(
    addr: SocketAddr,
    pki: &Pki,
    client: &CertFiles,
) -> IngressClient<Channel> {
    let deadline = Instant::now() + CONNECT_FOR;
    loop {
        match connect_ingress(addr, "metron", &pki.ca_pem, client).await {
            Ok(c) => return c,
            // A bounded retry while the agent starts, not synchronisation.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("ingress client to {addr}: {e:?}"),
        }
    }
}

/// `GET /metrics` on `addr`; the body.
///
/// Blocks the calling thread (on a thread of its own, so it works from async code too, as long
/// as the metrics are not served by the runtime being blocked: use `scrape_async` there).
///
/// # Panics
/// On connection or I/O errors, timeouts (10 s), a malformed response or a status other than 200.
pub fn scrape(addr: SocketAddr) -> String {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(scrape_async(addr))
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// `scrape` for async tests, on a tokio socket.
///
/// # Panics
/// Like `scrape`.
pub async fn scrape_async(addr: SocketAddr) -> String {
    match http_get(addr, "/metrics").await {
        Ok((200, body)) => body,
        Ok((status, body)) => panic!("scrape {addr}: status {status}: {body}"),
        Err(e) => panic!("scrape {addr}: {e}"),
    }
}

/// The value of the samples named `name` that carry every pair in `labels` (other labels are
/// allowed) in Prometheus text format; the sum when several series match, `None` when none does.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sample_name, sample_labels, value)) = parse_sample(line) else {
            continue;
        };
        let matches = sample_name == name
            && labels
                .iter()
                .all(|(k, v)| sample_labels.get(*k).is_some_and(|have| have == v));
        if matches {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// Splits `name{k="v",...} value [timestamp]`; `None` for lines it cannot read.
fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        loop {
            let separator = |&(_, c): &(usize, char)| c.is_whitespace() || c == ',';
            while chars.next_if(separator).is_some() {}
            let (i, c) = chars.next()?;
            if c == '}' {
                rest = &after_brace[i + 1..];
                break;
            }
            let mut key = String::from(c);
            loop {
                let (_, c) = chars.next()?;
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some((name, labels, value))
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Nanoseconds since the Unix epoch, the Loggregator timestamp unit.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn envelope(source_id: &str, message: Message) -> Envelope {
    Envelope {
        timestamp: now_ns(),
        source_id: source_id.to_string(),
        message: Some(message),
        ..Default::default()
    }
}

/// A stdout log line.
pub fn log_envelope(source_id: &str, payload: &str) -> Envelope {
    envelope(
        source_id,
        Message::Log(Log {
            payload: payload.as_bytes().to_vec(),
            r#type: log::Type::Out as i32,
        }),
    )
}

pub fn counter_envelope(source_id: &str, name: &str, delta: u64, total: u64) -> Envelope {
    envelope(
        source_id,
        Message::Counter(Counter {
            name: name.to_string(),
            delta,
            total,
        }),
    )
}

/// A gauge with one metric; build `Gauge` by hand for several.
pub fn gauge_envelope(source_id: &str, name: &str, value: f64, unit: &str) -> Envelope {
    let metric = GaugeValue {
        unit: unit.to_string(),
        value,
    };
    envelope(
        source_id,
        Message::Gauge(Gauge {
            metrics: BTreeMap::from([(name.to_string(), metric)]),
        }),
    )
}

/// A timer from `start_ns` to `stop_ns` (nanoseconds since the epoch).
pub fn timer_envelope(source_id: &str, name: &str, start_ns: i64, stop_ns: i64) -> Envelope {
    envelope(
        source_id,
        Message::Timer(Timer {
            name: name.to_string(),
            start: start_ns,
            stop: stop_ns,
        }),
    )
}

pub fn event_envelope(source_id: &str, title: &str, body: &str) -> Envelope {
    envelope(
        source_id,
        Message::Event(Event {
            title: title.to_string(),
            body: body.to_string(),
        }),
    )
}

/// One envelope of each type: log, counter, gauge, timer, event (in that order).
pub fn all_types(source_id: &str) -> Vec<Envelope> {
    let now = now_ns();
    vec![
        log_envelope(source_id, "hello from the harness"),
        counter_envelope(source_id, "requests", 1, 1),
        gauge_envelope(source_id, "cpu", 0.5, "percentage"),
        timer_envelope(source_id, "http", now - 1_000_000, now),
        event_envelope(source_id, "deployed", "a test event"),
    ]
}

/// Sends `envs` to an agent in unary `Send` calls of 50, in order.
///
/// # Panics
/// If a call fails.
pub async fn send_all(client: &mut IngressClient<Channel>, envs: &[Envelope]) {
    for chunk in envs.chunks(50) {
        client
            .send(EnvelopeBatch {
                batch: chunk.to_vec(),
            })
            .await
            .expect("send");
    }
}

/// An HTTP/1.1 client connection on `stream` (plain or TLS), read by hyper's client; the
/// connection runs on a task of its own, so several requests may go over it (keep-alive).
///
/// # Errors
/// When the handshake fails.
pub async fn http_client<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

/// `method <path>` on `client`; (status, headers, body) of any status.
///
/// # Errors
/// On I/O errors, a malformed response, a body that is not UTF-8, or none within 10 s.
pub async fn http_request(
    client: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    method: &str,
    path: &str,
) -> Result<(u16, hyper::HeaderMap, String), String> {
    use http_body_util::BodyExt;
    let work = async {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "metron")
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        client.ready().await.map_err(|e| format!("ready: {e}"))?;
        let response = client
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let (head, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).map_err(|e| format!("body: {e}"))?;
        Ok((head.status.as_u16(), head.headers, body))
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| format!("no complete response within {SCRAPE_TIMEOUT:?}"))?
}

/// `GET <path>` on `stream` (plain or TLS); (status, body) of any status.
///
/// # Errors
/// Like [`http_request`], plus handshake errors.
pub async fn http_get_on<S>(stream: S, path: &str) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut client = http_client(stream).await?;
    let (status, _, body) = http_request(&mut client, "GET", path).await?;
    Ok((status, body))
}

/// `GET <path>` over plain HTTP.
///
/// # Errors
/// Like [`http_get_on`], plus connection errors.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    http_get_on(stream, path).await
}

/// `GET <path>` over TLS, verifying the server as `metron` against `ca_pem` and presenting
/// `client` if given.
///
/// # Errors
/// Like [`http_get`], plus handshake errors (a refused client certificate may surface only at
/// the first read, as a TLS alert).
pub async fn https_get(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&CertFiles>,
    path: &str,
) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        CertificateDer::pem_slice_iter(ca_pem.as_bytes()).filter_map(Result::ok),
    );
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                    .filter_map(Result::ok)
                    .collect(),
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("metron").expect("a valid name");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    http_get_on(tls, path).await
}
