//! Who may use the coordinator's admin endpoints, and the record of what they did.
//!
//! **Bearer tokens, not admin client certificates.** The consortium's CA is offline and
//! signs only sites and the coordinator; a token per person is issued and withdrawn by
//! the coordinator's own admin (`fedward-coordinator admin token add`) without touching
//! that CA, it works from `curl`, a browser's login prompt (HTTP Basic, the token as the
//! password) and a Prometheus scrape alike, and it is the model Vault and Kubernetes
//! service accounts use. The coordinator stores only the SHA-256 of each token, in a file
//! it refuses to read unless it is 0600; a stolen tokens file gives no usable credential.
//! Tokens cross the network only inside TLS: the coordinator serves its admin endpoints
//! over HTTPS (its own certificate) whenever they listen on anything but loopback.
//!
//! Two roles, in the manner of Kubernetes RBAC's built-in `admin` and `view`:
//! [`Role::Auditor`] reads (status, history, the coordinator's ledger and public key, the
//! admin audit log); [`Role::Admin`] also controls the federation (pause, resume, next
//! round now, enrol, suspend, revoke). Every control request, allowed or refused, is a line
//! of the append-only, hash-chained [`AuditEntry`] log.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// What a token holder may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything the admin endpoints show; changes nothing.
    Auditor,
    /// Reads, and controls the federation.
    Admin,
}

impl Role {
    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auditor" => Ok(Role::Auditor),
            "admin" => Ok(Role::Admin),
            other => Err(AccessError::UnknownRole(other.chars().take(32).collect())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("unknown role {0:?} (auditor or admin)")]
    UnknownRole(String),
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("a holder name must be 1-64 characters of letters, digits, '.', '_', '-' or '@'")]
    BadName,
    #[error("{0} already holds a token; remove it first")]
    Duplicate(String),
}

/// One holder: a name (who, in the audit log), a role, and the SHA-256 of the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHolder {
    pub name: String,
    pub role: Role,
    pub token_sha256: [u8; 32],
}

/// The tokens file: one holder per line, `name role sha256-hex`; `#` starts a comment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    holders: Vec<TokenHolder>,
}

/// What a token looks like: a prefix that secret scanners can match, then 256 random bits.
pub const TOKEN_PREFIX: &str = "fwt_";

impl Tokens {
    pub fn parse(text: &str) -> Result<Self, AccessError> {
        let mut tokens = Tokens::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: &str| AccessError::BadLine { line: i + 1, reason: reason.to_owned() };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, hash] = fields[..] else { return Err(bad("expected `name role sha256-hex`")) };
            check_name(name).map_err(|_| bad("the holder name must be 1-64 of [A-Za-z0-9._@-]"))?;
            let role: Role = role.parse().map_err(|_| bad("the role must be auditor or admin"))?;
            let mut token_sha256 = [0u8; 32];
            hex::decode_to_slice(hash, &mut token_sha256).map_err(|_| bad("the hash must be 64 hex digits (SHA-256)"))?;
            if tokens.holders.iter().any(|h| h.name == name) {
                return Err(bad("this name is listed twice"));
            }
            tokens.holders.push(TokenHolder { name: name.to_owned(), role, token_sha256 });
        }
        Ok(tokens)
    }

    /// Reads a tokens file, which must be 0600 (only hashes are in it, but who may control
    /// the federation is not for every local user to read or change).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let bytes = crate::fsutil::read_private_key(path).map_err(|e| e.to_string())?;
        let text = String::from_utf8(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn render(&self) -> String {
        let mut out = String::from("# fedward admin tokens: name role sha256(token). Keep 0600; the tokens themselves are not stored.\n");
        for h in &self.holders {
            out.push_str(&format!("{} {} {}\n", h.name, h.role, hex::encode(h.token_sha256)));
        }
        out
    }

    pub fn holders(&self) -> &[TokenHolder] {
        &self.holders
    }

    /// Adds a holder for `token` (made by the caller from the OS's RNG).
    pub fn add(&mut self, name: &str, role: Role, token: &str) -> Result<(), AccessError> {
        check_name(name)?;
        if self.holders.iter().any(|h| h.name == name) {
            return Err(AccessError::Duplicate(name.to_owned()));
        }
        self.holders.push(TokenHolder { name: name.to_owned(), role, token_sha256: Sha256::digest(token.as_bytes()).into() });
        Ok(())
    }

    /// Removes a holder; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.holders.len();
        self.holders.retain(|h| h.name != name);
        self.holders.len() != before
    }

    /// The holder of `token`. Only hashes are compared: a timing difference tells an
    /// attacker how many leading bytes of SHA-256 they matched, which does not help them
    /// find a token.
    pub fn authenticate(&self, token: &str) -> Option<&TokenHolder> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.holders.iter().find(|h| h.token_sha256 == hash)
    }
}

fn check_name(name: &str) -> Result<(), AccessError> {
    let ok = (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AccessError::BadName)
    }
}

/// Whether an HTTP `Host` header names this machine (`localhost`, `127.0.0.1`, `[::1]`,
/// with or without a port). A server on loopback answers only such requests, so that a
/// web page cannot reach it through a name it rebinds to 127.0.0.1 (DNS rebinding).
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The token an HTTP `Authorization` header carries: `Bearer T`, or `Basic` with `T` as
/// the password (what a browser's login prompt sends; the user name is ignored).
pub fn token_from_authorization(header: &str) -> Option<String> {
    let (scheme, value) = header.trim().split_once(' ')?;
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, password)| password.to_owned());
    }
    None
}

/// One line of the admin audit log: who asked for what, when, and what came of it. Each
/// line carries the SHA-256 of the previous line, so a line removed or edited breaks the
/// chain ([`verify_chain`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: String,
    /// The token holder's name, or `-` when no valid token was presented.
    pub who: String,
    pub role: Option<Role>,
    /// `pause`, `resume`, `next-round`, `enrol`, `suspend`, `revoke`, ...
    pub action: String,
    /// The site or serial acted on, when there is one.
    pub target: Option<String>,
    /// `done`, or why not (`refused: ...`, `failed: ...`).
    pub outcome: String,
    /// SHA-256 (hex) of the previous line as written, or 64 zeros for the first.
    pub prev: String,
}

pub const CHAIN_START: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash the next line's `prev` must carry after `line` (without its newline).
pub fn chain_hash(line: &str) -> String {
    hex::encode(Sha256::digest(line.as_bytes()))
}

/// Checks an audit log's chain; returns the number of entries and the `prev` the next
/// entry must carry.
pub fn verify_chain(text: &str) -> Result<(u64, String), AccessError> {
    let mut prev = CHAIN_START.to_owned();
    let mut count = 0u64;
    for (i, line) in text.lines().enumerate() {
        let bad = |reason: String| AccessError::BadLine { line: i + 1, reason };
        let entry: AuditEntry = serde_json::from_str(line).map_err(|e| bad(format!("not an audit entry: {e}")))?;
        if entry.prev != prev {
            return Err(bad("the chain is broken: a line before this one was changed or removed".into()));
        }
        if entry.seq != count {
            return Err(bad(format!("sequence {} where {count} was due", entry.seq)));
        }
        prev = chain_hash(line);
        count += 1;
    }
    Ok((count, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_authenticate_by_hash_only() {
        let mut t = Tokens::default();
        t.add("alice", Role::Admin, "fwt_secret-a").unwrap();
        t.add("audit.office", Role::Auditor, "fwt_secret-b").unwrap();
        let text = t.render();
        assert!(!text.contains("secret"), "the file holds hashes, not tokens");
        let back = Tokens::parse(&text).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.authenticate("fwt_secret-a").map(|h| (h.name.as_str(), h.role)), Some(("alice", Role::Admin)));
        assert_eq!(back.authenticate("fwt_secret-b").map(|h| h.role), Some(Role::Auditor));
        assert!(back.authenticate("fwt_secret-c").is_none());
        assert!(back.authenticate("").is_none());
        assert!(matches!(t.add("alice", Role::Auditor, "x"), Err(AccessError::Duplicate(_))));
        assert!(t.remove("alice") && !t.remove("alice"));
    }

    #[test]
    fn bad_token_files_name_the_line() {
        for text in ["alice admin", "alice root 00", "al ice admin 00", &format!("alice admin {}", "zz".repeat(32))] {
            assert!(matches!(Tokens::parse(text), Err(AccessError::BadLine { line: 1, .. })), "{text}");
        }
        let twice = format!("a admin {h}\na auditor {h}\n", h = "00".repeat(32));
        assert!(matches!(Tokens::parse(&twice), Err(AccessError::BadLine { line: 2, .. })));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Auditor) && Role::Admin.allows(Role::Admin));
        assert!(Role::Auditor.allows(Role::Auditor) && !Role::Auditor.allows(Role::Admin));
    }

    #[test]
    fn authorization_headers() {
        assert_eq!(token_from_authorization("Bearer fwt_x").as_deref(), Some("fwt_x"));
        // base64("anyone:fwt_y")
        assert_eq!(token_from_authorization("Basic YW55b25lOmZ3dF95").as_deref(), Some("fwt_y"));
        assert_eq!(token_from_authorization("Digest abc"), None);
        assert_eq!(token_from_authorization("Basic !!!"), None);
    }

    #[test]
    fn an_edited_audit_log_breaks_the_chain() {
        let mut text = String::new();
        let mut prev = CHAIN_START.to_owned();
        for (seq, action) in ["pause", "resume", "next-round"].iter().enumerate() {
            let e = AuditEntry {
                seq: seq as u64,
                at: "2026-12-07T10:00:00Z".into(),
                who: "alice".into(),
                role: Some(Role::Admin),
                action: (*action).into(),
                target: None,
                outcome: "done".into(),
                prev: prev.clone(),
            };
            let line = serde_json::to_string(&e).unwrap();
            prev = chain_hash(&line);
            text.push_str(&line);
            text.push('\n');
        }
        assert_eq!(verify_chain(&text).unwrap(), (3, prev));
        let edited = text.replacen("\"resume\"", "\"pause\"", 1);
        assert!(matches!(verify_chain(&edited), Err(AccessError::BadLine { line: 3, .. })));
        let dropped: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert!(matches!(verify_chain(&dropped), Err(AccessError::BadLine { line: 1, .. })));
    }
}
