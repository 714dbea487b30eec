//! Callbacks into the app: the sync status and document events, each delivered in order by a
//! task of its own, which a [`Subscription`] stops.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::types::{DocumentEvent, SyncStatus};

/// Hears the sync status: first the current one, then each change.
#[uniffi::export(with_foreign)]
pub trait StatusListener: Send + Sync {
    /// The status changed. Called on a Cubby thread, one call at a time, in order.
    fn on_status(&self, status: SyncStatus);
}

/// Hears document events.
#[uniffi::export(with_foreign)]
pub trait DocumentListener: Send + Sync {
    /// Something happened to the document `doc_id`. Called on a Cubby thread, one call at a
    /// time, in order.
    fn on_event(&self, doc_id: String, event: DocumentEvent);
}

/// Keeps callbacks coming until cancelled or dropped (in Kotlin `close()`, in Python leaving a
/// `with` block or `cancel()`).
#[derive(uniffi::Object)]
pub struct Subscription {
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[uniffi::export]
impl Subscription {
    /// Stops the callbacks. One already running finishes; no other starts.
    pub fn cancel(&self) {
        for task in self.tasks.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Subscription {
    /// Calls `listener` with the current status and every change after it.
    ///
    /// The SDK's status is a `watch`, which keeps only the latest value; a forwarding task that
    /// does nothing but copy each value into a queue keeps the steps a slow listener would
    /// otherwise miss (connecting, then syncing 3 of 10), and a second task calls the
    /// listener from that queue.
    pub(crate) fn status(
        mut status: watch::Receiver<cubby_client::SyncStatus>,
        listener: Arc<dyn StatusListener>,
    ) -> Arc<Self> {
        let (queue, mut queued) = mpsc::unbounded_channel();
        let forward = crate::runtime().spawn(async move {
            let first = SyncStatus::from(&*status.borrow_and_update());
            if queue.send(first).is_err() {
                return;
            }
            while status.changed().await.is_ok() {
                let next = SyncStatus::from(&*status.borrow_and_update());
                if queue.send(next).is_err() {
                    return;
                }
            }
        });
        let deliver = crate::runtime().spawn(async move {
            let mut last = None;
            while let Some(status) = queued.recv().await {
                if last.as_ref() == Some(&status) {
                    continue;
                }
                last = Some(status.clone());
                if !call(listener.clone(), move |l| l.on_status(status)).await {
                    return;
                }
            }
        });
        Arc::new(Self { tasks: Mutex::new(vec![forward, deliver]) })
    }

    /// Calls `listener` with each event from `events`, and [`DocumentEvent::Missed`] for
    /// those a slow listener lost.
    pub(crate) fn events(
        mut events: broadcast::Receiver<(cubby_client::DocId, cubby_client::DocEvent)>,
        only: Option<cubby_client::DocId>,
        listener: Arc<dyn DocumentListener>,
    ) -> Arc<Self> {
        let task = crate::runtime().spawn(async move {
            loop {
                let (id, event) = match events.recv().await {
                    Ok((id, event)) if only.is_none_or(|only| only == id) => {
                        (id.to_string(), DocumentEvent::from(&event))
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(count)) => {
                        let id = only.map(|id| id.to_string()).unwrap_or_default();
                        (id, DocumentEvent::Missed { count })
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !call(listener.clone(), move |l| l.on_event(id, event)).await {
                    return;
                }
            }
        });
        Arc::new(Self { tasks: Mutex::new(vec![task]) })
    }
}

/// Calls into the app on the blocking pool, so a slow callback holds no runtime worker; false
/// when the callback panicked (the subscription then ends).
async fn call<L: ?Sized + Send + Sync + 'static>(
    listener: Arc<L>,
    f: impl FnOnce(&L) + Send + 'static,
) -> bool {
    match tokio::task::spawn_blocking(move || f(&listener)).await {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(%err, "a Cubby listener failed; it hears nothing more");
            false
        }
    }
}
