//! rustls configurations for both ends: TLS 1.3 only, mutual authentication always.
//!
//! Built from PEM bytes (files are read by the callers). The coordinator trusts client
//! certificates issued by the consortium CA and with the clientAuth purpose; the agent
//! trusts a server certificate from the same CA for the configured server name.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ids::ALPN;

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
///
/// `crl_pem`, the consortium's revocation list (`pki revoke`), when there is one: a client
/// certificate it lists fails the handshake. Only the site's own certificate is checked
/// (the CA is the root), and a list past its next-update date still counts: a revocation
/// never lapses.
pub fn server_config(m: &TlsMaterial<'_>, crl_pem: Option<&[u8]>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(m.ca_pem)?);
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(pem) = crl_pem {
        use rustls::pki_types::pem::PemObject;
        let crls = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Verifier(format!("the revocation list: {e:?}")))?;
        if crls.is_empty() {
            return Err(TlsError::Verifier("the revocation list file holds no CRL".into()));
        }
        // The CRL is the root's: a certificate the online issuing CA renewed has no CRL of
        // its issuer here, and is checked by serial against the coordinator's revocations
        // instead (the CRL's serials and the admin's, right after the handshake).
        builder = builder.with_crls(crls).only_check_end_entity_revocation().allow_unknown_revocation_status();
    }
    let verifier = builder.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(m.cert_pem, "server certificate")?, key(m.key_pem)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The admin endpoints' HTTPS: the coordinator's own certificate, TLS 1.3, no client
/// certificate (callers present a bearer token inside the connection).
pub fn admin_server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "server certificate")?, key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What `fedward-coordinator admin` trusts when it calls the admin endpoints over HTTPS:
/// the consortium CA only.
pub fn admin_client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca_pem)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
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

/// Which end of the connection a certificate serves.
#[derive(Clone, Copy, Debug)]
pub enum Role<'a> {
    /// The coordinator's certificate, which must name `server_name`.
    Coordinator { server_name: &'a str },
    /// A site's client certificate.
    Site,
}

/// What `check-config` checks of TLS material beyond building a configuration (which
/// already refuses a key that is not the certificate's): the certificate chains to the
/// configured CA for its role, and is valid at `now`. A wrong CA file, an expired
/// certificate or one issued for the other role is caught before anything connects.
pub fn check_certificate(m: &TlsMaterial<'_>, role: Role<'_>, now: rustls_pki_types::UnixTime) -> Result<(), TlsError> {
    let roots = Arc::new(root_store(m.ca_pem)?);
    let chain = certs(m.cert_pem, "certificate")?;
    let (end_entity, intermediates) = chain.split_first().ok_or(TlsError::NoCertificate { what: "certificate" })?;
    match role {
        Role::Site => {
            site_cert_verifier(m.ca_pem)?.verify_client_cert(end_entity, intermediates, now)?;
        }
        Role::Coordinator { server_name } => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
                .map_err(|e| TlsError::Verifier(format!("server name {server_name:?}: {e}")))?;
            verifier.verify_server_cert(end_entity, intermediates, &name, &[], now)?;
        }
    }
    Ok(())
}

/// The check the coordinator's handshake makes of a site certificate (chains to the
/// consortium CA, clientAuth purpose), for uses outside a handshake: `check-config` and the
/// signatures of secure aggregation's per-round keys.
pub fn site_cert_verifier(ca_pem: &[u8]) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = Arc::new(root_store(ca_pem)?);
    WebPkiClientVerifier::builder_with_provider(roots, provider()).build().map_err(|e| TlsError::Verifier(e.to_string()))
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

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::ids::SiteId;
    use crate::pki::{self, Validity};

    fn now() -> rustls_pki_types::UnixTime {
        rustls_pki_types::UnixTime::now()
    }

    #[test]
    fn check_certificate_catches_the_wrong_ca_role_and_name() {
        let validity = Validity::days_from(OffsetDateTime::now_utc(), 1);
        let ca = pki::create_ca("consortium", validity, [1; 16]).unwrap();
        let other = pki::create_ca("elsewhere", validity, [2; 16]).unwrap();
        let server = pki::issue_server(&ca, &["coordinator.test".into()], &[], validity, [3; 16]).unwrap();
        let site = SiteId::new("alpha").unwrap();
        let request = pki::site_request(&site).unwrap();
        let site_cert = pki::sign_site_request(&ca, &request.csr_pem, &site, validity, [4; 16]).unwrap();
        let m = |ca: &pki::CertifiedKey, cert: &str, key: &str| (ca.cert_pem.clone(), cert.to_owned(), key.to_owned());
        let check = |(ca, cert, key): (String, String, String), role| {
            check_certificate(&TlsMaterial { ca_pem: ca.as_bytes(), cert_pem: cert.as_bytes(), key_pem: key.as_bytes() }, role, now())
        };
        let coordinator = Role::Coordinator { server_name: "coordinator.test" };
        check(m(&ca, &server.cert_pem, &server.key_pem), coordinator).unwrap();
        check(m(&ca, &site_cert, &request.key_pem), Role::Site).unwrap();
        // The configured CA did not issue it.
        let err = check(m(&other, &site_cert, &request.key_pem), Role::Site).unwrap_err().to_string();
        assert!(explain_handshake_error(&err).is_some_and(|h| h.contains("consortium CA")), "{err}");
        // A server certificate for another name, and a site certificate used as a server's.
        let err = check(m(&ca, &server.cert_pem, &server.key_pem), Role::Coordinator { server_name: "other.test" }).unwrap_err();
        assert!(explain_handshake_error(&err.to_string()).is_some(), "{err}");
        assert!(check(m(&ca, &site_cert, &request.key_pem), coordinator).is_err());
        // An expired certificate.
        let past = Validity {
            not_before: OffsetDateTime::now_utc() - time::Duration::days(10),
            not_after: OffsetDateTime::now_utc() - time::Duration::days(1),
        };
        let expired = pki::sign_site_request(&ca, &request.csr_pem, &site, past, [5; 16]).unwrap();
        let err = check(m(&ca, &expired, &request.key_pem), Role::Site).unwrap_err().to_string();
        assert!(err.to_ascii_lowercase().contains("expired"), "{err}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let validity = Validity::days_from(OffsetDateTime::now_utc(), 1);
        let ca = pki::create_ca("consortium", validity, [1; 16]).unwrap();
        let site = SiteId::new("alpha").unwrap();
        let request = pki::site_request(&site).unwrap();
        let cert = pki::sign_site_request(&ca, &request.csr_pem, &site, validity, [4; 16]).unwrap();
        let stranger = pki::site_request(&site).unwrap();
        let m = TlsMaterial { ca_pem: ca.cert_pem.as_bytes(), cert_pem: cert.as_bytes(), key_pem: stranger.key_pem.as_bytes() };
        assert!(client_config(&m).is_err());
    }
}
