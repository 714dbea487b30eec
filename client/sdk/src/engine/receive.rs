//! What the engine does with each frame the server sends on a connection: sync messages,
//! announcements, refusals and deletions, and what it owes and reports after each.

use cubby_core::{DocId, DocMeta};
use cubby_proto::pb;
use cubby_store::Space;
use tokio::time::Instant;

use super::{
    CURSOR, FIRST_BACKOFF, MAX_BACKOFF, Refusal, Session, SyncFailure, SyncStatus, WARM_DOCS,
};
use crate::LOCAL;
use crate::doc::{DocEvent, Received};

impl<'a> Session<'a> {
    pub(super) async fn on_frame(&mut self, frame: pb::ServerFrame) -> Result<(), SyncFailure> {
        match frame.frame {
            Some(pb::server_frame::Frame::Sync(part)) => {
                let whole = self.parts.push(part).map_err(|e| SyncFailure::Other(e.to_string()))?;
                let Some(sync) = whole else { return Ok(()) };
                self.on_sync(sync).await?;
            }
            Some(pb::server_frame::Frame::Changed(changed)) => self.on_changed(changed).await?,
            Some(pb::server_frame::Frame::CaughtUp(caught_up)) => {
                self.announced = self.announced.max(caught_up.cursor);
                self.caught_up = true;
                // Deleted meanwhile ones are gone from the device (and their marks with them).
                for doc in std::mem::take(&mut self.healing) {
                    if self.owed.contains(&doc) {
                        self.heal.insert(doc);
                        self.unknown.remove(&doc);
                        self.window.wait(doc, 0);
                    }
                }
                // A deletion is announced shortly after `CaughtUp`, whenever `NOT_FOUND` came.
                let now = Instant::now();
                self.unknown.values_mut().for_each(|at| *at = now);
            }
            Some(pb::server_frame::Frame::Error(error)) => self.on_error(error).await?,
            Some(pb::server_frame::Frame::Challenge(_)) => {
                return Err(SyncFailure::Other("the server sent a second challenge".into()));
            }
            // Taken by `serve`, which fetches the token.
            Some(pb::server_frame::Frame::TokenExpiring(_)) => {}
            None => {}
        }
        self.ask_waiting().await?;
        self.advance_cursor().await?;
        self.report();
        Ok(())
    }

    /// Syncs waiting documents while fewer than [`MAX_ASKING`] are in an exchange and those
    /// asked for hold fewer than [`MAX_ASKING_BYTES`].
    pub(super) async fn ask_waiting(&mut self) -> Result<(), SyncFailure> {
        loop {
            let active = &self.active;
            let next = self.window.next(active.len(), &self.owed, |id| active.contains_key(id));
            let Some((id, size)) = next else { break };
            self.push(id).await?;
            // A document edited offline is weighed by its local copy, now loaded.
            let local = self.active.get(&id).map_or(0, |d| d.meta().size);
            self.window.asked(id, size.max(local));
        }
        Ok(())
    }

    pub(super) async fn on_sync(&mut self, sync: pb::DocSync) -> Result<(), SyncFailure> {
        let Ok(id) = DocId::from_slice(&sync.doc_id) else { return Ok(()) };
        self.unknown.remove(&id);
        self.heal.remove(&id);
        let shared = self.doc(id).await?;
        let Some(received) = shared.receive(&sync.message) else { return Ok(()) };
        let Received { stored, reply, holds, server_has_all, changed, settled } = received;
        // The server holds these changes durably: show them now, store them right after, and
        // leave the flush to the store's next one (see `LocalWrite::apply_unflushed`).
        if changed {
            shared.emit(DocEvent::Remote);
            let _ = self.inner.events.send((id, DocEvent::Remote));
        }
        // The reply goes before the local write is awaited: it says what the device holds in
        // memory, which the server may store before this device does.
        let replied = reply.is_some();
        if let Some(message) = reply {
            self.send(crate::wire::sync(id, message, None)).await?;
        }
        if stored.done().await.map_err(super::store_failure)? {
            self.synced(&shared);
        }
        tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(), seq = sync.seq,
            holds, server_has_all, changed, settled, reply = replied, "server message");
        if holds {
            let held = self.held.entry(id).or_default();
            *held = (*held).max(sync.seq);
            let held = *held;
            self.owed.held(id, held);
        }
        if server_has_all {
            self.owed.acknowledged(id);
            self.refused.remove(&id);
        }
        if settled {
            self.release(id);
        }
        Ok(())
    }

    pub(super) async fn on_changed(&mut self, changed: pb::DocChanged) -> Result<(), SyncFailure> {
        let Ok(id) = DocId::from_slice(&changed.doc_id) else { return Ok(()) };
        self.announced = self.announced.max(changed.seq);
        if changed.deleted {
            return self.deleted(id).await;
        }
        let meta = changed.info.as_ref().map(cubby_proto::doc_meta).unwrap_or_default();
        let stored = self.blocking(move |store| store.doc_meta(&LOCAL, &id)).await?;
        let known = stored.is_some();
        // A document made private or public, from this device or another: its contents may be
        // held already (see `held`), its metadata is news.
        let differs =
            |stored: DocMeta| stored.title != meta.title || stored.private != meta.private;
        if changed.info.is_some()
            && stored.is_some_and(|(_, stored)| DocMeta::decode(&stored).is_ok_and(differs))
            && let Err(err) = self.inner.take_server_meta(id, meta.clone(), changed.seq).await
        {
            tracing::warn!(doc = %id.short(), %err, "cannot update local document metadata");
        }
        if self.held.get(&id).is_some_and(|held| *held >= changed.seq) {
            return Ok(());
        }
        self.owed.announced(changed.seq, id);
        if !known {
            // The app sees the document at once; its copy loads (empty) when it is asked for,
            // or when the app opens it, whichever comes first (`Inner::doc` keeps it one copy).
            let encoded = meta.encode();
            // No flush: until its changes arrive the record says only that the document exists,
            // and every write of those changes carries the metadata again. Lost in a crash, it
            // is announced again, since the cursor cannot pass a change the device lacks. A
            // flush each cost a fresh device's sync of 4,000 documents a tenth of its time.
            self.blocking(move |store| {
                if store.doc_meta(&LOCAL, &id)?.is_none() {
                    store.write_doc_off_feed(&LOCAL, &id, &encoded, None)?;
                }
                Ok(())
            })
            .await?;
        }
        if changed.pushed {
            // The server sends what changed right behind this (it kept this device's sync
            // state); the device answers that. Should it not come, the document stays owed and
            // is asked for once it stalls.
            return Ok(());
        }
        if self.active.contains_key(&id) {
            return self.push(id).await;
        }
        // Asked for after this frame if there is room (`on_frame`); announced twice while
        // waiting, it is asked for once (see `ask_waiting`).
        let size = changed.info.as_ref().map_or(0, |info| info.size);
        self.window.wait(id, size);
        Ok(())
    }

    pub(super) async fn on_error(&mut self, error: pb::DocError) -> Result<(), SyncFailure> {
        let Ok(id) = DocId::from_slice(&error.doc_id) else {
            return Err(SyncFailure::Other(error.message));
        };
        if let Some(shared) = self.active.get(&id) {
            shared.reset_session();
        }
        match tonic::Code::from_i32(error.code) {
            tonic::Code::NotFound => {
                // Deleted on the server, and then announced deleted right behind; or lost by
                // it (a store put back from a backup without the device noticing). Nothing is
                // deleted here: the document is kept, marked to be offered back, until its
                // deletion is announced (see `unknown`).
                self.active.remove(&id);
                let held = self
                    .blocking(move |store| {
                        // Gone from the device already: its deletion came first.
                        if store.doc_meta(&LOCAL, &id)?.is_none() {
                            return Ok(false);
                        }
                        store.put_record(&LOCAL, Space::HEAL, id.as_bytes(), &[])?;
                        Ok(true)
                    })
                    .await?;
                if held {
                    tracing::warn!(doc = %id.short(), "the server does not have this document");
                    self.owed.unsynced(id);
                    self.unknown.entry(id).or_insert_with(Instant::now);
                }
                Ok(())
            }
            code => {
                let failure = SyncFailure::Other(format!(
                    "document {}: {code:?}: {}",
                    id.short(),
                    error.message
                ));
                if code != tonic::Code::ResourceExhausted {
                    return Err(failure);
                }
                // A limit of the customer's: the connection, and every other document on it,
                // carry on. The changes stay marked unsynced and are offered again after a pause;
                // the document leaves the exchange meanwhile, so that it holds no place others
                // could use.
                let pause =
                    self.refused.get(&id).map_or(FIRST_BACKOFF, |r| (r.pause * 2).min(MAX_BACKOFF));
                tracing::warn!(device = %self.inner.device_id.short(), doc = %id.short(),
                    ?pause, %failure, "changes refused; offering them again after a pause");
                self.refused
                    .insert(id, Refusal { retry_at: Some(Instant::now() + pause), pause, failure });
                self.active.remove(&id);
                Ok(())
            }
        }
    }

    /// A document deleted on the server: it leaves this connection, and its local copy goes
    /// too (`Inner::delete_local`).
    pub(super) async fn deleted(&mut self, id: DocId) -> Result<(), SyncFailure> {
        self.active.remove(&id);
        self.warm.retain(|(_, kept)| kept.id != id);
        self.owed.forget(id);
        self.refused.remove(&id);
        self.unknown.remove(&id);
        self.heal.remove(&id);
        self.inner.delete_local(id).await.map_err(super::store_failure)?;
        Ok(())
    }

    /// Offers again the refused documents whose pause is over, taking their turn with the others.
    pub(super) async fn offer_refused_again(&mut self) -> Result<(), SyncFailure> {
        let now = Instant::now();
        for (id, refusal) in &mut self.refused {
            if refusal.retry_at.is_some_and(|at| at <= now) {
                refusal.retry_at = None;
                self.window.wait_first(*id);
            }
        }
        self.ask_waiting().await
    }

    /// Drops a settled document from the session once nothing is owed for it, keeping it
    /// loaded a while among the [`WARM_DOCS`] settled last.
    pub(super) fn release(&mut self, id: DocId) {
        if self.owed.contains(&id) {
            return;
        }
        if let Some(shared) = self.active.remove(&id) {
            self.warm.retain(|(_, kept)| kept.id != id);
            if self.warm.len() == WARM_DOCS {
                self.warm.remove(0);
            }
            self.warm.push((Instant::now(), shared));
        }
    }

    pub(super) async fn advance_cursor(&mut self) -> Result<(), SyncFailure> {
        if let Some(candidate) =
            super::next_cursor(self.cursor, self.caught_up, &self.owed, self.announced)
        {
            self.cursor = candidate;
            self.blocking(move |store| {
                store.put_record(&LOCAL, Space::LOCAL, CURSOR, &candidate.to_be_bytes())
            })
            .await?;
        }
        Ok(())
    }

    pub(super) fn report(&mut self) {
        // A refusal lasts until nothing of the document is owed any more (however that came
        // about); the one kept longest (the pause grows with each) speaks for all.
        let owed = &self.owed;
        self.refused.retain(|id, _| owed.contains(id));
        let refusal = self.refused.values().max_by_key(|r| r.pause);
        let status = if let Some(refusal) = refusal {
            let mut documents: Vec<DocId> = self.refused.keys().copied().collect();
            documents.sort();
            SyncStatus::Refused { failure: refusal.failure.clone(), documents }
        } else if self.caught_up && self.owed.is_empty() {
            self.owed.new_round();
            self.reached_up_to_date = true;
            SyncStatus::UpToDate
        } else {
            let (done, total) = self.owed.progress();
            SyncStatus::Syncing { done, total }
        };
        self.inner.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}
