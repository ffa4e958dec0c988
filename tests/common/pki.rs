//! A throwaway certificate authority on disk: one CA per test, leaves for every mTLS peer.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Distinguishes PKIs created in the same nanosecond by one process (parallel tests).
static PKI_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A self-signed CA (ECDSA P-256) plus the directory its files live in.
///
/// The directory is `std::env::temp_dir()/metron-tests/<pid>-<nanos>-<counter>/` and is removed
/// (best effort) when the `Pki` is dropped, so keep the `Pki` alive as long as anything reads the
/// files (an agent started from a config that points at them, for instance).
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    /// `dir/ca.pem`, for configs that want a CA file path.
    pub ca_path: PathBuf,
    /// Signs leaves; owns the CA key, which never touches the disk.
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its private key, both on disk and in memory (PEM).
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// Creates the directory and a fresh CA, written to `dir/ca.pem`.
    ///
    /// # Panics
    /// If key generation, signing or writing the files fails.
    pub fn new() -> Pki {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = PKI_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{nanos}-{n}", std::process::id());
        let dir = std::env::temp_dir().join("metron-tests").join(&id);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));

        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        let mut dn = DistinguishedName::new();
        // A name of its own, so a leaf from another test's CA fails as an unknown issuer
        // instead of as a bad signature from a same-named CA.
        dn.push(DnType::CommonName, format!("metron test CA {id}"));
        dn.push(DnType::OrganizationName, "metron tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate CA key");
        let ca_pem = params.self_signed(&key).expect("self-sign CA").pem();
        let ca_path = dir.join("ca.pem");
        write(&ca_path, &ca_pem);

        Pki {
            dir,
            ca_pem,
            ca_path,
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a leaf signed by this CA, valid for both server and client authentication, with
    /// `dns_names` as its subject alternative names (entries that parse as IP addresses become IP
    /// SANs). Written to `dir/<file_stem>.pem` and `dir/<file_stem>-key.pem`; issuing the same
    /// stem twice overwrites the files.
    ///
    /// # Panics
    /// If a name is not a valid SAN, or signing or writing fails.
    pub fn issue(&self, file_stem: &str, dns_names: &[&str]) -> CertFiles {
        let sans: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names.first().copied().unwrap_or(file_stem),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate leaf key");
        let cert_pem = params
            .signed_by(&key, &self.issuer)
            .expect("sign leaf")
            .pem();
        let key_pem = key.serialize_pem();

        let cert_path = self.dir.join(format!("{file_stem}.pem"));
        let key_path = self.dir.join(format!("{file_stem}-key.pem"));
        write(&cert_path, &cert_pem);
        write(&key_path, &key_pem);
        CertFiles {
            cert_path,
            key_path,
            cert_pem,
            key_pem,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
