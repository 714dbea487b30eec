//! Documents on a device: the loaded state, its writer, and the app's handle to it.
//!
//! A loaded document is one [`DocShared`]: its state (the Automerge document, its sync session
//! with the server, its metadata) behind a lock that the app's handles and the sync engine take
//! to read it, change it or receive a message, and its own writer, a task that does the
//! document's local store work one job at a time, in the order the jobs were queued. Whoever
//! changes the state queues what it must store before releasing the lock, so the store sees the
//! document's writes in the order they happened: a local change's unsynced mark lands before
//! the server's acknowledgement of that change can clear it, and a deletion lands after every
//! change made before it. A queued job holds the document, so it stays loaded (the one copy)
//! until its writes are done.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use automerge::transaction::Transaction;
use automerge::{Automerge, AutomergeError, ChangeHash, ROOT};
use cubby_core::history::{Compaction, CompactionPolicy, History, Part};
use cubby_core::session::PeerSession;
use cubby_core::{DocId, DocMeta};
use cubby_store::{Chunk, Space, Store, StoreError};
use tokio::sync::{broadcast, mpsc, oneshot};

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
    /// The document's writer (see the module's docs).
    writer: mpsc::UnboundedSender<Job>,
    events: broadcast::Sender<DocEvent>,
}

/// Local store work for a document's writer.
pub(crate) type Job = Box<dyn FnOnce(&dyn Store) + Send>;

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
    /// the next sync brings those changes again. Blocking; on the document's writer.
    pub(crate) fn apply_unflushed(
        &self,
        store: &dyn Store,
        shared: &DocShared,
    ) -> Result<(), StoreError> {
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
    fn stored(&self, shared: &DocShared) {
        if let Some(compaction) = &self.compaction {
            shared.lock().history.compacted(compaction);
        }
    }

    /// Stores the write; on the document's writer.
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
    /// The loaded document `state`, its writer started on `inner`.
    pub(crate) fn start(id: DocId, state: LocalDoc, inner: &Arc<Inner>) -> Arc<Self> {
        let (writer, jobs) = mpsc::unbounded_channel();
        tokio::spawn(write_in_order(inner.clone(), jobs));
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

    /// Loads a document's state from the local store. Blocking.
    pub(crate) fn load(store: &dyn Store, id: DocId) -> Result<LocalDoc, ClientError> {
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, LocalDoc> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn meta(&self) -> DocMeta {
        self.lock().meta.clone()
    }

    /// Queues `job` on the document's writer, after every job queued before it, and returns
    /// its outcome. Queue it while holding the state lock when the order matters. The job
    /// holds the document: it stays loaded until the job is done.
    pub(crate) fn queue<T, F>(
        self: &Arc<Self>,
        job: F,
    ) -> impl Future<Output = Result<T, ClientError>> + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store, &DocShared) -> Result<T, ClientError> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let shared = self.clone();
        let queued = self.writer.send(Box::new(move |store: &dyn Store| {
            let _ = reply.send(job(store, &shared));
        }));
        async move {
            queued.map_err(|_| ClientError::Closed)?;
            outcome.await.map_err(|_| ClientError::Closed)?
        }
    }

    /// Takes what the customer controls in the server's metadata (the title and the private
    /// flag), and queues storing it. Resolves once stored, not flushed.
    pub(crate) fn take_server_meta(
        self: &Arc<Self>,
        server: &DocMeta,
    ) -> impl Future<Output = Result<(), ClientError>> + use<> {
        let mut state = self.lock();
        state.meta.title.clone_from(&server.title);
        state.meta.private = server.private;
        // Stores the metadata as it is when the job runs: a later change's write carries it too.
        self.queue(|store, shared| {
            Ok(store.write_doc_off_feed(&LOCAL, &shared.id, &shared.meta().encode(), None)?)
        })
    }

    pub(crate) fn emit(&self, event: DocEvent) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }
}

/// A document's writer: runs its jobs one at a time, in order, until the document is dropped.
async fn write_in_order(inner: Arc<Inner>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let done = inner.blocking(move |store| {
            job(store);
            Ok::<_, ClientError>(())
        });
        let _ = done.await; // A job answers its caller itself.
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
        let id = self.shared.id;
        let (out, stored) = {
            let mut state = self.shared.lock();
            if state.deleted {
                return Err(ClientError::Deleted(id));
            }
            let out = state.history.doc_mut().transact(f).map_err(|failure| failure.error)?.result;
            tracing::debug!(device = %self.client.device_id.short(), doc = %id.short(),
                heads = ?state.history.doc().get_heads(), "local change");
            let Some(write) = state.take_write(false) else { return Ok(out) };
            // Queued before the lock is released: before anything the sync engine does after
            // it sees this change (an acknowledgement clearing the unsynced mark).
            (out, self.shared.queue(move |store, shared| store_change(store, shared, &write)))
        };
        // The engine may send the change while it is stored and flushed here: the server's copy
        // is durable on its own, and this call still returns only after the local flush.
        let _ = self.client.wake.send(id);
        stored.await?;
        self.client.blocking(|store| store.flush()).await?;
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
