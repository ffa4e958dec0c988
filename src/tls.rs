//! TLS material for the mTLS edges, loaded and checked at start-up and on every reload, and the
//! server side's [`ReloadableAcceptor`]: new connections get the newest certificates, open ones
//! keep theirs.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::{Config, ConfigError, TlsFiles};
use crate::dev::DevCredentials;
use crate::telemetry::ratelimit::RateLimit;

/// PEM bytes of a CA bundle, a certificate chain and its private key, already checked to parse.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

/// A `syslog-tls://` drain's TLS client configuration: the public CA roots (Mozilla's, from
/// `webpki-roots`) plus the drain's own CA when it names one (upstream appends a binding's CA to
/// the system roots), and its client certificate when it has one (mTLS drains such as Log
/// Cache's syslog server). `key` names the config entry in errors.
///
/// # Errors
/// A [`ConfigError`] naming `<key>.ca`, `.cert` or `.key` when a file cannot be read or used.
pub fn drain_client_config(
    ca: Option<&std::path::Path>,
    client: Option<(&std::path::Path, &std::path::Path)>,
    key: &str,
) -> Result<(Arc<rustls::ClientConfig>, [u8; 32]), ConfigError> {
    // A digest of every file read (not the bytes: one is a private key), for a reload to tell
    // new files under the same paths.
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut read = |sub: &str, path: &std::path::Path| {
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            key: format!("{key}.{sub}"),
            problem: format!("cannot read {}: {e}", path.display()),
        })?;
        digest.update(sub.as_bytes());
        digest.update(&(bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
        Ok::<_, ConfigError>(bytes)
    };
    let ca_pem = ca.map(|p| read("ca", p)).transpose()?;
    let client_pem = match client {
        Some((c, k)) => Some((read("cert", c)?, read("key", k)?)),
        None => None,
    };
    let named = |sub: &str| match sub {
        "ca" => ca.map(|p| p.display().to_string()),
        "cert" => client.map(|(c, _)| c.display().to_string()),
        _ => None,
    };
    let config = drain_client_config_pem(
        ca_pem.as_deref(),
        client_pem
            .as_ref()
            .map(|(c, k)| (c.as_slice(), k.as_slice())),
    )
    .map_err(|(sub, problem)| ConfigError {
        key: format!("{key}.{sub}"),
        problem: match named(sub) {
            Some(file) => format!("{file} {problem}"),
            None => problem,
        },
    })?;
    let mut files = [0u8; 32];
    files.copy_from_slice(digest.finish().as_ref());
    Ok((config, files))
}

/// [`drain_client_config`] from PEM bytes (a binding's credentials, from the binding cache).
///
/// # Errors
/// Which part (`ca`, `cert` or `key`) cannot be used, and why.
pub fn drain_client_config_pem(
    ca: Option<&[u8]>,
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, (&'static str, String)> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = ca {
        let (added, _) = roots
            .add_parsable_certificates(CertificateDer::pem_slice_iter(pem).filter_map(Result::ok));
        if added == 0 {
            return Err(("ca", "holds no usable certificate".into()));
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, private)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
                .filter_map(Result::ok)
                .collect();
            if chain.is_empty() {
                return Err(("cert", "holds no certificate".into()));
            }
            let private = PrivateKeyDer::from_pem_slice(private)
                .map_err(|e| ("key", format!("no usable private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| ("key", format!("does not fit the certificate: {e}")))?
        }
    };
    Ok(Arc::new(config))
}

impl TlsMaterial {
    /// Reads `files` and checks each holds what it should; errors name `<key>.ca` etc.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file's key when it cannot be read or parsed.
    pub fn load(files: &TlsFiles, key: &str) -> Result<Self, ConfigError> {
        let read = |sub: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| ConfigError {
                key: format!("{key}.{sub}"),
                problem: format!("cannot read {}: {e}", path.display()),
            })
        };
        let m = Self {
            ca_pem: read("ca", &files.ca)?,
            cert_pem: read("cert", &files.cert)?,
            key_pem: read("key", &files.key)?,
        };
        m.check(key)?;
        Ok(m)
    }

    fn check(&self, key_name: &str) -> Result<(), ConfigError> {
        let bad = |sub: &str, what: &str| ConfigError {
            key: format!("{key_name}.{sub}"),
            problem: format!("no {what} found in the PEM file"),
        };
        let certs = |pem: &[u8]| {
            CertificateDer::pem_slice_iter(pem)
                .filter_map(Result::ok)
                .count()
        };
        if certs(&self.ca_pem) == 0 {
            return Err(bad("ca", "certificate"));
        }
        if certs(&self.cert_pem) == 0 {
            return Err(bad("cert", "certificate"));
        }
        let Ok(key) = PrivateKeyDer::from_pem_slice(&self.key_pem) else {
            return Err(bad("key", "private key"));
        };
        if self.roots().roots.is_empty() {
            return Err(bad("ca", "usable CA certificate"));
        }
        let chain = self.chain();
        // Catches a key that belongs to another certificate, or a key type rustls cannot use,
        // here instead of at the first handshake.
        rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
            .map_err(|e| unusable_key(key_name, e))?;
        Ok(())
    }

    /// The usable certificates of the CA bundle.
    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(
            CertificateDer::pem_slice_iter(&self.ca_pem).filter_map(Result::ok),
        );
        roots
    }

    /// The certificate chain, leaf first.
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(&self.cert_pem)
            .filter_map(Result::ok)
            .collect()
    }

    /// For the benchmark's sink, which serves through tonic's own TLS.
    pub fn tonic_server_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Server side: present our certificate, require a client certificate issued by our CA, and
    /// offer `alpn` (`h2` for gRPC).
    ///
    /// # Errors
    /// A [`ConfigError`] naming `<key>.ca`/`<key>.key` when rustls refuses the material.
    pub fn server_config(&self, key: &str, alpn: &[&[u8]]) -> Result<ServerConfig, ConfigError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(self.roots()))
            .build()
            .map_err(|e| ConfigError {
                key: format!("{key}.ca"),
                problem: format!("cannot verify clients with it: {e}"),
            })?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), self.private_key(key)?)
            .map_err(|e| unusable_key(key, e))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// Client side for a plain rustls connection (a syslog drain): verify the server against
    /// our CA bundle, present our certificate.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `<key>.key` when rustls refuses the material.
    pub fn rustls_client_config(
        &self,
        key: &str,
    ) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(self.chain(), self.private_key(key)?)
            .map_err(|e| unusable_key(key, e))?;
        Ok(Arc::new(config))
    }

    fn private_key(&self, key: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| ConfigError {
            key: format!("{key}.key"),
            problem: format!("no private key: {e}"),
        })
    }

    /// Client side: verify the server as `server_name`, present our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }
}

/// `<key>.key` does not go with `<key>.cert`, or rustls cannot use it.
fn unusable_key(key: &str, e: rustls::Error) -> ConfigError {
    ConfigError {
        key: format!("{key}.key"),
        problem: format!("unusable with {key}.cert: {e}"),
    }
}

/// Every edge's TLS material, as one config (plus the development credentials, if generated at
/// start-up) names it: loaded at start-up and again, as a whole, by every reload.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSet {
    pub ingress: TlsMaterial,
    pub doppler: TlsMaterial,
    /// `metrics.tls`, when set.
    pub metrics: Option<TlsMaterial>,
}

/// A drain's TLS client configuration, with a digest of the files it was made from (a reload
/// compares them: new files under the same paths restart the drain's connection).
#[derive(Clone)]
pub struct DrainTls {
    pub config: Arc<rustls::ClientConfig>,
    /// SHA-256 of the files it was made from.
    files: [u8; 32],
}

impl PartialEq for DrainTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

/// Each `syslog.aggregate_drains` entry's TLS client configuration (`None`: plain TCP).
///
/// # Errors
/// A [`ConfigError`] naming the entry's file that cannot be read or used.
pub fn aggregate_drain_tls(config: &Config) -> Result<Vec<Option<DrainTls>>, ConfigError> {
    config
        .syslog
        .aggregate_drains
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if d.url.scheme == crate::syslog::drain::Scheme::Syslog {
                return Ok(None);
            }
            let client = d.client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
            let key = format!("syslog.aggregate_drains[{i}]");
            let (config, files) = drain_client_config(d.ca.as_deref(), client, &key)?;
            Ok(Some(DrainTls { config, files }))
        })
        .collect()
}

impl TlsSet {
    /// Reads and checks every file `config` names; a `tls:` block left out in development mode
    /// uses `dev`'s agent certificate. `metrics.tls` is read only `with_metrics` (a reload of an
    /// agent whose metrics endpoint started without TLS cannot turn it on, so its files are not
    /// its business).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file's key, also when a block is missing and no development
    /// credentials exist (a reload cannot create them: they are made at start-up only).
    pub fn load(
        config: &Config,
        dev: Option<&DevCredentials>,
        with_metrics: bool,
    ) -> Result<Self, ConfigError> {
        let files = |tls: &Option<TlsFiles>, key: &str| {
            tls.clone()
                .or_else(|| dev.map(|d| d.agent.clone()))
                .ok_or_else(|| ConfigError {
                    key: key.to_string(),
                    problem: "missing, and no development credentials were generated at \
                              start-up (a restart with development.enabled makes them)"
                        .to_string(),
                })
        };
        let ingress = files(&config.ingress.tls, "ingress.grpc.tls")?;
        // Without Dopplers nothing is ever dialled with it: the ingress material stands in.
        let doppler = match config.dopplers.source {
            crate::config::DopplerSource::None => ingress.clone(),
            _ => files(&config.dopplers.tls, "dopplers.tls")?,
        };
        Ok(Self {
            ingress: TlsMaterial::load(&ingress, "ingress.grpc.tls")?,
            doppler: TlsMaterial::load(&doppler, "dopplers.tls")?,
            metrics: match (&config.metrics.tls, with_metrics) {
                (Some(t), true) => Some(TlsMaterial::load(t, "metrics.tls")?),
                _ => None,
            },
        })
    }
}

/// TLS handshakes under way (or finished and waiting for the server) per listener.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// A server's TLS configuration, shared by its accept loop.
pub type ServerConfig = Arc<rustls::ServerConfig>;

/// The server side of an mTLS listener whose certificates a reload may replace: each new
/// connection is accepted with the configuration current at that moment; connections already
/// open keep the one they started with.
pub struct ReloadableAcceptor {
    config: RwLock<ServerConfig>,
}

impl ReloadableAcceptor {
    pub fn new(config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(config),
        })
    }

    /// From the next connection on.
    pub fn set(&self, config: ServerConfig) {
        *self.config.write() = config;
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().clone())
    }

    /// Accepts TCP connections on `listener` and hands out the ones whose TLS handshake (with
    /// the current configuration) completes within `handshake_timeout`. Handshakes run
    /// concurrently, so a slow or silent client delays nobody else; at most
    /// [`MAX_PENDING_HANDSHAKES`] at a time (then accepting waits: a flood of idle connections
    /// holds a bounded number of sockets and tasks). Stops when the receiver is dropped. `name`
    /// says which listener in the rate-limited warnings.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        handshake_timeout: Duration,
        name: &'static str,
    ) -> mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>> {
        // A few ready connections may wait for the server to take them; the accept loop waits
        // when that many do.
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let failures = Arc::new(RateLimit::new(Duration::from_secs(30)));
            let accept_errors = RateLimit::new(Duration::from_secs(30));
            let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
            loop {
                let accepted = tokio::select! {
                    permit = pending.clone().acquire_owned() => match permit {
                        Ok(permit) => tokio::select! {
                            a = listener.accept() => a.map(|a| (a, permit)),
                            () = tx.closed() => return,
                        },
                        Err(_) => return,
                    },
                    () = tx.closed() => return,
                };
                let ((tcp, peer), permit) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: say so, and let it pass rather
                        // than spin.
                        accept_errors.warn_every(|times| {
                            tracing::warn!(listener = name, error = %e, failures = times, "cannot accept a connection");
                        });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = self.acceptor();
                let tx = tx.clone();
                let failures = failures.clone();
                tokio::spawn(async move {
                    // Held until the connection is handed over (or has failed).
                    let _permit = permit;
                    let outcome =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                    match outcome {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        failed => {
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "handshake timed out".to_string(),
                            };
                            if let Some(times) = failures.check() {
                                tracing::warn!(
                                    listener = name,
                                    %peer,
                                    %error,
                                    failures = times,
                                    "TLS handshake failed"
                                );
                            }
                        }
                    }
                });
            }
        });
        rx
    }
}

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
