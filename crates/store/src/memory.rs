//! The in-memory backend: the reference the conformance suite holds others to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use cubby_core::{ChunkId, CustomerId, DocId, Seq};

use crate::{Chunk, DocRecords, Docs, Keys, MetaAt, Records, Result, Snapshot, Space, Store};

/// A store in memory. Clones share the same data, so a clone is a "reopen".
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Clone, Debug, Default)]
struct Inner {
    keys: HashMap<CustomerId, Vec<u8>>,
    docs: HashMap<(CustomerId, DocId), MemDoc>,
    feed: HashMap<CustomerId, Feed>,
    records: BTreeMap<(CustomerId, Space, Vec<u8>), Vec<u8>>,
}

#[derive(Clone, Debug, Default)]
struct MemDoc {
    meta: Vec<u8>,
    /// The position `meta` was written for.
    seq: Seq,
    snapshot: Option<Snapshot>,
    chunks: BTreeMap<ChunkId, Vec<u8>>,
}

#[derive(Clone, Debug, Default)]
struct Feed {
    last: u64,
    by_seq: BTreeMap<u64, DocId>,
    by_doc: HashMap<DocId, u64>,
}

impl Inner {
    fn put_doc(
        &mut self,
        c: &CustomerId,
        d: &DocId,
        seq: Seq,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) {
        let entry = self.docs.entry((*c, *d)).or_default();
        entry.meta = meta.at(seq);
        entry.seq = seq;
        if let Some(chunk) = chunk {
            entry.chunks.insert(chunk.id, chunk.bytes.to_vec());
        }
    }
}

impl Feed {
    fn bump(&mut self, doc: DocId) -> Seq {
        self.last += 1;
        if let Some(old) = self.by_doc.insert(doc, self.last) {
            self.by_seq.remove(&old);
        }
        self.by_seq.insert(self.last, doc);
        Seq(self.last)
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything stored now that shares no later write: a backup, for tests of what
    /// restoring one does.
    pub fn copy(&self) -> Self {
        Self { inner: Arc::new(Mutex::new(self.lock().clone())) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave `Inner` half-updated: every method mutates it last.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Keys for MemoryStore {
    fn get_key(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().keys.get(customer).cloned())
    }

    fn put_key_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        Ok(self.lock().keys.entry(*customer).or_insert_with(|| wrapped.to_vec()).clone())
    }

    fn replace_key(&self, customer: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        let mut inner = self.lock();
        match inner.keys.get_mut(customer) {
            Some(current) if current.as_slice() == expected => {
                *current = new.to_vec();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn destroy_key(&self, customer: &CustomerId) -> Result<()> {
        self.lock().keys.remove(customer);
        Ok(())
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        let mut customers: Vec<_> = self.lock().keys.keys().copied().collect();
        customers.sort();
        Ok(customers)
    }
}

impl Docs for MemoryStore {
    fn write_doc(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        let mut inner = self.lock();
        let seq = inner.feed.entry(*customer).or_default().bump(*doc);
        inner.put_doc(customer, doc, seq, meta, chunk);
        Ok(seq)
    }

    fn write_doc_off_feed(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        let mut inner = self.lock();
        let seq = inner.feed.get(customer).and_then(|f| f.by_doc.get(doc)).copied().unwrap_or(0);
        inner.put_doc(customer, doc, Seq(seq), meta, chunk);
        Ok(())
    }

    fn load(&self, customer: &CustomerId, doc: &DocId) -> Result<Option<DocRecords>> {
        let inner = self.lock();
        Ok(inner.docs.get(&(*customer, *doc)).map(|d| DocRecords {
            meta: d.meta.clone(),
            snapshot: d.snapshot.clone(),
            chunks: d.chunks.iter().map(|(i, b)| (*i, b.clone())).collect(),
            seq: d.seq,
        }))
    }

    fn doc_meta(&self, customer: &CustomerId, doc: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        Ok(self.lock().docs.get(&(*customer, *doc)).map(|d| (d.seq, d.meta.clone())))
    }

    fn compact(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        snapshot: &Snapshot,
        replaces: &[ChunkId],
    ) -> Result<()> {
        let mut inner = self.lock();
        if let Some(d) = inner.docs.get_mut(&(*customer, *doc)) {
            if d.snapshot.as_ref().is_some_and(|s| !replaces.contains(&s.id)) {
                return Err(crate::StoreError::Conflict);
            }
            d.chunks.retain(|id, _| !replaces.contains(id));
            d.snapshot = Some(snapshot.clone());
        }
        Ok(())
    }

    fn delete_doc(&self, customer: &CustomerId, doc: &DocId) -> Result<Seq> {
        let mut inner = self.lock();
        inner.docs.remove(&(*customer, *doc));
        Ok(inner.feed.entry(*customer).or_default().bump(*doc))
    }

    fn list_docs(&self, customer: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        let inner = self.lock();
        let mut docs: Vec<_> = inner
            .docs
            .iter()
            .filter(|((c, _), _)| c == customer)
            .map(|((_, d), doc)| (*d, doc.seq, doc.meta.clone()))
            .collect();
        docs.sort_by_key(|(d, ..)| *d);
        Ok(docs)
    }

    fn feed_since(&self, customer: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        let inner = self.lock();
        Ok(inner.feed.get(customer).map_or_else(Vec::new, |feed| {
            feed.by_seq.range(cursor.0 + 1..).map(|(s, d)| (Seq(*s), *d)).collect()
        }))
    }

    fn feed_head(&self, customer: &CustomerId) -> Result<Seq> {
        Ok(Seq(self.lock().feed.get(customer).map_or(0, |f| f.last)))
    }
}

impl Records for MemoryStore {
    fn put_record(&self, c: &CustomerId, space: Space, key: &[u8], value: &[u8]) -> Result<()> {
        self.lock().records.insert((*c, space, key.to_vec()), value.to_vec());
        Ok(())
    }

    fn get_record(&self, c: &CustomerId, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().records.get(&(*c, space, key.to_vec())).cloned())
    }

    fn remove_record(&self, c: &CustomerId, space: Space, key: &[u8]) -> Result<()> {
        self.lock().records.remove(&(*c, space, key.to_vec()));
        Ok(())
    }

    fn scan_records(&self, c: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let inner = self.lock();
        Ok(inner
            .records
            .range((*c, space, Vec::new())..)
            .take_while(|((rc, rs, _), _)| rc == c && *rs == space)
            .map(|((_, _, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Store for MemoryStore {
    fn erase_customer(&self, customer: &CustomerId) -> Result<()> {
        let mut inner = self.lock();
        inner.docs.retain(|(c, _), _| c != customer);
        inner.feed.remove(customer);
        inner.records.retain(|(c, _, _), _| c != customer);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    crate::conformance_tests!(|| {
        let store = crate::MemoryStore::new();
        move || store.clone()
    });
}
