//! `cubby.v1.Sync/Connect`: one task per device stream.
//!
//! The task authenticates the stream, has the device prove its key (registering it on first
//! sight, refusing a revoked one), announces what changed since the device's cursor, then
//! relays: device sync messages to document actors, and the customer's feed announcements to the
//! device. The stream ends when the device leaves, its token expires, it is revoked, its account
//! is erased, or the server stops.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use cubby_core::{DeviceId, DocId, DocMeta, Seq};
use cubby_crypto::signing::verify_device_proof;
use cubby_proto::parts::{self, Budget, Reassembly};
use cubby_proto::{ApiError, pb};
use cubby_store::Space;
use futures_util::StreamExt;
use futures_util::stream::PollNext;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::customers::Ejector;
use crate::devices::Arrival;
use crate::docs::{DocMsg, Held, Lagging, Link, Outgoing, session_key};
use crate::durable::api_error;
use crate::frames::{self, ToDevice};
use crate::hub::Announcement;

/// Frames document actors may have queued for one device before the server considers it too
/// slow.
const OUTBOX_FRAMES: usize = 256;

/// Frames of the stream's own (announcements, errors) queued for its device; the rest wait in
/// the connection's backlog.
const OWN_FRAMES: usize = 32;

/// How long before its token expires a stream asks its device for a fresh one (a token that
/// lives less than twice this is asked for halfway through what is left of it).
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// A catch-up of at most this many documents is pushed: each document's actor sends the
/// announcement with what changed right behind it, so the device need not ask (a round trip
/// less). Each costs the server a document load, so a longer catch-up (a device away for long)
/// is announced, and the device asks at its own pace.
const PUSH_AT_MOST: usize = 16;

static NEXT_PEER: AtomicU64 = AtomicU64::new(1);

/// The Sync service.
pub(crate) struct SyncService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::sync_server::Sync for SyncService {
    type ConnectStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::ServerFrame, Status>> + Send + 'static>,
    >;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = self.shared.auth.authenticate(request.metadata())?;
        let caller = self.shared.customers.admit_device_stream(caller).await?;
        let token_denied = self.shared.customers.token_denied(&caller);
        let parts = self.shared.part_budgets.reassembly(
            &self.shared.limits,
            caller.customer,
            crate::listen::Peer::of(&request).map(|peer| peer.addr),
        );
        let (outbox, frames) = mpsc::channel(OUTBOX_FRAMES);
        let (own, own_frames) = mpsc::channel(OWN_FRAMES);
        let (end, ended) = oneshot::channel::<Status>();
        let read_at = ReadAt::new();
        let connection = Connection {
            shared: self.shared.clone(),
            customer: caller.customer,
            token_expires: tokio::time::Instant::now()
                + self.shared.auth.clock().until(caller.expires_at),
            token: (caller.token_hash, caller.expires_at),
            token_denied,
            stream: None,
            device: None,
            peer: NEXT_PEER.fetch_add(1, Ordering::Relaxed),
            link: Link { outbox, held: Held::default(), lagging: Lagging::default() },
            behind_since: None,
            own,
            backlog: VecDeque::new(),
            read_at: read_at.clone(),
            joined: HashSet::new(),
            deferred: HashMap::new(),
            inflight: Arc::new(Semaphore::new(self.shared.limits.max_inflight_per_stream.max(1))),
            spare: None,
            announced: Seq(0),
            heard: Seq(0),
            parts,
            end: Some(end),
        };
        self.shared.tracker.spawn(connection.run(request.into_inner()));
        // The actors' frames go first: they answer what the device asked, while the stream's own
        // can be the announcements of a whole feed. A frame's permits go back here, as it
        // leaves the queue (see `Outgoing`).
        let frames = futures_util::stream::select_with_strategy(
            ReceiverStream::new(frames).map(|out: Outgoing| out.message),
            ReceiverStream::new(own_frames),
            |_: &mut ()| PollNext::Left,
        );
        // Wire types at the edge: a queued message becomes its frame here, and one sync message
        // may take several parts on the wire.
        let frames = frames
            .flat_map(|message| {
                futures_util::stream::iter(parts::split_server_frame(frames::frame(*message)))
            })
            .map(move |frame| {
                read_at.read();
                Ok(frame)
            });
        // The status a stream ends with goes ahead of whatever is still queued, so that even a
        // device that stopped reading learns why once it reads again; tonic ends the stream there.
        let ending = futures_util::stream::once(ended)
            .filter_map(|ended| async move { ended.ok().map(Err) });
        let frames =
            futures_util::stream::select_with_strategy(ending, frames, |_: &mut ()| PollNext::Left);
        Ok(Response::new(Box::pin(frames)))
    }
}

struct Connection {
    shared: Arc<Shared>,
    customer: cubby_core::CustomerId,
    /// When the stream's token expires; a fresh token sent on the stream moves it.
    token_expires: tokio::time::Instant,
    /// The stream's token (hash and expiry), remembered with the device.
    token: ([u8; 32], u64),
    /// The token was used by a device since revoked: refused once the device has said who it is
    /// (so that the revoked device itself is told to wipe).
    token_denied: bool,
    /// This stream in the customer registry, once the device said who it is.
    stream: Option<u64>,
    /// The device, once it proved who it is.
    device: Option<DeviceId>,
    peer: u64,
    /// Where document actors queue frames for the device, what it holds, and what its queue
    /// had no room for.
    link: Link,
    /// Since when documents have owed the device frames its queue had no room for (see
    /// `Lagging`). Meanwhile its requests are not read; it is cut off after `slow_consumer_secs`.
    behind_since: Option<tokio::time::Instant>,
    /// Where the stream queues its own frames, from `backlog`.
    own: mpsc::Sender<Box<ToDevice>>,
    /// The stream's own frames waiting for room in `own`. The stream keeps reading the
    /// device's requests meanwhile: announcing a large feed while not reading, with the device
    /// blocked sending its requests for it, would leave both ends waiting on each other.
    backlog: VecDeque<ToDevice>,
    /// When the device last took a frame off its queues (see [`ReadAt`]).
    read_at: ReadAt,
    joined: HashSet<DocId>,
    /// Announcements of documents the device syncs live on this stream, held back: their
    /// actors send the changes themselves. Each is sent before any later announcement unless
    /// the device holds it by then, so the device's cursor never passes a change it lacks.
    deferred: HashMap<DocId, Arc<Announcement>>,
    /// Sync messages of the device waiting at documents or with their answer in its queue, at
    /// most `max_inflight_per_stream`: the device's next frame is read only with a permit in
    /// hand (`spare`), so a device that does not read its answers stops being read.
    inflight: Arc<Semaphore>,
    spare: Option<OwnedSemaphorePermit>,
    /// The highest feed position announced on this stream.
    announced: Seq,
    /// The highest feed position heard of from the bus, or read from the feed.
    heard: Seq,
    /// Sync messages arriving in parts.
    parts: Reassembly,
    /// Where the status the stream ends with goes (ahead of anything still queued).
    end: Option<oneshot::Sender<Status>>,
}

impl Connection {
    async fn run(mut self, mut inbound: Streaming<pb::ClientFrame>) {
        if let Err(status) = self.serve(&mut inbound).await {
            if let Some(end) = self.end.take() {
                let _ = end.send(status);
            }
        }
        for doc in self.joined.drain() {
            self.shared.docs.leave(self.customer, doc, self.peer);
        }
        if let Some(stream) = self.stream {
            self.shared.customers.close_stream(&self.customer, stream);
        }
    }

    /// Challenges the device to prove its key, then admits it (registering it on first sight).
    /// Returns what closes the stream when the device is revoked or the account erased.
    async fn prove_device(
        &mut self,
        inbound: &mut Streaming<pb::ClientFrame>,
        hello: &pb::Hello,
        deadline: tokio::time::Instant,
    ) -> Result<(DeviceId, Ejector), Status> {
        let device = cubby_proto::device_id(&hello.device_id)?;
        if hello.public_key.len() != 32 {
            return Err(
                ApiError::InvalidArgument("public_key must be 32 bytes (Ed25519)".into()).into()
            );
        }
        // Registered before the admission check, so a revocation racing this connect either
        // refuses it or closes it.
        let (stream, ejector) = self.shared.customers.open_stream(self.customer, device);
        self.stream = Some(stream);
        self.device = Some(device);
        let nonce: [u8; 32] = cubby_crypto::random_array();
        self.send(ToDevice::Challenge {
            nonce,
            epoch: self.shared.customers.epoch(&self.customer),
            account: account_tag(&self.customer),
        });
        let answer = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no proof of the device key"))??;
        let Some(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Proof(proof)) }) = answer
        else {
            return Err(ApiError::InvalidArgument(
                "the frame after the hello must be a proof".into(),
            )
            .into());
        };
        if !verify_device_proof(&hello.public_key, device.as_bytes(), &nonce, &proof.signature) {
            return Err(
                ApiError::PermissionDenied("the device key proof does not verify".into()).into()
            );
        }
        let shared = self.shared.clone();
        let (customer, token) = (self.customer, self.token);
        let (expired_before, token_denied) = (self.shared.auth.expired_before(), self.token_denied);
        let (public_key, name, platform) =
            (hello.public_key.clone(), hello.device_name.clone(), hello.platform.clone());
        self.shared
            .blocking(move || {
                let arrival = Arrival {
                    id: device,
                    public_key: &public_key,
                    name: &name,
                    platform: &platform,
                    token,
                    expired_before,
                    token_denied,
                };
                shared.devices.admit(&*shared.store, &customer, &arrival)
            })
            .await?;
        Ok((device, ejector))
    }

    /// Whether frames wait for the device, in its queues or behind them.
    fn frames_waiting(&self) -> bool {
        let queued = |capacity: usize, max: usize| capacity < max;
        !self.backlog.is_empty()
            || self.behind_since.is_some()
            || queued(self.own.capacity(), self.own.max_capacity())
            || queued(self.link.outbox.capacity(), self.link.outbox.max_capacity())
    }

    /// Whether the device might have stopped reading with frames waiting: its requests are not
    /// being read (answers hold every permit, or a document waits for room in its queue), or
    /// the stream's own frames wait. Otherwise nothing is looked at: an idle device costs no
    /// wakeups.
    fn may_be_stalled(&self) -> bool {
        self.spare.is_none() || self.behind_since.is_some() || !self.backlog.is_empty()
    }

    /// Queues one of the stream's own frames, after those already waiting.
    fn send(&mut self, message: ToDevice) {
        if self.backlog.is_empty() {
            match self.own.try_send(Box::new(message)) {
                Ok(()) => {}
                Err(
                    mpsc::error::TrySendError::Full(message)
                    | mpsc::error::TrySendError::Closed(message),
                ) => {
                    self.backlog.push_back(*message);
                }
            }
        } else {
            self.backlog.push_back(message);
        }
    }

    async fn serve(&mut self, inbound: &mut Streaming<pb::ClientFrame>) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.shared.limits.hello_timeout_secs);
        let first = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello"))??;
        let Some(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Hello(hello)) }) = first
        else {
            return Err(ApiError::InvalidArgument("the first frame must be a hello".into()).into());
        };
        let (device, ejector) = self.prove_device(inbound, &hello, deadline).await?;
        tracing::debug!(peer = self.peer, device = %device.short(), cursor = hello.cursor,
            "device connected");
        // A cursor from another epoch means nothing here: the device offers back all it holds.
        let same_epoch = hello.epoch == self.shared.customers.epoch(&self.customer);
        // Subscribe before reading the feed, so nothing falls between the two.
        let mut announcements = self.shared.hub.subscribe(self.customer);
        self.announced = Seq(if same_epoch { hello.cursor } else { 0 });
        let head = self.catch_up(true).await?;
        self.heard = head;
        if same_epoch && hello.cursor > head.0 {
            // The device saw a feed position this store never reached: the store lost what it
            // had acknowledged (restored with its anchor, say). A new epoch for the customer
            // has every device offer back what it holds; this one hears of it on reconnecting.
            tracing::error!(customer = %self.customer, device = %device.short(),
                cursor = hello.cursor, head = head.0,
                "a device has seen more of this customer's feed than the store holds; starting a \
                 new epoch for the customer so that devices offer back what they hold");
            let (shared, customer) = (self.shared.clone(), self.customer);
            let epoch =
                self.shared.blocking(move || shared.customers.begin_epoch(&customer)).await?;
            self.shared.publish(crate::bus::Event::Epoch { customer: self.customer, epoch });
            return Err(Status::unavailable(
                "this server's copy of the account is behind what this device has seen; \
                 reconnect, and offer back everything this device holds",
            ));
        }
        self.send(ToDevice::CaughtUp { cursor: self.announced });

        let expiry = tokio::time::sleep_until(self.token_expires);
        tokio::pin!(expiry);
        let renewal = tokio::time::sleep_until(renew_at(self.token_expires));
        tokio::pin!(renewal);
        let mut asked = false;
        let stop = self.shared.stop.clone();
        let own = self.own.clone();
        let (outbox, lagging) = (self.link.outbox.clone(), self.link.lagging.clone());
        let inflight = self.inflight.clone();
        let patience = Duration::from_secs(self.shared.limits.slow_consumer_secs);
        // Whether a device with frames waiting has stopped reading is looked at a few times per
        // `slow_consumer_secs`, and only while it might have (see `may_be_stalled`).
        let mut slow = tokio::time::interval((patience / 4).max(Duration::from_millis(100)));
        slow.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when the device has been seen stalled with frames waiting. A device is cut off
        // only once it has read nothing for `patience` *while* frames waited: one that was idle
        // for an hour and was just sent a frame is not.
        let mut stalled_since: Option<tokio::time::Instant> = None;
        loop {
            // The device's next frame is read only with an in-flight permit in hand and while
            // no document waits for room in its queue: back-pressure reaches the device.
            let read = self.spare.is_some() && self.behind_since.is_none();
            tokio::select! {
                permit = inflight.clone().acquire_owned(), if self.spare.is_none() => {
                    self.spare = Some(permit.map_err(|_| ApiError::Internal)?);
                }
                () = lagging.marked(), if self.behind_since.is_none() => {
                    self.behind_since = Some(tokio::time::Instant::now());
                }
                room = outbox.reserve(), if self.behind_since.is_some() => {
                    // The device read a frame: room again. Ask each document that owes it a
                    // frame to speak again.
                    drop(room.map_err(|_| Status::cancelled("stream closed"))?);
                    self.behind_since = None;
                    for doc in lagging.take() {
                        if self.joined.contains(&doc) {
                            let link = self.link.clone();
                            let resume = DocMsg::Resume { peer: self.peer, link };
                            self.shared.docs.send(self.customer, doc, resume);
                        }
                    }
                }
                _ = slow.tick(), if self.may_be_stalled() || stalled_since.is_some() => {
                    if self.may_be_stalled() && self.frames_waiting() {
                        let since = *stalled_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed().min(self.read_at.since()) >= patience {
                            let reason = "device is not reading its stream";
                            return Err(ApiError::ResourceExhausted(reason.into()).into());
                        }
                    } else {
                        stalled_since = None;
                    }
                }
                room = own.reserve(), if !self.backlog.is_empty() => {
                    let room = room.map_err(|_| Status::cancelled("stream closed"))?;
                    if let Some(frame) = self.backlog.pop_front() {
                        room.send(Box::new(frame));
                    }
                }
                () = &mut renewal, if !asked => {
                    asked = true;
                    let left = self
                        .token_expires
                        .saturating_duration_since(tokio::time::Instant::now());
                    self.send(ToDevice::TokenExpiring { seconds_left: left.as_secs() });
                }
                frame = inbound.message(), if read => match frame {
                    Ok(Some(pb::ClientFrame {
                        frame: Some(pb::client_frame::Frame::FreshToken(fresh)),
                    })) => {
                        if self.renew(&fresh.token).await? {
                            expiry.as_mut().reset(self.token_expires);
                            renewal.as_mut().reset(renew_at(self.token_expires));
                            asked = false;
                        }
                    }
                    Ok(Some(frame)) => self.on_frame(frame).await?,
                    Ok(None) => return Ok(()),
                    // Say why; a device that is gone just does not hear it. tonic reports a
                    // frame over the size limit as OUT_OF_RANGE; Cubby's limits answer
                    // RESOURCE_EXHAUSTED.
                    Err(status) if status.code() == tonic::Code::OutOfRange => {
                        return Err(ApiError::ResourceExhausted(format!(
                            "a frame is larger than the limit of {} bytes",
                            self.shared.limits.max_message_bytes
                        ))
                        .into());
                    }
                    Err(status) => return Err(status),
                },
                announcement = announcements.recv() => match announcement {
                    Ok(a) => self.on_heard(a).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let head = self.catch_up(false).await?;
                        self.heard = self.heard.max(head);
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                () = &mut expiry => {
                    return Err(ApiError::Unauthenticated("token expired".into()).into());
                }
                reason = ejector.ejected() => return Err(reason.into()),
                () = stop.cancelled() => return Err(Status::unavailable("server shutting down")),
            }
        }
    }

    /// Makes a fresh token sent on the stream its token, once it verifies for this customer, and
    /// records it with the device, so that revoking the device refuses it too. False, and
    /// nothing changes, when it expires no later than the stream's token.
    async fn renew(&mut self, token: &str) -> Result<bool, Status> {
        let caller = self.shared.auth.verify(token.trim())?;
        if caller.admin {
            let reason = "a service token cannot act as a customer; use the admin API";
            return Err(ApiError::PermissionDenied(reason.into()).into());
        }
        if caller.customer != self.customer {
            let reason = "the fresh token is for another customer";
            return Err(ApiError::PermissionDenied(reason.into()).into());
        }
        if self.shared.customers.token_denied(&caller) {
            let reason = "this token was revoked with its device";
            return Err(ApiError::Unauthenticated(reason.into()).into());
        }
        if caller.expires_at <= self.token.1 {
            return Ok(false);
        }
        let device = self.device.ok_or(ApiError::Internal)?;
        let token = (caller.token_hash, caller.expires_at);
        let expired_before = self.shared.auth.expired_before();
        let (shared, customer) = (self.shared.clone(), self.customer);
        self.shared
            .blocking(move || {
                shared.devices.renew(&*shared.store, &customer, &device, token, expired_before)
            })
            .await?;
        self.token = token;
        self.token_expires =
            tokio::time::Instant::now() + self.shared.auth.clock().until(caller.expires_at);
        tracing::debug!(peer = self.peer, device = %device.short(), "stream token renewed");
        Ok(true)
    }

    /// Announces every document changed after `self.announced`, from storage. With `push` (the
    /// catch-up on connecting, before `CaughtUp`), a short one is pushed where the device's sync
    /// state was kept. Not later: the device, caught up already, could advance its cursor on a
    /// pushed document's frames past an earlier announcement still queued behind them. Returns
    /// the customer's last feed position.
    async fn catch_up(&mut self, push: bool) -> Result<Seq, Status> {
        let (store, customer, cursor) = (self.shared.store.clone(), self.customer, self.announced);
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
                        && a.seq > self.announced
                        && !self.joined.contains(&doc) =>
                {
                    pushed.push(self.push(a, saved)?);
                }
                _ => self.on_announcement(a).await?,
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

    /// Hands a catch-up announcement to the document's actor to push (`DocMsg::Push`).
    fn push(
        &mut self,
        a: Arc<Announcement>,
        saved: Vec<u8>,
    ) -> Result<(Arc<Announcement>, oneshot::Receiver<bool>), Status> {
        let device = self.device.ok_or(ApiError::Internal)?;
        let (queued, answer) = oneshot::channel();
        self.joined.insert(a.doc);
        self.announced = a.seq;
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

    /// Announces a durable change, or holds it back when the device syncs that document live
    /// here. Left out, an announcement per change to every device of the customer cost each
    /// device a frame (and the server a TLS record) for a change it was receiving anyway.
    /// An announcement from the change bus. Delivery is not trusted: one that does not follow
    /// the last position heard (one was lost, or came out of order, or another node's write is
    /// still on its way), or that came without the document's metadata, has the stream read the
    /// feed from the store instead.
    async fn on_heard(&mut self, a: Arc<Announcement>) -> Result<(), Status> {
        if a.seq <= self.heard {
            return Ok(());
        }
        if a.partial || a.seq.0 > self.heard.0 + 1 {
            tracing::debug!(
                peer = self.peer,
                heard = self.heard.0,
                seq = a.seq.0,
                "a position was skipped on the bus; reading the feed"
            );
            let head = self.catch_up(false).await?;
            self.heard = self.heard.max(head).max(a.seq);
            return Ok(());
        }
        self.heard = a.seq;
        self.on_announcement(a).await
    }

    async fn on_announcement(&mut self, a: Arc<Announcement>) -> Result<(), Status> {
        if a.seq <= self.announced {
            return Ok(());
        }
        // Another node's write is not sent by this node's actor: announced like any other.
        if a.info.is_some() && !a.metadata && !a.remote && self.joined.contains(&a.doc) {
            if !self.link.held.holds(&a.doc, a.seq) {
                self.deferred.insert(a.doc, a);
            }
            return Ok(());
        }
        // Deletions, metadata changes and other documents: first whatever held-back announcement
        // before this one the device does not hold yet, in feed order.
        let (later, owed): (HashMap<_, _>, HashMap<_, _>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|(_, d)| d.seq > a.seq);
        self.deferred = later;
        let mut owed: Vec<_> = owed.into_values().collect();
        owed.retain(|d| !self.link.held.holds(&d.doc, d.seq));
        owed.sort_by_key(|d| d.seq);
        for d in owed.iter().chain([&a]) {
            self.announced = d.seq;
            self.send(ToDevice::Changed { announcement: d.clone(), pushed: false });
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: pb::ClientFrame) -> Result<(), Status> {
        match frame.frame {
            Some(pb::client_frame::Frame::Sync(part)) => {
                let Some(sync) = self.parts.push(part)? else { return Ok(()) };
                let doc = match cubby_proto::doc_id(&sync.doc_id) {
                    Ok(doc) => doc,
                    Err(err) => {
                        self.send(ToDevice::Refused { doc: sync.doc_id, error: err });
                        return Ok(());
                    }
                };
                // Read only with a permit in hand (`serve`).
                let permit = self.spare.take().ok_or(ApiError::Internal)?;
                self.joined.insert(doc);
                tracing::debug!(peer = self.peer, doc = %doc.short(), "frame in");
                // Frames are relayed only after the device proved its key.
                let device = self.device.ok_or(ApiError::Internal)?;
                let msg = DocMsg::Sync {
                    peer: self.peer,
                    device,
                    link: self.link.clone(),
                    message: sync.message,
                    create: sync.create.map(|c| (c.title, c.private)),
                    permit,
                };
                self.shared.docs.send(self.customer, doc, msg);
                Ok(())
            }
            // Taken by `serve`, which owns the stream's clock.
            Some(pb::client_frame::Frame::FreshToken(_)) => Err(ApiError::Internal.into()),
            Some(pb::client_frame::Frame::Hello(_) | pb::client_frame::Frame::Proof(_)) => {
                Err(ApiError::InvalidArgument("hello and proof may only be sent once".into())
                    .into())
            }
            None => Err(ApiError::InvalidArgument("empty frame".into()).into()),
        }
    }
}

/// The shared limits on sync messages in parts: one [`Budget`] per customer and one per
/// connection, each held by the reassemblies of their streams while any is open.
#[derive(Default)]
pub(crate) struct PartBudgets {
    budgets: std::sync::Mutex<Budgets>,
}

#[derive(Default)]
struct Budgets {
    customers: HashMap<cubby_core::CustomerId, Weak<Budget>>,
    connections: HashMap<SocketAddr, Weak<Budget>>,
    /// How many entries there were after the last sweep of ended ones.
    swept: usize,
}

impl PartBudgets {
    /// A reassembly for a new stream of `customer` on the connection from `peer`.
    fn reassembly(
        &self,
        limits: &crate::Limits,
        customer: cubby_core::CustomerId,
        peer: Option<SocketAddr>,
    ) -> Reassembly {
        let per_stream = limits.max_document_bytes as usize;
        let mut budgets = self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let budgets = &mut *budgets;
        if budgets.customers.len() + budgets.connections.len() > 2 * budgets.swept.max(64) {
            budgets.customers.retain(|_, b| b.strong_count() > 0);
            budgets.connections.retain(|_, b| b.strong_count() > 0);
            budgets.swept = budgets.customers.len() + budgets.connections.len();
        }
        fn shared<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Weak<Budget>>,
            key: K,
            limit: usize,
            whose: &'static str,
        ) -> Arc<Budget> {
            let entry = map.entry(key).or_default();
            entry.upgrade().unwrap_or_else(|| {
                let budget = Budget::new(limit, whose);
                *entry = Arc::downgrade(&budget);
                budget
            })
        }
        let per_customer = limits.max_partial_bytes_per_customer as usize;
        let mut reassembly = Reassembly::new(per_stream).with_budget(shared(
            &mut budgets.customers,
            customer,
            per_customer,
            "this customer",
        ));
        if let Some(peer) = peer {
            let connection = shared(&mut budgets.connections, peer, per_stream, "this connection");
            reassembly = reassembly.with_budget(connection);
        }
        reassembly
    }
}

/// When a device last took a frame off its queues: the stream's responses record it as they
/// go out, and the stream's task reads it to tell a device that stopped reading.
#[derive(Clone, Debug)]
struct ReadAt {
    origin: std::time::Instant,
    /// Milliseconds after `origin`.
    at: Arc<AtomicU64>,
}

impl ReadAt {
    fn new() -> Self {
        Self { origin: std::time::Instant::now(), at: Arc::default() }
    }

    fn read(&self) {
        let millis = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at.store(millis, Ordering::Relaxed);
    }

    /// How long ago the device last read.
    fn since(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.at.load(Ordering::Relaxed)))
    }
}

/// What devices are told of the account a token speaks for (`Challenge.account`): a digest of the
/// customer's store key, so that the key itself stays on the server.
fn account_tag(customer: &cubby_core::CustomerId) -> [u8; 16] {
    let digest =
        cubby_crypto::sha256(&[b"cubby account v1\0".as_slice(), customer.as_bytes()].concat());
    digest[..16].try_into().expect("SHA-256 has 32 bytes")
}

/// When a stream whose token expires at `expires` asks its device for a fresh one.
fn renew_at(expires: tokio::time::Instant) -> tokio::time::Instant {
    let left = expires.saturating_duration_since(tokio::time::Instant::now());
    expires - RENEW_BEFORE.min(left / 2)
}
