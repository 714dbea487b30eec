//! What a device hears of its customer's feed: the catch-up read from the store when it
//! connects (or after a gap), announcements from the bus, and which are held back.

use std::sync::Arc;

use cubby_core::feed::{Change, Heard};
use cubby_core::{DocMeta, Seq};
use cubby_proto::ApiError;
use cubby_store::Space;
use tokio::sync::oneshot;
use tonic::Status;

use super::{Connection, PUSH_AT_MOST};
use crate::docs::{DocMsg, session_key};
use crate::durable::api_error;
use crate::frames::ToDevice;
use crate::hub::Announcement;

impl Connection {
    /// Announces every document changed after `self.announced`, from storage. With `push` (the
    /// catch-up on connecting, before `CaughtUp`), a short one is pushed where the device's sync
    /// state was kept. Not later: the device, caught up already, could advance its cursor on a
    /// pushed document's frames past an earlier announcement still queued behind them. Returns
    /// the customer's last feed position.
    pub(super) async fn catch_up(&mut self, push: bool) -> Result<Seq, Status> {
        let (store, customer, cursor) =
            (self.shared.store.clone(), self.customer, self.told.announced());
        let device = self.device.ok_or(ApiError::Internal)?;
        let changes = self
            .shared
            .work
            .run(move || {
                let head = store.feed_head(&customer)?;
                let feed = store.feed_since(&customer, cursor)?;
                let push = push && feed.len() <= PUSH_AT_MOST;
                let changes = feed
                    .into_iter()
                    .map(|(seq, doc)| {
                        let meta = store.doc_meta(&customer, &doc)?;
                        // Only a document whose sync state with this device was kept can be
                        // pushed (see `DocMsg::Push`); its actor starts from what is read here.
                        let saved = if push {
                            store.get_record(
                                &customer,
                                Space::SYNC_STATES,
                                &session_key(&doc, &device),
                            )?
                        } else {
                            None
                        };
                        Ok((seq, doc, meta, saved))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // Reads see writes before their group commit is flushed; flush, so nothing
                // announced here can be lost in a crash (and its feed position taken again after
                // restart).
                if !changes.is_empty() {
                    store.flush()?;
                }
                Ok::<_, cubby_store::StoreError>((changes, head))
            })
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(api_error)?;
        let (changes, head) = changes;
        // Read live (a gap on the bus, or a write another node made): this node's loaded copy
        // of a document may lag the store, another node's write heard late or not yet. It
        // takes in what is stored before the device, told of the change below, asks for it (its
        // mailbox is in order). Else the device would sync with the old copy, and the late
        // announcement, older than this read, would never be sent. (Not on connecting: a
        // loaded copy per document read would hold up the device's first answers.)
        if !push {
            for (_, doc, _, _) in &changes {
                self.shared.docs.refresh(self.customer, *doc);
            }
        }
        self.take_holds();
        let mut pushed = Vec::new();
        for (seq, doc, meta, saved) in changes {
            let info = match meta.map(|(_, m)| DocMeta::decode(&m)) {
                Some(Ok(meta)) => Some(meta),
                Some(Err(_)) => return Err(ApiError::DataLoss("document").into()),
                None => None,
            };
            // The feed keeps no record of what changed: announce it as it used to be.
            let a = Arc::new(Announcement::read(doc, seq, info));
            match saved {
                Some(saved)
                    if a.info.is_some()
                        && a.seq > self.told.announced()
                        && !self.told.joined(&doc) =>
                {
                    pushed.push(self.push(a, saved)?);
                }
                _ => {
                    for a in self.told.read(change(&a), a.clone()) {
                        self.send(ToDevice::Changed { announcement: a, pushed: false });
                    }
                }
            }
        }
        // Every pushed frame is queued before `CaughtUp` (the actors' frames go first), so the
        // device's cursor never passes a pushed change it has not been sent.
        for (a, queued) in pushed {
            if !queued.await.unwrap_or(false) {
                self.send(ToDevice::Changed { announcement: a, pushed: false });
            }
        }
        Ok(head)
    }

    /// Takes in what document actors said the device holds since the last announcement.
    fn take_holds(&mut self) {
        while let Ok((doc, seq)) = self.held.try_recv() {
            self.told.holds(doc, seq);
        }
    }

    /// Hands a catch-up announcement to the document's actor to push (`DocMsg::Push`).
    pub(super) fn push(
        &mut self,
        a: Arc<Announcement>,
        saved: Vec<u8>,
    ) -> Result<(Arc<Announcement>, oneshot::Receiver<bool>), Status> {
        let device = self.device.ok_or(ApiError::Internal)?;
        let (queued, answer) = oneshot::channel();
        self.told.pushed(a.doc, a.seq);
        let msg = DocMsg::Push {
            peer: self.peer,
            device,
            saved,
            link: self.link.clone(),
            announcement: a.clone(),
            queued,
        };
        self.shared.docs.send(self.customer, a.doc, msg);
        Ok((a, answer))
    }

    /// An announcement from the change bus. Delivery is not trusted: one that does not follow
    /// the last position heard (one was lost, or came out of order, or another node's write is
    /// still on its way), or that came without the document's metadata, has the stream read the
    /// feed from the store instead (`cubby_core::feed::Told::heard`). A durable change of a
    /// document the device syncs live here is held back: its actor sends the change itself, and
    /// an announcement per change to every device of the customer cost each device a frame (and
    /// the server a TLS record) for a change it was receiving anyway.
    pub(super) async fn on_heard(&mut self, a: Arc<Announcement>) -> Result<(), Status> {
        self.take_holds();
        match self.told.heard(change(&a), a.partial, a.clone()) {
            Heard::ReadFeed => {
                tracing::debug!(
                    peer = self.peer,
                    seq = a.seq.0,
                    "a position was skipped on the bus; reading the feed"
                );
                let head = self.catch_up(false).await?;
                self.told.read_to(head);
            }
            Heard::Send(announcements) => {
                for a in announcements {
                    self.send(ToDevice::Changed { announcement: a, pushed: false });
                }
            }
        }
        Ok(())
    }
}

/// An announcement as the stream weighs it: another node's write is not sent by this node's
/// actor, so it is never held back; nor are deletions and metadata changes.
fn change(a: &Announcement) -> Change {
    Change { doc: a.doc, seq: a.seq, content: a.info.is_some() && !a.metadata && !a.remote }
}
