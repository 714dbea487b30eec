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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{Semaphore, mpsc};

    use super::*;
    use crate::docs::{Lagging, Outgoing};

    struct Device {
        link: Link,
        frames: mpsc::Receiver<Outgoing>,
        holds: mpsc::UnboundedReceiver<(DocId, Seq)>,
    }

    fn device(room: usize) -> Device {
        let (outbox, frames) = mpsc::channel(room);
        let (holds_tx, holds) = mpsc::unbounded_channel();
        Device {
            link: Link { outbox, holds: holds_tx, lagging: Lagging::default() },
            frames,
            holds,
        }
    }

    fn sync(doc: DocId, byte: u8) -> ToDevice {
        ToDevice::Sync { doc, message: vec![byte], seq: Seq(0) }
    }

    fn received(device: &mut Device) -> Vec<(Vec<u8>, Seq)> {
        std::iter::from_fn(|| device.frames.try_recv().ok())
            .map(|out| match *out.message {
                ToDevice::Sync { message, seq, .. } => (message, seq),
                _ => panic!("only sync messages were released"),
            })
            .collect()
    }

    #[test]
    fn messages_leave_in_order_at_the_durable_position_and_none_after_a_full_queue() {
        let doc = DocId::from_bytes([7; 16]);
        let permits = Arc::new(Semaphore::new(4));
        let take = || vec![permits.clone().try_acquire_owned().expect("a permit is free")];
        let (mut full, mut roomy) = (device(1), device(4));
        let mut release = Release::new(doc, Seq(3));
        release.frame(1, &full.link, sync(doc, 1), take());
        release.holds(2, &roomy.link);
        release.frame(2, &roomy.link, sync(doc, 2), take());
        let behind = release.frame(1, &full.link, sync(doc, 3), Vec::new());
        release.holds(1, &full.link);
        release.done(2, &roomy.link, take());
        assert_eq!(permits.available_permits(), 1);

        let undelivered = release.send(Some(Seq(9)));

        assert_eq!(permits.available_permits(), 2, "permits ride with frames still queued");
        assert_eq!(undelivered.len(), 1, "one report for the device that had no room");
        assert_eq!((undelivered[0].index, undelivered[0].peer), (behind, 1));
        assert_eq!(undelivered[0].sent, Sent::Behind);
        assert_eq!(received(&mut full), vec![(vec![1], Seq(9))]);
        assert!(full.holds.try_recv().is_err(), "nothing after the message it missed");
        assert_eq!(full.link.lagging.take(), vec![doc], "the document owes it a frame");
        assert_eq!(roomy.holds.try_recv().ok(), Some((doc, Seq(9))));
        assert_eq!(received(&mut roomy), vec![(vec![2], Seq(9))]);
    }

    #[test]
    fn a_write_without_a_feed_position_releases_at_the_documents_and_a_gone_device_is_reported() {
        let doc = DocId::from_bytes([7; 16]);
        let mut here = device(2);
        let gone = device(2);
        let gone_link = gone.link.clone();
        drop(gone);
        let mut release = Release::new(doc, Seq(5));
        release.frame(7, &gone_link, sync(doc, 1), Vec::new());
        release.frame(8, &here.link, sync(doc, 2), Vec::new());

        let undelivered = release.send(None);

        assert_eq!(undelivered.len(), 1);
        assert_eq!((undelivered[0].peer, undelivered[0].sent), (7, Sent::Gone));
        assert_eq!(received(&mut here), vec![(vec![2], Seq(5))]);
    }

    #[test]
    fn a_release_never_sent_tells_nobody_and_gives_the_permits_back() {
        let doc = DocId::from_bytes([7; 16]);
        let permits = Arc::new(Semaphore::new(1));
        let mut device = device(2);
        let mut release = Release::new(doc, Seq(1));
        release.frame(
            1,
            &device.link,
            sync(doc, 1),
            vec![permits.clone().try_acquire_owned().expect("a permit is free")],
        );
        release.holds(1, &device.link);
        assert_eq!(permits.available_permits(), 0);

        drop(release); // The write failed.

        assert_eq!(permits.available_permits(), 1);
        assert!(received(&mut device).is_empty());
        assert!(device.holds.try_recv().is_err());
    }
}
