//! The change bus of nodes that share a log: a PostgreSQL database (`postgres.rs`), or the
//! simulation's.
//!
//! A node hears its own events at once, in the publisher's call (as [`LocalBus`] delivers
//! them). The other nodes read them from the log ([`BusLog`]): document writes as the store
//! logged them, by the write itself (in PostgreSQL, in its transaction, which also wakes the
//! other nodes), so a node that dies right after committing loses no announcement; erasures,
//! revocations and epochs as this node publishes them after the store has them (waking the
//! others too). Each node reads when woken (`listen` mode) and every `poll` in any case, so a
//! lost or late wake-up only delays.
//!
//! A document write heard from another node carries no metadata (the store holds it sealed):
//! the streams that announce it read the feed instead, and the node's loaded copy of the
//! document loads what it lacks.

use std::sync::Arc;
use std::time::Duration;

use cubby_core::{CustomerId, DeviceId};
use cubby_store::StoreError;
pub use cubby_store::bus::Heard;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Bus, Changed, Envelope, Event, Handler, LocalBus};
use crate::config::BusMode;

/// Where the nodes sharing a store read what the others wrote. Every read returns each entry
/// written by another node since the cursor once, whatever order the writes finished in. The
/// store logs document writes (and wakes the other nodes) itself.
pub trait BusLog: Send + Sync + 'static {
    /// Where a reader is.
    type Cursor: Send;
    /// A subscription to wake-ups.
    type Listener: Send;

    /// A cursor at the present.
    fn cursor(&self) -> impl Future<Output = Result<Self::Cursor, StoreError>> + Send;

    /// What the other nodes wrote since `cursor`, which it moves on.
    fn read(
        &self,
        cursor: &mut Self::Cursor,
    ) -> impl Future<Output = Result<Vec<Heard>, StoreError>> + Send;

    /// Writes `events` for the other nodes and wakes them.
    fn publish(&self, events: Vec<Vec<u8>>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Subscribes to wake-ups.
    fn listen(&self) -> impl Future<Output = Result<Self::Listener, StoreError>> + Send;

    /// Waits for a wake-up; `false` when the subscription is gone (listen again).
    fn notified(listener: &mut Self::Listener) -> impl Future<Output = bool> + Send;

    /// Forgets old entries, now and then.
    fn prune(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }
}

/// The bus over a [`BusLog`].
pub struct LogBus {
    local: Arc<LocalBus>,
    /// Events for the other nodes, encoded, to the publishing task.
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    /// Stops the bus's tasks when the bus goes.
    _stop: DropGuard,
}

impl std::fmt::Debug for LogBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogBus").finish_non_exhaustive()
    }
}

impl LogBus {
    /// Starts the bus's tasks on the current runtime: one publishes, one reads what the other
    /// nodes wrote, woken by notifications (`BusMode::Listen`) and every `poll`.
    pub fn start<L: BusLog>(store: Arc<L>, mode: BusMode, poll: Duration) -> Self {
        let local = Arc::new(LocalBus::default());
        let (outbox, queued) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(publish(store.clone(), queued, stop.clone()));
        tokio::spawn(read(
            store,
            local.clone(),
            mode,
            poll.max(Duration::from_millis(1)),
            stop.clone(),
        ));
        Self { local, outbox, _stop: stop.drop_guard() }
    }
}

impl Bus for LogBus {
    fn publish(&self, envelope: Envelope) {
        // A document write is in the log already. The task may be gone with a runtime
        // shutting down; nothing is left to tell then.
        if let Some(bytes) = encode(&envelope.event) {
            _ = self.outbox.send(bytes);
        }
        self.local.publish(envelope);
    }

    fn subscribe(&self, handler: Handler) {
        self.local.subscribe(handler);
    }
}

/// Writes events for the other nodes and notifies them, trying again (and keeping what comes
/// meanwhile) while the database is away.
async fn publish<L: BusLog>(
    store: Arc<L>,
    mut queued: mpsc::UnboundedReceiver<Vec<u8>>,
    stop: CancellationToken,
) {
    loop {
        let mut events = Vec::new();
        tokio::select! {
            () = stop.cancelled() => return,
            event = queued.recv() => match event {
                Some(event) => events.push(event),
                None => return,
            },
        }
        let mut pause = Duration::from_millis(10);
        loop {
            while let Ok(event) = queued.try_recv() {
                events.push(event);
            }
            match store.publish(events.clone()).await {
                Ok(()) => break,
                Err(err) => {
                    if pause == Duration::from_millis(10) {
                        tracing::warn!(%err, held = events.len(),
                            "cannot tell the other nodes through the database; trying again");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Reads what the other nodes wrote and hands it to this node's handlers.
async fn read<L: BusLog>(
    store: Arc<L>,
    local: Arc<LocalBus>,
    mode: BusMode,
    poll: Duration,
    stop: CancellationToken,
) {
    let mut cursor = loop {
        match store.cursor().await {
            Ok(cursor) => break cursor,
            Err(err) => tracing::warn!(%err, "cannot read the other nodes' changes yet"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
    };
    let mut listener: Option<L::Listener> = None;
    let mut failing = false;
    let mut pruned = tokio::time::Instant::now();
    loop {
        if pruned.elapsed() > PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            if let Err(err) = store.prune().await {
                tracing::debug!(%err, "cannot forget old bus entries");
            }
        }
        if mode == BusMode::Listen && listener.is_none() {
            listener = store.listen().await.ok();
        }
        let notified = async {
            match listener.as_mut() {
                Some(listener) => L::notified(listener).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
            held = notified => if !held {
                listener = None;
            },
        }
        match store.read(&mut cursor).await {
            Ok(heard) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("reading the other nodes' changes again");
                }
                for heard in heard {
                    if let Some(envelope) = decode(heard) {
                        local.publish(envelope);
                    }
                }
            }
            Err(err) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%err, "cannot read the other nodes' changes; trying again");
                }
                // The listening connection most likely went with the database.
                listener = None;
            }
        }
    }
}

/// How often a node forgets the bus's old entries ([`BusLog::prune`]).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

const ERASED: u8 = 1;
const REVOKED: u8 = 2;
const EPOCH: u8 = 3;

/// An event as `bus_events` holds it; `None` for a document write, which the feed carries.
fn encode(event: &Event) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    match event {
        Event::Changed(_) => return None,
        Event::Erased { customer } => {
            bytes.push(ERASED);
            bytes.extend_from_slice(customer.as_bytes());
        }
        Event::Revoked { customer, device, tokens } => {
            bytes.push(REVOKED);
            bytes.extend_from_slice(customer.as_bytes());
            bytes.extend_from_slice(device.as_bytes());
            for (hash, expiry) in tokens {
                bytes.extend_from_slice(hash);
                bytes.extend_from_slice(&expiry.to_be_bytes());
            }
        }
        Event::Epoch { customer, epoch } => {
            bytes.push(EPOCH);
            bytes.extend_from_slice(customer.as_bytes());
            bytes.extend_from_slice(epoch);
        }
    }
    Some(bytes)
}

/// What another node wrote, as an event; `None` (logged) for bytes this code cannot read.
fn decode(heard: Heard) -> Option<Envelope> {
    let (writer, event) = match heard {
        Heard::Changed { writer, customer, doc, seq } => {
            let changed = Changed { customer, doc, seq, info: None, metadata: true };
            (writer, Event::Changed(changed))
        }
        Heard::Event { writer, bytes } => match decode_event(&bytes) {
            Some(event) => (writer, event),
            None => {
                tracing::warn!(len = bytes.len(), "an event on the bus this node cannot read");
                return None;
            }
        },
    };
    Some(Envelope { from: writer as u64, event })
}

fn decode_event(bytes: &[u8]) -> Option<Event> {
    let (&kind, rest) = bytes.split_first()?;
    let (customer, rest) = rest.split_first_chunk::<16>()?;
    let customer = CustomerId::from_bytes(*customer);
    match kind {
        ERASED if rest.is_empty() => Some(Event::Erased { customer }),
        REVOKED => {
            let (device, rest) = rest.split_first_chunk::<16>()?;
            let (tokens, []) = rest.as_chunks::<40>() else { return None };
            let tokens = tokens
                .iter()
                .map(|token| {
                    let (hash, expiry) = token.split_first_chunk::<32>().expect("40 bytes");
                    (*hash, u64::from_be_bytes(expiry.try_into().expect("8 bytes")))
                })
                .collect();
            Some(Event::Revoked { customer, device: DeviceId::from_bytes(*device), tokens })
        }
        EPOCH => Some(Event::Epoch { customer, epoch: rest.try_into().ok()? }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_they_were_written() {
        let customer = CustomerId::from_bytes([1; 16]);
        let events = [
            Event::Erased { customer },
            Event::Revoked {
                customer,
                device: DeviceId::from_bytes([2; 16]),
                tokens: vec![([3; 32], 7), ([4; 32], u64::MAX)],
            },
            Event::Revoked { customer, device: DeviceId::from_bytes([2; 16]), tokens: vec![] },
            Event::Epoch { customer, epoch: [5; 16] },
        ];
        for event in events {
            let bytes = encode(&event).expect("carried by bus_events");
            let read = decode_event(&bytes).expect("reads back");
            assert_eq!(format!("{read:?}"), format!("{event:?}"));
            // Cut short or run long, it is refused.
            assert!(decode_event(&bytes[..bytes.len() - 1]).is_none());
            let mut long = bytes.clone();
            long.push(0);
            assert!(decode_event(&long).is_none());
        }
    }
}
