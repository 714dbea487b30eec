//! Cubby storage on sled 0.34: the embedded default backend.
//!
//! A store directory holds `sled/`, the sled database, and `keys/`, one file per customer's
//! wrapped data key (kept out of sled so erasure can destroy it in place; see `keys.rs`).
//!
//! One sled tree holds everything else, keyed by a one-byte record type, then the customer id:
//!
//! | prefix | key after the customer | value |
//! |---|---|---|
//! | `m` | document | the feed position the metadata was written for (BE u64), then metadata |
//! | `c` | document, chunk id (16 bytes) | change chunk |
//! | `s` | document | snapshot: its id (16 bytes) then bytes |
//! | `x` | document | ids of chunks a compaction replaced that are still on disk (16 bytes each) |
//! | `f` | feed position (BE u64) | document |
//! | `p` | document | feed position (BE u64) |
//! | `n` | | last feed position (BE u64) |
//! | `r` | space, record key | record |
//!
//! A document write (metadata, feed move, chunk) is a sequence of plain inserts in an order a
//! crash can cut anywhere without harm (see [`SledStore::doc_write_steps`]); one off the feed (a
//! device's) is two inserts, metadata first. A deletion is one sled transaction. A document's
//! metadata carries the feed position it was written for (the encryption decorator seals it
//! for that position), and a load checks it against the document's position and the feed, so
//! that an older copy spliced over it is refused ([`SledStore::checked_meta`]). A compaction
//! writes the snapshot and the list of the chunks it names (`x`), and leaves those to be removed
//! a few at a time by the writes after it ([`SledStore::sweep`]); loads skip them meanwhile. Nothing is durable until
//! [`Store::flush`], which calls `sled::Db::flush` and then syncs what sled's flush does not
//! (`files.rs`).

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_store::{Chunk, MetaAt, Result, Store, StoreError};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

mod copy;
mod docs;
mod files;
mod keys;
mod records;
mod witness;

pub use copy::Copied;
use copy::Writing;
pub use witness::WitnessDir;

/// Record-type prefixes that hold a customer's data (everything but the key).
const CUSTOMER_PREFIXES: [u8; 8] = [b'm', b'c', b's', b'x', b'f', b'p', b'n', b'r'];

/// A [`Store`] in a directory: a sled database plus a key directory.
#[derive(Clone, Debug)]
pub struct SledStore {
    db: Arc<Guarded>,
    files: Arc<files::SledFiles>,
    keys: Arc<keys::KeyDir>,
    /// Held by every write that moves documents in a feed (or erases one): the feed's records
    /// are read and written by plain operations, which sled does not isolate. On a server only
    /// the commit thread writes, so it is never contended there.
    feed: Arc<Mutex<()>>,
    /// Chunks that compactions replaced and that are still on disk, oldest first.
    covered: Arc<Mutex<VecDeque<Covered>>>,
    /// Every write to sled or the keys holds it shared (nested holds allowed); a copy of the
    /// store holds it alone, so that it is taken between two writes, as a crash would cut them.
    gate: Arc<parking_lot::RwLock<()>>,
}

/// A document's chunks a compaction replaced, still to be removed.
#[derive(Debug)]
struct Covered {
    /// The document's chunk keys' prefix.
    prefix: Vec<u8>,
    ids: VecDeque<ChunkId>,
}

/// How many covered chunks each write removes ([`SledStore::sweep`]). Four times the one chunk
/// a write adds, so the covered chunks of a compaction (256 by default) are gone within 64
/// writes, long before the next one.
const SWEEP_PER_WRITE: usize = 4;

/// One step of a document write: [`SledStore::doc_write_steps`].
#[derive(Debug)]
enum Step {
    Insert(Vec<u8>, sled::IVec),
    Remove(Vec<u8>),
}

/// The sled database, and whether it failed.
///
/// After an I/O error (a full disk, a vanished file) sled 0.34 can leave a write buffer that never
/// becomes stable, and every later flush, including the one in `Db`'s destructor, then waits
/// forever. So the first I/O error fails the store for writing: later writes and flushes get the
/// same error without touching sled (reads still work), and the database is leaked rather than
/// flushed on drop. Everything
/// flushed before the failure is on disk; reopening after the cause is fixed recovers it.
#[derive(Debug)]
struct Guarded {
    /// Always `Some` until dropped.
    db: Option<sled::Db>,
    /// 0: healthy; 1: failed because the disk was full; 2: failed otherwise.
    failed: AtomicU8,
}

impl std::ops::Deref for Guarded {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        self.db.as_ref().expect("the database is present until the guard is dropped")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.failed.load(Ordering::SeqCst) != 0 {
            // Dropping would flush, and a failed sled may never finish a flush.
            std::mem::forget(self.db.take());
        }
    }
}

fn backend(err: sled::Error) -> StoreError {
    if let sled::Error::Corruption { .. } = &err {
        return StoreError::Corrupt("sled page");
    }
    if let sled::Error::Io(io) = &err {
        // ENOSPC: tell callers the disk is full, so they can say so instead of "I/O error".
        if io.raw_os_error() == Some(28) || io.kind() == std::io::ErrorKind::StorageFull {
            return StoreError::Full;
        }
    }
    StoreError::Backend(Box::new(err))
}

fn key(prefix: u8, customer: &CustomerId, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + rest.iter().map(|r| r.len()).sum::<usize>());
    k.push(prefix);
    k.extend_from_slice(customer.as_bytes());
    for part in rest {
        k.extend_from_slice(part);
    }
    k
}

fn u64_of(bytes: &[u8]) -> Result<u64> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Backend("stored counter is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(array))
}

fn doc_of(bytes: &[u8]) -> Result<DocId> {
    DocId::from_slice(bytes).map_err(|e| StoreError::Backend(Box::new(e)))
}

fn chunk_id(bytes: &[u8]) -> Result<ChunkId> {
    ChunkId::from_slice(bytes).map_err(|_| StoreError::Corrupt("chunk key"))
}

/// The id a stored snapshot begins with.
fn snapshot_id(value: &[u8]) -> Result<ChunkId> {
    value
        .get(..16)
        .and_then(|id| ChunkId::from_slice(id).ok())
        .ok_or(StoreError::Corrupt("snapshot"))
}

/// Metadata as stored: the position it was written for, then the bytes [`MetaAt`] made for it.
fn framed_meta(seq: Seq, meta: &dyn MetaAt) -> sled::IVec {
    let mut value = seq.0.to_be_bytes().to_vec();
    value.extend(meta.at(seq));
    value.into()
}

/// The position stored metadata was written for.
fn meta_seq(value: &[u8]) -> Result<Seq> {
    value
        .get(..8)
        .map(|p| Seq(u64::from_be_bytes(p.try_into().expect("8 bytes"))))
        .ok_or(StoreError::Corrupt("metadata (truncated)"))
}

/// Every wrapped data key in the store at `dir`, read straight from the key files. Needs no lock,
/// so it works while a server has the store open (`cubby-server keys retire` counts with it).
pub fn wrapped_keys(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let keys = keys::KeyDir::open(dir.join("keys"))?;
    keys.list()?.iter().filter_map(|c| keys.get(c).transpose()).collect()
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// sled 0.34 releases its file lock from a background thread shortly after the last handle
    /// is dropped (sled#1289), so a reopen right after a close is retried for up to a second;
    /// a lock that is really held (another process) still fails with [`StoreError::InUse`].
    pub fn open(dir: &Path) -> Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut pause = std::time::Duration::from_millis(5);
        loop {
            match sled::Config::new().path(dir.join("sled")).open() {
                Ok(db) => {
                    let files = files::SledFiles::open(&dir.join("sled"))
                        .map_err(|e| StoreError::Backend(Box::new(e)))?;
                    // Opened after sled, so its lock keeps a second process out of the keys too.
                    let keys = Arc::new(keys::KeyDir::open(dir.join("keys"))?);
                    let db = Arc::new(Guarded { db: Some(db), failed: AtomicU8::new(0) });
                    let (feed, covered, gate) = (Arc::default(), Arc::default(), Arc::default());
                    return Ok(Self { db, files: Arc::new(files), keys, feed, covered, gate });
                }
                // sled reports a held lock as an `Other` I/O error with this text (0.34
                // `config.rs`).
                Err(sled::Error::Io(io))
                    if io.to_string().starts_with("could not acquire lock") =>
                {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::InUse);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(100));
                }
                Err(err) => return Err(backend(err)),
            }
        }
    }

    /// The database for a write, unless an earlier I/O error failed the store. A copy of the
    /// store waits for the write (the statement, or the scope the result is bound in).
    fn db(&self) -> Result<Writing<'_>> {
        self.healthy()?;
        Ok(Writing::new(&self.db, &self.gate))
    }

    /// Whether an earlier I/O error failed the store.
    fn healthy(&self) -> Result<()> {
        match self.db.failed.load(Ordering::SeqCst) {
            0 => Ok(()),
            1 => Err(StoreError::Full),
            _ => Err(StoreError::Backend("the store failed earlier; restart to recover".into())),
        }
    }

    /// Maps a sled error, failing the store on an I/O error.
    fn fail(&self, err: sled::Error) -> StoreError {
        let mapped = backend(err);
        let state = match &mapped {
            StoreError::Full => 1,
            StoreError::Backend(e)
                if e.downcast_ref::<sled::Error>()
                    .is_some_and(|e| matches!(e, sled::Error::Io(_))) =>
            {
                2
            }
            _ => 0,
        };
        if state != 0 {
            let _ = self.db.failed.compare_exchange(0, state, Ordering::SeqCst, Ordering::SeqCst);
        }
        mapped
    }

    fn fail_tx(&self, err: TransactionError<StoreError>) -> StoreError {
        match err {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => self.fail(e),
        }
    }

    fn lock_feed(&self) -> std::sync::MutexGuard<'_, ()> {
        self.feed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_covered(&self) -> std::sync::MutexGuard<'_, VecDeque<Covered>> {
        self.covered.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a document's replaced chunks for removal.
    fn cover(&self, prefix: Vec<u8>, ids: impl IntoIterator<Item = ChunkId>) {
        let mut covered = self.lock_covered();
        match covered.iter_mut().find(|c| c.prefix == prefix) {
            Some(c) => c.ids.extend(ids),
            None => covered.push_back(Covered { prefix, ids: ids.into_iter().collect() }),
        }
    }

    /// Removes up to [`SWEEP_PER_WRITE`] covered chunks, oldest compaction first. Every write
    /// calls it. Removing a compaction's chunks all at once cost about 0.8 ms of sled work (256
    /// removals), in the server's commit (holding up every customer's writes in it) and on a
    /// device's way to acknowledging a change; spread over the writes after it, it is a few µs
    /// each. Any prefix of the removals a crash keeps is harmless: the document's `x` list
    /// still names what is left (and a load queues it again), and goes once all are gone.
    fn sweep(&self) -> Result<()> {
        // A load holds the lock while it reads a document's chunks; the next write sweeps.
        let mut covered = match self.covered.try_lock() {
            Ok(covered) => covered,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        for _ in 0..SWEEP_PER_WRITE {
            let Some(front) = covered.front_mut() else { break };
            if let Some(id) = front.ids.pop_front() {
                let k = [front.prefix.as_slice(), id.as_bytes()].concat();
                self.db()?.remove(k).map_err(|e| self.fail(e))?;
            }
            if front.ids.is_empty() {
                // The chunk prefix `c ‖ customer ‖ document` with `x` first is the list's key.
                let mut list = front.prefix.clone();
                list[0] = b'x';
                self.db()?.remove(list).map_err(|e| self.fail(e))?;
                covered.pop_front();
            }
        }
        Ok(())
    }

    /// The chunks of `d` that a compaction replaced and that are still on disk (`x`).
    fn replaced(&self, c: &CustomerId, d: &DocId) -> Result<HashSet<ChunkId>> {
        let Some(list) = self.db.get(key(b'x', c, &[d.as_bytes()])).map_err(|e| self.fail(e))?
        else {
            return Ok(HashSet::new());
        };
        list.chunks(16).map(chunk_id).collect()
    }

    /// Forgets queued removals under `prefix` (a document's or a customer's): its chunks are
    /// going, and a document made again under the same id must keep its new ones.
    fn uncover(&self, prefix: &[u8]) -> std::sync::MutexGuard<'_, VecDeque<Covered>> {
        let mut covered = self.lock_covered();
        covered.retain(|c| !c.prefix.starts_with(prefix));
        covered
    }

    /// The steps of `write_doc`, each a plain sled operation, and the document's new feed
    /// position. Reads the feed: call with [`Self::lock_feed`] held, and take the steps in order.
    ///
    /// Not one transaction: sled 0.34 writes its log buffer out twice for every transaction or
    /// batch (`PageCache::pin_log` rolls it before and after), each a job for its I/O threads
    /// and a `sync_file_range`, where plain operations wait for the next flush. sled's log is
    /// durable in order, so a crash before the flush keeps some first steps and drops the rest.
    /// Nothing in the write was acknowledged, and devices resend what the server lost; the order
    /// makes every prefix harmless until they do:
    ///
    /// 1. the customer's last feed position, so that none is handed out twice;
    /// 2. the feed entry at the new position: from here on, devices that catch up are told of
    ///    the document (`feed_since` leaves out an entry of a document that has no metadata yet
    ///    unless it is the document's deletion);
    /// 3. the metadata, written for the new position (a load takes the metadata's position as
    ///    the document's when it is ahead of step 4's);
    /// 4. the document's feed position;
    /// 5. the removal of its old feed entries (a crash before it leaves them behind, and
    ///    `feed_since` skips them);
    /// 6. the chunk, last: a chunk kept without its feed entry would never be announced, as the
    ///    sender's resend would change nothing.
    ///
    /// So in every state a crash can leave, a document's metadata names a feed entry of the
    /// document, and is not older than the document's position: what [`Self::checked_meta`]
    /// checks.
    fn doc_write_steps(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<(Seq, Vec<Step>)> {
        let db = self.db()?;
        let last_key = key(b'n', c, &[]);
        let last = match db.get(&last_key).map_err(|e| self.fail(e))? {
            Some(v) => u64_of(&v)?,
            None => 0,
        };
        let seq = Seq(last + 1);
        let pos_key = key(b'p', c, &[d.as_bytes()]);
        let mut old: Vec<u64> = Vec::with_capacity(2);
        if let Some(p) = db.get(&pos_key).map_err(|e| self.fail(e))? {
            old.push(u64_of(&p)?);
        }
        if let Some(m) = db.get(key(b'm', c, &[d.as_bytes()])).map_err(|e| self.fail(e))? {
            old.push(meta_seq(&m)?.0);
        }
        old.sort_unstable();
        old.dedup();
        let mut steps = Vec::with_capacity(7);
        steps.push(Step::Insert(last_key, seq.0.to_be_bytes().as_slice().into()));
        steps.push(Step::Insert(
            key(b'f', c, &[&seq.0.to_be_bytes()]),
            d.as_bytes().as_slice().into(),
        ));
        steps.push(Step::Insert(key(b'm', c, &[d.as_bytes()]), framed_meta(seq, meta)));
        steps.push(Step::Insert(pos_key, seq.0.to_be_bytes().as_slice().into()));
        for old in old.into_iter().filter(|old| *old != 0) {
            steps.push(Step::Remove(key(b'f', c, &[&old.to_be_bytes()])));
        }
        if let Some(chunk) = chunk {
            let k = key(b'c', c, &[d.as_bytes(), chunk.id.as_bytes()]);
            steps.push(Step::Insert(k, chunk.bytes.into()));
        }
        Ok((seq, steps))
    }

    /// A document's stored metadata, checked against its feed position and the feed: the
    /// position it was written for, and its bytes; `None` if it has none. In every state a write
    /// can leave (see [`Self::doc_write_steps`]), the metadata is not older than the document's
    /// position, and the feed entry at its position names the document; an older copy of it
    /// spliced over the newer one (its record and perhaps its position) breaks one of the two.
    /// The three reads hold the feed lock, so that no write's steps land between them.
    fn checked_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        let _feed = self.lock_feed();
        let Some(value) = self.db.get(key(b'm', c, &[d.as_bytes()])).map_err(|e| self.fail(e))?
        else {
            return Ok(None);
        };
        let seq = meta_seq(&value)?;
        if seq < self.position(c, d)?.unwrap_or_default() {
            return Err(StoreError::Corrupt("metadata (older than the document)"));
        }
        if seq.0 > 0 {
            let entry =
                self.db.get(key(b'f', c, &[&seq.0.to_be_bytes()])).map_err(|e| self.fail(e))?;
            if entry.as_deref() != Some(d.as_bytes().as_slice()) {
                return Err(StoreError::Corrupt("metadata (not at its feed position)"));
            }
        }
        Ok(Some((seq, value[8..].to_vec())))
    }

    /// The document's feed position (`p`), if it has one.
    fn position(&self, c: &CustomerId, d: &DocId) -> Result<Option<Seq>> {
        match self.db.get(key(b'p', c, &[d.as_bytes()])).map_err(|e| self.fail(e))? {
            Some(p) => Ok(Some(Seq(u64_of(&p)?))),
            None => Ok(None),
        }
    }

    fn apply_step(&self, step: Step) -> Result<()> {
        let db = self.db()?;
        match step {
            Step::Insert(k, v) => db.insert(k, v),
            Step::Remove(k) => db.remove(k),
        }
        .map(drop)
        .map_err(|e| self.fail(e))
    }

    /// Moves `doc` to the head of the customer's feed inside a transaction.
    fn bump_feed(
        tx: &TransactionalTree,
        customer: &CustomerId,
        doc: &DocId,
    ) -> std::result::Result<Seq, ConflictableTransactionError<StoreError>> {
        let last_key = key(b'n', customer, &[]);
        let last = match tx.get(&last_key)? {
            Some(v) => u64_of(&v).map_err(ConflictableTransactionError::Abort)?,
            None => 0,
        };
        let seq = last + 1;
        let pos_key = key(b'p', customer, &[doc.as_bytes()]);
        if let Some(old) = tx.get(&pos_key)? {
            tx.remove(key(b'f', customer, &[&old]))?;
        }
        // A write cut short after its metadata and before its position leaves an entry there.
        if let Some(meta) = tx.get(key(b'm', customer, &[doc.as_bytes()]))? {
            let at = meta_seq(&meta).map_err(ConflictableTransactionError::Abort)?;
            tx.remove(key(b'f', customer, &[&at.0.to_be_bytes()]))?;
        }
        tx.insert(last_key, &seq.to_be_bytes())?;
        tx.insert(pos_key, &seq.to_be_bytes())?;
        tx.insert(key(b'f', customer, &[&seq.to_be_bytes()]), doc.as_bytes())?;
        Ok(Seq(seq))
    }

    fn scan(&self, prefix: Vec<u8>) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec)>> + '_ {
        let failed = self.healthy().err().map(Err);
        let entries = failed
            .is_none()
            .then(|| self.db.scan_prefix(prefix).map(|r| r.map_err(|e| self.fail(e))));
        failed.into_iter().chain(entries.into_iter().flatten())
    }
}

impl Store for SledStore {
    fn erase_customer(&self, customer: &CustomerId) -> Result<()> {
        let mut batch = sled::Batch::default();
        for prefix in CUSTOMER_PREFIXES {
            for entry in self.scan(key(prefix, customer, &[])) {
                batch.remove(entry?.0);
            }
        }
        // The lock for the batch alone, so that it never lands between a feed write's steps:
        // the scan of a large customer would hold up every customer's writes.
        let _feed = self.lock_feed();
        let _covered = self.uncover(&key(b'c', customer, &[]));
        self.db()?.apply_batch(batch).map_err(|e| self.fail(e))
    }

    fn copy_to(&self, to: &Path) -> Result<u64> {
        SledStore::copy_to(self, to).map(|copied| copied.bytes)
    }

    fn ready(&self) -> Result<()> {
        self.healthy()
    }

    fn flush(&self) -> Result<()> {
        self.db()?.flush().map_err(|e| self.fail(e))?;
        // A failed sync may have dropped the dirty pages it could not write: never try again.
        self.files.sync().map_err(|e| self.fail(sled::Error::Io(e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
