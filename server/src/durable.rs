//! Group commit: one writer (a thread; a task under simulation) applies writes in batches and
//! flushes once per batch.
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

use cubby_core::{CustomerId, DocId, DocMeta, Seq};
use cubby_proto::ApiError;
use cubby_store::{Chunk, Snapshot, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::StorageWork;
use crate::hub::{Announcement, Hub};

/// A write the committer applies.
#[derive(Debug)]
pub(crate) enum Write {
    /// Metadata and optionally a change chunk.
    Doc {
        customer: CustomerId,
        doc: DocId,
        meta: Vec<u8>,
        chunk: Option<(u64, Vec<u8>)>,
        /// The document was created or its metadata changed (see [`Announcement::metadata`]).
        metadata: bool,
    },
    /// Fold chunks into a snapshot, then store `meta` (the document's size recounted as the
    /// snapshot's) if given: off the feed, as nothing changed that devices need to hear of.
    Compact { customer: CustomerId, doc: DocId, snapshot: Snapshot, meta: Option<Vec<u8>> },
    /// Delete a document.
    Delete { customer: CustomerId, doc: DocId },
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Option<Seq>, ApiError>>,
}

/// Submits writes to the committer. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct CommitHandle {
    tx: mpsc::UnboundedSender<Job>,
}

/// The committer: its own thread on a real server, a task under simulation
/// ([`StorageWork::Inline`]). Joined at shutdown once every handle is gone.
#[derive(Debug)]
pub(crate) enum Committer {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
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
    /// Starts the writer over `store`.
    /// `degraded` is called once, at the first failed flush (the store then refuses writes
    /// until the server restarts).
    pub(crate) fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        max_batch: usize,
        degraded: Box<dyn FnOnce() + Send>,
        work: StorageWork,
    ) -> (Self, CommitHandle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let mut writer =
            Writer { store, hub, max_batch: max_batch.max(1), degraded: Some(degraded) };
        let committer = match work {
            StorageWork::Inline => Self::Task(tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    writer.commit_batch(first, &mut rx);
                }
            })),
            StorageWork::BlockingPool => Self::Thread(
                std::thread::Builder::new()
                    .name("cubby-commit".into())
                    .spawn(move || {
                        while let Some(first) = rx.blocking_recv() {
                            writer.commit_batch(first, &mut rx);
                        }
                    })
                    .expect("spawning a thread fails only when the OS is out of resources"),
            ),
        };
        (committer, CommitHandle { tx })
    }

    /// Waits for the writer to finish (after every [`CommitHandle`] is dropped).
    pub(crate) async fn join(self) {
        let finished = match self {
            Self::Thread(thread) => {
                tokio::task::spawn_blocking(move || thread.join().is_ok()).await.unwrap_or(false)
            }
            Self::Task(task) => task.await.is_ok(),
        };
        if !finished {
            tracing::error!("the committer panicked");
        }
    }
}

fn apply(store: &dyn Store, write: &Write) -> Result<Option<Seq>, StoreError> {
    match write {
        Write::Doc { customer, doc, meta, chunk, .. } => {
            let chunk = chunk.as_ref().map(|(index, bytes)| Chunk { index: *index, bytes });
            store.write_doc(customer, doc, meta, chunk).map(Some)
        }
        Write::Compact { customer, doc, snapshot, meta } => {
            store.compact(customer, doc, snapshot)?;
            // After the snapshot: a crash between the two leaves the size counted high, never
            // low, until the next compaction.
            if let Some(meta) = meta {
                store.write_doc_off_feed(customer, doc, meta, None)?;
            }
            Ok(None)
        }
        Write::Delete { customer, doc } => store.delete_doc(customer, doc).map(Some),
    }
}

/// What a durable write tells the customer's devices.
fn announcement(write: &Write, seq: Seq) -> Option<(CustomerId, Announcement)> {
    match write {
        Write::Doc { customer, doc, meta, metadata, .. } => {
            let info = DocMeta::decode(meta).ok().map(|m| cubby_proto::doc_info(doc, &m));
            Some((*customer, Announcement { doc: *doc, seq, info, metadata: *metadata }))
        }
        Write::Delete { customer, doc } => {
            Some((*customer, Announcement { doc: *doc, seq, info: None, metadata: true }))
        }
        Write::Compact { .. } => None,
    }
}

/// What the committer owns.
struct Writer {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    max_batch: usize,
    degraded: Option<Box<dyn FnOnce() + Send>>,
}

impl Writer {
    /// Applies `first` and every write queued behind it (up to `max_batch`), flushes once, then
    /// answers each write and announces the durable ones in feed order.
    fn commit_batch(&mut self, first: Job, rx: &mut mpsc::UnboundedReceiver<Job>) {
        let mut batch = vec![first];
        while batch.len() < self.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let store = &*self.store;
        let results: Vec<_> = batch.iter().map(|job| apply(store, &job.write)).collect();
        let flushed = store.flush().map_err(|err| {
            tracing::error!(%err, "flush failed; writes in this batch are not acknowledged");
            if let Some(degraded) = self.degraded.take() {
                degraded();
            }
            api_error(err)
        });
        for (job, result) in batch.into_iter().zip(results) {
            let outcome = match (&flushed, result) {
                (Ok(()), Ok(seq)) => {
                    if let Some((customer, a)) = seq.and_then(|seq| announcement(&job.write, seq)) {
                        self.hub.publish(customer, a);
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
