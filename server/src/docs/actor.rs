//! The executor of one document: it feeds the batches of its mailbox to a
//! [`Document`], does the I/O it needs (loading, quotas, the commit, a large message applied on
//! a thread, a device's kept session), and sends what it decides.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};

use cubby_core::document::{Document, Live, Offer, Refusal};
use cubby_core::history::History;
use cubby_core::lazy::{ContentError, LazyDoc};
use cubby_core::session::{PeerSession, SyncError};
use cubby_core::{CustomerId, DeviceId, DocId, DocMeta};
use cubby_proto::ApiError;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{Ctx, DocMsg, Entry, Key, Link, Registry, Release, Sent, Summary};
use crate::frames::ToDevice;

/// Sync messages up to this size are applied on the actor's task; larger ones (a long offline
/// history) on the blocking pool, under `apply_deadline_ms`.
const INLINE_APPLY_BYTES: usize = 64 << 10;

const MAX_BATCH: usize = 256;

/// What the actor holds of one connected device's stream.
pub(super) struct PeerLink {
    pub(super) link: Link,
    /// The permits of the device's messages in this batch, given back with the answer.
    pub(super) permits: Vec<OwnedSemaphorePermit>,
}

pub(super) struct Actor {
    pub(super) customer: CustomerId,
    pub(super) doc: DocId,
    pub(super) generation: u64,
    pub(super) registry: Arc<Registry>,
    /// `None`: not loaded yet.
    pub(super) state: Option<Document<u64>>,
    pub(super) links: HashMap<u64, PeerLink>,
    /// The customer was erased: stop.
    pub(super) evicted: bool,
}

/// Answers owed once the batch is durable.
pub(super) enum Deferred {
    Info(oneshot::Sender<Result<Summary, ApiError>>),
    Read(oneshot::Sender<Result<(Summary, serde_json::Value), ApiError>>),
    Delete(oneshot::Sender<Result<(), ApiError>>),
}

impl Deferred {
    /// Answers with `err`. The asker may have gone; that is fine.
    pub(super) fn fail(self, err: &ApiError) {
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

/// A sync message that took longer than `apply_deadline_ms` to apply.
fn too_slow() -> ApiError {
    ApiError::ResourceExhausted("this change took too long to apply".into())
}

fn private_refusal() -> ApiError {
    ApiError::PermissionDenied("the customer made this document private".into())
}

/// The document's content cannot be brought up to date for a business read or write.
pub(super) fn content_error(doc: &DocId, err: &ContentError) -> ApiError {
    tracing::error!(doc = %doc.short(), %err, "document content refused");
    ApiError::FailedPrecondition(
        "this document's content cannot be read: Automerge refuses a change in its history".into(),
    )
}

/// The API error a refused sync message is answered with.
fn refusal_error(refusal: &Refusal) -> ApiError {
    match refusal {
        Refusal::Malformed => ApiError::InvalidArgument("malformed sync message".into()),
        Refusal::Rejected(_) => ApiError::InvalidArgument("sync message rejected".into()),
        Refusal::Panicked => ApiError::Internal,
    }
}

/// Takes a device's sync message into `doc` (a lent document). Tests panic here, after the
/// changes were taken in, to stand for a panic while taking them in.
fn apply(session: &mut PeerSession, doc: &mut LazyDoc, message: &[u8]) -> Result<(), Refusal> {
    let received = session.receive(doc, message);
    fail::fail_point!("doc-after-apply");
    match received {
        Ok(_) => Ok(()),
        Err(SyncError::Malformed) => Err(Refusal::Malformed),
        Err(err) => Err(Refusal::Rejected(err)),
    }
}

impl Actor {
    pub(super) fn new(
        customer: CustomerId,
        doc: DocId,
        generation: u64,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            customer,
            doc,
            generation,
            registry,
            state: None,
            links: HashMap::new(),
            evicted: false,
        }
    }

    pub(super) fn ctx(&self) -> &Ctx {
        &self.registry.ctx
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<DocMsg>) {
        let idle = self.ctx().idle;
        let stop = self.ctx().stop.clone();
        loop {
            let first = tokio::select! {
                msg = rx.recv() => msg,
                () = tokio::time::sleep(idle), if self.links.is_empty() => {
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
    pub(super) fn retire(&self, rx: &mpsc::UnboundedReceiver<DocMsg>) -> bool {
        let mut guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        if !rx.is_empty() {
            return false;
        }
        self.unregister(&mut guard.1);
        true
    }

    /// Leaves the registry unconditionally (shutdown).
    pub(super) fn retire_now(&self) {
        let mut guard = self.registry.actors.lock().unwrap_or_else(PoisonError::into_inner);
        self.unregister(&mut guard.1);
    }

    /// Removes this actor's entry, unless a newer actor for the document has replaced it.
    pub(super) fn unregister(&self, actors: &mut HashMap<Key, Entry>) {
        let key = (self.customer, self.doc);
        if actors.get(&key).is_some_and(|e| e.generation == self.generation) {
            actors.remove(&key);
        }
    }

    pub(super) fn document(&mut self) -> &mut Document<u64> {
        self.state.get_or_insert_with(|| Document::new(None))
    }

    pub(super) fn live(&self) -> Option<&Live> {
        self.state.as_ref().and_then(Document::live)
    }

    /// Sends `message` to `peer`'s device with the permits its messages hold. A device whose
    /// queue is full gets its session started over: the message is dropped, and what it said is
    /// said again once the device reads (`DocMsg::Resume`). One whose stream ended is forgotten.
    pub(super) fn send(&mut self, peer: u64, message: ToDevice) -> Sent {
        let Some(link) = self.links.get_mut(&peer) else { return Sent::Gone };
        let sent = link.link.send(self.doc, message, std::mem::take(&mut link.permits));
        self.not_sent(peer, sent);
        sent
    }

    /// A message to `peer` was not queued (`sent`): its queue was full, or its stream ended.
    pub(super) fn not_sent(&mut self, peer: u64, sent: Sent) {
        match sent {
            Sent::Queued => {}
            Sent::Behind => {
                tracing::debug!(doc = %self.doc.short(), peer,
                    "device's queue full; it is spoken to again once it reads");
                self.document().behind(&peer);
            }
            Sent::Gone => {
                self.links.remove(&peer);
                if let Some(document) = &mut self.state {
                    document.leave(&peer);
                }
            }
        }
    }

    /// Tells every device syncing the document of `err`, and forgets them all.
    pub(super) fn refuse_peers(&mut self, err: &ApiError) {
        let peers = self.state.as_mut().map(Document::drop_peers).unwrap_or_default();
        for peer in peers {
            self.send(peer, ToDevice::refused(&self.doc, err.clone()));
        }
        self.links.clear();
    }

    pub(super) async fn handle(&mut self, batch: Vec<DocMsg>) {
        if batch.iter().any(|m| matches!(m, DocMsg::Evict)) {
            self.refuse_all(batch, &ApiError::AccountErased);
            self.refuse_peers(&ApiError::AccountErased);
            self.state = None;
            self.evicted = true;
            return;
        }
        if self.state.is_none()
            && let Err(err) = self.load().await
        {
            self.refuse_all(batch, &err);
            return;
        }
        let before = self.live().map(|l| l.history.doc().heads());
        // What another node stored goes in first (a later position of this node's own does not
        // mean it has the other's write); every peer then hears of it (`answers`).
        if batch.iter().any(|m| matches!(m, DocMsg::Refresh))
            && let Err(err) = self.absorb().await
        {
            tracing::warn!(doc = %self.doc.short(), %err, "cannot take in another node's write");
        }
        let mut spoke = HashSet::new();
        let mut poisoned = false;
        let mut deferred = Vec::new();
        let mut pushes = Vec::new();
        let mut batch = batch.into_iter();
        while let Some(msg) = batch.next() {
            match msg {
                DocMsg::Sync { peer, device, link, message, create, permit } => {
                    spoke.insert(peer);
                    let policy = self.ctx().policy;
                    if self.document().offer(create, || History::new(policy)) == Offer::Unknown {
                        let refusal = ToDevice::refused(&self.doc, ApiError::NotFound("document"));
                        link.send(self.doc, refusal, vec![permit]);
                        continue;
                    }
                    self.join(peer, device, None, link).await;
                    if let Some(link) = self.links.get_mut(&peer) {
                        // The answer carries the permit back: with a refusal, or with the reply
                        // once the batch is durable (`answer_peers`, `Release`).
                        link.permits.push(permit);
                    }
                    let applied = match self.apply(peer, message).await {
                        Some(applied) => applied,
                        None => {
                            // The document went with the thread (the peers stay): refuse the
                            // rest of the batch, and start again from what is durable. The
                            // device's own later messages build on the refused one: they are
                            // refused for the same reason.
                            poisoned = true;
                            let (rest, others): (Vec<_>, Vec<_>) = batch.partition(
                                |m| matches!(m, DocMsg::Sync { peer: p, .. } if *p == peer),
                            );
                            self.refuse_all(rest, &too_slow());
                            let busy = ApiError::Unavailable("document busy; retry".into());
                            self.refuse_all(others, &busy);
                            break;
                        }
                    };
                    if let Err(refusal) = applied {
                        match &refusal {
                            Refusal::Panicked => {
                                tracing::error!(doc = %self.doc.short(),
                                    "automerge panicked on a sync message");
                                poisoned = true;
                            }
                            other => tracing::debug!(doc = %self.doc.short(), %other,
                                "sync message refused"),
                        }
                        self.send(peer, ToDevice::refused(&self.doc, refusal_error(&refusal)));
                    }
                }
                DocMsg::Push { peer, device, saved, link, announcement, queued } => {
                    if self.live().is_none() {
                        continue; // Deleted meanwhile: the stream announces it as it was.
                    }
                    self.join(peer, device, Some(saved), link).await;
                    pushes.push((peer, announcement, queued));
                }
                DocMsg::Resume { peer, link } => {
                    // Spoken to like a device that just spoke: its session started over. One
                    // that left is not here; nor is one whose document does not exist, and
                    // the frame it had no room for said so: say it again.
                    if self.links.contains_key(&peer) {
                        spoke.insert(peer);
                    } else if self.live().is_none() {
                        let gone = ToDevice::refused(&self.doc, ApiError::NotFound("document"));
                        link.send(self.doc, gone, Vec::new());
                    }
                }
                DocMsg::Leave { peer } => {
                    self.links.remove(&peer);
                    if let Some((device, Some(kept))) = self.document().leave(&peer) {
                        self.keep_session(device, kept).await;
                    }
                }
                DocMsg::Create { title, reply } => {
                    let history = History::new(self.ctx().policy);
                    if self.document().create(DocMeta::new(title), history) {
                        deferred.push(Deferred::Info(reply));
                    } else {
                        let exists = ApiError::InvalidArgument("document already exists".into());
                        let _ = reply.send(Err(exists));
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
                DocMsg::SetMeta { title, private, reply } => {
                    let document = self.document();
                    match document.live_mut() {
                        Some(live) => {
                            let before = (live.meta.title.clone(), live.meta.private);
                            if let Some(title) = title {
                                live.meta.title = title;
                            }
                            live.meta.private = private.unwrap_or(live.meta.private);
                            if before != (live.meta.title.clone(), live.meta.private) {
                                document.touch();
                            }
                            deferred.push(Deferred::Info(reply));
                        }
                        None => {
                            let _ = reply.send(Err(ApiError::NotFound("document")));
                        }
                    }
                }
                DocMsg::Delete { reply } => deferred.push(Deferred::Delete(reply)),
                DocMsg::Refresh => {} // Taken in above.
                DocMsg::Evict => unreachable!("handled before the batch"),
            }
        }
        let mut prepared = None;
        if poisoned {
            // The document may be half-applied: go back to what is durable.
            if let Err(err) = self.load().await {
                // Nothing half-applied is kept, or the next batch would write it.
                deferred.into_iter().for_each(|d| d.fail(&err));
                // The devices' answers carry their permits back: each hears of the failure.
                self.refuse_peers(&err);
                self.state = None;
                return;
            }
        } else {
            match self.prepare_write().await {
                Ok(write) => prepared = write,
                Err(err) => return self.write_failed(&err, deferred).await,
            }
        }
        // Every answer is decided now, and leaves once the batch is durable.
        let at = self.live().map(|l| l.seq).unwrap_or_default();
        let mut release = Release::new(self.doc, at);
        let pushed = self.push(pushes, &mut release);
        let moved = before != self.live().map(|l| l.history.doc().heads());
        self.answer_peers(&spoke, moved, &mut release);
        let undelivered = match prepared {
            None => release.send(None),
            Some(prepared) => match self.commit(prepared, release).await {
                Ok(undelivered) => undelivered,
                Err(err) => return self.write_failed(&err, deferred).await,
            },
        };
        self.delivered(&undelivered, pushed);
        self.answer(deferred).await;
        self.maybe_compact().await;
    }

    /// The batch's write failed: nothing of it is told. The document is forgotten, so nobody
    /// is told heads that are not on disk; devices still hold their changes and resend them.
    async fn write_failed(&mut self, err: &ApiError, deferred: Vec<Deferred>) {
        tracing::warn!(doc = %self.doc.short(), %err, "write failed; reloading document");
        deferred.into_iter().for_each(|d| d.fail(err));
        self.refuse_peers(err);
        if self.load().await.is_err() {
            self.state = None;
        }
    }

    /// Joins `peer` to the document unless it is there, with the device's session from its
    /// last connection (`saved` when the caller read it already: a pushed catch-up).
    pub(super) async fn join(
        &mut self,
        peer: u64,
        device: DeviceId,
        saved: Option<Vec<u8>>,
        link: Link,
    ) {
        if self.links.contains_key(&peer) {
            return;
        }
        let saved = match saved {
            Some(saved) => Some(saved),
            None if self.live().is_some() && !self.document().lends_session(device) => {
                self.stored_session(device).await
            }
            None => None,
        };
        let document = self.document();
        let session = document.session_for(device, saved.as_deref());
        document.join(peer, device, session);
        self.links.insert(peer, PeerLink { link, permits: Vec::new() });
    }

    /// Applies `peer`'s message: a large one on the blocking pool, under `apply_deadline_ms`.
    /// `None` when it did not finish in time: the document stays with the thread (Automerge
    /// cannot be interrupted), and the caller reloads it.
    pub(super) async fn apply(
        &mut self,
        peer: u64,
        message: Vec<u8>,
    ) -> Option<Result<(), Refusal>> {
        let started = std::time::Instant::now();
        let applied = self.apply_timed(peer, message).await;
        self.ctx().metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        applied
    }

    async fn apply_timed(&mut self, peer: u64, message: Vec<u8>) -> Option<Result<(), Refusal>> {
        let off_thread = message.len() > INLINE_APPLY_BYTES
            && self.ctx().work == crate::StorageWork::BlockingPool;
        if !off_thread {
            let Some(document) = &mut self.state else { return Some(Ok(())) };
            let Some((mut doc, mut session)) = document.lend(&peer) else { return Some(Ok(())) };
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply(&mut session, &mut doc, &message)
            }))
            .unwrap_or(Err(Refusal::Panicked));
            document.returned(&peer, doc, session);
            return Some(applied);
        }
        let deadline = self.ctx().apply_deadline;
        let (mut doc, mut session) = self.state.as_mut()?.lend(&peer)?;
        let work = tokio::task::spawn_blocking(move || {
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply(&mut session, &mut doc, &message)
            }))
            .unwrap_or(Err(Refusal::Panicked));
            (doc, session, applied)
        });
        match tokio::time::timeout(deadline, work).await {
            Ok(Ok((doc, session, applied))) => {
                if let Some(document) = &mut self.state {
                    document.returned(&peer, doc, session);
                }
                Some(applied)
            }
            // The closure catches panics; a join error means the runtime is shutting down.
            Ok(Err(_)) => Some(Err(Refusal::Panicked)),
            Err(_) => {
                tracing::warn!(doc = %self.doc.short(), ?deadline,
                    "a sync message took too long to apply; refused");
                self.ctx().quotas.penalize(&self.customer, 10.0);
                self.send(peer, ToDevice::refused(&self.doc, too_slow()));
                None
            }
        }
    }

    /// Applies the business's edits as one change by a fresh business actor: all or nothing.
    pub(super) fn business_edit(
        &mut self,
        edits: &[(String, cubby_core::json::Edit)],
    ) -> Result<(), ApiError> {
        let live = self.document().live_mut().ok_or(ApiError::NotFound("document"))?;
        if live.meta.private {
            return Err(private_refusal());
        }
        // "business" and 8 random bytes: the change is visibly the business's in the history.
        let actor = [b"business".as_slice(), &cubby_crypto::random_array::<8>()].concat();
        let edited = live.history.doc_mut().edit(|doc| {
            doc.set_actor(automerge::ActorId::from(actor));
            let result = doc.transact::<_, _, cubby_core::json::EditError>(|tx| {
                for (path, edit) in edits {
                    cubby_core::json::apply_edit(tx, path, edit)?;
                }
                Ok(())
            });
            doc.set_actor(automerge::ActorId::random());
            result.map(drop).map_err(|failure| failure.error.to_string())
        });
        match edited {
            Ok(result) => result.map_err(ApiError::InvalidArgument),
            Err(err) => Err(content_error(&self.doc, &err)),
        }
    }

    pub(super) fn refuse_all(&self, batch: Vec<DocMsg>, err: &ApiError) {
        for msg in batch {
            match msg {
                DocMsg::Sync { link, permit, .. } => {
                    link.send(self.doc, ToDevice::refused(&self.doc, err.clone()), vec![permit]);
                }
                DocMsg::Resume { link, .. } => {
                    link.send(self.doc, ToDevice::refused(&self.doc, err.clone()), Vec::new());
                }
                DocMsg::Leave { .. } | DocMsg::Push { .. } => {}
                DocMsg::Create { reply, .. } => Deferred::Info(reply).fail(err),
                DocMsg::SetMeta { reply, .. } => Deferred::Info(reply).fail(err),
                DocMsg::Read { reply, .. } | DocMsg::Edit { reply, .. } => {
                    Deferred::Read(reply).fail(err);
                }
                DocMsg::Delete { reply } => Deferred::Delete(reply).fail(err),
                DocMsg::Evict | DocMsg::Refresh => {}
            }
        }
    }
}
