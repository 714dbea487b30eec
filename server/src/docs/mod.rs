//! One actor per live document.
//!
//! [`Docs::send`] routes a message to the document's actor, spawning it if needed; the map lock
//! is held only for that (never across an `.await`), and an actor retires only under the same
//! lock with an empty mailbox, so no message is ever sent to a retiring actor.
//!
//! The actor (`actor.rs`) is the executor of one [`cubby_core::document::Document`], which
//! holds the document and one sync session per connected device and decides what each is told.
//! It drains its mailbox in batches: apply every message, decide every answer, and hand the new
//! changes as one chunk to the committer with those answers (a [`Release`]), which sends them
//! only once that write is durable. So the heads it advertises are always on disk.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cubby_core::history::CompactionPolicy;
use cubby_core::{CustomerId, DeviceId, DocId, DocMeta, Seq};
use cubby_proto::{ApiError, pb};
use cubby_store::Store;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::durable::CommitHandle;
use crate::frames::ToDevice;
use crate::hub::Announcement;

mod actor;
mod answers;
mod release;
mod storage;

pub(crate) use release::{Release, Undelivered};

/// A message on its way to a device, with the in-flight permits of the messages it answers:
/// they go back to the device's stream only when it leaves its queue, so a device that does not
/// read its answers stops being read (back-pressure), however fast documents answer.
pub(crate) struct Outgoing {
    pub(crate) message: Box<ToDevice>,
    _permits: Vec<OwnedSemaphorePermit>,
}

/// Where a document actor sends messages for one connected device. They are boxed: a tokio
/// channel allocates its first block of 32 slots when it is made, and a frame inline would make
/// that kilobytes for every connected device, most of them idle.
pub(crate) type Outbox = mpsc::Sender<Outgoing>;

/// The documents whose frames found a device's queue full. Their actors dropped those frames
/// and started the device's session over; once the device reads again, its stream asks each
/// actor to speak again (`DocMsg::Resume`). So a slow device loses nothing and holds up no
/// document, and only one that stops reading for `slow_consumer_secs` is cut off.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lagging(Arc<LaggingDocs>);

#[derive(Debug, Default)]
struct LaggingDocs {
    docs: Mutex<HashSet<DocId>>,
    marked: tokio::sync::Notify,
}

impl Lagging {
    fn mark(&self, doc: DocId) {
        self.0.docs.lock().unwrap_or_else(PoisonError::into_inner).insert(doc);
        self.0.marked.notify_one();
    }

    /// Resolves once some document is marked (at once if one was marked since the last wait).
    pub(crate) async fn marked(&self) {
        self.0.marked.notified().await;
    }

    /// The documents marked, forgetting them.
    pub(crate) fn take(&self) -> Vec<DocId> {
        self.0.docs.lock().unwrap_or_else(PoisonError::into_inner).drain().collect()
    }
}

/// What a document actor holds of one device's stream.
#[derive(Clone)]
pub(crate) struct Link {
    /// Where its frames go.
    pub(crate) outbox: Outbox,
    /// Where the actor says the device holds the durable document at a feed position (its
    /// message named every head): the stream alone keeps what its device holds.
    pub(crate) holds: mpsc::UnboundedSender<(DocId, Seq)>,
    /// Documents that owe it frames its queue had no room for.
    pub(crate) lagging: Lagging,
}

/// Whether a message reached a device's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    Queued,
    /// Its queue was full: the document is marked lagging for the device.
    Behind,
    /// Its stream has ended.
    Gone,
}

impl Link {
    /// Queues `message` for the device of `doc`, with `permits`; when its queue is full, marks
    /// the document lagging (the caller starts the device's session over).
    fn send(&self, doc: DocId, message: ToDevice, permits: Vec<OwnedSemaphorePermit>) -> Sent {
        let message = Box::new(message);
        match self.outbox.try_send(Outgoing { message, _permits: permits }) {
            Ok(()) => Sent::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagging.mark(doc);
                Sent::Behind
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
        }
    }
}

/// What a document actor is asked to do.
pub(crate) enum DocMsg {
    /// One Automerge sync message from a device.
    Sync {
        peer: u64,
        /// The device on the stream (its sync state is kept between connections).
        device: DeviceId,
        link: Link,
        message: Vec<u8>,
        /// Create the document with this title (private or not) if it does not exist; make it
        /// private if it does and this says so.
        create: Option<(String, bool)>,
        /// Held until the answer leaves the device's queue: bounds what one stream can have
        /// waiting at documents and in its queue.
        permit: OwnedSemaphorePermit,
    },
    /// A reconnecting device's stream announces a changed document through its actor, which
    /// joins the device to the document and sends what changed since the device's `saved` sync
    /// state (as the stream read it from storage) right behind the announcement, unasked: the
    /// device need not ask, which saves a round trip. `queued` says whether the actor sent the
    /// announcement (false, or dropped: the stream sends it itself).
    Push {
        peer: u64,
        device: DeviceId,
        saved: Vec<u8>,
        link: Link,
        announcement: Arc<Announcement>,
        queued: oneshot::Sender<bool>,
    },
    /// The device's queue had no room for a frame of this document (see [`Lagging`]) and has
    /// room again: speak to it again (through `link`, if the frame was a refusal).
    Resume { peer: u64, link: Link },
    /// The device's stream closed.
    Leave { peer: u64 },
    /// Create an empty document.
    Create { title: String, reply: oneshot::Sender<Result<Summary, ApiError>> },
    /// Render the document as JSON. `business` refuses a private document.
    Read { business: bool, reply: oneshot::Sender<Result<(Summary, serde_json::Value), ApiError>> },
    /// Apply edits as one change by a business actor (refused for a private document), then
    /// answer like `Read`.
    Edit {
        edits: Vec<(String, cubby_core::json::Edit)>,
        reply: oneshot::Sender<Result<(Summary, serde_json::Value), ApiError>>,
    },
    /// Change what the customer controls of the document's metadata: its title, or whether it
    /// is private.
    SetMeta {
        title: Option<String>,
        private: Option<bool>,
        reply: oneshot::Sender<Result<Summary, ApiError>>,
    },
    /// Delete the document.
    Delete { reply: oneshot::Sender<Result<(), ApiError>> },
    /// Another node stored a write of the document: take in what it stored (see `crate::bus`).
    Refresh,
    /// The customer was erased: drop everything and stop.
    Evict,
}

/// What every actor shares.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) commit: CommitHandle,
    pub(crate) idle: Duration,
    pub(crate) policy: CompactionPolicy,
    pub(crate) tracker: TaskTracker,
    pub(crate) stop: CancellationToken,
    pub(crate) quotas: Arc<crate::quota::Quotas>,
    pub(crate) work: crate::StorageWork,
    /// How long one large sync message may take to apply.
    pub(crate) apply_deadline: Duration,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

type Key = (CustomerId, DocId);

struct Entry {
    generation: u64,
    tx: mpsc::UnboundedSender<DocMsg>,
}

struct Registry {
    actors: Mutex<(u64, HashMap<Key, Entry>)>,
    ctx: Ctx,
}

/// The live documents. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Docs {
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Docs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docs").field("live", &self.live()).finish()
    }
}

impl Docs {
    pub(crate) fn new(ctx: Ctx) -> Self {
        Self { registry: Arc::new(Registry { actors: Mutex::new((0, HashMap::new())), ctx }) }
    }

    /// Delivers `msg` to the document's actor, starting it if it is not running.
    pub(crate) fn send(&self, customer: CustomerId, doc: DocId, msg: DocMsg) {
        let mut guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        let (generations, actors) = &mut *guard;
        let msg = match actors.get(&(customer, doc)) {
            Some(entry) => match entry.tx.send(msg) {
                Ok(()) => return,
                // The actor died (panicked); start a fresh one from storage.
                Err(mpsc::error::SendError(msg)) => msg,
            },
            None => msg,
        };
        *generations += 1;
        let generation = *generations;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(msg).expect("the receiver is alive: we hold it");
        actors.insert((customer, doc), Entry { generation, tx });
        let actor = actor::Actor::new(customer, doc, generation, self.registry.clone());
        self.registry.ctx.tracker.spawn(actor.run(rx));
    }

    /// Tells a running actor that a device left; an actor that is not running has nothing to
    /// forget, so none is started.
    pub(crate) fn leave(&self, customer: CustomerId, doc: DocId, peer: u64) {
        self.send_if_running(customer, doc, DocMsg::Leave { peer });
    }

    /// Tells a running actor that another node stored a write of its document; an actor that
    /// is not running loads the document from the store when it starts, so none is started.
    pub(crate) fn refresh(&self, customer: CustomerId, doc: DocId) {
        self.send_if_running(customer, doc, DocMsg::Refresh);
    }

    /// Sends `msg` to the document's actor if it is running; starts none.
    fn send_if_running(&self, customer: CustomerId, doc: DocId, msg: DocMsg) {
        let guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = guard.1.get(&(customer, doc)) {
            let _ = entry.tx.send(msg);
        }
    }

    /// Tells every live document of `customer` to drop its state and stop (erasure).
    pub(crate) fn evict_customer(&self, customer: &CustomerId) {
        let guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        for ((c, _), entry) in guard.1.iter() {
            if c == customer {
                let _ = entry.tx.send(DocMsg::Evict);
            }
        }
    }

    /// How many documents are in memory.
    pub(crate) fn live(&self) -> usize {
        self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner).1.len()
    }

    /// Sends a request and waits for its answer.
    pub(crate) async fn ask<T>(
        &self,
        customer: CustomerId,
        doc: DocId,
        make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> DocMsg,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(customer, doc, make(reply));
        rx.await.map_err(|_| ApiError::Internal)?
    }
}

/// A document as an answer tells of it: its metadata and feed position.
#[derive(Clone, Debug)]
pub(crate) struct Summary {
    pub(crate) doc: DocId,
    pub(crate) meta: DocMeta,
    pub(crate) seq: Seq,
}

impl Summary {
    /// As the account and admin APIs answer.
    pub(crate) fn info(&self) -> pb::DocInfo {
        pb::DocInfo { seq: self.seq.0, ..cubby_proto::doc_info(&self.doc, &self.meta) }
    }
}

/// Where a device's sync state for a document is kept (`Space::SYNC_STATES`).
pub(crate) fn session_key(doc: &DocId, device: &DeviceId) -> Vec<u8> {
    [doc.as_bytes().as_slice(), device.as_bytes()].concat()
}
