//! One actor per live document.
//!
//! [`Docs::send`] routes a message to the document's actor, spawning it if needed; the map lock
//! is held only for that (never across an `.await`), and an actor retires only under the same
//! lock with an empty mailbox, so no message is ever sent to a retiring actor.
//!
//! The actor owns the `Automerge` document and one [`PeerSession`] per connected device. It
//! drains its mailbox in batches: apply every message, write the new changes as one chunk through
//! the committer, and only after that write is durable answer anyone. So the heads it advertises
//! are always on disk.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use automerge::Automerge;
use cubby_core::history::{CompactionPolicy, History};
use cubby_core::session::{PeerSession, SharedMessages, SyncError};
use cubby_core::{CustomerId, DeviceId, DocId, DocMeta, Seq};
use cubby_proto::{ApiError, pb};
use cubby_store::{Snapshot, Space, Store};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::durable::{CommitHandle, Write, api_error};
use crate::hub::Announcement;

/// A frame on its way to a device, with the in-flight permits of the messages it answers: they
/// go back to the device's stream only when the frame leaves its queue, so a device that does
/// not read its answers stops being read (back-pressure), however fast documents answer.
pub(crate) struct Outgoing {
    pub(crate) frame: Box<pb::ServerFrame>,
    _permits: Vec<OwnedSemaphorePermit>,
}

/// Where a document actor sends frames for one connected device. Frames are boxed: a tokio
/// channel allocates its first block of 32 slots when it is made, and a `ServerFrame` inline
/// would make that 3.8 KB for every connected device, most of them idle.
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
    /// What the device holds, kept up to date by the actor.
    pub(crate) held: Held,
    /// Documents that owe it frames its queue had no room for.
    pub(crate) lagging: Lagging,
}

/// Whether a frame reached a device's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Queued,
    /// Its queue was full: the document is marked lagging for the device.
    Behind,
    /// Its stream has ended.
    Gone,
}

impl Link {
    /// Queues `frame` for the device of `doc`, with `permits`; when its queue is full, marks the
    /// document lagging (the caller starts the device's session over).
    fn send(
        &self,
        doc: DocId,
        frame: Box<pb::ServerFrame>,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> Sent {
        match self.outbox.try_send(Outgoing { frame, _permits: permits }) {
            Ok(()) => Sent::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagging.mark(doc);
                Sent::Behind
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
        }
    }
}

/// What one connected device is known to hold: per document, the feed position of the newest
/// durable state the device has confirmed it has (its sync message named every head). Document
/// actors write it; the device's stream reads it to leave out announcements of changes the
/// device already has.
#[derive(Clone, Debug, Default)]
pub(crate) struct Held(Arc<std::sync::Mutex<HashMap<DocId, Seq>>>);

impl Held {
    fn record(&self, doc: DocId, seq: Seq) {
        let mut held = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = held.entry(doc).or_default();
        *at = (*at).max(seq);
    }

    /// Whether the device holds `doc` as of feed position `seq`.
    pub(crate) fn holds(&self, doc: &DocId, seq: Seq) -> bool {
        let held = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.get(doc).is_some_and(|at| *at >= seq)
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
    Create { title: String, reply: oneshot::Sender<Result<pb::DocInfo, ApiError>> },
    /// Render the document as JSON. `business` refuses a private document.
    Read {
        business: bool,
        reply: oneshot::Sender<Result<(pb::DocInfo, serde_json::Value), ApiError>>,
    },
    /// Apply edits as one change by a business actor (refused for a private document), then
    /// answer like `Read`.
    Edit {
        edits: Vec<(String, cubby_core::json::Edit)>,
        reply: oneshot::Sender<Result<(pb::DocInfo, serde_json::Value), ApiError>>,
    },
    /// Mark the document private or shared.
    SetPrivate { private: bool, reply: oneshot::Sender<Result<pb::DocInfo, ApiError>> },
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
        let actor = Actor {
            customer,
            doc,
            generation,
            registry: self.registry.clone(),
            state: None,
            peers: HashMap::new(),
            evicted: false,
        };
        self.registry.ctx.tracker.spawn(actor.run(rx));
    }

    /// Tells a running actor that a device left; an actor that is not running has nothing to
    /// forget, so none is started.
    pub(crate) fn leave(&self, customer: CustomerId, doc: DocId, peer: u64) {
        let guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = guard.1.get(&(customer, doc)) {
            let _ = entry.tx.send(DocMsg::Leave { peer });
        }
    }

    /// Tells a running actor that another node stored a write of its document; an actor that
    /// is not running loads the document from the store when it starts, so none is started.
    pub(crate) fn refresh(&self, customer: CustomerId, doc: DocId) {
        let guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = guard.1.get(&(customer, doc)) {
            let _ = entry.tx.send(DocMsg::Refresh);
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

struct Live {
    /// The document and what storage holds of it.
    history: History,
    meta: DocMeta,
    seq: Seq,
}

struct Peer {
    device: DeviceId,
    session: PeerSession,
    link: Link,
    /// The permits of the device's messages in this batch, given back with the answer.
    permits: Vec<OwnedSemaphorePermit>,
}

impl Peer {
    fn new(device: DeviceId, session: PeerSession, link: Link) -> Self {
        Self { device, session, link, permits: Vec::new() }
    }

    /// Sends a frame of `doc` with the permits of the messages it answers. A device whose queue
    /// is full gets its session started over: the frame is dropped, and what it said is said
    /// again once the device reads (`DocMsg::Resume`).
    fn send(&mut self, doc: DocId, frame: Box<pb::ServerFrame>) -> Sent {
        let sent = self.link.send(doc, frame, std::mem::take(&mut self.permits));
        if sent == Sent::Behind {
            self.session.reconnect();
        }
        sent
    }
}

/// Sync messages up to this size are applied on the actor's task; larger ones (a long offline
/// history) on the blocking pool, under `apply_deadline_ms`.
const INLINE_APPLY_BYTES: usize = 64 << 10;

type Applied = std::thread::Result<Result<cubby_core::session::Received, SyncError>>;

/// Applies a device's sync message to the document.
fn apply(
    session: &mut PeerSession,
    doc: &mut Automerge,
    message: &[u8],
) -> Result<cubby_core::session::Received, SyncError> {
    let received = session.receive(doc, message);
    // Tests panic here, after the changes were applied in memory, to stand for a panic deep
    // inside Automerge.
    fail::fail_point!("doc-after-apply");
    received
}

/// Applies a large message on the blocking pool. `None` when it did not finish within
/// `deadline`: the document and the peer's session stay with the thread (Automerge cannot be
/// interrupted), and the live document is left empty for the caller to reload.
async fn apply_off_thread(
    live: &mut Live,
    peer: &mut Peer,
    message: Vec<u8>,
    deadline: Duration,
) -> Option<Applied> {
    let mut doc = std::mem::replace(live.history.doc_mut(), Automerge::new());
    let mut session = std::mem::take(&mut peer.session);
    let work = tokio::task::spawn_blocking(move || {
        let applied =
            std::panic::catch_unwind(AssertUnwindSafe(|| apply(&mut session, &mut doc, &message)));
        (doc, session, applied)
    });
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok((doc, session, applied))) => {
            *live.history.doc_mut() = doc;
            peer.session = session;
            Some(applied)
        }
        // The closure catches panics; a join error means the runtime is shutting down.
        Ok(Err(_)) => Some(Err(Box::new("apply task failed"))),
        Err(_) => None,
    }
}

struct Actor {
    customer: CustomerId,
    doc: DocId,
    generation: u64,
    registry: Arc<Registry>,
    /// `None`: not loaded yet. `Some(None)`: the document does not exist.
    state: Option<Option<Live>>,
    peers: HashMap<u64, Peer>,
    /// The customer was erased: stop.
    evicted: bool,
}

/// Answers owed once the batch is durable.
enum Deferred {
    Info(oneshot::Sender<Result<pb::DocInfo, ApiError>>),
    Read(oneshot::Sender<Result<(pb::DocInfo, serde_json::Value), ApiError>>),
    Delete(oneshot::Sender<Result<(), ApiError>>),
}

impl Deferred {
    /// Answers with `err`. The asker may have gone; that is fine.
    fn fail(self, err: &ApiError) {
        match self {
            Self::Info(reply) => {
                let _ = reply.send(Err(err.clone()));
            }
            Self::Read(reply) => {
                let _ = reply.send(Err(err.clone()));
            }
            Self::Delete(reply) => {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Where a device's sync state for a document is kept (`Space::SYNC_STATES`).
pub(crate) fn session_key(doc: &DocId, device: &DeviceId) -> Vec<u8> {
    [doc.as_bytes().as_slice(), device.as_bytes()].concat()
}

fn error_frame(doc: &DocId, err: &ApiError) -> Box<pb::ServerFrame> {
    Box::new(pb::ServerFrame {
        frame: Some(pb::server_frame::Frame::Error(pb::DocError {
            doc_id: doc.as_bytes().to_vec(),
            code: err.code() as i32,
            message: err.to_string(),
        })),
    })
}

const MAX_BATCH: usize = 256;

fn private_refusal() -> ApiError {
    ApiError::PermissionDenied("the customer made this document private".into())
}

impl Actor {
    fn ctx(&self) -> &Ctx {
        &self.registry.ctx
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<DocMsg>) {
        let idle = self.ctx().idle;
        let stop = self.ctx().stop.clone();
        loop {
            let first = tokio::select! {
                msg = rx.recv() => msg,
                () = tokio::time::sleep(idle), if self.peers.is_empty() => {
                    if self.retire(&rx) { return }
                    continue;
                }
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            self.handle(batch).await;
            if self.evicted {
                break;
            }
        }
        self.retire_now();
    }

    /// Leaves the registry if nothing is queued. Senders hold the same lock, so none can slip in.
    fn retire(&self, rx: &mpsc::UnboundedReceiver<DocMsg>) -> bool {
        let mut guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        if !rx.is_empty() {
            return false;
        }
        self.unregister(&mut guard.1);
        true
    }

    /// Leaves the registry unconditionally (shutdown).
    fn retire_now(&self) {
        let mut guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        self.unregister(&mut guard.1);
    }

    /// Removes this actor's entry, unless a newer actor for the document has replaced it.
    fn unregister(&self, actors: &mut HashMap<Key, Entry>) {
        let key = (self.customer, self.doc);
        if actors.get(&key).is_some_and(|e| e.generation == self.generation) {
            actors.remove(&key);
        }
    }

    /// Loads the document from storage (again), dropping anything not durable.
    async fn load(&mut self) -> Result<(), ApiError> {
        let (store, customer, doc) = (self.ctx().store.clone(), self.customer, self.doc);
        let policy = self.ctx().policy;
        let loaded = self
            .ctx()
            .work
            .run(move || {
                let Some(records) = store.load(&customer, &doc).map_err(api_error)? else {
                    return Ok(None);
                };
                let meta =
                    DocMeta::decode(&records.meta).map_err(|_| ApiError::DataLoss("document"))?;
                let rebuilt = std::panic::catch_unwind(|| {
                    History::rebuild(
                        records.snapshot.as_ref().map(|s| (s.id, s.bytes.as_slice())),
                        records.chunks.iter().map(|(id, b)| (*id, b.as_slice())),
                        policy,
                    )
                });
                let history = match rebuilt {
                    Ok(Ok(history)) => history,
                    Ok(Err(err)) => {
                        tracing::error!(doc = %doc.short(), %err, "stored document does not load");
                        return Err(ApiError::DataLoss("document"));
                    }
                    Err(_) => {
                        tracing::error!(doc = %doc.short(), "stored document panicked loading");
                        return Err(ApiError::DataLoss("document"));
                    }
                };
                Ok(Some(Live { history, meta, seq: records.seq }))
            })
            .await
            .map_err(|_| ApiError::Internal)??;
        self.state = Some(loaded);
        for peer in self.peers.values_mut() {
            peer.session.reset();
        }
        Ok(())
    }

    async fn handle(&mut self, batch: Vec<DocMsg>) {
        if batch.iter().any(|m| matches!(m, DocMsg::Evict)) {
            self.refuse_all(batch, &ApiError::AccountErased);
            for (_, mut peer) in self.peers.drain() {
                peer.send(self.doc, error_frame(&self.doc, &ApiError::AccountErased));
            }
            self.state = None;
            self.evicted = true;
            return;
        }
        if self.state.is_none() {
            if let Err(err) = self.load().await {
                self.refuse_all(batch, &err);
                return;
            }
        }
        let before = self.live().map(|l| l.history.doc().get_heads());
        // What another node stored goes in first (a later position of this node's own does not
        // mean it has the other's write); every peer then hears of it (`fan_out`).
        if batch.iter().any(|m| matches!(m, DocMsg::Refresh)) {
            if let Err(err) = self.absorb().await {
                tracing::warn!(doc = %self.doc.short(), %err, "cannot take in another node's write");
            }
        }
        let mut spoke = HashSet::new();
        // The metadata must be written even without new changes (created, or made private).
        let mut touched = false;
        let mut poisoned = false;
        let mut deferred = Vec::new();
        let mut pushes = Vec::new();
        let mut batch = batch.into_iter();
        while let Some(msg) = batch.next() {
            match msg {
                DocMsg::Sync { peer, device, link, message, create, permit } => {
                    spoke.insert(peer);
                    match (&mut self.state, create) {
                        (Some(Some(live)), Some((_, true))) if !live.meta.private => {
                            // A device offering it back after a restore knew it was private:
                            // privacy only ratchets up this way.
                            live.meta.private = true;
                            touched = true;
                        }
                        (Some(Some(_)), _) => {}
                        (_, Some((title, private))) => touched |= self.create(title, private),
                        (_, None) => {
                            let refusal = error_frame(&self.doc, &ApiError::NotFound("document"));
                            link.send(self.doc, refusal, vec![permit]);
                            continue;
                        }
                    }
                    if !self.peers.contains_key(&peer) {
                        let session = self.saved_session(device, None).await;
                        self.peers.insert(peer, Peer::new(device, session, link));
                    }
                    let Some(Some(live)) = &mut self.state else { continue };
                    let Some(peer) = self.peers.get_mut(&peer) else { continue };
                    let off_thread = message.len() > INLINE_APPLY_BYTES
                        && self.registry.ctx.work == crate::StorageWork::BlockingPool;
                    let applied = if off_thread {
                        let deadline = self.registry.ctx.apply_deadline;
                        match apply_off_thread(live, peer, message, deadline).await {
                            Some(applied) => applied,
                            None => {
                                // The document went with the thread: refuse the rest of the
                                // batch, and start again from what is durable.
                                tracing::warn!(doc = %self.doc.short(), ?deadline,
                                    "a sync message took too long to apply; refused");
                                self.registry.ctx.quotas.penalize(&self.customer, 10.0);
                                let refusal = ApiError::ResourceExhausted(
                                    "this change took too long to apply".into(),
                                );
                                peer.permits.push(permit);
                                peer.send(self.doc, error_frame(&self.doc, &refusal));
                                self.state = None;
                                poisoned = true;
                                let busy = ApiError::Unavailable("document busy; retry".into());
                                self.refuse_all(batch.collect(), &busy);
                                break;
                            }
                        }
                    } else {
                        std::panic::catch_unwind(AssertUnwindSafe(|| {
                            apply(&mut peer.session, live.history.doc_mut(), &message)
                        }))
                    };
                    let refusal = match applied {
                        Ok(Ok(_)) => None,
                        Ok(Err(SyncError::Malformed)) => {
                            Some(ApiError::InvalidArgument("malformed sync message".into()))
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(doc = %self.doc.short(), %err, "sync message refused");
                            Some(ApiError::InvalidArgument("sync message rejected".into()))
                        }
                        Err(_) => {
                            tracing::error!(doc = %self.doc.short(),
                                "automerge panicked on a sync message");
                            poisoned = true;
                            Some(ApiError::Internal)
                        }
                    };
                    // The answer carries the permit back: with the refusal, or with the reply
                    // once the batch is durable (`fan_out`).
                    peer.permits.push(permit);
                    if let Some(err) = refusal {
                        peer.send(self.doc, error_frame(&self.doc, &err));
                    }
                }
                DocMsg::Push { peer, device, saved, link, announcement, queued } => {
                    if self.live().is_none() {
                        continue; // Deleted meanwhile: the stream announces it as it was.
                    }
                    if !self.peers.contains_key(&peer) {
                        let session = self.saved_session(device, Some(saved)).await;
                        self.peers.insert(peer, Peer::new(device, session, link));
                    }
                    pushes.push((peer, announcement, queued));
                }
                DocMsg::Resume { peer, link } => {
                    // Spoken to like a device that just spoke: its session started over. One
                    // that left is not here; nor is one whose document does not exist, and
                    // the frame it had no room for said so: say it again.
                    if self.peers.contains_key(&peer) {
                        spoke.insert(peer);
                    } else if self.live().is_none() {
                        let gone = error_frame(&self.doc, &ApiError::NotFound("document"));
                        link.send(self.doc, gone, Vec::new());
                    }
                }
                DocMsg::Leave { peer } => {
                    if let Some(peer) = self.peers.remove(&peer) {
                        self.save_session(&peer).await;
                    }
                }
                DocMsg::Create { title, reply } => {
                    if self.live().is_none() {
                        touched |= self.create(title, false);
                        deferred.push(Deferred::Info(reply));
                    } else {
                        let _ = reply
                            .send(Err(ApiError::InvalidArgument("document already exists".into())));
                    }
                }
                DocMsg::Read { business, reply } => match self.live() {
                    Some(live) if business && live.meta.private => {
                        let _ = reply.send(Err(private_refusal()));
                    }
                    _ => deferred.push(Deferred::Read(reply)),
                },
                DocMsg::Edit { edits, reply } => match self.business_edit(&edits) {
                    Ok(()) => deferred.push(Deferred::Read(reply)),
                    Err(err) => {
                        let _ = reply.send(Err(err));
                    }
                },
                DocMsg::SetPrivate { private, reply } => match &mut self.state {
                    Some(Some(live)) => {
                        touched |= live.meta.private != private;
                        live.meta.private = private;
                        deferred.push(Deferred::Info(reply));
                    }
                    _ => {
                        let _ = reply.send(Err(ApiError::NotFound("document")));
                    }
                },
                DocMsg::Delete { reply } => deferred.push(Deferred::Delete(reply)),
                DocMsg::Refresh => {} // Taken in above.
                DocMsg::Evict => unreachable!("handled before the batch"),
            }
        }
        if poisoned {
            // The document may be half-applied: go back to what is durable.
            if let Err(err) = self.load().await {
                // Nothing half-applied is kept, or the next batch would write it.
                self.state = None;
                deferred.into_iter().for_each(|d| d.fail(&err));
                // The devices' answers carry their permits back: each hears of the failure.
                for (_, mut peer) in self.peers.drain() {
                    peer.send(self.doc, error_frame(&self.doc, &err));
                }
                return;
            }
        } else if let Err(err) = self.persist(touched).await {
            // Not durable: forget it, so nobody is told heads that are not on disk. Devices
            // still hold their changes and resend them.
            tracing::warn!(doc = %self.doc.short(), %err, "write failed; reloading document");
            deferred.into_iter().for_each(|d| d.fail(&err));
            for (_, mut peer) in self.peers.drain() {
                peer.send(self.doc, error_frame(&self.doc, &err));
            }
            if self.load().await.is_err() {
                self.state = None;
            }
            return;
        }
        self.answer(deferred).await;
        self.push(pushes);
        let moved = before != self.live().map(|l| l.history.doc().get_heads());
        self.fan_out(&spoke, moved);
        self.maybe_compact().await;
    }

    /// The device's sync state for this document from its last connection, if any: with it,
    /// a device that reconnects with new changes is not sent a Bloom filter over the whole
    /// history. A stream of the same device still here (its end not yet noticed) lends its own.
    /// `stored` is the saved state when the caller has read it already (a pushed catch-up).
    async fn saved_session(&self, device: DeviceId, stored: Option<Vec<u8>>) -> PeerSession {
        let Some(live) = self.live() else { return PeerSession::new() };
        if let Some(old) = self.peers.values().find(|p| p.device == device) {
            return PeerSession::restore_for(&old.session.persist(), live.history.doc());
        }
        let stored = match stored {
            Some(bytes) => Some(bytes),
            None => {
                let (store, customer, key) =
                    (self.ctx().store.clone(), self.customer, session_key(&self.doc, &device));
                let read = move || store.get_record(&customer, Space::SYNC_STATES, &key);
                self.ctx().work.run(read).await.ok().and_then(Result::ok).flatten()
            }
        };
        match (stored, self.live()) {
            (Some(bytes), Some(live)) => PeerSession::restore_for(&bytes, live.history.doc()),
            _ => PeerSession::new(),
        }
    }

    /// Keeps a leaving device's sync state. Not flushed: the next group commit carries it, and
    /// losing it costs one larger exchange.
    async fn save_session(&self, peer: &Peer) {
        if peer.session.shared_heads().is_empty() {
            return; // Nothing worth keeping (a document the device never synced, say).
        }
        let (store, customer) = (self.ctx().store.clone(), self.customer);
        let (key, value) = (session_key(&self.doc, &peer.device), peer.session.persist());
        let saved = self
            .ctx()
            .work
            .run(move || store.put_record(&customer, Space::SYNC_STATES, &key, &value))
            .await;
        if let Ok(Err(err)) = saved {
            tracing::debug!(%err, "could not keep a device's sync state");
        }
    }

    /// Takes in what the store holds of the document now: another node stored a write of it.
    /// Deleted there, it is deleted here, and the devices syncing it are told.
    async fn absorb(&mut self) -> Result<(), ApiError> {
        let (store, customer, doc) = (self.ctx().store.clone(), self.customer, self.doc);
        let records = self
            .ctx()
            .work
            .run(move || store.load(&customer, &doc).map_err(api_error))
            .await
            .map_err(|_| ApiError::Internal)??;
        let Some(records) = records else {
            if self.live().is_some() {
                self.state = Some(None);
                let gone = ApiError::NotFound("document");
                for (_, mut peer) in self.peers.drain() {
                    peer.send(self.doc, error_frame(&self.doc, &gone));
                }
            }
            return Ok(());
        };
        let meta = DocMeta::decode(&records.meta).map_err(|_| ApiError::DataLoss("document"))?;
        let Some(Some(live)) = &mut self.state else {
            // Made on the other node: load it as it is.
            return self.load().await;
        };
        live.history
            .absorb(
                records.snapshot.as_ref().map(|s| (s.id, s.bytes.as_slice())),
                records.chunks.iter().map(|(id, b)| (*id, b.as_slice())),
            )
            .map_err(|_| ApiError::DataLoss("document"))?;
        live.meta = meta;
        live.seq = live.seq.max(records.seq);
        Ok(())
    }

    fn live(&self) -> Option<&Live> {
        self.state.as_ref().and_then(Option::as_ref)
    }

    fn create(&mut self, title: String, private: bool) -> bool {
        let meta = DocMeta { private, ..DocMeta::new(title) };
        let history = History::new(self.registry.ctx.policy);
        self.state = Some(Some(Live { history, meta, seq: Seq(0) }));
        true
    }

    /// Applies the business's edits as one change by a fresh business actor: all or nothing.
    fn business_edit(
        &mut self,
        edits: &[(String, cubby_core::json::Edit)],
    ) -> Result<(), ApiError> {
        let Some(Some(live)) = &mut self.state else { return Err(ApiError::NotFound("document")) };
        if live.meta.private {
            return Err(private_refusal());
        }
        // "business" and 8 random bytes: the change is visibly the business's in the history.
        let actor = [b"business".as_slice(), &cubby_crypto::random_array::<8>()].concat();
        let doc = live.history.doc_mut();
        doc.set_actor(automerge::ActorId::from(actor));
        let result = doc.transact::<_, _, cubby_core::json::EditError>(|tx| {
            for (path, edit) in edits {
                cubby_core::json::apply_edit(tx, path, edit)?;
            }
            Ok(())
        });
        doc.set_actor(automerge::ActorId::random());
        result.map(drop).map_err(|failure| ApiError::InvalidArgument(failure.error.to_string()))
    }

    /// Writes what changed since `before` as one chunk (and the metadata, also when only
    /// `touched`) and waits until it is durable.
    async fn persist(&mut self, touched: bool) -> Result<(), ApiError> {
        let Some(Some(live)) = &mut self.state else { return Ok(()) };
        // Position 0 on a stored document: it was stored without a feed entry (off the feed),
        // so no device heard of it. Write it again, so that they do.
        let touched = touched || live.seq == Seq(0);
        // Taken here, it counts as stored: a write that fails reloads the document.
        let chunk = live.history.take_chunk();
        let changed = chunk.is_some();
        if !changed && !touched {
            return Ok(());
        }
        let chunk_len = chunk.as_ref().map_or(0, |c| c.bytes.len() as u64);
        let mut meta = live.meta.clone();
        meta.record_write(chunk_len);
        let ctx = &self.registry.ctx;
        if changed {
            ctx.quotas.take_write(&self.customer)?;
            let (quotas, store, customer, size) =
                (ctx.quotas.clone(), ctx.store.clone(), self.customer, meta.size);
            if ctx.quotas.knows(&customer) {
                quotas.reserve(&*store, &customer, size, chunk_len)?;
            } else {
                ctx.work
                    .run(move || quotas.reserve(&*store, &customer, size, chunk_len))
                    .await
                    .map_err(|_| ApiError::Internal)??;
            }
        }
        let write = Write::Doc {
            customer: self.customer,
            doc: self.doc,
            meta: meta.encode(),
            chunk: chunk.map(|part| (part.id, part.bytes)),
            metadata: touched,
        };
        let seq = match ctx.commit.commit(write).await {
            Ok(seq) => seq.unwrap_or(live.seq),
            Err(err) => {
                ctx.quotas.release(&self.customer, chunk_len);
                return Err(err);
            }
        };
        live.meta = meta;
        live.seq = seq;
        Ok(())
    }

    async fn answer(&mut self, deferred: Vec<Deferred>) {
        for d in deferred {
            match d {
                Deferred::Info(reply) => {
                    let info = self.live().map(|l| pb::DocInfo {
                        seq: l.seq.0,
                        ..cubby_proto::doc_info(&self.doc, &l.meta)
                    });
                    let _ = reply.send(info.ok_or(ApiError::Internal));
                }
                Deferred::Read(reply) => {
                    let answer = match self.live() {
                        Some(l) => Ok((
                            cubby_proto::doc_info(&self.doc, &l.meta),
                            cubby_core::json::to_json(l.history.doc()),
                        )),
                        None => Err(ApiError::NotFound("document")),
                    };
                    let _ = reply.send(answer);
                }
                Deferred::Delete(reply) => {
                    if self.live().is_none() {
                        let _ = reply.send(Err(ApiError::NotFound("document")));
                        continue;
                    }
                    let write = Write::Delete { customer: self.customer, doc: self.doc };
                    match self.registry.ctx.commit.commit(write).await {
                        Ok(_) => {
                            // The commit thread announces the deletion.
                            if let Some(live) = self.live() {
                                self.registry.ctx.quotas.release(&self.customer, live.meta.size);
                            }
                            self.state = Some(None);
                            let gone = ApiError::NotFound("document");
                            for (_, mut peer) in self.peers.drain() {
                                peer.send(self.doc, error_frame(&self.doc, &gone));
                            }
                            let _ = reply.send(Ok(()));
                        }
                        Err(err) => {
                            let _ = reply.send(Err(err));
                        }
                    }
                }
            }
        }
    }

    /// Announces the document to each reconnecting peer in `pushes`, with what changed since its
    /// saved sync state right behind, unasked (`PeerSession::push`), now that the batch is
    /// durable.
    fn push(&mut self, pushes: Vec<(u64, Arc<Announcement>, oneshot::Sender<bool>)>) {
        let Some(Some(live)) = &self.state else { return };
        for (peer_id, announcement, queued) in pushes {
            let Some(peer) = self.peers.get_mut(&peer_id) else { continue };
            // Contained like every message built from a peer's state (see `fan_out`).
            let message = std::panic::catch_unwind(AssertUnwindSafe(|| {
                peer.session.push(live.history.doc())
            }))
            .ok()
            .flatten();
            tracing::debug!(peer = peer_id, doc = %self.doc.short(), pushed = message.is_some(),
                "catch-up announced by the document's actor");
            let mut frames = vec![Box::new(announcement.frame(message.is_some()))];
            if let Some(message) = message {
                frames.push(Box::new(pb::ServerFrame {
                    frame: Some(pb::server_frame::Frame::Sync(pb::DocSync {
                        doc_id: self.doc.as_bytes().to_vec(),
                        message,
                        create: None,
                        seq: live.seq.0,
                        more: false,
                    })),
                }));
            }
            let mut sent = true;
            for frame in frames {
                // A device whose queue is full gets its session started over: it asks itself,
                // after the stream's own announcement.
                sent &= sent && peer.send(self.doc, frame) == Sent::Queued;
            }
            let _ = queued.send(sent);
        }
    }

    /// Sends every peer whatever the sync protocol has for it now; peers in `spoke` sent a
    /// message in this batch and get an answer whenever they have not yet heard the document's
    /// current heads on this connection (their acknowledgement; `PeerSession::reply`): a
    /// receiver's acknowledgement of the change just sent to it is not answered. Unless the
    /// document's heads `moved`, a peer that did not speak is skipped: its session changes only
    /// by its own messages, so whatever Automerge could say to it has been said already, and
    /// building the message to find that out walks the change graph, once per peer for every
    /// receiver's acknowledgement (a fifth of the server's CPU per change at K = 16).
    fn fan_out(&mut self, spoke: &HashSet<u64>, moved: bool) {
        let Some(Some(live)) = &self.state else { return };
        let doc = self.doc;
        // Receivers that were in step share one message (see `SharedMessages`).
        let mut shared = SharedMessages::default();
        self.peers.retain(|peer_id, peer| {
            if !spoke.contains(peer_id) && !moved {
                return true;
            }
            // A peer's session state came from its messages: contain a panic in Automerge while
            // answering it (such as the divide by zero a crafted Bloom filter once caused) to
            // that peer.
            let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if spoke.contains(peer_id) {
                    peer.session.reply(live.history.doc())
                } else {
                    shared.generate(&mut peer.session, live.history.doc())
                }
            }));
            if spoke.contains(peer_id) && peer.session.peer_has_everything(live.history.doc()) {
                // Its message named every head of the durable document.
                peer.link.held.record(doc, live.seq);
            }
            let message = match made {
                Ok(Some(message)) => message,
                Ok(None) => {
                    peer.permits.clear(); // Nothing to answer: its messages are done with.
                    return true;
                }
                Err(_) => {
                    tracing::error!(doc = %doc.short(), peer = peer_id,
                        "automerge panicked generating a sync message");
                    peer.send(doc, error_frame(&doc, &ApiError::Internal));
                    return false;
                }
            };
            let frame = pb::ServerFrame {
                frame: Some(pb::server_frame::Frame::Sync(pb::DocSync {
                    doc_id: doc.as_bytes().to_vec(),
                    message,
                    create: None,
                    seq: live.seq.0,
                    more: false,
                })),
            };
            match peer.send(doc, Box::new(frame)) {
                Sent::Queued => {
                    tracing::debug!(peer = peer_id, doc = %doc.short(), seq = live.seq.0,
                        "frame out");
                    true
                }
                Sent::Behind => {
                    tracing::debug!(doc = %doc.short(), peer = peer_id,
                        "device's queue full; it is spoken to again once it reads");
                    true
                }
                Sent::Gone => false,
            }
        });
    }

    async fn maybe_compact(&mut self) {
        let Some(Some(live)) = &mut self.state else { return };
        let Some(compaction) = live.history.take_compaction() else { return };
        // The size counted every chunk written; the document now holds the snapshot alone,
        // usually far smaller (10,000 one-key changes: about 1 MB of chunks, an 18 KB snapshot).
        // Recount it with the compaction, and give the difference back to the customer's quota.
        let stored = compaction.snapshot.bytes.len() as u64;
        let recounted =
            (stored < live.meta.size).then(|| DocMeta { size: stored, ..live.meta.clone() });
        let write = Write::Compact {
            customer: self.customer,
            doc: self.doc,
            snapshot: Snapshot {
                id: compaction.snapshot.id,
                bytes: compaction.snapshot.bytes.clone(),
            },
            replaces: compaction.replaces.clone(),
            meta: recounted.as_ref().map(DocMeta::encode),
        };
        let ctx = &self.registry.ctx;
        if let Err(err) = ctx.commit.commit(write).await {
            tracing::warn!(doc = %self.doc.short(), %err, "compaction failed; will retry");
            live.history.compaction_lost();
            return;
        }
        live.history.compacted(&compaction);
        if let Some(meta) = recounted {
            ctx.quotas.release(&self.customer, live.meta.size - stored);
            live.meta = meta;
        }
    }

    fn refuse_all(&self, batch: Vec<DocMsg>, err: &ApiError) {
        for msg in batch {
            match msg {
                DocMsg::Sync { link, permit, .. } => {
                    link.send(self.doc, error_frame(&self.doc, err), vec![permit]);
                }
                DocMsg::Resume { link, .. } => {
                    link.send(self.doc, error_frame(&self.doc, err), Vec::new());
                }
                DocMsg::Leave { .. } | DocMsg::Push { .. } => {}
                DocMsg::Create { reply, .. } => Deferred::Info(reply).fail(err),
                DocMsg::SetPrivate { reply, .. } => Deferred::Info(reply).fail(err),
                DocMsg::Read { reply, .. } | DocMsg::Edit { reply, .. } => {
                    Deferred::Read(reply).fail(err);
                }
                DocMsg::Delete { reply } => Deferred::Delete(reply).fail(err),
                DocMsg::Evict | DocMsg::Refresh => {}
            }
        }
    }
}
