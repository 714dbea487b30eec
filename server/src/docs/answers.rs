//! What a document actor sends once a batch is durable: the answers to requests, the pushed
//! catch-ups, and what each device is told (see `Document::answers`).

use std::collections::HashSet;
use std::sync::Arc;

use cubby_core::document::Answer;
use cubby_proto::ApiError;
use tokio::sync::oneshot;

use super::actor::{Actor, Deferred};
use super::{Sent, Summary};
use crate::durable::Write;
use crate::frames::ToDevice;
use crate::hub::Announcement;

impl Actor {
    pub(super) fn summary(&self) -> Option<Summary> {
        self.live().map(|l| Summary { doc: self.doc, meta: l.meta.clone(), seq: l.seq })
    }

    pub(super) async fn answer(&mut self, deferred: Vec<Deferred>) {
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
    pub(super) fn push(&mut self, pushes: Vec<(u64, Arc<Announcement>, oneshot::Sender<bool>)>) {
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
    pub(super) fn answer_peers(&mut self, spoke: &HashSet<u64>, moved: bool) {
        let Some(seq) = self.live().map(|l| l.seq) else { return };
        let answers = self.document().answers(spoke, moved);
        for (peer, answer, holds) in answers {
            if holds && let Some(link) = self.links.get(&peer) {
                let _ = link.link.holds.send((self.doc, seq));
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
}
