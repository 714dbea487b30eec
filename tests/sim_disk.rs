//! A disk for the simulation: a [`Store`] in memory that a crash can tear.
//!
//! Writes are visible at once and durable only after `flush`, as on sled; wrapped data keys are
//! durable when the call returns, as the sled backend's fsynced key files are. [`SimDisk::crash`]
//! forgets every write not yet flushed. The disk keeps the operations it has made durable and
//! replays them into a fresh [`MemoryStore`] after a crash, so what survives is exactly what a
//! flush covered. [`SimDisk::crash_partly`] is the sled store's power loss instead: some first
//! writes since the flush survive too.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_store::{
    Chunk, DocRecords, Docs, Keys, MemoryStore, MetaAt, Records, Result, Snapshot, Space, Store,
};

/// A write, kept so that it can be replayed after a crash.
#[derive(Clone, Debug)]
enum Op {
    PutKey(CustomerId, Vec<u8>),
    ReplaceKey(CustomerId, Vec<u8>, Vec<u8>),
    DestroyKey(CustomerId),
    EraseCustomer(CustomerId),
    /// With the metadata as it was stored (made for the position the write took, which a
    /// replay takes again).
    WriteDoc(CustomerId, DocId, Vec<u8>, Option<(ChunkId, Vec<u8>)>),
    Compact(CustomerId, DocId, Snapshot, Vec<ChunkId>),
    DeleteDoc(CustomerId, DocId),
    PutRecord(CustomerId, Space, Vec<u8>, Vec<u8>),
    RemoveRecord(CustomerId, Space, Vec<u8>),
}

impl Op {
    fn apply(&self, store: &MemoryStore) -> Result<()> {
        match self {
            Op::PutKey(c, key) => store.put_key_if_absent(c, key).map(drop),
            Op::ReplaceKey(c, old, new) => store.replace_key(c, old, new).map(drop),
            Op::DestroyKey(c) => store.destroy_key(c),
            Op::EraseCustomer(c) => store.erase_customer(c),
            Op::WriteDoc(c, d, meta, chunk) => {
                let chunk = chunk.as_ref().map(|(id, bytes)| Chunk { id: *id, bytes });
                store.write_doc(c, d, meta, chunk).map(drop)
            }
            Op::Compact(c, d, snapshot, replaces) => store.compact(c, d, snapshot, replaces),
            Op::DeleteDoc(c, d) => store.delete_doc(c, d).map(drop),
            Op::PutRecord(c, space, k, v) => store.put_record(c, *space, k, v),
            Op::RemoveRecord(c, space, k) => store.remove_record(c, *space, k),
        }
    }
}

#[derive(Default)]
struct State {
    /// What the software sees.
    live: MemoryStore,
    /// Every write a flush (or a durable key call) covered, in order.
    durable: Vec<Op>,
    /// Writes since the last flush.
    pending: Vec<Op>,
    /// Writes a crash has thrown away, over the disk's life.
    lost: usize,
}

/// Metadata that remembers the bytes it made, for the write's replay.
struct Captured<'a> {
    meta: &'a dyn MetaAt,
    made: Mutex<Vec<u8>>,
}

impl MetaAt for Captured<'_> {
    fn at(&self, seq: Seq) -> Vec<u8> {
        let bytes = self.meta.at(seq);
        *self.made.lock().unwrap_or_else(PoisonError::into_inner) = bytes.clone();
        bytes
    }
}

/// A simulated disk. Clones share it (the same disk, seen by the next incarnation of a host).
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Power loss: every write not flushed is gone. Returns how many were lost.
    pub fn crash(&self) -> usize {
        let mut state = self.lock();
        let lost = std::mem::take(&mut state.pending).len();
        state.lost += lost;
        state.live = replay(&state.durable);
        lost
    }

    /// Power loss as the sled store has it: sled's log is durable in order and written out
    /// when its buffer fills, not only at a flush, so besides everything flushed, some first
    /// writes since survive. (A document write can also be torn in sled, which the store's own
    /// test covers step by step; here the server's group commit applies and flushes a batch in
    /// one poll, so a crash never falls inside one.) Returns how many writes were lost.
    pub fn crash_partly(&self, rng: &mut crate::Rng) -> usize {
        let mut state = self.lock();
        let mut kept = std::mem::take(&mut state.pending);
        let lost = kept.split_off(rng.below(kept.len() + 1)).len();
        state.durable.append(&mut kept);
        state.lost += lost;
        state.live = replay(&state.durable);
        lost
    }

    /// Writes lost to crashes so far.
    pub fn lost(&self) -> usize {
        self.lock().lost
    }

    /// The disk rolled back to an earlier durable state (a backup restored, a snapshot of the
    /// volume put back): a random later part of what was durable is gone, and what was not.
    /// Returns how many writes were lost.
    pub fn roll_back(&self, rng: &mut crate::Rng) -> usize {
        let mut state = self.lock();
        let keep = rng.below(state.durable.len() + 1);
        let lost = state.durable.split_off(keep).len() + std::mem::take(&mut state.pending).len();
        state.lost += lost;
        state.live = replay(&state.durable);
        lost
    }

    /// The disk wiped: nothing is left. Returns how many writes were lost.
    pub fn wipe(&self) -> usize {
        let mut state = self.lock();
        let lost =
            std::mem::take(&mut state.durable).len() + std::mem::take(&mut state.pending).len();
        state.lost += lost;
        state.live = MemoryStore::new();
        lost
    }

    /// A copy of what is durable now, as a store of its own.
    pub fn durable(&self) -> MemoryStore {
        replay(&self.lock().durable)
    }

    /// Applies `op` to what the software sees; it becomes durable at the next flush, or now.
    fn write<T>(
        &self,
        op: Op,
        durable_now: bool,
        run: impl FnOnce(&MemoryStore) -> Result<T>,
    ) -> Result<T> {
        let mut state = self.lock();
        let result = run(&state.live)?;
        if durable_now {
            state.durable.push(op);
        } else {
            state.pending.push(op);
        }
        Ok(result)
    }
}

fn replay(ops: &[Op]) -> MemoryStore {
    let store = MemoryStore::new();
    for op in ops {
        op.apply(&store).expect("a write that succeeded once replays");
    }
    store
}

impl Keys for SimDisk {
    fn get_key(&self, c: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.lock().live.get_key(c)
    }

    fn put_key_if_absent(&self, c: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        self.write(Op::PutKey(*c, wrapped.to_vec()), true, |s| s.put_key_if_absent(c, wrapped))
    }

    fn replace_key(&self, c: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        let op = Op::ReplaceKey(*c, expected.to_vec(), new.to_vec());
        self.write(op, true, |s| s.replace_key(c, expected, new))
    }

    fn destroy_key(&self, c: &CustomerId) -> Result<()> {
        self.write(Op::DestroyKey(*c), true, |s| s.destroy_key(c))
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.lock().live.list_customers()
    }
}

impl Docs for SimDisk {
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        m: &dyn MetaAt,
        ch: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        let mut state = self.lock();
        let captured = Captured { meta: m, made: Mutex::default() };
        let seq = state.live.write_doc(c, d, &captured, ch)?;
        let made = captured.made.into_inner().unwrap_or_else(PoisonError::into_inner);
        let chunk = ch.map(|ch| (ch.id, ch.bytes.to_vec()));
        state.pending.push(Op::WriteDoc(*c, *d, made, chunk));
        Ok(seq)
    }

    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        self.lock().live.load(c, d)
    }

    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        self.lock().live.doc_meta(c, d)
    }

    fn compact(&self, c: &CustomerId, d: &DocId, snapshot: &Snapshot, r: &[ChunkId]) -> Result<()> {
        let op = Op::Compact(*c, *d, snapshot.clone(), r.to_vec());
        self.write(op, false, |s| s.compact(c, d, snapshot, r))
    }

    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        self.write(Op::DeleteDoc(*c, *d), false, |s| s.delete_doc(c, d))
    }

    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        self.lock().live.list_docs(c)
    }

    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        self.lock().live.feed_since(c, cursor)
    }

    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        self.lock().live.feed_head(c)
    }
}

impl Records for SimDisk {
    fn put_record(&self, c: &CustomerId, space: Space, k: &[u8], v: &[u8]) -> Result<()> {
        let op = Op::PutRecord(*c, space, k.to_vec(), v.to_vec());
        self.write(op, false, |s| s.put_record(c, space, k, v))
    }

    fn get_record(&self, c: &CustomerId, space: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.lock().live.get_record(c, space, k)
    }

    fn remove_record(&self, c: &CustomerId, space: Space, k: &[u8]) -> Result<()> {
        self.write(Op::RemoveRecord(*c, space, k.to_vec()), false, |s| s.remove_record(c, space, k))
    }

    fn scan_records(&self, c: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.lock().live.scan_records(c, space)
    }
}

impl Store for SimDisk {
    fn erase_customer(&self, c: &CustomerId) -> Result<()> {
        self.write(Op::EraseCustomer(*c), false, |s| s.erase_customer(c))
    }

    fn flush(&self) -> Result<()> {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        state.durable.extend(pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A partial crash keeps what was flushed and a prefix of the rest, in order.
    #[test]
    fn a_partial_crash_keeps_what_was_flushed_and_a_prefix_of_the_rest() -> Result<()> {
        let c = CustomerId::from_bytes([1; 16]);
        let docs: Vec<DocId> = (2..6).map(|i| DocId::from_bytes([i; 16])).collect();
        let mut kept_counts = BTreeSet::new();
        for seed in 0..32 {
            let disk = SimDisk::default();
            disk.write_doc(&c, &docs[0], b"flushed", None)?;
            disk.flush()?;
            for doc in &docs[1..] {
                disk.write_doc(&c, doc, b"pending", None)?;
            }
            let lost = disk.crash_partly(&mut crate::Rng(seed));
            let kept: Vec<bool> = docs
                .iter()
                .map(|d| disk.doc_meta(&c, d).map(|m| m.is_some()))
                .collect::<Result<_>>()?;
            let survivors = kept.iter().filter(|k| **k).count();
            assert_eq!(survivors + lost, docs.len(), "seed {seed}");
            assert!(kept.iter().take(survivors).all(|k| *k), "seed {seed}: a prefix, {kept:?}");
            assert_eq!(disk.feed_since(&c, Seq(0))?.len(), survivors, "seed {seed}");
            kept_counts.insert(survivors);
        }
        assert_eq!(kept_counts.len(), docs.len(), "every prefix comes up: {kept_counts:?}");
        Ok(())
    }

    #[test]
    fn a_crash_keeps_exactly_what_was_flushed() -> Result<()> {
        let disk = SimDisk::default();
        let (c, a, b) = (
            CustomerId::from_bytes([1; 16]),
            DocId::from_bytes([2; 16]),
            DocId::from_bytes([3; 16]),
        );
        disk.put_key_if_absent(&c, b"key")?;
        disk.write_doc(&c, &a, b"a", Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }))?;
        disk.flush()?;
        disk.write_doc(&c, &b, b"b", None)?;
        assert_eq!(disk.list_docs(&c)?.len(), 2, "unflushed writes are visible");
        assert_eq!(disk.crash(), 1);
        assert_eq!(disk.list_docs(&c)?, vec![(a, Seq(1), b"a".to_vec())]);
        assert_eq!(disk.get_key(&c)?.as_deref(), Some(&b"key"[..]));
        assert_eq!(disk.feed_since(&c, Seq(0))?, vec![(Seq(1), a)]);
        Ok(())
    }
}
