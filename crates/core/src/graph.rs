//! One document's history as its change graph, without the document: each change's hash,
//! dependencies, actor, sequence number and bytes. It answers the standard Automerge sync
//! protocol (heads, `need`, Bloom filters, the changes a peer lacks) the way
//! `automerge::sync::SyncDoc` does, with the same [`State`](automerge::sync::State) per peer, at a cost that grows with
//! the changes a message carries, not with the document's content: nothing is applied.
//!
//! Every change is checked as far as its structure before it is taken in: it parses and its
//! hash is the hash of its bytes (`Change::try_from`), its sequence number is its actor's next,
//! and its actor's previous change is among its ancestors. A change whose dependencies are not
//! known yet waits in a queue until they are, as Automerge's does.
//!
//! The graph sends version 1 of the sync messages only: it never sends the message flags, so
//! no peer takes it for one that reads a whole document in place of changes (version 2). It
//! reads a version-2 message that carries changes, and refuses one that carries a document.
//!
//! Knowing whether a change is an ancestor of some heads uses vector clocks (the highest
//! sequence number of each actor among the ancestors). An actor's changes form a chain, so
//! `(actor, seq)` is an ancestor of heads whose clock has `actor` at `seq` or above. A clock is
//! kept for every [`CLOCK_EVERY`]th change, and a walk back from some heads stops at them and at
//! changes the clock already covers.
//!
//! Here: the graph, taking changes in, and the clocks. `sync.rs` answers the sync protocol from
//! it; `objects.rs` checks what a change's operations name; `archive.rs` is where a graph made
//! from a document finds the bytes and objects it does not keep.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::{ActorId, Change, ChangeHash};

mod archive;
mod objects;
mod sync;

pub use archive::Archive;
pub use objects::Kind;
use objects::{Objects, Undo};
pub use sync::Snapshot;

/// How often a change keeps its clock: every this many changes.
const CLOCK_EVERY: usize = 16;

/// The highest sequence number of each actor (by index) covered; missing actors are 0.
type Clock = Vec<u64>;

/// Why a change, or a message, was not taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// The bytes are not a change, or its hash does not match them.
    #[error("a change does not parse: {0}")]
    Parse(String),
    /// The change's sequence number is not its actor's next, or its actor's previous change is
    /// not among its ancestors.
    #[error("a change's sequence number does not follow its actor's previous change")]
    Sequence,
    /// A Bloom filter whose parameters would make testing it panic or take unbounded time.
    #[error("a sync message's Bloom filter is malformed")]
    Malformed,
    /// A version-2 message with a whole document in place of changes, which the graph never
    /// asks for.
    #[error("a sync message carries a whole document; this peer reads changes only")]
    Version,
    /// An operation names what does not exist (Automerge would panic applying it).
    #[error("a change's operation is refused: {0}")]
    Operation(&'static str),
}

/// Whether a change's operations are checked, or only recorded (stored history, checked when
/// it was received).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Strict,
    Record,
}

#[derive(Clone)]
struct Node {
    hash: ChangeHash,
    deps: Box<[u32]>,
    actor: u32,
    seq: u64,
    /// `None`: the change's bytes are in the [`Archive`] (the document the graph was made from,
    /// or one that holds every change up to it: [`ChangeGraph::archive_until`]).
    bytes: Option<Box<[u8]>>,
}

/// A document's change graph. See the module's documentation.
#[derive(Clone, Default)]
pub struct ChangeGraph {
    /// Every change, in the order taken in: dependencies first.
    nodes: Vec<Node>,
    by_hash: HashMap<ChangeHash, u32>,
    actors: Vec<ActorId>,
    actor_index: HashMap<ActorId, u32>,
    /// Each actor's changes, by sequence number (`seq` at `seq - 1`).
    by_actor: Vec<Vec<u32>>,
    heads: BTreeSet<ChangeHash>,
    /// The clock of every [`CLOCK_EVERY`]th change.
    clocks: HashMap<u32, Clock>,
    /// What the operations of the changes it keeps made.
    objects: Objects,
    /// Changes waiting for their dependencies, with how many they still lack.
    queue: HashMap<ChangeHash, (Change, usize)>,
    /// The waiting changes, by each dependency they lack.
    waiting_on: HashMap<ChangeHash, Vec<ChangeHash>>,
}

impl std::fmt::Debug for ChangeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeGraph")
            .field("changes", &self.nodes.len())
            .field("heads", &self.heads.len())
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl ChangeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many changes it holds (not counting queued ones).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it holds no change.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The heads, sorted, as `Automerge::get_heads` gives them.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.heads.iter().copied().collect()
    }

    /// Whether the change is in the graph (not merely queued).
    pub fn has(&self, hash: &ChangeHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// The bytes of a change in the graph, when it keeps them (not those of a change in the
    /// document it was made from).
    pub fn bytes(&self, hash: &ChangeHash) -> Option<&[u8]> {
        self.by_hash.get(hash).and_then(|&i| self.nodes[i as usize].bytes.as_deref())
    }

    /// How many changes it keeps the bytes of, and how many bytes that is.
    pub fn kept_bytes(&self) -> (usize, usize) {
        let kept = self.nodes.iter().filter_map(|n| n.bytes.as_ref());
        kept.fold((0, 0), |(n, len), bytes| (n + 1, len + bytes.len()))
    }

    /// The graph of a whole document, keeping none of its changes' bytes: the document is
    /// then the [`Archive`] of every message or chunk that carries them. It reads the changes'
    /// metadata, not their operations.
    pub fn from_document(doc: &automerge::Automerge) -> Result<Self, GraphError> {
        let mut graph = Self::new();
        let mut waiting = Vec::new();
        for meta in doc.get_changes_meta(&[]) {
            let meta = (meta.hash, meta.deps, meta.actor.into_owned(), meta.seq);
            if meta.1.iter().all(|d| graph.has(d)) {
                graph.insert_meta(meta.0, &meta.1, &meta.2, meta.3, None)?;
            } else {
                waiting.push(meta);
            }
        }
        // Automerge lists its changes dependencies first; should it not, the rest go in as
        // their dependencies do.
        while !waiting.is_empty() {
            let before = waiting.len();
            let mut still = Vec::new();
            for meta in waiting {
                if meta.1.iter().all(|d| graph.has(d)) {
                    graph.insert_meta(meta.0, &meta.1, &meta.2, meta.3, None)?;
                } else {
                    still.push(meta);
                }
            }
            if still.len() == before {
                return Err(GraphError::Parse(
                    "a document's change misses its dependencies".into(),
                ));
            }
            waiting = still;
        }
        Ok(graph)
    }

    /// Keeps the bytes of no change older than `heads` (those are in the archive now).
    pub fn archive_until(&mut self, heads: &[ChangeHash]) {
        let clock = self.clock_at(heads);
        for node in &mut self.nodes {
            if covers(&clock, node) {
                node.bytes = None;
            }
        }
    }

    /// Every change's hash, in the order taken in (dependencies first).
    pub fn hashes(&self) -> impl Iterator<Item = ChangeHash> + '_ {
        self.nodes.iter().map(|n| n.hash)
    }

    /// Takes in changes as `Automerge::apply_changes` does: each one whose dependencies are
    /// known at once, the others once theirs are; a change already known is skipped. Returns
    /// the hashes taken in, in order. On an error, nothing is taken in.
    pub fn add(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        self.add_from(changes, &(), Check::Strict)
    }

    /// [`ChangeGraph::add`] for a graph made from a document, `archive`.
    pub fn add_checked(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        archive: &impl Archive,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        self.add_from(changes, archive, Check::Strict)
    }

    fn add_from(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        archive: &impl Archive,
        check: Check,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        let (len, heads) = (self.nodes.len(), self.heads.clone());
        let (queue, waiting_on) = (self.queue.clone(), self.waiting_on.clone());
        let mut undo = Vec::new();
        let added = self.add_all(changes, &mut Taking { archive, check, undo: &mut undo });
        if added.is_err() {
            self.objects.undo(undo);
            while self.nodes.len() > len {
                let node = self.nodes.pop().expect("longer than before");
                self.by_hash.remove(&node.hash);
                self.by_actor[node.actor as usize].pop();
                self.clocks.remove(&(self.nodes.len() as u32));
            }
            (self.heads, self.queue, self.waiting_on) = (heads, queue, waiting_on);
        }
        added
    }

    fn add_all(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        taking: &mut Taking<'_, impl Archive>,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        let mut added = Vec::new();
        for change in changes {
            let hash = change.hash();
            if self.has(&hash) || self.queue.contains_key(&hash) {
                continue;
            }
            let lacking: Vec<ChangeHash> =
                change.deps().iter().filter(|d| !self.has(d)).copied().collect();
            if lacking.is_empty() {
                self.insert(change, taking)?;
                added.push(hash);
                self.release(hash, &mut added, taking)?;
            } else {
                for dep in &lacking {
                    self.waiting_on.entry(*dep).or_default().push(hash);
                }
                self.queue.insert(hash, (change, lacking.len()));
            }
        }
        Ok(added)
    }

    /// Takes in the waiting changes that `hash`, just taken in, was the last lack of, and
    /// theirs in turn.
    fn release(
        &mut self,
        hash: ChangeHash,
        added: &mut Vec<ChangeHash>,
        taking: &mut Taking<'_, impl Archive>,
    ) -> Result<(), GraphError> {
        let mut taken = vec![hash];
        while let Some(hash) = taken.pop() {
            for waiting in self.waiting_on.remove(&hash).unwrap_or_default() {
                let Some((_, lacking)) = self.queue.get_mut(&waiting) else { continue };
                *lacking -= 1;
                if *lacking == 0 {
                    let (change, _) = self.queue.remove(&waiting).expect("just found");
                    self.insert(change, taking)?;
                    added.push(waiting);
                    taken.push(waiting);
                }
            }
        }
        Ok(())
    }

    /// Parses and takes in changes, each given as its bytes (a version-1 message's).
    pub fn add_bytes<'a>(
        &mut self,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        let changes = chunks.into_iter().map(parse).collect::<Result<Vec<_>, _>>()?;
        self.add(changes)
    }

    /// Takes in a stored chunk of history: changes one after another, as
    /// `Automerge::save_after` writes them (a whole document, `Automerge::save`, is refused).
    /// What their operations name was checked when they were received, and is not again.
    pub fn add_stored(&mut self, stored: &[u8]) -> Result<Vec<ChangeHash>, GraphError> {
        self.add_stored_from(stored, &())
    }

    /// [`ChangeGraph::add_stored`] for a graph made from a document, `archive`.
    pub fn add_stored_from(
        &mut self,
        stored: &[u8],
        archive: &impl Archive,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        let changes = split(stored)?.into_iter().map(parse).collect::<Result<Vec<_>, _>>()?;
        self.add_from(changes, archive, Check::Record)
    }

    /// Takes in changes from stored history (another writer's snapshot's) without checking
    /// their operations, as [`ChangeGraph::add_stored_from`].
    pub fn add_recorded(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        archive: &impl Archive,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        self.add_from(changes, archive, Check::Record)
    }

    /// The bytes of the changes not among `heads` or their ancestors, one after another, in
    /// the order taken in: what `Automerge::save_after(heads)` would store, in this graph's
    /// order. A graph made from a document takes the bytes it does not keep from `archive`;
    /// `None` when they are not there.
    pub fn save_after(&self, heads: &[ChangeHash], archive: &impl Archive) -> Option<Vec<u8>> {
        Some(self.bytes_of(&self.since(heads), archive)?.concat())
    }

    /// The bytes of these changes, from the graph or else `archive`.
    fn bytes_of(&self, changes: &[u32], archive: &impl Archive) -> Option<Vec<Vec<u8>>> {
        let archived: Vec<ChangeHash> = changes
            .iter()
            .map(|&i| &self.nodes[i as usize])
            .filter(|n| n.bytes.is_none())
            .map(|n| n.hash)
            .collect();
        let mut archived = archive.change_bytes(&archived)?.into_iter();
        changes
            .iter()
            .map(|&i| match &self.nodes[i as usize].bytes {
                Some(bytes) => Some(bytes.to_vec()),
                None => archived.next(),
            })
            .collect()
    }

    /// Whether no change waits for its dependencies.
    pub fn settled(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many changes are not among `heads` or their ancestors.
    pub fn count_after(&self, heads: &[ChangeHash]) -> usize {
        self.since(heads).len()
    }

    /// The changes that waiting changes lack and nothing here holds.
    pub fn missing(&self) -> Vec<ChangeHash> {
        self.missing_from(self.queue.values().flat_map(|(c, _)| c.deps().to_vec()))
    }

    fn insert(
        &mut self,
        change: Change,
        taking: &mut Taking<'_, impl Archive>,
    ) -> Result<(), GraphError> {
        let strict = taking.check == Check::Strict;
        let checked = self.objects.take_in(&change, taking.archive, taking.undo, strict);
        if strict {
            checked?;
        }
        let bytes = Some(change.raw_bytes().into());
        self.insert_meta(change.hash(), change.deps(), change.actor_id(), change.seq(), bytes)
    }

    /// Takes in a change whose dependencies are all known.
    fn insert_meta(
        &mut self,
        hash: ChangeHash,
        deps: &[ChangeHash],
        actor: &ActorId,
        seq: u64,
        bytes: Option<Box<[u8]>>,
    ) -> Result<(), GraphError> {
        let actor = match self.actor_index.get(actor) {
            Some(&a) => a,
            None => {
                let a = self.actors.len() as u32;
                self.actors.push(actor.clone());
                self.actor_index.insert(actor.clone(), a);
                self.by_actor.push(Vec::new());
                a
            }
        };
        if seq != self.by_actor[actor as usize].len() as u64 + 1 {
            return Err(GraphError::Sequence);
        }
        let deps: Box<[u32]> = deps.iter().map(|d| self.by_hash[d]).collect();
        let mut clock = self.clock_of(deps.iter().copied());
        if seq > 1 && clock.get(actor as usize).copied().unwrap_or(0) != seq - 1 {
            return Err(GraphError::Sequence);
        }
        let index = self.nodes.len() as u32;
        for &dep in &*deps {
            self.heads.remove(&self.nodes[dep as usize].hash);
        }
        self.heads.insert(hash);
        self.by_hash.insert(hash, index);
        self.by_actor[actor as usize].push(index);
        if (index as usize).is_multiple_of(CLOCK_EVERY) {
            bump(&mut clock, actor, seq);
            self.clocks.insert(index, clock);
        }
        self.nodes.push(Node { hash, deps, actor, seq, bytes });
        Ok(())
    }

    /// The clock of the changes at `start` (their ancestors included).
    fn clock_of(&self, start: impl Iterator<Item = u32>) -> Clock {
        // `whole` merges only kept clocks, each of which covers all its change's ancestors:
        // a change it covers is an ancestor of one of those, and so are its own ancestors, so
        // the walk stops there. (A change merely visited says nothing of its ancestors yet.)
        let (mut clock, mut whole) = (Clock::new(), Clock::new());
        let mut stack: Vec<u32> = start.collect();
        let mut seen = HashSet::new();
        while let Some(i) = stack.pop() {
            let node = &self.nodes[i as usize];
            if covers(&whole, node) || !seen.insert(i) {
                continue;
            }
            if let Some(kept) = self.clocks.get(&i) {
                merge(&mut whole, kept);
                continue;
            }
            bump(&mut clock, node.actor, node.seq);
            stack.extend(node.deps.iter().copied());
        }
        merge(&mut clock, &whole);
        clock
    }

    /// The clock of the known ones of `heads`.
    fn clock_at(&self, heads: &[ChangeHash]) -> Clock {
        self.clock_of(heads.iter().filter_map(|h| self.by_hash.get(h).copied()))
    }

    /// The changes that are not ancestors of `heads` (nor among them), in the order taken in.
    fn since(&self, heads: &[ChangeHash]) -> Vec<u32> {
        let clock = self.clock_at(heads);
        let mut out: Vec<u32> = self
            .by_actor
            .iter()
            .enumerate()
            .flat_map(|(actor, changes)| {
                let covered = clock.get(actor).copied().unwrap_or(0) as usize;
                changes.get(covered..).unwrap_or_default().iter().copied()
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Drops from `hashes` those that are ancestors of `heads` or among them.
    fn remove_ancestors(&self, hashes: &mut BTreeSet<ChangeHash>, heads: &[ChangeHash]) {
        let clock = self.clock_at(heads);
        hashes.retain(|h| match self.by_hash.get(h) {
            Some(&i) => !covers(&clock, &self.nodes[i as usize]),
            None => true,
        });
    }
}

/// How the changes of one [`ChangeGraph::add`] are taken in.
struct Taking<'a, A> {
    archive: &'a A,
    check: Check,
    /// What their operations recorded, to undo if one is refused.
    undo: &'a mut Vec<Undo>,
}

fn parse(bytes: &[u8]) -> Result<Change, GraphError> {
    Change::try_from(bytes).map_err(|e| GraphError::Parse(e.to_string()))
}

/// The first four bytes of every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Splits stored history into its change chunks. Each chunk is the magic bytes, a 4-byte
/// checksum, a type (0 a document, 1 a change, 2 a compressed change), its length (unsigned
/// LEB128) and that many bytes; the checksum and the rest are checked when each is parsed.
fn split(stored: &[u8]) -> Result<Vec<&[u8]>, GraphError> {
    let chunks = chunks(stored)?;
    if chunks.iter().any(|(document, _)| *document) {
        return Err(GraphError::Parse("stored history: a whole document, not changes".into()));
    }
    Ok(chunks.into_iter().map(|(_, chunk)| chunk).collect())
}

/// Splits stored history into its chunks, each with whether it is a whole document (as
/// [`split`], which refuses those).
pub(crate) fn chunks(mut stored: &[u8]) -> Result<Vec<(bool, &[u8])>, GraphError> {
    let bad = |why: &str| GraphError::Parse(format!("stored history: {why}"));
    let mut chunks = Vec::new();
    while !stored.is_empty() {
        if stored.get(..4) != Some(&MAGIC[..]) {
            return Err(bad("not an Automerge chunk"));
        }
        let document = match stored.get(8) {
            Some(1 | 2) => false,
            Some(0) => true,
            _ => return Err(bad("unknown chunk type")),
        };
        let (mut len, mut shift, mut at) = (0usize, 0u32, 9);
        loop {
            let byte = *stored.get(at).ok_or_else(|| bad("truncated"))?;
            at += 1;
            len |= usize::from(byte & 0x7f).checked_shl(shift).ok_or_else(|| bad("length"))?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 56 {
                return Err(bad("length"));
            }
        }
        let end = at.checked_add(len).filter(|&end| end <= stored.len());
        let end = end.ok_or_else(|| bad("truncated"))?;
        chunks.push((document, &stored[..end]));
        stored = &stored[end..];
    }
    Ok(chunks)
}

fn covers(clock: &Clock, node: &Node) -> bool {
    clock.get(node.actor as usize).copied().unwrap_or(0) >= node.seq
}

fn bump(clock: &mut Clock, actor: u32, seq: u64) {
    let actor = actor as usize;
    if clock.len() <= actor {
        clock.resize(actor + 1, 0);
    }
    clock[actor] = clock[actor].max(seq);
}

fn merge(clock: &mut Clock, other: &Clock) {
    if clock.len() < other.len() {
        clock.resize(other.len(), 0);
    }
    for (mine, theirs) in clock.iter_mut().zip(other) {
        *mine = (*mine).max(*theirs);
    }
}

#[cfg(test)]
pub(crate) mod crafted;
#[cfg(test)]
mod tests;
