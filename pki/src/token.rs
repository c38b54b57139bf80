//! Join tokens: how a new node proves, once, that an operator invited it.
//!
//! Plaintext form: `hajt_<id>_<secret>`, `<id>` being `[a-z0-9-]{1,32}` (the catalog key) and
//! `<secret>` 32 random bytes as 64 lowercase hex digits. The plaintext is shown to the operator
//! once and never stored: the catalog keeps the [`TokenHash`] (SHA-256 of the whole plaintext,
//! which binds the id to the secret), the expiry and whether it was used. Single use and expiry
//! are the catalog's job; this module generates, parses and verifies. Verification compares
//! hashes in constant time so a caller cannot learn a stored hash byte by byte.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "hajt_";
const SECRET_LEN: usize = 32;
const MAX_ID_LEN: usize = 32;

/// Errors parsing a token or its stored hash. Deliberately vague about which part is wrong
/// beyond its shape: the plaintext is a secret and is never echoed back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("invalid token id {0:?}: expected [a-z0-9-]{{1,32}}")]
    InvalidId(String),
    #[error("malformed join token: expected hajt_<id>_<64 hex digits>")]
    Malformed,
    #[error("malformed token hash: expected 64 hex digits")]
    MalformedHash,
}

/// SHA-256 of a token's plaintext, as stored in the catalog. Displayed and parsed as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

impl FromStr for TokenHash {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| TokenError::MalformedHash)?;
        Ok(Self(bytes))
    }
}

/// A parsed join token (id plus secret). Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct JoinToken {
    id: String,
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn validate_id(id: &str) -> Result<(), TokenError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidId(id.to_owned()))
    }
}

impl JoinToken {
    /// Creates a token with a fresh random secret. Returns the plaintext (to show once) and the
    /// hash (to store).
    pub fn generate(id: &str) -> Result<(String, TokenHash), TokenError> {
        validate_id(id)?;
        let mut secret = [0u8; SECRET_LEN];
        rand::rng().fill_bytes(&mut secret);
        let token = JoinToken {
            id: id.to_owned(),
            secret,
        };
        Ok((token.plaintext(), token.hash()))
    }

    /// Parses a presented token. Only the canonical form (lowercase hex) is accepted, so one
    /// secret has exactly one plaintext and one hash.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let rest = s.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (id, secret_hex) = rest.split_once('_').ok_or(TokenError::Malformed)?;
        validate_id(id).map_err(|_| TokenError::Malformed)?;
        if secret_hex.len() != SECRET_LEN * 2
            || !secret_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(TokenError::Malformed);
        }
        let mut secret = [0u8; SECRET_LEN];
        hex::decode_to_slice(secret_hex, &mut secret).map_err(|_| TokenError::Malformed)?;
        Ok(Self {
            id: id.to_owned(),
            secret,
        })
    }

    /// The catalog key of this token.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.plaintext().as_bytes()).into())
    }

    /// Whether this token is the one whose hash was stored, in constant time.
    pub fn verify(&self, stored: &TokenHash) -> bool {
        self.hash().0.ct_eq(&stored.0).into()
    }

    fn plaintext(&self) -> String {
        format!("{PREFIX}{}_{}", self.id, hex::encode(self.secret))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_token_parses_and_verifies() {
        let (plain, hash) = JoinToken::generate("e1-join").unwrap();
        assert!(plain.starts_with("hajt_e1-join_"));
        let token = JoinToken::parse(&plain).unwrap();
        assert_eq!(token.id(), "e1-join");
        assert!(token.verify(&hash));
        assert_eq!(hash.to_string().parse::<TokenHash>().unwrap(), hash);
        assert!(!format!("{token:?}").contains(&plain[13..]));
    }

    #[test]
    fn forged_tokens_do_not_verify() {
        let (plain, hash) = JoinToken::generate("t1").unwrap();
        // Same id, one secret digit changed.
        let mut forged = plain.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
        let forged = JoinToken::parse(std::str::from_utf8(&forged).unwrap()).unwrap();
        assert!(!forged.verify(&hash));
        // Same secret under another id.
        let moved = plain.replacen("hajt_t1_", "hajt_t2_", 1);
        assert!(!JoinToken::parse(&moved).unwrap().verify(&hash));
        // Another genuine token.
        let (other, _) = JoinToken::generate("t1").unwrap();
        assert!(!JoinToken::parse(&other).unwrap().verify(&hash));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let secret = "ab".repeat(SECRET_LEN);
        for bad in [
            String::new(),
            format!("hajt__{secret}"),
            format!("hajx_t1_{secret}"),
            format!("hajt_t1{secret}"),
            format!("hajt_t1_{}", &secret[1..]),
            format!("hajt_t1_{secret}0"),
            format!("hajt_t1_{}", secret.to_uppercase()),
            format!("hajt_T1_{secret}"),
            format!("hajt_t_1_{secret}"),
            format!("hajt_t1_{}zz", &secret[2..]),
        ] {
            assert_eq!(
                JoinToken::parse(&bad).unwrap_err(),
                TokenError::Malformed,
                "{bad}"
            );
        }
        assert!(JoinToken::parse(&format!("hajt_t1_{secret}")).is_ok());
        assert!(JoinToken::generate("Bad_Id").is_err());
        assert!("xyz".parse::<TokenHash>().is_err());
    }
}
