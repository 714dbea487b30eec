//! The sync protocol on a change graph: `SyncDoc::generate_sync_message` and
//! `receive_sync_message`, answered from the graph (see the parent module).

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::ChangeHash;
use automerge::sync::{BloomFilter, Capability, ChunkList, Have, Message, MessageFlags, State};

use super::{Archive, ChangeGraph, GraphError, covers, parse, split};

/// A saved whole document (`Automerge::save`) and its heads, which a graph may send a peer in
/// place of the changes it holds ([`ChangeGraph::generate_sync_message_from`]).
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    /// The document's heads when it was saved.
    pub heads: &'a [ChangeHash],
    /// The saved document.
    pub bytes: &'a [u8],
}

impl ChangeGraph {
    /// What this graph lacks to reach `start`: unknown hashes, following queued changes to
    /// their dependencies (as `Automerge::missing_deps_from`).
    pub(super) fn missing_from(&self, start: impl Iterator<Item = ChangeHash>) -> Vec<ChangeHash> {
        let mut missing = BTreeSet::new();
        let mut seen = HashSet::new();
        let mut stack: Vec<ChangeHash> = start.collect();
        while let Some(hash) = stack.pop() {
            if self.has(&hash) || !seen.insert(hash) {
                continue;
            }
            match self.queue.get(&hash) {
                Some((change, _)) => stack.extend(change.deps().iter().copied()),
                None => _ = missing.insert(hash),
            }
        }
        missing.into_iter().collect()
    }

    fn bloom_since(&self, last_sync: Vec<ChangeHash>) -> Have {
        let hashes: Vec<ChangeHash> =
            self.since(&last_sync).into_iter().map(|i| self.nodes[i as usize].hash).collect();
        Have { last_sync, bloom: BloomFilter::from_hashes(hashes.iter()) }
    }

    /// The changes a peer that has `have` and asks for `need` lacks, in the order to send
    /// them (as `Automerge`'s sync does).
    fn to_send(&self, have: &[Have], need: &[ChangeHash]) -> Vec<u32> {
        let need: Vec<u32> = need.iter().filter_map(|h| self.by_hash.get(h).copied()).collect();
        if have.is_empty() {
            return need;
        }
        let last_sync: Vec<ChangeHash> = have
            .iter()
            .flat_map(|h| h.last_sync.iter().copied())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let candidates = self.since(&last_sync);
        let mut dependents: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut send = HashSet::new();
        for &i in &candidates {
            let node = &self.nodes[i as usize];
            for &dep in &*node.deps {
                dependents.entry(dep).or_default().push(i);
            }
            if have.iter().all(|h| !h.bloom.contains_hash(&node.hash)) {
                send.insert(i);
            }
        }
        // A change the filter wrongly said they have is found through what depends on it.
        let mut stack: Vec<u32> = send.iter().copied().collect();
        while let Some(i) = stack.pop() {
            for &dependent in dependents.get(&i).into_iter().flatten() {
                if send.insert(dependent) {
                    stack.push(dependent);
                }
            }
        }
        let mut out: Vec<u32> = need.into_iter().filter(|i| !send.contains(i)).collect();
        out.extend(candidates.into_iter().filter(|i| send.contains(i)));
        out
    }

    /// The next message to the peer whose state is `state`, or `None` when there is nothing to
    /// say: `SyncDoc::generate_sync_message`, in version 1.
    pub fn generate_sync_message(&self, state: &mut State) -> Option<Message> {
        self.generate_sync_message_from(state, &(), None)
    }

    /// [`ChangeGraph::generate_sync_message`] for a graph made from a document, `archive`,
    /// which holds the changes' bytes the graph does not keep. Should a change to send be in
    /// neither, nothing is said (and `state` is unchanged).
    ///
    /// With a `snapshot` of the document (a saved whole document and its heads), a peer that
    /// reads version 2 and has nothing, or lacks a third of the changes or more, gets the
    /// snapshot in place of the changes it holds, in a version-2 message, as Automerge sends
    /// its whole document: far fewer bytes than the changes one by one.
    pub fn generate_sync_message_from(
        &self,
        state: &mut State,
        archive: &impl Archive,
        snapshot: Option<Snapshot<'_>>,
    ) -> Option<Message> {
        let our_heads = self.heads();
        let our_need = if state.read_only {
            Vec::new()
        } else {
            self.missing_from(state.their_heads.iter().flatten().copied())
        };
        let their_heads: HashSet<&ChangeHash> = state.their_heads.iter().flatten().collect();
        let our_have = if our_need.iter().all(|h| their_heads.contains(h)) {
            vec![self.bloom_since(state.shared_heads.clone())]
        } else {
            Vec::new()
        };
        if let Some(first) = state.their_have.as_ref().and_then(|have| have.first())
            && !first.last_sync.iter().all(|h| self.has(h))
        {
            // They synced with a version of the document this one does not know: start over.
            return Some(Message {
                heads: our_heads,
                need: Vec::new(),
                have: vec![Have::default()],
                changes: ChunkList::empty(),
                flags: None,
                version: automerge::sync::MessageVersion::V1,
            });
        }
        let sending: Vec<u32> = match (&state.their_have, &state.their_need) {
            (Some(have), Some(need)) if !state.peer_read_only => self
                .to_send(have, need)
                .into_iter()
                .filter(|&i| !state.sent_hashes.contains(&self.nodes[i as usize].hash))
                .collect(),
            _ => Vec::new(),
        };
        let heads_unchanged = state.last_sent_heads == our_heads;
        let heads_equal = state.their_heads.as_ref() == Some(&our_heads);
        if heads_unchanged && state.have_responded {
            if (heads_equal || state.read_only) && sending.is_empty() {
                return None;
            }
            if state.in_flight {
                return None;
            }
        }
        let reads_documents = state
            .their_capabilities
            .as_ref()
            .is_some_and(|caps| caps.contains(&Capability::MessageV2));
        let lacks_much = state.their_heads.as_ref().is_some_and(Vec::is_empty)
            || sending.len() * 3 >= self.nodes.len();
        let (changes, version) = match snapshot {
            Some(snapshot) if reads_documents && lacks_much && !sending.is_empty() => {
                let clock = self.clock_at(snapshot.heads);
                let rest: Vec<u32> = sending
                    .iter()
                    .copied()
                    .filter(|&i| !covers(&clock, &self.nodes[i as usize]))
                    .collect();
                let mut changes = vec![snapshot.bytes.to_vec()];
                changes.extend(self.bytes_of(&rest, archive)?);
                (changes, automerge::sync::MessageVersion::V2)
            }
            _ => (self.bytes_of(&sending, archive)?, automerge::sync::MessageVersion::V1),
        };
        state.have_responded = true;
        state.last_sent_heads.clone_from(&our_heads);
        state.sent_hashes.extend(sending.iter().map(|&i| self.nodes[i as usize].hash));
        let heads = if std::mem::take(&mut state.needs_reset) {
            // A peer that learns of no reset flag from us is told we lost everything.
            Vec::new()
        } else {
            our_heads
        };
        state.in_flight = true;
        Some(Message {
            heads,
            need: our_need,
            have: our_have,
            changes: ChunkList::from(changes),
            flags: None,
            version,
        })
    }

    /// Takes in a message from the peer whose state is `state`:
    /// `SyncDoc::receive_sync_message`, without applying anything. Returns the changes taken
    /// in. A message with a change that does not parse or is refused takes in nothing and
    /// leaves `state` as it was: start the session over.
    pub fn receive_sync_message(
        &mut self,
        state: &mut State,
        message: Message,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        self.receive_sync_message_from(state, message, &())
    }

    /// [`ChangeGraph::receive_sync_message`] for a graph made from a document, `archive`.
    pub fn receive_sync_message_from(
        &mut self,
        state: &mut State,
        message: Message,
        archive: &impl Archive,
    ) -> Result<Vec<ChangeHash>, GraphError> {
        let Message { heads, changes, need, have, flags, version } = message;
        if !have.iter().all(|have| crate::session::bloom_is_sane(&have.bloom)) {
            return Err(GraphError::Malformed);
        }
        let parsed = if changes.is_empty() || state.read_only {
            Vec::new()
        } else if version == automerge::sync::MessageVersion::V1 {
            changes.iter().map(parse).collect::<Result<Vec<_>, _>>()?
        } else {
            // Version 2 carries changes one after another, or a whole document.
            let mut parsed = Vec::new();
            for entry in changes.iter() {
                let chunks = split(entry).map_err(|_| GraphError::Version)?;
                for chunk in chunks {
                    parsed.push(parse(chunk)?);
                }
            }
            parsed
        };
        let before = self.heads();
        let loaded = !parsed.is_empty();
        let added = if loaded { self.add_checked(parsed, archive)? } else { Vec::new() };
        state.in_flight = false;
        if let Some(flags) = flags {
            let mut caps = vec![Capability::MessageV2];
            if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
                caps.push(Capability::SyncReset);
            }
            state.their_capabilities = Some(caps);
            if flags.contains(MessageFlags::SYNC_RESET) {
                state.sent_hashes.clear();
            }
            state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
        }
        if loaded {
            let after: HashSet<ChangeHash> = self.heads.iter().copied().collect();
            let mut advanced: BTreeSet<ChangeHash> =
                after.iter().filter(|h| !before.contains(h)).copied().collect();
            advanced.extend(state.shared_heads.iter().filter(|h| after.contains(h)).copied());
            state.shared_heads = advanced.into_iter().collect();
        }
        self.remove_ancestors(&mut state.sent_hashes, &heads);
        if changes.is_empty() && heads == before {
            state.last_sent_heads.clone_from(&heads);
        }
        let known: Vec<ChangeHash> = heads.iter().filter(|h| self.has(h)).copied().collect();
        if known.len() == heads.len() {
            state.shared_heads.clone_from(&heads);
            if heads.is_empty() {
                // The peer lost everything: start over.
                state.last_sent_heads = Vec::new();
                state.sent_hashes = BTreeSet::new();
            }
        } else {
            let mut shared: BTreeSet<ChangeHash> = state.shared_heads.iter().copied().collect();
            shared.extend(known);
            state.shared_heads = shared.into_iter().collect();
        }
        state.their_have = Some(have);
        state.their_heads = Some(heads);
        state.their_need = Some(need);
        Ok(added)
    }
}
