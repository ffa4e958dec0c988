//! Small test helpers: condition waits, mTLS clients, /metrics scraping and parsing, envelopes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// `GET /metrics` over plain HTTP/1.1 with a std socket; returns the body.
///
/// Blocks the calling thread: do not call it from a single-threaded runtime that also serves the
/// metrics (use `scrape_async` there).
///
/// # Panics
/// On connection or I/O errors, timeouts (10 s), a malformed response or a status other than 200.
pub fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)
        .unwrap_or_else(|e| panic!("scrape {addr}: connect: {e}"));
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok();
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT)).ok();
    stream
        .write_all(metrics_request(addr).as_bytes())
        .unwrap_or_else(|e| panic!("scrape {addr}: write: {e}"));
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("scrape {addr}: read: {e}"));
        raw.extend_from_slice(&chunk[..n]);
        if let Some(body) = finish_response(addr, &raw, n == 0) {
            return body;
        }
    }
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

fn metrics_request(addr: SocketAddr) -> String {
    format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
}

/// `Some(body)` once `raw` holds a complete 200 response; panics on anything else that is
/// complete (or cut short at `eof`).
fn finish_response(addr: SocketAddr, raw: &[u8], eof: bool) -> Option<String> {
    match parse_http_response(raw, eof) {
        Ok(Some((200, body))) => Some(body),
        Ok(Some((status, body))) => panic!("scrape {addr}: status {status}: {body}"),
        Ok(None) if eof => panic!("scrape {addr}: connection closed mid-response"),
        Ok(None) => None,
        Err(e) => panic!("scrape {addr}: {e}"),
    }
}

/// Parses an HTTP/1.1 response: `Ok(None)` while incomplete. Handles `Content-Length`,
/// `Transfer-Encoding: chunked`, and bodies delimited by the connection closing.
fn parse_http_response(raw: &[u8], eof: bool) -> Result<Option<(u16, String)>, String> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|e| format!("head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|e| format!("content-length {value:?}: {e}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        match dechunk(rest)? {
            Some(body) => body,
            None => return Ok(None),
        }
    } else if let Some(len) = content_length {
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    let body = String::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    Ok(Some((status, body)))
}

/// Decodes a chunked body; `Ok(None)` while incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|e| format!("chunk: {e}"))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|e| format!("chunk size {size_hex:?}: {e}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers are ignored; the body is complete once the size-0 chunk is here.
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
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

/// `GET <path>` over HTTP/1.1 on `stream` (plain or TLS); returns (status, body) of any status.
///
/// # Errors
/// On I/O errors, a malformed response or none within 10 s.
pub async fn http_get_on<S>(
    mut stream: S,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            raw.extend_from_slice(&chunk[..n]);
            if let Some(answer) = parse_http_response(&raw, n == 0)? {
                return Ok(answer);
            }
            if n == 0 {
                return Err("connection closed mid-response".to_string());
            }
        }
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| format!("no complete response within {SCRAPE_TIMEOUT:?}"))?
}

/// `GET <path>` over plain HTTP.
///
/// # Errors
/// Like [`http_get_on`], plus connection errors.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    http_get_on(stream, addr, path).await
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
    http_get_on(tls, addr, path).await
}
