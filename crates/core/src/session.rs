//! One peer's side of the standard Automerge sync protocol for one document.
//!
//! A [`PeerSession`] wraps `automerge::sync::State` and adds what a server needs on top of it:
//! the message is fully decoded before anything is applied, a failed message resets the session
//! so the next round starts clean, and the session can be persisted between connections so that a
//! reconnect costs about the missing changes rather than a Bloom filter over the whole history.
//! It syncs any [`Replica`]: an Automerge document, or a document's change graph
//! ([`crate::graph::ChangeGraph`]), which answers alike without applying anything.

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};

use crate::graph::ChangeGraph;

/// What a [`PeerSession`] syncs: one replica of a document's history.
pub trait Replica {
    /// The heads, sorted.
    fn heads(&self) -> Vec<ChangeHash>;
    /// Whether the change is held (not merely waiting for its dependencies).
    fn has_change(&self, hash: &ChangeHash) -> bool;
    /// Whether no received change waits for a missing dependency.
    fn nothing_waits(&self) -> bool;
    /// `SyncDoc::generate_sync_message`.
    fn generate_message(&self, state: &mut sync::State) -> Option<sync::Message>;
    /// `SyncDoc::receive_sync_message`; on an error the replica is unchanged.
    fn receive_message(
        &mut self,
        state: &mut sync::State,
        message: sync::Message,
    ) -> Result<(), SyncError>;
}

impl Replica for Automerge {
    fn heads(&self) -> Vec<ChangeHash> {
        self.get_heads()
    }

    fn has_change(&self, hash: &ChangeHash) -> bool {
        self.get_change_by_hash(hash).is_some()
    }

    fn nothing_waits(&self) -> bool {
        self.get_missing_deps(&[]).is_empty()
    }

    fn generate_message(&self, state: &mut sync::State) -> Option<sync::Message> {
        self.generate_sync_message(state)
    }

    fn receive_message(
        &mut self,
        state: &mut sync::State,
        message: sync::Message,
    ) -> Result<(), SyncError> {
        self.receive_sync_message(state, message).map_err(SyncError::Rejected)
    }
}

impl Replica for ChangeGraph {
    fn heads(&self) -> Vec<ChangeHash> {
        ChangeGraph::heads(self)
    }

    fn has_change(&self, hash: &ChangeHash) -> bool {
        self.has(hash)
    }

    fn nothing_waits(&self) -> bool {
        self.settled()
    }

    fn generate_message(&self, state: &mut sync::State) -> Option<sync::Message> {
        self.generate_sync_message(state)
    }

    fn receive_message(
        &mut self,
        state: &mut sync::State,
        message: sync::Message,
    ) -> Result<(), SyncError> {
        self.receive_sync_message(state, message).map(drop).map_err(SyncError::Refused)
    }
}

/// Why a sync message was refused. The document is unchanged in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The bytes are not an Automerge sync message.
    #[error("malformed sync message")]
    Malformed,
    /// The message decoded but its changes could not be applied (tampered or invalid changes).
    #[error("sync message rejected: {0}")]
    Rejected(#[source] automerge::AutomergeError),
    /// The message decoded but a change graph refused it (a change that does not parse or
    /// breaks its actor's sequence, or a version-2 message).
    #[error("sync message refused: {0}")]
    Refused(#[source] crate::graph::GraphError),
    /// A persisted session could not be decoded.
    #[error("unreadable sync state")]
    BadState,
}

/// What receiving a message did to the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The document's heads changed: new changes were applied.
    pub changed: bool,
}

/// One peer's sync state for one document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSession {
    state: sync::State,
    /// The heads our last message on this connection carried, if we sent one.
    told: Option<Vec<ChangeHash>>,
    /// The peer's latest message named exactly our heads and needed nothing (see
    /// [`PeerSession::reply`]).
    acked: bool,
}

impl PeerSession {
    /// A session with a peer we know nothing about.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores a session saved with [`PeerSession::persist`].
    pub fn restore(bytes: &[u8]) -> Result<Self, SyncError> {
        let state = sync::State::decode(bytes).map_err(|_| SyncError::BadState)?;
        Ok(Self { state, ..Self::default() })
    }

    /// Restores a saved session for `doc`, or starts a new one when it does not decode or names
    /// heads `doc` lacks (the document was reloaded from storage since it was saved).
    pub fn restore_for(bytes: &[u8], doc: &impl Replica) -> Self {
        match Self::restore(bytes) {
            Ok(session) if session.state.shared_heads.iter().all(|h| doc.has_change(h)) => session,
            _ => Self::new(),
        }
    }

    /// The heads both sides are known to share.
    pub fn shared_heads(&self) -> &[automerge::ChangeHash] {
        &self.state.shared_heads
    }

    /// The part of the session worth keeping between connections (the heads both sides share).
    pub fn persist(&self) -> Vec<u8> {
        self.state.encode()
    }

    /// Forgets everything about the peer, shared heads included: the next round starts from
    /// scratch.
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// Starts over on a new connection: keeps the heads both sides are known to share (what
    /// [`PeerSession::persist`] keeps) and forgets everything about the old connection, such
    /// as a message still in flight on it.
    pub fn reconnect(&mut self) {
        self.state = sync::State::decode(&self.state.encode()).unwrap_or_default();
        self.told = None;
        self.acked = false;
    }

    /// Decodes and applies one sync message from the peer.
    ///
    /// On error the session is reset and the document is left as it was.
    pub fn receive(
        &mut self,
        doc: &mut impl Replica,
        message: &[u8],
    ) -> Result<Received, SyncError> {
        let Ok(message) = sync::Message::decode(message) else {
            self.reset();
            return Err(SyncError::Malformed);
        };
        if !message.have.iter().all(|have| bloom_is_sane(&have.bloom)) {
            self.reset();
            return Err(SyncError::Malformed);
        }
        let before = doc.heads();
        self.acked = false;
        if in_step(&message, &before) {
            self.acked = message.need.is_empty();
            self.receive_in_step(message);
            return Ok(Received { changed: false });
        }
        if let Err(err) = doc.receive_message(&mut self.state, message) {
            self.reset();
            return Err(err);
        }
        // Automerge never sends a change twice in one session. A change the peer now says it
        // needs was lost on its way or dropped on the other side (a queued change forgotten, a
        // document reloaded): forget that it was sent, so the next message carries it again.
        if let Some(need) = &self.state.their_need {
            for hash in need {
                self.state.sent_hashes.remove(hash);
            }
        }
        Ok(Received { changed: doc.heads() != before })
    }

    /// Receives a message for which [`in_step`] holds, with the same effect on the session as
    /// `receive_sync_message` in automerge 0.12 (the test `in_step_matches_automerge` compares
    /// the two). Automerge trims the changes sent this session to those the peer's heads do not
    /// cover by walking every ancestor of those heads: here that is the whole change graph, for
    /// every acknowledgement, to conclude that all of them are covered.
    fn receive_in_step(&mut self, message: sync::Message) {
        use sync::{Capability, MessageFlags};
        let state = &mut self.state;
        state.in_flight = false;
        if let Some(flags) = message.flags {
            let mut capabilities = vec![Capability::MessageV2];
            if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
                capabilities.push(Capability::SyncReset);
            }
            state.their_capabilities = Some(capabilities);
            state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
        }
        state.sent_hashes.clear();
        state.last_sent_heads.clone_from(&message.heads);
        state.shared_heads.clone_from(&message.heads);
        state.their_have = Some(message.have);
        state.their_heads = Some(message.heads);
        state.their_need = Some(message.need);
    }

    /// The next message for the peer, if there is anything to say.
    pub fn generate(&mut self, doc: &impl Replica) -> Option<Vec<u8>> {
        let message = doc.generate_message(&mut self.state)?;
        self.told = Some(message.heads.clone());
        Some(message.encode())
    }

    /// The first message of a reconnection, sent before the peer has said anything: what
    /// changed since the heads both sides shared when the session was saved. Automerge puts
    /// changes in a message only once it knows what the peer has and needs, and a restored
    /// session knows neither, so this presumes the peer holds exactly the shared heads and needs
    /// nothing else, as a device that kept its copy does. A wrong guess (the device lost some of
    /// it) costs one more exchange: its answer says what it has and needs. `None` when nothing
    /// is shared (a session never saved), when the peer has spoken already (the exchange is
    /// under way), or when nothing changed: the peer starts the exchange itself.
    pub fn push(&mut self, doc: &impl Replica) -> Option<Vec<u8>> {
        let shared = self.state.shared_heads.clone();
        if shared.is_empty() || self.state.their_heads.is_some() || shared == doc.heads() {
            return None;
        }
        self.state.their_heads = Some(shared.clone());
        self.state.their_need = Some(Vec::new());
        self.state.their_have =
            Some(vec![sync::Have { last_sync: shared, bloom: sync::BloomFilter::default() }]);
        self.generate(doc)
    }

    /// The answer to the peer's latest messages: what Automerge has to say, or else our heads,
    /// unless our last message on this connection already carried exactly these.
    ///
    /// Automerge stays silent once both sides advertise the same heads. A peer that sent its
    /// change and then another message before hearing back can make us record its heads as
    /// already answered, so it never learns that we hold its change: we answer with our heads
    /// whenever the peer has not been told them on this connection. A peer that has (its
    /// acknowledgement of the change we sent it, the common case) gets nothing back: it knows.
    pub fn reply(&mut self, doc: &impl Replica) -> Option<Vec<u8>> {
        // The common acknowledgement: the peer names the heads we told it and needs nothing.
        // Automerge would stay silent too (its Bloom filter covers every change: it holds them
        // all), after walking the change graph since the peer's last sync to find nothing; the
        // test `in_step_matches_automerge` compares the two after every delivery. (Of an empty
        // document Automerge would send the whole.)
        let heads = doc.heads();
        if self.acked && !heads.is_empty() && self.told.as_deref() == Some(heads.as_slice()) {
            return None;
        }
        self.reply_in_full(doc)
    }

    fn reply_in_full(&mut self, doc: &impl Replica) -> Option<Vec<u8>> {
        if let Some(message) = self.generate(doc) {
            return Some(message);
        }
        if self.told.as_deref() == Some(doc.heads().as_slice()) {
            return None;
        }
        Some(self.forced(doc))
    }

    fn forced(&mut self, doc: &impl Replica) -> Vec<u8> {
        self.state.last_sent_heads.clear();
        self.state.have_responded = false;
        self.generate(doc)
            .expect("Automerge always produces a message for a session that has not responded")
    }

    /// The heads the peer last told us it has, if it has said.
    pub fn their_heads(&self) -> Option<&[ChangeHash]> {
        self.state.their_heads.as_deref()
    }

    /// Whether `doc` holds every change the peer last said it has.
    pub fn has_everything_peer_has(&self, doc: &impl Replica) -> bool {
        let Some(theirs) = self.their_heads() else { return false };
        // Usually the peer's heads are our own; only otherwise ask the replica (Automerge
        // rebuilds each change it is asked about from its columns).
        let ours = doc.heads();
        theirs.iter().all(|h| ours.contains(h) || doc.has_change(h))
    }

    /// Whether this exchange has settled: each side holds every change the other advertised and
    /// no received change waits in `doc`'s queue for a missing dependency. Until then the
    /// in-memory document and session must be kept: the queue is not persisted, and a peer never
    /// sends the same change twice in one session.
    pub fn settled(&self, doc: &impl Replica) -> bool {
        self.has_everything_peer_has(doc) && self.peer_has_everything(doc) && doc.nothing_waits()
    }

    /// Whether the peer has said it holds every change of `doc`.
    pub fn peer_has_everything(&self, doc: &impl Replica) -> bool {
        let heads = doc.heads();
        self.state.shared_heads == heads
            || self.their_heads().is_some_and(|theirs| heads.iter().all(|h| theirs.contains(h)))
    }
}

/// Messages for several peers of one document in one pass, generated once per distinct session
/// state: peers in the same state (receivers that were in step before a change) get the same
/// message and end in the same state, so Automerge builds it, rebuilding each change from its
/// columns, only once.
#[derive(Debug, Default)]
pub struct SharedMessages {
    /// The state before, the state after, and the message.
    made: Vec<(PeerSession, PeerSession, Option<Vec<u8>>)>,
}

impl SharedMessages {
    /// What [`PeerSession::generate`] would give `session` for `doc`, which must not change
    /// between calls.
    pub fn generate(&mut self, session: &mut PeerSession, doc: &impl Replica) -> Option<Vec<u8>> {
        if let Some((_, after, message)) = self.made.iter().find(|(before, ..)| before == session) {
            session.clone_from(after);
            return message.clone();
        }
        let before = session.clone();
        let message = session.generate(doc);
        self.made.push((before, session.clone(), message.clone()));
        message
    }
}

/// Whether `message` carries no changes and names exactly `heads`, the document's own: the peer
/// holds everything we hold, the common acknowledgement.
fn in_step(message: &sync::Message, heads: &[ChangeHash]) -> bool {
    message.changes.is_empty() && message.heads == heads
}

/// Largest Bloom-filter parameters accepted from a peer. Automerge writes 10 bits per entry and
/// 7 probes; a filter with 0 bits per entry makes automerge 0.12 divide by zero when it next
/// generates a message (found by fuzzing, kept in `fuzz/regressions/sync_message/`), and a huge
/// probe count makes it allocate and loop for each change it tests.
const MAX_BLOOM_BITS_PER_ENTRY: u64 = 64;
const MAX_BLOOM_PROBES: u64 = 64;

/// Whether a peer's Bloom filter is one Automerge can use safely.
pub(crate) fn bloom_is_sane(bloom: &automerge::sync::BloomFilter) -> bool {
    let bytes = bloom.to_bytes();
    if bytes.is_empty() {
        return true; // The empty filter.
    }
    let mut input = bytes.as_slice();
    let mut next = || {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = input.split_first()?;
            input = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    };
    match (next(), next(), next()) {
        (Some(entries), Some(bits_per_entry), Some(probes)) => {
            entries == 0
                || ((1..=MAX_BLOOM_BITS_PER_ENTRY).contains(&bits_per_entry)
                    && (1..=MAX_BLOOM_PROBES).contains(&probes))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
