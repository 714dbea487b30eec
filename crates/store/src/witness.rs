//! What a server keeps about its store where a restore of the store's files does not reach.
//!
//! A store can come back older than it was: a backup put back, a file rolled back by a storage
//! snapshot, a log cut short where a bit flipped (sled 0.34 ends its log at the first bad
//! checksum, silently). The store itself cannot tell: everything in it is consistent, just old.
//! So the server keeps two things beside it, in a [`Witness`] (files outside the store's
//! directory on a real server, memory that outlives the store in the simulation):
//!
//! - the **anchor**: which store this is, its current epoch, and how many flushes it has made
//!   durable. Every flush that had writes records its number in the store, then in the anchor,
//!   and only then does anyone hear it succeeded. A store that holds fewer flushes than the
//!   anchor says has lost acknowledged writes.
//! - the **ledger**: every erasure and revocation, appended before it takes effect. A restored
//!   store knows nothing of an erasure or a revocation made after its backup; the ledger puts
//!   them back at the next start, so an erased customer stays erased and a revoked device stays
//!   revoked.
//!
//! Both are sealed with a key derived from the master secret ([`Keyring::witness_key`]), never
//! with a key kept in the store, so they still open when the store is gone, and one from another
//! server does not.
//!
//! [`Keyring::witness_key`]: cubby_crypto::keys::Keyring::witness_key

use std::sync::{Arc, Mutex, PoisonError};

use cubby_core::CustomerId;
use cubby_crypto::envelope;
use cubby_crypto::keys::DataKey;

use crate::{Result, StoreError};

/// Where the anchor and the ledger live. Both hold sealed bytes the store makes and checks.
pub trait Witness: Send + Sync + 'static {
    /// The anchor last written, if any.
    fn anchor(&self) -> Result<Option<Vec<u8>>>;

    /// Replaces the anchor; durable when it returns.
    fn set_anchor(&self, sealed: &[u8]) -> Result<()>;

    /// Every ledger entry, oldest first.
    fn ledger(&self) -> Result<Vec<Vec<u8>>>;

    /// Appends a ledger entry; durable when it returns.
    fn append(&self, sealed: &[u8]) -> Result<()>;
}

/// A witness in memory, for tests and the simulation: clones share it, and it outlives any store
/// opened with it, as files beside a store outlive a restore of the store.
#[derive(Clone, Debug, Default)]
pub struct MemoryWitness(Arc<Mutex<Held>>);

/// What a [`MemoryWitness`] holds: the anchor and the ledger.
type Held = (Option<Vec<u8>>, Vec<Vec<u8>>);

impl MemoryWitness {
    /// An empty witness: no anchor, no ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Witness for MemoryWitness {
    fn anchor(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().0.clone())
    }

    fn set_anchor(&self, sealed: &[u8]) -> Result<()> {
        self.lock().0 = Some(sealed.to_vec());
        Ok(())
    }

    fn ledger(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self.lock().1.clone())
    }

    fn append(&self, sealed: &[u8]) -> Result<()> {
        self.lock().1.push(sealed.to_vec());
        Ok(())
    }
}

/// The anchor: which store, which epoch, how many flushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anchor {
    /// The store's random id, made when it was created.
    pub store: [u8; 16],
    /// The store's epoch: new at creation and at every restore the operator accepts.
    pub epoch: [u8; 16],
    /// Flushes with writes the store has made durable.
    pub flushes: u64,
}

const ANCHOR_AAD: &[u8] = b"cubby anchor v1";

impl Anchor {
    pub(crate) fn seal(&self, key: &DataKey) -> Vec<u8> {
        envelope::seal(key, ANCHOR_AAD, &self.encode())
    }

    pub(crate) fn open(key: &DataKey, sealed: &[u8]) -> Result<Self> {
        let plain =
            envelope::open(key, ANCHOR_AAD, sealed).map_err(|_| StoreError::Corrupt("anchor"))?;
        Self::decode(&plain).ok_or(StoreError::Corrupt("anchor"))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        [self.store.as_slice(), &self.epoch, &self.flushes.to_be_bytes()].concat()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 40 {
            return None;
        }
        Some(Self {
            store: bytes[..16].try_into().ok()?,
            epoch: bytes[16..32].try_into().ok()?,
            flushes: u64::from_be_bytes(bytes[32..].try_into().ok()?),
        })
    }
}

/// One ledger entry: something no restore of the store may undo.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LedgerEntry {
    /// The customer was erased (crypto-shredded) at `at_ms`.
    Erased {
        /// Who.
        customer: CustomerId,
        /// When, milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// A device of the customer was revoked at `at_ms`, and with it the tokens it used (their
    /// SHA-256 and expiry, seconds since the Unix epoch).
    Revoked {
        /// Whose device.
        customer: CustomerId,
        /// The device's id.
        device: [u8; 16],
        /// When, milliseconds since the Unix epoch.
        at_ms: u64,
        /// The tokens refused with it.
        tokens: Vec<([u8; 32], u64)>,
    },
}

impl LedgerEntry {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Erased { customer, at_ms } => {
                out.push(b'e');
                out.extend_from_slice(customer.as_bytes());
                out.extend_from_slice(&at_ms.to_be_bytes());
            }
            Self::Revoked { customer, device, at_ms, tokens } => {
                out.push(b'r');
                out.extend_from_slice(customer.as_bytes());
                out.extend_from_slice(device);
                out.extend_from_slice(&at_ms.to_be_bytes());
                for (hash, expires) in tokens {
                    out.extend_from_slice(hash);
                    out.extend_from_slice(&expires.to_be_bytes());
                }
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (kind, rest) = bytes.split_first()?;
        let customer = CustomerId::from_slice(rest.get(..16)?).ok()?;
        match kind {
            b'e' if rest.len() == 24 => Some(Self::Erased {
                customer,
                at_ms: u64::from_be_bytes(rest[16..].try_into().ok()?),
            }),
            b'r' if rest.len() >= 40 && (rest.len() - 40) % 40 == 0 => {
                let device = rest[16..32].try_into().ok()?;
                let at_ms = u64::from_be_bytes(rest[32..40].try_into().ok()?);
                let tokens = rest[40..]
                    .chunks(40)
                    .map(|t| {
                        let hash = t[..32].try_into().ok()?;
                        Some((hash, u64::from_be_bytes(t[32..].try_into().ok()?)))
                    })
                    .collect::<Option<_>>()?;
                Some(Self::Revoked { customer, device, at_ms, tokens })
            }
            _ => None,
        }
    }

    /// Sealed as the ledger's `index`-th entry, after the entry sealed as `previous`: an entry
    /// taken out of the middle, moved or reordered does not open.
    pub(crate) fn seal(&self, key: &DataKey, index: usize, previous: &[u8]) -> Vec<u8> {
        envelope::seal(key, &ledger_aad(index, previous), &self.encode())
    }

    pub(crate) fn open(
        key: &DataKey,
        index: usize,
        previous: &[u8],
        sealed: &[u8],
    ) -> Result<Self> {
        let plain = envelope::open(key, &ledger_aad(index, previous), sealed)
            .map_err(|_| StoreError::Corrupt("ledger entry"))?;
        Self::decode(&plain).ok_or(StoreError::Corrupt("ledger entry"))
    }
}

fn ledger_aad(index: usize, previous: &[u8]) -> Vec<u8> {
    [b"cubby ledger v1".as_slice(), &(index as u64).to_be_bytes(), &cubby_crypto::sha256(previous)]
        .concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_and_ledger_entries_round_trip_and_refuse_other_keys_and_places() {
        let (key, other) = (DataKey::generate(), DataKey::generate());
        let anchor = Anchor { store: [1; 16], epoch: [2; 16], flushes: 77 };
        let sealed = anchor.seal(&key);
        assert_eq!(Anchor::open(&key, &sealed).expect("opens"), anchor);
        assert!(Anchor::open(&other, &sealed).is_err());

        let entries = [
            LedgerEntry::Erased { customer: CustomerId::from_bytes([3; 16]), at_ms: 9 },
            LedgerEntry::Revoked {
                customer: CustomerId::from_bytes([4; 16]),
                device: [5; 16],
                at_ms: 10,
                tokens: vec![([6; 32], 11), ([7; 32], 12)],
            },
        ];
        let first = entries[0].seal(&key, 0, &[]);
        let second = entries[1].seal(&key, 1, &first);
        assert_eq!(LedgerEntry::open(&key, 0, &[], &first).expect("opens"), entries[0]);
        assert_eq!(LedgerEntry::open(&key, 1, &first, &second).expect("opens"), entries[1]);
        // Out of its place (the first entry removed, so the second comes first) it does not.
        assert!(LedgerEntry::open(&key, 0, &[], &second).is_err());
        assert!(LedgerEntry::open(&other, 0, &[], &first).is_err());
    }
}
