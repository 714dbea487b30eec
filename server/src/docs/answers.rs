//! What a document actor sends once a batch is durable: the answers to requests, and (queued in
//! the batch's [`Release`]) the pushed catch-ups and what each device is told (see
//! `Document::answers`).

use std::collections::HashSet;
use std::sync::Arc;

use cubby_core::Seq;
use cubby_core::document::Answer;
use cubby_proto::ApiError;
use tokio::sync::oneshot;

use super::actor::{Actor, Deferred};
use super::{Release, Summary, Undelivered};
use crate::durable::Write;
use crate::frames::ToDevice;
use crate::hub::Announcement;

impl Actor {
    pub(super) fn summary(&self) -> Option<Summary> {
        self.live().map(|l| Summary { doc: self.doc, meta: l.meta.clone(), seq: l.seq })
    }

    /// The document as JSON, its content brought up to date first.
    fn read(&mut self) -> Result<(Summary, serde_json::Value), ApiError> {
        let summary = self.summary().ok_or(ApiError::NotFound("document"))?;
        let live = self.document().live_mut().ok_or(ApiError::NotFound("document"))?;
        match live.history.doc_mut().content() {
            Ok(content) => Ok((summary, cubby_core::json::to_json(content))),
            Err(err) => Err(super::actor::content_error(&self.doc, &err)),
        }
    }

    pub(super) async fn answer(&mut self, deferred: Vec<Deferred>) {
        for d in deferred {
            match d {
                Deferred::Info(reply) => {
                    let _ = reply.send(self.summary().ok_or(ApiError::Internal));
                }
                Deferred::Read(reply) => {
                    let _ = reply.send(self.read());
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
    /// saved sync state right behind, unasked (`PeerSession::push`), once the batch is durable
    /// (queued in `release`). Returns each push's `queued`, and where its messages end.
    pub(super) fn push(
        &mut self,
        pushes: Vec<(u64, Arc<Announcement>, oneshot::Sender<bool>)>,
        release: &mut Release,
    ) -> Vec<(u64, oneshot::Sender<bool>, usize)> {
        let mut queued = Vec::new();
        if self.live().is_none() {
            return queued;
        }
        for (peer, announcement, told) in pushes {
            if !self.links.contains_key(&peer) {
                continue;
            }
            let message = self.document().push(&peer);
            tracing::debug!(peer, doc = %self.doc.short(), pushed = message.is_some(),
                "catch-up announced by the document's actor");
            let pushed = message.is_some();
            self.queue(release, peer, ToDevice::Changed { announcement, pushed });
            if let Some(message) = message {
                // The feed position is the durable one's, filled in on release.
                let sync = ToDevice::Sync { doc: self.doc, message, seq: Seq(0) };
                self.queue(release, peer, sync);
            }
            queued.push((peer, told, release.len()));
        }
        queued
    }

    /// Queues in `release` what [`Document::answers`] says for every peer, and which hold the
    /// document once it is durable.
    pub(super) fn answer_peers(
        &mut self,
        spoke: &HashSet<u64>,
        moved: bool,
        release: &mut Release,
    ) {
        if self.live().is_none() {
            return;
        }
        let answers = self.document().answers(spoke, moved);
        for (peer, answer, holds) in answers {
            let Some(link) = self.links.get_mut(&peer) else { continue };
            if holds {
                release.holds(peer, &link.link);
            }
            match answer {
                Answer::Message(message) => {
                    self.queue(
                        release,
                        peer,
                        ToDevice::Sync { doc: self.doc, message, seq: Seq(0) },
                    );
                }
                Answer::Nothing => {
                    // Its messages are done with.
                    release.done(peer, &link.link, std::mem::take(&mut link.permits));
                }
                Answer::Failed => {
                    tracing::error!(doc = %self.doc.short(), peer,
                        "automerge panicked generating a sync message");
                    // A refusal tells no heads: it need not wait for the write.
                    self.send(peer, ToDevice::refused(&self.doc, ApiError::Internal));
                    self.links.remove(&peer);
                }
            }
        }
    }

    /// Queues `message` for `peer` in `release`, with the permits its messages hold.
    fn queue(&mut self, release: &mut Release, peer: u64, message: ToDevice) {
        if let Some(link) = self.links.get_mut(&peer) {
            release.frame(peer, &link.link, message, std::mem::take(&mut link.permits));
        }
    }

    /// What became of a released batch: a device whose queue was full gets its session started
    /// over (it is spoken to again once it reads, `DocMsg::Resume`); one whose stream ended is
    /// forgotten. Each push's stream hears whether its announcement went out.
    pub(super) fn delivered(
        &mut self,
        undelivered: &[Undelivered],
        pushes: Vec<(u64, oneshot::Sender<bool>, usize)>,
    ) {
        for u in undelivered {
            self.not_sent(u.peer, u.sent);
        }
        for (peer, queued, end) in pushes {
            let _ = queued.send(!undelivered.iter().any(|u| u.peer == peer && u.index < end));
        }
    }
}
