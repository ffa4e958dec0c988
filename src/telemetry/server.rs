//! The agent's two small HTTP/1.1 endpoints: `GET /metrics` (Prometheus text, on
//! `metrics.listen`, over mTLS when `metrics.tls` is set) and `GET /livez`, `GET /readyz` (on
//! `health.listen`).
//!
//! Hand-rolled on a tokio listener: a few routes, `Connection: close`, requests bounded in size
//! and time. Not worth a web framework in the dependency tree.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::health::Health;
use super::ratelimit::RateLimit;
use super::Ledger;
use crate::tls::ReloadableAcceptor;

/// How long one request may take, from accept (or handshake) to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What an endpoint serves.
#[derive(Clone)]
pub enum Site {
    Metrics(Arc<Ledger>),
    Health(Arc<Health>),
}

/// Serves `site` until the task is aborted: over mTLS with `tls` (each connection with the
/// certificates current when it arrives), else plain HTTP.
pub async fn serve(listener: TcpListener, site: Site, tls: Option<Arc<ReloadableAcceptor>>) {
    match tls {
        Some(acceptor) => {
            let mut incoming = acceptor.incoming(listener, REQUEST_TIMEOUT, "metrics.listen");
            while let Some(Ok(stream)) = incoming.recv().await {
                spawn_answer(stream, site.clone());
            }
        }
        None => {
            let errors = RateLimit::new(Duration::from_secs(30));
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => spawn_answer(stream, site.clone()),
                    Err(e) => {
                        // Out of file descriptors and the like: say so, and let it pass rather
                        // than spin.
                        errors.warn_every(|times| {
                            tracing::warn!(error = %e, failures = times, "cannot accept an HTTP connection");
                        });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }
}

fn spawn_answer<S>(stream: S, site: Site)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &site)).await;
    });
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    site: &Site,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let path = request_path(line);
    let (status, content_type, body) = match (site, path) {
        (Site::Metrics(ledger), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4",
            ledger
                .metrics()
                .render(ledger.buffered(), ledger.max_bytes()),
        ),
        (Site::Health(h), Some(p @ ("/livez" | "/readyz"))) => {
            let a = if p == "/livez" {
                h.liveness().await
            } else {
                h.readiness()
            };
            let status = if a.ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", a.body)
        }
        (Site::Metrics(_), _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".to_string(),
        ),
        (Site::Health(_), _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /livez or /readyz\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The path of a `GET <path> HTTP/1.x` request line (query string left off); `None` for any
/// other method.
fn request_path(line: &[u8]) -> Option<&str> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if parts.next()? != "GET" {
        return None;
    }
    let target = parts.next()?;
    Some(target.split('?').next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_paths_are_routed() {
        assert_eq!(request_path(b"GET /metrics HTTP/1.1"), Some("/metrics"));
        assert_eq!(
            request_path(b"GET /readyz?verbose=1 HTTP/1.1"),
            Some("/readyz")
        );
        assert_eq!(request_path(b"GET /livez"), Some("/livez"));
        assert_eq!(request_path(b"POST /metrics HTTP/1.1"), None);
        assert_eq!(request_path(b""), None);
    }
}
