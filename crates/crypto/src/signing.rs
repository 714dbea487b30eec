//! Ed25519 key pairs: the development tenant's token signer, and (later) device keys.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use crate::jwt::VerifyingKey;

/// Why a key pair could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an Ed25519 PKCS#8 key pair")]
pub struct BadKeyPair;

/// An Ed25519 key pair that signs JWTs.
pub struct TokenSigner {
    pair: Ed25519KeyPair,
    kid: String,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// A new Ed25519 key pair as PKCS#8 bytes (secret: store it 0600).
pub fn generate_pkcs8() -> Zeroizing<Vec<u8>> {
    let rng = ring::rand::SystemRandom::new();
    Zeroizing::new(
        Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("Ed25519 key generation fails only without an OS random source")
            .as_ref()
            .to_vec(),
    )
}

impl TokenSigner {
    /// A signer from PKCS#8 bytes. Its key id is derived from the public key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, BadKeyPair> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| BadKeyPair)?;
        let kid = URL_SAFE_NO_PAD.encode(&crate::sha256(pair.public_key().as_ref())[..8]);
        Ok(Self { pair, kid })
    }

    /// The key id this signer puts in token headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The matching verifying key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::ed25519(self.pair.public_key().as_ref(), Some(self.kid.clone()))
    }

    /// Signs `claims` as an EdDSA JWT.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.pair.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}
