//! The site's side of certificate renewal: a new key made here (it never leaves the site),
//! a signing request for it, and the new certificate installed in place of the old one so
//! that a crash at any point leaves a certificate and key that belong together.
//!
//! While a request waits (for an admin's approval, or a coordinator that was away), its key
//! and request stay in the state directory (`renewal.key`, 0600, and `renewal.csr`) and the
//! same request is sent again: an approved certificate is for that key.
//!
//! Installing: `KEY.new` and `CERT.new` are written and fsynced beside the configured
//! files, then `KEY.new` is renamed over the key and `CERT.new` over the certificate.
//! [`finish_interrupted_install`], at start, completes a rename the crash cut off (a
//! `CERT.new` means both new files were whole) or drops a lone `KEY.new`.

use std::path::{Path, PathBuf};

use fedward_shared::fsutil;
use fedward_shared::pki;
use fedward_shared::wire::SiteId;

const PENDING_KEY: &str = "renewal.key";
const PENDING_CSR: &str = "renewal.csr";

/// Where the agent's certificate and key live (the config's `[tls] cert` and `key`) and
/// the CA that must have issued what it installs.
#[derive(Clone, Debug)]
pub struct RenewalFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_pem: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("{0}")]
    Fs(#[from] fsutil::FsError),
    #[error("the renewed certificate is not usable: {0}")]
    Unusable(String),
    #[error("could not make a key and signing request: {0}")]
    Request(String),
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// The key and request to send: the waiting ones, or new ones made now.
pub fn pending_request(state_dir: &Path, site: &SiteId) -> Result<(String, String), RenewError> {
    let key_path = state_dir.join(PENDING_KEY);
    let csr_path = state_dir.join(PENDING_CSR);
    if key_path.exists() && csr_path.exists() {
        let key = String::from_utf8(fsutil::read_private_key(&key_path)?).map_err(|e| RenewError::Request(e.to_string()))?;
        let csr = String::from_utf8(fsutil::read(&csr_path)?).map_err(|e| RenewError::Request(e.to_string()))?;
        return Ok((key, csr));
    }
    let request = pki::site_request(site).map_err(|e| RenewError::Request(e.to_string()))?;
    fsutil::atomic_write(&key_path, request.key_pem.as_bytes(), true)?;
    fsutil::atomic_write(&csr_path, request.csr_pem.as_bytes(), false)?;
    Ok((request.key_pem, request.csr_pem))
}

/// Checks the chain the coordinator sent (for this site, for this key, valid now, and
/// chaining to the consortium CA as a client certificate) and installs it with the key.
/// Returns the new certificate's serial and expiry.
pub fn install(
    files: &RenewalFiles,
    state_dir: &Path,
    site: &SiteId,
    key_pem: &str,
    chain_pem: &str,
) -> Result<(String, String), RenewError> {
    let unusable = |e: &dyn std::fmt::Display| RenewError::Unusable(e.to_string());
    let leaf = pki::pem_to_der(chain_pem).map_err(|e| unusable(&e))?;
    if pki::site_of_cert(&leaf).map_err(|e| unusable(&e))? != *site {
        return Err(RenewError::Unusable(format!("it does not name site {site}")));
    }
    let material = fedward_shared::tls::TlsMaterial { ca_pem: &files.ca_pem, cert_pem: chain_pem.as_bytes(), key_pem: key_pem.as_bytes() };
    // Refuses a key that is not the certificate's.
    fedward_shared::tls::client_config(&material).map_err(|e| unusable(&e))?;
    fedward_shared::tls::check_certificate(&material, fedward_shared::tls::Role::Site, rustls::pki_types::UnixTime::now())
        .map_err(|e| unusable(&e))?;
    let key_new = with_suffix(&files.key, ".new");
    let cert_new = with_suffix(&files.cert, ".new");
    fsutil::atomic_write(&key_new, key_pem.as_bytes(), true)?;
    fsutil::atomic_write(&cert_new, chain_pem.as_bytes(), false)?;
    rename(&key_new, &files.key)?;
    rename(&cert_new, &files.cert)?;
    let _ = std::fs::remove_file(state_dir.join(PENDING_KEY));
    let _ = std::fs::remove_file(state_dir.join(PENDING_CSR));
    let info = pki::cert_info(&leaf).map_err(|e| unusable(&e))?;
    Ok((info.serial_hex, info.not_after.to_string()))
}

fn rename(from: &Path, to: &Path) -> Result<(), RenewError> {
    std::fs::rename(from, to).map_err(|e| fsutil::FsError::Io { path: to.to_owned(), error: e })?;
    if let Some(dir) = to.parent() {
        fsutil::sync_dir(dir)?;
    }
    Ok(())
}

/// At start: completes an install a crash interrupted; whether one was.
pub fn finish_interrupted_install(cert: &Path, key: &Path) -> Result<bool, RenewError> {
    let key_new = with_suffix(key, ".new");
    let cert_new = with_suffix(cert, ".new");
    if cert_new.exists() {
        if key_new.exists() {
            rename(&key_new, key)?;
        }
        rename(&cert_new, cert)?;
        return Ok(true);
    }
    if key_new.exists() {
        // The certificate was never written: the old pair is whole.
        std::fs::remove_file(&key_new).map_err(|e| fsutil::FsError::Io { path: key_new.clone(), error: e })?;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedward_shared::pki::{CertifiedKey, Validity};

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    struct Setup {
        dir: tempfile::TempDir,
        root: CertifiedKey,
        issuing: CertifiedKey,
        files: RenewalFiles,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let root = pki::create_ca("t", Validity::days_from(now, 10), [1; 16]).unwrap();
        let issuing = pki::create_issuing_ca(&root, "t", Validity::days_from(now, 5), [2; 16]).unwrap();
        let first = pki::site_request(&site("alpha")).unwrap();
        let cert = pki::sign_site_request(&root, &first.csr_pem, &site("alpha"), Validity::days_from(now, 1), [3; 16]).unwrap();
        let files = RenewalFiles {
            cert: dir.path().join("site.crt"),
            key: dir.path().join("site.key"),
            ca_pem: root.cert_pem.clone().into_bytes(),
        };
        std::fs::write(&files.cert, cert).unwrap();
        fsutil::write_private_new(&files.key, first.key_pem.as_bytes()).unwrap();
        Setup { dir, root, issuing, files }
    }

    #[test]
    fn a_renewed_chain_is_checked_then_installed_and_the_request_reused_until_then() {
        let s = setup();
        let state = s.dir.path();
        let (key, csr) = pending_request(state, &site("alpha")).unwrap();
        assert_eq!(pending_request(state, &site("alpha")).unwrap(), (key.clone(), csr.clone()), "the waiting request is sent again");
        let now = time::OffsetDateTime::now_utc();
        let leaf = pki::sign_site_request(&s.issuing, &csr, &site("alpha"), Validity::days_from(now, 30), [4; 16]).unwrap();
        let chain = pki::site_chain(&leaf, &s.issuing.cert_pem);
        // Not for this site, or not for this key: refused, nothing replaced.
        let before = std::fs::read(&s.files.cert).unwrap();
        assert!(install(&s.files, state, &site("beta"), &key, &chain).is_err());
        let other = pki::site_request(&site("alpha")).unwrap();
        assert!(install(&s.files, state, &site("alpha"), &other.key_pem, &chain).is_err());
        // Without the issuing CA's certificate, it does not chain to the root.
        assert!(install(&s.files, state, &site("alpha"), &key, &leaf).is_err());
        assert_eq!(std::fs::read(&s.files.cert).unwrap(), before);
        let (serial, _) = install(&s.files, state, &site("alpha"), &key, &chain).unwrap();
        assert_eq!(std::fs::read_to_string(&s.files.key).unwrap(), key);
        let installed = pki::cert_info(&pki::pem_to_der(&std::fs::read_to_string(&s.files.cert).unwrap()).unwrap()).unwrap();
        assert_eq!(installed.serial_hex, serial);
        assert!(!state.join(PENDING_KEY).exists(), "a new renewal makes a new key");
        let _ = &s.root;
    }

    #[test]
    fn an_interrupted_install_is_completed_or_dropped_at_start() {
        let s = setup();
        let (cert, key) = (&s.files.cert, &s.files.key);
        assert!(!finish_interrupted_install(cert, key).unwrap());
        // Crash after both new files were written, before any rename.
        std::fs::write(with_suffix(key, ".new"), "NEWKEY").unwrap();
        std::fs::write(with_suffix(cert, ".new"), "NEWCERT").unwrap();
        assert!(finish_interrupted_install(cert, key).unwrap());
        assert_eq!(std::fs::read_to_string(key).unwrap(), "NEWKEY");
        assert_eq!(std::fs::read_to_string(cert).unwrap(), "NEWCERT");
        // Crash after the key's rename: the certificate follows.
        std::fs::write(with_suffix(cert, ".new"), "NEWER").unwrap();
        assert!(finish_interrupted_install(cert, key).unwrap());
        assert_eq!(std::fs::read_to_string(cert).unwrap(), "NEWER");
        // A lone new key: the certificate was never written; the old pair stays.
        std::fs::write(with_suffix(key, ".new"), "HALF").unwrap();
        assert!(!finish_interrupted_install(cert, key).unwrap());
        assert_eq!(std::fs::read_to_string(key).unwrap(), "NEWKEY");
        assert!(!with_suffix(key, ".new").exists());
    }
}
