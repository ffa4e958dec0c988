//! TLS material for both mTLS edges, loaded and checked once at start-up.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{ConfigError, TlsFiles};

/// PEM bytes of a CA bundle, a certificate chain and its private key, already checked to parse.
#[derive(Clone)]
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
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(
            CertificateDer::pem_slice_iter(&self.ca_pem).filter_map(Result::ok),
        );
        if added == 0 {
            return Err(bad("ca", "usable CA certificate"));
        }
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .filter_map(Result::ok)
            .collect();
        // Catches a key that belongs to another certificate, or a key type rustls cannot use,
        // here instead of at the first handshake.
        rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
            .map_err(|e| ConfigError {
                key: format!("{key_name}.key"),
                problem: format!("unusable with {key_name}.cert: {e}"),
            })?;
        Ok(())
    }

    /// Server side: present our certificate, require and verify client certificates.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: verify the server as `server_name`, present our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }
}

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
