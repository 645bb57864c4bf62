//! The consortium's PKI: a CA held by the admin, a server certificate for the coordinator,
//! and site certificates signed from requests generated at each hospital.
//!
//! A site's private key is generated at the site (`site_request`) and never leaves it;
//! the admin only ever sees the certificate signing request. Every function here works
//! on PEM strings and takes the current time as a parameter: files are the callers' job.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::ids::SiteId;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate signing request names {found}, expected exactly the site {expected}")]
    SiteMismatch { expected: String, found: String },
    #[error("certificate signing request has no site name")]
    NoSiteName,
    #[error("invalid validity: {0}")]
    Validity(String),
    #[error("could not parse certificate: {0}")]
    Parse(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key.
        f.debug_struct("CertifiedKey").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// A site's key and the request to send to the admin.
#[derive(Clone)]
pub struct SiteRequest {
    pub key_pem: String,
    pub csr_pem: String,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour before `now` (clock skew between sites) for `seconds` seconds: for
    /// tests of expiry and renewal.
    pub fn seconds_from(now: OffsetDateTime, seconds: i64) -> Self {
        Self { not_before: now - Duration::hours(1), not_after: now + Duration::seconds(seconds) }
    }

    /// From an hour before `now` (clock skew between sites) for `days` days.
    pub fn days_from(now: OffsetDateTime, days: u32) -> Self {
        Self { not_before: now - Duration::hours(1), not_after: now + Duration::days(i64::from(days)) }
    }
}

/// A fresh certificate serial from the OS's RNG.
pub fn random_serial() -> [u8; 16] {
    use rand::RngCore;
    let mut s = [0u8; 16];
    rand::rng().fill_bytes(&mut s);
    s
}

/// Creates the consortium CA.
pub fn create_ca(consortium: &str, validity: Validity, serial: [u8; 16]) -> Result<CertifiedKey, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("{consortium} fedward CA"), consortium);
    // One level below: the online issuing CA that renews site certificates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, validity, serial)?;
    let cert = params.self_signed(&key)?;
    Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Creates the online issuing CA, signed by the (offline) root: it signs the sites'
/// renewed certificates at the coordinator, and nothing below itself can be a CA.
pub fn create_issuing_ca(root: &CertifiedKey, consortium: &str, validity: Validity, serial: [u8; 16]) -> Result<CertifiedKey, PkiError> {
    let issuer = issuer(root)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("{consortium} fedward issuing CA"), consortium);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity, serial)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The certificate chain a site presents: its certificate, then the issuing CA's, when
/// the issuing CA signed it (the root signs first certificates itself).
pub fn site_chain(site_cert_pem: &str, issuing_cert_pem: &str) -> String {
    format!("{}\n{}", site_cert_pem.trim_end(), issuing_cert_pem)
}

/// The public key (SubjectPublicKeyInfo, DER) a signing request asks to certify.
pub fn request_public_key(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = pem_to_der_tagged(csr_pem, "CERTIFICATE REQUEST")?;
    use x509_parser::prelude::FromDer as _;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&der).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// The public key (SubjectPublicKeyInfo, DER) a certificate certifies.
pub fn cert_public_key(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

fn pem_to_der_tagged(pem: &str, tag: &str) -> Result<Vec<u8>, PkiError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Parse(e.to_string()))?;
    if block.label != tag {
        return Err(PkiError::Parse(format!("expected a PEM {tag}, found {}", block.label)));
    }
    Ok(block.contents)
}

/// Issues the coordinator's server certificate for the given DNS names and IP addresses.
pub fn issue_server(
    ca: &CertifiedKey,
    dns_names: &[String],
    ips: &[IpAddr],
    validity: Validity,
    serial: [u8; 16],
) -> Result<CertifiedKey, PkiError> {
    let issuer = issuer(ca)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(dns_names.first().map_or("fedward coordinator", String::as_str), "fedward");
    params.subject_alt_names = dns_names
        .iter()
        .map(|n| Ok(SanType::DnsName(n.clone().try_into()?)))
        .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
        .collect::<Result<_, rcgen::Error>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity, serial)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// At the hospital: generates the site's private key and a signing request naming the site.
pub fn site_request(site: &SiteId) -> Result<SiteRequest, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![site.as_str().to_owned()])?;
    params.distinguished_name = dn(site.as_str(), site.as_str());
    let csr = params.serialize_request(&key)?;
    Ok(SiteRequest { key_pem: key.serialize_pem(), csr_pem: csr.pem()? })
}

/// At the admin: checks that a request names exactly `site` and signs a client
/// certificate for it. Everything but the public key is set here, not taken from the CSR.
pub fn sign_site_request(
    ca: &CertifiedKey,
    csr_pem: &str,
    site: &SiteId,
    validity: Validity,
    serial: [u8; 16],
) -> Result<String, PkiError> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let names: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::DnsName(n) => n.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    if names.is_empty() {
        return Err(PkiError::NoSiteName);
    }
    if names != [site.as_str()] {
        return Err(PkiError::SiteMismatch { expected: site.to_string(), found: names.join(", ") });
    }
    let mut params = CertificateParams::new(vec![site.as_str().to_owned()])?;
    params.distinguished_name = dn(site.as_str(), site.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity, serial)?;
    csr.params = params;
    let issuer = issuer(ca)?;
    Ok(csr.signed_by(&issuer)?.pem())
}

/// What the site names in a signing request, for the admin to review before signing.
pub fn request_site_names(csr_pem: &str) -> Result<Vec<String>, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    Ok(csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::DnsName(n) => Some(n.as_str().to_owned()),
            _ => None,
        })
        .collect())
}

/// Summary of a certificate for admins and error messages.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub serial_hex: String,
}

/// Reads the subject, SANs and validity of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(PkiError::Parse(e.to_string())),
    };
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        serial_hex: cert.raw_serial_as_string(),
    })
}

/// The site a client certificate belongs to: its single DNS SAN, which must be a valid
/// site id. The identity comes only from the certificate, never from what a client says.
pub fn site_of_cert(der: &[u8]) -> Result<SiteId, PkiError> {
    let info = cert_info(der)?;
    match info.dns_names.as_slice() {
        [one] => SiteId::new(one.clone()).map_err(|e| PkiError::Parse(e.to_string())),
        [] => Err(PkiError::NoSiteName),
        many => Err(PkiError::Parse(format!("certificate names {} sites", many.len()))),
    }
}

/// Decodes the first certificate of a PEM string to DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec()).map_err(|e| PkiError::Parse(format!("{e:?}")))
}

/// A site certificate the CA signed, as `pki sign` records it in the CA directory's
/// `issued.jsonl`, so that `pki revoke --site` finds every certificate of a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IssuedCert {
    pub site: String,
    /// As [`CertInfo::serial_hex`] prints it (`aa:bb:...`).
    pub serial: String,
    pub not_after: String,
}

/// A revoked certificate, as `pki revoke` keeps it in the CA directory's `revoked.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevokedCert {
    pub serial: String,
    /// The site it was issued to, where known.
    pub site: Option<String>,
    pub revoked_at: String,
    /// `key-compromise`, `superseded`, `cessation-of-operation` or `unspecified`.
    pub reason: String,
}

/// The revocation reasons `pki revoke --reason` takes, as RFC 5280 names them.
pub const REVOCATION_REASONS: &[&str] = &["unspecified", "key-compromise", "superseded", "cessation-of-operation"];

/// The CRL, PEM, signed by the CA: every certificate in `revoked`, numbered `crl_number`
/// (each new list must have a higher one), issued `now` and announcing the next within
/// `next_days`. The coordinator does not treat an overdue list as void (a revocation
/// never expires); the date is for other verifiers.
pub fn build_crl(
    ca: &CertifiedKey,
    revoked: &[RevokedCert],
    crl_number: u64,
    now: OffsetDateTime,
    next_days: u32,
) -> Result<String, PkiError> {
    let revoked_certs = revoked
        .iter()
        .map(|r| {
            let reason_code = match r.reason.as_str() {
                "key-compromise" => RevocationReason::KeyCompromise,
                "superseded" => RevocationReason::Superseded,
                "cessation-of-operation" => RevocationReason::CessationOfOperation,
                _ => RevocationReason::Unspecified,
            };
            let revocation_time = OffsetDateTime::parse(&r.revoked_at, &time::format_description::well_known::Rfc3339)
                .map_err(|e| PkiError::Parse(format!("revocation time {:?}: {e}", r.revoked_at)))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial_bytes(&r.serial)?),
                revocation_time,
                reason_code: Some(reason_code),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(i64::from(next_days.max(1))),
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer(ca)?)?.pem()?)
}

/// The SHA-256 fingerprint of a DER certificate (what `openssl x509 -fingerprint -sha256`
/// prints), for pinning a site to one certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(der).into()
}

/// `AA:BB:...` (or plain hex, either case) as a fingerprint.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], PkiError> {
    let hex: String = text.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hex).map_err(|e| PkiError::Parse(format!("fingerprint {text:?}: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| PkiError::Parse(format!("fingerprint {text:?}: {} bytes, a SHA-256 has 32", b.len())))
}

/// A fingerprint as `pki show` prints it: upper-case hex pairs joined by colons.
pub fn format_fingerprint(f: &[u8; 32]) -> String {
    f.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The serial of a DER certificate, as bytes (as a CRL lists it).
pub fn serial_of_cert(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// The serials a PEM revocation list names (for closing live connections of revoked
/// certificates; the handshake check is rustls' own).
pub fn crl_serials(pem: &[u8]) -> Result<Vec<Vec<u8>>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    let mut serials = Vec::new();
    for der in rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| PkiError::Parse(format!("revocation list: {e:?}")))?;
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| PkiError::Parse(format!("revocation list: {e}")))?;
        serials.extend(crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()));
    }
    Ok(serials)
}

/// The bytes of a serial printed as `aa:bb:...` (or plain hex).
pub fn serial_bytes(serial: &str) -> Result<Vec<u8>, PkiError> {
    let hex: String = serial.chars().filter(|c| *c != ':').collect();
    hex::decode(&hex).map_err(|e| PkiError::Parse(format!("serial {serial:?}: {e}")))
}

fn issuer(ca: &CertifiedKey) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert_pem, key)?)
}

fn dn(common_name: &str, organisation: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organisation);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity, serial: [u8; 16]) -> Result<(), PkiError> {
    if validity.not_after <= validity.not_before {
        return Err(PkiError::Validity("not_after must be later than not_before".into()));
    }
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    // A positive serial: clear the top bit so DER does not read it as negative.
    let mut s = serial;
    s[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse_back() {
        let f = fingerprint(b"a certificate");
        let printed = format_fingerprint(&f);
        assert_eq!(printed.len(), 32 * 3 - 1);
        assert_eq!(parse_fingerprint(&printed).unwrap(), f);
        assert_eq!(parse_fingerprint(&format!("sha256:{}", printed.replace(':', "").to_lowercase())).unwrap(), f);
        assert!(parse_fingerprint("AB:CD").unwrap_err().to_string().contains("2 bytes"));
        assert!(parse_fingerprint("not hex").is_err());
    }

    #[test]
    fn a_crl_lists_the_revoked_serials_and_is_signed_by_the_ca() {
        let now = OffsetDateTime::now_utc();
        let ca = create_ca("test", Validity::days_from(now, 10), [1; 16]).unwrap();
        let revoked = |serial: &str| RevokedCert {
            serial: serial.into(),
            site: None,
            revoked_at: "2026-12-07T00:00:00Z".into(),
            reason: "key-compromise".into(),
        };
        let crl = build_crl(&ca, &[revoked("05:05:05"), revoked("0a0b")], 2, now, 30).unwrap();
        assert_eq!(crl_serials(crl.as_bytes()).unwrap(), [vec![5, 5, 5], vec![10, 11]]);
        assert!(build_crl(&ca, &[revoked("not hex")], 1, now, 30).is_err());
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_780_000_000).unwrap()
    }

    #[test]
    fn site_certificate_carries_the_site_and_only_it() {
        let ca = create_ca("test", Validity::days_from(now(), 30), [1; 16]).unwrap();
        let site = SiteId::new("st-marys").unwrap();
        let req = site_request(&site).unwrap();
        assert_eq!(request_site_names(&req.csr_pem).unwrap(), ["st-marys"]);
        let cert = sign_site_request(&ca, &req.csr_pem, &site, Validity::days_from(now(), 30), [2; 16]).unwrap();
        let der = pem_to_der(&cert).unwrap();
        assert_eq!(site_of_cert(&der).unwrap(), site);
        let info = cert_info(&der).unwrap();
        assert!(info.issuer.contains("test fedward CA"), "{}", info.issuer);
        assert_eq!(info.not_after, now() + Duration::days(30));
    }

    #[test]
    fn admin_refuses_a_request_for_another_site() {
        let ca = create_ca("test", Validity::days_from(now(), 30), [1; 16]).unwrap();
        let req = site_request(&SiteId::new("evil").unwrap()).unwrap();
        let err =
            sign_site_request(&ca, &req.csr_pem, &SiteId::new("st-marys").unwrap(), Validity::days_from(now(), 30), [2; 16]).unwrap_err();
        assert!(matches!(err, PkiError::SiteMismatch { .. }), "{err}");
    }

    #[test]
    fn server_certificate_names_hosts_and_ips() {
        let ca = create_ca("test", Validity::days_from(now(), 30), [1; 16]).unwrap();
        let server =
            issue_server(&ca, &["coordinator.example".into()], &["127.0.0.1".parse().unwrap()], Validity::days_from(now(), 30), [3; 16])
                .unwrap();
        let info = cert_info(&pem_to_der(&server.cert_pem).unwrap()).unwrap();
        assert_eq!(info.dns_names, ["coordinator.example"]);
        assert!(!format!("{server:?}").contains("PRIVATE"), "debug output must not show the key");
    }
}
