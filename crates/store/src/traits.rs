//! The storage traits, one per concern, and forwarding for wrappers.
//!
//! Writes are visible to reads at once but durable only after [`Store::flush`] returns (or
//! [`Store::commit`], which ends in one): callers acknowledge nothing before that. Methods block;
//! async callers run them off their workers.

use cubby_core::{ChunkId, CustomerId, DocId, Seq};

use crate::{Chunk, DocRecords, MetaAt, Result, Snapshot, Space};

/// Wrapped data keys, one per customer.
pub trait Keys: Send + Sync + 'static {
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

    /// Every customer with a data key, by id ([`crate::SYSTEM`] included).
    fn list_customers(&self) -> Result<Vec<CustomerId>>;
}

/// Documents and each customer's change feed.
pub trait Docs: Send + Sync + 'static {
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

    /// Writes a document's metadata and optionally one change chunk, as [`Docs::write_doc`]
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

    /// Makes `snapshot` the document's snapshot and drops exactly the chunks `replaces` names:
    /// loads never return them again (a backend may remove them from disk later: the sled
    /// backend removes a few with each write after the compaction, so that no one write pays
    /// for all). A chunk it does not name (another writer's, meanwhile) stays. If the document
    /// has a snapshot that `replaces` does not name, another writer compacted it meanwhile:
    /// nothing is written, and the answer is [`crate::StoreError::Conflict`].
    fn compact(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        snapshot: &Snapshot,
        replaces: &[ChunkId],
    ) -> Result<()>;

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
}

/// Small keyed records in a customer's [`Space`]s.
pub trait Records: Send + Sync + 'static {
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
}

/// One write of a batch ([`Store::commit`]).
#[derive(Clone, Copy)]
pub enum Write<'a> {
    /// [`Docs::write_doc`] (`feed`), or [`Docs::write_doc_off_feed`].
    Doc {
        /// Whose.
        customer: &'a CustomerId,
        /// Which document.
        doc: &'a DocId,
        /// Its metadata.
        meta: &'a dyn MetaAt,
        /// A change chunk, if any.
        chunk: Option<Chunk<'a>>,
        /// The document moves to the head of the customer's feed.
        feed: bool,
    },
    /// [`Docs::compact`].
    Compact {
        /// Whose.
        customer: &'a CustomerId,
        /// Which document.
        doc: &'a DocId,
        /// The new snapshot.
        snapshot: &'a Snapshot,
        /// The parts it replaces.
        replaces: &'a [ChunkId],
    },
    /// [`Docs::delete_doc`].
    Delete {
        /// Whose.
        customer: &'a CustomerId,
        /// Which document.
        doc: &'a DocId,
    },
    /// [`Records::put_record`].
    Record {
        /// Whose.
        customer: &'a CustomerId,
        /// Where.
        space: Space,
        /// Its key.
        key: &'a [u8],
        /// Its value.
        value: &'a [u8],
    },
}

impl std::fmt::Debug for Write<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Doc { doc, chunk, feed, .. } => f
                .debug_struct("Doc")
                .field("doc", doc)
                .field("chunk", &chunk.map(|c| (c.id, c.bytes.len())))
                .field("feed", feed)
                .finish_non_exhaustive(),
            Self::Compact { doc, snapshot, .. } => f
                .debug_struct("Compact")
                .field("doc", doc)
                .field("snapshot", &snapshot.id)
                .finish_non_exhaustive(),
            Self::Delete { doc, .. } => f.debug_struct("Delete").field("doc", doc).finish(),
            Self::Record { space, .. } => {
                f.debug_struct("Record").field("space", space).finish_non_exhaustive()
            }
        }
    }
}

impl Write<'_> {
    /// Applies the write on its own; the feed position it took, for a write that takes one.
    pub fn apply<S: Store + ?Sized>(&self, store: &S) -> Result<Option<Seq>> {
        match *self {
            Self::Doc { customer, doc, meta, chunk, feed: true } => {
                store.write_doc(customer, doc, meta, chunk).map(Some)
            }
            Self::Doc { customer, doc, meta, chunk, feed: false } => {
                store.write_doc_off_feed(customer, doc, meta, chunk).map(|()| None)
            }
            Self::Compact { customer, doc, snapshot, replaces } => {
                store.compact(customer, doc, snapshot, replaces).map(|()| None)
            }
            Self::Delete { customer, doc } => store.delete_doc(customer, doc).map(Some),
            Self::Record { customer, space, key, value } => {
                store.put_record(customer, space, key, value).map(|()| None)
            }
        }
    }
}

/// CRDT persistence for many customer stores: every concern, erasure and durability.
pub trait Store: Keys + Docs + Records {
    /// Removes every document, feed entry and record of the customer (their key is separate:
    /// [`Keys::destroy_key`]). Durable after [`Store::flush`].
    fn erase_customer(&self, customer: &CustomerId) -> Result<()>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<()>;

    /// Applies `batch` in order and makes it durable, as one group commit: one call into the
    /// store (one transaction, on a database). Each write's outcome is given in order: the feed
    /// position it took, if it takes one, or why that write alone failed (an erased customer's
    /// write fails and the others go ahead). `Err` means nothing of the batch can be taken as
    /// durable. The default applies each write and flushes once.
    fn commit(&self, batch: &[Write<'_>]) -> Result<Vec<Result<Option<Seq>>>> {
        let outcomes = batch.iter().map(|write| write.apply(self)).collect();
        self.flush()?;
        Ok(outcomes)
    }

    /// Whether the store can take writes now: `Err` when it cannot reach its database, or
    /// failed for good (sled after an I/O error, until a restart). The server's health says
    /// `NOT_SERVING` while it is. The default: always.
    fn ready(&self) -> Result<()> {
        Ok(())
    }

    /// Copies the whole store, consistently and as sealed as it is, into `to`, a new store
    /// directory of the embedded backend (a backup that `cubby-server restore --from` takes).
    /// Returns the bytes copied. A backend that cannot (a database, with its own backup tools)
    /// says so.
    fn copy_to(&self, to: &std::path::Path) -> Result<u64> {
        let _ = to;
        Err(crate::StoreError::Backend(
            "this store cannot copy itself; back it up with its own tools".into(),
        ))
    }
}

/// A store that wraps another: where [`ForwardKeys`], [`ForwardDocs`] and [`ForwardRecords`]
/// pass the calls of a concern it leaves as they are.
pub trait Forward: Send + Sync + 'static {
    /// The store underneath.
    type Inner: Store + ?Sized;

    /// The store underneath.
    fn inner(&self) -> &Self::Inner;
}

/// Passes every [`Keys`] call to [`Forward::inner`] unchanged.
pub trait ForwardKeys: Forward {}

/// Passes every [`Docs`] call to [`Forward::inner`] unchanged.
pub trait ForwardDocs: Forward {}

/// Passes every [`Records`] call to [`Forward::inner`] unchanged.
pub trait ForwardRecords: Forward {}

impl<T: ForwardKeys> Keys for T {
    fn get_key(&self, c: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.inner().get_key(c)
    }
    fn put_key_if_absent(&self, c: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        self.inner().put_key_if_absent(c, wrapped)
    }
    fn replace_key(&self, c: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        self.inner().replace_key(c, expected, new)
    }
    fn destroy_key(&self, c: &CustomerId) -> Result<()> {
        self.inner().destroy_key(c)
    }
    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.inner().list_customers()
    }
}

impl<T: ForwardDocs> Docs for T {
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        self.inner().write_doc(c, d, m, ch)
    }
    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<()> {
        self.inner().write_doc_off_feed(c, d, m, ch)
    }
    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        self.inner().load(c, d)
    }
    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        self.inner().doc_meta(c, d)
    }
    fn compact(&self, c: &CustomerId, d: &DocId, s: &Snapshot, r: &[ChunkId]) -> Result<()> {
        self.inner().compact(c, d, s, r)
    }
    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        self.inner().delete_doc(c, d)
    }
    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        self.inner().list_docs(c)
    }
    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        self.inner().feed_since(c, cursor)
    }
    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        self.inner().feed_head(c)
    }
}

impl<T: ForwardRecords> Records for T {
    fn put_record(&self, c: &CustomerId, s: Space, k: &[u8], v: &[u8]) -> Result<()> {
        self.inner().put_record(c, s, k, v)
    }
    fn get_record(&self, c: &CustomerId, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner().get_record(c, s, k)
    }
    fn remove_record(&self, c: &CustomerId, s: Space, k: &[u8]) -> Result<()> {
        self.inner().remove_record(c, s, k)
    }
    fn scan_records(&self, c: &CustomerId, s: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner().scan_records(c, s)
    }
}

impl<S: Store + ?Sized> Forward for std::sync::Arc<S> {
    type Inner = S;
    fn inner(&self) -> &S {
        self
    }
}
impl<S: Store + ?Sized> ForwardKeys for std::sync::Arc<S> {}
impl<S: Store + ?Sized> ForwardDocs for std::sync::Arc<S> {}
impl<S: Store + ?Sized> ForwardRecords for std::sync::Arc<S> {}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn erase_customer(&self, c: &CustomerId) -> Result<()> {
        (**self).erase_customer(c)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn commit(&self, batch: &[Write<'_>]) -> Result<Vec<Result<Option<Seq>>>> {
        (**self).commit(batch)
    }
    fn ready(&self) -> Result<()> {
        (**self).ready()
    }
    fn copy_to(&self, to: &std::path::Path) -> Result<u64> {
        (**self).copy_to(to)
    }
}
