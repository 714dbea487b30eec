//! The background sync engine: one stream to the server, reconnecting with backoff.
//!
//! On connect the device says hello with its cursor; the server announces every document changed
//! since, and the device runs the Automerge sync protocol for those and for its own unsynced
//! documents. The cursor only moves past a feed position once this device holds every change the
//! server had at that position, so a reconnect never skips anything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cubby_core::DocId;
use cubby_proto::parts::Reassembly;
use cubby_proto::pb;
use cubby_store::{Space, StoreError};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::doc::{DocEvent, DocShared, remove_mark};
use crate::{ClientError, Inner, LOCAL};

mod connect;
mod receive;
mod status;
mod tls;
mod transport;

pub use status::{SyncFailure, SyncStatus, WipeReason};

use cubby_core::device::{Owed, Window, next_cursor};
pub(crate) use transport::{Dialer, Remote, classify, wipe_reason};

const MAX_MESSAGE: usize = 4 << 20;

/// The most bytes of sync messages in parts held at once (a whole document for a new device).
const MAX_REASSEMBLY: usize = 1 << 30;

/// The first reconnection waits up to this long (full jitter), doubling to 30 s after each
/// failure. A second spreads the devices of a restarted server over a second; 200 ms put half of
/// them on it within the first 100 ms (the simulation's herd, BAD_INPUTS row 30).
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest pause between reconnections, and between offers of a refused document.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long documents may stay owed with no word from the server before a fresh sync round.
const STALL: Duration = Duration::from_secs(2);

/// How many settled documents stay loaded after their exchange, and for how long after the
/// last one. A document someone types into on another device gets a change per keystroke;
/// loading it from the local store again for each costs the whole document (seconds of CPU per
/// keystroke for a long text) where applying the change costs the change.
const WARM_DOCS: usize = 8;
const WARM_FOR: Duration = Duration::from_secs(30);

/// Documents this device syncs at once when it connects, announced ones and its own unsynced
/// ones alike; the others wait their turn. A device that sends more than that before it reads
/// the answers loses its connection: the server closes the stream of a device that leaves too
/// many answers unread (256), and the device's own HTTP/2 layer closes a connection holding too
/// many small unread frames (h2's `too_many_data_frames`, half the connection window's worth of
/// per-frame overhead). A fresh device of a 16,000-document account hit the first; a device that
/// made 16,000 documents offline, the second. Each turn costs a round trip, so the window sets
/// a fresh device's pace on a slow link: 2,000 documents over 50 ms round trips took 3.9 s with
/// 32 at once, 1.5 s with 128 (1.3 s on loopback).
const MAX_ASKING: usize = 128;

/// Stored bytes of documents synced at once (an announced document's `DocInfo.size`, or the
/// local size of one edited offline): each is loaded whole while in an exchange, so a window of
/// large documents waits on memory, not on count. With nothing in an exchange, the next
/// document goes however large it is.
const MAX_ASKING_BYTES: u64 = 4 << 20;

/// Resolves once the app has paused syncing (at once if it has), or never if the client is gone.
async fn until_paused(paused: &mut tokio::sync::watch::Receiver<bool>) {
    if paused.wait_for(|p| *p).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn store_failure(err: impl std::fmt::Display) -> SyncFailure {
    SyncFailure::Other(format!("local store: {err}"))
}

/// Runs until the client shuts down.
pub(crate) async fn run(
    inner: Arc<Inner>,
    remote: Remote,
    mut wakes: mpsc::UnboundedReceiver<DocId>,
) {
    let (first, longest) = inner.retry;
    let mut backoff = first;
    let mut refresh = false;
    let mut paused = inner.paused.subscribe();
    loop {
        if *paused.borrow_and_update() {
            inner.status.send_replace(SyncStatus::Paused);
            if paused.wait_for(|p| !*p).await.is_err() {
                return; // The client is gone.
            }
            backoff = first;
        }
        inner.status.send_replace(SyncStatus::Connecting);
        let started = Instant::now();
        let mut session = Session::new(&inner);
        let failure = session.run(&remote, refresh, &mut wakes).await;
        tracing::debug!(device = %inner.device_id.short(), %failure, "sync connection ended");
        if failure == SyncFailure::Paused {
            continue;
        }
        if let SyncFailure::Wipe(reason) = failure {
            inner.wipe(reason).await;
            return;
        }
        if failure == SyncFailure::WrongAccount {
            tracing::error!(device = %inner.device_id.short(), %failure, "sync stopped");
            inner.foreign.store(true, std::sync::atomic::Ordering::SeqCst);
            inner.status.send_replace(SyncStatus::Offline { failure: Some(failure) });
            return;
        }
        let refused = matches!(failure, SyncFailure::Unauthenticated(_));
        // Reconnect at once with a fresh token unless the refused one was fresh already: then
        // back off. A stream that was up longer than the first backoff and lost its token under
        // it (it expired, and no fresh one reached the server in time) is not such a refusal.
        let retry_token = refused && (!refresh || started.elapsed() >= FIRST_BACKOFF);
        refresh = refused;
        inner.status.send_replace(SyncStatus::Offline { failure: Some(failure) });
        // A connection that got up to date, or lived 30 s, was a good one: start backing off
        // from the bottom again.
        if session.reached_up_to_date || started.elapsed() > Duration::from_secs(30) {
            backoff = first;
        }
        if retry_token {
            continue; // The token expired: get a fresh one and reconnect at once.
        }
        // Full jitter: anywhere up to the current backoff, so a restarted server is not
        // met by every device at the same instant.
        let jitter = u16::from_be_bytes(cubby_crypto::random_array::<2>());
        let delay = backoff.mul_f64(f64::from(jitter) / f64::from(u16::MAX));
        backoff = (backoff * 2).min(longest);
        let deadline = tokio::time::Instant::now() + delay;
        // Local edits made meanwhile are already marked unsynced on disk; just drain the wakes.
        let drained = async {
            while tokio::time::timeout_at(deadline, wakes.recv()).await.is_ok_and(|w| w.is_some()) {
            }
        };
        tokio::select! {
            () = drained => {}
            () = inner.reconnect.notified() => backoff = first,
            () = until_paused(&mut paused) => {}
        }
    }
}

struct Session<'a> {
    inner: &'a Arc<Inner>,
    /// Documents involved in this connection, kept loaded until they are synced.
    active: HashMap<DocId, Arc<DocShared>>,
    /// Documents settled lately, oldest first, kept loaded (see [`WARM_DOCS`]).
    warm: Vec<(Instant, Arc<DocShared>)>,
    /// Documents waiting their turn to be synced, and those in an exchange (see
    /// [`MAX_ASKING`]).
    window: Window,
    /// What the device and the server still owe each other, by document.
    owed: Owed,
    /// Per document, the highest feed position whose changes this device holds.
    held: HashMap<DocId, u64>,
    announced: u64,
    cursor: u64,
    caught_up: bool,
    /// This connection got up to date at least once.
    reached_up_to_date: bool,
    out: Option<mpsc::Sender<pb::ClientFrame>>,
    /// Sync messages arriving in parts.
    parts: Reassembly,
    /// Documents whose changes the server refused on this connection, until it takes them.
    refused: HashMap<DocId, Refusal>,
    /// Documents to offer back (`Space::HEAL`) once `CaughtUp` arrives, unless announced
    /// deleted before it.
    healing: Vec<DocId>,
    /// Documents offered back on this connection: their messages carry `create` until the
    /// server answers. Per connection: only after `CaughtUp` is a document known not deleted.
    heal: HashSet<DocId>,
    /// Documents the server said it does not have (`NOT_FOUND`), and when: deleted, or lost.
    /// A deletion is announced right behind; one not announced within [`STALL`] after
    /// `CaughtUp` was lost, and a new connection offers it back (its catch-up tells the two
    /// apart for certain).
    unknown: HashMap<DocId, Instant>,
}

/// Where the device keeps the server epoch its cursor and sync states belong to
/// (`Challenge.epoch`), and the account its data belongs to (`Challenge.account`).
const EPOCH: &[u8] = b"epoch";
const ACCOUNT: &[u8] = b"account";
/// Where the device keeps its cursor in the server's change feed.
const CURSOR: &[u8] = b"cursor";

/// What the device kept from its last connection.
struct Kept {
    epoch: Option<Vec<u8>>,
    account: Option<Vec<u8>>,
}

/// A document the server refused changes to (`RESOURCE_EXHAUSTED`: a limit of the customer's).
struct Refusal {
    /// When to offer its changes again; `None` once offered, until the server answers.
    retry_at: Option<Instant>,
    /// How long the last pause was (it doubles with each refusal).
    pause: Duration,
    failure: SyncFailure,
}

impl<'a> Session<'a> {
    pub(super) fn new(inner: &'a Arc<Inner>) -> Self {
        Self {
            inner,
            active: HashMap::new(),
            warm: Vec::new(),
            window: Window::new(MAX_ASKING, MAX_ASKING_BYTES),
            owed: Owed::default(),
            held: HashMap::new(),
            announced: 0,
            cursor: 0,
            caught_up: false,
            reached_up_to_date: false,
            out: None,
            parts: Reassembly::new(MAX_REASSEMBLY),
            refused: HashMap::new(),
            healing: Vec::new(),
            heal: HashSet::new(),
            unknown: HashMap::new(),
        }
    }

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn cubby_store::Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SyncFailure> {
        self.inner.blocking(f).await.map_err(store_failure)
    }

    pub(super) async fn run(
        &mut self,
        remote: &Remote,
        refresh: bool,
        wakes: &mut mpsc::UnboundedReceiver<DocId>,
    ) -> SyncFailure {
        match self.serve(remote, refresh, wakes).await {
            Ok(never) => match never {},
            Err(failure) => failure,
        }
    }

    pub(super) async fn serve(
        &mut self,
        remote: &Remote,
        refresh: bool,
        wakes: &mut mpsc::UnboundedReceiver<DocId>,
    ) -> Result<std::convert::Infallible, SyncFailure> {
        let mut inbound = self.open(remote, refresh).await?;
        let (unsynced, healing) = self
            .blocking(|store| {
                let unsynced = store.scan_records(&LOCAL, Space::UNSYNCED)?;
                Ok((unsynced, store.scan_records(&LOCAL, Space::HEAL)?))
            })
            .await?;
        let ids = |records: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<DocId> {
            records.iter().filter_map(|(key, _)| DocId::from_slice(key).ok()).collect()
        };
        let (unsynced, healing) = (ids(unsynced), ids(healing));

        tracing::debug!(device = %self.inner.device_id.short(), cursor = self.cursor,
            unsynced = unsynced.len(), "connected");
        self.inner.status.send_replace(SyncStatus::Syncing { done: 0, total: unsynced.len() });
        // Documents edited offline take turns with announced ones: a device that sent all of
        // thousands before reading an answer had its connection closed under it. Documents
        // offered back to a server that lost them wait for `CaughtUp`, so that deletions made
        // since reach this device before it offers them (it would make them again).
        for &doc in &healing {
            self.owed.unsynced(doc);
            self.healing.push(doc);
        }
        for doc in unsynced {
            if !self.owed.contains(&doc) {
                self.owed.unsynced(doc);
                self.window.wait(doc, 0);
            }
        }
        self.ask_waiting().await?;
        let mut watchdog = tokio::time::interval(STALL);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut paused = self.inner.paused.subscribe();
        let mut heard = Instant::now();
        // A fresh token being fetched for this stream, which the server asked for.
        let mut renewing: Option<crate::TokenFuture> = None;
        loop {
            let next_offer = self.refused.values().filter_map(|r| r.retry_at).min();
            tokio::select! {
                () = sleep_until_or_never(next_offer) => {
                    self.offer_refused_again().await?;
                    self.report();
                }
                _ = watchdog.tick() => {
                    self.warm.retain(|(settled, _)| settled.elapsed() < WARM_FOR);
                    let lost = self.unknown.values().filter(|at| at.elapsed() >= STALL).count();
                    if self.caught_up && lost > 0 {
                        return Err(SyncFailure::Other(format!(
                            "the server does not have {lost} document(s) this device holds and \
                             did not announce them deleted; reconnecting to offer them back"
                        )));
                    }
                    if heard.elapsed() >= STALL {
                        self.resync_stalled().await?;
                        heard = Instant::now();
                    }
                }
                frame = inbound.message() => match frame {
                    Ok(Some(pb::ServerFrame {
                        frame: Some(pb::server_frame::Frame::TokenExpiring(expiring)),
                    })) => {
                        // The stream lasts as long as its token: send a fresh one on it rather
                        // than reconnect when it expires.
                        heard = Instant::now();
                        tracing::debug!(device = %self.inner.device_id.short(),
                            seconds_left = expiring.seconds_left, "fetching a fresh token");
                        renewing = Some(remote.token.token(true));
                    }
                    Ok(Some(frame)) => {
                        heard = Instant::now();
                        self.on_frame(frame).await?;
                    }
                    Ok(None) => {
                        return Err(SyncFailure::Other("the server closed the stream".into()));
                    }
                    Err(status) => return Err(classify(&status)),
                },
                token = async {
                    renewing.as_mut().expect("polled only while a token is being fetched").await
                },
                    if renewing.is_some() =>
                {
                    renewing = None;
                    match token {
                        Ok(token) => {
                            self.send(pb::client_frame::Frame::FreshToken(pb::FreshToken {
                                token,
                            }))
                            .await?;
                        }
                        // The stream closes when its token expires; the reconnect asks again.
                        Err(err) => tracing::warn!(device = %self.inner.device_id.short(),
                            %err, "no fresh token for the sync stream"),
                    }
                }
                () = until_paused(&mut paused) => return Err(SyncFailure::Paused),
                Some(doc) = wakes.recv() => {
                    self.owed.unsynced(doc);
                    if self.refused.get(&doc).is_some_and(|r| r.retry_at.is_some())
                        || self.unknown.contains_key(&doc)
                    {
                        // Refused and pausing, or unknown to the server: this edit goes with
                        // the next offer.
                        continue;
                    }
                    self.push(doc).await?;
                    // A wake can be stale: an earlier push may already have carried this change
                    // and been acknowledged (clearing its mark, which the document's writer
                    // stored first). Then nothing was sent and no reply will come.
                    if self.active.get(&doc).is_some_and(|d| d.server_has_everything()) {
                        self.owed.acknowledged(doc);
                        self.release(doc);
                        self.ask_waiting().await?;
                    }
                    self.report();
                }
            }
        }
    }

    /// Tells the app the server holds every change this device made to `shared`'s document.
    pub(super) fn synced(&self, shared: &DocShared) {
        shared.emit(DocEvent::Synced);
        let _ = self.inner.events.send((shared.id, DocEvent::Synced));
    }

    /// Liveness: documents still owed after [`STALL`] without a word from the server start a
    /// fresh sync round. The sync protocol is idempotent, so this costs at most a message.
    pub(super) async fn resync_stalled(&mut self) -> Result<(), SyncFailure> {
        // Documents waiting their turn are asked for when it comes, refused ones after their
        // pause.
        let waiting: HashSet<DocId> = self.window.waiting().collect();
        let pausing = |id: &DocId| {
            self.refused.get(id).is_some_and(|r| r.retry_at.is_some())
                || self.unknown.contains_key(id)
        };
        let owed: Vec<DocId> =
            self.owed.docs().filter(|id| !waiting.contains(id) && !pausing(id)).collect();
        for id in owed {
            tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(),
                "no progress; starting a fresh sync round");
            if let Some(shared) = self.active.get(&id) {
                shared.reconnect();
            }
            self.push(id).await?;
        }
        Ok(())
    }

    pub(super) async fn doc(&mut self, id: DocId) -> Result<Arc<DocShared>, SyncFailure> {
        if let Some(shared) = self.active.get(&id) {
            return Ok(shared.clone());
        }
        let shared = self.inner.doc(id).await.map_err(store_failure)?;
        self.active.insert(id, shared.clone());
        Ok(shared)
    }

    pub(super) async fn send(&self, frame: pb::client_frame::Frame) -> Result<(), SyncFailure> {
        let out = self.out.as_ref().ok_or_else(|| SyncFailure::Other("not connected".into()))?;
        out.send(pb::ClientFrame { frame: Some(frame) })
            .await
            .map_err(|_| SyncFailure::Other("the stream closed".into()))
    }

    /// Sends the server whatever the sync protocol has to say about `id`.
    pub(super) async fn push(&mut self, id: DocId) -> Result<(), SyncFailure> {
        let shared = match self.active.get(&id) {
            Some(shared) => shared.clone(),
            None => match self.inner.doc(id).await {
                Ok(shared) => self.active.entry(id).or_insert(shared).clone(),
                // Deleted meanwhile: nothing is owed of it, and no mark is left behind.
                Err(ClientError::UnknownDocument(_)) => {
                    self.owed.forget(id);
                    self.blocking(move |store| remove_mark(store, id)).await?;
                    return Ok(());
                }
                Err(err) => {
                    tracing::warn!(doc = %id.short(), %err, "cannot load local document");
                    return Ok(());
                }
            },
        };
        // Offered back on this connection (`heal`), or made here and not yet seen.
        let Some((message, create)) = shared.generate(self.heal.contains(&id)) else {
            tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(),
                "push: nothing to say");
            return Ok(());
        };
        tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(), "push");
        let frame = crate::wire::sync(id, message, create.as_ref());
        self.send(frame).await
    }
}
