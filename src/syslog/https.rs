//! One `https://` or `https-batch://` drain connection: syslog messages POSTed as upstream's
//! syslog-agent posts them (`Content-Type: text/plain`, 2xx is success, basic auth from the
//! URL's userinfo), over one HTTP/1.1 keep-alive connection with TLS, dialled on demand and
//! replaced after any failure. `https://` sends one message per request; `https-batch://`
//! sends newline-terminated messages together, at most [`BATCH_BYTES`] per request (the caller
//! gathers them for at most [`BATCH_WAIT`]).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prost::bytes::Bytes;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::writer::{connect, WriteError};

/// An `https-batch://` request carries at most this much (upstream's flush size).
pub const BATCH_BYTES: usize = 512 << 10;
/// ... and waits at most this long for more messages (upstream's flush interval).
pub const BATCH_WAIT: Duration = Duration::from_secs(1);

/// Where and how an HTTPS drain posts.
#[derive(Clone)]
pub struct HttpsTarget {
    pub host: String,
    pub port: u16,
    /// Path and query, as the URL gives them.
    pub target: String,
    /// `user:password` from the URL, sent as basic auth.
    pub basic_auth: Option<(String, String)>,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// Addresses never dialled (`syslog.blocked_ranges`).
    pub blocked: Arc<super::bindings::BlockedRanges>,
}

/// One HTTPS drain connection, dialled on demand.
pub struct HttpsWriter {
    to: HttpsTarget,
    /// The `Authorization` header, when the URL has userinfo.
    authorization: Option<String>,
    dial_timeout: Duration,
    /// For each request, its answer included.
    write_timeout: Duration,
    send_buffer: usize,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// When the connection last answered: one idle for `idle_reconnect` is replaced before the
    /// next request (servers close idle keep-alive connections, often after about a minute).
    last: tokio::time::Instant,
    idle_reconnect: Duration,
}

impl HttpsWriter {
    pub fn new(
        to: HttpsTarget,
        dial_timeout: Duration,
        write_timeout: Duration,
        idle_reconnect: Duration,
        send_buffer: usize,
    ) -> Self {
        let authorization = to.basic_auth.as_ref().map(|(user, password)| {
            format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
        });
        let mut to = to;
        // ALPN: HTTP/1.1 only (a server offering h2 would otherwise be asked for it).
        let mut tls = (*to.tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        to.tls = Arc::new(tls);
        Self {
            to,
            authorization,
            dial_timeout,
            write_timeout,
            send_buffer,
            conn: None,
            last: tokio::time::Instant::now(),
            idle_reconnect,
        }
    }

    /// Dials if there is no usable connection.
    ///
    /// # Errors
    /// When the dial fails.
    pub async fn connect(&mut self) -> Result<(), WriteError> {
        if self.last.elapsed() >= self.idle_reconnect {
            self.conn = None;
        }
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.dial().await?);
            self.last = tokio::time::Instant::now();
        }
        Ok(())
    }

    /// POSTs `body`.
    ///
    /// # Errors
    /// When the connection fails, times out, or the drain answers other than 2xx; the
    /// connection is replaced on the next request.
    pub async fn post(&mut self, body: Bytes) -> Result<(), WriteError> {
        self.connect().await?;
        let conn = self.conn.as_mut().expect("dialled above");
        let host = if self.to.host.contains(':') {
            format!("[{}]", self.to.host)
        } else {
            self.to.host.clone()
        };
        // The default port is left out, as browsers and Go's client write it.
        let host = if self.to.port == 443 {
            host
        } else {
            format!("{host}:{}", self.to.port)
        };
        let mut request = hyper::Request::post(self.to.target.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "text/plain");
        if let Some(a) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, a.as_str());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| WriteError::Write(std::io::Error::other(e)))?;
        let answered = timeout(self.write_timeout, async {
            conn.ready().await?;
            conn.send_request(request).await
        })
        .await;
        let response = match answered {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(WriteError::Write(std::io::Error::other(e)));
            }
            Err(_) => {
                self.conn = None;
                return Err(WriteError::Timeout("waiting for the drain's answer"));
            }
        };
        let status = response.status();
        self.last = tokio::time::Instant::now();
        // The body is not read: dropping it lets hyper discard it and reuse the connection.
        drop(response);
        if status.is_success() {
            Ok(())
        } else {
            Err(WriteError::Status(status.as_u16()))
        }
    }

    async fn dial(&mut self) -> Result<SendRequest<Full<Bytes>>, WriteError> {
        let addr = if self.to.host.contains(':') {
            format!("[{}]:{}", self.to.host, self.to.port)
        } else {
            format!("{}:{}", self.to.host, self.to.port)
        };
        let tcp = timeout(
            self.dial_timeout,
            connect(&addr, self.send_buffer, &self.to.blocked),
        )
        .await
        .map_err(|_| WriteError::Timeout("connecting"))?
        .map_err(WriteError::Dial)?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.to.tls.clone());
        let tls = timeout(
            self.dial_timeout,
            connector.connect(self.to.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| WriteError::Timeout("in the TLS handshake"))?
        .map_err(WriteError::Tls)?;
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| WriteError::Write(std::io::Error::other(e)))?;
        // The connection's I/O runs beside the writer; it ends when `send` is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(send)
    }

    pub fn close(&mut self) {
        self.conn = None;
    }
}

/// Standard base64 with padding (RFC 4648), for the basic-auth header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("user:pass", "dXNlcjpwYXNz"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
    }
}
