//! Per-customer announcements: "document D is now at feed position S".
//!
//! Every sync stream of a customer subscribes; what the change bus says of the customer's
//! durable writes (this node's and others') is published here. The channel is lossy on purpose:
//! a stream that lags re-reads the feed from storage.
//!
//! A broadcast channel allocates all its slots when it is made, and a customer's channel lives
//! as long as one of their devices is connected: slots are an `Arc` (so a slot is small) and
//! few, because a stream that falls behind loses nothing. 256 slots holding the 104-byte
//! announcement itself took about 33 KB per customer: `cubby-bench idle`, 10,000 devices of
//! 1,000 customers, went from 56 KB to 53 KB of server memory per device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cubby_core::{CustomerId, DocId, DocMeta, Seq};
use tokio::sync::broadcast;

/// One change-feed event.
#[derive(Clone, Debug)]
pub(crate) struct Announcement {
    pub(crate) doc: DocId,
    pub(crate) seq: Seq,
    /// `None` when the document was deleted.
    pub(crate) info: Option<DocMeta>,
    /// The document was created or its title or private flag changed (or, read back from the
    /// feed, may have): even a device syncing it live hears of it at once.
    pub(crate) metadata: bool,
    /// Written by another node: this node's actor of the document does not send the change to
    /// the devices it syncs live, so they hear of it like any other device.
    pub(crate) remote: bool,
    /// The bus did not carry the document's metadata: the stream reads the feed instead.
    pub(crate) partial: bool,
}

impl Announcement {
    /// A change as the bus told of it.
    pub(crate) fn heard(changed: &crate::bus::Changed, remote: bool) -> Self {
        Self {
            doc: changed.doc,
            seq: changed.seq,
            info: changed.info.clone().flatten(),
            metadata: changed.metadata,
            remote,
            partial: changed.info.is_none(),
        }
    }

    /// A change as the feed in the store shows it, which keeps no record of what changed.
    pub(crate) fn read(doc: DocId, seq: Seq, info: Option<DocMeta>) -> Self {
        Self { doc, seq, info, metadata: true, remote: false, partial: false }
    }
}

/// Announcement channels, one per customer with a connected device.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    channels: Mutex<HashMap<CustomerId, broadcast::Sender<Arc<Announcement>>>>,
}

/// Announcements a stream may fall behind by before it re-reads the feed.
const CAPACITY: usize = 32;

impl Hub {
    /// Subscribes one stream to `customer`'s announcements. The customer's channel goes with
    /// its last subscription, so connecting costs the same however many customers are online
    /// (it used to sweep every customer's channel under the lock the commit thread publishes
    /// through).
    pub(crate) fn subscribe(self: &Arc<Self>, customer: CustomerId) -> Subscription {
        let receiver = self
            .lock()
            .entry(customer)
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .subscribe();
        Subscription { hub: self.clone(), customer, receiver }
    }

    pub(crate) fn publish(&self, customer: CustomerId, announcement: Announcement) {
        if let Some(tx) = self.lock().get(&customer) {
            // No receivers is fine: nobody of this customer is connected.
            let _ = tx.send(Arc::new(announcement));
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CustomerId, broadcast::Sender<Arc<Announcement>>>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One stream's subscription to its customer's announcements.
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    customer: CustomerId,
    receiver: broadcast::Receiver<Arc<Announcement>>,
}

impl Subscription {
    pub(crate) async fn recv(&mut self) -> Result<Arc<Announcement>, broadcast::error::RecvError> {
        self.receiver.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.hub.lock();
        // Under the lock no stream can subscribe in between; this receiver still counts.
        if channels.get(&self.customer).is_some_and(|tx| tx.receiver_count() <= 1) {
            channels.remove(&self.customer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(seq: u64) -> Announcement {
        Announcement::read(DocId::from_bytes([9; 16]), Seq(seq), None)
    }

    #[tokio::test]
    async fn a_customer_s_channel_lasts_as_long_as_its_last_subscription() {
        let hub = Arc::new(Hub::default());
        let (alice, bob) = (CustomerId::from_bytes([1; 16]), CustomerId::from_bytes([2; 16]));
        let first = hub.subscribe(alice);
        let mut second = hub.subscribe(alice);
        let other = hub.subscribe(bob);
        assert_eq!(hub.lock().len(), 2);

        drop(first);
        hub.publish(alice, announcement(7));
        let heard = second.recv().await.expect("the other stream still hears");
        assert_eq!(heard.seq, Seq(7));

        drop(second);
        assert!(!hub.lock().contains_key(&alice), "alice's channel outlived her streams");
        assert!(hub.lock().contains_key(&bob));
        drop(other);
        assert!(hub.lock().is_empty());
    }

    #[test]
    fn customers_who_come_and_go_leave_no_channels_behind() {
        let hub = Arc::new(Hub::default());
        for i in 0..1000u16 {
            let mut bytes = [0; 16];
            bytes[..2].copy_from_slice(&i.to_le_bytes());
            let subscription = hub.subscribe(CustomerId::from_bytes(bytes));
            assert_eq!(hub.lock().len(), 1);
            drop(subscription);
        }
        assert!(hub.lock().is_empty());
    }
}
