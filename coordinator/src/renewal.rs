//! Site certificate renewal at the coordinator, in the manner of kubelet's certificate
//! rotation: before its certificate expires, an agent makes a new key at the site and
//! sends a signing request over its authenticated connection; the online issuing CA (which
//! the offline root signed, `pki init`) signs it for the site the connection already is,
//! or, when the consortium wants a person in the loop (`[renewal] approval = true`), the
//! request waits for `pki approve` and the agent asks again.
//!
//! A request must name the connection's own site (the certificate says who the site is,
//! never a message); everything but the public key is set here. One site renews at most
//! once per [`MIN_INTERVAL`], so an enrolled site cannot fill the issued-certificate
//! register, and at most one request per site waits for approval.
//!
//! Files in `state_dir/renewals/`: `SITE.csr` (waiting), `SITE.crt` (approved chain), and
//! `issued.jsonl` (what this issuing CA signed, for `pki revoke`-style lookups by site).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedward_shared::config::Renewal;
use fedward_shared::fsutil;
use fedward_shared::pki::{self, CertifiedKey, IssuedCert, Validity};
use fedward_shared::wire::{SiteId, MAX_CSR_LEN};

/// The shortest time between two certificates issued to one site.
pub const MIN_INTERVAL: Duration = Duration::from_secs(600);
pub const RENEWALS_DIR: &str = "renewals";
pub const ISSUED_FILE: &str = "issued.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("the signing request is {0} bytes; at most {MAX_CSR_LEN}")]
    TooLarge(usize),
    #[error("the signing request cannot be signed: {0}")]
    Invalid(String),
    #[error("site {0} renewed less than 10 minutes ago")]
    TooSoon(SiteId),
    #[error("no request from site {0} is waiting for approval")]
    NothingPending(SiteId),
    #[error("renewal storage: {0}")]
    Storage(String),
}

/// The online issuing CA and its rules.
pub struct Issuer {
    ca: CertifiedKey,
    days: u32,
    approval: bool,
    dir: PathBuf,
    last: Mutex<HashMap<SiteId, Instant>>,
}

impl std::fmt::Debug for Issuer {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("days", &self.days).field("approval", &self.approval).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Issuer {
    /// Reads the issuing CA (its key must be 0600) named by `[renewal]`.
    pub fn load(cfg: &Renewal, state_dir: &Path) -> Result<Self, RenewalError> {
        let read = |p: &Path, private: bool| {
            let bytes = if private { fsutil::read_private_key(p) } else { fsutil::read(p) };
            bytes
                .map_err(|e| RenewalError::Storage(e.to_string()))
                .and_then(|b| String::from_utf8(b).map_err(|e| RenewalError::Storage(e.to_string())))
        };
        let ca = CertifiedKey { cert_pem: read(&cfg.issuing_cert, false)?, key_pem: read(&cfg.issuing_key, true)? };
        let dir = state_dir.join(RENEWALS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| RenewalError::Storage(format!("{}: {e}", dir.display())))?;
        Ok(Self { ca, days: cfg.days, approval: cfg.approval, dir, last: Mutex::default() })
    }

    pub fn needs_approval(&self) -> bool {
        self.approval
    }

    /// A site's request: `Some(chain)` issued now (or approved earlier), `None` waiting
    /// for an admin.
    pub fn request(&self, site: &SiteId, csr_pem: &str, now: time::OffsetDateTime) -> Result<Option<String>, RenewalError> {
        if csr_pem.len() > MAX_CSR_LEN {
            return Err(RenewalError::TooLarge(csr_pem.len()));
        }
        // Names exactly this site, and parses: checked before anything is stored.
        let names = pki::request_site_names(csr_pem).map_err(|e| RenewalError::Invalid(e.to_string()))?;
        if names != [site.as_str()] {
            return Err(RenewalError::Invalid(format!("it names {names:?}, not this connection's site {site}")));
        }
        let key = pki::request_public_key(csr_pem).map_err(|e| RenewalError::Invalid(e.to_string()))?;
        if self.approval {
            let approved = self.dir.join(format!("{site}.crt"));
            if let Ok(chain) = std::fs::read_to_string(&approved) {
                let der = pki::pem_to_der(&chain).map_err(|e| RenewalError::Storage(e.to_string()))?;
                if pki::cert_public_key(&der).map_err(|e| RenewalError::Storage(e.to_string()))? == key {
                    return Ok(Some(chain));
                }
            }
            // The newest request replaces an older one: one file per site at most.
            fsutil::atomic_write(&self.dir.join(format!("{site}.csr")), csr_pem.as_bytes(), false)
                .map_err(|e| RenewalError::Storage(e.to_string()))?;
            return Ok(None);
        }
        self.sign(site, csr_pem, now).map(Some)
    }

    /// Signs a request for `site` now (after the rate check), recording what was issued.
    fn sign(&self, site: &SiteId, csr_pem: &str, now: time::OffsetDateTime) -> Result<String, RenewalError> {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.get(site).is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
                return Err(RenewalError::TooSoon(site.clone()));
            }
            last.insert(site.clone(), Instant::now());
        }
        let cert = pki::sign_site_request(&self.ca, csr_pem, site, Validity::days_from(now, self.days), pki::random_serial())
            .map_err(|e| RenewalError::Invalid(e.to_string()))?;
        let info = pki::cert_info(&pki::pem_to_der(&cert).map_err(|e| RenewalError::Invalid(e.to_string()))?)
            .map_err(|e| RenewalError::Invalid(e.to_string()))?;
        let issued = IssuedCert { site: site.to_string(), serial: info.serial_hex, not_after: info.not_after.to_string() };
        fsutil::append_line(&self.dir.join(ISSUED_FILE), &serde_json::to_string(&issued).expect("serialisable"))
            .map_err(|e| RenewalError::Storage(e.to_string()))?;
        Ok(pki::site_chain(&cert, &self.ca.cert_pem))
    }

    /// The requests waiting for approval: site and the request's PEM.
    pub fn pending(&self) -> Result<Vec<(SiteId, String)>, RenewalError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| RenewalError::Storage(e.to_string()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(site) = name.strip_suffix(".csr").and_then(|s| SiteId::new(s).ok()) else { continue };
            let csr = std::fs::read_to_string(entry.path()).map_err(|e| RenewalError::Storage(e.to_string()))?;
            out.push((site, csr));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// An admin approves `site`'s waiting request: signed now; the agent collects it with
    /// its next request.
    pub fn approve(&self, site: &SiteId, now: time::OffsetDateTime) -> Result<String, RenewalError> {
        let pending = self.dir.join(format!("{site}.csr"));
        let csr = std::fs::read_to_string(&pending).map_err(|_| RenewalError::NothingPending(site.clone()))?;
        let chain = self.sign(site, &csr, now)?;
        fsutil::atomic_write(&self.dir.join(format!("{site}.crt")), chain.as_bytes(), false)
            .map_err(|e| RenewalError::Storage(e.to_string()))?;
        std::fs::remove_file(&pending).map_err(|e| RenewalError::Storage(e.to_string()))?;
        Ok(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(dir: &Path, approval: bool) -> Issuer {
        let now = time::OffsetDateTime::now_utc();
        let root = pki::create_ca("test", Validity::days_from(now, 10), [1; 16]).unwrap();
        let issuing = pki::create_issuing_ca(&root, "test", Validity::days_from(now, 5), [2; 16]).unwrap();
        std::fs::write(dir.join("issuing.crt"), &issuing.cert_pem).unwrap();
        fsutil::write_private_new(&dir.join("issuing.key"), issuing.key_pem.as_bytes()).unwrap();
        let cfg = Renewal { issuing_cert: dir.join("issuing.crt"), issuing_key: dir.join("issuing.key"), days: 30, approval };
        Issuer::load(&cfg, dir).unwrap()
    }

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    #[test]
    fn a_site_renews_only_itself_and_not_too_often() {
        let dir = tempfile::tempdir().unwrap();
        let i = issuer(dir.path(), false);
        let now = time::OffsetDateTime::now_utc();
        let other = pki::site_request(&site("beta")).unwrap();
        assert!(matches!(i.request(&site("alpha"), &other.csr_pem, now), Err(RenewalError::Invalid(_))));
        assert!(matches!(i.request(&site("alpha"), &"x".repeat(MAX_CSR_LEN + 1), now), Err(RenewalError::TooLarge(_))));
        let mine = pki::site_request(&site("alpha")).unwrap();
        let chain = i.request(&site("alpha"), &mine.csr_pem, now).unwrap().expect("signed at once");
        let leaf = pki::pem_to_der(&chain).unwrap();
        assert_eq!(pki::site_of_cert(&leaf).unwrap(), site("alpha"));
        assert_eq!(pki::cert_public_key(&leaf).unwrap(), pki::request_public_key(&mine.csr_pem).unwrap());
        let info = pki::cert_info(&leaf).unwrap();
        assert!(info.issuer.contains("issuing CA"), "{}", info.issuer);
        assert!(std::fs::read_to_string(dir.path().join(RENEWALS_DIR).join(ISSUED_FILE)).unwrap().contains(&info.serial_hex));
        assert!(matches!(i.request(&site("alpha"), &mine.csr_pem, now), Err(RenewalError::TooSoon(_))));
    }

    #[test]
    fn with_approval_a_request_waits_for_the_admin() {
        let dir = tempfile::tempdir().unwrap();
        let i = issuer(dir.path(), true);
        let now = time::OffsetDateTime::now_utc();
        let mine = pki::site_request(&site("alpha")).unwrap();
        assert_eq!(i.request(&site("alpha"), &mine.csr_pem, now).unwrap(), None);
        assert_eq!(i.pending().unwrap().iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["alpha"]);
        assert!(matches!(i.approve(&site("beta"), now), Err(RenewalError::NothingPending(_))));
        let approved = i.approve(&site("alpha"), now).unwrap();
        assert!(i.pending().unwrap().is_empty());
        // The same request now collects the certificate; another key does not.
        assert_eq!(i.request(&site("alpha"), &mine.csr_pem, now).unwrap(), Some(approved));
        let other_key = pki::site_request(&site("alpha")).unwrap();
        assert_eq!(i.request(&site("alpha"), &other_key.csr_pem, now).unwrap(), None);
    }
}
