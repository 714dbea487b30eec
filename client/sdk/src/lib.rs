//! The Cubby client SDK.
//!
//! A [`Client`] keeps the customer's documents in a local sled store encrypted with a key the app
//! supplies, so every edit works offline and is on disk before [`DocHandle::change`] returns. A
//! background task syncs with the server over one gRPC stream (the standard Automerge sync
//! protocol per document), reconnecting with jittered exponential backoff, and reports its
//! progress on [`Client::status`]. The SDK never builds a runtime: call it from inside yours.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cubby_client::ClientError> {
//! use cubby_client::{Client, StaticToken};
//!
//! let client = Client::builder()
//!     .with_data_dir("/path/to/app/cubby")
//!     .with_local_key([0u8; 32]) // from the platform keychain
//!     .with_server("https://cubby.example.com:7443")
//!     .with_token_provider(StaticToken::new("eyJ..."))
//!     .build()
//!     .await?;
//! let doc = client.create("Groceries").await?;
//! doc.put("milk", serde_json::json!(2)).await?;
//! let mut changes = doc.subscribe();
//! changes.recv().await.ok(); // another device edited it
//! println!("{}", doc.to_json());
//! client.shutdown().await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use cubby_crypto::signing::DeviceKey;
use cubby_store::{Space, Store};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::task::TaskTracker;

mod account;
mod admin;
mod builder;
mod doc;
mod engine;
mod error;
mod loaded;
mod tokens;
mod wire;

pub use account::{AuditEntry, DeviceInfo, ErasureReceipt};
pub use admin::{Admin, CustomerUsage, Edit};
/// Typed documents: derive [`autosurgeon::Reconcile`] and [`autosurgeon::Hydrate`] for a type,
/// then [`DocHandle::reconcile`] and [`DocHandle::hydrate`].
pub use autosurgeon;
pub use builder::ClientBuilder;
pub use cubby_core::{DeviceId, DocId, DocMeta};
pub use cubby_store::StoreError;
pub use doc::{DocEvent, DocHandle};
pub use engine::{SyncFailure, SyncStatus, WipeReason};
pub use error::{ClientError, ErrorCode};
pub use tokens::{StaticToken, TokenError, TokenFuture, TokenProvider};

/// A document deleted elsewhere while this device had changes to it the server never got.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Discarded {
    /// The document.
    pub id: DocId,
    /// Its title when it was deleted.
    pub title: String,
}

/// The customer id the local store files everything under (a device holds one customer).
const LOCAL: cubby_core::CustomerId = cubby_core::CustomerId::from_bytes([1; 16]);

/// What the client's parts share.
pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) device_id: DeviceId,
    pub(crate) device_key: DeviceKey,
    /// Open documents; a document stays loaded while a handle or the sync engine holds it.
    docs: Mutex<loaded::Loaded>,
    /// Tells the sync engine a document has local changes.
    pub(crate) wake: mpsc::UnboundedSender<DocId>,
    pub(crate) status: watch::Sender<SyncStatus>,
    pub(crate) device_name: String,
    pub(crate) platform: String,
    /// Every document event, client-wide.
    pub(crate) events: broadcast::Sender<(DocId, DocEvent)>,
    /// Blocking store work in flight; `shutdown` waits for it, so the store is closed after.
    tasks: TaskTracker,
    /// Store calls run on the calling task (simulation), not the blocking pool.
    inline_storage: bool,
    /// The server said the token is another account's than the one whose data this device
    /// holds: nothing more is shown or synced.
    pub(crate) foreign: std::sync::atomic::AtomicBool,
    /// The app paused syncing ([`Client::pause_sync`]).
    pub(crate) paused: watch::Sender<bool>,
    /// The app asked to connect now rather than wait out a retry's pause.
    pub(crate) reconnect: tokio::sync::Notify,
    /// The first and longest pause before sync tries to connect again.
    pub(crate) retry: (std::time::Duration, std::time::Duration),
}

impl Inner {
    /// Refuses when this device was wiped, or its data is another account's than the token's.
    fn own_account(&self) -> Result<(), ClientError> {
        if let SyncStatus::Wiped { reason } = *self.status.borrow() {
            return Err(ClientError::Wiped(reason));
        }
        if self.foreign.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ClientError::WrongAccount);
        }
        Ok(())
    }
}

impl Inner {
    /// Runs store work on the blocking pool, tracked so that `shutdown` can wait for it.
    pub(crate) async fn blocking<T, E>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, E> + Send + 'static,
    ) -> Result<T, ClientError>
    where
        T: Send + 'static,
        E: Send + 'static,
        ClientError: From<E>,
    {
        if self.inline_storage {
            return Ok(f(&*self.store)?);
        }
        let store = self.store.clone();
        Ok(self
            .tasks
            .spawn_blocking(move || f(&*store))
            .await
            .map_err(|_| ClientError::Closed)??)
    }

    /// Wipes the local store: its data key is destroyed first, then every record; nothing this
    /// device held stays readable. The next `build` on the directory starts a new device.
    pub(crate) async fn wipe(&self, reason: WipeReason) {
        tracing::warn!(device = %self.device_id.short(), ?reason, "wiping the local store");
        self.unload_all();
        if let Err(err) = self.blocking(|store| store.erase_customer(&LOCAL)).await {
            tracing::error!(%err, "wiping the local store failed");
        }
        self.status.send_replace(SyncStatus::Wiped { reason });
    }
}

/// A broadcast subscription as a stream, `missed` standing for events a slow reader lost.
fn event_stream<T: Clone + Send + 'static>(
    events: broadcast::Receiver<T>,
    missed: impl Fn(u64) -> T + Send + 'static,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    use futures_util::StreamExt;
    use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
    BroadcastStream::new(events).map(move |event| match event {
        Ok(event) => event,
        Err(BroadcastStreamRecvError::Lagged(count)) => missed(count),
    })
}

enum SyncTask {
    /// Not started; holds the wake-up channel the engine will read.
    Idle(mpsc::UnboundedReceiver<DocId>),
    Running(tokio::task::JoinHandle<()>),
    Stopped,
}

/// A device's view of one customer's store. Cheap to clone: clones share the store, the sync
/// engine and its status; the engine stops when the last clone is dropped or shut down.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    remote: Option<engine::Remote>,
    sync: Arc<Syncing>,
}

/// The sync engine's task, shared by a client's clones; aborted when the last one goes.
struct Syncing(Mutex<SyncTask>);

impl Drop for Syncing {
    fn drop(&mut self) {
        if let SyncTask::Running(task) = &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            task.abort();
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("device", &self.inner.device_id).finish_non_exhaustive()
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// This installation's device id.
    pub fn device_id(&self) -> DeviceId {
        self.inner.device_id
    }

    /// Creates a document locally. It reaches the server on the next sync.
    pub async fn create(&self, title: &str) -> Result<DocHandle, ClientError> {
        self.inner.own_account()?;
        let id = DocId::from_bytes(cubby_crypto::random_array());
        let shared = doc::DocShared::new(id, title, &self.inner);
        let meta = shared.meta().encode();
        self.inner
            .blocking(move |store| {
                store.write_doc_off_feed(&LOCAL, &id, &meta, None)?;
                store.put_record(&LOCAL, Space::UNSYNCED, id.as_bytes(), doc::MARK_NEW)?;
                store.flush()
            })
            .await?;
        let shared = self.inner.adopt(shared);
        let _ = self.inner.wake.send(id);
        Ok(DocHandle::new(shared, self.inner.clone()))
    }

    /// Opens a document this device holds.
    pub async fn open(&self, id: DocId) -> Result<DocHandle, ClientError> {
        self.inner.own_account()?;
        Ok(DocHandle::new(self.inner.doc(id).await?, self.inner.clone()))
    }

    /// The documents this device holds, with their metadata, by id.
    pub async fn list(&self) -> Result<Vec<(DocId, DocMeta)>, ClientError> {
        self.inner.own_account()?;
        let docs = self.inner.blocking(|store| store.list_docs(&LOCAL)).await?;
        docs.into_iter()
            .map(|(id, _, meta)| {
                Ok((id, DocMeta::decode(&meta).map_err(|_| ClientError::Damaged(id))?))
            })
            .collect()
    }

    /// Documents that were deleted elsewhere while this device had changes to them the server
    /// never got (offline edits that lost to the deletion), and forgets them: show them to the
    /// user once. Each is also told as [`DocEvent::Deleted`] with `discarded` when it happens.
    pub async fn take_discarded(&self) -> Result<Vec<Discarded>, ClientError> {
        self.inner
            .blocking(|store| {
                let found = store.scan_records(&LOCAL, Space::DISCARDED)?;
                for (key, _) in &found {
                    store.remove_record(&LOCAL, Space::DISCARDED, key)?;
                }
                store.flush()?;
                Ok::<_, StoreError>(found)
            })
            .await?
            .into_iter()
            .map(|(key, title)| {
                let id = DocId::from_slice(&key)
                    .map_err(|_| ClientError::Store(StoreError::Corrupt("discarded")))?;
                Ok(Discarded { id, title: String::from_utf8_lossy(&title).into_owned() })
            })
            .collect()
    }

    /// Documents with changes the server does not hold yet: local changes it has not
    /// acknowledged, and documents this device is offering back to a server that lost them.
    pub async fn unsynced(&self) -> Result<Vec<DocId>, ClientError> {
        let records = self
            .inner
            .blocking(|store| {
                let mut records = store.scan_records(&LOCAL, Space::UNSYNCED)?;
                records.extend(store.scan_records(&LOCAL, Space::HEAL)?);
                Ok::<_, StoreError>(records)
            })
            .await?;
        let ids: std::collections::BTreeSet<DocId> =
            records.iter().filter_map(|(k, _)| DocId::from_slice(k).ok()).collect();
        Ok(ids.into_iter().collect())
    }

    /// The sync status; `borrow()` for now, `changed().await` for updates.
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.inner.status.subscribe()
    }

    /// Every document event on this device from now on, with the document's id.
    pub fn events(&self) -> broadcast::Receiver<(DocId, DocEvent)> {
        self.inner.events.subscribe()
    }

    /// [`Client::events`] as a stream. A reader that falls behind gets one
    /// [`DocEvent::Missed`] (with no document: [`DocId`] all zeros) in place of what it missed.
    pub fn event_stream(
        &self,
    ) -> impl futures_util::Stream<Item = (DocId, DocEvent)> + Send + 'static {
        let unknown = DocId::from_bytes([0; 16]);
        event_stream(self.events(), move |count| (unknown, DocEvent::Missed { count }))
    }

    /// Starts background sync if it is not running (a client without a server stays offline).
    pub fn start_sync(&self) {
        let Some(remote) = &self.remote else { return };
        let mut sync = self.sync.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let SyncTask::Idle(_) = &*sync {
            let SyncTask::Idle(wakes) = std::mem::replace(&mut *sync, SyncTask::Stopped) else {
                unreachable!("matched just above")
            };
            let engine = engine::run(self.inner.clone(), remote.clone(), wakes);
            *sync = SyncTask::Running(tokio::spawn(engine));
        }
    }

    /// Stops syncing until [`Client::resume_sync`]: the connection closes and nothing is sent
    /// or received; edits stay on this device, marked unsynced (status [`SyncStatus::Paused`]).
    pub fn pause_sync(&self) {
        self.inner.paused.send_replace(true);
        if !self.sync_ended() {
            self.set_status_unless_wiped(SyncStatus::Paused);
        }
    }

    /// Says `status`, unless the device was wiped meanwhile (checked and set at once).
    fn set_status_unless_wiped(&self, status: SyncStatus) {
        self.inner.status.send_if_modified(|current| {
            let wiped = matches!(current, SyncStatus::Wiped { .. });
            if !wiped {
                *current = status;
            }
            !wiped
        });
    }

    /// Whether the engine stopped for good (wiped, another account's token, shut down): its
    /// last status stands.
    fn sync_ended(&self) -> bool {
        if matches!(*self.inner.status.borrow(), SyncStatus::Wiped { .. })
            || self.inner.foreign.load(std::sync::atomic::Ordering::SeqCst)
        {
            return true;
        }
        match &*self.sync.0.lock().unwrap_or_else(PoisonError::into_inner) {
            SyncTask::Stopped => true,
            SyncTask::Running(task) => task.is_finished(),
            SyncTask::Idle(_) => false,
        }
    }

    /// Syncs again after [`Client::pause_sync`] (and starts sync if it never ran).
    pub fn resume_sync(&self) {
        if *self.inner.paused.borrow() && !self.sync_ended() {
            // Said before the engine can move on, so a wait started now sees no stale `Paused`.
            let next = match self.remote {
                Some(_) => SyncStatus::Connecting,
                None => SyncStatus::Offline { failure: None },
            };
            self.set_status_unless_wiped(next);
        }
        self.inner.paused.send_replace(false);
        self.inner.reconnect.notify_waiters();
        self.start_sync();
    }

    /// Connects at once if sync is waiting to try again after a failure (an app coming to the
    /// foreground, or back on a network), rather than wait out the pause; the pauses start
    /// over from the shortest. Does nothing while connected or paused.
    pub fn reconnect_now(&self) {
        self.inner.reconnect.notify_waiters();
    }

    /// Waits until this device and the server hold the same changes, with this device's copy on
    /// its disk, or until a sync attempt fails (the engine keeps retrying in the background
    /// either way). Starts sync if needed.
    pub async fn wait_until_synced(&self) -> Result<(), SyncFailure> {
        if self.remote.is_none() {
            return Err(SyncFailure::Other("no server configured".into()));
        }
        self.start_sync();
        let mut status = self.status();
        loop {
            let current = status
                .wait_for(|s| {
                    matches!(
                        s,
                        SyncStatus::UpToDate
                            | SyncStatus::Offline { failure: Some(_) }
                            | SyncStatus::Refused { .. }
                            | SyncStatus::Wiped { .. }
                            | SyncStatus::Paused
                    )
                })
                .await
                .map_err(|_| SyncFailure::Other("sync stopped".into()))?
                .clone();
            match current {
                SyncStatus::Offline { failure: Some(failure) }
                | SyncStatus::Refused { failure, .. } => {
                    return Err(failure);
                }
                SyncStatus::Wiped { reason } => return Err(SyncFailure::Wipe(reason)),
                SyncStatus::Paused => return Err(SyncFailure::Paused),
                _ => {}
            }
            // The status follows the engine's view; the marks on disk follow the app's edits
            // too, and can clear without the status moving. Trust "up to date" only when
            // nothing is marked unsynced, and look again shortly if something still is.
            let unsynced = self.unsynced().await.map_err(|e| SyncFailure::Other(e.to_string()))?;
            if unsynced.is_empty() {
                // Changes from the server are stored without a flush of their own.
                return self
                    .inner
                    .blocking(|store| store.flush())
                    .await
                    .map_err(|e| SyncFailure::Other(e.to_string()));
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(50), status.changed()).await;
        }
    }

    /// Stops the background sync task, if it runs, and returns it to await if wanted.
    fn stop_sync(&self) -> Option<tokio::task::JoinHandle<()>> {
        let task = std::mem::replace(
            &mut *self.sync.0.lock().unwrap_or_else(PoisonError::into_inner),
            SyncTask::Stopped,
        );
        let SyncTask::Running(task) = task else { return None };
        task.abort();
        Some(task)
    }

    /// Stops syncing and closes the local store. Local data is already on disk.
    pub async fn shutdown(self) {
        if let Some(task) = self.stop_sync() {
            let _ = task.await;
        }
        // Let store work already started finish, so the store closes with this client (unless
        // the app still holds document handles).
        let _ = self.inner.blocking(|store| store.flush()).await;
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests;
