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
use cubby_store::{
    Chunk, DocRecords, Docs, Keys, MetaAt, Records, Result, Snapshot, Space, Store, StoreError,
};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

mod files;
mod keys;
mod witness;

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
                    let (feed, covered) = (Arc::default(), Arc::default());
                    return Ok(Self { db, files: Arc::new(files), keys, feed, covered });
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

    /// The database for a write, unless an earlier I/O error failed the store.
    fn db(&self) -> Result<&sled::Db> {
        match self.db.failed.load(Ordering::SeqCst) {
            0 => Ok(&self.db),
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
        let failed = self.db().err().map(Err);
        let entries = failed
            .is_none()
            .then(|| self.db.scan_prefix(prefix).map(|r| r.map_err(|e| self.fail(e))));
        failed.into_iter().chain(entries.into_iter().flatten())
    }
}

impl Keys for SledStore {
    fn get_key(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.keys.get(customer)
    }

    fn put_key_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        self.keys.put_if_absent(customer, wrapped)
    }

    fn replace_key(&self, customer: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        self.keys.replace(customer, expected, new)
    }

    fn destroy_key(&self, customer: &CustomerId) -> Result<()> {
        self.keys.destroy(customer)
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.keys.list()
    }
}

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
        if let Some(current) = db.get(&snapshot_key).map_err(|e| self.fail(e))? {
            if !replaces.contains(&snapshot_id(&current)?) {
                return Err(StoreError::Conflict);
            }
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
        self.db
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

impl Records for SledStore {
    fn put_record(&self, c: &CustomerId, space: Space, k: &[u8], value: &[u8]) -> Result<()> {
        self.db()?.insert(key(b'r', c, &[&[space.0], k]), value).map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn get_record(&self, c: &CustomerId, space: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db()?
            .get(key(b'r', c, &[&[space.0], k]))
            .map_err(|e| self.fail(e))?
            .map(|v| v.to_vec()))
    }

    fn remove_record(&self, c: &CustomerId, space: Space, k: &[u8]) -> Result<()> {
        self.db()?.remove(key(b'r', c, &[&[space.0], k])).map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn scan_records(&self, c: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = key(b'r', c, &[&[space.0]]);
        self.scan(prefix.clone())
            .map(|r| r.map(|(k, v)| (k[prefix.len()..].to_vec(), v.to_vec())))
            .collect()
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

    fn flush(&self) -> Result<()> {
        self.db()?.flush().map_err(|e| self.fail(e))?;
        // A failed sync may have dropped the dirty pages it could not write: never try again.
        self.files.sync().map_err(|e| self.fail(sled::Error::Io(e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SledStore;
    use cubby_store::Docs;

    cubby_store::conformance_tests!(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        move || SledStore::open(dir.path()).expect("sled opens")
    });

    /// A chunk over a quarter of a log segment goes to a blob file of its own, which sled's
    /// flush never syncs: the store's flush does.
    #[test]
    fn a_flush_syncs_the_blob_files_sled_leaves_unsynced() {
        use cubby_store::{Chunk, Store};
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open(dir.path()).expect("opens");
        let customer = cubby_core::CustomerId::from_bytes([1; 16]);
        let doc = cubby_core::DocId::from_bytes([2; 16]);
        let large: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let blobs = || std::fs::read_dir(dir.path().join("sled/blobs")).expect("blobs").count();

        fn chunk(bytes: &[u8]) -> Option<Chunk<'_>> {
            Some(Chunk { id: cubby_core::ChunkId::of(bytes), bytes })
        }
        store.write_doc(&customer, &doc, b"meta", chunk(&large)).expect("write");
        store.flush().expect("flush");
        assert!(blobs() > 0, "sled wrote the large chunk to a blob file");
        assert_eq!(store.files.sync().expect("sync"), 0, "the store's flush synced it already");

        // sled's own flush leaves the next one for the store to sync.
        let larger = [large.as_slice(), b"more"].concat();
        store.write_doc(&customer, &doc, b"meta", chunk(&larger)).expect("write");
        store.db.flush().expect("sled's flush");
        assert!(store.files.sync().expect("sync") > 0, "sled left a blob file unsynced");
    }

    /// A crash keeps some first steps of a document write and drops the rest (sled's log is
    /// durable in order). For every such prefix, of a new, an existing and a deleted document,
    /// with and without a chunk: what survives the reopen tells devices nothing false, and the
    /// repair (devices resend what was lost; the server writes again a document without a feed
    /// position) leaves the document announced once, last, with its chunk.
    #[test]
    fn every_prefix_of_a_document_write_a_crash_can_keep_is_harmless() {
        use cubby_core::{CustomerId, DocId, Seq};
        use cubby_store::{Chunk, Store};
        let c = CustomerId::from_bytes([1; 16]);
        let (d, other) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
        let bytes = b"the lost change".as_slice();
        for earlier in ["none", "written", "deleted"] {
            for with_chunk in [false, true] {
                for kept in 0.. {
                    let case = format!("earlier {earlier}, chunk {with_chunk}, {kept} steps");
                    let dir = tempfile::tempdir().expect("temp dir");
                    let store = SledStore::open(dir.path()).expect("opens");
                    let mut deleted_at = None;
                    if earlier != "none" {
                        let a = Chunk { id: cubby_core::ChunkId::of(b"a"), bytes: b"a" };
                        store.write_doc(&c, &d, b"m0", Some(a)).expect("write");
                    }
                    if earlier == "deleted" {
                        deleted_at = Some(store.delete_doc(&c, &d).expect("delete"));
                    }
                    let before = store.write_doc(&c, &other, b"m", None).expect("write");
                    let id = cubby_core::ChunkId::of(bytes);
                    let chunk = with_chunk.then_some(Chunk { id, bytes });
                    let (_, steps) = store.doc_write_steps(&c, &d, b"m1", chunk).expect("steps");
                    let all = steps.len();
                    steps.into_iter().take(kept).for_each(|s| store.apply_step(s).expect("step"));
                    store.flush().expect("flush");
                    drop(store);
                    let store = SledStore::open(dir.path()).expect("reopens");

                    let feed = store.feed_since(&c, Seq(0)).expect("feed");
                    let at: Vec<Seq> =
                        feed.iter().filter(|(_, f)| *f == d).map(|(s, _)| *s).collect();
                    assert!(at.len() <= 1, "{case}: the document is in the feed once");
                    let loaded = store.load(&c, &d).expect("load");
                    let has_chunk =
                        |l: &cubby_store::DocRecords| l.chunks.iter().any(|(_, b)| b == bytes);
                    if loaded.as_ref().is_some_and(has_chunk) {
                        let announced = at.first().is_some_and(|s| *s > before);
                        assert!(announced, "{case}: a kept chunk is announced");
                    }
                    match &loaded {
                        // Position 0: the server writes it again when it loads it.
                        Some(l) if l.seq == Seq(0) => assert!(earlier != "written", "{case}"),
                        // At its position, or at a later one whose write was cut short.
                        Some(l) => assert!(at.len() == 1 && at[0] >= l.seq, "{case}: in the feed"),
                        // Only the deletion the devices were told of already.
                        None => assert_eq!(at, Vec::from_iter(deleted_at), "{case}: no deletion"),
                    }

                    // The repair: devices resend a lost change or retry a lost metadata
                    // change; a document without a feed position is written again.
                    let lost_chunk = with_chunk && !loaded.as_ref().is_some_and(has_chunk);
                    let stale = loaded.as_ref().is_none_or(|l| l.seq == Seq(0) || l.meta != b"m1");
                    if lost_chunk || stale {
                        let chunk = lost_chunk.then_some(Chunk { id, bytes });
                        store.write_doc(&c, &d, b"m1", chunk).expect("the resend");
                    }
                    let feed = store.feed_since(&c, Seq(0)).expect("feed");
                    let loaded = store.load(&c, &d).expect("load").expect("the document exists");
                    assert_eq!(feed.last(), Some(&(loaded.seq, d)), "{case}: announced last");
                    assert_eq!(feed.iter().filter(|(_, f)| *f == d).count(), 1, "{case}");
                    assert_eq!(feed.iter().filter(|(_, f)| *f == other).count(), 1, "{case}");
                    assert_eq!(loaded.meta, b"m1", "{case}");
                    assert_eq!(has_chunk(&loaded), with_chunk, "{case}: the chunk is stored");
                    if kept == all {
                        break;
                    }
                }
            }
        }
    }

    /// The id of test chunk `index`, whose bytes are the index.
    fn id_of(index: u64) -> cubby_core::ChunkId {
        cubby_core::ChunkId::of(&index.to_be_bytes())
    }

    /// The indexes of the test chunks loaded, in order.
    fn indexes(loaded: &cubby_store::DocRecords) -> Vec<u64> {
        let mut indexes: Vec<u64> = loaded
            .chunks
            .iter()
            .map(|(_, b)| u64::from_be_bytes(b.as_slice().try_into().expect("8 bytes")))
            .collect();
        indexes.sort_unstable();
        indexes
    }

    /// A snapshot that replaces test chunks `indexes`.
    fn compact(
        store: &SledStore,
        c: &cubby_core::CustomerId,
        doc: &cubby_core::DocId,
        indexes: std::ops::Range<u64>,
    ) {
        use cubby_store::Snapshot;
        let snapshot = Snapshot { id: cubby_core::ChunkId::of(b"snap"), bytes: b"snap".to_vec() };
        let replaces: Vec<_> = indexes.map(id_of).collect();
        store.compact(c, doc, &snapshot, &replaces).expect("compact");
    }

    /// The chunks of `doc` on disk, covered or not.
    fn chunks_on_disk(
        store: &SledStore,
        c: &cubby_core::CustomerId,
        doc: &cubby_core::DocId,
    ) -> usize {
        store.db.scan_prefix(super::key(b'c', c, &[doc.as_bytes()])).count()
    }

    /// Writes chunks `indexes` of `doc`, each a write of its own.
    fn write_chunks(
        store: &SledStore,
        c: &cubby_core::CustomerId,
        doc: &cubby_core::DocId,
        indexes: std::ops::Range<u64>,
    ) {
        use cubby_store::Chunk;
        for index in indexes {
            let bytes = index.to_be_bytes();
            let chunk = Chunk { id: id_of(index), bytes: &bytes };
            store.write_doc(c, doc, b"meta", Some(chunk)).expect("write");
        }
    }

    /// A compaction leaves the chunks it covers for the writes after it to remove, a few each
    /// (of any document), so that no write pays for all of them; a load never returns them,
    /// and the chunks after the snapshot stay.
    #[test]
    fn covered_chunks_are_removed_a_few_per_write_and_never_loaded() {
        use super::SWEEP_PER_WRITE;
        use cubby_core::{CustomerId, DocId};
        use cubby_store::Chunk;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open(dir.path()).expect("opens");
        let c = CustomerId::from_bytes([1; 16]);
        let (a, b) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
        write_chunks(&store, &c, &a, 0..300);
        compact(&store, &c, &a, 0..300);
        assert_eq!(chunks_on_disk(&store, &c, &a), 300 - SWEEP_PER_WRITE);

        let mut next = 300;
        while chunks_on_disk(&store, &c, &a) > (next - 300) as usize {
            let before = chunks_on_disk(&store, &c, &a);
            // Every other write is to another document, off the feed as a device writes: it
            // sweeps too.
            if next % 2 == 0 {
                write_chunks(&store, &c, &a, next..next + 1);
                next += 1;
            } else {
                let bytes = next.to_be_bytes();
                let chunk = Chunk { id: id_of(next), bytes: &bytes };
                store.write_doc_off_feed(&c, &b, b"meta", Some(chunk)).expect("write");
            }
            let loaded = store.load(&c, &a).expect("load").expect("exists");
            assert!(loaded.snapshot.is_some());
            let after = (300..next).filter(|i| i % 2 == 0).collect::<Vec<_>>();
            assert_eq!(indexes(&loaded), after, "only the chunks after it");
            assert!(chunks_on_disk(&store, &c, &a) < before, "each write removed some");
        }
        assert!(next - 300 <= (300 / SWEEP_PER_WRITE) as u64, "gone within {} writes", next - 300);
        // Once they are gone, writes remove nothing more.
        write_chunks(&store, &c, &b, 1000..1010);
        let loaded = store.load(&c, &a).expect("load").expect("exists");
        let after = (300..next).filter(|i| i % 2 == 0).count();
        assert_eq!(loaded.chunks.len(), after);
        assert_eq!(chunks_on_disk(&store, &c, &a), after);
    }

    /// Covered chunks still on disk at a restart (the queue of them is in memory) are found by
    /// the next load, which skips them and has the writes after it remove them.
    #[test]
    fn covered_chunks_left_at_a_restart_are_removed_after_the_next_load() {
        use cubby_core::{CustomerId, DocId};
        use cubby_store::Store;
        let dir = tempfile::tempdir().expect("temp dir");
        let c = CustomerId::from_bytes([1; 16]);
        let (a, b) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
        let left = {
            let store = SledStore::open(dir.path()).expect("opens");
            write_chunks(&store, &c, &a, 0..100);
            compact(&store, &c, &a, 0..100);
            store.flush().expect("flush");
            chunks_on_disk(&store, &c, &a)
        };
        assert!(left > 0);
        let store = SledStore::open(dir.path()).expect("reopens");
        write_chunks(&store, &c, &b, 0..10);
        assert_eq!(chunks_on_disk(&store, &c, &a), left, "nothing queued them");
        let loaded = store.load(&c, &a).expect("load").expect("exists");
        assert!(loaded.chunks.is_empty(), "the load skipped them");
        write_chunks(&store, &c, &b, 10..60);
        assert_eq!(chunks_on_disk(&store, &c, &a), 0, "and queued them");
    }

    /// Deleting a document (or erasing its customer) forgets its queued removals: a document
    /// made again under the same id keeps its new chunks, even those with the ids of the ones
    /// replaced before.
    #[test]
    fn a_document_made_again_keeps_its_chunks_from_an_earlier_compaction() {
        use cubby_core::{CustomerId, DocId};
        use cubby_store::Store;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open(dir.path()).expect("opens");
        let c = CustomerId::from_bytes([1; 16]);
        let (a, b) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
        for erase in [false, true] {
            write_chunks(&store, &c, &a, 0..100);
            compact(&store, &c, &a, 0..100);
            if erase {
                store.erase_customer(&c).expect("erase");
            } else {
                store.delete_doc(&c, &a).expect("delete");
            }
            write_chunks(&store, &c, &a, 0..10);
            write_chunks(&store, &c, &b, 0..30);
            let loaded = store.load(&c, &a).expect("load").expect("made again");
            assert!(loaded.snapshot.is_none());
            assert_eq!(indexes(&loaded), (0..10).collect::<Vec<_>>(), "erase: {erase}");
            store.delete_doc(&c, &a).expect("delete");
        }
    }

    /// An older copy of a document's metadata put back over the newer one (as someone with the
    /// files and sled's checksums could), with or without its old position, is refused: its
    /// position is behind the document's, or the feed no longer names the document there.
    #[test]
    fn older_metadata_spliced_back_with_or_without_its_position_is_refused() {
        use cubby_core::{CustomerId, DocId};
        use cubby_store::StoreError;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open(dir.path()).expect("opens");
        let (c, d) = (CustomerId::from_bytes([1; 16]), DocId::from_bytes([2; 16]));
        let raw = |prefix| super::key(prefix, &c, &[d.as_bytes()]);
        store.write_doc(&c, &d, b"shared", None).expect("write");
        let (old_meta, old_position) = (
            store.db.get(raw(b'm')).expect("get").expect("meta"),
            store.db.get(raw(b'p')).expect("get").expect("position"),
        );
        store.write_doc(&c, &d, b"private", None).expect("the newer metadata");
        store.db.insert(raw(b'm'), old_meta.clone()).expect("splice the metadata");
        let refused = store.load(&c, &d).expect_err("older than the document");
        assert!(matches!(refused, StoreError::Corrupt(what) if what.contains("older")));
        store.db.insert(raw(b'p'), old_position).expect("and its position");
        let refused = store.load(&c, &d).expect_err("not at its feed position");
        assert!(matches!(refused, StoreError::Corrupt(what) if what.contains("feed")));
        assert!(store.doc_meta(&c, &d).is_err() && store.list_docs(&c).is_err());
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused_as_in_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _first = SledStore::open(dir.path()).expect("opens");
        assert!(matches!(SledStore::open(dir.path()), Err(cubby_store::StoreError::InUse)));
    }

    #[test]
    fn conformance_holds_through_the_encryption_decorator() {
        use cubby_crypto::keys::{Keyring, MasterSecret};
        let dir = tempfile::tempdir().expect("temp dir");
        let open = || {
            let keyring = Keyring::from_master(&MasterSecret::from_bytes([5; 32]));
            cubby_store::EncryptedStore::open(SledStore::open(dir.path()).expect("opens"), keyring)
                .expect("key check")
        };
        cubby_store::conformance::flushed_writes_survive_reopen(open);
    }
}
