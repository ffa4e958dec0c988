//! Development mode: a throwaway CA and certificates generated at start-up so the shipped
//! `config.yaml` runs on a fresh machine. Never for production, and the log says so loudly.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::config::TlsFiles;

/// Files written by [`generate`]: one CA, and leaf certificates for the agent, the development
/// Doppler and an emitter.
#[derive(Debug, Clone)]
pub struct DevCredentials {
    /// The agent's own: server name `metron` on ingress, client certificate towards Dopplers.
    pub agent: TlsFiles,
    /// For the development Doppler (server name `doppler`).
    pub doppler: TlsFiles,
    /// For an emitter talking to the agent (e.g. grpcurl or a go-loggregator client).
    pub emitter: TlsFiles,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot generate development credentials: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write development credentials to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Generates a fresh CA and leaf certificates into `dir` (created if needed).
///
/// # Errors
/// When key generation fails or `dir` is not writable.
pub fn generate(dir: &Path) -> Result<DevCredentials, DevError> {
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, contents))
            .map_err(|source| DevError::Write {
                path: path.display().to_string(),
                source,
            })?;
        Ok::<_, DevError>(path)
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        DnType::CommonName,
        "metron DEVELOPMENT CA (not for production)",
    );
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = write("ca.pem", &ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |stem: &str, names: &[&str]| -> Result<TlsFiles, DevError> {
        let mut p =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok(TlsFiles {
            ca: ca.clone(),
            cert: write(&format!("{stem}.pem"), &cert.pem())?,
            key: write(&format!("{stem}-key.pem"), &key.serialize_pem())?,
        })
    };
    Ok(DevCredentials {
        agent: leaf("metron", &["metron"])?,
        doppler: leaf("doppler", &["doppler"])?,
        emitter: leaf("emitter", &["emitter"])?,
    })
}
