//! What a document actor reads from and writes to the store: the document as stored, a
//! device's kept session, another node's writes taken in, a batch made durable, compaction.

use cubby_core::document::{Document, Live, Persist};
use cubby_core::history::History;
use cubby_core::{DeviceId, DocMeta};
use cubby_proto::ApiError;
use cubby_store::Space;

use super::actor::Actor;
use super::{Release, Undelivered, session_key};
use crate::durable::{Write, api_error};
use crate::frames::ToDevice;

/// A batch's write, its quota reserved.
pub(super) struct Prepared {
    write: Write,
    meta: DocMeta,
    /// The bytes reserved for its chunk.
    chunk_len: u64,
}

impl Actor {
    /// The document as the store holds it, dropping anything not durable.
    pub(super) async fn read_stored(&self) -> Result<Option<Live>, ApiError> {
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
    pub(super) async fn load(&mut self) -> Result<(), ApiError> {
        let live = self.read_stored().await?;
        match &mut self.state {
            Some(document) => document.reloaded(live),
            None => self.state = Some(Document::new(live)),
        }
        Ok(())
    }

    /// The device's sync state for this document from its last connection, if kept.
    pub(super) async fn stored_session(&self, device: DeviceId) -> Option<Vec<u8>> {
        let (store, customer, key) =
            (self.ctx().store.clone(), self.customer, session_key(&self.doc, &device));
        let read = move || store.get_record(&customer, Space::SYNC_STATES, &key);
        self.ctx().work.run(read).await.ok().and_then(Result::ok).flatten()
    }

    /// Keeps a leaving device's sync state. Not flushed: the next group commit carries it, and
    /// losing it costs one larger exchange.
    pub(super) async fn keep_session(&self, device: DeviceId, session: Vec<u8>) {
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
    pub(super) async fn absorb(&mut self) -> Result<(), ApiError> {
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

    /// What the batch changed (see [`Document::persist`]), once the customer's quotas allow
    /// it: `None` when it changed nothing to store.
    pub(super) async fn prepare_write(&mut self) -> Result<Option<Prepared>, ApiError> {
        let Some(Persist { chunk, meta, metadata }) = self.document().persist() else {
            return Ok(None);
        };
        let ctx = self.registry.ctx.clone();
        let chunk_len = chunk.as_ref().map_or(0, |c| c.bytes.len() as u64);
        if chunk.is_some() {
            ctx.quotas.take_write(&self.customer)?;
            let (quotas, store, customer, size) =
                (ctx.quotas.clone(), ctx.store.clone(), self.customer, meta.size);
            if ctx.quotas.knows(&customer) {
                quotas.reserve_known(&customer, size, chunk_len)?;
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
        Ok(Some(Prepared { write, meta, chunk_len }))
    }

    /// Stores `prepared` and sends `release` once it is durable (the committer does), or
    /// gives the quota it reserved back if it fails.
    pub(super) async fn commit(
        &mut self,
        prepared: Prepared,
        release: Release,
    ) -> Result<Vec<Undelivered>, ApiError> {
        let Prepared { write, meta, chunk_len } = prepared;
        let ctx = self.registry.ctx.clone();
        let (seq, undelivered) = match ctx.commit.commit_releasing(write, release).await {
            Ok(committed) => committed,
            Err(err) => {
                ctx.quotas.release(&self.customer, chunk_len);
                return Err(err);
            }
        };
        let seq = seq.or_else(|| self.live().map(|l| l.seq)).unwrap_or_default();
        self.document().persisted(meta, seq);
        Ok(undelivered)
    }

    pub(super) async fn maybe_compact(&mut self) {
        let Some(live) = self.state.as_mut().and_then(Document::live_mut) else { return };
        let compaction = match live.history.take_compaction() {
            Ok(Some(compaction)) => compaction,
            Ok(None) => return,
            Err(err) => {
                // Its chunks stay as they are; nothing is lost, and it syncs as before.
                tracing::debug!(doc = %self.doc.short(), %err, "no compaction: content refused");
                return;
            }
        };
        // The size counted every chunk written; the document now holds the snapshot alone,
        // usually far smaller (10,000 one-key changes: about 1 MB of chunks, an 18 KB snapshot).
        // Recount it with the compaction, and give the difference back to the customer's quota.
        let stored = compaction.snapshot.bytes.len() as u64;
        let recounted =
            (stored < live.meta.size).then(|| DocMeta { size: stored, ..live.meta.clone() });
        let write = Write::Compact {
            customer: self.customer,
            doc: self.doc,
            snapshot: compaction.snapshot.clone(),
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
}
