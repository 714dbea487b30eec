//! Sealed records: `version (1) || nonce (12) || AES-256-GCM ciphertext and tag`.
//!
//! The associated data is never stored: the reader rebuilds it from where the record was read
//! (customer, document, record kind, position), so a record moved anywhere else fails to open.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::{hkdf, hmac};

use std::fmt;

use zeroize::Zeroizing;

/// The first byte of every record this version writes.
pub const VERSION: u8 = 1;
/// Bytes a sealed record adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + 16;

/// A 256-bit AES-GCM key. Never printed; zeroed on drop.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(Zeroizing::new(crate::random_array()))
    }

    /// A key from 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key, for the cipher only.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// A key that names what is sealed with a [`DataKey`] by a keyed hash ([`IdKey::name`]), so that
/// a name a backend stores says nothing about the content named: equal contents of two
/// customers get unrelated names, and nobody without the data key can test a guess. Derived
/// from the data key with HKDF, so it is shredded with it.
pub struct IdKey(hmac::Key);

impl DataKey {
    /// The key that names what this key seals ([`IdKey`]).
    pub fn id_key(&self) -> IdKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cubby v1").extract(self.expose());
        let okm = prk
            .expand(&[b"part ids"], hmac::HMAC_SHA256)
            .expect("HKDF-SHA256 can expand one HMAC-SHA256 key");
        IdKey(hmac::Key::from(okm))
    }
}

impl IdKey {
    /// The 16-byte name of `id` in `context`: the first 16 bytes of HMAC-SHA256 over both.
    pub fn name(&self, context: &[u8], id: &[u8]) -> [u8; 16] {
        let mut mac = hmac::Context::with_key(&self.0);
        mac.update(&(context.len() as u64).to_be_bytes());
        mac.update(context);
        mac.update(id);
        mac.sign().as_ref()[..16].try_into().expect("HMAC-SHA256 has 32 bytes")
    }
}

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(..)")
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Why a sealed record did not open. Deliberately says nothing about the contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The record is shorter than the envelope itself.
    #[error("sealed record is truncated")]
    Truncated,
    /// The version byte is not one this build reads.
    #[error("sealed record has unknown version {0}")]
    UnknownVersion(u8),
    /// Wrong key, wrong associated data, or the bytes were changed.
    #[error("sealed record failed authentication")]
    Authentication,
}

fn aead_key(key: &DataKey) -> LessSafeKey {
    LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.expose()).expect("a data key is always 32 bytes"),
    )
}

/// Seals `plaintext` under `key`, binding `aad`, with a fresh random nonce.
pub fn seal(key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    seal_concat(key, aad, &[plaintext])
}

/// Seals the concatenation of `parts` as [`seal`] seals one plaintext, without first copying
/// them into one.
pub fn seal_concat(key: &DataKey, aad: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let nonce_bytes: [u8; NONCE_LEN] = crate::random_array();
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + OVERHEAD);
    out.push(VERSION);
    out.extend_from_slice(&nonce_bytes);
    for part in parts {
        out.extend_from_slice(part);
    }
    let tag = aead_key(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut out[1 + NONCE_LEN..],
        )
        .expect("AES-GCM sealing fails only for inputs over 64 GB");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a record sealed by [`seal`] with the same key and associated data.
pub fn open(key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < OVERHEAD {
        return Err(OpenError::Truncated);
    }
    if sealed[0] != VERSION {
        return Err(OpenError::UnknownVersion(sealed[0]));
    }
    let nonce: [u8; NONCE_LEN] =
        sealed[1..1 + NONCE_LEN].try_into().expect("slice has NONCE_LEN bytes");
    let mut buf = sealed[1 + NONCE_LEN..].to_vec();
    let len = aead_key(key)
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .map_err(|_| OpenError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn row_22_any_single_bit_flip_fails_to_open(data in proptest::collection::vec(any::<u8>(), 0..64),
                                             bit in any::<prop::sample::Index>()) {
            let key = DataKey::generate();
            let mut sealed = seal(&key, b"aad", &data);
            let bit = bit.index(sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open(&key, b"aad", &sealed).is_err());
        }

        #[test]
        fn seal_open_round_trips(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = DataKey::generate();
            prop_assert_eq!(open(&key, b"x", &seal(&key, b"x", &data)), Ok(data));
        }
    }

    #[test]
    fn names_depend_on_the_key_the_context_and_the_id() {
        let (a, b) = (DataKey::from_bytes([1; 32]), DataKey::from_bytes([2; 32]));
        let name = a.id_key().name(b"doc", b"id");
        assert_eq!(name, DataKey::from_bytes([1; 32]).id_key().name(b"doc", b"id"));
        assert_ne!(name, b.id_key().name(b"doc", b"id"));
        assert_ne!(name, a.id_key().name(b"doc2", b"id"));
        assert_ne!(name, a.id_key().name(b"doc", b"id2"));
        // The context's length is hashed too: moving a byte between context and id changes it.
        assert_ne!(name, a.id_key().name(b"do", b"cid"));
    }

    #[test]
    fn another_key_cannot_open() {
        let sealed = seal(&DataKey::generate(), b"aad", b"secret");
        assert_eq!(open(&DataKey::generate(), b"aad", &sealed), Err(OpenError::Authentication));
    }

    #[test]
    fn row_28_a_million_nonces_do_not_repeat_across_restarts() {
        // Nonces are random, with no counter to persist: a "restart" is the same key bytes in a
        // fresh key object.
        let bytes: [u8; 32] = crate::random_array();
        let mut seen = std::collections::HashSet::with_capacity(1_000_000);
        for _restart in 0..4 {
            let key = DataKey::from_bytes(bytes);
            for _ in 0..250_000 {
                let sealed = seal(&key, b"", b"");
                let nonce: [u8; NONCE_LEN] =
                    sealed[1..1 + NONCE_LEN].try_into().expect("a nonce follows the version");
                assert!(seen.insert(nonce), "nonce repeated");
            }
        }
    }

    #[test]
    fn version_and_length_are_checked() {
        let key = DataKey::generate();
        assert_eq!(open(&key, b"", &[1, 2, 3]), Err(OpenError::Truncated));
        let mut sealed = seal(&key, b"", b"x");
        sealed[0] = 9;
        assert_eq!(open(&key, b"", &sealed), Err(OpenError::UnknownVersion(9)));
    }
}
