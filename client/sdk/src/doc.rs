//! Documents on a device: the loaded state and the app's handle to it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use automerge::transaction::Transaction;
use automerge::{Automerge, AutomergeError, ChangeHash, ROOT};
use cubby_core::history::{Compaction, CompactionPolicy, History, Part};
use cubby_core::session::PeerSession;
use cubby_core::{DocId, DocMeta};
use cubby_store::{Chunk, Space, Store, StoreError};
use tokio::sync::broadcast;

use crate::{ClientError, Inner, LOCAL};

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
}

/// A document as this device holds it.
pub(crate) struct LocalDoc {
    /// The document, and what the local store holds of it.
    pub(crate) history: History,
    pub(crate) meta: DocMeta,
    /// The sync protocol state with the server.
    pub(crate) session: PeerSession,
    /// Deleted on the server: changes are refused.
    pub(crate) deleted: bool,
    /// Created on this device and not yet seen by the server, or offered back to a server
    /// that does not have it (see `Space::HEAL`): sync messages carry its title and private
    /// flag, so that the server can make it.
    pub(crate) unconfirmed: bool,
}

pub(crate) struct DocShared {
    pub(crate) id: DocId,
    state: Mutex<LocalDoc>,
    /// Taken around each write of this document to the local store (see [`DocShared::write_meta`]).
    store_turn: Mutex<()>,
    events: broadcast::Sender<DocEvent>,
}

/// A write for the local store: a new chunk and/or the persisted sync session. The metadata
/// stored with a chunk is the document's when the write runs, not when it was made.
pub(crate) struct LocalWrite {
    pub(crate) chunk: Option<Part>,
    /// Set when the chunk makes the history long enough to fold into a snapshot.
    pub(crate) compaction: Option<Compaction>,
    pub(crate) session: Option<Vec<u8>>,
}

impl LocalWrite {
    /// Applies the write without waiting for the disk: for changes the server sent, which it
    /// already holds durably. The store's next flush (the next local change, or its own timer)
    /// carries it; a crash before then loses only writes made after everything flushed, and
    /// the next sync brings those changes again. Blocking.
    pub(crate) fn apply_unflushed(
        &self,
        store: &dyn Store,
        shared: &DocShared,
    ) -> Result<(), StoreError> {
        let _turn = shared.store_turn();
        self.store(store, shared).inspect_err(|_| self.failed(shared))
    }

    /// The write did not (all) reach the store: the next one carries its changes, and its
    /// compaction is made again when due.
    pub(crate) fn failed(&self, shared: &DocShared) {
        let mut state = shared.lock();
        if let Some(chunk) = &self.chunk {
            state.history.lost(&chunk.id);
        }
        if self.compaction.is_some() {
            state.history.compaction_lost();
        }
    }

    /// The write reached the store: its compaction stands for the parts it replaced.
    pub(crate) fn stored(&self, shared: &DocShared) {
        if let Some(compaction) = &self.compaction {
            shared.lock().history.compacted(compaction);
        }
    }

    /// Stores the write; the caller holds `shared`'s store turn.
    fn store(&self, store: &dyn Store, shared: &DocShared) -> Result<(), StoreError> {
        let id = &shared.id;
        if let Some(Part { id: chunk, bytes }) = &self.chunk {
            let meta = shared.meta().encode();
            let chunk = Some(Chunk { id: *chunk, bytes });
            store.write_doc_off_feed(&LOCAL, id, &meta, chunk)?;
        }
        if let Some(Compaction { snapshot, replaces }) = &self.compaction {
            store.compact(&LOCAL, id, snapshot, replaces)?;
        }
        if let Some(session) = &self.session {
            store.put_record(&LOCAL, Space::SYNC_STATES, id.as_bytes(), session)?;
        }
        self.stored(shared);
        Ok(())
    }
}

impl DocShared {
    /// A document this device just created.
    pub(crate) fn new(id: DocId, title: &str) -> Self {
        let state = LocalDoc {
            history: History::new(CompactionPolicy::default()),
            meta: DocMeta::new(title),
            session: PeerSession::new(),
            unconfirmed: true,
            deleted: false,
        };
        Self::from_parts(id, state)
    }

    fn from_parts(id: DocId, state: LocalDoc) -> Self {
        Self {
            id,
            state: Mutex::new(state),
            store_turn: Mutex::new(()),
            events: broadcast::channel(64).0,
        }
    }

    /// Loads a document from the local store. Blocking.
    pub(crate) fn load(store: &dyn Store, id: DocId) -> Result<Self, ClientError> {
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
        let state = LocalDoc { history, meta, session, unconfirmed, deleted: false };
        Ok(Self::from_parts(id, state))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LocalDoc> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn meta(&self) -> DocMeta {
        self.lock().meta.clone()
    }

    /// Taken around each write of the document to the local store, and around its deletion.
    pub(crate) fn store_turn(&self) -> MutexGuard<'_, ()> {
        self.store_turn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what the customer controls in the server's metadata: the title and the private
    /// flag.
    pub(crate) fn take_server_meta(&self, server: &DocMeta) {
        let meta = &mut self.lock().meta;
        meta.title.clone_from(&server.title);
        meta.private = server.private;
    }

    /// Stores the document's metadata as it is now, and flushes. Blocking.
    ///
    /// Every write of this document to the store takes its turn and stores the metadata current
    /// at that moment, so a write made before the metadata changed cannot land after this one
    /// with the old copy.
    pub(crate) fn write_meta(&self, store: &dyn Store) -> Result<(), StoreError> {
        {
            let _turn = self.store_turn();
            store.write_doc_off_feed(&LOCAL, &self.id, &self.meta().encode(), None)?;
        }
        store.flush()
    }

    pub(crate) fn emit(&self, event: DocEvent) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }
}

impl LocalDoc {
    /// The local write for the changes made since the last one (the next chunk, and a snapshot
    /// when the history is due for compaction), with `session` if given. `None` if nothing
    /// changed and there is no session to save.
    pub(crate) fn take_write(&mut self, session: bool) -> Option<LocalWrite> {
        let chunk = self.history.take_chunk();
        if let Some(chunk) = &chunk {
            self.meta.record_write(chunk.bytes.len() as u64);
        }
        let compaction = chunk.as_ref().and_then(|_| self.history.take_compaction());
        if chunk.is_none() && !session {
            return None;
        }
        let session = session.then(|| self.session.persist());
        Some(LocalWrite { chunk, compaction, session })
    }
}

/// The app's handle to one document. Cheap to clone.
#[derive(Clone)]
pub struct DocHandle {
    shared: Arc<DocShared>,
    client: Arc<Inner>,
}

impl std::fmt::Debug for DocHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocHandle").field("id", &self.shared.id).finish_non_exhaustive()
    }
}

impl DocHandle {
    pub(crate) fn new(shared: Arc<DocShared>, client: Arc<Inner>) -> Self {
        Self { shared, client }
    }

    /// The document's id.
    pub fn id(&self) -> DocId {
        self.shared.id
    }

    /// The document's metadata.
    pub fn meta(&self) -> DocMeta {
        self.shared.meta()
    }

    /// Applies `f` as one Automerge transaction. Returns once the change is on this device's
    /// disk; it syncs in the background.
    pub async fn change<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, AutomergeError>,
    ) -> Result<T, ClientError> {
        let (out, write) = {
            let mut state = self.shared.lock();
            if state.deleted {
                return Err(ClientError::Deleted(self.shared.id));
            }
            let out = state.history.doc_mut().transact(f).map_err(|failure| failure.error)?.result;
            tracing::debug!(device = %self.client.device_id.short(), doc = %self.shared.id.short(),
                heads = ?state.history.doc().get_heads(), "local change");
            (out, state.take_write(false))
        };
        let Some(write) = write else { return Ok(out) };
        let id = self.shared.id;
        let shared = self.shared.clone();
        let wake = self.client.wake.clone();
        self.client
            .blocking(move |store| {
                store_change(store, &shared, &write, &wake).inspect_err(|err| {
                    if !matches!(err, ClientError::Deleted(_)) {
                        write.failed(&shared);
                    }
                })
            })
            .await?;
        self.client.wrote(id);
        self.shared.emit(DocEvent::Local);
        let _ = self.client.events.send((id, DocEvent::Local));
        Ok(out)
    }

    /// Sets a key of the root map to a JSON value (objects and arrays become maps and lists).
    pub async fn put(&self, key: &str, value: serde_json::Value) -> Result<(), ClientError> {
        let key = key.to_owned();
        self.change(move |tx| cubby_core::json::put_json(tx, &ROOT, &key, &value)).await
    }

    /// The document rendered as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        cubby_core::json::to_json(self.shared.lock().history.doc())
    }

    /// Reads the document.
    pub fn read<R>(&self, f: impl FnOnce(&Automerge) -> R) -> R {
        f(self.shared.lock().history.doc())
    }

    /// The document's current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.shared.lock().history.doc().get_heads()
    }

    /// Events for this document from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DocEvent> {
        self.shared.events.subscribe()
    }
}

/// Stores a local change of `shared`'s document (`write`) and flushes. Blocking.
fn store_change(
    store: &dyn Store,
    shared: &DocShared,
    write: &LocalWrite,
    wake: &tokio::sync::mpsc::UnboundedSender<DocId>,
) -> Result<(), ClientError> {
    let id = shared.id;
    // Mark the document unsynced before the sync engine can see the change, so the mark can
    // never land after the engine has cleared it...
    let marked = store.get_record(&LOCAL, Space::UNSYNCED, id.as_bytes())?.is_none();
    if marked {
        store.put_record(&LOCAL, Space::UNSYNCED, id.as_bytes(), MARK_DIRTY)?;
    }
    // ...then let the engine send it while this device's own flush runs: the server's copy is
    // durable on its own, and this call still returns only after the local flush.
    let _ = wake.send(id);
    // The engine deletes a document deleted on the server in its turn, after setting `deleted`:
    // a change lands before (and is reported discarded) or is refused, never written back over
    // the deletion.
    let turn = shared.store_turn();
    if shared.lock().deleted || store.doc_meta(&LOCAL, &id)?.is_none() {
        // Only the mark made here: one from earlier changes is the engine's to count as
        // discarded.
        if marked {
            store.remove_record(&LOCAL, Space::UNSYNCED, id.as_bytes())?;
        }
        return Err(ClientError::Deleted(id));
    }
    write.store(store, shared)?;
    drop(turn);
    Ok(store.flush()?)
}
