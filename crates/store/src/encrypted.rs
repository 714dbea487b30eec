//! The encryption decorator: seals every value on its way into a backend, and checks that what
//! comes back is what was acknowledged.
//!
//! Each customer has a random data key, wrapped by the keyring's current KEK and stored through
//! [`Store::put_key_if_absent`]. Metadata, chunks, snapshots and records are sealed with that key;
//! the associated data names the customer, the document or record key, the record kind and its
//! position, and is rebuilt from where the record is read. A document's metadata is sealed for
//! the feed position its write left the document at ([`MetaAt`]), so an older copy of it spliced
//! over the newer one does not open. A chunk or snapshot is stored under a keyed name of its
//! content id (the customer's [`IdKey`] over the document and the id), with the content id
//! sealed in front of its bytes and the name in its associated data, so none opens in another's
//! place (a missing one is found when the document is rebuilt: `cubby_core::history`). Keys (ids
//! and positions) stay plain so backends can order and scan them; they are random ids, keyed
//! names, or counters: none is a hash of content, so no one can test a guess of what a customer
//! stores, or tell that two customers store the same thing.
//!
//! A store opened with a [`Witness`] (a server's) also keeps the anchor and the ledger (see
//! [`crate::witness`]): at open it refuses a store that holds less than it acknowledged, and puts
//! back the erasures a restored store lacks.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_crypto::envelope;
use cubby_crypto::envelope::IdKey;
use cubby_crypto::keys::{DataKey, Keyring};

use crate::witness::Witness;
use crate::{
    Chunk, CustomerLocks, DocRecords, Keys, MetaAt, Result, SYSTEM, Snapshot, Space, Store,
    StoreError,
};

mod integrity;
mod stores;

pub(super) const META: u8 = b'm';
pub(super) const CHUNK: u8 = b'C';
pub(super) const SNAPSHOT: u8 = b'S';
/// A chunk or snapshot of format 3, stored under its content id.
const CHUNK_3: u8 = b'c';
const SNAPSHOT_3: u8 = b's';
pub(super) const RECORD: u8 = b'r';

/// The store format this code writes: 4 stores chunks and snapshots under keyed names. It
/// reads format 3 too, which named them by their content ([`ChunkId`]): opening one makes it
/// format 4, whose older parts stay readable until a compaction replaces them. (Format 2
/// numbered them, and format 1 stores, which have no format record, also sealed metadata for
/// position 0: neither opens.)
pub const FORMAT: u32 = 4;

/// The associated data of a document's metadata (`position`: its feed position) or of one of
/// its parts (`position`: the part's content id).
pub(super) fn doc_aad(kind: u8, customer: &CustomerId, doc: &DocId, position: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(55 + position.len());
    aad.extend_from_slice(b"cubby1");
    aad.push(kind);
    aad.extend_from_slice(customer.as_bytes());
    aad.extend_from_slice(doc.as_bytes());
    aad.extend_from_slice(position);
    aad
}

pub(super) fn record_aad(customer: &CustomerId, space: Space, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + key.len());
    aad.extend_from_slice(b"cubby1");
    aad.push(RECORD);
    aad.extend_from_slice(customer.as_bytes());
    aad.push(space.0);
    aad.extend_from_slice(key);
    aad
}

/// A [`Store`] that seals every value it passes to the backend `S`.
///
/// Erasing a customer ([`Store::erase_customer`]) crypto-shreds: it records the erasure in the
/// ledger (with a witness), records a tombstone, destroys the customer's wrapped data key
/// durably, and only then removes their records. A tombstoned customer never gets a key again,
/// so nothing can be written or read for them afterwards.
pub struct EncryptedStore<S> {
    inner: S,
    keyring: RwLock<Arc<Keyring>>,
    /// The store's own data key (the key check), which seals its records such as tombstones.
    system: DataKey,
    /// Unwrapped data keys, by customer. Held only to look up or insert, never across I/O.
    keys: Mutex<HashMap<CustomerId, DataKey>>,
    /// Serialise fetching or making a customer's key with destroying it, per customer (by
    /// stripe): a customer's key made on disk (two `fsync`s) holds up no other customer.
    key_locks: CustomerLocks,
    /// The store's id and epoch.
    identity: Identity,
    /// The anchor and ledger, on a server.
    witnessed: Option<Witnessed>,
    /// The store was format 3 and may still hold parts under their content ids.
    parts_3: bool,
}

/// Which store, and which epoch of it.
#[derive(Clone, Copy, Debug)]
struct Identity {
    store: [u8; 16],
    epoch: [u8; 16],
}

/// A witnessed store's bookkeeping.
struct Witnessed {
    witness: Arc<dyn Witness>,
    /// [`Keyring::witness_key`].
    key: DataKey,
    /// The flushes made durable so far; held for the whole of a flush.
    flushes: Mutex<u64>,
    /// Something was written since the last flush began.
    dirty: AtomicBool,
    /// Held while appending to the ledger.
    ledger: Mutex<()>,
}

impl Witnessed {
    pub(super) fn new(witness: Arc<dyn Witness>, key: DataKey, flushes: u64) -> Self {
        Self {
            witness,
            key,
            flushes: Mutex::new(flushes),
            dirty: AtomicBool::new(false),
            ledger: Mutex::new(()),
        }
    }
}

impl<S> fmt::Debug for EncryptedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedStore").field("keyring", &self.keyring).finish_non_exhaustive()
    }
}

/// What an erasure removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Erased {
    /// When the tombstone was written, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A chunk's id and its sealed bytes.
pub(super) type SealedChunk = (ChunkId, Vec<u8>);

/// A document's metadata, sealed for the position the backend writes it at.
pub(super) struct SealedMeta<'a> {
    key: DataKey,
    customer: &'a CustomerId,
    doc: &'a DocId,
    plain: &'a dyn MetaAt,
}

impl MetaAt for SealedMeta<'_> {
    fn at(&self, seq: Seq) -> Vec<u8> {
        let aad = doc_aad(META, self.customer, self.doc, &seq.0.to_be_bytes());
        envelope::seal(&self.key, &aad, &self.plain.at(seq))
    }
}

/// The store's own records under [`Space::INTEGRITY`].
pub(super) const FORMAT_KEY: &[u8] = b"format";
pub(super) const STORE_KEY: &[u8] = b"store";
pub(super) const EPOCH_KEY: &[u8] = b"epoch";
pub(super) const FLUSHES_KEY: &[u8] = b"flushes";
/// Present when the store was format 3 ([`FORMAT`]).
pub(super) const PARTS_3_KEY: &[u8] = b"parts 3";

impl<S: Store> EncryptedStore<S> {
    /// Wraps `inner`. The first open stores a key check and the store's identity; later opens
    /// verify the key check, so a wrong master key is refused here rather than discovered one
    /// record at a time, and the format. No anchor is kept: for a device's store, or a copy
    /// being read.
    pub fn open(inner: S, keyring: Keyring) -> Result<Self> {
        Ok(Self::open_unchecked(inner, keyring)?.0)
    }

    /// The key check, format and identity; `true` when the store was new.
    pub(super) fn open_unchecked(inner: S, keyring: Keyring) -> Result<(Self, bool)> {
        // A new store's records go first, sealed with a key kept only in memory until they are
        // durable, and the key check last: a crash between leaves no key check, and the next
        // open starts the store afresh. (The other way round, a crash left a key check without
        // the records, which reads as a store of the old format.)
        let (system, created) = match inner.get_key(&SYSTEM)? {
            Some(check) => (
                keyring
                    .unwrap(SYSTEM.as_bytes(), &check)
                    .map_err(|_| StoreError::WrongMasterKey)?,
                false,
            ),
            None => (DataKey::generate(), true),
        };
        let mut store = Self {
            inner,
            keyring: RwLock::new(Arc::new(keyring)),
            system,
            keys: Mutex::new(HashMap::new()),
            key_locks: CustomerLocks::default(),
            identity: Identity { store: [0; 16], epoch: [0; 16] },
            witnessed: None,
            parts_3: false,
        };
        if created {
            store.put_system(FORMAT_KEY, &FORMAT.to_be_bytes())?;
            store.put_system(STORE_KEY, &cubby_crypto::random_array::<16>())?;
            store.put_system(EPOCH_KEY, &cubby_crypto::random_array::<16>())?;
            store.put_system(FLUSHES_KEY, &0u64.to_be_bytes())?;
            store.inner.flush()?;
            let check = store.keyring().wrap(SYSTEM.as_bytes(), &store.system);
            let kept = store.inner.put_key_if_absent(&SYSTEM, &check)?;
            if kept != check {
                // Another process made the store meanwhile: its key, and its records.
                return Err(StoreError::InUse);
            }
        } else {
            let format = store.get_system(FORMAT_KEY)?;
            let found = format.and_then(|f| Some(u32::from_be_bytes(f.try_into().ok()?)));
            match found {
                Some(FORMAT) => {}
                Some(3) => {
                    // The mark first: a crash before the format moves leaves format 3 marked,
                    // which the next open upgrades again.
                    store.put_system(PARTS_3_KEY, &[])?;
                    store.inner.flush()?;
                    store.put_system(FORMAT_KEY, &FORMAT.to_be_bytes())?;
                    store.inner.flush()?;
                }
                _ => {
                    return Err(StoreError::Format { found: found.unwrap_or(1), expected: FORMAT });
                }
            }
            store.parts_3 = store.get_system(PARTS_3_KEY)?.is_some();
        }
        let id = |bytes: Option<Vec<u8>>| -> Result<[u8; 16]> {
            bytes.and_then(|b| b.try_into().ok()).ok_or(StoreError::Corrupt("store identity"))
        };
        store.identity = Identity {
            store: id(store.get_system(STORE_KEY)?)?,
            epoch: id(store.get_system(EPOCH_KEY)?)?,
        };
        Ok((store, created))
    }

    pub(super) fn get_system(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.inner.get_record(&SYSTEM, Space::INTEGRITY, key)? {
            Some(sealed) => Ok(Some(
                envelope::open(&self.system, &record_aad(&SYSTEM, Space::INTEGRITY, key), &sealed)
                    .map_err(|_| StoreError::Corrupt("store identity"))?,
            )),
            None => Ok(None),
        }
    }

    pub(super) fn put_system(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let sealed =
            envelope::seal(&self.system, &record_aad(&SYSTEM, Space::INTEGRITY, key), value);
        self.inner.put_record(&SYSTEM, Space::INTEGRITY, key, &sealed)
    }

    pub(super) fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Notes a write, for the next flush to count. Called once the write is in (whatever its
    /// outcome: part of it may be): a flush that began after this sees it, and one that began
    /// before holds the flush lock, so the writer's own flush waits for it to finish.
    pub(super) fn wrote(&self) {
        if let Some(w) = &self.witnessed {
            w.dirty.store(true, Ordering::SeqCst);
        }
    }

    pub(super) fn after_write<T>(&self, written: Result<T>) -> Result<T> {
        self.wrote();
        written
    }

    /// Installs a new keyring (after a key rotation); call [`EncryptedStore::rewrap_keys`] next
    /// to move every data key to its current generation. A keyring that does not open the
    /// store's key check (another master secret) is refused.
    pub fn set_keyring(&self, keyring: Keyring) -> Result<()> {
        let check = self.inner.get_key(&SYSTEM)?.ok_or(StoreError::WrongMasterKey)?;
        keyring.unwrap(SYSTEM.as_bytes(), &check).map_err(|_| StoreError::WrongMasterKey)?;
        *self.keyring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keyring);
        Ok(())
    }

    /// Re-wraps every data key not wrapped with the current KEK generation. The data keys
    /// themselves do not change, so readers and writers carry on undisturbed. Returns how many
    /// keys were re-wrapped.
    pub fn rewrap_keys(&self) -> Result<usize> {
        let keyring = self.keyring();
        let current = keyring.current_generation();
        let mut rewrapped = 0;
        for customer in self.inner.list_customers()? {
            let Some(wrapped) = self.inner.get_key(&customer)? else { continue };
            if Keyring::generation_of(&wrapped) == Some(current) {
                continue;
            }
            let key = keyring
                .unwrap(customer.as_bytes(), &wrapped)
                .map_err(|_| StoreError::Corrupt("data key"))?;
            // A customer erased meanwhile has no key to replace: nothing to do.
            if self.inner.replace_key(
                &customer,
                &wrapped,
                &keyring.wrap(customer.as_bytes(), &key),
            )? {
                rewrapped += 1;
            }
        }
        Ok(rewrapped)
    }

    /// How many wrapped data keys each KEK generation wraps.
    pub fn key_generations(&self) -> Result<BTreeMap<u32, usize>> {
        let mut counts = BTreeMap::new();
        for customer in self.inner.list_customers()? {
            if let Some(generation) =
                self.inner.get_key(&customer)?.as_deref().and_then(Keyring::generation_of)
            {
                *counts.entry(generation).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// When the customer was erased, or `None` if they were not.
    pub fn erased_at(&self, customer: &CustomerId) -> Result<Option<Erased>> {
        let Some(sealed) =
            self.inner.get_record(&SYSTEM, Space::TOMBSTONES, customer.as_bytes())?
        else {
            return Ok(None);
        };
        let value = envelope::open(
            &self.system,
            &record_aad(&SYSTEM, Space::TOMBSTONES, customer.as_bytes()),
            &sealed,
        )
        .map_err(|_| StoreError::Corrupt("tombstone"))?;
        let at_ms = value.try_into().map(u64::from_be_bytes).unwrap_or(0);
        Ok(Some(Erased { at_ms }))
    }

    /// Every erased customer.
    pub fn erased_customers(&self) -> Result<Vec<CustomerId>> {
        Ok(self
            .inner
            .scan_records(&SYSTEM, Space::TOMBSTONES)?
            .iter()
            .filter_map(|(k, _)| CustomerId::from_slice(k).ok())
            .collect())
    }

    /// The backend underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub(super) fn key(&self, customer: &CustomerId) -> Result<DataKey> {
        if *customer == SYSTEM {
            return Ok(self.system.clone());
        }
        if let Some(key) = self.cached_key(customer) {
            return Ok(key);
        }
        // Checking the tombstone and making the key must not interleave with an erasure's
        // destroying it: both hold the customer's lock.
        let _guard = self.key_locks.lock(customer);
        if let Some(key) = self.cached_key(customer) {
            return Ok(key);
        }
        let keyring = self.keyring();
        let wrapped = match self.inner.get_key(customer)? {
            Some(wrapped) => wrapped,
            None => {
                if self.erased_at(customer)?.is_some() {
                    return Err(StoreError::Erased);
                }
                let fresh = keyring.wrap(customer.as_bytes(), &DataKey::generate());
                self.inner.put_key_if_absent(customer, &fresh)?
            }
        };
        let key = keyring
            .unwrap(customer.as_bytes(), &wrapped)
            .map_err(|_| StoreError::Corrupt("data key"))?;
        self.cache().insert(*customer, key.clone());
        Ok(key)
    }

    /// Forgets the customer's data key if it is cached: another node erased them (the next use
    /// reads the store, which refuses it).
    pub fn forget_key(&self, customer: &CustomerId) {
        let _guard = self.key_locks.lock(customer);
        self.cache().remove(customer);
    }

    pub(super) fn cached_key(&self, customer: &CustomerId) -> Option<DataKey> {
        self.cache().get(customer).cloned()
    }

    pub(super) fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<CustomerId, DataKey>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A document's metadata (sealed when the backend writes it, for its position) and chunk
    /// (its stored name and sealed bytes) under the customer's key, each bound to where it is
    /// stored.
    pub(super) fn seal_doc<'a>(
        &self,
        c: &'a CustomerId,
        d: &'a DocId,
        meta: &'a dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<(SealedMeta<'a>, Option<SealedChunk>)> {
        let key = self.key(c)?;
        let chunk = chunk.map(|ch| seal_part(&key, CHUNK, c, d, ch.id, ch.bytes));
        Ok((SealedMeta { key, customer: c, doc: d, plain: meta }, chunk))
    }

    pub(super) fn seal_snapshot(
        &self,
        c: &CustomerId,
        d: &DocId,
        snapshot: &Snapshot,
    ) -> Result<Snapshot> {
        let (id, bytes) = seal_part(&self.key(c)?, SNAPSHOT, c, d, snapshot.id, &snapshot.bytes);
        Ok(Snapshot { id, bytes })
    }

    /// The names the backend may hold the parts `ids` of `d` under: their keyed names, and
    /// their content ids too in a store that was format 3.
    pub(super) fn stored_names(
        &self,
        c: &CustomerId,
        d: &DocId,
        ids: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        let names = self.key(c)?.id_key();
        let mut stored = Vec::with_capacity(ids.len() * if self.parts_3 { 2 } else { 1 });
        for id in ids {
            stored.push(part_name(&names, d, *id));
            if self.parts_3 {
                stored.push(*id);
            }
        }
        Ok(stored)
    }

    /// Opens a part of `d` stored under `name`: its content id and bytes.
    fn open_part(
        &self,
        (key, names): (&DataKey, &IdKey),
        kind: u8,
        c: &CustomerId,
        d: &DocId,
        (name, sealed): (ChunkId, &[u8]),
    ) -> Result<(ChunkId, Vec<u8>)> {
        let what = if kind == CHUNK { "chunk" } else { "snapshot" };
        if let Ok(mut plain) = envelope::open(key, &doc_aad(kind, c, d, name.as_bytes()), sealed) {
            let id = plain.get(..16).and_then(|id| ChunkId::from_slice(id).ok());
            return match id {
                Some(id) if part_name(names, d, id) == name => {
                    plain.drain(..16);
                    Ok((id, plain))
                }
                _ => Err(StoreError::Corrupt(what)),
            };
        }
        if !self.parts_3 {
            return Err(StoreError::Corrupt(what));
        }
        let kind_3 = if kind == CHUNK { CHUNK_3 } else { SNAPSHOT_3 };
        envelope::open(key, &doc_aad(kind_3, c, d, name.as_bytes()), sealed)
            .map(|plain| (name, plain))
            .map_err(|_| StoreError::Corrupt(what))
    }

    pub(super) fn open_meta(
        &self,
        c: &CustomerId,
        d: &DocId,
        seq: Seq,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        envelope::open(&self.key(c)?, &doc_aad(META, c, d, &seq.0.to_be_bytes()), sealed)
            .map_err(|_| StoreError::Corrupt("metadata"))
    }

    /// Crypto-shreds the customer (see [`Store::erase_customer`]), with a tombstone dated
    /// `at_ms`.
    pub(super) fn shred(&self, customer: &CustomerId, at_ms: u64) -> Result<()> {
        if self.erased_at(customer)?.is_none() {
            let aad = record_aad(&SYSTEM, Space::TOMBSTONES, customer.as_bytes());
            let sealed = envelope::seal(&self.system, &aad, &at_ms.to_be_bytes());
            self.inner.put_record(&SYSTEM, Space::TOMBSTONES, customer.as_bytes(), &sealed)?;
            self.wrote();
            self.flush()?;
        }
        self.destroy_key(customer)?;
        self.inner.erase_customer(customer)?;
        self.wrote();
        self.flush()
    }

    pub(super) fn open_doc_records(
        &self,
        c: &CustomerId,
        d: &DocId,
        records: DocRecords,
    ) -> Result<DocRecords> {
        let key = self.key(c)?;
        let keys = (&key, &key.id_key());
        let meta =
            envelope::open(&key, &doc_aad(META, c, d, &records.seq.0.to_be_bytes()), &records.meta)
                .map_err(|_| StoreError::Corrupt("metadata"))?;
        let snapshot = match records.snapshot {
            Some(s) => {
                let (id, bytes) = self.open_part(keys, SNAPSHOT, c, d, (s.id, &s.bytes))?;
                Some(Snapshot { id, bytes })
            }
            None => None,
        };
        let chunks = records
            .chunks
            .iter()
            .map(|(name, bytes)| self.open_part(keys, CHUNK, c, d, (*name, bytes)))
            .collect::<Result<Vec<_>>>()?;
        Ok(DocRecords { meta, snapshot, chunks, seq: records.seq })
    }
}

/// The name a part of `d` with content id `id` is stored under.
fn part_name(names: &IdKey, d: &DocId, id: ChunkId) -> ChunkId {
    ChunkId::from_bytes(names.name(d.as_bytes(), id.as_bytes()))
}

/// A chunk or snapshot (`kind`) of `d`, sealed for the backend: its stored name, and its content
/// id and bytes sealed for that name.
fn seal_part(
    key: &DataKey,
    kind: u8,
    c: &CustomerId,
    d: &DocId,
    id: ChunkId,
    bytes: &[u8],
) -> (ChunkId, Vec<u8>) {
    let name = part_name(&key.id_key(), d, id);
    let aad = doc_aad(kind, c, d, name.as_bytes());
    (name, envelope::seal_concat(key, &aad, &[id.as_bytes(), bytes]))
}

#[cfg(test)]
mod tests;
