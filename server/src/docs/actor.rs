//! The executor of one document: it feeds the batches of its mailbox to a
//! [`Document`], does the I/O it needs (loading, quotas, the commit, a large message applied on
//! a thread, a device's kept session), and sends what it decides.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};

use automerge::Automerge;
use cubby_core::document::{Answer, Document, Live, Offer, Persist, Refusal};
use cubby_core::history::History;
use cubby_core::session::{PeerSession, SyncError};
use cubby_core::{CustomerId, DeviceId, DocId, DocMeta};
use cubby_proto::ApiError;
use cubby_store::{Snapshot, Space};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{Ctx, DocMsg, Entry, Key, Link, Registry, Sent, Summary, session_key};
use crate::durable::{Write, api_error};
use crate::frames::ToDevice;
use crate::hub::Announcement;

/// Sync messages up to this size are applied on the actor's task; larger ones (a long offline
/// history) on the blocking pool, under `apply_deadline_ms`.
const INLINE_APPLY_BYTES: usize = 64 << 10;

const MAX_BATCH: usize = 256;

/// What the actor holds of one connected device's stream.
struct PeerLink {
    link: Link,
    /// The permits of the device's messages in this batch, given back with the answer.
    permits: Vec<OwnedSemaphorePermit>,
}

pub(super) struct Actor {
    customer: CustomerId,
    doc: DocId,
    generation: u64,
    registry: Arc<Registry>,
    /// `None`: not loaded yet.
    state: Option<Document<u64>>,
    links: HashMap<u64, PeerLink>,
    /// The customer was erased: stop.
    evicted: bool,
}

/// Answers owed once the batch is durable.
enum Deferred {
    Info(oneshot::Sender<Result<Summary, ApiError>>),
    Read(oneshot::Sender<Result<(Summary, serde_json::Value), ApiError>>),
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

/// A sync message that took longer than `apply_deadline_ms` to apply.
fn too_slow() -> ApiError {
    ApiError::ResourceExhausted("this change took too long to apply".into())
}

fn private_refusal() -> ApiError {
    ApiError::PermissionDenied("the customer made this document private".into())
}

/// The API error a refused sync message is answered with.
fn refusal_error(refusal: &Refusal) -> ApiError {
    match refusal {
        Refusal::Malformed => ApiError::InvalidArgument("malformed sync message".into()),
        Refusal::Rejected(_) => ApiError::InvalidArgument("sync message rejected".into()),
        Refusal::Panicked => ApiError::Internal,
    }
}

/// Applies a device's sync message to `doc` (a lent document). Tests panic here, after the
/// changes were applied in memory, to stand for a panic deep inside Automerge.
fn apply(session: &mut PeerSession, doc: &mut Automerge, message: &[u8]) -> Result<(), Refusal> {
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

    fn ctx(&self) -> &Ctx {
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

    /// The document as the store holds it, dropping anything not durable.
    async fn read_stored(&self) -> Result<Option<Live>, ApiError> {
        let (store, customer, doc) = (self.ctx().store.clone(), self.customer, self.doc);
        let policy = self.ctx().policy;
        self.ctx()
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
            .map_err(|_| ApiError::Internal)?
    }

    /// Loads the document from storage (again): every device's session starts over.
    async fn load(&mut self) -> Result<(), ApiError> {
        let live = self.read_stored().await?;
        match &mut self.state {
            Some(document) => document.reloaded(live),
            None => self.state = Some(Document::new(live)),
        }
        Ok(())
    }

    fn document(&mut self) -> &mut Document<u64> {
        self.state.get_or_insert_with(|| Document::new(None))
    }

    fn live(&self) -> Option<&Live> {
        self.state.as_ref().and_then(Document::live)
    }

    /// Sends `message` to `peer`'s device with the permits its messages hold. A device whose
    /// queue is full gets its session started over: the message is dropped, and what it said is
    /// said again once the device reads (`DocMsg::Resume`). One whose stream ended is forgotten.
    fn send(&mut self, peer: u64, message: ToDevice) -> Sent {
        let Some(link) = self.links.get_mut(&peer) else { return Sent::Gone };
        let sent = link.link.send(self.doc, message, std::mem::take(&mut link.permits));
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
        sent
    }

    /// Tells every device syncing the document of `err`, and forgets them all.
    fn refuse_peers(&mut self, err: &ApiError) {
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
        if self.state.is_none() {
            if let Err(err) = self.load().await {
                self.refuse_all(batch, &err);
                return;
            }
        }
        let before = self.live().map(|l| l.history.doc().get_heads());
        // What another node stored goes in first (a later position of this node's own does not
        // mean it has the other's write); every peer then hears of it (`answers`).
        if batch.iter().any(|m| matches!(m, DocMsg::Refresh)) {
            if let Err(err) = self.absorb().await {
                tracing::warn!(doc = %self.doc.short(), %err, "cannot take in another node's write");
            }
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
                        // once the batch is durable (`answer_peers`).
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
                DocMsg::SetPrivate { private, reply } => {
                    let document = self.document();
                    match document.live_mut() {
                        Some(live) => {
                            let changed = live.meta.private != private;
                            live.meta.private = private;
                            if changed {
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
        } else if let Err(err) = self.persist().await {
            // Not durable: forget it, so nobody is told heads that are not on disk. Devices
            // still hold their changes and resend them.
            tracing::warn!(doc = %self.doc.short(), %err, "write failed; reloading document");
            deferred.into_iter().for_each(|d| d.fail(&err));
            self.refuse_peers(&err);
            if self.load().await.is_err() {
                self.state = None;
            }
            return;
        }
        self.answer(deferred).await;
        self.push(pushes);
        let moved = before != self.live().map(|l| l.history.doc().get_heads());
        self.answer_peers(&spoke, moved);
        self.maybe_compact().await;
    }

    /// Joins `peer` to the document unless it is there, with the device's session from its
    /// last connection (`saved` when the caller read it already: a pushed catch-up).
    async fn join(&mut self, peer: u64, device: DeviceId, saved: Option<Vec<u8>>, link: Link) {
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
    async fn apply(&mut self, peer: u64, message: Vec<u8>) -> Option<Result<(), Refusal>> {
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

    /// The device's sync state for this document from its last connection, if kept.
    async fn stored_session(&self, device: DeviceId) -> Option<Vec<u8>> {
        let (store, customer, key) =
            (self.ctx().store.clone(), self.customer, session_key(&self.doc, &device));
        let read = move || store.get_record(&customer, Space::SYNC_STATES, &key);
        self.ctx().work.run(read).await.ok().and_then(Result::ok).flatten()
    }

    /// Keeps a leaving device's sync state. Not flushed: the next group commit carries it, and
    /// losing it costs one larger exchange.
    async fn keep_session(&self, device: DeviceId, session: Vec<u8>) {
        let (store, customer, key) =
            (self.ctx().store.clone(), self.customer, session_key(&self.doc, &device));
        let saved = self
            .ctx()
            .work
            .run(move || store.put_record(&customer, Space::SYNC_STATES, &key, &session))
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
            let told = self.state.as_mut().map(Document::deleted).unwrap_or_default();
            for peer in told {
                self.send(peer, ToDevice::refused(&self.doc, ApiError::NotFound("document")));
            }
            self.links.clear();
            return Ok(());
        };
        let meta = DocMeta::decode(&records.meta).map_err(|_| ApiError::DataLoss("document"))?;
        let Some(live) = self.state.as_mut().and_then(Document::live_mut) else {
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

    /// Applies the business's edits as one change by a fresh business actor: all or nothing.
    fn business_edit(
        &mut self,
        edits: &[(String, cubby_core::json::Edit)],
    ) -> Result<(), ApiError> {
        let live = self.document().live_mut().ok_or(ApiError::NotFound("document"))?;
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

    /// Stores what the batch changed (see [`Document::persist`]) after the customer's quotas
    /// allow it, and waits until it is durable.
    async fn persist(&mut self) -> Result<(), ApiError> {
        let Some(Persist { chunk, meta, metadata }) = self.document().persist() else {
            return Ok(());
        };
        let ctx = self.registry.ctx.clone();
        let chunk_len = chunk.as_ref().map_or(0, |c| c.bytes.len() as u64);
        if chunk.is_some() {
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
            meta: meta.clone(),
            chunk: chunk.map(|part| (part.id, part.bytes)),
            metadata,
        };
        let seq = match ctx.commit.commit(write).await {
            Ok(seq) => seq.or_else(|| self.live().map(|l| l.seq)).unwrap_or_default(),
            Err(err) => {
                ctx.quotas.release(&self.customer, chunk_len);
                return Err(err);
            }
        };
        self.document().persisted(meta, seq);
        Ok(())
    }

    fn summary(&self) -> Option<Summary> {
        self.live().map(|l| Summary { doc: self.doc, meta: l.meta.clone(), seq: l.seq })
    }

    async fn answer(&mut self, deferred: Vec<Deferred>) {
        for d in deferred {
            match d {
                Deferred::Info(reply) => {
                    let _ = reply.send(self.summary().ok_or(ApiError::Internal));
                }
                Deferred::Read(reply) => {
                    let answer = match (self.summary(), self.live()) {
                        (Some(summary), Some(l)) => {
                            Ok((summary, cubby_core::json::to_json(l.history.doc())))
                        }
                        _ => Err(ApiError::NotFound("document")),
                    };
                    let _ = reply.send(answer);
                }
                Deferred::Delete(reply) => {
                    let Some(size) = self.live().map(|l| l.meta.size) else {
                        let _ = reply.send(Err(ApiError::NotFound("document")));
                        continue;
                    };
                    let write = Write::Delete { customer: self.customer, doc: self.doc };
                    match self.registry.ctx.commit.commit(write).await {
                        Ok(_) => {
                            // The commit thread announces the deletion.
                            self.registry.ctx.quotas.release(&self.customer, size);
                            let told = self.document().deleted();
                            for peer in told {
                                let gone = ApiError::NotFound("document");
                                self.send(peer, ToDevice::refused(&self.doc, gone));
                            }
                            self.links.clear();
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
        let Some(seq) = self.live().map(|l| l.seq) else { return };
        for (peer, announcement, queued) in pushes {
            if !self.links.contains_key(&peer) {
                continue;
            }
            let message = self.document().push(&peer);
            tracing::debug!(peer, doc = %self.doc.short(), pushed = message.is_some(),
                "catch-up announced by the document's actor");
            let pushed = message.is_some();
            let mut sent =
                self.send(peer, ToDevice::Changed { announcement, pushed }) == Sent::Queued;
            if let (true, Some(message)) = (sent, message) {
                // A device whose queue is full gets its session started over: it asks itself,
                // after the stream's own announcement.
                sent =
                    self.send(peer, ToDevice::Sync { doc: self.doc, message, seq }) == Sent::Queued;
            }
            let _ = queued.send(sent);
        }
    }

    /// Sends every peer what [`Document::answers`] says for it, and records which hold the
    /// durable document.
    fn answer_peers(&mut self, spoke: &HashSet<u64>, moved: bool) {
        let Some(seq) = self.live().map(|l| l.seq) else { return };
        let answers = self.document().answers(spoke, moved);
        for (peer, answer, holds) in answers {
            if holds {
                if let Some(link) = self.links.get(&peer) {
                    link.link.held.record(self.doc, seq);
                }
            }
            match answer {
                Answer::Message(message) => {
                    if self.send(peer, ToDevice::Sync { doc: self.doc, message, seq })
                        == Sent::Queued
                    {
                        tracing::debug!(peer, doc = %self.doc.short(), seq = seq.0, "frame out");
                    }
                }
                Answer::Nothing => {
                    if let Some(link) = self.links.get_mut(&peer) {
                        link.permits.clear(); // Its messages are done with.
                    }
                }
                Answer::Failed => {
                    tracing::error!(doc = %self.doc.short(), peer,
                        "automerge panicked generating a sync message");
                    self.send(peer, ToDevice::refused(&self.doc, ApiError::Internal));
                    self.links.remove(&peer);
                }
            }
        }
    }

    async fn maybe_compact(&mut self) {
        let Some(live) = self.state.as_mut().and_then(Document::live_mut) else { return };
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
            meta: recounted.clone(),
        };
        let ctx = self.registry.ctx.clone();
        let committed = ctx.commit.commit(write).await;
        let Some(live) = self.state.as_mut().and_then(Document::live_mut) else { return };
        if let Err(err) = committed {
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
                    link.send(self.doc, ToDevice::refused(&self.doc, err.clone()), vec![permit]);
                }
                DocMsg::Resume { link, .. } => {
                    link.send(self.doc, ToDevice::refused(&self.doc, err.clone()), Vec::new());
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
