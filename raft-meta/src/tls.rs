//! TLS for the management API: a local CA and per-node certificates made by
//! `slate-meta init` (rcgen), and the rustls server configuration (ring
//! provider only, so nothing needs a C toolchain beyond what ring brings).

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// A CA able to issue node certificates.
pub struct LocalCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalCa(..)")
    }
}

/// The common name of the CA `slate-meta init` makes for a cluster.
pub const LOCAL_CA_NAME: &str = "slate-meta local CA";

fn ca_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

impl LocalCa {
    /// A fresh self-signed CA.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let cert = ca_params(name)?.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA that [`Self::generate`]`(name)` made, from its private key (PEM): the
    /// certificates it issues chain to that CA's certificate (same name, same key).
    pub fn from_key_pem(name: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("the CA key is not a PEM private key")?;
        let cert = ca_params(name)?.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate (PEM), for clients to trust.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key (PEM). Keep it 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a server (and client) certificate for `names` (DNS names or IP addresses): `(cert_pem, key_pem)`.
    pub fn issue(&self, common_name: &str, names: &[String]) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a file only its owner can read (0600), fsynced. Refuses to overwrite.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Installs rustls's ring provider as the process default (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The rustls server config from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("parsing {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("parsing {}", key.display()))?
    .ok_or_else(|| anyhow::anyhow!("{} holds no private key", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
