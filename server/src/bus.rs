//! The change bus: what the nodes sharing one store tell each other.
//!
//! After a write is durable, the node that made it publishes "document D of customer C is at
//! feed position S"; an erasure, a revocation or a new customer epoch is published once it is
//! in the store. Every node (the publisher too) hears every event and acts on it: its streams
//! announce the change, a document it has loaded takes in what another node stored, and its
//! admission state (erased customers, refused tokens, epochs, cached data keys) catches up.
//!
//! Delivery is not trusted. Events may be late, lost or out of order, and may come without
//! their details ([`Changed::info`]): the store stays the source of truth. A stream that hears
//! a position that does not follow the last one it heard reads the feed from the store instead
//! (`sync.rs`), and a document reloads what it lacks from the store. The embedded deployment's
//! bus, [`LocalBus`], delivers in the publisher's own call, in order, with every detail.

use std::sync::{Arc, PoisonError, RwLock};

pub mod log;
mod postgres;

use cubby_core::{CustomerId, DeviceId, DocId, DocMeta, Seq};

/// Which server instance made an event.
pub type NodeId = u64;

/// A document write made durable.
#[derive(Clone, Debug)]
pub struct Changed {
    /// Whose.
    pub customer: CustomerId,
    /// Which document.
    pub doc: DocId,
    /// The feed position the write took.
    pub seq: Seq,
    /// What devices are told of the document, if the bus carries it: `Some(None)` for a
    /// deletion, `None` when the reader must look it up in the store.
    pub info: Option<Option<DocMeta>>,
    /// The document was created, deleted, or its title or private flag changed.
    pub metadata: bool,
}

/// Something the nodes sharing a store tell each other.
#[derive(Clone, Debug)]
pub enum Event {
    /// A document write is durable.
    Changed(Changed),
    /// The customer was erased: refuse them, close their streams, forget their data key.
    Erased {
        /// Who.
        customer: CustomerId,
    },
    /// A device was revoked, with the tokens refused with it (SHA-256 and expiry, seconds).
    Revoked {
        /// Whose.
        customer: CustomerId,
        /// Which device.
        device: DeviceId,
        /// The tokens now refused.
        tokens: Vec<([u8; 32], u64)>,
    },
    /// The customer's store started a new epoch (`Challenge.epoch`).
    Epoch {
        /// Whose.
        customer: CustomerId,
        /// The customer's own epoch now.
        epoch: [u8; 16],
    },
}

/// An event, with the node that published it.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The publishing node.
    pub from: NodeId,
    /// What happened.
    pub event: Event,
}

/// What a node does with each event; called in the bus's own context, so it must not block.
pub type Handler = Arc<dyn Fn(&Envelope) + Send + Sync>;

/// Carries events between the nodes that share a store.
pub trait Bus: Send + Sync + 'static {
    /// Tells every node (this one included) of `event`.
    fn publish(&self, event: Envelope);

    /// Calls `handler` with every event published from now on.
    fn subscribe(&self, handler: Handler);
}

/// The bus of the nodes of one process: it calls every handler in the publisher's call.
#[derive(Default)]
pub struct LocalBus {
    handlers: RwLock<Vec<Handler>>,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let handlers = self.handlers.read().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("LocalBus").field("handlers", &handlers).finish()
    }
}

impl Bus for LocalBus {
    fn publish(&self, event: Envelope) {
        for handler in self.handlers.read().unwrap_or_else(PoisonError::into_inner).iter() {
            handler(&event);
        }
    }

    fn subscribe(&self, handler: Handler) {
        self.handlers.write().unwrap_or_else(PoisonError::into_inner).push(handler);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_subscriber_hears_every_event_in_order() {
        let bus = LocalBus::default();
        let heard: Arc<Mutex<Vec<(usize, NodeId)>>> = Arc::default();
        for node in 0..2 {
            let heard = heard.clone();
            bus.subscribe(Arc::new(move |envelope: &Envelope| {
                heard.lock().expect("lock").push((node, envelope.from));
            }));
        }
        let customer = CustomerId::from_bytes([1; 16]);
        for from in [7, 8] {
            bus.publish(Envelope { from, event: Event::Erased { customer } });
        }
        assert_eq!(*heard.lock().expect("lock"), vec![(0, 7), (1, 7), (0, 8), (1, 8)]);
    }
}
