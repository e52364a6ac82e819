//! TLS for NBD (`NBD_OPT_STARTTLS`): a rustls server configuration from PEM.
//!
//! The server authenticates itself with a certificate chain and key; clients
//! may optionally be required to present a certificate signed by a given CA.
//! Only the `ring` provider is used, so no C toolchain beyond `cc` is needed.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::NbdError;

fn tls_err(e: impl std::fmt::Display) -> NbdError {
    NbdError::Tls(e.to_string())
}

/// A server configuration from a PEM certificate chain and a PEM private key.
/// With `client_ca_pem`, clients must present a certificate signed by that CA.
pub fn server_config_from_pem(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ServerConfig>, NbdError> {
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem).collect::<Result<Vec<_>, _>>().map_err(tls_err)?;
    if certs.is_empty() {
        return Err(NbdError::Tls("no certificate in the PEM data".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(tls_err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots.add(c.map_err(tls_err)?).map_err(tls_err)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(tls_err)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(tls_err)?;
    Ok(Arc::new(config))
}
