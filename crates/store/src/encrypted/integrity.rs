//! The integrity checks of a server's store: opening it against its witness, a new epoch, the
//! flush count and the anchor, and the ledger (see [`crate::witness`]).

use std::sync::{Arc, PoisonError};

use cubby_core::CustomerId;
use cubby_crypto::keys::Keyring;

use super::{EPOCH_KEY, EncryptedStore, FLUSHES_KEY, Witnessed};
use crate::witness::{Anchor, LedgerEntry, Witness};
use crate::{IntegrityError, Records, Result, SYSTEM, Space, Store, StoreError};

impl<S: Store> EncryptedStore<S> {
    /// Wraps `inner` as a server's store, checked against `witness`: a store that holds fewer
    /// flushes than the anchor says it made durable, another store than the anchor's, or an
    /// earlier epoch's, is refused ([`StoreError::Integrity`]); so is a store without an anchor
    /// unless it is new. Then every erasure in the ledger that the store lacks is made again.
    /// From here on every flush with writes is counted in the store and the anchor.
    pub fn open_witnessed(inner: S, keyring: Keyring, witness: Arc<dyn Witness>) -> Result<Self> {
        let key = keyring.witness_key().clone();
        let sealed = witness.anchor()?;
        // An empty store where the anchor says one was: refused before anything is written,
        // so that the directory is left as it was found.
        if let Some(sealed) = &sealed
            && inner.get_key(&SYSTEM)?.is_none()
        {
            // An anchor that does not open is another master key's.
            let anchor = Anchor::open(&key, sealed).map_err(|_| StoreError::WrongMasterKey)?;
            let acknowledged = anchor.flushes;
            return Err(StoreError::Integrity(IntegrityError::Wiped { acknowledged }));
        }
        // The key check first: with another master key, that is what to say.
        let (mut store, created) = Self::open_unchecked(inner, keyring)?;
        let anchor = sealed.map(|sealed| Anchor::open(&key, &sealed)).transpose()?;
        let found = store.stored_flushes()?;
        let refused = match anchor {
            // New, or made by a first open that stopped before its anchor: nothing was
            // acknowledged from it yet.
            None if created || found == 0 => None,
            None => Some(IntegrityError::AnchorMissing),
            Some(anchor) if anchor.store != store.identity.store => Some(IntegrityError::Replaced),
            Some(anchor) if anchor.epoch != store.identity.epoch => Some(IntegrityError::OldEpoch),
            Some(anchor) if found < anchor.flushes => {
                Some(IntegrityError::RolledBack { acknowledged: anchor.flushes, found })
            }
            // Equal, or the store ahead (a crash between its flush and the anchor's write).
            Some(_) => None,
        };
        if let Some(refused) = refused {
            return Err(StoreError::Integrity(refused));
        }
        store.witnessed = Some(Witnessed::new(witness, key, found));
        store.write_anchor(found)?;
        store.replay_erasures()?;
        Ok(store)
    }

    /// Accepts the store in `inner` as it is (restored from a backup, or found damaged) and
    /// starts a new epoch: devices then offer again everything they hold. The anchor is made to
    /// match the store, and the ledger's erasures are made again. A missing or wiped store is
    /// started afresh.
    pub fn begin_epoch(inner: S, keyring: Keyring, witness: Arc<dyn Witness>) -> Result<Self> {
        let mut store = Self::begin_epoch_unwitnessed(inner, keyring)?;
        let found = store.stored_flushes()?;
        let key = store.keyring().witness_key().clone();
        store.witnessed = Some(Witnessed::new(witness, key, found));
        store.write_anchor(found)?;
        store.replay_erasures()?;
        Ok(store)
    }

    /// As [`EncryptedStore::begin_epoch`], for a store that has no witness (a database that
    /// several nodes share, restored with the database's own tools): the new epoch alone, with
    /// no anchor to match and no ledger to replay.
    pub fn begin_epoch_unwitnessed(inner: S, keyring: Keyring) -> Result<Self> {
        let (mut store, _) = Self::open_unchecked(inner, keyring)?;
        let epoch = cubby_crypto::random_array();
        store.put_system(EPOCH_KEY, &epoch)?;
        store.inner.flush()?;
        store.identity.epoch = epoch;
        Ok(store)
    }

    /// The flushes the store itself says it has made durable.
    pub(super) fn stored_flushes(&self) -> Result<u64> {
        Ok(match self.get_system(FLUSHES_KEY)? {
            Some(bytes) => u64::from_be_bytes(
                bytes.try_into().map_err(|_| StoreError::Corrupt("store identity"))?,
            ),
            None => 0,
        })
    }

    pub(super) fn write_anchor(&self, flushes: u64) -> Result<()> {
        let Some(w) = &self.witnessed else { return Ok(()) };
        let anchor = Anchor { store: self.identity.store, epoch: self.identity.epoch, flushes };
        w.witness.set_anchor(&anchor.seal(&w.key))
    }

    /// Flushes with writes made durable so far (counted only with a witness).
    pub fn flushes(&self) -> u64 {
        self.witnessed
            .as_ref()
            .map_or(0, |w| *w.flushes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The store's epoch: new when it was created and at every [`EncryptedStore::begin_epoch`].
    pub fn epoch(&self) -> [u8; 16] {
        self.identity.epoch
    }

    /// The customer's own epoch, if their store ever needed one (it was found behind what a
    /// device had seen): see [`EncryptedStore::begin_customer_epoch`].
    pub fn customer_epoch(&self, customer: &CustomerId) -> Result<Option<[u8; 16]>> {
        self.get_record(customer, Space::INTEGRITY, EPOCH_KEY)?
            .map(|bytes| bytes.try_into().map_err(|_| StoreError::Corrupt("customer epoch")))
            .transpose()
    }

    /// Starts a new epoch for one customer, durably: their devices offer again everything they
    /// hold.
    pub fn begin_customer_epoch(&self, customer: &CustomerId) -> Result<[u8; 16]> {
        let epoch = cubby_crypto::random_array();
        self.put_record(customer, Space::INTEGRITY, EPOCH_KEY, &epoch)?;
        self.flush()?;
        Ok(epoch)
    }

    /// Records `entry` in the ledger, durably, ahead of what it records taking effect. Without
    /// a witness (a device's store) there is no ledger, and nothing is recorded.
    pub fn append_ledger(&self, entry: &LedgerEntry) -> Result<()> {
        let Some(w) = &self.witnessed else { return Ok(()) };
        let _appending = w.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = w.witness.ledger()?;
        let previous = entries.last().map_or(&[][..], Vec::as_slice);
        w.witness.append(&entry.seal(&w.key, entries.len(), previous))
    }

    /// Every ledger entry, oldest first (none without a witness).
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        let Some(w) = &self.witnessed else { return Ok(Vec::new()) };
        let sealed = w.witness.ledger()?;
        let mut previous: &[u8] = &[];
        let mut entries = Vec::with_capacity(sealed.len());
        for (index, entry) in sealed.iter().enumerate() {
            entries.push(LedgerEntry::open(&w.key, index, previous, entry)?);
            previous = entry;
        }
        Ok(entries)
    }

    /// Makes again every erasure in the ledger the store does not show (a restored store).
    pub(super) fn replay_erasures(&self) -> Result<()> {
        for entry in self.ledger()? {
            let LedgerEntry::Erased { customer, at_ms } = entry else { continue };
            if self.inner.get_key(&customer)?.is_some() || self.erased_at(&customer)?.is_none() {
                self.shred(&customer, at_ms)?;
            }
        }
        Ok(())
    }
}
