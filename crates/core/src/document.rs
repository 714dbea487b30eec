//! The server's side of one document, with no I/O: the document as stored, the devices syncing
//! it, and the rules of a batch of their messages.
//!
//! The server's document actor is the executor: it feeds a batch of what arrived in
//! ([`Document::offer`], [`Document::join`], [`Document::apply`], ...), asks what
//! [`Document::answers`] and [`Document::push`] say, and has the store keep what
//! [`Document::persist`] gives it; the answers leave only once that write is durable (then
//! [`Document::persisted`]), since nothing advertises heads that are not durable. Which peer is
//! told what, who is created or made private, when a device's session is kept, and what a deletion
//! tells, is decided here, and tested here without a runtime.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::panic::AssertUnwindSafe;

use crate::history::{History, Part};
use crate::lazy::LazyDoc;
use crate::session::{PeerSession, SharedMessages, SyncError};
use crate::{DeviceId, DocMeta, Seq};

/// The document as stored: its history, metadata and feed position.
#[derive(Debug)]
pub struct Live {
    /// The document (its change graph, which every peer syncs with, and its content, applied
    /// when asked) and what storage holds of it.
    pub history: History<LazyDoc>,
    /// Its metadata.
    pub meta: DocMeta,
    /// Its feed position (0: stored without one, so no device heard of it).
    pub seq: Seq,
}

/// One device syncing the document.
#[derive(Debug)]
struct Peer {
    device: DeviceId,
    session: PeerSession,
}

/// What a device's offer of a document (the first message of an exchange, perhaps with
/// `create`) comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// The document exists; nothing to store for it.
    Exists,
    /// It did not, and `create` made it.
    Created,
    /// It exists, and `create` said it is private: privacy only ratchets up this way (a device
    /// offering it back after a restore knew it was private).
    MadePrivate,
    /// It does not exist, and nothing says to make it: the device is told `NOT_FOUND`.
    Unknown,
}

impl Offer {
    /// Whether the metadata must be stored even without new changes.
    pub fn touched(self) -> bool {
        matches!(self, Self::Created | Self::MadePrivate)
    }
}

/// Why a device's sync message was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// It does not decode.
    #[error("malformed sync message")]
    Malformed,
    /// Its changes were refused (the change graph's structural check).
    #[error("sync message rejected: {0}")]
    Rejected(SyncError),
    /// Taking it in panicked: the document may be half-changed, and must be loaded again from
    /// what is durable.
    #[error("automerge panicked on a sync message")]
    Panicked,
}

/// What one peer is sent once a batch is durable ([`Document::answers`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A sync message of the document at its feed position.
    Message(Vec<u8>),
    /// Nothing: its messages in this batch are done with.
    Nothing,
    /// Automerge panicked answering it: it is told so, and forgotten.
    Failed,
}

/// What the store is asked to keep of a batch.
#[derive(Debug)]
pub struct Persist {
    /// The changes made since the last one, if any.
    pub chunk: Option<Part>,
    /// The metadata to store with it (its size counts the chunk).
    pub meta: DocMeta,
    /// The metadata changed (created, made private or shared): devices syncing it live hear
    /// of it too.
    pub metadata: bool,
}

/// One document on the server and the devices syncing it. `P` names a device's stream.
#[derive(Debug)]
pub struct Document<P> {
    live: Option<Live>,
    peers: HashMap<P, Peer>,
    /// The document was created or its metadata changed in this batch.
    touched: bool,
}

impl<P: Copy + Eq + Hash> Document<P> {
    /// The document as loaded from the store (`None`: it does not exist).
    pub fn new(live: Option<Live>) -> Self {
        Self { live, peers: HashMap::new(), touched: false }
    }

    /// The stored document, if it exists.
    pub fn live(&self) -> Option<&Live> {
        self.live.as_ref()
    }

    /// The stored document, to change (a business edit, privacy): [`Document::touch`] when the
    /// metadata changed.
    pub fn live_mut(&mut self) -> Option<&mut Live> {
        self.live.as_mut()
    }

    /// The metadata must be stored with this batch.
    pub fn touch(&mut self) {
        self.touched = true;
    }

    /// Makes the document, empty, unless it exists. Returns whether it did.
    pub fn create(&mut self, meta: DocMeta, history: History<LazyDoc>) -> bool {
        if self.live.is_some() {
            return false;
        }
        self.live = Some(Live { history, meta, seq: Seq(0) });
        self.touched = true;
        true
    }

    /// A device's message is about to be applied: `create` (title, private) if it carries one.
    pub fn offer(
        &mut self,
        create: Option<(String, bool)>,
        history: impl FnOnce() -> History<LazyDoc>,
    ) -> Offer {
        let offer = match (&mut self.live, create) {
            (Some(live), Some((_, true))) if !live.meta.private => {
                live.meta.private = true;
                Offer::MadePrivate
            }
            (Some(_), _) => Offer::Exists,
            (None, Some((title, private))) => {
                let meta = DocMeta { private, ..DocMeta::new(title) };
                self.live = Some(Live { history: history(), meta, seq: Seq(0) });
                Offer::Created
            }
            (None, None) => Offer::Unknown,
        };
        self.touched |= offer.touched();
        offer
    }

    /// Whether `peer` syncs the document.
    pub fn has_peer(&self, peer: &P) -> bool {
        self.peers.contains_key(peer)
    }

    /// The session a device starts with: that of a stream of the same device still here (its
    /// end not yet noticed), else `stored` (kept from its last connection), else a fresh one.
    /// With either of the first two, a device that reconnects with new changes is not sent a
    /// Bloom filter over the whole history.
    pub fn session_for(&self, device: DeviceId, stored: Option<&[u8]>) -> PeerSession {
        let Some(live) = &self.live else { return PeerSession::new() };
        let doc = live.history.doc();
        if let Some(old) = self.peers.values().find(|p| p.device == device) {
            return PeerSession::restore_for(&old.session.persist(), doc);
        }
        stored.map_or_else(PeerSession::new, |bytes| PeerSession::restore_for(bytes, doc))
    }

    /// Whether a device would start from a stream of its own still here.
    pub fn lends_session(&self, device: DeviceId) -> bool {
        self.peers.values().any(|p| p.device == device)
    }

    /// `peer` (of `device`) syncs the document from now on, with `session`.
    pub fn join(&mut self, peer: P, device: DeviceId, session: PeerSession) {
        self.peers.entry(peer).or_insert(Peer { device, session });
    }

    /// `peer` left: its device and the session worth keeping for its next connection (none
    /// if the two never shared anything).
    pub fn leave(&mut self, peer: &P) -> Option<(DeviceId, Option<Vec<u8>>)> {
        let peer = self.peers.remove(peer)?;
        let kept = (!peer.session.shared_heads().is_empty()).then(|| peer.session.persist());
        Some((peer.device, kept))
    }

    /// `peer`'s frames could not be queued: its session starts over, and it is spoken to again
    /// once it reads.
    pub fn behind(&mut self, peer: &P) {
        if let Some(peer) = self.peers.get_mut(peer) {
            peer.session.reconnect();
        }
    }

    /// Applies `peer`'s sync message. A peer that did not join, or a document that does not
    /// exist, takes nothing.
    pub fn apply(&mut self, peer: &P, message: &[u8]) -> Result<(), Refusal> {
        let (Some(live), Some(peer)) = (&mut self.live, self.peers.get_mut(peer)) else {
            return Ok(());
        };
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
            peer.session.receive(live.history.doc_mut(), message)
        }));
        match applied {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(SyncError::Malformed)) => Err(Refusal::Malformed),
            Ok(Err(err)) => Err(Refusal::Rejected(err)),
            Err(_) => Err(Refusal::Panicked),
        }
    }

    /// Lends the document and `peer`'s session out, to apply a message elsewhere (a thread);
    /// [`Document::returned`] gives them back. Meanwhile the document is empty.
    pub fn lend(&mut self, peer: &P) -> Option<(LazyDoc, PeerSession)> {
        let (Some(live), Some(peer)) = (&mut self.live, self.peers.get_mut(peer)) else {
            return None;
        };
        let doc = std::mem::take(live.history.doc_mut());
        Some((doc, std::mem::take(&mut peer.session)))
    }

    /// The document and session lent out come back.
    pub fn returned(&mut self, peer: &P, doc: LazyDoc, session: PeerSession) {
        if let Some(live) = &mut self.live {
            *live.history.doc_mut() = doc;
        }
        if let Some(peer) = self.peers.get_mut(peer) {
            peer.session = session;
        }
    }

    /// What the store is asked to keep of this batch: its changes as one chunk, and the
    /// metadata when anything changed or was touched (or the document was stored without a
    /// feed position, so no device heard of it). `None`: nothing to store.
    pub fn persist(&mut self) -> Option<Persist> {
        let live = self.live.as_mut()?;
        let metadata = std::mem::take(&mut self.touched) || live.seq == Seq(0);
        let chunk = live.history.take_chunk();
        if chunk.is_none() && !metadata {
            return None;
        }
        let mut meta = live.meta.clone();
        meta.record_write(chunk.as_ref().map_or(0, |c| c.bytes.len() as u64));
        Some(Persist { chunk, meta, metadata })
    }

    /// What [`Document::persist`] gave is durable, at feed position `seq`.
    pub fn persisted(&mut self, meta: DocMeta, seq: Seq) {
        if let Some(live) = &mut self.live {
            live.meta = meta;
            live.seq = seq;
        }
    }

    /// What every peer is sent once the batch is durable (a failed write resets every peer:
    /// [`Document::reloaded`], [`Document::drop_peers`]). Peers in `spoke` sent a message
    /// in it and get an answer whenever they have not yet heard the document's current heads on
    /// this connection (their acknowledgement; `PeerSession::reply`): a receiver's
    /// acknowledgement of the change just sent to it is not answered. Unless the document's
    /// heads `moved`, a peer that did not speak is left out: its session changes only by its
    /// own messages, so whatever Automerge could say to it has been said already. With each
    /// answer, whether that peer now holds the durable document (its message named every head).
    pub fn answers(&mut self, spoke: &HashSet<P>, moved: bool) -> Vec<(P, Answer, bool)> {
        let Some(live) = &self.live else { return Vec::new() };
        let doc = live.history.doc();
        // Receivers that were in step share one message.
        let mut shared = SharedMessages::default();
        let mut answers = Vec::new();
        for (id, peer) in &mut self.peers {
            let spoken = spoke.contains(id);
            if !spoken && !moved {
                continue;
            }
            // A peer's session came from its messages: a panic in Automerge answering it (such
            // as the divide by zero a crafted Bloom filter once caused) is contained to it.
            let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if spoken {
                    peer.session.reply(doc)
                } else {
                    shared.generate(&mut peer.session, doc)
                }
            }));
            let holds = spoken && peer.session.peer_has_everything(doc);
            let answer = match made {
                Ok(Some(message)) => Answer::Message(message),
                Ok(None) => Answer::Nothing,
                Err(_) => Answer::Failed,
            };
            answers.push((*id, answer, holds));
        }
        for (id, answer, _) in &answers {
            if *answer == Answer::Failed {
                self.peers.remove(id);
            }
        }
        answers
    }

    /// For a reconnecting peer whose kept session says what it holds: what changed since,
    /// sent before it asks (`PeerSession::push`).
    pub fn push(&mut self, peer: &P) -> Option<Vec<u8>> {
        let (Some(live), Some(peer)) = (&self.live, self.peers.get_mut(peer)) else {
            return None;
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| peer.session.push(live.history.doc())))
            .ok()
            .flatten()
    }

    /// The document was loaded again from the store (after a failed write, or one half-applied):
    /// every peer's session starts over.
    pub fn reloaded(&mut self, live: Option<Live>) {
        self.live = live;
        self.touched = false;
        for peer in self.peers.values_mut() {
            peer.session.reset();
        }
    }

    /// The document was deleted (here, or on another node): the peers that were syncing it,
    /// each to be told, and forgotten.
    pub fn deleted(&mut self) -> Vec<P> {
        self.live = None;
        self.touched = false;
        self.peers.drain().map(|(id, _)| id).collect()
    }

    /// Every peer, forgotten (a write failed: each is told, and resends).
    pub fn drop_peers(&mut self) -> Vec<P> {
        self.peers.drain().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests;
