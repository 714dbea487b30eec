//! The encryption decorator: seals every value on its way into a backend, and checks that what
//! comes back is what was acknowledged.
//!
//! Each customer has a random data key, wrapped by the keyring's current KEK and stored through
//! [`Store::put_key_if_absent`]. Metadata, chunks, snapshots and records are sealed with that key;
//! the associated data names the customer, the document or record key, the record kind and its
//! position, and is rebuilt from where the record is read. A document's metadata is sealed for
//! the feed position its write left the document at ([`MetaAt`]), so an older copy of it spliced
//! over the newer one does not open; a chunk or snapshot is sealed for its content id, so none
//! opens in another's place (a missing one is found when the document is rebuilt:
//! `cubby_core::history`). Keys (ids and positions) stay plain so backends can order and scan
//! them; they are random ids, content hashes of sealed parts, or counters, and reveal no
//! content.
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
use cubby_crypto::keys::{DataKey, Keyring};

use crate::witness::{Anchor, LedgerEntry, Witness};
use crate::{
    Chunk, CustomerLocks, DocRecords, Docs, IntegrityError, Keys, MetaAt, Records, Result, SYSTEM,
    Snapshot, Space, Store, StoreError, Write,
};

const META: u8 = b'm';
const CHUNK: u8 = b'c';
const SNAPSHOT: u8 = b's';
const RECORD: u8 = b'r';

/// The store format this code writes and reads: 3 names chunks and snapshots by their content
/// ([`ChunkId`]). (Format 2 numbered them; format 1 stores, which have no format record, also
/// sealed metadata for position 0.)
pub const FORMAT: u32 = 3;

/// The associated data of a document's metadata (`position`: its feed position) or of one of
/// its parts (`position`: the part's content id).
fn doc_aad(kind: u8, customer: &CustomerId, doc: &DocId, position: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(55 + position.len());
    aad.extend_from_slice(b"cubby1");
    aad.push(kind);
    aad.extend_from_slice(customer.as_bytes());
    aad.extend_from_slice(doc.as_bytes());
    aad.extend_from_slice(position);
    aad
}

fn record_aad(customer: &CustomerId, space: Space, key: &[u8]) -> Vec<u8> {
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
    fn new(witness: Arc<dyn Witness>, key: DataKey, flushes: u64) -> Self {
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
type SealedChunk = (ChunkId, Vec<u8>);

/// A document's metadata, sealed for the position the backend writes it at.
struct SealedMeta<'a> {
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

/// A write of a batch, sealed for the backend ([`Store::commit`]).
enum Sealed<'a> {
    Doc {
        customer: &'a CustomerId,
        doc: &'a DocId,
        meta: SealedMeta<'a>,
        chunk: Option<SealedChunk>,
        feed: bool,
    },
    Compact {
        customer: &'a CustomerId,
        doc: &'a DocId,
        snapshot: Snapshot,
        replaces: &'a [ChunkId],
    },
    Delete {
        customer: &'a CustomerId,
        doc: &'a DocId,
    },
    Record {
        customer: &'a CustomerId,
        space: Space,
        key: &'a [u8],
        value: Vec<u8>,
    },
}

impl Sealed<'_> {
    fn as_write(&self) -> Write<'_> {
        match self {
            Self::Doc { customer, doc, meta, chunk, feed } => Write::Doc {
                customer,
                doc,
                meta,
                chunk: chunk.as_ref().map(|(id, bytes)| Chunk { id: *id, bytes }),
                feed: *feed,
            },
            Self::Compact { customer, doc, snapshot, replaces } => {
                Write::Compact { customer, doc, snapshot, replaces }
            }
            Self::Delete { customer, doc } => Write::Delete { customer, doc },
            Self::Record { customer, space, key, value } => {
                Write::Record { customer, space: *space, key, value }
            }
        }
    }
}

/// The store's own records under [`Space::INTEGRITY`].
const FORMAT_KEY: &[u8] = b"format";
const STORE_KEY: &[u8] = b"store";
const EPOCH_KEY: &[u8] = b"epoch";
const FLUSHES_KEY: &[u8] = b"flushes";

impl<S: Store> EncryptedStore<S> {
    /// Wraps `inner`. The first open stores a key check and the store's identity; later opens
    /// verify the key check, so a wrong master key is refused here rather than discovered one
    /// record at a time, and the format. No anchor is kept: for a device's store, or a copy
    /// being read.
    pub fn open(inner: S, keyring: Keyring) -> Result<Self> {
        Ok(Self::open_unchecked(inner, keyring)?.0)
    }

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
        if let Some(sealed) = &sealed {
            if inner.get_key(&SYSTEM)?.is_none() {
                // An anchor that does not open is another master key's.
                let anchor = Anchor::open(&key, sealed).map_err(|_| StoreError::WrongMasterKey)?;
                let acknowledged = anchor.flushes;
                return Err(StoreError::Integrity(IntegrityError::Wiped { acknowledged }));
            }
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
        let (mut store, _) = Self::open_unchecked(inner, keyring)?;
        let epoch = cubby_crypto::random_array();
        store.put_system(EPOCH_KEY, &epoch)?;
        store.inner.flush()?;
        store.identity.epoch = epoch;
        let found = store.stored_flushes()?;
        let key = store.keyring().witness_key().clone();
        store.witnessed = Some(Witnessed::new(witness, key, found));
        store.write_anchor(found)?;
        store.replay_erasures()?;
        Ok(store)
    }

    /// The key check, format and identity; `true` when the store was new.
    fn open_unchecked(inner: S, keyring: Keyring) -> Result<(Self, bool)> {
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
            if found != Some(FORMAT) {
                return Err(StoreError::Format { found: found.unwrap_or(1), expected: FORMAT });
            }
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

    fn get_system(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.inner.get_record(&SYSTEM, Space::INTEGRITY, key)? {
            Some(sealed) => Ok(Some(
                envelope::open(&self.system, &record_aad(&SYSTEM, Space::INTEGRITY, key), &sealed)
                    .map_err(|_| StoreError::Corrupt("store identity"))?,
            )),
            None => Ok(None),
        }
    }

    fn put_system(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let sealed =
            envelope::seal(&self.system, &record_aad(&SYSTEM, Space::INTEGRITY, key), value);
        self.inner.put_record(&SYSTEM, Space::INTEGRITY, key, &sealed)
    }

    /// The flushes the store itself says it has made durable.
    fn stored_flushes(&self) -> Result<u64> {
        Ok(match self.get_system(FLUSHES_KEY)? {
            Some(bytes) => u64::from_be_bytes(
                bytes.try_into().map_err(|_| StoreError::Corrupt("store identity"))?,
            ),
            None => 0,
        })
    }

    fn write_anchor(&self, flushes: u64) -> Result<()> {
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
    fn replay_erasures(&self) -> Result<()> {
        for entry in self.ledger()? {
            let LedgerEntry::Erased { customer, at_ms } = entry else { continue };
            if self.inner.get_key(&customer)?.is_some() || self.erased_at(&customer)?.is_none() {
                self.shred(&customer, at_ms)?;
            }
        }
        Ok(())
    }

    fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Notes a write, for the next flush to count. Called once the write is in (whatever its
    /// outcome: part of it may be): a flush that began after this sees it, and one that began
    /// before holds the flush lock, so the writer's own flush waits for it to finish.
    fn wrote(&self) {
        if let Some(w) = &self.witnessed {
            w.dirty.store(true, Ordering::SeqCst);
        }
    }

    fn after_write<T>(&self, written: Result<T>) -> Result<T> {
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

    fn key(&self, customer: &CustomerId) -> Result<DataKey> {
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

    fn cached_key(&self, customer: &CustomerId) -> Option<DataKey> {
        self.cache().get(customer).cloned()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<CustomerId, DataKey>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A document's metadata (sealed when the backend writes it, for its position) and chunk
    /// (its id and sealed bytes) under the customer's key, each bound to where it is stored.
    fn seal_doc<'a>(
        &self,
        c: &'a CustomerId,
        d: &'a DocId,
        meta: &'a dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<(SealedMeta<'a>, Option<SealedChunk>)> {
        let key = self.key(c)?;
        let chunk = chunk.map(|ch| {
            (ch.id, envelope::seal(&key, &doc_aad(CHUNK, c, d, ch.id.as_bytes()), ch.bytes))
        });
        Ok((SealedMeta { key, customer: c, doc: d, plain: meta }, chunk))
    }

    fn seal_snapshot(&self, c: &CustomerId, d: &DocId, snapshot: &Snapshot) -> Result<Snapshot> {
        let key = self.key(c)?;
        let aad = doc_aad(SNAPSHOT, c, d, snapshot.id.as_bytes());
        Ok(Snapshot { id: snapshot.id, bytes: envelope::seal(&key, &aad, &snapshot.bytes) })
    }

    /// One write of a batch, sealed; an erased customer's fails alone.
    fn seal_write<'a>(&self, write: &Write<'a>) -> Result<Sealed<'a>> {
        Ok(match *write {
            Write::Doc { customer, doc, meta, chunk, feed } => {
                let (meta, chunk) = self.seal_doc(customer, doc, meta, chunk)?;
                Sealed::Doc { customer, doc, meta, chunk, feed }
            }
            Write::Compact { customer, doc, snapshot, replaces } => Sealed::Compact {
                customer,
                doc,
                snapshot: self.seal_snapshot(customer, doc, snapshot)?,
                replaces,
            },
            Write::Delete { customer, doc } => Sealed::Delete { customer, doc },
            Write::Record { customer, space, key, value } => {
                let value =
                    envelope::seal(&self.key(customer)?, &record_aad(customer, space, key), value);
                Sealed::Record { customer, space, key, value }
            }
        })
    }

    fn open_meta(&self, c: &CustomerId, d: &DocId, seq: Seq, sealed: &[u8]) -> Result<Vec<u8>> {
        envelope::open(&self.key(c)?, &doc_aad(META, c, d, &seq.0.to_be_bytes()), sealed)
            .map_err(|_| StoreError::Corrupt("metadata"))
    }

    /// Crypto-shreds the customer (see [`Store::erase_customer`]), with a tombstone dated
    /// `at_ms`.
    fn shred(&self, customer: &CustomerId, at_ms: u64) -> Result<()> {
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

    fn open_doc_records(
        &self,
        c: &CustomerId,
        d: &DocId,
        records: DocRecords,
    ) -> Result<DocRecords> {
        let key = self.key(c)?;
        let open = |kind, position: &[u8], what, bytes: &[u8]| {
            envelope::open(&key, &doc_aad(kind, c, d, position), bytes)
                .map_err(|_| StoreError::Corrupt(what))
        };
        let meta = open(META, &records.seq.0.to_be_bytes(), "metadata", &records.meta)?;
        let snapshot = match records.snapshot {
            Some(s) => Some(Snapshot {
                id: s.id,
                bytes: open(SNAPSHOT, s.id.as_bytes(), "snapshot", &s.bytes)?,
            }),
            None => None,
        };
        let chunks = records
            .chunks
            .into_iter()
            .map(|(id, bytes)| Ok((id, open(CHUNK, id.as_bytes(), "chunk", &bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(DocRecords { meta, snapshot, chunks, seq: records.seq })
    }
}

impl<S: Store> Keys for EncryptedStore<S> {
    fn get_key(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.inner.get_key(customer)
    }

    fn put_key_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        self.inner.put_key_if_absent(customer, wrapped)
    }

    fn replace_key(&self, customer: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        self.inner.replace_key(customer, expected, new)
    }

    fn destroy_key(&self, customer: &CustomerId) -> Result<()> {
        let _guard = self.key_locks.lock(customer);
        self.cache().remove(customer);
        self.inner.destroy_key(customer)
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.inner.list_customers()
    }
}

impl<S: Store> Docs for EncryptedStore<S> {
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        let (meta, sealed) = self.seal_doc(c, d, meta, chunk)?;
        let chunk = sealed.as_ref().map(|(id, bytes)| Chunk { id: *id, bytes });
        self.after_write(self.inner.write_doc(c, d, &meta, chunk))
    }

    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        let (meta, sealed) = self.seal_doc(c, d, meta, chunk)?;
        let chunk = sealed.as_ref().map(|(id, bytes)| Chunk { id: *id, bytes });
        self.after_write(self.inner.write_doc_off_feed(c, d, &meta, chunk))
    }

    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        match self.inner.load(c, d)? {
            Some(records) => Ok(Some(self.open_doc_records(c, d, records)?)),
            None => Ok(None),
        }
    }

    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        match self.inner.doc_meta(c, d)? {
            Some((seq, sealed)) => Ok(Some((seq, self.open_meta(c, d, seq, &sealed)?))),
            None => Ok(None),
        }
    }

    fn compact(
        &self,
        c: &CustomerId,
        d: &DocId,
        snapshot: &Snapshot,
        replaces: &[ChunkId],
    ) -> Result<()> {
        let sealed = self.seal_snapshot(c, d, snapshot)?;
        self.after_write(self.inner.compact(c, d, &sealed, replaces))
    }

    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        self.after_write(self.inner.delete_doc(c, d))
    }

    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        // The key first: an erased customer's listing is refused, not empty.
        let key = self.key(c)?;
        self.inner
            .list_docs(c)?
            .into_iter()
            .map(|(d, seq, sealed)| {
                let meta =
                    envelope::open(&key, &doc_aad(META, c, &d, &seq.0.to_be_bytes()), &sealed)
                        .map_err(|_| StoreError::Corrupt("metadata"))?;
                Ok((d, seq, meta))
            })
            .collect()
    }

    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        self.inner.feed_since(c, cursor)
    }

    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        self.inner.feed_head(c)
    }
}

impl<S: Store> Records for EncryptedStore<S> {
    fn put_record(&self, c: &CustomerId, space: Space, key: &[u8], value: &[u8]) -> Result<()> {
        let sealed = envelope::seal(&self.key(c)?, &record_aad(c, space, key), value);
        self.after_write(self.inner.put_record(c, space, key, &sealed))
    }

    fn get_record(&self, c: &CustomerId, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.inner.get_record(c, space, key)? {
            Some(sealed) => Ok(Some(
                envelope::open(&self.key(c)?, &record_aad(c, space, key), &sealed)
                    .map_err(|_| StoreError::Corrupt("record"))?,
            )),
            None => Ok(None),
        }
    }

    fn remove_record(&self, c: &CustomerId, space: Space, key: &[u8]) -> Result<()> {
        self.after_write(self.inner.remove_record(c, space, key))
    }

    fn scan_records(&self, c: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let records = self.inner.scan_records(c, space)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let data_key = self.key(c)?;
        records
            .into_iter()
            .map(|(k, sealed)| {
                let value = envelope::open(&data_key, &record_aad(c, space, &k), &sealed)
                    .map_err(|_| StoreError::Corrupt("record"))?;
                Ok((k, value))
            })
            .collect()
    }
}

impl<S: Store> Store for EncryptedStore<S> {
    /// Crypto-shreds the customer: with a witness, the erasure goes in the ledger first (so no
    /// restore of the store brings the customer back); then a durable tombstone (so no key is
    /// ever made for them again), then the wrapped data key is destroyed durably, then their
    /// records are removed. Erasing an erased customer is allowed and changes nothing readable.
    fn erase_customer(&self, customer: &CustomerId) -> Result<()> {
        if *customer == SYSTEM {
            return Err(StoreError::Backend("the store's own records cannot be erased".into()));
        }
        let at_ms = match self.erased_at(customer)? {
            Some(erased) => erased.at_ms,
            None => {
                let at_ms = cubby_core::meta::unix_ms();
                self.append_ledger(&LedgerEntry::Erased { customer: *customer, at_ms })?;
                at_ms
            }
        };
        self.shred(customer, at_ms)
    }

    /// Makes every write that returned before it durable. With a witness, a flush that has
    /// writes to make durable also records its number in the store and then, once the store
    /// has flushed, in the anchor: only then does the caller learn it succeeded.
    fn flush(&self) -> Result<()> {
        let Some(w) = &self.witnessed else { return self.inner.flush() };
        let mut flushes = w.flushes.lock().unwrap_or_else(PoisonError::into_inner);
        // Writes made while an earlier flush ran set this again after it cleared it. With none
        // counted, the store is flushed all the same (cheap when there is nothing to write),
        // so that no write depends on having been counted to become durable.
        if !w.dirty.swap(false, Ordering::SeqCst) {
            return self.inner.flush();
        }
        let next = *flushes + 1;
        let durable = self
            .put_system(FLUSHES_KEY, &next.to_be_bytes())
            .and_then(|()| self.inner.flush())
            .and_then(|()| self.write_anchor(next));
        if let Err(err) = durable {
            w.dirty.store(true, Ordering::SeqCst);
            return Err(err);
        }
        *flushes = next;
        Ok(())
    }

    /// Seals the batch and hands it to the backend as one batch. With a witness, the flush's
    /// number goes in the same batch, and the anchor follows once the backend has made it
    /// durable, as for [`Store::flush`].
    fn commit(&self, batch: &[Write<'_>]) -> Result<Vec<Result<Option<Seq>>>> {
        let sealed: Vec<Result<Sealed<'_>>> = batch.iter().map(|w| self.seal_write(w)).collect();
        let mut writes: Vec<Write<'_>> =
            sealed.iter().filter_map(|s| s.as_ref().ok().map(Sealed::as_write)).collect();
        let taken = writes.len();
        let Some(w) = &self.witnessed else {
            let outcomes = self.inner.commit(&writes)?;
            drop(writes);
            return Ok(merge(sealed, outcomes));
        };
        let mut flushes = w.flushes.lock().unwrap_or_else(PoisonError::into_inner);
        // The backend's commit makes every earlier write durable too: none is left to count.
        w.dirty.store(false, Ordering::SeqCst);
        let next = *flushes + 1;
        let count = envelope::seal(
            &self.system,
            &record_aad(&SYSTEM, Space::INTEGRITY, FLUSHES_KEY),
            &next.to_be_bytes(),
        );
        writes.push(Write::Record {
            customer: &SYSTEM,
            space: Space::INTEGRITY,
            key: FLUSHES_KEY,
            value: &count,
        });
        let durable = self.inner.commit(&writes).and_then(|mut outcomes| {
            outcomes.pop().expect("the count's outcome")?;
            self.write_anchor(next)?;
            Ok(outcomes)
        });
        drop(writes);
        match durable {
            Ok(outcomes) => {
                debug_assert_eq!(outcomes.len(), taken);
                *flushes = next;
                Ok(merge(sealed, outcomes))
            }
            Err(err) => {
                w.dirty.store(true, Ordering::SeqCst);
                Err(err)
            }
        }
    }
}

/// Each write's outcome: its sealing's failure, or the backend's outcome for it, in order.
fn merge(
    sealed: Vec<Result<Sealed<'_>>>,
    outcomes: Vec<Result<Option<Seq>>>,
) -> Vec<Result<Option<Seq>>> {
    let mut outcomes = outcomes.into_iter();
    sealed
        .into_iter()
        .map(|s| match s {
            Ok(_) => outcomes.next().unwrap_or(Err(StoreError::Backend("no outcome".into()))),
            Err(err) => Err(err),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::hooked::{Call, Hooked};
    use cubby_crypto::keys::MasterSecret;

    fn keyring(byte: u8) -> Keyring {
        Keyring::from_master(&MasterSecret::from_bytes([byte; 32]))
    }

    crate::conformance_tests!(|| {
        let backend = MemoryStore::new();
        move || EncryptedStore::open(backend.clone(), keyring(9)).expect("opens")
    });

    const ALICE: CustomerId = CustomerId::from_bytes([1; 16]);
    const BOB: CustomerId = CustomerId::from_bytes([2; 16]);
    const DOC: DocId = DocId::from_bytes([3; 16]);
    const OTHER_DOC: DocId = DocId::from_bytes([4; 16]);

    #[test]
    fn wrong_master_key_is_refused_at_open() {
        let backend = MemoryStore::new();
        EncryptedStore::open(backend.clone(), keyring(1)).expect("first open");
        assert!(matches!(
            EncryptedStore::open(backend, keyring(2)),
            Err(StoreError::WrongMasterKey)
        ));
    }

    #[test]
    fn nothing_plain_reaches_the_backend() {
        let backend = MemoryStore::new();
        let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
        store
            .write_doc(
                &ALICE,
                &DOC,
                b"MARKER-meta",
                Some(Chunk { id: ChunkId::of(b"MARKER-chunk"), bytes: b"MARKER-chunk" }),
            )
            .expect("write");
        store.put_record(&ALICE, Space::DEVICES, b"k", b"MARKER-record").expect("put");
        let raw = backend.load(&ALICE, &DOC).expect("load").expect("exists");
        let everything = [
            raw.meta.clone(),
            raw.chunks[0].1.clone(),
            backend.get_record(&ALICE, Space::DEVICES, b"k").expect("get").expect("exists"),
        ]
        .concat();
        assert!(!everything.windows(6).any(|w| w == b"MARKER"));
    }

    #[test]
    fn chunk_moved_to_another_customer_or_document_or_position_fails_to_open() {
        let backend = MemoryStore::new();
        let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
        for c in [ALICE, BOB] {
            for d in [DOC, OTHER_DOC] {
                store
                    .write_doc(&c, &d, b"m", Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }))
                    .expect("write");
            }
        }
        let stolen = backend.load(&ALICE, &DOC).expect("load").expect("exists");
        let (id, sealed_chunk) = stolen.chunks[0].clone();
        // Into Bob's store, same document id: another data key and another customer in the AAD.
        backend
            .write_doc(&BOB, &DOC, &stolen.meta, Some(Chunk { id, bytes: &sealed_chunk }))
            .expect("raw write");
        assert!(matches!(store.load(&BOB, &DOC), Err(StoreError::Corrupt(_))));
        // Into Alice's other document: same key, but the AAD names another document.
        backend.write_doc(&ALICE, &OTHER_DOC, &stolen.meta, None).expect("raw write");
        assert!(matches!(store.load(&ALICE, &OTHER_DOC), Err(StoreError::Corrupt(_))));
        // Under another id in the same document.
        let other = ChunkId::of(b"y");
        backend
            .write_doc(&ALICE, &DOC, &stolen.meta, Some(Chunk { id: other, bytes: &sealed_chunk }))
            .expect("raw write");
        assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Corrupt(_))));
        // Bob's untouched document still opens.
        assert!(store.load(&BOB, &OTHER_DOC).expect("load").is_some());
    }

    #[test]
    fn an_erased_customer_gets_no_new_key_and_their_old_records_do_not_open() {
        let backend = MemoryStore::new();
        let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
        let chunk = Chunk { id: ChunkId::of(b"x"), bytes: b"x" };
        store.write_doc(&ALICE, &DOC, b"m", Some(chunk)).expect("write");
        store.write_doc(&BOB, &DOC, b"m", None).expect("write");
        let stolen = backend.load(&ALICE, &DOC).expect("load").expect("exists");
        store.erase_customer(&ALICE).expect("erase");
        assert!(store.erased_at(&ALICE).expect("tombstone").is_some());
        assert_eq!(store.erased_customers().expect("list"), vec![ALICE]);
        assert_eq!(backend.get_key(&ALICE).expect("get"), None);
        // Nothing can be written for Alice again, even after a reopen, and a copy of her old
        // records put back by hand does not open.
        let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("reopens");
        assert!(matches!(store.write_doc(&ALICE, &DOC, b"m", None), Err(StoreError::Erased)));
        backend.write_doc(&ALICE, &DOC, &stolen.meta, None).expect("raw write");
        assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Erased)));
        assert!(store.load(&BOB, &DOC).expect("load").is_some());
    }

    #[test]
    fn rewrapping_moves_every_key_to_the_new_generation_and_keeps_data_readable() {
        let dir = std::env::temp_dir()
            .join(format!("cubby-rewrap-{}", u64::from_be_bytes(cubby_crypto::random_array())));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("master.key");
        let master = MasterSecret::create(&path).expect("creates");
        let backend = MemoryStore::new();
        let store =
            EncryptedStore::open(backend.clone(), Keyring::from_master(&master)).expect("opens");
        store.write_doc(&ALICE, &DOC, b"alice", None).expect("write");
        store.write_doc(&BOB, &DOC, b"bob", None).expect("write");
        assert_eq!(store.key_generations().expect("count"), BTreeMap::from([(1, 3)]));
        MasterSecret::rotate(&path).expect("rotates");
        store
            .set_keyring(Keyring::from_master(&MasterSecret::read(&path).expect("reads")))
            .expect("the rotated keyring opens the key check");
        assert!(matches!(store.set_keyring(keyring(42)), Err(StoreError::WrongMasterKey)));
        assert_eq!(store.rewrap_keys().expect("rewraps"), 3);
        assert_eq!(store.rewrap_keys().expect("nothing left"), 0);
        assert_eq!(store.key_generations().expect("count"), BTreeMap::from([(2, 3)]));
        MasterSecret::retire(&path, 1, |_| Ok(0)).expect("retires");
        // A fresh process with only generation 2 reads everything.
        let store = EncryptedStore::open(
            backend,
            Keyring::from_master(&MasterSecret::read(&path).expect("reads")),
        )
        .expect("opens with the new generation");
        assert_eq!(
            store.doc_meta(&ALICE, &DOC).expect("meta").map(|(_, m)| m).as_deref(),
            Some(&b"alice"[..])
        );
        assert_eq!(
            store.doc_meta(&BOB, &DOC).expect("meta").map(|(_, m)| m).as_deref(),
            Some(&b"bob"[..])
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_customer_whose_key_is_being_made_holds_up_no_other_customer() {
        const CAROL: CustomerId = CustomerId::from_bytes([5; 16]);
        let (entered, alice_entered) = std::sync::mpsc::channel();
        let (let_alice_go, release) = std::sync::mpsc::channel::<()>();
        let (entered, release) = (Mutex::new(entered), Mutex::new(release));
        // Making alice's key waits until the test lets it go, as a slow disk's `fsync`s would.
        let backend = Hooked::new(MemoryStore::new(), move |call: Call<'_>| {
            if let Call::PutKey(&ALICE) = call {
                let _ = entered.lock().expect("entered").send(());
                let _ = release.lock().expect("release").recv();
            }
        });
        let store = Arc::new(EncryptedStore::open(backend, keyring(9)).expect("opens"));
        store.write_doc(&BOB, &DOC, b"bob", None).expect("bob's key is made at once");

        let alice = {
            let store = store.clone();
            std::thread::spawn(move || store.write_doc(&ALICE, &DOC, b"alice", None))
        };
        let deadline = std::time::Duration::from_secs(10);
        alice_entered.recv_timeout(deadline).expect("alice's key is being made");

        // Meanwhile bob (key known) and carol (key still to make) read and write.
        let (served, others) = std::sync::mpsc::channel();
        {
            let store = store.clone();
            std::thread::spawn(move || {
                let _ = served.send(
                    store
                        .write_doc(&BOB, &OTHER_DOC, b"bob again", None)
                        .and_then(|_| store.write_doc(&CAROL, &DOC, b"carol", None))
                        .and_then(|_| store.doc_meta(&BOB, &DOC)),
                );
            });
        }
        let read = others.recv_timeout(deadline).expect("other customers waited on alice's key");
        assert_eq!(
            read.expect("bob and carol are served").map(|(_, m)| m).as_deref(),
            Some(&b"bob"[..])
        );

        let_alice_go.send(()).expect("alice is waiting");
        alice.join().expect("no panic").expect("alice's write lands once her key is made");
        assert_eq!(
            store.doc_meta(&ALICE, &DOC).expect("meta").map(|(_, m)| m).as_deref(),
            Some(&b"alice"[..])
        );
    }

    #[test]
    fn an_older_copy_of_a_documents_metadata_spliced_over_the_newer_does_not_open() {
        let backend = MemoryStore::new();
        let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
        store.write_doc(&ALICE, &DOC, b"shared", None).expect("write");
        let (_, old) = backend.doc_meta(&ALICE, &DOC).expect("meta").expect("exists");
        store.write_doc(&ALICE, &DOC, b"private", None).expect("the newer metadata");
        // The old sealed bytes put back in place, as an attacker with the files could.
        backend.write_doc_off_feed(&ALICE, &DOC, &old, None).expect("raw splice");
        assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Corrupt("metadata"))));
        assert!(matches!(store.doc_meta(&ALICE, &DOC), Err(StoreError::Corrupt("metadata"))));
        assert!(matches!(store.list_docs(&ALICE), Err(StoreError::Corrupt("metadata"))));
    }

    #[test]
    fn a_store_in_another_format_is_refused() {
        let backend = MemoryStore::new();
        // A store written before formats were recorded: a key check and nothing else.
        backend
            .put_key_if_absent(&SYSTEM, &keyring(1).wrap(SYSTEM.as_bytes(), &DataKey::generate()))
            .expect("key check");
        let refused = EncryptedStore::open(backend, keyring(1)).expect_err("refused");
        assert!(matches!(refused, StoreError::Format { found: 1, expected: FORMAT }), "{refused}");
    }

    fn witnessed(
        backend: &MemoryStore,
        witness: &crate::witness::MemoryWitness,
    ) -> Result<EncryptedStore<MemoryStore>> {
        EncryptedStore::open_witnessed(backend.clone(), keyring(1), Arc::new(witness.clone()))
    }

    #[test]
    fn a_store_that_lost_acknowledged_flushes_is_refused_until_the_operator_starts_an_epoch() {
        let witness = crate::witness::MemoryWitness::new();
        let backend = MemoryStore::new();
        let store = witnessed(&backend, &witness).expect("a new store opens");
        store.write_doc(&ALICE, &DOC, b"first", None).expect("write");
        store.flush().expect("flush 1");
        let backup = backend.copy();
        store.write_doc(&ALICE, &DOC, b"second", None).expect("write");
        store.flush().expect("flush 2");
        store.flush().expect("nothing written: not counted");
        let epoch = store.epoch();
        drop(store);

        assert!(witnessed(&backend, &witness).is_ok(), "the store as it was opens");
        let refused = witnessed(&backup, &witness).expect_err("the backup is behind");
        assert!(
            matches!(
                refused,
                StoreError::Integrity(IntegrityError::RolledBack { acknowledged: 2, found: 1 })
            ),
            "{refused}"
        );
        let empty = MemoryStore::new();
        let wiped = witnessed(&empty, &witness).expect_err("an empty store");
        assert!(matches!(wiped, StoreError::Integrity(IntegrityError::Wiped { acknowledged: 2 })));
        assert!(empty.get_key(&SYSTEM).expect("key").is_none(), "nothing written to it");
        let other_key =
            EncryptedStore::open_witnessed(backend.clone(), keyring(2), Arc::new(witness.clone()));
        assert!(matches!(other_key, Err(StoreError::WrongMasterKey)), "the key is named first");
        let unwitnessed = witnessed(&backend, &crate::witness::MemoryWitness::new());
        assert!(matches!(unwitnessed, Err(StoreError::Integrity(IntegrityError::AnchorMissing))));

        // The operator accepts the backup: a new epoch, and the store opens from then on.
        let restored =
            EncryptedStore::begin_epoch(backup.clone(), keyring(1), Arc::new(witness.clone()))
                .expect("accepted");
        assert_ne!(restored.epoch(), epoch);
        let meta = restored.doc_meta(&ALICE, &DOC).expect("meta").map(|(_, m)| m);
        assert_eq!(meta.as_deref(), Some(&b"first"[..]));
        drop(restored);
        assert!(witnessed(&backup, &witness).is_ok());
        // The store from before the restore is an earlier epoch's now.
        let old = witnessed(&backend, &witness).expect_err("an earlier epoch");
        assert!(matches!(old, StoreError::Integrity(IntegrityError::OldEpoch)), "{old}");
    }

    #[test]
    fn an_erasure_survives_the_restore_of_a_backup_taken_before_it() {
        let witness = crate::witness::MemoryWitness::new();
        let backend = MemoryStore::new();
        let store = witnessed(&backend, &witness).expect("opens");
        store
            .write_doc(&ALICE, &DOC, b"alice's", Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }))
            .expect("w");
        store.write_doc(&BOB, &DOC, b"bob's", None).expect("write");
        store.flush().expect("flush");
        let backup = backend.copy();
        store.erase_customer(&ALICE).expect("erase");
        drop(store);

        let restored =
            EncryptedStore::begin_epoch(backup.clone(), keyring(1), Arc::new(witness.clone()))
                .expect("the backup is accepted");
        assert!(restored.erased_at(&ALICE).expect("tombstone").is_some());
        assert_eq!(backup.get_key(&ALICE).expect("key"), None, "her key is destroyed again");
        assert!(backup.load(&ALICE, &DOC).expect("load").is_none(), "and her records removed");
        assert!(matches!(restored.load(&ALICE, &DOC), Ok(None) | Err(StoreError::Erased)));
        assert!(restored.load(&BOB, &DOC).expect("bob").is_some());
        assert_eq!(
            restored.ledger().expect("ledger").len(),
            1,
            "the erasure is in the ledger once"
        );
    }

    #[test]
    fn a_batch_with_an_erased_customers_write_commits_the_rest_as_one_counted_flush() {
        let backend = MemoryStore::new();
        let witness = crate::witness::MemoryWitness::new();
        let store = witnessed(&backend, &witness).expect("a new store");
        store.erase_customer(&BOB).expect("erase bob");
        let before = store.flushes();
        let meta = b"meta".to_vec();
        let batch = [
            Write::Doc {
                customer: &ALICE,
                doc: &DOC,
                meta: &meta,
                chunk: Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }),
                feed: true,
            },
            Write::Doc { customer: &BOB, doc: &DOC, meta: &meta, chunk: None, feed: true },
            Write::Record { customer: &ALICE, space: Space::AUDIT, key: b"k", value: b"v" },
        ];
        let outcomes = store.commit(&batch).expect("the batch commits");
        assert!(matches!(outcomes[0], Ok(Some(_))), "{outcomes:?}");
        assert!(matches!(outcomes[1], Err(StoreError::Erased)), "bob's write fails alone");
        assert!(matches!(outcomes[2], Ok(None)), "{outcomes:?}");
        assert_eq!(store.flushes(), before + 1, "one batch, one counted flush");
        drop(store);
        let store = witnessed(&backend, &witness).expect("the anchor names the batch's flush");
        assert_eq!(store.load(&ALICE, &DOC).expect("load").expect("alice's").chunks.len(), 1);
        assert_eq!(store.get_record(&ALICE, Space::AUDIT, b"k").expect("get"), Some(b"v".to_vec()));
    }
}
