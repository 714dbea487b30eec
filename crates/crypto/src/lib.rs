//! Every use of ring in Cubby.
//!
//! - [`envelope`]: AES-256-GCM records with a version byte, a random nonce and bound associated
//!   data;
//! - [`keys`]: the master secret, key-encryption keys derived with HKDF, per-customer data keys
//!   wrapped by a KEK, and the keyed hash that turns `(tenant, subject)` into a store key;
//! - [`jwt`]: verifying access tokens (EdDSA, ES256, RS256) with a pinned algorithm;
//! - [`signing`]: Ed25519 key pairs for the development tenant and for devices.
//!
//! Sealing and opening a record:
//!
//! ```
//! use cubby_crypto::envelope::{open, seal};
//! use cubby_crypto::keys::DataKey;
//!
//! let key = DataKey::generate();
//! let sealed = seal(&key, b"customer/doc/chunk/7", b"hello");
//! assert_eq!(open(&key, b"customer/doc/chunk/7", &sealed).unwrap(), b"hello");
//! assert!(open(&key, b"customer/doc/chunk/8", &sealed).is_err());
//! ```

pub mod envelope;
pub mod jwt;
pub mod keys;
pub mod signing;

/// Fills an array from the operating system's secure random source.
pub fn random_array<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("the OS random source does not fail once the process has started");
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().try_into().expect("SHA-256 digests are 32 bytes")
}
