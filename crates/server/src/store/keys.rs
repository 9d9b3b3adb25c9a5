//! Session keys: generated with 256 bits of entropy, stored and compared only as
//! `sha256:<hex>`. A key never appears in `Debug` output or logs.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The stored form of a session key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Even the hash stays out of logs: legacy keys such as '1' are guessable, and a
        // hash of a guessable key is as good as the key for an attacker who reads logs.
        f.write_str("KeyHash(..)")
    }
}

/// The stored form of `key`.
pub fn hash_key(key: &str) -> KeyHash {
    let digest = Sha256::digest(key.as_bytes());
    KeyHash(format!("sha256:{}", hex::encode(digest)))
}

/// A new random key: 32 random bytes, URL-safe base64 without padding (43 characters),
/// never starting with `-` (a key is often passed on a command line, where `-x…` would
/// read as an option: `wschat load --session-key -x…`).
pub fn generate_key() -> String {
    loop {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        if !key.starts_with('-') {
            return key;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_key("1").as_str(),
            "sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
        );
        assert_eq!(format!("{:?}", hash_key("1")), "KeyHash(..)");
    }

    #[test]
    fn generated_keys_are_url_safe_and_distinct() {
        let a = generate_key();
        assert_eq!(a.len(), 43);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(a, generate_key());
        assert!((0..2000).all(|_| !generate_key().starts_with('-')));
    }
}
