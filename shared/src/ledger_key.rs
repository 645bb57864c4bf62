//! The coordinator's ledger signing key and the public key auditors verify seals with.
//!
//! Both files are text: `#` comment lines, then one line of hex (the 32-byte ed25519 seed
//! for `ledger.key`, the 32-byte public key for `ledger.pub`). The public file's comment
//! names the key id ([`crate::ledger::key_id`]) that every seal carries, so an auditor can
//! match a key to a ledger by eye. The private file is written 0600 and refused when
//! others can read it ([`crate::fsutil::read_private_key`]).
//!
//! Parsing and formatting are pure; [`write_keypair`] and the `read_*` functions are the
//! thin file shell. Key generation takes the seed from the caller (the binary draws it
//! from the OS), like every other source of entropy.

use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::fsutil::{self, FsError};
use crate::ledger::key_id;

/// File name of the signing key that `keygen` writes.
pub const SIGNING_KEY_FILE: &str = "ledger.key";
/// File name of the public key auditors get.
pub const PUBLIC_KEY_FILE: &str = "ledger.pub";

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The text of a `ledger.key` file.
pub fn format_signing_key(key: &SigningKey) -> String {
    format!(
        "# fedward ledger signing key (ed25519 seed); keep it private (mode 0600)\n# key id {}\n{}\n",
        key_id(&key.verifying_key()),
        hex::encode(key.to_bytes())
    )
}

/// The text of a `ledger.pub` file.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!(
        "# fedward ledger public key (ed25519); seals in the coordinator's ledger name key id {}\n{}\n",
        key_id(key),
        hex::encode(key.as_bytes())
    )
}

/// Parses a `ledger.key` file's text.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, String> {
    Ok(SigningKey::from_bytes(&key_bytes(text)?))
}

/// Parses a `ledger.pub` file's text.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_bytes(&key_bytes(text)?).map_err(|e| format!("not an ed25519 public key: {e}"))
}

fn key_bytes(text: &str) -> Result<[u8; 32], String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines.next().ok_or("no key line (expected 64 hex digits)")?;
    if lines.next().is_some() {
        return Err("more than one key line".into());
    }
    let bytes = hex::decode(line).map_err(|e| format!("key is not hex: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("key has {} bytes, expected 32", b.len()))
}

/// Writes `ledger.key` (0600) and `ledger.pub` for the key made from `seed` into `dir`;
/// refuses to overwrite either. Returns their paths.
pub fn write_keypair(dir: &Path, seed: [u8; 32]) -> Result<(PathBuf, PathBuf), KeyFileError> {
    let key = SigningKey::from_bytes(&seed);
    let (private, public) = (dir.join(SIGNING_KEY_FILE), dir.join(PUBLIC_KEY_FILE));
    if public.exists() {
        return Err(FsError::Exists { path: public }.into());
    }
    fsutil::write_private_new(&private, format_signing_key(&key).as_bytes())?;
    fsutil::write_public_new(&public, format_public_key(&key.verifying_key()).as_bytes())?;
    Ok((private, public))
}

/// Reads a signing key, refusing a file that others can read.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let bytes = fsutil::read_private_key(path)?;
    let text = String::from_utf8(bytes).map_err(|_| invalid(path, "not text".into()))?;
    parse_signing_key(&text).map_err(|m| invalid(path, m))
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    let text = String::from_utf8(fsutil::read(path)?).map_err(|_| invalid(path, "not text".into()))?;
    parse_public_key(&text).map_err(|m| invalid(path, m))
}

fn invalid(path: &Path, message: String) -> KeyFileError {
    KeyFileError::Invalid { path: path.to_owned(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = write_keypair(dir.path(), [5; 32]).unwrap();
        let key = read_signing_key(&private).unwrap();
        assert_eq!(key.to_bytes(), [5; 32]);
        assert_eq!(read_public_key(&public).unwrap(), key.verifying_key());
        let text = std::fs::read_to_string(&public).unwrap();
        assert!(text.contains(&key_id(&key.verifying_key())), "{text}");
        assert!(matches!(write_keypair(dir.path(), [6; 32]), Err(KeyFileError::Fs(FsError::Exists { .. }))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn malformed_keys_are_explained() {
        assert!(parse_public_key("# only a comment\n").unwrap_err().contains("no key line"));
        assert!(parse_public_key("abcd\n").unwrap_err().contains("2 bytes"));
        assert!(parse_public_key("zz\n").unwrap_err().contains("not hex"));
        assert!(parse_signing_key(&format!("{}\n{}\n", "00".repeat(32), "11".repeat(32))).is_err());
    }
}
