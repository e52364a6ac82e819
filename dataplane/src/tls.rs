//! TLS on the data plane: what a node serves with and what a client dials with.
//!
//! Nodes present a certificate issued by the cluster CA for their address, and
//! clients check it against that CA, so a client knows it talks to a node of its
//! cluster. Every client presents a certificate of its own (a host's is
//! ephemeral, made at start; a node dialling a peer uses its node certificate).
//! The node does not need to trust who issued it: it requires the peer to prove
//! it holds the certificate's key (the TLS handshake signature), and then
//! accepts only capabilities whose [`Holder`] is that certificate's hash. A
//! capability copied off one client is therefore useless on any other session.
//!
//! TLS 1.3 only, AES-GCM first (the ring provider uses AES-NI where the CPU has it).

use anyhow::Context;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use slate_protocol::Holder;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::BufStream;
use tokio::net::TcpStream;

/// The crypto provider of the data plane: ring, TLS 1.3 AES-GCM suites only.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// A certificate and its private key, as a TLS peer presents them.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("holder", &self.holder()).finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl Identity {
    /// A fresh self-signed certificate and key (ECDSA P-256), held in memory only:
    /// a host's data-plane identity for the life of its process.
    pub fn ephemeral() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate().context("generating a data-plane key")?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "slate data-plane client");
        let cert = params.self_signed(&key)?;
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok(Self { chain: vec![cert.der().clone()], key: PrivateKeyDer::Pkcs8(der) })
    }

    /// Reads a certificate chain and its key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let chain = read_certs(cert)?;
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
            std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
        ))
        .with_context(|| format!("parsing {}", key.display()))?
        .ok_or_else(|| anyhow::anyhow!("{} holds no private key", key.display()))?;
        Ok(Self { chain, key })
    }

    /// The binding a capability for this identity carries.
    pub fn holder(&self) -> Holder {
        Holder::of_certificate(self.chain.first().map_or(&[][..], |c| c.as_ref()))
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

/// Requires a client certificate and proof of its key, whoever issued it: the
/// capability, checked against the certificate's hash, is what authorizes.
#[derive(Debug)]
struct ProofOfKey {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ProofOfKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The data-plane server's TLS configuration: this node's certificate, a client
/// certificate required from every peer.
pub fn server_config(identity: &Identity) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let verifier = Arc::new(ProofOfKey { provider: provider.clone() });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("the node's data-plane certificate and key do not match")?;
    // Sessions are long-lived and never resumed: no tickets.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The hash of the certificate a TLS peer presented (and proved it holds).
pub fn peer_holder(conn: &rustls::CommonState) -> Option<Holder> {
    conn.peer_certificates().and_then(|c| c.first()).map(|c| Holder::of_certificate(c.as_ref()))
}

/// How a client reaches storage nodes: TLS with its identity, checking nodes
/// against the cluster CA, or plaintext (test listeners only, the default).
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<(Arc<rustls::ClientConfig>, Holder)>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("holder", &self.holder()).finish()
    }
}

/// Buffer under TLS, each way. rustls reads the socket at most a record (about
/// 4 to 16 KiB) at a time and writes each record separately; a buffer under it
/// turns those into a few large syscalls per batch of frames.
const SOCKET_BUFFER_BYTES: usize = 256 << 10;

/// The TCP stream as TLS sees it: buffered each way (see [`SOCKET_BUFFER_BYTES`]).
pub type Buffered = BufStream<TcpStream>;

/// Wraps a connected socket for TLS.
pub fn buffered(tcp: TcpStream) -> Buffered {
    BufStream::with_capacity(SOCKET_BUFFER_BYTES, SOCKET_BUFFER_BYTES, tcp)
}

/// A connected data-plane stream: TLS, or plain TCP to a test listener.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<Buffered>>),
}

impl Connector {
    /// Plain TCP, for nodes started without TLS (in-process tests).
    pub fn plaintext() -> Self {
        Self { tls: None }
    }

    /// TLS as `identity`, trusting node certificates issued by the CA in `ca_pem_file`.
    pub fn tls(ca_pem_file: &Path, identity: &Identity) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca_pem_file)? {
            roots.add(c).with_context(|| format!("{} is not a usable CA certificate", ca_pem_file.display()))?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .context("the data-plane client certificate and key do not match")?;
        Ok(Self { tls: Some((Arc::new(cfg), identity.holder())) })
    }

    /// The binding capabilities for this connector's sessions must carry (`None`: plaintext).
    pub fn holder(&self) -> Option<Holder> {
        self.tls.as_ref().map(|(_, h)| *h)
    }

    /// Connects to `addr`; with TLS, the node's certificate must name its IP address.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some((cfg, _)) => {
                let name = ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, buffered(tcp)).await?;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    }
}
