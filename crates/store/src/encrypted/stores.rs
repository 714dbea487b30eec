//! The decorator as a store: every call sealed on its way in and opened on its way out.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_crypto::envelope;

use super::{EncryptedStore, FLUSHES_KEY, META, SealedChunk, SealedMeta, doc_aad, record_aad};
use crate::witness::LedgerEntry;
use crate::{
    Chunk, DocRecords, Docs, Keys, MetaAt, Records, Result, SYSTEM, Snapshot, Space, Store,
    StoreError, Write,
};

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
        replaces: Vec<ChunkId>,
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
        let replaces = self.stored_names(c, d, replaces)?;
        self.after_write(self.inner.compact(c, d, &sealed, &replaces))
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

    fn ready(&self) -> Result<()> {
        self.inner.ready()
    }

    /// Flushes, then copies the store underneath: records sealed as they are, keys wrapped.
    fn copy_to(&self, to: &std::path::Path) -> Result<u64> {
        self.flush()?;
        self.inner.copy_to(to)
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

impl<S: Store> EncryptedStore<S> {
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
                replaces: self.stored_names(customer, doc, replaces)?,
            },
            Write::Delete { customer, doc } => Sealed::Delete { customer, doc },
            Write::Record { customer, space, key, value } => {
                let value =
                    envelope::seal(&self.key(customer)?, &record_aad(customer, space, key), value);
                Sealed::Record { customer, space, key, value }
            }
        })
    }
}
