//! Cubby's storage seam.
//!
//! [`Store`] speaks CRDT persistence for many customers' stores: documents kept as an optional
//! snapshot plus change chunks appended after it, compaction, a per-customer change feed, wrapped
//! data keys, and small keyed records (devices, sync states, audit entries). Backends implement it;
//! [`EncryptedStore`] wraps any backend so that every value it writes is sealed.
//!
//! ```
//! use cubby_core::{CustomerId, DocId, Seq};
//! use cubby_crypto::keys::{Keyring, MasterSecret};
//! use cubby_store::{Chunk, EncryptedStore, MemoryStore, Store};
//!
//! let keyring = Keyring::from_master(&MasterSecret::from_bytes([7; 32]));
//! let store = EncryptedStore::open(MemoryStore::new(), keyring)?;
//! let (alice, doc) = (CustomerId::from_bytes([1; 16]), DocId::from_bytes([2; 16]));
//! let seq = store.write_doc(&alice, &doc, b"meta", Some(Chunk { index: 0, bytes: b"change" }))?;
//! store.flush()?;
//! assert_eq!(store.feed_since(&alice, Seq(0))?, vec![(seq, doc)]);
//! let records = store.load(&alice, &doc)?.expect("the document exists");
//! assert_eq!(records.chunks, vec![(0, b"change".to_vec())]);
//! # Ok::<(), cubby_store::StoreError>(())
//! ```

#[cfg(feature = "conformance")]
pub mod conformance;
mod encrypted;
#[cfg(feature = "conformance")]
pub mod hooked;
mod locks;
mod memory;
pub mod witness;

pub use encrypted::{EncryptedStore, FORMAT};
pub use locks::CustomerLocks;
pub use memory::MemoryStore;

use cubby_core::{CustomerId, DocId, Seq};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk is full; nothing was written. Retry after space is freed.
    #[error("storage is full")]
    Full,
    /// The backend failed (I/O, corruption detected by the backend).
    #[error("storage failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A sealed record did not open: it was changed, moved, or belongs elsewhere.
    #[error("a stored {0} record failed authentication")]
    Corrupt(&'static str),
    /// Another process has the store open.
    #[error("the store is in use by another process")]
    InUse,
    /// The keyring does not open this store's keys: the master key is wrong.
    #[error("the master key does not match this data directory")]
    WrongMasterKey,
    /// The customer's store was erased; nothing can be read or written for them again.
    #[error("this customer's store was erased")]
    Erased,
    /// The store was written in another format than this code reads.
    #[error(
        "the store is in format {found}, and this Cubby reads format {expected}: it was written \
         by another version"
    )]
    Format {
        /// The store's format (1: written before formats were recorded).
        found: u32,
        /// The format this code reads.
        expected: u32,
    },
    /// The store does not hold everything this server acknowledged (see [`witness`]).
    #[error("the store cannot be vouched for: {0}")]
    Integrity(IntegrityError),
}

/// Why a witnessed store was refused at open: it is not, or no longer holds, what the server
/// acknowledged. The operator decides: put back the right files, or accept the store as it is
/// and start a new epoch (`EncryptedStore::begin_epoch`), after which devices offer again what
/// they hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrityError {
    /// It holds fewer flushes than the anchor says were made durable: restored from an older
    /// copy, rolled back, or cut short by damage.
    #[error(
        "it holds {found} flushes, but this server acknowledged {acknowledged}: it was restored \
         from an older copy, rolled back, or damaged"
    )]
    RolledBack {
        /// Flushes the anchor says were made durable.
        acknowledged: u64,
        /// Flushes the store holds.
        found: u64,
    },
    /// The store is empty, but the anchor says this server had a store with acknowledged
    /// writes. Nothing is written to the empty store.
    #[error(
        "it is empty, but this server had acknowledged {acknowledged} flushes of a store here: \
         the store was wiped or lost (nothing was written to it)"
    )]
    Wiped {
        /// Flushes the anchor says were made durable.
        acknowledged: u64,
    },
    /// The anchor names another store.
    #[error("it is not the store this server last used: it was replaced")]
    Replaced,
    /// The store is from before the last accepted restore.
    #[error("it is a copy from before the last accepted restore (an earlier epoch)")]
    OldEpoch,
    /// The store has data but no anchor.
    #[error("its anchor is missing, so nothing says what it should hold")]
    AnchorMissing,
}

/// Shorthand for storage results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A document's metadata as a write hands it to a backend: the bytes to store, given the feed
/// position the write leaves the document at (0 for a document that has none, such as a
/// device's). The encryption decorator seals the metadata for that position, which only the
/// backend knows while it writes, so that an older copy of the record spliced over a newer one
/// does not open; plain bytes are the same for every position.
pub trait MetaAt: Send + Sync {
    /// The bytes to store for position `seq`.
    fn at(&self, seq: Seq) -> Vec<u8>;
}

impl MetaAt for Vec<u8> {
    fn at(&self, _: Seq) -> Vec<u8> {
        self.clone()
    }
}

impl<const N: usize> MetaAt for [u8; N] {
    fn at(&self, _: Seq) -> Vec<u8> {
        self.to_vec()
    }
}

/// Metadata made by a function of the position (see [`MetaAt`]).
pub struct MetaFn<F>(pub F);

impl<F: Fn(Seq) -> Vec<u8> + Send + Sync> MetaAt for MetaFn<F> {
    fn at(&self, seq: Seq) -> Vec<u8> {
        (self.0)(seq)
    }
}

/// One change chunk: the `index`-th write to a document since it was created.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// Its position. Each document's chunks have increasing indexes.
    pub index: u64,
    /// The bytes (an `Automerge::save_after`).
    pub bytes: &'a [u8],
}

/// A snapshot that replaced every chunk up to and including `through`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The last chunk index the snapshot covers.
    pub through: u64,
    /// The bytes (an `Automerge::save`).
    pub bytes: Vec<u8>,
}

/// Everything stored for one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocRecords {
    /// The encoded metadata last written.
    pub meta: Vec<u8>,
    /// The latest snapshot, if the document was ever compacted.
    pub snapshot: Option<Snapshot>,
    /// Chunks written after the snapshot, by increasing index.
    pub chunks: Vec<(u64, Vec<u8>)>,
    /// The document's current position in the change feed, the one its metadata was written
    /// for (0 for a document that has none).
    pub seq: Seq,
}

impl DocRecords {
    /// The index the document's next chunk takes.
    pub fn next_chunk(&self) -> u64 {
        match (self.chunks.last(), &self.snapshot) {
            (Some((index, _)), _) => index + 1,
            (None, Some(snapshot)) => snapshot.through + 1,
            (None, None) => 0,
        }
    }

    /// Bytes of the chunks after the snapshot.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// A namespace of keyed records in a customer's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Space(pub u8);

impl Space {
    /// Devices registered to the customer.
    pub const DEVICES: Space = Space(1);
    /// Persisted sync sessions, per device and document.
    pub const SYNC_STATES: Space = Space(2);
    /// The customer's audit log.
    pub const AUDIT: Space = Space(3);
    /// A device's own bookkeeping (cursor, identity).
    pub const LOCAL: Space = Space(4);
    /// On a device: documents with local changes the server has not acknowledged yet.
    pub const UNSYNCED: Space = Space(5);
    /// Under [`SYSTEM`]: erased customers, keyed by customer id. Their keys are never recreated.
    pub const TOMBSTONES: Space = Space(6);
    /// Who the customer is (tenant and subject), sealed like everything else.
    pub const PROFILE: Space = Space(7);
    /// Access tokens refused before their expiry (used by a revoked device), keyed by SHA-256.
    pub const DENIED_TOKENS: Space = Space(8);
    /// What the integrity checks keep: under [`SYSTEM`], the store's identity, epoch, format
    /// and flush count; under a customer, the customer's epoch once their store needed one.
    pub const INTEGRITY: Space = Space(9);
    /// On a device: documents deleted elsewhere while it had changes to them the server never
    /// got, with their titles, until the app is told.
    pub const DISCARDED: Space = Space(10);
    /// On a device: documents to offer back to the server with what it needs to make them (it
    /// started a new epoch, or said it does not have them), until it holds everything of them.
    pub const HEAL: Space = Space(11);
}

/// The customer id under which a store keeps its own records (such as the key check).
pub const SYSTEM: CustomerId = CustomerId::from_bytes([0; 16]);

/// CRDT persistence for many customer stores.
///
/// Writes are visible to reads at once but durable only after [`Store::flush`] returns: callers
/// acknowledge nothing before that. Methods block; async callers run them off their workers.
pub trait Store: Send + Sync + 'static {
    /// The customer's wrapped data key, if one was stored.
    fn get_key(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>>;

    /// Stores `wrapped` as the customer's data key unless one exists; returns the one that won.
    /// Durable when it returns.
    fn put_key_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>>;

    /// Replaces the customer's wrapped data key with `new` if it is still `expected` (key
    /// rotation re-wraps the same data key). Returns whether it did. Durable when it returns.
    fn replace_key(&self, customer: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool>;

    /// Destroys the customer's wrapped data key, leaving no copy the backend knows of, and makes
    /// that durable before returning: every record sealed with the key is unreadable from then
    /// on (crypto-shredding).
    fn destroy_key(&self, customer: &CustomerId) -> Result<()>;

    /// Every customer with a data key, by id ([`SYSTEM`] included).
    fn list_customers(&self) -> Result<Vec<CustomerId>>;

    /// Removes every document, feed entry and record of the customer (their key is separate:
    /// [`Store::destroy_key`]). Durable after [`Store::flush`].
    fn erase_customer(&self, customer: &CustomerId) -> Result<()>;

    /// Writes a document's metadata and optionally one change chunk, and moves the document to
    /// the head of the customer's change feed. Returns the document's new feed position.
    ///
    /// A backend may make the parts durable separately, so that a crash before [`Store::flush`]
    /// keeps some of them, if every state it can keep is harmless: a document is never in the
    /// feed without its metadata (that reads as a deletion), a chunk is never kept without the
    /// feed move (it would never be announced), and a document kept without any feed position
    /// loads with position 0, which tells the caller to write it again.
    fn write_doc(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq>;

    /// Writes a document's metadata and optionally one change chunk, as [`Store::write_doc`]
    /// does, but leaves the customer's change feed as it is. For a store whose feed nobody reads
    /// (a device's): in the sled backend, moving the document in the feed is most of a small
    /// write's cost. Not atomic: a crash before [`Store::flush`] may keep the metadata without
    /// the chunk, never the chunk without the metadata. A backend without a cheaper way keeps
    /// this default, a `write_doc`. The metadata is stored for the document's current position.
    fn write_doc_off_feed(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        self.write_doc(customer, doc, meta, chunk).map(drop)
    }

    /// Everything stored for a document, or `None` if it does not exist (or was deleted).
    fn load(&self, customer: &CustomerId, doc: &DocId) -> Result<Option<DocRecords>>;

    /// A document's metadata alone, with the position it was written for, or `None` if the
    /// document does not exist.
    fn doc_meta(&self, customer: &CustomerId, doc: &DocId) -> Result<Option<(Seq, Vec<u8>)>>;

    /// Replaces the snapshot and drops every chunk with an index up to `snapshot.through`: loads
    /// never return them again. A backend may remove them from disk later (the sled backend
    /// removes a few with each write after the compaction, so that no one write pays for all).
    fn compact(&self, customer: &CustomerId, doc: &DocId, snapshot: &Snapshot) -> Result<()>;

    /// Deletes a document's content and metadata; its feed entry moves to the head, so devices
    /// learn of the deletion.
    fn delete_doc(&self, customer: &CustomerId, doc: &DocId) -> Result<Seq>;

    /// Every live document with its metadata and the position it was written for, by id.
    fn list_docs(&self, customer: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>>;

    /// Documents whose feed position is after `cursor`, by increasing position. Each document
    /// appears once, at its latest position.
    fn feed_since(&self, customer: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>>;

    /// The customer's last feed position taken (0 before any): no device can have seen a later
    /// one, so one that says it has shows this store is behind what it once acknowledged.
    fn feed_head(&self, customer: &CustomerId) -> Result<Seq>;

    /// Writes a keyed record.
    fn put_record(
        &self,
        customer: &CustomerId,
        space: Space,
        key: &[u8],
        value: &[u8],
    ) -> Result<()>;

    /// Reads a keyed record.
    fn get_record(
        &self,
        customer: &CustomerId,
        space: Space,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>>;

    /// Removes a keyed record (absent records are fine).
    fn remove_record(&self, customer: &CustomerId, space: Space, key: &[u8]) -> Result<()>;

    /// Every record in a space, by key.
    fn scan_records(&self, customer: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<()>;
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn get_key(&self, c: &CustomerId) -> Result<Option<Vec<u8>>> {
        (**self).get_key(c)
    }
    fn put_key_if_absent(&self, c: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        (**self).put_key_if_absent(c, wrapped)
    }
    fn replace_key(&self, c: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        (**self).replace_key(c, expected, new)
    }
    fn destroy_key(&self, c: &CustomerId) -> Result<()> {
        (**self).destroy_key(c)
    }
    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        (**self).list_customers()
    }
    fn erase_customer(&self, c: &CustomerId) -> Result<()> {
        (**self).erase_customer(c)
    }
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        (**self).write_doc(c, d, m, ch)
    }
    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<()> {
        (**self).write_doc_off_feed(c, d, m, ch)
    }
    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        (**self).load(c, d)
    }
    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        (**self).doc_meta(c, d)
    }
    fn compact(&self, c: &CustomerId, d: &DocId, s: &Snapshot) -> Result<()> {
        (**self).compact(c, d, s)
    }
    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        (**self).delete_doc(c, d)
    }
    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        (**self).list_docs(c)
    }
    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        (**self).feed_since(c, cursor)
    }
    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        (**self).feed_head(c)
    }
    fn put_record(&self, c: &CustomerId, s: Space, k: &[u8], v: &[u8]) -> Result<()> {
        (**self).put_record(c, s, k, v)
    }
    fn get_record(&self, c: &CustomerId, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        (**self).get_record(c, s, k)
    }
    fn remove_record(&self, c: &CustomerId, s: Space, k: &[u8]) -> Result<()> {
        (**self).remove_record(c, s, k)
    }
    fn scan_records(&self, c: &CustomerId, s: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        (**self).scan_records(c, s)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
}
