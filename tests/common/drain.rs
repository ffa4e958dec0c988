//! A syslog drain stand-in on 127.0.0.1: reads octet-counted RFC 5424 frames over TCP or mTLS
//! (client certificates from the test `Pki` required) and records each message, or accepts
//! connections and never reads them (a blackholed drain). Runs on its own runtime, like the fake
//! Doppler, so it keeps serving whatever the test's runtime does.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::runtime::Runtime;

use super::Pki;

/// What the drain does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Reads and records every message.
    Read,
    /// Accepts and never reads: the sender's writes block once the socket buffers are full.
    Blackhole,
    /// Reads and records at most this many messages a second (a slow drain).
    Slow(u32),
}

#[derive(Default)]
struct Store {
    messages: Mutex<Vec<String>>,
    changed: Condvar,
}

pub struct FakeDrain {
    addr: SocketAddr,
    store: Arc<Store>,
    runtime: Option<Runtime>,
}

impl Drop for FakeDrain {
    fn drop(&mut self) {
        // Dropped from a test's async context, a runtime must not block.
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl FakeDrain {
    /// A plain TCP drain.
    pub fn tcp(behaviour: Behaviour) -> FakeDrain {
        FakeDrain::start(None, behaviour)
    }

    /// A TLS drain with a server certificate for `127.0.0.1` and `localhost`, requiring a client
    /// certificate issued by `pki`.
    pub fn mtls(pki: &Pki, behaviour: Behaviour) -> FakeDrain {
        super::install_crypto_provider();
        let cert = pki.issue("drain", &["127.0.0.1", "localhost"]);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        FakeDrain::start(Some(Arc::new(config)), behaviour)
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>, behaviour: Behaviour) -> FakeDrain {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-drain")
            .enable_all()
            .build()
            .unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if behaviour == Behaviour::Blackhole {
            // A small receive window (inherited by accepted connections): the kernel takes little
            // on the drain's behalf, as a remote drain that stopped reading would.
            socket.set_recv_buffer_size(4096).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let store = Arc::new(Store::default());
        let s = store.clone();
        let listener = {
            let _guard = runtime.enter();
            socket.listen(64).unwrap()
        };
        runtime.spawn(async move {
            // Held so a blackholed connection stays open, unread.
            let mut parked = Vec::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if behaviour == Behaviour::Blackhole {
                    parked.push(tcp);
                    continue;
                }
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let rate = match behaviour {
                        Behaviour::Slow(r) => Some(r),
                        _ => None,
                    };
                    match tls {
                        None => read_frames(tcp, &s, rate).await,
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                read_frames(stream, &s, rate).await;
                            }
                        }
                    }
                });
            }
        });
        FakeDrain {
            addr,
            store,
            runtime: Some(runtime),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every message received so far, in arrival order, without its framing.
    pub fn messages(&self) -> Vec<String> {
        self.store.messages.lock().clone()
    }

    pub fn count(&self) -> usize {
        self.store.messages.lock().len()
    }

    /// Waits until at least `n` messages arrived or `timeout` passes; true if they did.
    pub fn wait_for(&self, n: usize, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut m = self.store.messages.lock();
        while m.len() < n {
            if self.store.changed.wait_until(&mut m, deadline).timed_out() {
                return m.len() >= n;
            }
        }
        true
    }
}

/// Reads `<len> <message>` frames until the connection ends; a malformed frame ends it too.
/// With a `rate`, at most that many a second.
async fn read_frames(stream: impl AsyncRead + Unpin, store: &Store, rate: Option<u32>) {
    let mut r = BufReader::new(stream);
    let mut len = Vec::new();
    let mut next = tokio::time::Instant::now();
    loop {
        if let Some(rate) = rate {
            // Pacing sets the drain's speed; it synchronises nothing.
            tokio::time::sleep_until(next).await;
            next += std::time::Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        }
        len.clear();
        match r.read_until(b' ', &mut len).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some(n) = std::str::from_utf8(&len[..len.len() - 1])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return;
        };
        let mut msg = vec![0; n];
        if r.read_exact(&mut msg).await.is_err() {
            return;
        }
        store
            .messages
            .lock()
            .push(String::from_utf8_lossy(&msg).into_owned());
        store.changed.notify_all();
    }
}
