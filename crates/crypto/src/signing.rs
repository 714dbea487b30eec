//! Ed25519 key pairs: the development tenant's token signer, and device keys.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
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

    /// The public key as a JWK (an entry of a JWKS `keys` array).
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref()),
        })
    }

    /// Signs `claims` as an EdDSA JWT.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> String {
        self.sign_jwt_typed(Some("JWT"), claims)
    }

    /// Signs `claims` as an EdDSA JWT whose header has this `typ` (or none).
    pub fn sign_jwt_typed(&self, typ: Option<&str>, claims: &serde_json::Value) -> String {
        let mut header = serde_json::json!({"alg": "EdDSA", "kid": self.kid});
        if let Some(typ) = typ {
            header["typ"] = typ.into();
        }
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.pair.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// What a device signs to prove it holds its key: a context string, its id, and the server's
/// fresh challenge for this stream.
fn proof_message(device_id: &[u8], challenge: &[u8]) -> Vec<u8> {
    [b"cubby device proof v1\0".as_slice(), device_id, challenge].concat()
}

/// A device's Ed25519 key pair, generated on first run and kept in its encrypted local store.
pub struct DeviceKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

impl DeviceKey {
    /// A key pair from PKCS#8 bytes (see [`generate_pkcs8`]).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, BadKeyPair> {
        Ok(Self { pair: Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| BadKeyPair)? })
    }

    /// The 32-byte public key the server records for the device.
    pub fn public_key(&self) -> [u8; 32] {
        self.pair.public_key().as_ref().try_into().expect("Ed25519 public keys are 32 bytes")
    }

    /// Signs the server's `challenge` for the device `device_id`.
    pub fn prove(&self, device_id: &[u8], challenge: &[u8]) -> Vec<u8> {
        self.pair.sign(&proof_message(device_id, challenge)).as_ref().to_vec()
    }
}

/// Whether `signature` proves that the holder of `public_key` answered `challenge` as
/// `device_id`.
pub fn verify_device_proof(
    public_key: &[u8],
    device_id: &[u8],
    challenge: &[u8],
    signature: &[u8],
) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&proof_message(device_id, challenge), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_proof_verifies_only_for_its_key_id_and_challenge() {
        let key = DeviceKey::from_pkcs8(&generate_pkcs8()).expect("key");
        let other = DeviceKey::from_pkcs8(&generate_pkcs8()).expect("key");
        let proof = key.prove(b"device-1", b"challenge-1");
        assert!(verify_device_proof(&key.public_key(), b"device-1", b"challenge-1", &proof));
        assert!(!verify_device_proof(&other.public_key(), b"device-1", b"challenge-1", &proof));
        assert!(!verify_device_proof(&key.public_key(), b"device-2", b"challenge-1", &proof));
        assert!(!verify_device_proof(&key.public_key(), b"device-1", b"challenge-2", &proof));
        assert!(!verify_device_proof(&key.public_key(), b"device-1", b"challenge-1", &[0; 64]));
        assert!(!verify_device_proof(b"short", b"device-1", b"challenge-1", &proof));
        assert_eq!(format!("{key:?}"), "DeviceKey(..)");
    }
}
