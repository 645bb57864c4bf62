//! rustls configurations for both ends: TLS 1.3 only, mutual authentication always.
//!
//! Built from PEM bytes (files are read by the callers). The coordinator trusts client
//! certificates issued by the consortium CA and with the clientAuth purpose; the agent
//! trusts a server certificate from the same CA for the configured server name.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::wire::ALPN;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: &'static str },
    #[error("{what}: invalid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The one crypto provider fedward uses (ring), passed explicitly everywhere: quinn and
/// rustls default to different providers.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// PEM material for one endpoint.
pub struct TlsMaterial<'a> {
    /// The consortium CA certificate(s) to trust.
    pub ca_pem: &'a [u8],
    /// This endpoint's certificate chain.
    pub cert_pem: &'a [u8],
    /// This endpoint's private key.
    pub key_pem: &'a [u8],
}

/// The coordinator's TLS config: requires a client certificate from the consortium CA.
pub fn server_config(m: &TlsMaterial<'_>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(m.ca_pem)?);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build().map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(m.cert_pem, "server certificate")?, key(m.key_pem)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The agent's TLS config: presents the site certificate, trusts only the consortium CA.
pub fn client_config(m: &TlsMaterial<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let roots = root_store(m.ca_pem)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(m.cert_pem, "site certificate")?, key(m.key_pem)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

fn root_store(ca_pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem { what, detail: format!("{e:?}") })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The detail of a key parse error is not printed: it could quote key material.
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::Pem { what: "private key", detail: "not a PEM private key".into() })
}

/// Explains a TLS alert or handshake failure in words an operator can act on.
pub fn explain_handshake_error(err: &str) -> Option<&'static str> {
    let e = err.to_ascii_lowercase();
    if e.contains("unknownissuer") || e.contains("unknown_ca") || e.contains("unknown ca") {
        Some("the certificate was not issued by the consortium CA")
    } else if e.contains("expired") {
        Some("the certificate has expired (or the clock is wrong)")
    } else if e.contains("notvalidyet") {
        Some("the certificate is not valid yet (check the clock)")
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        Some("the coordinator's certificate does not match the configured server name")
    } else if e.contains("certificate required") || e.contains("certificaterequired") {
        Some("the peer sent no client certificate")
    } else if e.contains("revoked") {
        Some("the certificate has been revoked")
    } else {
        None
    }
}
