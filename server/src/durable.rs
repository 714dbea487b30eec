//! Group commit: one writer (a thread; a task under simulation) applies writes in batches and
//! flushes once per batch.
//!
//! A document actor hands its write to [`CommitHandle::commit`] and learns the result only after
//! the flush that made it durable. While one flush runs, the next writes queue up and share the
//! following flush, so the durability window is "what arrives during one flush", up to
//! `max_commit_batch` writes. Reads do not go through here; they run on the blocking pool.
//!
//! This thread is also the one sequencer of the change feed: after each flush it announces the
//! batch's writes on the change bus in the order their feed positions were taken, so every
//! stream sees a customer's announcements in increasing order and only once they are durable.
//! Before it announces a write, it sends the frames its document's actor decided for it (a
//! [`Release`]): the changed document's answers go out from here, with no hop back through
//! the actor.

use std::sync::Arc;

use cubby_core::{ChunkId, CustomerId, DocId, DocMeta, Seq};
use cubby_proto::ApiError;
use cubby_store::{Chunk, Snapshot, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::StorageWork;
use crate::bus::{Bus, Changed, Envelope, Event, NodeId};
use crate::docs::{Release, Undelivered};
use crate::metrics::Metrics;

/// A write the committer applies.
#[derive(Debug)]
pub(crate) enum Write {
    /// Metadata and optionally a change chunk.
    Doc {
        customer: CustomerId,
        doc: DocId,
        meta: DocMeta,
        chunk: Option<(ChunkId, Vec<u8>)>,
        /// The document was created or its metadata changed (see [`Announcement::metadata`]).
        metadata: bool,
    },
    /// Fold the stored parts `replaces` names into a snapshot, then store `meta` (the
    /// document's size recounted as the snapshot's) if given: off the feed, as nothing changed
    /// that devices need to hear of.
    Compact {
        customer: CustomerId,
        doc: DocId,
        snapshot: Snapshot,
        replaces: Vec<ChunkId>,
        meta: Option<DocMeta>,
    },
    /// Delete a document.
    Delete { customer: CustomerId, doc: DocId },
}

struct Job {
    write: Write,
    /// What its document tells devices once it is durable.
    release: Option<Release>,
    reply: oneshot::Sender<Result<Committed, ApiError>>,
}

/// A durable write: its feed position (if it took one), and the messages of its release that
/// did not reach their devices.
pub(crate) type Committed = (Option<Seq>, Vec<Undelivered>);

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
    /// Starts the writer over `store`. `on_failure` is called at every failed commit (the
    /// health service then checks the store).
    pub(crate) fn start(
        store: Arc<dyn Store>,
        bus: (Arc<dyn Bus>, NodeId),
        max_batch: usize,
        on_failure: Box<dyn Fn() + Send>,
        work: StorageWork,
        metrics: Arc<Metrics>,
    ) -> (Self, CommitHandle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let mut writer = Writer { store, bus, max_batch: max_batch.max(1), on_failure, metrics };
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

impl Write {
    /// The store's writes for this one (a compaction is two), appended to `out`.
    fn store_writes<'a>(&'a self, out: &mut Vec<cubby_store::Write<'a>>) {
        use cubby_store::Write as W;
        match self {
            Write::Doc { customer, doc, meta, chunk, .. } => out.push(W::Doc {
                customer,
                doc,
                meta,
                chunk: chunk.as_ref().map(|(id, bytes)| Chunk { id: *id, bytes }),
                feed: true,
            }),
            Write::Compact { customer, doc, snapshot, replaces, meta } => {
                out.push(W::Compact { customer, doc, snapshot, replaces });
                // After the snapshot: a crash between the two leaves the size counted high,
                // never low, until the next compaction.
                if let Some(meta) = meta {
                    out.push(W::Doc { customer, doc, meta, chunk: None, feed: false });
                }
            }
            Write::Delete { customer, doc } => out.push(W::Delete { customer, doc }),
        }
    }
}

/// What a durable write tells the nodes.
fn announcement(write: Write, seq: Seq) -> Option<Changed> {
    match write {
        Write::Doc { customer, doc, meta, metadata, .. } => {
            Some(Changed { customer, doc, seq, info: Some(Some(meta)), metadata })
        }
        Write::Delete { customer, doc } => {
            Some(Changed { customer, doc, seq, info: Some(None), metadata: true })
        }
        Write::Compact { .. } => None,
    }
}

/// What the committer owns.
struct Writer {
    store: Arc<dyn Store>,
    /// Where durable writes are announced, and this node's id on it.
    bus: (Arc<dyn Bus>, NodeId),
    max_batch: usize,
    on_failure: Box<dyn Fn() + Send>,
    metrics: Arc<Metrics>,
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
        let started = std::time::Instant::now();
        // One call into the store for the whole batch; each job's outcome is its writes'.
        let mut writes = Vec::with_capacity(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        for job in &batch {
            let from = writes.len();
            job.write.store_writes(&mut writes);
            spans.push(from..writes.len());
        }
        let committed = self.store.commit(&writes).map_err(|err| {
            tracing::error!(%err, "commit failed; writes in this batch are not acknowledged");
            (self.on_failure)();
            api_error(err)
        });
        drop(writes);
        self.metrics.commit_batch.observe(batch.len() as f64);
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        let results: Vec<Result<Option<Seq>, ApiError>> = match committed {
            Err(err) => spans.iter().map(|_| Err(err.clone())).collect(),
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                spans
                    .into_iter()
                    .map(|span| {
                        // The first write's position (a document's move, a deletion) is the job's.
                        let mut seq = None;
                        for (i, outcome) in outcomes.by_ref().take(span.len()).enumerate() {
                            match outcome {
                                Ok(taken) if i == 0 => seq = taken,
                                Ok(_) => {}
                                Err(err) => return Err(api_error(err)),
                            }
                        }
                        Ok(seq)
                    })
                    .collect()
            }
        };
        for (Job { write, release, reply }, outcome) in batch.into_iter().zip(results) {
            let outcome = outcome.map(|seq| {
                // The devices' frames first: they are what a change waits for.
                let undelivered = release.map(|r| r.send(seq)).unwrap_or_default();
                if let Some(seq) = seq
                    && let Some(changed) = announcement(write, seq)
                {
                    let (bus, node) = &self.bus;
                    bus.publish(Envelope { from: *node, event: Event::Changed(changed) });
                }
                (seq, undelivered)
            });
            // The writer may have gone away (connection closed); the write stands regardless.
            let _ = reply.send(outcome);
        }
    }
}

impl CommitHandle {
    /// Applies `write` and returns once it is durable.
    pub(crate) async fn commit(&self, write: Write) -> Result<Option<Seq>, ApiError> {
        Ok(self.submit(write, None).await?.0)
    }

    /// Applies `write`, then sends `release` as soon as the write is durable (on the committer,
    /// before anyone hears the write succeeded); a failed write sends nothing of it.
    pub(crate) async fn commit_releasing(
        &self,
        write: Write,
        release: Release,
    ) -> Result<Committed, ApiError> {
        self.submit(write, Some(release)).await
    }

    async fn submit(&self, write: Write, release: Option<Release>) -> Result<Committed, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { write, release, reply })
            .map_err(|_| ApiError::Unavailable("server shutting down".into()))?;
        rx.await.map_err(|_| ApiError::Unavailable("server shutting down".into()))?
    }
}
