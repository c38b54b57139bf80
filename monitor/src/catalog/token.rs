//! Join tokens: single-use, expiring secrets that let a new node register once.
//!
//! A token reads `hajt_<id>_<secret>`: `id` is 16 lowercase hex digits (it never contains `_`,
//! so the first `_` after the prefix ends it) and `secret` is 32 random bytes in unpadded
//! base64url. The catalog stores only the SHA-256 of the secret, so the Raft log, snapshots and
//! event history never hold a usable token; the plaintext is shown once to the operator.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};

const PREFIX: &str = "hajt_";

/// A freshly generated token: the plaintext for the operator, the id and hash for the catalog.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub plaintext: String,
    pub id: String,
    pub secret_sha256_hex: String,
}

/// Draws a new token from the operating system's CSPRNG (`rand::rng()` reseeds from it).
/// Called by the leader before proposing `Op::CreateToken`: randomness never enters `apply`.
pub fn generate() -> NewToken {
    let mut rng = rand::rng();
    let id = hex::encode(rng.random::<[u8; 8]>());
    let secret = URL_SAFE_NO_PAD.encode(rng.random::<[u8; 32]>());
    NewToken {
        plaintext: format!("{PREFIX}{id}_{secret}"),
        secret_sha256_hex: hash_secret(&secret),
        id,
    }
}

/// Splits a plaintext token into (id, secret) without judging whether it is known.
pub(crate) fn parse(plaintext: &str) -> Option<(&str, &str)> {
    let rest = plaintext.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (id_ok && !secret.is_empty()).then_some((id, secret))
}

pub(crate) fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes in time independent of where they differ, so response timing does not
/// reveal how much of a guessed secret was right.
pub(crate) fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_tokens_parse_and_hash() {
        let t = generate();
        let (id, secret) = parse(&t.plaintext).unwrap();
        assert_eq!(id, t.id);
        assert_eq!(secret.len(), 43, "32 bytes in unpadded base64url");
        assert!(hashes_equal(&hash_secret(secret), &t.secret_sha256_hex));
        assert_ne!(generate().plaintext, t.plaintext);
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        for bad in [
            "",
            "hajt_",
            "hajt_abc_def",
            "x_0123456789abcdef_s",
            "hajt_0123456789abcdef_",
            "hajt_0123456789ABCDEF_s",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        assert_eq!(
            parse("hajt_0123456789abcdef_a_b-c"),
            Some(("0123456789abcdef", "a_b-c"))
        );
    }
}
