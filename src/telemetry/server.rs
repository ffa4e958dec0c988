//! The agent's two small HTTP/1.1 endpoints: `GET /metrics` (Prometheus text, on
//! `metrics.listen`, over mTLS when `metrics.tls` is set) and `GET /livez`, `GET /readyz` (on
//! `health.listen`).
//!
//! Served by hyper, already in the build under tonic: `GET` and `HEAD` on the known paths, 405
//! (with `Allow`) for other methods, 404 elsewhere, keep-alive. At most [`MAX_CONNECTIONS`]
//! connections per endpoint at once (one more is closed at once, with a rate-limited warning);
//! a connection that sends no complete request head for [`IDLE_TIMEOUT`] is closed, and request
//! heads are bounded in size.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::health::Health;
use super::ratelimit::RateLimit;
use super::Ledger;
use crate::tls::ReloadableAcceptor;

/// Connections one endpoint serves at once: a scraper and a health checker or two need a handful.
pub const MAX_CONNECTIONS: usize = 32;

/// A connection must send a complete request head within this long of opening, or of its last
/// answer (keep-alive); also the TLS handshake's limit.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head read (request line and headers).
const MAX_HEAD_BYTES: usize = 8192;

/// What an endpoint serves.
#[derive(Clone)]
pub enum Site {
    Metrics(Arc<Ledger>),
    Health(Arc<Health>),
}

impl Site {
    fn name(&self) -> &'static str {
        match self {
            Site::Metrics(_) => "metrics.listen",
            Site::Health(_) => "health.listen",
        }
    }
}

/// Serves `site` until the task is aborted: over mTLS with `tls` (each connection with the
/// certificates current when it arrives), else plain HTTP.
pub async fn serve(listener: TcpListener, site: Site, tls: Option<Arc<ReloadableAcceptor>>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refused = RateLimit::new(Duration::from_secs(30));
    match tls {
        Some(acceptor) => {
            let mut incoming = acceptor.incoming(listener, IDLE_TIMEOUT, site.name());
            while let Some(Ok(stream)) = incoming.recv().await {
                spawn_connection(stream, &site, &limit, &refused);
            }
        }
        None => {
            let errors = RateLimit::new(Duration::from_secs(30));
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => spawn_connection(stream, &site, &limit, &refused),
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

fn spawn_connection<S>(stream: S, site: &Site, limit: &Arc<Semaphore>, refused: &RateLimit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        // Dropping the stream closes it: the client sees the connection reset and may retry.
        refused.warn_every(|times| {
            tracing::warn!(
                listener = site.name(),
                limit = MAX_CONNECTIONS,
                refused = times,
                "too many HTTP connections at once; closing the new one"
            );
        });
        return;
    };
    let site = site.clone();
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let site = site.clone();
            async move { Ok::<_, Infallible>(respond(&site, &req).await) }
        });
        let _ = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(IDLE_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        drop(permit);
    });
}

/// The answer to one request.
async fn respond(site: &Site, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = match site {
        Site::Metrics(_) => path == "/metrics",
        Site::Health(_) => path == "/livez" || path == "/readyz",
    };
    if !known {
        let hint = match site {
            Site::Metrics(_) => "not found: try /metrics\n",
            Site::Health(_) => "not found: try /livez or /readyz\n",
        };
        return answer(StatusCode::NOT_FOUND, "text/plain", hint.to_owned());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed: use GET\n".to_owned(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // hyper leaves the body out of the answer to a HEAD request, keeping its length.
    match site {
        Site::Metrics(ledger) => answer(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            ledger
                .metrics()
                .render(ledger.buffered(), ledger.max_bytes()),
        ),
        Site::Health(h) => {
            let a = if path == "/livez" {
                h.liveness().await
            } else {
                h.readiness()
            };
            let status = if a.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            answer(status, "application/json", a.body)
        }
    }
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
