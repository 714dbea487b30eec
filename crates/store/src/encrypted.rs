//! The encryption decorator: seals every value on its way into a backend.
//!
//! Each customer has a random data key, wrapped by the keyring's current KEK and stored through
//! [`Store::put_key_if_absent`]. Metadata, chunks, snapshots and records are sealed with that key;
//! the associated data names the customer, the document or record key, the record kind and its
//! position, and is rebuilt from where the record is read. Keys (ids and positions) stay plain so
//! backends can order and scan them; they are random ids or counters and reveal no content.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cubby_core::{CustomerId, DocId, Seq};
use cubby_crypto::envelope;
use cubby_crypto::keys::{DataKey, Keyring};

use crate::{Chunk, CustomerLocks, DocRecords, Result, SYSTEM, Snapshot, Space, Store, StoreError};

const META: u8 = b'm';
const CHUNK: u8 = b'c';
const SNAPSHOT: u8 = b's';
const RECORD: u8 = b'r';

fn doc_aad(kind: u8, customer: &CustomerId, doc: &DocId, position: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(48);
    aad.extend_from_slice(b"cubby1");
    aad.push(kind);
    aad.extend_from_slice(customer.as_bytes());
    aad.extend_from_slice(doc.as_bytes());
    aad.extend_from_slice(&position.to_be_bytes());
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
/// Erasing a customer ([`Store::erase_customer`]) crypto-shreds: it records a tombstone, destroys
/// the customer's wrapped data key durably, and only then removes their records. A tombstoned
/// customer never gets a key again, so nothing can be written or read for them afterwards.
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

/// A chunk's index and its sealed bytes.
type SealedChunk = (u64, Vec<u8>);

impl<S: Store> EncryptedStore<S> {
    /// Wraps `inner`. The first open stores a key check; later opens verify it, so a wrong
    /// master key is refused here rather than discovered one record at a time.
    pub fn open(inner: S, keyring: Keyring) -> Result<Self> {
        let check = match inner.get_key(&SYSTEM)? {
            Some(wrapped) => wrapped,
            None => {
                let wrapped = inner.put_key_if_absent(
                    &SYSTEM,
                    &keyring.wrap(SYSTEM.as_bytes(), &DataKey::generate()),
                )?;
                inner.flush()?;
                wrapped
            }
        };
        let system =
            keyring.unwrap(SYSTEM.as_bytes(), &check).map_err(|_| StoreError::WrongMasterKey)?;
        Ok(Self {
            inner,
            keyring: RwLock::new(Arc::new(keyring)),
            system,
            keys: Mutex::new(HashMap::new()),
            key_locks: CustomerLocks::default(),
        })
    }

    fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().unwrap_or_else(PoisonError::into_inner).clone()
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

    fn cached_key(&self, customer: &CustomerId) -> Option<DataKey> {
        self.cache().get(customer).cloned()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<CustomerId, DataKey>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A document's metadata and chunk (its index and sealed bytes) sealed under the customer's
    /// key, each bound to where it is stored.
    fn seal_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &[u8],
        chunk: Option<Chunk<'_>>,
    ) -> Result<(Vec<u8>, Option<SealedChunk>)> {
        let key = self.key(c)?;
        let meta = envelope::seal(&key, &doc_aad(META, c, d, 0), meta);
        let chunk = chunk
            .map(|ch| (ch.index, envelope::seal(&key, &doc_aad(CHUNK, c, d, ch.index), ch.bytes)));
        Ok((meta, chunk))
    }

    fn open_doc_records(
        &self,
        c: &CustomerId,
        d: &DocId,
        records: DocRecords,
    ) -> Result<DocRecords> {
        let key = self.key(c)?;
        let open = |kind, pos, what, bytes: &[u8]| {
            envelope::open(&key, &doc_aad(kind, c, d, pos), bytes)
                .map_err(|_| StoreError::Corrupt(what))
        };
        let meta = open(META, 0, "metadata", &records.meta)?;
        let snapshot = match records.snapshot {
            Some(s) => Some(Snapshot {
                through: s.through,
                bytes: open(SNAPSHOT, s.through, "snapshot", &s.bytes)?,
            }),
            None => None,
        };
        let chunks = records
            .chunks
            .into_iter()
            .map(|(i, bytes)| Ok((i, open(CHUNK, i, "chunk", &bytes)?)))
            .collect::<Result<_>>()?;
        Ok(DocRecords { meta, snapshot, chunks, seq: records.seq })
    }
}

impl<S: Store> Store for EncryptedStore<S> {
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

    /// Crypto-shreds the customer: a durable tombstone first (so no key is ever made for them
    /// again), then the wrapped data key is destroyed durably, then their records are removed.
    /// Erasing an erased customer is allowed and changes nothing readable.
    fn erase_customer(&self, customer: &CustomerId) -> Result<()> {
        if *customer == SYSTEM {
            return Err(StoreError::Backend("the store's own records cannot be erased".into()));
        }
        if self.erased_at(customer)?.is_none() {
            let at = cubby_core::meta::unix_ms().to_be_bytes();
            let aad = record_aad(&SYSTEM, Space::TOMBSTONES, customer.as_bytes());
            let sealed = envelope::seal(&self.system, &aad, &at);
            self.inner.put_record(&SYSTEM, Space::TOMBSTONES, customer.as_bytes(), &sealed)?;
            self.inner.flush()?;
        }
        self.destroy_key(customer)?;
        self.inner.erase_customer(customer)?;
        self.inner.flush()
    }

    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &[u8],
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        let (meta, sealed) = self.seal_doc(c, d, meta, chunk)?;
        let chunk = sealed.as_ref().map(|(index, bytes)| Chunk { index: *index, bytes });
        self.inner.write_doc(c, d, &meta, chunk)
    }

    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &[u8],
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        let (meta, sealed) = self.seal_doc(c, d, meta, chunk)?;
        let chunk = sealed.as_ref().map(|(index, bytes)| Chunk { index: *index, bytes });
        self.inner.write_doc_off_feed(c, d, &meta, chunk)
    }

    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        match self.inner.load(c, d)? {
            Some(records) => Ok(Some(self.open_doc_records(c, d, records)?)),
            None => Ok(None),
        }
    }

    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<Vec<u8>>> {
        match self.inner.doc_meta(c, d)? {
            Some(sealed) => Ok(Some(
                envelope::open(&self.key(c)?, &doc_aad(META, c, d, 0), &sealed)
                    .map_err(|_| StoreError::Corrupt("metadata"))?,
            )),
            None => Ok(None),
        }
    }

    fn compact(&self, c: &CustomerId, d: &DocId, snapshot: &Snapshot) -> Result<()> {
        let key = self.key(c)?;
        let bytes =
            envelope::seal(&key, &doc_aad(SNAPSHOT, c, d, snapshot.through), &snapshot.bytes);
        self.inner.compact(c, d, &Snapshot { through: snapshot.through, bytes })
    }

    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        self.inner.delete_doc(c, d)
    }

    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Vec<u8>)>> {
        let key = self.key(c)?;
        self.inner
            .list_docs(c)?
            .into_iter()
            .map(|(d, meta)| {
                let meta = envelope::open(&key, &doc_aad(META, c, &d, 0), &meta)
                    .map_err(|_| StoreError::Corrupt("metadata"))?;
                Ok((d, meta))
            })
            .collect()
    }

    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        self.inner.feed_since(c, cursor)
    }

    fn put_record(&self, c: &CustomerId, space: Space, key: &[u8], value: &[u8]) -> Result<()> {
        let sealed = envelope::seal(&self.key(c)?, &record_aad(c, space, key), value);
        self.inner.put_record(c, space, key, &sealed)
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
        self.inner.remove_record(c, space, key)
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

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
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
                Some(Chunk { index: 0, bytes: b"MARKER-chunk" }),
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
                    .write_doc(&c, &d, b"m", Some(Chunk { index: 0, bytes: b"x" }))
                    .expect("write");
            }
        }
        let stolen = backend.load(&ALICE, &DOC).expect("load").expect("exists");
        let sealed_chunk = stolen.chunks[0].1.clone();
        // Into Bob's store, same document id: another data key and another customer in the AAD.
        backend
            .write_doc(&BOB, &DOC, &stolen.meta, Some(Chunk { index: 0, bytes: &sealed_chunk }))
            .expect("raw write");
        assert!(matches!(store.load(&BOB, &DOC), Err(StoreError::Corrupt(_))));
        // Into Alice's other document: same key, but the AAD names another document.
        backend.write_doc(&ALICE, &OTHER_DOC, &stolen.meta, None).expect("raw write");
        assert!(matches!(store.load(&ALICE, &OTHER_DOC), Err(StoreError::Corrupt(_))));
        // To another position in the same document.
        backend
            .write_doc(&ALICE, &DOC, &stolen.meta, Some(Chunk { index: 1, bytes: &sealed_chunk }))
            .expect("raw write");
        assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Corrupt("chunk"))));
        // Bob's untouched document still opens.
        assert!(store.load(&BOB, &OTHER_DOC).expect("load").is_some());
    }

    #[test]
    fn an_erased_customer_gets_no_new_key_and_their_old_records_do_not_open() {
        let backend = MemoryStore::new();
        let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
        store.write_doc(&ALICE, &DOC, b"m", Some(Chunk { index: 0, bytes: b"x" })).expect("write");
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
        assert_eq!(store.doc_meta(&ALICE, &DOC).expect("meta").as_deref(), Some(&b"alice"[..]));
        assert_eq!(store.doc_meta(&BOB, &DOC).expect("meta").as_deref(), Some(&b"bob"[..]));
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
        assert_eq!(read.expect("bob and carol are served").as_deref(), Some(&b"bob"[..]));

        let_alice_go.send(()).expect("alice is waiting");
        alice.join().expect("no panic").expect("alice's write lands once her key is made");
        assert_eq!(store.doc_meta(&ALICE, &DOC).expect("meta").as_deref(), Some(&b"alice"[..]));
    }
}
