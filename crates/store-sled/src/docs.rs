//! The documents and the change feed in sled (the key layout is in the crate docs).

use std::collections::HashSet;

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_store::{Chunk, DocRecords, Docs, MetaAt, Result, Snapshot, StoreError};

use crate::{
    Covered, SledStore, chunk_id, doc_of, framed_meta, key, meta_seq, snapshot_id, u64_of,
};

impl Docs for SledStore {
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        let _feed = self.lock_feed();
        let (seq, steps) = self.doc_write_steps(c, d, meta, chunk)?;
        steps.into_iter().try_for_each(|step| self.apply_step(step))?;
        self.sweep()?;
        Ok(seq)
    }

    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        // Two plain inserts, not a batch: sled 0.34 writes its log buffer out twice for every
        // batch or transaction (`PageCache::pin_log` rolls it before and after), each a job for
        // its I/O threads and a `sync_file_range`, where plain inserts wait for the next flush. A
        // 60-byte metadata record and a 200-byte chunk: 19 to 27 µs of CPU as a batch, 7 to 8 as
        // two inserts. sled's log makes them durable in order, so at worst a crash keeps the new
        // metadata without the chunk, and only a write not yet flushed can lose its chunk.
        let db = self.db()?;
        // For the position the document has: its metadata's (a document without one has 0).
        let meta_key = key(b'm', c, &[d.as_bytes()]);
        let seq = match db.get(&meta_key).map_err(|e| self.fail(e))? {
            Some(value) => meta_seq(&value)?,
            None => self.position(c, d)?.unwrap_or_default(),
        };
        db.insert(meta_key, framed_meta(seq, meta)).map_err(|e| self.fail(e))?;
        if let Some(chunk) = chunk {
            let k = key(b'c', c, &[d.as_bytes(), chunk.id.as_bytes()]);
            db.insert(k, chunk.bytes).map_err(|e| self.fail(e))?;
        }
        self.sweep()
    }

    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        let Some((seq, meta)) = self.checked_meta(c, d)? else { return Ok(None) };
        // The snapshot and the chunks are read under the lock that sweeps take, so that none
        // removes chunks between the two reads: a compaction's new snapshot missed, then chunks
        // its sweep removed, would read as changes missing. Chunks a compaction replaced that
        // are still on disk are left out, and queued for removal if no write is removing them
        // (the queue is lost at a restart).
        let prefix = key(b'c', c, &[d.as_bytes()]);
        let mut covered = self.lock_covered();
        let replaced = self.replaced(c, d)?;
        if !replaced.is_empty() && !covered.iter().any(|c| c.prefix == prefix) {
            let ids = replaced.iter().copied().collect();
            covered.push_back(Covered { prefix: prefix.clone(), ids });
        }
        let snapshot = match self.db.get(key(b's', c, &[d.as_bytes()])).map_err(|e| self.fail(e))? {
            Some(v) => Some(Snapshot { id: snapshot_id(&v)?, bytes: v[16..].to_vec() }),
            None => None,
        };
        let mut chunks = Vec::new();
        for entry in self.scan(prefix.clone()) {
            let (k, v) = entry?;
            let id = chunk_id(&k[prefix.len()..])?;
            if !replaced.contains(&id) {
                chunks.push((id, v.to_vec()));
            }
        }
        drop(covered);
        Ok(Some(DocRecords { meta, snapshot, chunks, seq }))
    }

    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        self.checked_meta(c, d)
    }

    fn compact(
        &self,
        c: &CustomerId,
        d: &DocId,
        snapshot: &Snapshot,
        replaces: &[ChunkId],
    ) -> Result<()> {
        let snapshot_key = key(b's', c, &[d.as_bytes()]);
        let db = self.db()?;
        if let Some(current) = db.get(&snapshot_key).map_err(|e| self.fail(e))?
            && !replaces.contains(&snapshot_id(&current)?)
        {
            return Err(StoreError::Conflict);
        }
        // The snapshot, then the list of the chunks it replaced: a crash between the two leaves
        // them to load again, harmlessly (their changes are in the snapshot), until the next
        // compaction names them again.
        let mut listed = self.replaced(c, d)?;
        let value = [snapshot.id.as_bytes().as_slice(), &snapshot.bytes].concat();
        db.insert(snapshot_key, value).map_err(|e| self.fail(e))?;
        let fresh: Vec<ChunkId> =
            replaces.iter().filter(|id| listed.insert(**id)).copied().collect();
        let list: Vec<u8> = listed.iter().flat_map(|id| *id.as_bytes()).collect();
        db.insert(key(b'x', c, &[d.as_bytes()]), list).map_err(|e| self.fail(e))?;
        self.cover(key(b'c', c, &[d.as_bytes()]), fresh);
        self.sweep()
    }

    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        let chunks: Vec<sled::IVec> = self
            .scan(key(b'c', c, &[d.as_bytes()]))
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_>>()?;
        // One transaction: a deletion cut short could drop the metadata without telling anyone.
        let _feed = self.lock_feed();
        let _covered = self.uncover(&key(b'c', c, &[d.as_bytes()]));
        self.db()?
            .transaction(|tx| {
                let seq = Self::bump_feed(tx, c, d)?;
                tx.remove(key(b'm', c, &[d.as_bytes()]))?;
                tx.remove(key(b's', c, &[d.as_bytes()]))?;
                tx.remove(key(b'x', c, &[d.as_bytes()]))?;
                for k in &chunks {
                    tx.remove(k)?;
                }
                Ok(seq)
            })
            .map_err(|e| self.fail_tx(e))
    }

    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        let prefix = key(b'm', c, &[]);
        let ids: Vec<DocId> = self
            .scan(prefix.clone())
            .map(|r| doc_of(&r?.0[prefix.len()..]))
            .collect::<Result<_>>()?;
        // Each read again, checked, under the feed lock (the scan takes none); one deleted
        // meanwhile is left out.
        let mut docs = Vec::with_capacity(ids.len());
        for d in ids {
            if let Some((seq, meta)) = self.checked_meta(c, &d)? {
                docs.push((d, seq, meta));
            }
        }
        Ok(docs)
    }

    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        let prefix = key(b'f', c, &[]);
        let start = key(b'f', c, &[&(cursor.0.saturating_add(1)).to_be_bytes()]);
        let feed = self
            .db
            .range(start..)
            .map(|r| r.map_err(|e| self.fail(e)))
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .map(|r| {
                let (k, v) = r?;
                Ok((Seq(u64_of(&k[prefix.len()..])?), doc_of(&v)?))
            })
            .collect::<Result<Vec<_>>>()?;
        // An entry of a document with no metadata is its deletion, where the document's
        // position is that entry; otherwise a first write cut short after step 2 of
        // `doc_write_steps`, of a document that does not exist yet: left out.
        let mut kept = Vec::with_capacity(feed.len());
        for (seq, doc) in feed {
            let meta = key(b'm', c, &[doc.as_bytes()]);
            let has_meta = self.db.contains_key(meta).map_err(|e| self.fail(e))?;
            if has_meta || self.position(c, &doc)? == Some(seq) {
                kept.push((seq, doc));
            }
        }
        // A crash in the middle of a write can leave a document's older entry behind (step 5):
        // keep each document's latest.
        let mut seen = HashSet::with_capacity(kept.len());
        kept.reverse();
        kept.retain(|(_, doc)| seen.insert(*doc));
        kept.reverse();
        Ok(kept)
    }

    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        match self.db.get(key(b'n', c, &[])).map_err(|e| self.fail(e))? {
            Some(v) => Ok(Seq(u64_of(&v)?)),
            None => Ok(Seq(0)),
        }
    }
}
