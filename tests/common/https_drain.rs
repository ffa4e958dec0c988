//! An HTTPS drain stand-in on 127.0.0.1 (server certificate for `localhost` from the test
//! `Pki`): records every request — path and query, `Content-Type`, `Authorization`, body — and
//! answers with a status the test sets (200 by default).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::{Condvar, Mutex};
use prost::bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::runtime::Runtime;

use super::Pki;

/// One request as the drain saw it.
#[derive(Debug, Clone)]
pub struct Posted {
    pub method: String,
    pub target: String,
    pub content_type: String,
    pub authorization: String,
    pub body: String,
}

#[derive(Default)]
struct Store {
    posts: Mutex<Vec<Posted>>,
    changed: Condvar,
    /// Bodies answered to a GET, by path (a binding cache stand-in).
    pages: Mutex<std::collections::HashMap<String, String>>,
}

pub struct FakeHttpsDrain {
    addr: SocketAddr,
    store: Arc<Store>,
    status: Arc<AtomicU16>,
    runtime: Option<Runtime>,
}

impl Drop for FakeHttpsDrain {
    fn drop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl FakeHttpsDrain {
    pub fn start(pki: &Pki) -> FakeHttpsDrain {
        FakeHttpsDrain::start_with(pki, false)
    }

    /// [`FakeHttpsDrain::start`], requiring a client certificate issued by `pki` when
    /// `client_auth` (as a binding cache does).
    pub fn start_with(pki: &Pki, client_auth: bool) -> FakeHttpsDrain {
        super::install_crypto_provider();
        let cert = pki.issue("https-drain", &["localhost", "127.0.0.1"]);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap(),
            )
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-https-drain")
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(Store::default());
        let status = Arc::new(AtomicU16::new(200));
        let (s, st) = (store.clone(), status.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, s, st) = (acceptor.clone(), s.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (s, st) = (s.clone(), st.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            if parts.method == hyper::Method::GET {
                                let page = s.pages.lock().get(parts.uri.path()).cloned();
                                let mut r = Response::new(Full::new(Bytes::from(
                                    page.clone().unwrap_or_default(),
                                )));
                                let status = match page {
                                    Some(_) => st.load(Ordering::Relaxed),
                                    None => 404,
                                };
                                *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                return Ok::<_, Infallible>(r);
                            }
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let header = |name: hyper::header::HeaderName| {
                                parts
                                    .headers
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            s.posts.lock().push(Posted {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                content_type: header(hyper::header::CONTENT_TYPE),
                                authorization: header(hyper::header::AUTHORIZATION),
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                            s.changed.notify_all();
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() =
                                hyper::StatusCode::from_u16(st.load(Ordering::Relaxed)).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeHttpsDrain {
            addr,
            store,
            status,
            runtime: Some(runtime),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers a GET of `path` with `body` (and the status set by [`FakeHttpsDrain::answer`]).
    pub fn page(&self, path: &str, body: &str) {
        self.store
            .pages
            .lock()
            .insert(path.to_string(), body.to_string());
    }

    /// Answers every request with `status` from now on.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn posts(&self) -> Vec<Posted> {
        self.store.posts.lock().clone()
    }

    /// Messages received: a body holds one message per line.
    pub fn messages(&self) -> Vec<String> {
        self.posts()
            .iter()
            .flat_map(|p| {
                p.body
                    .split_inclusive('\n')
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until at least `n` messages arrived or `timeout` passes; true if they did.
    pub fn wait_for(&self, n: usize, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut posts = self.store.posts.lock();
        loop {
            let have: usize = posts.iter().map(|p| p.body.matches('\n').count()).sum();
            if have >= n {
                return true;
            }
            if self
                .store
                .changed
                .wait_until(&mut posts, deadline)
                .timed_out()
            {
                return false;
            }
        }
    }
}
