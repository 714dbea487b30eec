//! Documents on a device: the loaded state, its writer, and the app's handle to it.
//!
//! A loaded document is one [`DocShared`], the only copy: its state (the Automerge document,
//! its sync session with the server, its metadata) and its own writer, a task that does the
//! document's local store work one job at a time, in the order the jobs were queued
//! (`writer.rs`). The app's handles and the sync engine act on it only through its methods,
//! each under its lock (as samod's `DocHandle` shares its document actor's state); a method
//! that changes the state queues what must be stored before it lets go of the lock. So the store
//! sees the document's writes in the order they happened: a local change's unsynced mark lands
//! before the server's acknowledgement of that change can clear it, and a deletion lands after
//! every change made before it. A queued job holds the document, so it stays loaded until its
//! writes are done; a document is loaded by one loader at a time (`Inner::doc`).
//!
//! The lock is the samod pattern rather than a mailbox because reads are synchronous
//! ([`DocHandle::read`], [`DocHandle::to_json`]) and a change's closure may borrow from its
//! caller, so it runs on the caller's task.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use automerge::Automerge;
use automerge::transaction::Transaction;
use cubby_core::history::{CompactionPolicy, History};
use cubby_core::session::PeerSession;
use cubby_core::{DocId, DocMeta};
use cubby_store::{Space, Store, StoreError};
use tokio::sync::{broadcast, mpsc};

use crate::{ClientError, Inner, LOCAL};

mod handle;
mod writer;

pub use handle::DocHandle;
pub(crate) use writer::Queued;
use writer::{Job, LocalWrite};

/// The unsynced mark of a document created on this device that the server has not seen yet.
pub(crate) const MARK_NEW: &[u8] = b"new";
/// The unsynced mark of a document with local changes the server has not acknowledged.
pub(crate) const MARK_DIRTY: &[u8] = b"dirty";

/// Something happened to a document.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DocEvent {
    /// This device changed it.
    Local,
    /// Changes from another device or the business arrived.
    Remote,
    /// The server acknowledged every change this device made to it: they are durable there.
    Synced,
    /// It was deleted (on another device, or through the account or admin API): the local copy
    /// is gone, and a handle to it refuses changes. `discarded` says this device had changes
    /// to it the server never got: they lost to the deletion
    /// ([`crate::Client::take_discarded`] lists such documents until taken).
    Deleted {
        /// Unsynced local changes were discarded.
        discarded: bool,
    },
    /// Only on an event stream ([`DocHandle::events`], [`crate::Client::event_stream`]): the
    /// stream's reader fell so far behind that `count` events were dropped. Read the
    /// document again rather than rely on the events missed.
    Missed {
        /// How many were dropped.
        count: u64,
    },
}

/// A document as this device holds it.
struct LocalDoc {
    /// The document, and what the local store holds of it.
    history: History,
    meta: DocMeta,
    /// The sync protocol state with the server.
    session: PeerSession,
    /// Deleted on the server: changes are refused.
    deleted: bool,
    /// Created on this device and not yet seen by the server, or offered back to a server
    /// that does not have it (see `Space::HEAL`): sync messages carry its title and private
    /// flag, so that the server can make it.
    unconfirmed: bool,
}

/// A loaded document (see the module's docs).
pub(crate) struct DocShared {
    pub(crate) id: DocId,
    state: Mutex<LocalDoc>,
    writer: mpsc::UnboundedSender<Job>,
    events: broadcast::Sender<DocEvent>,
}

/// What a document made of a message from the server ([`DocShared::receive`]).
pub(crate) struct Received {
    /// Its local write, queued: resolves to whether the document's unsynced mark was cleared
    /// (the server holds every change of it).
    pub(crate) stored: Queued<bool>,
    /// The answer to send the server, if any.
    pub(crate) reply: Option<Vec<u8>>,
    /// The device holds every change the server has.
    pub(crate) holds: bool,
    /// The server holds every change the device has.
    pub(crate) server_has_all: bool,
    /// The message brought changes.
    pub(crate) changed: bool,
    /// The exchange has settled (nothing waits on changes still to come).
    pub(crate) settled: bool,
}

impl DocShared {
    /// The loaded document `state`, its writer started on `inner`.
    fn start(id: DocId, state: LocalDoc, inner: &Arc<Inner>) -> Arc<Self> {
        let (writer, jobs) = mpsc::unbounded_channel();
        tokio::spawn(writer::write_in_order(inner.clone(), jobs));
        Arc::new(Self { id, state: Mutex::new(state), writer, events: broadcast::channel(64).0 })
    }

    /// A document this device just created.
    pub(crate) fn new(id: DocId, title: &str, inner: &Arc<Inner>) -> Arc<Self> {
        let state = LocalDoc {
            history: History::new(CompactionPolicy::default()),
            meta: DocMeta::new(title),
            session: PeerSession::new(),
            unconfirmed: true,
            deleted: false,
        };
        Self::start(id, state, inner)
    }

    /// Loads a document from the local store and starts its writer.
    pub(crate) async fn open(inner: &Arc<Inner>, id: DocId) -> Result<Arc<Self>, ClientError> {
        let state = inner.blocking(move |store| Self::load(store, id)).await?;
        Ok(Self::start(id, state, inner))
    }

    /// Loads a document's state from the local store. Blocking.
    fn load(store: &dyn Store, id: DocId) -> Result<LocalDoc, ClientError> {
        let records = store.load(&LOCAL, &id)?.ok_or(ClientError::UnknownDocument(id))?;
        let meta = DocMeta::decode(&records.meta).map_err(|_| ClientError::Damaged(id))?;
        let history = History::rebuild(
            records.snapshot.as_ref().map(|s| (s.id, s.bytes.as_slice())),
            records.chunks.iter().map(|(id, b)| (*id, b.as_slice())),
            CompactionPolicy::default(),
        )
        .map_err(|_| ClientError::Damaged(id))?;
        // A session naming changes the store lost (written after them, kept by a crash that
        // tore them away) starts over rather than tell the server the device has them.
        let session = match store.get_record(&LOCAL, Space::SYNC_STATES, id.as_bytes())? {
            Some(bytes) => PeerSession::restore_for(&bytes, history.doc()),
            None => PeerSession::new(),
        };
        // A document to offer back (`Space::HEAL`) is made on the server only once the engine
        // knows it was not deleted there meanwhile: the engine sets `unconfirmed` then.
        let mark = store.get_record(&LOCAL, Space::UNSYNCED, id.as_bytes())?;
        let unconfirmed = mark.is_some_and(|v| v == MARK_NEW);
        Ok(LocalDoc { history, meta, session, unconfirmed, deleted: false })
    }

    fn lock(&self) -> MutexGuard<'_, LocalDoc> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn meta(&self) -> DocMeta {
        self.lock().meta.clone()
    }

    /// Reads the document.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Automerge) -> R) -> R {
        f(self.lock().history.doc())
    }

    /// Applies `f` as one Automerge transaction, and queues storing it with the document's
    /// unsynced mark, flushed (`None`: nothing changed). Queued before the lock is released: before
    /// anything the sync engine does once it sees this change (an acknowledgement clearing
    /// that mark).
    pub(crate) fn change<T, E>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<(T, Option<Queued<()>>), ClientError>
    where
        ClientError: From<E>,
    {
        let mut state = self.lock();
        if state.deleted {
            return Err(ClientError::Deleted(self.id));
        }
        let done = state.history.doc_mut().transact(f);
        let out = done.map_err(|failure| ClientError::from(failure.error))?.result;
        tracing::debug!(doc = %self.id.short(), heads = ?state.history.doc().get_heads(),
            "local change");
        let stored = state.take_write(false).map(|write| {
            self.queue_flushed(move |store, shared| store_change(store, shared, &write))
        });
        Ok((out, stored))
    }

    /// Takes what the customer controls in the server's metadata (the title and the private
    /// flag), and queues storing it, flushed.
    pub(crate) fn take_server_meta(self: &Arc<Self>, server: &DocMeta) -> Queued<()> {
        let mut state = self.lock();
        state.meta.title.clone_from(&server.title);
        state.meta.private = server.private;
        // Stores the metadata as it is when the job runs: a later change's write carries it too.
        self.queue_flushed(|store, shared| {
            Ok(store.write_doc_off_feed(&LOCAL, &shared.id, &shared.meta().encode(), None)?)
        })
    }

    /// Takes in a sync message from the server, and queues storing what it brought. `None`:
    /// refused (logged).
    pub(crate) fn receive(self: &Arc<Self>, message: &[u8]) -> Option<Received> {
        let id = self.id;
        let mut state = self.lock();
        let state = &mut *state;
        let shared_before = state.session.shared_heads().to_vec();
        if let Err(err) = state.session.receive(state.history.doc_mut(), message) {
            tracing::warn!(doc = %id.short(), %err, "server sync message refused");
            return None;
        }
        // The session is saved only when what it keeps (the shared heads) moved: an
        // acknowledgement of what the device already knew costs no local write or flush.
        let moved = state.session.shared_heads() != shared_before;
        let write = state.take_write(moved);
        let changed = write.as_ref().is_some_and(|w| w.chunk.is_some());
        let was_unconfirmed = std::mem::take(&mut state.unconfirmed);
        let doc = state.history.doc();
        let holds = state.session.has_everything_peer_has(doc);
        let server_has_all = state.session.peer_has_everything(doc);
        let reply = state.session.generate(doc);
        // Changes whose dependencies have not arrived wait in the document's queue, which is
        // not persisted, and the server will not send them twice on this connection: the
        // engine keeps the document loaded until the exchange has settled. A reply sent once it
        // has settled only acknowledges, and the server does not answer that.
        let settled = state.session.settled(doc);
        // Queued under the lock, so after the writes of every local change this message can
        // acknowledge (their unsynced marks among them).
        let stored = self.queue(move |store, shared| {
            if let Some(write) = &write {
                write.apply_unflushed(store, shared)?;
            }
            // Clear the unsynced mark only if the server still has everything: a local change
            // may have landed since.
            if shared.server_has_everything() {
                tracing::debug!(doc = %id.short(), "server holds everything: unsynced mark cleared");
                return Ok(remove_mark(store, id)?);
            }
            // The server has the document now: its next messages need not make it.
            let key = id.as_bytes();
            if was_unconfirmed
                && store.get_record(&LOCAL, Space::UNSYNCED, key)?.as_deref() == Some(MARK_NEW)
            {
                store.put_record(&LOCAL, Space::UNSYNCED, key, MARK_DIRTY)?;
            }
            Ok(false)
        });
        Some(Received { stored, reply, holds, server_has_all, changed, settled })
    }

    /// The next message to the server, if the sync protocol has one, with the metadata the
    /// server needs to make the document when it has not seen it: made here (and not yet
    /// seen), or `offer_back` (to a server that lost it).
    pub(crate) fn generate(&self, offer_back: bool) -> Option<(Vec<u8>, Option<DocMeta>)> {
        let mut state = self.lock();
        let state = &mut *state;
        let message = state.session.generate(state.history.doc());
        tracing::debug!(doc = %self.id.short(), ours = ?state.history.doc().get_heads(),
            theirs = ?state.session.their_heads(), said = message.is_some(), "generate");
        let create = state.unconfirmed || offer_back;
        Some((message?, create.then(|| state.meta.clone())))
    }

    /// Whether the server holds every change of the document, as far as this connection knows.
    pub(crate) fn server_has_everything(&self) -> bool {
        let state = self.lock();
        state.session.peer_has_everything(state.history.doc())
    }

    /// A new connection: the session starts over from what both sides are known to hold.
    pub(crate) fn reconnect(&self) {
        self.lock().session.reconnect();
    }

    /// The server refused a message: the session starts over from nothing shared.
    pub(crate) fn reset_session(&self) {
        self.lock().session.reset();
    }

    /// The server started a new epoch: the session is forgotten.
    pub(crate) fn forget_session(&self) {
        self.lock().session = PeerSession::new();
    }

    /// Deleted on the server: changes are refused from now on.
    pub(crate) fn mark_deleted(&self) {
        self.lock().deleted = true;
    }

    pub(crate) fn emit(&self, event: DocEvent) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }
}

/// Stores a local change of `shared`'s document (`write`) and marks the document unsynced, unless
/// the document was deleted from the store meanwhile. On the document's writer.
fn store_change(
    store: &dyn Store,
    shared: &DocShared,
    write: &LocalWrite,
) -> Result<(), ClientError> {
    let id = shared.id;
    // The engine deletes a document deleted on the server through its writer, after setting
    // `deleted`: a change lands before (and is reported discarded) or is refused, never
    // written back over the deletion.
    if store.doc_meta(&LOCAL, &id)?.is_none() {
        return Err(ClientError::Deleted(id));
    }
    let stored = store
        .get_record(&LOCAL, Space::UNSYNCED, id.as_bytes())
        .and_then(|mark| match mark {
            Some(_) => Ok(()),
            None => store.put_record(&LOCAL, Space::UNSYNCED, id.as_bytes(), MARK_DIRTY),
        })
        .and_then(|()| write.store(store, shared));
    Ok(stored.inspect_err(|_| write.failed(shared))?)
}

/// Removes a document's unsynced and heal marks: the server holds everything of it. Returns
/// whether there was one. Blocking.
pub(crate) fn remove_mark(store: &dyn Store, id: DocId) -> Result<bool, StoreError> {
    let mut marked = false;
    for space in [Space::UNSYNCED, Space::HEAL] {
        marked |= store.get_record(&LOCAL, space, id.as_bytes())?.is_some();
        store.remove_record(&LOCAL, space, id.as_bytes())?;
    }
    Ok(marked)
}

impl LocalDoc {
    /// The local write for the changes made since the last one (the next chunk, and a snapshot
    /// when the history is due for compaction), with `session` if given. `None` if nothing
    /// changed and there is no session to save.
    fn take_write(&mut self, session: bool) -> Option<LocalWrite> {
        let chunk = self.history.take_chunk();
        if let Some(chunk) = &chunk {
            self.meta.record_write(chunk.bytes.len() as u64);
        }
        // An Automerge document always makes its snapshot.
        let compaction = chunk.as_ref().and_then(|_| self.history.take_compaction().ok().flatten());
        if chunk.is_none() && !session {
            return None;
        }
        let session = session.then(|| self.session.persist());
        Some(LocalWrite { chunk, compaction, session })
    }
}

#[cfg(test)]
mod tests;
