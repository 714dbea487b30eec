//! Cubby's storage seam.
//!
//! [`Store`] speaks CRDT persistence for many customers' stores, in three concerns: [`Keys`]
//! (wrapped data keys), [`Docs`] (documents kept as an optional snapshot plus change chunks
//! appended after it, compaction, a per-customer change feed) and [`Records`] (small keyed
//! records: devices, sync states, audit entries); [`Store`] adds erasure, durability and the batch
//! write a group commit makes ([`Store::commit`]). Backends implement them; [`EncryptedStore`]
//! wraps any backend so that every value it writes is sealed, and a wrapper that changes one
//! concern passes the others on with [`ForwardKeys`], [`ForwardDocs`] or [`ForwardRecords`].
//!
//! ```
//! use cubby_core::{ChunkId, CustomerId, DocId, Seq};
//! use cubby_crypto::keys::{Keyring, MasterSecret};
//! use cubby_store::{Chunk, Docs, EncryptedStore, MemoryStore, Store};
//!
//! let keyring = Keyring::from_master(&MasterSecret::from_bytes([7; 32]));
//! let store = EncryptedStore::open(MemoryStore::new(), keyring)?;
//! let (alice, doc) = (CustomerId::from_bytes([1; 16]), DocId::from_bytes([2; 16]));
//! let id = ChunkId::of(b"change");
//! let seq = store.write_doc(&alice, &doc, b"meta", Some(Chunk { id, bytes: b"change" }))?;
//! store.flush()?;
//! assert_eq!(store.feed_since(&alice, Seq(0))?, vec![(seq, doc)]);
//! let records = store.load(&alice, &doc)?.expect("the document exists");
//! assert_eq!(records.chunks, vec![(id, b"change".to_vec())]);
//! # Ok::<(), cubby_store::StoreError>(())
//! ```

pub mod bus;
#[cfg(feature = "conformance")]
pub mod conformance;
mod encrypted;
#[cfg(feature = "conformance")]
pub mod hooked;
mod locks;
mod memory;
mod traits;
pub mod witness;

pub use encrypted::{EncryptedStore, FORMAT};
pub use locks::CustomerLocks;
pub use memory::MemoryStore;
pub use traits::{
    Docs, Forward, ForwardDocs, ForwardKeys, ForwardRecords, Keys, Records, Store, Write,
};

use cubby_core::{ChunkId, CustomerId, Seq};

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
    /// A compaction did not name the document's current snapshot among what it replaces:
    /// another writer compacted it meanwhile. Nothing was written; load it again.
    #[error("the document was compacted by another writer meanwhile")]
    Conflict,
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

impl MetaAt for cubby_core::DocMeta {
    fn at(&self, _: Seq) -> Vec<u8> {
        self.encode()
    }
}

/// Metadata made by a function of the position (see [`MetaAt`]).
pub struct MetaFn<F>(pub F);

impl<F: Fn(Seq) -> Vec<u8> + Send + Sync> MetaAt for MetaFn<F> {
    fn at(&self, seq: Seq) -> Vec<u8> {
        (self.0)(seq)
    }
}

/// One change chunk: what one write added to a document, named by its content.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// [`ChunkId::of`] the bytes.
    pub id: ChunkId,
    /// The bytes (an `Automerge::save_after`).
    pub bytes: &'a [u8],
}

/// A document's snapshot: the whole document (an `Automerge::save`), named by its content: the
/// part of its history a compaction makes.
pub use cubby_core::history::Part as Snapshot;

/// Everything stored for one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocRecords {
    /// The encoded metadata last written.
    pub meta: Vec<u8>,
    /// The latest snapshot, if the document was ever compacted.
    pub snapshot: Option<Snapshot>,
    /// The chunks no compaction replaced, in no particular order.
    pub chunks: Vec<(ChunkId, Vec<u8>)>,
    /// The document's current position in the change feed, the one its metadata was written
    /// for (0 for a document that has none).
    pub seq: Seq,
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
