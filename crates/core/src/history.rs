//! A document's history as storage keeps it, the same on the server and on a device.
//!
//! Storage keeps one optional snapshot (a full `Automerge::save`) and the change chunks written
//! after it (each an `Automerge::save_after` of what one write added), every part named by its
//! content ([`ChunkId`]). [`History`] is the document with that bookkeeping: it is rebuilt from
//! the parts, says what the next write stores ([`History::take_chunk`]), and when and how the
//! parts are folded into a fresh snapshot ([`History::take_compaction`], under one
//! [`CompactionPolicy`]). A compaction names exactly the parts it replaces, so a part another
//! process wrote meanwhile is never dropped with them.
//!
//! What it keeps of the document is a [`Content`]: an Automerge document (a device), or a
//! [`crate::lazy::LazyDoc`] (the server), whose changes are applied only when asked.

use automerge::{Automerge, ChangeHash, ReadDoc};

use crate::ChunkId;

/// When a document's chunks are folded into a snapshot.
///
/// A compaction rewrites the whole document, so for a large one it waits for more chunks: at
/// least one for every [`OPERATIONS_PER_CHUNK`] operations the document held at the last one.
/// Its cost per change then stays about the same however large the document grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Compact once this many chunks follow the snapshot (more for a large document).
    pub max_chunks: usize,
    /// Compact once the chunks after the snapshot add up to this many bytes.
    pub max_chunk_bytes: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self { max_chunks: 256, max_chunk_bytes: 1 << 20 }
    }
}

/// See [`CompactionPolicy`].
pub const OPERATIONS_PER_CHUNK: u64 = 64;

impl CompactionPolicy {
    /// Whether a document with these chunks after its snapshot, which held `operations` at its
    /// last compaction (or load), should be compacted now.
    pub fn should_compact(&self, chunks: usize, chunk_bytes: u64, operations: u64) -> bool {
        let scaled = usize::try_from(operations / OPERATIONS_PER_CHUNK).unwrap_or(usize::MAX);
        chunks >= self.max_chunks.max(scaled) || chunk_bytes >= self.max_chunk_bytes
    }
}

/// Why stored parts do not make a document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A part does not parse or apply.
    #[error("stored document does not load: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Changes in the parts depend on changes in none of them: a part is missing.
    #[error("stored document is missing changes {0} others depend on")]
    Incomplete(usize),
    /// A change in the parts is refused by the change graph.
    #[error("stored document does not load: {0}")]
    Graph(#[from] crate::graph::GraphError),
    /// Automerge refuses (or panics on) changes a lazy document took in.
    #[error("automerge refuses this document's changes: {0}")]
    Refused(String),
}

/// What a [`History`] keeps of the document: its changes, loaded from and stored as parts.
pub trait Content: Default {
    /// Rebuilt from a snapshot (if any) and a run of chunks, in any order; a change that
    /// misses what it depends on is [`LoadError::Incomplete`].
    fn rebuild(snapshot: Option<&[u8]>, run: &[u8]) -> Result<Self, LoadError>;
    /// Takes in more stored parts, one after another (another writer's chunks or snapshot).
    fn load_more(&mut self, run: &[u8]) -> Result<(), LoadError>;
    /// The heads.
    fn heads(&self) -> Vec<ChangeHash>;
    /// The changes not among `heads` or their ancestors, as a chunk (`Automerge::save_after`).
    fn changes_after(&self, heads: &[ChangeHash]) -> Vec<u8>;
    /// The whole document as a snapshot (`Automerge::save`).
    fn snapshot(&mut self) -> Result<Vec<u8>, LoadError>;
    /// How many operations the document holds (as far as it has applied its changes): what a
    /// snapshot rewrites.
    fn operations(&self) -> u64;
}

impl Content for Automerge {
    fn rebuild(snapshot: Option<&[u8]>, run: &[u8]) -> Result<Self, LoadError> {
        rebuild(snapshot, (!run.is_empty()).then_some(run))
    }

    fn load_more(&mut self, run: &[u8]) -> Result<(), LoadError> {
        self.load_incremental(run)?;
        Ok(())
    }

    fn heads(&self) -> Vec<ChangeHash> {
        self.get_heads()
    }

    fn changes_after(&self, heads: &[ChangeHash]) -> Vec<u8> {
        self.save_after(heads)
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, LoadError> {
        Ok(self.save())
    }

    fn operations(&self) -> u64 {
        self.stats().num_ops
    }
}

/// A part of a document's history to store: its content id and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// [`ChunkId::of`] the bytes.
    pub id: ChunkId,
    /// An `Automerge::save_after` (a chunk) or `Automerge::save` (a snapshot).
    pub bytes: Vec<u8>,
}

impl Part {
    fn new(bytes: Vec<u8>) -> Self {
        Self { id: ChunkId::of(&bytes), bytes }
    }
}

/// A fresh snapshot and exactly the stored parts it replaces (the old snapshot, if any, and
/// every chunk the history knew of when it was made).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// The document as a whole.
    pub snapshot: Part,
    /// The parts it replaces.
    pub replaces: Vec<ChunkId>,
}

/// A document and what storage holds of it.
#[derive(Debug)]
pub struct History<C = Automerge> {
    doc: C,
    policy: CompactionPolicy,
    /// The stored snapshot's id.
    snapshot: Option<ChunkId>,
    /// The chunks stored (or being stored) after it, with their sizes.
    chunks: Vec<(ChunkId, u64)>,
    /// The heads of everything in the parts taken so far: the next chunk holds what came after.
    taken: Vec<ChangeHash>,
    /// A compaction is being stored: no other is made meanwhile (it would name parts the first
    /// one replaces, and not the snapshot it makes).
    compacting: bool,
    /// The operations the document held at its last compaction or load.
    operations: u64,
}

impl<C: Content> History<C> {
    /// A new, empty document, with nothing stored.
    pub fn new(policy: CompactionPolicy) -> Self {
        Self {
            doc: C::default(),
            policy,
            snapshot: None,
            chunks: Vec::new(),
            taken: Vec::new(),
            compacting: false,
            operations: 0,
        }
    }

    /// Rebuilds a document from its stored snapshot (if any) and chunks. Every change must have
    /// what it depends on among the parts: a missing part is [`LoadError::Incomplete`], never a
    /// document quietly short of changes.
    pub fn rebuild<'a>(
        snapshot: Option<(ChunkId, &'a [u8])>,
        chunks: impl IntoIterator<Item = (ChunkId, &'a [u8])>,
        policy: CompactionPolicy,
    ) -> Result<Self, LoadError> {
        let chunks: Vec<_> = chunks.into_iter().collect();
        // The chunks go in as one run, which Automerge applies as one batch (see [`rebuild`]).
        let run = chunks.iter().map(|(_, bytes)| *bytes).collect::<Vec<_>>().concat();
        let doc = C::rebuild(snapshot.map(|(_, bytes)| bytes), &run)?;
        let (taken, operations) = (doc.heads(), doc.operations());
        Ok(Self {
            doc,
            policy,
            snapshot: snapshot.map(|(id, _)| id),
            chunks: chunks.iter().map(|(id, bytes)| (*id, bytes.len() as u64)).collect(),
            taken,
            compacting: false,
            operations,
        })
    }

    /// Takes in what the store holds now (another writer stored parts of this document): the
    /// parts it does not know are applied, and what the store holds becomes what it knows of.
    pub fn absorb<'a>(
        &mut self,
        snapshot: Option<(ChunkId, &'a [u8])>,
        chunks: impl IntoIterator<Item = (ChunkId, &'a [u8])>,
    ) -> Result<(), LoadError> {
        let known: std::collections::HashSet<ChunkId> =
            self.snapshot.iter().copied().chain(self.chunks.iter().map(|(id, _)| *id)).collect();
        let chunks: Vec<_> = chunks.into_iter().collect();
        // Nothing of this writer's own is waiting to be taken (or it is taken later, again).
        let current = self.taken == self.doc.heads();
        let mut run = Vec::new();
        for (id, bytes) in snapshot.iter().chain(&chunks) {
            if !known.contains(id) {
                run.extend_from_slice(bytes);
            }
        }
        if !run.is_empty() {
            self.doc.load_more(&run)?;
        }
        self.snapshot = snapshot.map(|(id, _)| id);
        self.chunks = chunks.iter().map(|(id, bytes)| (*id, bytes.len() as u64)).collect();
        if current {
            self.taken = self.doc.heads();
        }
        Ok(())
    }

    /// The document.
    pub fn doc(&self) -> &C {
        &self.doc
    }

    /// The document, to change: [`History::take_chunk`] then has the changes.
    pub fn doc_mut(&mut self) -> &mut C {
        &mut self.doc
    }

    /// The changes made since the last part taken, as the next chunk to store (`None` when
    /// there are none). It counts as stored from here on; [`History::lost`] says otherwise.
    pub fn take_chunk(&mut self) -> Option<Part> {
        let heads = self.doc.heads();
        if heads == self.taken {
            return None;
        }
        let chunk = Part::new(self.doc.changes_after(&self.taken));
        self.taken = heads;
        self.chunks.push((chunk.id, chunk.bytes.len() as u64));
        Some(chunk)
    }

    /// A chunk taken did not reach the store: the next chunk holds its changes too (and
    /// everything else, so that no chunk stored after it depends on changes no part holds).
    pub fn lost(&mut self, chunk: &ChunkId) {
        self.chunks.retain(|(id, _)| id != chunk);
        self.taken.clear();
    }

    /// Chunks after the snapshot, and their bytes.
    pub fn chunks_since_snapshot(&self) -> (usize, u64) {
        (self.chunks.len(), self.chunks.iter().map(|(_, len)| len).sum())
    }

    /// A snapshot to replace the stored parts with, when the policy says it is due and no
    /// other is being stored. Then one is being stored until [`History::compacted`] or
    /// [`History::compaction_lost`]. An error when the content cannot make one (a lazy one
    /// whose changes Automerge refuses): the parts stand as they are.
    pub fn take_compaction(&mut self) -> Result<Option<Compaction>, LoadError> {
        let (chunks, bytes) = self.chunks_since_snapshot();
        let due = self.policy.should_compact(chunks, bytes, self.operations);
        if self.compacting || chunks == 0 || !due {
            return Ok(None);
        }
        let compaction = self.snapshot_now()?;
        self.compacting = true;
        Ok(Some(compaction))
    }

    /// A snapshot of the document now, replacing every part stored.
    pub fn snapshot_now(&mut self) -> Result<Compaction, LoadError> {
        let replaces = self.snapshot.iter().copied().chain(self.chunks.iter().map(|(id, _)| *id));
        let replaces = replaces.collect();
        Ok(Compaction { snapshot: Part::new(self.doc.snapshot()?), replaces })
    }

    /// `compaction` is stored: its snapshot stands for the parts it replaced.
    pub fn compacted(&mut self, compaction: &Compaction) {
        self.operations = self.doc.operations();
        self.snapshot = Some(compaction.snapshot.id);
        self.chunks.retain(|(id, _)| !compaction.replaces.contains(id));
        self.compacting = false;
    }

    /// The compaction taken did not reach the store: the parts stand as they were.
    pub fn compaction_lost(&mut self) {
        self.compacting = false;
    }
}

/// Rebuilds a document's content from its snapshot (if any) and the chunks written after it,
/// checking that no change misses what it depends on.
pub fn rebuild<'a>(
    snapshot: Option<&[u8]>,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Automerge, LoadError> {
    let mut doc = match snapshot {
        Some(bytes) => Automerge::load(bytes)?,
        None => Automerge::new(),
    };
    // The chunks go to Automerge as one run, which it applies as one batch. Applied one chunk at
    // a time, each batch walked the document: 256 chunks after a 100,000-character text took
    // 7 s to load (criterion `rebuild`). Automerge queues a change until what it depends on has
    // arrived, so the chunks may come in any order.
    let run = chunks.into_iter().collect::<Vec<_>>().concat();
    if !run.is_empty() {
        doc.load_incremental(&run)?;
    }
    let missing = doc.get_missing_deps(&[]);
    if !missing.is_empty() {
        return Err(LoadError::Incomplete(missing.len()));
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{ROOT, transaction::Transactable};

    fn put(history: &mut History, key: &str, value: i64) {
        history
            .doc_mut()
            .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, key, value))
            .expect("put");
    }

    /// The parts a history asked to store, and their replacement by compactions.
    #[derive(Default)]
    struct Stored {
        snapshot: Option<Part>,
        chunks: Vec<Part>,
    }

    impl Stored {
        fn keep(&mut self, chunk: Option<Part>) {
            self.chunks.extend(chunk);
        }

        fn compact(&mut self, compaction: &Compaction) {
            self.chunks.retain(|c| !compaction.replaces.contains(&c.id));
            self.snapshot = Some(compaction.snapshot.clone());
        }

        fn rebuild(&self, policy: CompactionPolicy) -> Result<History, LoadError> {
            History::rebuild(
                self.snapshot.as_ref().map(|s| (s.id, s.bytes.as_slice())),
                self.chunks.iter().map(|c| (c.id, c.bytes.as_slice())),
                policy,
            )
        }
    }

    #[test]
    fn the_stored_parts_rebuild_the_document_through_compactions() {
        let policy = CompactionPolicy { max_chunks: 4, max_chunk_bytes: u64::MAX };
        let mut history = History::new(policy);
        let mut stored = Stored::default();
        assert_eq!(history.take_chunk(), None, "an empty document has nothing to store");
        for i in 0..10 {
            put(&mut history, "n", i);
            stored.keep(history.take_chunk());
            assert_eq!(history.take_chunk(), None, "taken once");
            if let Some(compaction) =
                history.take_compaction().expect("an Automerge document snapshots")
            {
                stored.compact(&compaction);
                history.compacted(&compaction);
            }
        }
        assert!(stored.snapshot.is_some());
        // One compaction at a time: a second is not made while the first is being stored.
        for i in 10..14 {
            put(&mut history, "n", i);
            stored.keep(history.take_chunk());
        }
        let pending =
            history.take_compaction().expect("an Automerge document snapshots").expect("due");
        assert_eq!(
            history.take_compaction().expect("an Automerge document snapshots"),
            None,
            "one is being stored"
        );
        history.compaction_lost();
        assert_eq!(
            history.take_compaction().expect("an Automerge document snapshots"),
            Some(pending.clone()),
            "lost: made again"
        );
        stored.compact(&pending);
        history.compacted(&pending);
        assert_eq!(history.chunks_since_snapshot().0, stored.chunks.len());
        let rebuilt = stored.rebuild(policy).expect("rebuilds");
        assert_eq!(rebuilt.doc().get_heads(), history.doc().get_heads());
        assert_eq!(rebuilt.chunks_since_snapshot(), history.chunks_since_snapshot());
    }

    #[test]
    fn a_compaction_leaves_a_chunk_another_writer_stored_meanwhile() {
        let policy = CompactionPolicy { max_chunks: 2, max_chunk_bytes: u64::MAX };
        let mut stored = Stored::default();
        let mut first = History::new(policy);
        put(&mut first, "a", 1);
        stored.keep(first.take_chunk());
        // A second writer loads what is stored and adds a chunk the first never hears of.
        let mut second = stored.rebuild(policy).expect("rebuilds");
        put(&mut second, "b", 2);
        stored.keep(second.take_chunk());
        put(&mut first, "a", 3);
        stored.keep(first.take_chunk());
        let compaction = first
            .take_compaction()
            .expect("an Automerge document snapshots")
            .expect("two chunks: due");
        assert_eq!(compaction.replaces.len(), 2, "the first writer's own chunks only");
        stored.compact(&compaction);
        let rebuilt = stored.rebuild(policy).expect("rebuilds");
        let json = crate::json::to_json(rebuilt.doc());
        assert_eq!(json, serde_json::json!({ "a": 3, "b": 2 }), "the second writer's change stays");
    }

    #[test]
    fn a_writer_takes_in_what_another_stored_and_stores_nothing_of_it_again() {
        let policy = CompactionPolicy { max_chunks: 2, max_chunk_bytes: u64::MAX };
        let mut stored = Stored::default();
        let mut here = History::new(policy);
        put(&mut here, "a", 1);
        stored.keep(here.take_chunk());
        let mut there = stored.rebuild(policy).expect("rebuilds");
        put(&mut there, "b", 2);
        stored.keep(there.take_chunk());
        put(&mut there, "c", 3);
        stored.keep(there.take_chunk());
        let compaction =
            there.take_compaction().expect("an Automerge document snapshots").expect("due");
        stored.compact(&compaction);
        there.compacted(&compaction);

        let snapshot = stored.snapshot.as_ref().map(|s| (s.id, s.bytes.as_slice()));
        here.absorb(snapshot, stored.chunks.iter().map(|c| (c.id, c.bytes.as_slice())))
            .expect("absorbs");
        assert_eq!(here.doc().get_heads(), there.doc().get_heads());
        assert_eq!(here.take_chunk(), None, "what the store holds is not stored again");
        put(&mut here, "d", 4);
        stored.keep(here.take_chunk());
        let compaction = here.take_compaction().expect("an Automerge document snapshots");
        assert!(compaction.is_none(), "one chunk after the snapshot: not due");
        let rebuilt = stored.rebuild(policy).expect("rebuilds");
        assert_eq!(
            crate::json::to_json(rebuilt.doc()),
            serde_json::json!({ "a": 1, "b": 2, "c": 3, "d": 4 })
        );
    }

    #[test]
    fn a_lost_chunk_is_carried_by_the_next_one() {
        let mut history = History::new(CompactionPolicy::default());
        let mut stored = Stored::default();
        put(&mut history, "a", 1);
        stored.keep(history.take_chunk());
        put(&mut history, "b", 2);
        let lost = history.take_chunk().expect("a chunk");
        history.lost(&lost.id);
        put(&mut history, "c", 3);
        stored.keep(history.take_chunk());
        let rebuilt = stored.rebuild(CompactionPolicy::default()).expect("nothing missing");
        assert_eq!(rebuilt.doc().get_heads(), history.doc().get_heads());
    }

    #[test]
    fn a_missing_chunk_is_found_at_rebuild() {
        let mut history = History::new(CompactionPolicy::default());
        let mut stored = Stored::default();
        for i in 0..3 {
            put(&mut history, "n", i);
            stored.keep(history.take_chunk());
        }
        stored.chunks.remove(1);
        let err = stored.rebuild(CompactionPolicy::default()).expect_err("a change is missing");
        assert!(matches!(err, LoadError::Incomplete(1)), "{err}");
    }

    #[test]
    fn chunks_in_any_order_rebuild_concurrent_edits() {
        let mut phone = Automerge::new();
        let mut chunks = vec![phone.save()];
        let mut laptop = phone.fork();
        for i in 0..5i64 {
            for (doc, key) in [(&mut phone, "phone"), (&mut laptop, "laptop")] {
                let before = doc.get_heads();
                doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, key, i))
                    .expect("put");
                chunks.push(doc.save_after(&before));
            }
        }
        phone.merge(&mut laptop).expect("merges");
        chunks.reverse();
        let loaded = rebuild(None, chunks.iter().map(Vec::as_slice)).expect("loads");
        assert_eq!(loaded.get_heads(), phone.get_heads());
        assert_eq!(crate::json::to_json(&loaded), crate::json::to_json(&phone));
    }

    #[test]
    fn policy_triggers_on_count_or_bytes() {
        let p = CompactionPolicy { max_chunks: 3, max_chunk_bytes: 100 };
        assert!(!p.should_compact(2, 99, 0));
        assert!(p.should_compact(3, 0, 0));
        assert!(p.should_compact(0, 100, 0));
        // A document of a million operations waits for a chunk per 64 of them, whatever the
        // count; its bytes still count as they are.
        assert!(!p.should_compact(15_624, 99, 1_000_000));
        assert!(p.should_compact(15_625, 99, 1_000_000));
        assert!(p.should_compact(3, 100, 1_000_000));
    }
}
