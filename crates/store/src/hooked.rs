//! A backend for tests that need to see, count or hold up some of a backend's calls.

use cubby_core::{ChunkId, CustomerId, DocId, Seq};

use crate::{Chunk, DocRecords, Docs, Keys, MetaAt, Records, Result, Snapshot, Space, Store};

/// A call a [`Hooked`] store is about to pass to its backend.
#[derive(Clone, Copy, Debug)]
pub enum Call<'a> {
    /// `put_key_if_absent` for this customer.
    PutKey(&'a CustomerId),
    /// `write_doc` or `write_doc_off_feed`, with a change chunk or without.
    WriteDoc {
        /// The write carries a change chunk.
        chunk: bool,
    },
    /// `load`.
    Load,
    /// `put_record` in this space.
    PutRecord(Space),
    /// `remove_record` in this space.
    RemoveRecord(Space),
}

/// Passes every call to `inner`, telling `hook` of the calls [`Call`] names first (the hook may
/// block, as a slow disk would).
pub struct Hooked<S, H> {
    inner: S,
    hook: H,
}

impl<S, H> Hooked<S, H> {
    /// `inner`, with `hook` told of its calls.
    pub fn new(inner: S, hook: H) -> Self {
        Self { inner, hook }
    }
}

impl<S: Store, H: Fn(Call<'_>) + Send + Sync + 'static> Keys for Hooked<S, H> {
    fn get_key(&self, c: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.inner.get_key(c)
    }

    fn put_key_if_absent(&self, c: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        (self.hook)(Call::PutKey(c));
        self.inner.put_key_if_absent(c, wrapped)
    }

    fn replace_key(&self, c: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        self.inner.replace_key(c, expected, new)
    }

    fn destroy_key(&self, c: &CustomerId) -> Result<()> {
        self.inner.destroy_key(c)
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.inner.list_customers()
    }
}

impl<S: Store, H: Fn(Call<'_>) + Send + Sync + 'static> Docs for Hooked<S, H> {
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        (self.hook)(Call::WriteDoc { chunk: ch.is_some() });
        self.inner.write_doc(c, d, m, ch)
    }

    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<()> {
        (self.hook)(Call::WriteDoc { chunk: ch.is_some() });
        self.inner.write_doc_off_feed(c, d, m, ch)
    }

    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        (self.hook)(Call::Load);
        self.inner.load(c, d)
    }

    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        self.inner.doc_meta(c, d)
    }

    fn compact(&self, c: &CustomerId, d: &DocId, s: &Snapshot, r: &[ChunkId]) -> Result<()> {
        self.inner.compact(c, d, s, r)
    }

    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        self.inner.delete_doc(c, d)
    }

    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        self.inner.list_docs(c)
    }

    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        self.inner.feed_head(c)
    }

    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        self.inner.feed_since(c, cursor)
    }
}

impl<S: Store, H: Fn(Call<'_>) + Send + Sync + 'static> Records for Hooked<S, H> {
    fn put_record(&self, c: &CustomerId, s: Space, k: &[u8], v: &[u8]) -> Result<()> {
        (self.hook)(Call::PutRecord(s));
        self.inner.put_record(c, s, k, v)
    }

    fn get_record(&self, c: &CustomerId, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get_record(c, s, k)
    }

    fn remove_record(&self, c: &CustomerId, s: Space, k: &[u8]) -> Result<()> {
        (self.hook)(Call::RemoveRecord(s));
        self.inner.remove_record(c, s, k)
    }

    fn scan_records(&self, c: &CustomerId, s: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan_records(c, s)
    }
}

impl<S: Store, H: Fn(Call<'_>) + Send + Sync + 'static> Store for Hooked<S, H> {
    fn erase_customer(&self, c: &CustomerId) -> Result<()> {
        self.inner.erase_customer(c)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn ready(&self) -> Result<()> {
        self.inner.ready()
    }

    fn copy_to(&self, to: &std::path::Path) -> Result<u64> {
        self.inner.copy_to(to)
    }
}
