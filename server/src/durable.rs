//! Group commit: one writer thread applies writes in batches and flushes once per batch.
//!
//! A document actor hands its write to [`CommitHandle::commit`] and learns the result only after
//! the flush that made it durable. While one flush runs, the next writes queue up and share the
//! following flush, so the durability window is "what arrives during one flush", up to
//! `max_commit_batch` writes. Reads do not go through here; they run on the blocking pool.
//!
//! This thread is also the one sequencer of the change feed: after each flush it announces the
//! batch's writes on the hub in the order their feed positions were taken, so every stream sees
//! a customer's announcements in increasing order and only once they are durable.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use cubby_core::{CustomerId, DocId, DocMeta, Seq};
use cubby_proto::ApiError;
use cubby_store::{Chunk, Snapshot, Store, StoreError};
use tokio::sync::oneshot;

use crate::hub::{Announcement, Hub};

/// A write the committer applies.
#[derive(Debug)]
pub(crate) enum Write {
    /// Metadata and optionally a change chunk.
    Doc { customer: CustomerId, doc: DocId, meta: Vec<u8>, chunk: Option<(u64, Vec<u8>)> },
    /// Fold chunks into a snapshot.
    Compact { customer: CustomerId, doc: DocId, snapshot: Snapshot },
    /// Delete a document.
    Delete { customer: CustomerId, doc: DocId },
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Option<Seq>, ApiError>>,
}

/// Submits writes to the committer thread. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct CommitHandle {
    tx: std_mpsc::Sender<Job>,
}

/// The committer thread; joined at shutdown once every handle is gone.
#[derive(Debug)]
pub(crate) struct Committer {
    thread: JoinHandle<()>,
}

/// The one place storage errors become API errors. Details go to the log, not the client.
pub(crate) fn api_error(err: StoreError) -> ApiError {
    match err {
        StoreError::Full => {
            tracing::error!("storage is full; refusing writes");
            ApiError::ResourceExhausted("server storage is full".into())
        }
        StoreError::Corrupt(what) => {
            tracing::error!(what, "stored record failed authentication");
            ApiError::DataLoss("document")
        }
        StoreError::Erased => ApiError::AccountErased,
        other => {
            tracing::error!(err = %other, "storage failed");
            ApiError::Unavailable("storage unavailable".into())
        }
    }
}

impl Committer {
    /// Starts the writer thread over `store`.
    /// `degraded` is called once, at the first failed flush (the store then refuses writes
    /// until the server restarts).
    pub(crate) fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        max_batch: usize,
        degraded: Box<dyn FnOnce() + Send>,
    ) -> (Self, CommitHandle) {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("cubby-commit".into())
            .spawn(move || run(&*store, &hub, &rx, max_batch.max(1), degraded))
            .expect("spawning a thread fails only when the OS is out of resources");
        (Self { thread }, CommitHandle { tx })
    }

    /// Waits for the thread to finish (after every [`CommitHandle`] is dropped).
    pub(crate) fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("commit thread panicked");
        }
    }
}

fn apply(store: &dyn Store, write: &Write) -> Result<Option<Seq>, StoreError> {
    match write {
        Write::Doc { customer, doc, meta, chunk } => {
            let chunk = chunk.as_ref().map(|(index, bytes)| Chunk { index: *index, bytes });
            store.write_doc(customer, doc, meta, chunk).map(Some)
        }
        Write::Compact { customer, doc, snapshot } => {
            store.compact(customer, doc, snapshot).map(|()| None)
        }
        Write::Delete { customer, doc } => store.delete_doc(customer, doc).map(Some),
    }
}

/// What a durable write tells the customer's devices.
fn announcement(write: &Write, seq: Seq) -> Option<(CustomerId, Announcement)> {
    match write {
        Write::Doc { customer, doc, meta, .. } => {
            let info = DocMeta::decode(meta).ok().map(|m| cubby_proto::doc_info(doc, &m));
            Some((*customer, Announcement { doc: *doc, seq, info }))
        }
        Write::Delete { customer, doc } => {
            Some((*customer, Announcement { doc: *doc, seq, info: None }))
        }
        Write::Compact { .. } => None,
    }
}

fn run(
    store: &dyn Store,
    hub: &Hub,
    rx: &std_mpsc::Receiver<Job>,
    max_batch: usize,
    degraded: Box<dyn FnOnce() + Send>,
) {
    let mut degraded = Some(degraded);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results: Vec<_> = batch.iter().map(|job| apply(store, &job.write)).collect();
        let flushed = store.flush().map_err(|err| {
            tracing::error!(%err, "flush failed; writes in this batch are not acknowledged");
            if let Some(degraded) = degraded.take() {
                degraded();
            }
            api_error(err)
        });
        for (job, result) in batch.into_iter().zip(results) {
            let outcome = match (&flushed, result) {
                (Ok(()), Ok(seq)) => {
                    if let Some((customer, a)) = seq.and_then(|seq| announcement(&job.write, seq)) {
                        hub.publish(customer, a);
                    }
                    Ok(seq)
                }
                (_, Err(err)) => Err(api_error(err)),
                (Err(err), Ok(_)) => Err(err.clone()),
            };
            // The writer may have gone away (connection closed); the write stands regardless.
            let _ = job.reply.send(outcome);
        }
    }
}

impl CommitHandle {
    /// Applies `write` and returns once it is durable.
    pub(crate) async fn commit(&self, write: Write) -> Result<Option<Seq>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { write, reply })
            .map_err(|_| ApiError::Unavailable("server shutting down".into()))?;
        rx.await.map_err(|_| ApiError::Unavailable("server shutting down".into()))?
    }
}
