//! Sealed records: `version (1) || nonce (12) || AES-256-GCM ciphertext and tag`.
//!
//! The associated data is never stored: the reader rebuilds it from where the record was read
//! (customer, document, record kind, position), so a record moved anywhere else fails to open.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

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
    let nonce_bytes: [u8; NONCE_LEN] = crate::random_array();
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    out.push(VERSION);
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(plaintext);
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
