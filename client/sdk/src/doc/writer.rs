//! A document's writer: the one task that does its local store work, in the order it was
//! queued (see the module above), and the writes it does.

use std::sync::Arc;

use cubby_core::history::{Compaction, Part};
use cubby_store::{Chunk, Space, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use super::DocShared;
use crate::{ClientError, Inner, LOCAL};

/// Local store work for a document's writer. The next job starts once the [`Turn`] drops.
pub(super) type Job = Box<dyn FnOnce(&dyn Store, Turn) + Send>;

/// A job's turn on its document's writer: the next job starts when it drops, which may be
/// before the job ends (a flush need not hold up the next write).
pub(super) struct Turn {
    _over: oneshot::Sender<()>,
}

/// A job queued on a document's writer; [`Queued::done`] waits for its outcome.
#[must_use = "a queued job runs anyway; its outcome says whether it stored anything"]
pub(crate) struct Queued<T>(Result<oneshot::Receiver<Result<T, ClientError>>, ClientError>);

impl<T> Queued<T> {
    /// The job's outcome, once it has run.
    pub(crate) async fn done(self) -> Result<T, ClientError> {
        self.0?.await.map_err(|_| ClientError::Closed)?
    }
}

impl DocShared {
    /// Queues `job` on the document's writer, after every job queued before it. Queue it under
    /// the state lock when the order matters. The job holds the document: it stays loaded
    /// until the job is done.
    pub(crate) fn queue<T, F>(self: &Arc<Self>, job: F) -> Queued<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store, &DocShared) -> Result<T, ClientError> + Send + 'static,
    {
        self.queue_job(job, false)
    }

    /// Queues `job` as [`DocShared::queue`] does, then flushes the store out of turn (the next
    /// job need not wait for the disk); the outcome comes after the flush.
    pub(crate) fn queue_flushed<T, F>(self: &Arc<Self>, job: F) -> Queued<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store, &DocShared) -> Result<T, ClientError> + Send + 'static,
    {
        self.queue_job(job, true)
    }

    fn queue_job<T, F>(self: &Arc<Self>, job: F, flush: bool) -> Queued<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store, &DocShared) -> Result<T, ClientError> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let shared = self.clone();
        let queued = self.writer.send(Box::new(move |store: &dyn Store, turn: Turn| {
            let done = job(store, &shared);
            drop(turn);
            let done = match done {
                Ok(out) if flush => store.flush().map(|()| out).map_err(ClientError::from),
                other => other,
            };
            let _ = reply.send(done);
        }));
        Queued(queued.map(|()| outcome).map_err(|_| ClientError::Closed))
    }
}

/// Runs a document's jobs one at a time, in order, until the document is dropped: each on the
/// blocking pool (tracked, so `shutdown` waits for it), the next once its turn is over.
pub(super) async fn write_in_order(inner: Arc<Inner>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let (turn, over) = oneshot::channel();
        if inner.inline_storage {
            job(&*inner.store, Turn { _over: turn });
        } else {
            let store = inner.store.clone();
            inner.tasks.spawn_blocking(move || job(&*store, Turn { _over: turn }));
        }
        let _ = over.await; // Sent or dropped: either way the turn is over.
    }
}

/// A write for the local store: a new chunk and/or the persisted sync session. The metadata
/// stored with a chunk is the document's when the write runs, not when it was made.
pub(super) struct LocalWrite {
    pub(super) chunk: Option<Part>,
    /// Set when the chunk makes the history long enough to fold into a snapshot.
    pub(super) compaction: Option<Compaction>,
    pub(super) session: Option<Vec<u8>>,
}

impl LocalWrite {
    /// Applies the write without waiting for the disk: for changes the server sent, which it
    /// already holds durably. The store's next flush (the next local change, or its own timer)
    /// carries it; a crash before then loses only writes made after everything flushed, and
    /// the next sync brings those changes again. Blocking; on the document's writer.
    pub(super) fn apply_unflushed(
        &self,
        store: &dyn Store,
        shared: &DocShared,
    ) -> Result<(), StoreError> {
        self.store(store, shared).inspect_err(|_| self.failed(shared))
    }

    /// The write did not (all) reach the store: the next one carries its changes, and its
    /// compaction is made again when due.
    pub(super) fn failed(&self, shared: &DocShared) {
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
    pub(super) fn store(&self, store: &dyn Store, shared: &DocShared) -> Result<(), StoreError> {
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
