//! The binding cache's client: `GET {url}/v2/bindings` and `GET {url}/v2/aggregate` over TLS
//! (mTLS with the agent's certificate, as upstream's syslog-agent asks), one connection per
//! poll, bounded by a timeout. What it answers is read by [`super::bindings`]; the agent polls
//! it from [`super::poller`].

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::http::Uri;
use hyper_util::rt::TokioIo;
use prost::bytes::Bytes;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::bindings::{read_aggregate, read_bindings, AggregateBindings, AppBindings, Refused};

/// The most a cache's answer may weigh: a foundation's every binding, with room to spare.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Why a poll failed; the last good answer stays in force.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("binding cache URL {0:?}: not an https:// URL with a host")]
    Url(String),
    #[error("cannot reach the binding cache: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake with the binding cache failed: {0}")]
    Tls(std::io::Error),
    #[error("the binding cache's answer failed: {0}")]
    Http(String),
    #[error("the binding cache answered HTTP {0}")]
    Status(u16),
    #[error("the binding cache did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Answer(#[from] super::bindings::BadAnswer),
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct Answer {
    pub apps: AppBindings,
    pub aggregate: AggregateBindings,
    /// Drain URLs that cannot serve (anonymized), both lists together.
    pub refused: Vec<Refused>,
}

/// A binding cache, as `syslog.binding_cache` names it.
pub struct CacheClient {
    host: String,
    port: u16,
    /// The URL's path, without a trailing `/` (`/v2/...` is appended).
    base: String,
    tls: TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
    timeout: Duration,
}

impl CacheClient {
    /// A client for `url` (`https://host[:port][/base]`), verifying the cache as `server_name`.
    ///
    /// # Errors
    /// [`CacheError::Url`] when `url` is not an https URL with a host, or `server_name` is not a
    /// name TLS can verify.
    pub fn new(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        server_name: &str,
        timeout: Duration,
    ) -> Result<Self, CacheError> {
        let bad = || CacheError::Url(super::drain::redact_unparsed(url));
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|_| CacheError::Url(format!("server name {server_name:?}")))?;
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(443),
            base: uri.path().trim_end_matches('/').to_string(),
            tls: TlsConnector::from(Arc::new(tls)),
            server_name,
            timeout,
        })
    }

    /// Both lists, read as upstream reads them.
    ///
    /// # Errors
    /// A [`CacheError`] when either request fails or answers what is not the cache's JSON.
    pub async fn poll(
        &self,
        default_metadata: bool,
        per_app_limit: usize,
    ) -> Result<Answer, CacheError> {
        let bindings = self.get("/v2/bindings").await?;
        let aggregate = self.get("/v2/aggregate").await?;
        let (apps, mut refused) = read_bindings(&bindings, default_metadata, per_app_limit)?;
        let (aggregate, more) = read_aggregate(&aggregate, default_metadata)?;
        refused.extend(more);
        Ok(Answer {
            apps,
            aggregate,
            refused,
        })
    }

    /// `GET {base}{path}`: the body of a 200 answer.
    async fn get(&self, path: &str) -> Result<Bytes, CacheError> {
        timeout(self.timeout, self.fetch(path))
            .await
            .map_err(|_| CacheError::Timeout(self.timeout))?
    }

    async fn fetch(&self, path: &str) -> Result<Bytes, CacheError> {
        let addr = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(CacheError::Connect)?;
        let stream = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(CacheError::Tls)?;
        let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CacheError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let host = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = hyper::Request::get(format!("{}{path}", self.base))
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| CacheError::Http(e.to_string()))?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| CacheError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(CacheError::Status(response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| CacheError::Http(e.to_string()))?;
        Ok(body.to_bytes())
    }
}
