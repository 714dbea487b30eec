//! What a batch tells devices once it is durable, in the order the document's actor decided
//! it. Whoever learns first that the batch is durable sends it: the committer, right after the
//! flush (so a change's frames leave with no hop back through the actor), or the actor itself
//! when the batch wrote nothing.

use cubby_core::{DocId, Seq};
use tokio::sync::OwnedSemaphorePermit;

use super::{Link, Sent};
use crate::frames::ToDevice;

/// A batch's messages to devices, held until the batch is durable.
pub(crate) struct Release {
    doc: DocId,
    /// The document's feed position if its write takes none.
    at: Seq,
    sends: Vec<Send>,
}

struct Send {
    peer: u64,
    link: Link,
    what: What,
    /// The permits of the device's messages this answers, given back as it leaves.
    permits: Vec<OwnedSemaphorePermit>,
}

enum What {
    /// A frame; a sync message's feed position is filled in on release.
    Frame(ToDevice),
    /// The device holds the durable document: its stream hears so (`Link::holds`).
    Holds,
    /// No frame: the device's messages are done with.
    Done,
}

/// A message that did not reach its device, nor did any after it for the same device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Undelivered {
    /// Its place among the messages, as [`Release::frame`] numbered it.
    pub(crate) index: usize,
    pub(crate) peer: u64,
    /// [`Sent::Behind`] or [`Sent::Gone`].
    pub(crate) sent: Sent,
}

impl Release {
    /// Nothing yet, for `doc` at feed position `at`.
    pub(crate) fn new(doc: DocId, at: Seq) -> Self {
        Self { doc, at, sends: Vec::new() }
    }

    /// Queues `message` for `peer`, with `permits`; returns its index.
    pub(super) fn frame(
        &mut self,
        peer: u64,
        link: &Link,
        message: ToDevice,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> usize {
        self.push(peer, link, What::Frame(message), permits)
    }

    /// Queues the notice that `peer`'s device holds the durable document.
    pub(super) fn holds(&mut self, peer: u64, link: &Link) {
        self.push(peer, link, What::Holds, Vec::new());
    }

    /// Gives back `permits` of `peer`'s messages, which need no answer.
    pub(super) fn done(&mut self, peer: u64, link: &Link, permits: Vec<OwnedSemaphorePermit>) {
        if !permits.is_empty() {
            self.push(peer, link, What::Done, permits);
        }
    }

    fn push(
        &mut self,
        peer: u64,
        link: &Link,
        what: What,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> usize {
        self.sends.push(Send { peer, link: link.clone(), what, permits });
        self.sends.len() - 1
    }

    /// How many messages are queued.
    pub(super) fn len(&self) -> usize {
        self.sends.len()
    }

    /// Sends everything, the document now durable at `seq` (`None`: the write took no feed
    /// position). A device whose queue is full or gone is sent nothing more; the first such
    /// message of each is returned, for the actor to start its session over or forget it.
    pub(crate) fn send(self, seq: Option<Seq>) -> Vec<Undelivered> {
        let seq = seq.unwrap_or(self.at);
        let mut undelivered: Vec<Undelivered> = Vec::new();
        for (index, Send { peer, link, what, permits }) in self.sends.into_iter().enumerate() {
            if undelivered.iter().any(|u| u.peer == peer) {
                continue;
            }
            match what {
                What::Frame(mut message) => {
                    if let ToDevice::Sync { seq: at, .. } = &mut message {
                        *at = seq;
                    }
                    let sent = link.send(self.doc, message, permits);
                    if sent != Sent::Queued {
                        undelivered.push(Undelivered { index, peer, sent });
                    }
                }
                What::Holds => {
                    let _ = link.holds.send((self.doc, seq));
                }
                What::Done => drop(permits),
            }
        }
        undelivered
    }
}
