//! The background sync engine: one stream to the server, reconnecting with backoff.
//!
//! On connect the device says hello with its cursor; the server announces every document changed
//! since, and the device runs the Automerge sync protocol for those and for its own unsynced
//! documents. The cursor only moves past a feed position once this device holds every change the
//! server had at that position, so a reconnect never skips anything.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cubby_core::{DocId, DocMeta};
use cubby_proto::parts::Reassembly;
use cubby_proto::pb;
use cubby_store::{Space, StoreError};
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::doc::{DocEvent, DocShared, MARK_DIRTY, MARK_NEW};
use crate::{ClientError, Inner, LOCAL, TokenProvider};

/// Where syncing stands.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncStatus {
    /// Not connected; `failure` says why the last attempt ended.
    Offline {
        /// The last failure, if any.
        failure: Option<SyncFailure>,
    },
    /// Connecting to the server.
    Connecting,
    /// Connected, `done` of `total` documents synced in this round.
    Syncing {
        /// Documents finished.
        done: usize,
        /// Documents in this round.
        total: usize,
    },
    /// Connected, and this device and the server hold the same changes.
    UpToDate,
    /// Connected, but the server refused this device's changes to some documents for now: a
    /// limit of the customer's (writes per second, a document's or the account's size). They
    /// stay on this device and are offered again after a pause (1 s, doubling to 30 s while
    /// refused); every other document keeps syncing on the same connection.
    Refused {
        /// The server's refusal (of the document refused longest).
        failure: SyncFailure,
        /// Every document paused, by id.
        documents: Vec<DocId>,
    },
    /// The server told this device to wipe its local copy, and it did; syncing has stopped.
    Wiped {
        /// Why.
        reason: WipeReason,
    },
}

/// Why the server told a device to wipe its local copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WipeReason {
    /// The customer revoked this device.
    DeviceRevoked,
    /// The customer's account was erased.
    AccountErased,
}

/// Why a sync connection ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncFailure {
    /// The server could not be reached.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// The server refused the token.
    #[error("token rejected: {0}")]
    Unauthenticated(String),
    /// The server refused this device or customer.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The server told this device to wipe its local copy.
    #[error("the server told this device to wipe: {0:?}")]
    Wipe(WipeReason),
    /// The token speaks for another account than the one whose data this device holds: nothing
    /// is synced (a device's data directory belongs to one account; use another for another).
    #[error(
        "this device's data belongs to another account than the token's; use another data \
         directory for this account"
    )]
    WrongAccount,
    /// Anything else the server or the local store said.
    #[error("{0}")]
    Other(String),
}

const MAX_MESSAGE: usize = 4 << 20;

/// The most bytes of sync messages in parts held at once (a whole document for a new device).
const MAX_REASSEMBLY: usize = 1 << 30;

/// The first reconnection waits up to this long (full jitter), doubling to 30 s after each
/// failure. A second spreads the devices of a restarted server over a second; 200 ms put half of
/// them on it within the first 100 ms (the simulation's herd, BAD_INPUTS row 30).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest pause between reconnections, and between offers of a refused document.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

/// How to reach the server.
#[derive(Clone)]
pub(crate) struct Remote {
    endpoint: Endpoint,
    token: Arc<dyn TokenProvider>,
    dialer: Option<Dialer>,
}

/// A byte stream to the server opened by the app's own transport.
pub(crate) trait Transport:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Transport for T {}

type Dialed = std::pin::Pin<
    Box<dyn Future<Output = std::io::Result<TokioIo<Box<dyn Transport>>>> + Send + 'static>,
>;

/// A custom transport (`ClientBuilder::with_transport`), as the connector tonic dials with.
#[derive(Clone)]
pub(crate) struct Dialer(Arc<dyn Fn() -> Dialed + Send + Sync>);

impl Dialer {
    pub(crate) fn new<F, Fut, T>(dial: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<T>> + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        Self(Arc::new(move || {
            let dialing = dial();
            Box::pin(async move {
                let io: Box<dyn Transport> = Box::new(dialing.await?);
                Ok(TokioIo::new(io))
            })
        }))
    }
}

impl tower_service::Service<tonic::codegen::http::Uri> for Dialer {
    type Response = TokioIo<Box<dyn Transport>>;
    type Error = std::io::Error;
    type Future = Dialed;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        (self.0)()
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Remote {
    pub(crate) fn new(
        url: &str,
        token: Arc<dyn TokenProvider>,
        ca_pem: Option<Vec<u8>>,
        dialer: Option<Dialer>,
    ) -> Result<Self, ClientError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bad = |e: tonic::transport::Error| {
            ClientError::Config(format!("server {url:?}: {}", chain(&e)))
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let tls = match ca_pem {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_webpki_roots(),
            };
            endpoint = endpoint.tls_config(tls).map_err(bad)?;
        } else if !url.starts_with("http://") {
            return Err(ClientError::Config(format!("server {url:?} must start with https://")));
        }
        Ok(Self { endpoint, token, dialer })
    }

    /// A connection to the server, over TCP or the custom transport.
    async fn connect(&self) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match &self.dialer {
            Some(dialer) => self.endpoint.connect_with_connector(dialer.clone()).await,
            None => self.endpoint.connect().await,
        }
    }

    /// A token to tell the account it speaks for, if the provider has one within a few seconds.
    pub(crate) async fn token_for_check(&self) -> Option<String> {
        let asked = tokio::time::timeout(Duration::from_secs(5), self.token.token(false));
        asked.await.ok()?.ok()
    }

    /// A connected account client and a current token, for one unary call.
    pub(crate) async fn account(
        &self,
    ) -> Result<(pb::account_client::AccountClient<tonic::transport::Channel>, String), ClientError>
    {
        let token =
            self.token.token(false).await.map_err(|e| ClientError::Server(e.to_string()))?;
        let channel = self
            .connect()
            .await
            .map_err(|e| ClientError::Server(format!("server unreachable: {}", chain(&e))))?;
        let client = pb::account_client::AccountClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok((client, token))
    }
}

/// Whether a status tells the device to wipe its local copy.
pub(crate) fn wipe_reason(status: &tonic::Status) -> Option<WipeReason> {
    match status.metadata().get(cubby_proto::WIPE_METADATA)?.to_str().ok()? {
        cubby_proto::WIPE_REVOKED => Some(WipeReason::DeviceRevoked),
        cubby_proto::WIPE_ERASED => Some(WipeReason::AccountErased),
        _ => None,
    }
}

pub(crate) fn classify(status: &tonic::Status) -> SyncFailure {
    if let Some(reason) = wipe_reason(status) {
        return SyncFailure::Wipe(reason);
    }
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::Unauthenticated => SyncFailure::Unauthenticated(message),
        tonic::Code::PermissionDenied => SyncFailure::PermissionDenied(message),
        tonic::Code::Unavailable
            if message.contains("transport") || message.contains("connect") =>
        {
            SyncFailure::Unreachable(message)
        }
        _ => SyncFailure::Other(format!("{:?}: {message}", status.code())),
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
    let mut backoff = FIRST_BACKOFF;
    let mut refresh = false;
    loop {
        inner.status.send_replace(SyncStatus::Connecting);
        let started = Instant::now();
        let mut session = Session::new(&inner);
        let failure = session.run(&remote, refresh, &mut wakes).await;
        tracing::debug!(device = %inner.device_id.short(), %failure, "sync connection ended");
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
            backoff = FIRST_BACKOFF;
        }
        if retry_token {
            continue; // The token expired: get a fresh one and reconnect at once.
        }
        // Full jitter: anywhere up to the current backoff, so a restarted server is not
        // met by every device at the same instant.
        let jitter = u16::from_be_bytes(cubby_crypto::random_array::<2>());
        let delay = backoff.mul_f64(f64::from(jitter) / f64::from(u16::MAX));
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let deadline = tokio::time::Instant::now() + delay;
        // Local edits made meanwhile are already marked unsynced on disk; just drain the wakes.
        while tokio::time::timeout_at(deadline, wakes.recv()).await.is_ok_and(|w| w.is_some()) {}
    }
}

struct Session<'a> {
    inner: &'a Arc<Inner>,
    /// Documents involved in this connection, kept loaded until they are synced.
    active: HashMap<DocId, Arc<DocShared>>,
    /// Documents settled lately, oldest first, kept loaded (see [`WARM_DOCS`]).
    warm: Vec<(Instant, Arc<DocShared>)>,
    /// Documents waiting for their turn to be synced, with their stored size where the server
    /// announced it (see [`MAX_ASKING`]).
    waiting: VecDeque<(DocId, u64)>,
    /// Documents asked for from `waiting` and their stored sizes, while in an exchange.
    asking: HashMap<DocId, u64>,
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
    fn new(inner: &'a Arc<Inner>) -> Self {
        Self {
            inner,
            active: HashMap::new(),
            warm: Vec::new(),
            waiting: VecDeque::new(),
            asking: HashMap::new(),
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

    /// Takes the server's epoch and account from its challenge. A new epoch (the server's
    /// store was restored, or found behind what a device had seen) voids everything the device
    /// knew of the server: its cursor goes back to 0, its sync states are forgotten, and every
    /// document it holds is marked to be offered back, with what the server needs to make it
    /// (`Space::HEAL`), after `CaughtUp`. The marks and the new epoch are stored together and
    /// flushed, so a crash meanwhile loses none of it. A device that never synced just keeps the
    /// epoch.
    async fn take_epoch(
        &mut self,
        kept: &Kept,
        cursor: u64,
        challenge: &pb::Challenge,
    ) -> Result<(), SyncFailure> {
        if kept.epoch.as_deref() == Some(challenge.epoch.as_slice()) && kept.account.is_some() {
            return Ok(());
        }
        let heal = kept.epoch.as_deref().is_some_and(|e| e != challenge.epoch.as_slice())
            || (kept.epoch.is_none() && cursor > 0);
        let (epoch, account) = (challenge.epoch.clone(), challenge.account.clone());
        let offered = self
            .blocking(move |store| {
                let mut offered = 0;
                if heal {
                    for (id, _, _) in store.list_docs(&LOCAL)? {
                        let key = id.as_bytes();
                        store.put_record(&LOCAL, Space::HEAL, key, &[])?;
                        store.remove_record(&LOCAL, Space::SYNC_STATES, key)?;
                        offered += 1;
                    }
                    store.put_record(&LOCAL, Space::LOCAL, b"cursor", &0u64.to_be_bytes())?;
                }
                store.put_record(&LOCAL, Space::LOCAL, EPOCH, &epoch)?;
                store.put_record(&LOCAL, Space::LOCAL, ACCOUNT, &account)?;
                store.flush()?;
                Ok(offered)
            })
            .await?;
        if heal {
            tracing::warn!(device = %self.inner.device_id.short(), documents = offered,
                "the server started a new epoch (its store was restored or found behind): \
                 offering back everything this device holds");
            self.inner.heal_sessions();
            self.cursor = 0;
            self.announced = 0;
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn cubby_store::Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SyncFailure> {
        self.inner.blocking(f).await.map_err(store_failure)
    }

    async fn run(
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

    async fn serve(
        &mut self,
        remote: &Remote,
        refresh: bool,
        wakes: &mut mpsc::UnboundedReceiver<DocId>,
    ) -> Result<std::convert::Infallible, SyncFailure> {
        let token =
            remote.token.token(refresh).await.map_err(|e| SyncFailure::Unauthenticated(e.0))?;
        let channel = remote.connect().await.map_err(|e| SyncFailure::Unreachable(chain(&e)))?;
        let mut client = pb::sync_client::SyncClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);

        let (cursor, kept) = self
            .blocking(|store| {
                let cursor = store
                    .get_record(&LOCAL, Space::LOCAL, b"cursor")?
                    .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
                    .unwrap_or(0);
                let epoch = store.get_record(&LOCAL, Space::LOCAL, EPOCH)?;
                let account = store.get_record(&LOCAL, Space::LOCAL, ACCOUNT)?;
                Ok((cursor, Kept { epoch, account }))
            })
            .await?;
        self.cursor = cursor;
        self.announced = cursor;
        let (out, frames) = mpsc::channel(256);
        let hello = pb::Hello {
            device_id: self.inner.device_id.as_bytes().to_vec(),
            cursor,
            client_version: concat!("cubby-client/", env!("CARGO_PKG_VERSION")).into(),
            device_name: self.inner.device_name.clone(),
            platform: self.inner.platform.clone(),
            public_key: self.inner.device_key.public_key().to_vec(),
            epoch: kept.epoch.clone().unwrap_or_default(),
        };
        out.send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Hello(hello)) })
            .await
            .map_err(|_| SyncFailure::Other("stream closed".into()))?;
        self.out = Some(out);
        // A queued frame is one sync message; on the wire it may take several parts.
        let frames = ReceiverStream::new(frames).flat_map(|frame| {
            futures_util::stream::iter(cubby_proto::parts::split_client_frame(frame))
        });
        let mut request = tonic::Request::new(frames);
        let header = format!("Bearer {token}").parse().map_err(|_| {
            SyncFailure::Unauthenticated("the token has characters a header cannot carry".into())
        })?;
        request.metadata_mut().insert("authorization", header);
        let mut inbound = client.connect(request).await.map_err(|s| classify(&s))?.into_inner();
        // The server's first frame is a challenge: prove this device's key before anything else.
        match inbound.message().await.map_err(|s| classify(&s))? {
            Some(pb::ServerFrame {
                frame: Some(pb::server_frame::Frame::Challenge(challenge)),
            }) => {
                // Another account's token on this device's data: say nothing, sync nothing.
                if kept.account.as_ref().is_some_and(|kept| *kept != challenge.account) {
                    return Err(SyncFailure::WrongAccount);
                }
                self.take_epoch(&kept, cursor, &challenge).await?;
                let signature =
                    self.inner.device_key.prove(self.inner.device_id.as_bytes(), &challenge.nonce);
                self.send(pb::client_frame::Frame::Proof(pb::Proof { signature })).await?;
            }
            Some(_) => {
                return Err(SyncFailure::Other("the server did not send a challenge".into()));
            }
            None => return Err(SyncFailure::Other("the server closed the stream".into())),
        }
        // Sessions of documents still loaded from the last connection may wait for answers that
        // will never come: start them over, as if loaded from disk.
        self.inner.reconnect_sessions();
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

        tracing::debug!(device = %self.inner.device_id.short(), cursor,
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
                self.waiting.push_back((doc, 0));
            }
        }
        self.ask_waiting().await?;
        let mut watchdog = tokio::time::interval(STALL);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    // and been acknowledged. Then nothing was sent and no reply will clear it.
                    if self.active.get(&doc).is_some_and(|d| {
                        let state = d.lock();
                        state.session.peer_has_everything(state.history.doc())
                    }) {
                        self.clear_acknowledged_mark(doc).await?;
                        self.owed.acknowledged(doc);
                        self.release(doc);
                        self.ask_waiting().await?;
                    }
                    self.report();
                }
            }
        }
    }

    /// Clears `id`'s unsynced mark on disk if the server holds everything of it. The app's edit
    /// reaches the in-memory document before its mark reaches the disk, so a push for an
    /// earlier wake can carry the edit and be acknowledged before the mark lands: the reply then
    /// finds nothing to clear, and the mark would outlive the change (most likely what kept
    /// `wait_until_synced` polling for 20 minutes in one test run).
    async fn clear_acknowledged_mark(&self, id: DocId) -> Result<(), SyncFailure> {
        let Some(shared) = self.active.get(&id).cloned() else { return Ok(()) };
        let check = shared.clone();
        let cleared = self
            .blocking(move |store| {
                let state = check.lock();
                // Only on the server's word in this connection, and never for a document the
                // server has not confirmed: an empty new document "has everything" trivially.
                let heard = state.session.their_heads().is_some();
                if state.unconfirmed
                    || !heard
                    || !state.session.peer_has_everything(state.history.doc())
                {
                    return Ok(false);
                }
                remove_mark(store, id)
            })
            .await?;
        if cleared {
            self.synced(&shared);
        }
        Ok(())
    }

    /// Tells the app the server holds every change this device made to `shared`'s document.
    fn synced(&self, shared: &DocShared) {
        shared.emit(DocEvent::Synced);
        let _ = self.inner.events.send((shared.id, DocEvent::Synced));
    }

    /// Liveness: documents still owed after [`STALL`] without a word from the server start a
    /// fresh sync round. The sync protocol is idempotent, so this costs at most a message.
    async fn resync_stalled(&mut self) -> Result<(), SyncFailure> {
        // Documents waiting their turn are asked for when it comes, refused ones after their
        // pause.
        let waiting: HashSet<DocId> = self.waiting.iter().map(|(id, _)| *id).collect();
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
                shared.lock().session.reconnect();
            }
            self.push(id).await?;
        }
        Ok(())
    }

    async fn doc(&mut self, id: DocId) -> Result<Arc<DocShared>, SyncFailure> {
        if let Some(shared) = self.active.get(&id) {
            return Ok(shared.clone());
        }
        let shared = self.inner.doc(id).await.map_err(store_failure)?;
        self.active.insert(id, shared.clone());
        Ok(shared)
    }

    async fn send(&self, frame: pb::client_frame::Frame) -> Result<(), SyncFailure> {
        let out = self.out.as_ref().ok_or_else(|| SyncFailure::Other("not connected".into()))?;
        out.send(pb::ClientFrame { frame: Some(frame) })
            .await
            .map_err(|_| SyncFailure::Other("the stream closed".into()))
    }

    /// Sends the server whatever the sync protocol has to say about `id`.
    async fn push(&mut self, id: DocId) -> Result<(), SyncFailure> {
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
        let frame = {
            let mut state = shared.lock();
            let state = &mut *state;
            let Some(message) = state.session.generate(state.history.doc()) else {
                tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(),
                    ours = ?state.history.doc().get_heads(), theirs = ?state.session.their_heads(),
                    "push: nothing to say");
                return Ok(());
            };
            tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(),
                ours = ?state.history.doc().get_heads(), "push");
            // Offered back on this connection (`heal`), or made here and not yet seen.
            let create = (state.unconfirmed || self.heal.contains(&id)).then(|| pb::NewDoc {
                title: state.meta.title.clone(),
                private: state.meta.private,
            });
            pb::DocSync { doc_id: id.as_bytes().to_vec(), message, create, seq: 0, more: false }
        };
        self.send(pb::client_frame::Frame::Sync(frame)).await
    }

    async fn on_frame(&mut self, frame: pb::ServerFrame) -> Result<(), SyncFailure> {
        match frame.frame {
            Some(pb::server_frame::Frame::Sync(part)) => {
                let whole = self.parts.push(part).map_err(|e| SyncFailure::Other(e.to_string()))?;
                let Some(sync) = whole else { return Ok(()) };
                self.on_sync(sync).await?;
            }
            Some(pb::server_frame::Frame::Changed(changed)) => self.on_changed(changed).await?,
            Some(pb::server_frame::Frame::CaughtUp(caught_up)) => {
                self.announced = self.announced.max(caught_up.cursor);
                self.caught_up = true;
                // Deleted meanwhile ones are gone from the device (and their marks with them).
                for doc in std::mem::take(&mut self.healing) {
                    if self.owed.contains(&doc) {
                        self.heal.insert(doc);
                        self.unknown.remove(&doc);
                        self.waiting.push_back((doc, 0));
                    }
                }
                // A deletion is announced shortly after `CaughtUp`, whenever `NOT_FOUND` came.
                let now = Instant::now();
                self.unknown.values_mut().for_each(|at| *at = now);
            }
            Some(pb::server_frame::Frame::Error(error)) => self.on_error(error).await?,
            Some(pb::server_frame::Frame::Challenge(_)) => {
                return Err(SyncFailure::Other("the server sent a second challenge".into()));
            }
            // Taken by `serve`, which fetches the token.
            Some(pb::server_frame::Frame::TokenExpiring(_)) => {}
            None => {}
        }
        self.ask_waiting().await?;
        self.advance_cursor().await?;
        self.report();
        Ok(())
    }

    /// Syncs waiting documents while fewer than [`MAX_ASKING`] are in an exchange and those
    /// asked for hold fewer than [`MAX_ASKING_BYTES`].
    async fn ask_waiting(&mut self) -> Result<(), SyncFailure> {
        self.asking.retain(|id, _| self.active.contains_key(id));
        let mut bytes: u64 = self.asking.values().sum();
        loop {
            let busy = !self.active.is_empty() && bytes >= MAX_ASKING_BYTES;
            if busy || self.active.len() >= MAX_ASKING {
                break;
            }
            let Some((id, size)) = self.waiting.pop_front() else { break };
            // Held meanwhile, deleted, or asked for already by a local edit.
            if self.owed.contains(&id) && !self.active.contains_key(&id) {
                self.push(id).await?;
                // A document edited offline is weighed by its local copy, now loaded.
                let local = self.active.get(&id).map_or(0, |d| d.lock().meta.size);
                let size = size.max(local);
                self.asking.insert(id, size);
                bytes += size;
            }
        }
        Ok(())
    }

    async fn on_sync(&mut self, sync: pb::DocSync) -> Result<(), SyncFailure> {
        let Ok(id) = DocId::from_slice(&sync.doc_id) else { return Ok(()) };
        self.unknown.remove(&id);
        self.heal.remove(&id);
        let shared = self.doc(id).await?;
        let (write, reply, holds, server_has_all, changed, was_unconfirmed, settled) = {
            let mut state = shared.lock();
            let state = &mut *state;
            let shared_before = state.session.shared_heads().to_vec();
            if let Err(err) = state.session.receive(state.history.doc_mut(), &sync.message) {
                tracing::warn!(doc = %id.short(), %err, "server sync message refused");
                return Ok(());
            }
            // The session is saved only when what it keeps (the shared heads) moved: an
            // acknowledgement of what the device already knew costs no local write or flush.
            let moved = state.session.shared_heads() != shared_before;
            let write = state.take_write(moved);
            let changed = write.as_ref().is_some_and(|w| w.chunk.is_some());
            let was_unconfirmed = std::mem::take(&mut state.unconfirmed);
            let holds = state.session.has_everything_peer_has(state.history.doc());
            let server_has_all = state.session.peer_has_everything(state.history.doc());
            let reply = state.session.generate(state.history.doc());
            // Changes whose dependencies have not arrived wait in the document's queue, which
            // is not persisted, and the server will not send them twice on this connection: keep
            // the document loaded until the exchange has settled. A reply sent once it has
            // settled only acknowledges, and the server does not answer that.
            let settled = state.session.settled(state.history.doc());
            (write, reply, holds, server_has_all, changed, was_unconfirmed, settled)
        };
        // The server holds these changes durably: show them now, store them right after, and
        // leave the flush to the store's next one (see `LocalWrite::apply_unflushed`).
        if changed {
            shared.emit(DocEvent::Remote);
            let _ = self.inner.events.send((id, DocEvent::Remote));
        }
        let check = shared.clone();
        let device = self.inner.device_id;
        let acknowledged = self
            .blocking(move |store| {
                if let Some(write) = &write {
                    write.apply_unflushed(store, &check)?;
                }
                // Clear the unsynced mark only if, under the document's lock, the server still
                // has everything: a local edit may have landed since.
                let state = check.lock();
                if state.session.peer_has_everything(state.history.doc()) {
                    tracing::debug!(device = %device.short(), doc = %id.short(),
                        heads = ?state.history.doc().get_heads(), theirs = ?state.session.their_heads(),
                        "server holds everything: unsynced mark cleared");
                    return remove_mark(store, id);
                }
                // The server has the document now: its next messages need not make it.
                let key = id.as_bytes();
                if was_unconfirmed
                    && store.get_record(&LOCAL, Space::UNSYNCED, key)?.as_deref() == Some(MARK_NEW)
                {
                    store.put_record(&LOCAL, Space::UNSYNCED, key, MARK_DIRTY)?;
                }
                Ok(false)
            })
            .await?;
        if acknowledged {
            self.synced(&shared);
        }
        self.inner.wrote(id);
        tracing::debug!(device = %self.inner.device_id.short(), doc = %id.short(), seq = sync.seq,
            holds, server_has_all, changed, settled, reply = reply.is_some(), "server message");
        if holds {
            let held = self.held.entry(id).or_default();
            *held = (*held).max(sync.seq);
            let held = *held;
            self.owed.held(id, held);
        }
        if server_has_all {
            self.owed.acknowledged(id);
            self.refused.remove(&id);
        }
        if let Some(message) = reply {
            let frame = pb::DocSync {
                doc_id: id.as_bytes().to_vec(),
                message,
                create: None,
                seq: 0,
                more: false,
            };
            self.send(pb::client_frame::Frame::Sync(frame)).await?;
        }
        if settled {
            self.release(id);
        }
        Ok(())
    }

    async fn on_changed(&mut self, changed: pb::DocChanged) -> Result<(), SyncFailure> {
        let Ok(id) = DocId::from_slice(&changed.doc_id) else { return Ok(()) };
        self.announced = self.announced.max(changed.seq);
        if changed.deleted {
            return self.deleted(id).await;
        }
        let meta = changed.info.as_ref().map(cubby_proto::doc_meta).unwrap_or_default();
        let stored = self.blocking(move |store| store.doc_meta(&LOCAL, &id)).await?;
        let known = stored.is_some();
        // A document made private or public, from this device or another: its contents may be
        // held already (see `held`), its metadata is news.
        let differs =
            |stored: DocMeta| stored.title != meta.title || stored.private != meta.private;
        if changed.info.is_some()
            && stored.is_some_and(|(_, stored)| DocMeta::decode(&stored).is_ok_and(differs))
        {
            if let Err(err) = self.inner.take_server_meta(id, meta.clone(), changed.seq).await {
                tracing::warn!(doc = %id.short(), %err, "cannot update local document metadata");
            }
        }
        if self.held.get(&id).is_some_and(|held| *held >= changed.seq) {
            return Ok(());
        }
        self.owed.announced(changed.seq, id);
        if !known {
            // The app sees the document at once; its copy loads (empty) when it is asked for,
            // or when the app opens it, whichever comes first (`Inner::doc` keeps it one copy).
            let encoded = meta.encode();
            // No flush: until its changes arrive the record says only that the document exists,
            // and every write of those changes carries the metadata again. Lost in a crash, it
            // is announced again, since the cursor cannot pass a change the device lacks. A
            // flush each cost a fresh device's sync of 4,000 documents a tenth of its time.
            self.blocking(move |store| {
                if store.doc_meta(&LOCAL, &id)?.is_none() {
                    store.write_doc_off_feed(&LOCAL, &id, &encoded, None)?;
                }
                Ok(())
            })
            .await?;
        }
        if changed.pushed {
            // The server sends what changed right behind this (it kept this device's sync
            // state); the device answers that. Should it not come, the document stays owed and
            // is asked for once it stalls.
            return Ok(());
        }
        if self.active.contains_key(&id) {
            return self.push(id).await;
        }
        // Asked for after this frame if there is room (`on_frame`); announced twice while
        // waiting, it is asked for once (see `ask_waiting`).
        let size = changed.info.as_ref().map_or(0, |info| info.size);
        self.waiting.push_back((id, size));
        Ok(())
    }

    async fn on_error(&mut self, error: pb::DocError) -> Result<(), SyncFailure> {
        let Ok(id) = DocId::from_slice(&error.doc_id) else {
            return Err(SyncFailure::Other(error.message));
        };
        if let Some(shared) = self.active.get(&id) {
            shared.lock().session.reset();
        }
        match tonic::Code::from_i32(error.code) {
            tonic::Code::NotFound => {
                // Deleted on the server, and then announced deleted right behind; or lost by
                // it (a store put back from a backup without the device noticing). Nothing is
                // deleted here: the document is kept, marked to be offered back, until its
                // deletion is announced (see `unknown`).
                self.active.remove(&id);
                let held = self
                    .blocking(move |store| {
                        // Gone from the device already: its deletion came first.
                        if store.doc_meta(&LOCAL, &id)?.is_none() {
                            return Ok(false);
                        }
                        store.put_record(&LOCAL, Space::HEAL, id.as_bytes(), &[])?;
                        Ok(true)
                    })
                    .await?;
                if held {
                    tracing::warn!(doc = %id.short(), "the server does not have this document");
                    self.owed.unsynced(id);
                    self.unknown.entry(id).or_insert_with(Instant::now);
                }
                Ok(())
            }
            code => {
                let failure = SyncFailure::Other(format!(
                    "document {}: {code:?}: {}",
                    id.short(),
                    error.message
                ));
                if code != tonic::Code::ResourceExhausted {
                    return Err(failure);
                }
                // A limit of the customer's: the connection, and every other document on it,
                // carry on. The changes stay marked unsynced and are offered again after a pause;
                // the document leaves the exchange meanwhile, so that it holds no place others
                // could use.
                let pause =
                    self.refused.get(&id).map_or(FIRST_BACKOFF, |r| (r.pause * 2).min(MAX_BACKOFF));
                tracing::warn!(device = %self.inner.device_id.short(), doc = %id.short(),
                    ?pause, %failure, "changes refused; offering them again after a pause");
                self.refused
                    .insert(id, Refusal { retry_at: Some(Instant::now() + pause), pause, failure });
                self.active.remove(&id);
                Ok(())
            }
        }
    }

    /// A document deleted on the server: its local copy goes too, a handle the app holds
    /// refuses changes from now on, and unsynced local changes to it (offline edits that lost to
    /// the deletion) are recorded for [`crate::Client::take_discarded`] and told in the event.
    async fn deleted(&mut self, id: DocId) -> Result<(), SyncFailure> {
        let copy = self.inner.forget(&id);
        self.active.remove(&id);
        self.warm.retain(|(_, kept)| kept.id != id);
        self.owed.forget(id);
        self.refused.remove(&id);
        self.unknown.remove(&id);
        self.heal.remove(&id);
        let turn = copy.clone();
        let discarded = self
            .blocking(move |store| {
                // In the copy's store turn: a local change lands before this, or is refused.
                let _turn = turn.as_deref().map(DocShared::store_turn);
                let Some((_, meta)) = store.doc_meta(&LOCAL, &id)? else { return Ok(None) };
                // Only this device's own changes count as discarded, not a document it was
                // offering back.
                let unsynced = store.get_record(&LOCAL, Space::UNSYNCED, id.as_bytes())?.is_some();
                if unsynced {
                    let title = DocMeta::decode(&meta).map(|m| m.title).unwrap_or_default();
                    store.put_record(&LOCAL, Space::DISCARDED, id.as_bytes(), title.as_bytes())?;
                }
                store.delete_doc(&LOCAL, &id)?;
                store.remove_record(&LOCAL, Space::SYNC_STATES, id.as_bytes())?;
                store.remove_record(&LOCAL, Space::UNSYNCED, id.as_bytes())?;
                store.remove_record(&LOCAL, Space::HEAL, id.as_bytes())?;
                store.flush()?;
                Ok(Some(unsynced))
            })
            .await;
        self.inner.forgotten(&id);
        let discarded = discarded?;
        if let Some(discarded) = discarded {
            if discarded {
                tracing::warn!(device = %self.inner.device_id.short(), doc = %id.short(),
                    "deleted elsewhere: this device's unsynced changes to it are discarded");
            }
            if let Some(copy) = copy {
                copy.emit(DocEvent::Deleted { discarded });
            }
            let _ = self.inner.events.send((id, DocEvent::Deleted { discarded }));
        }
        Ok(())
    }

    /// Offers again the refused documents whose pause is over, taking their turn with the others.
    async fn offer_refused_again(&mut self) -> Result<(), SyncFailure> {
        let now = Instant::now();
        for (id, refusal) in &mut self.refused {
            if refusal.retry_at.is_some_and(|at| at <= now) {
                refusal.retry_at = None;
                self.waiting.push_front((*id, 0));
            }
        }
        self.ask_waiting().await
    }

    /// Drops a settled document from the session once nothing is owed for it, keeping it
    /// loaded a while among the [`WARM_DOCS`] settled last.
    fn release(&mut self, id: DocId) {
        if self.owed.contains(&id) {
            return;
        }
        if let Some(shared) = self.active.remove(&id) {
            self.warm.retain(|(_, kept)| kept.id != id);
            if self.warm.len() == WARM_DOCS {
                self.warm.remove(0);
            }
            self.warm.push((Instant::now(), shared));
        }
    }

    async fn advance_cursor(&mut self) -> Result<(), SyncFailure> {
        let candidate = match self.owed.first_pending() {
            Some(seq) => seq - 1,
            None => self.announced,
        };
        if candidate > self.cursor && self.caught_up {
            self.cursor = candidate;
            self.blocking(move |store| {
                store.put_record(&LOCAL, Space::LOCAL, b"cursor", &candidate.to_be_bytes())
            })
            .await?;
        }
        Ok(())
    }

    fn report(&mut self) {
        // A refusal lasts until nothing of the document is owed any more (however that came
        // about); the one kept longest (the pause grows with each) speaks for all.
        let owed = &self.owed;
        self.refused.retain(|id, _| owed.contains(id));
        let refusal = self.refused.values().max_by_key(|r| r.pause);
        let status = if let Some(refusal) = refusal {
            let mut documents: Vec<DocId> = self.refused.keys().copied().collect();
            documents.sort();
            SyncStatus::Refused { failure: refusal.failure.clone(), documents }
        } else if self.caught_up && self.owed.is_empty() {
            self.owed.new_round();
            self.reached_up_to_date = true;
            SyncStatus::UpToDate
        } else {
            let (done, total) = self.owed.progress();
            SyncStatus::Syncing { done, total }
        };
        self.inner.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// What the device and the server still owe each other in one connection, by document: local
/// changes the server has not acknowledged, and announced feed positions the device does not hold
/// yet. The engine asks about it on every frame, so each question costs one document: asked of
/// every document instead, a fresh device's sync of thousands of them grew with their square.
#[derive(Default)]
struct Owed {
    /// Documents with local changes the server has not acknowledged.
    unsynced: HashSet<DocId>,
    /// Announced feed positions this device does not hold yet, in feed order.
    pending: BTreeSet<(u64, DocId)>,
    /// The same positions, by document.
    pending_by_doc: HashMap<DocId, BTreeSet<u64>>,
    /// Documents in either.
    docs: HashSet<DocId>,
    /// Documents owed at some point since the device was last up to date, for progress.
    round: HashSet<DocId>,
}

impl Owed {
    /// `id` has local changes the server has not acknowledged.
    fn unsynced(&mut self, id: DocId) {
        self.unsynced.insert(id);
        self.refresh(id);
    }

    /// The server holds every local change of `id`.
    fn acknowledged(&mut self, id: DocId) {
        self.unsynced.remove(&id);
        self.refresh(id);
    }

    /// The server announced a change of `id` at feed position `seq`.
    fn announced(&mut self, seq: u64, id: DocId) {
        self.pending.insert((seq, id));
        self.pending_by_doc.entry(id).or_default().insert(seq);
        self.refresh(id);
    }

    /// The device holds what the server had of `id` at feed position `held`.
    fn held(&mut self, id: DocId, held: u64) {
        if let Some(seqs) = self.pending_by_doc.get_mut(&id) {
            while let Some(seq) = seqs.first().copied().filter(|seq| *seq <= held) {
                seqs.remove(&seq);
                self.pending.remove(&(seq, id));
            }
        }
        self.refresh(id);
    }

    /// Nothing is owed of `id` any more (deleted, or unknown to the server).
    fn forget(&mut self, id: DocId) {
        self.unsynced.remove(&id);
        for seq in self.pending_by_doc.remove(&id).unwrap_or_default() {
            self.pending.remove(&(seq, id));
        }
        self.refresh(id);
    }

    fn refresh(&mut self, id: DocId) {
        let pending = self.pending_by_doc.get(&id).is_some_and(|seqs| !seqs.is_empty());
        if pending || self.unsynced.contains(&id) {
            self.docs.insert(id);
            self.round.insert(id);
        } else {
            self.pending_by_doc.remove(&id);
            self.docs.remove(&id);
        }
    }

    fn contains(&self, id: &DocId) -> bool {
        self.docs.contains(id)
    }

    fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    fn docs(&self) -> impl Iterator<Item = DocId> + '_ {
        self.docs.iter().copied()
    }

    /// The lowest announced feed position the device does not hold yet.
    fn first_pending(&self) -> Option<u64> {
        self.pending.first().map(|(seq, _)| *seq)
    }

    /// Up to date: the next round counts from nothing.
    fn new_round(&mut self) {
        self.round.clear();
    }

    /// Documents of this round done, and in all.
    fn progress(&self) -> (usize, usize) {
        (self.round.len() - self.docs.len(), self.round.len())
    }
}

/// Removes a document's unsynced and heal marks: the server holds everything of it. Returns
/// whether there was one. Blocking.
fn remove_mark(store: &dyn cubby_store::Store, id: DocId) -> Result<bool, StoreError> {
    let mut marked = false;
    for space in [Space::UNSYNCED, Space::HEAL] {
        marked |= store.get_record(&LOCAL, space, id.as_bytes())?.is_some();
        store.remove_record(&LOCAL, space, id.as_bytes())?;
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocId {
        DocId::from_slice(&[n; 16]).expect("16 bytes")
    }

    #[test]
    fn a_document_is_owed_while_it_has_unacknowledged_changes_or_unheld_positions() {
        let mut owed = Owed::default();
        owed.unsynced(doc(1));
        owed.announced(7, doc(1));
        owed.announced(9, doc(1));
        owed.announced(8, doc(2));
        assert_eq!(owed.first_pending(), Some(7));
        assert_eq!(owed.progress(), (0, 2));

        owed.acknowledged(doc(1));
        assert!(owed.contains(&doc(1)), "position 7 and 9 are not held yet");
        owed.held(doc(1), 8);
        assert_eq!(owed.first_pending(), Some(8), "7 is held, 8 (of the other document) is not");
        assert!(owed.contains(&doc(1)), "position 9 is not held yet");
        owed.held(doc(1), 9);
        assert!(!owed.contains(&doc(1)));
        assert_eq!(owed.progress(), (1, 2));

        owed.forget(doc(2));
        assert!(owed.is_empty());
        assert_eq!(owed.first_pending(), None);
        assert_eq!(owed.progress(), (2, 2));
    }
}
