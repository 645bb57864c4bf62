//! The identifiers every layer names: a site (`SiteId`, a certificate's DNS SAN) and a
//! round (`RoundId`), and the protocol's ALPN id. Below `wire`, `pki`, `tls` and
//! `secagg`, which all use them, so none of those has to use another for a name.

use serde::{Deserialize, Serialize};

/// ALPN protocol id; a peer speaking anything else fails the TLS handshake.
pub const ALPN: &[u8] = b"fedward/1";

/// A consortium member's identity, taken from its certificate's DNS SAN.
///
/// Lowercase ASCII letters, digits and `-`, 1 to 63 characters, starting with a letter or
/// digit: a valid DNS label, so it fits a certificate unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SiteId(pub(crate) String);

/// A site id that is not a DNS label.
#[derive(Debug, thiserror::Error)]
#[error("invalid site id {0:?}: use 1-63 lowercase letters, digits or '-', not starting with '-'")]
pub struct SiteIdError(pub String);

impl SiteId {
    pub fn new(id: impl Into<String>) -> Result<Self, SiteIdError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 63
            && !id.starts_with('-')
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(id))
        } else {
            Err(SiteIdError(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SiteId {
    type Error = SiteIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SiteId> for String {
    fn from(s: SiteId) -> Self {
        s.0
    }
}

impl std::str::FromStr for SiteId {
    type Err = SiteIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl std::fmt::Display for SiteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A federated round's number; round 1 is the first trained round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoundId(pub u64);

impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
