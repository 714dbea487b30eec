//! `cubby.v1.Sync/Connect`: one task per device stream.
//!
//! The task authenticates the stream, has the device prove its key (registering it on first
//! sight, refusing a revoked one), announces what changed since the device's cursor, then
//! relays: device sync messages to document actors, and the customer's feed announcements to the
//! device. The stream ends when the device leaves, its token expires, it is revoked, its account
//! is erased, or the server stops.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cubby_core::feed::Told;
use cubby_core::{DeviceId, DocId, Seq};
use cubby_proto::parts::{self, Reassembly};
use cubby_proto::{ApiError, pb};
use futures_util::StreamExt;
use futures_util::stream::PollNext;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::Shared;
use crate::docs::{DocMsg, Lagging, Link, Outgoing};
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

mod admit;
mod feed;
mod parts_budget;

pub(crate) use parts_budget::PartBudgets;

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
        let caller = self.shared.auth.authenticate(request.metadata()).await?;
        let caller = self.shared.customers.admit_device_stream(caller).await?;
        let token_denied = self.shared.customers.token_denied(&caller);
        let parts = self.shared.part_budgets.reassembly(
            &self.shared.limits,
            caller.customer,
            crate::listen::Peer::of(&request).map(|peer| peer.addr),
        );
        let (outbox, frames) = mpsc::channel(OUTBOX_FRAMES);
        let (holds, held) = mpsc::unbounded_channel();
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
            link: Link { outbox, holds, lagging: Lagging::default() },
            held,
            behind_since: None,
            own,
            backlog: VecDeque::new(),
            read_at: read_at.clone(),

            inflight: Arc::new(Semaphore::new(self.shared.limits.max_inflight_per_stream.max(1))),
            spare: None,
            told: Told::default(),
            parts,
            end: Some(end),
        };
        // The stream's task logs inside the call's span: its method, request id and customer.
        self.shared.tracker.spawn(connection.run(request.into_inner()).in_current_span());
        let metrics = self.shared.metrics.clone();
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
            .flat_map(move |message| {
                if let ToDevice::Sync { message: bytes, .. } = &*message {
                    metrics.sent(bytes.len());
                }
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
    /// What the device was told of the feed and what it holds (see `cubby_core::feed`).
    told: Told<Arc<Announcement>>,
    /// Where document actors say what the device holds. Read only when an announcement is
    /// weighed (`take_holds`), not as each arrives: a notice per receiver per change woke every
    /// receiver's stream for nothing (a tenth more server CPU per change at 16 receivers).
    held: mpsc::UnboundedReceiver<(DocId, Seq)>,
    /// Sync messages of the device waiting at documents or with their answer in its queue, at
    /// most `max_inflight_per_stream`: the device's next frame is read only with a permit in
    /// hand (`spare`), so a device that does not read its answers stops being read.
    inflight: Arc<Semaphore>,
    spare: Option<OwnedSemaphorePermit>,
    /// Sync messages arriving in parts.
    parts: Reassembly,
    /// Where the status the stream ends with goes (ahead of anything still queued).
    end: Option<oneshot::Sender<Status>>,
}

impl Connection {
    pub(super) async fn run(mut self, mut inbound: Streaming<pb::ClientFrame>) {
        let served = self.serve(&mut inbound).await;
        if let Some(device) = self.device {
            match &served {
                Ok(()) => tracing::info!(peer = self.peer, device = %device.short(),
                    "device disconnected"),
                Err(status) => tracing::info!(peer = self.peer, device = %device.short(),
                    code = ?status.code(), reason = status.message(), "device disconnected"),
            }
        }
        if let Err(status) = served
            && let Some(end) = self.end.take()
        {
            let _ = end.send(status);
        }
        for doc in self.told.take_joined() {
            self.shared.docs.leave(self.customer, doc, self.peer);
        }
        if let Some(stream) = self.stream {
            self.shared.customers.close_stream(&self.customer, stream);
        }
    }

    /// Whether frames wait for the device, in its queues or behind them.
    pub(super) fn frames_waiting(&self) -> bool {
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
    pub(super) fn may_be_stalled(&self) -> bool {
        self.spare.is_none() || self.behind_since.is_some() || !self.backlog.is_empty()
    }

    /// Queues one of the stream's own frames, after those already waiting.
    pub(super) fn send(&mut self, message: ToDevice) {
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

    pub(super) async fn serve(
        &mut self,
        inbound: &mut Streaming<pb::ClientFrame>,
    ) -> Result<(), Status> {
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
        self.shared.metrics.connects.inc();
        tracing::info!(peer = self.peer, device = %device.short(), cursor = hello.cursor,
            "device connected");
        // A cursor from another epoch means nothing here: the device offers back all it holds.
        let same_epoch = hello.epoch == self.shared.customers.epoch(&self.customer);
        // Subscribe before reading the feed, so nothing falls between the two.
        let mut announcements = self.shared.hub.subscribe(self.customer);
        self.told = Told::from(Seq(if same_epoch { hello.cursor } else { 0 }));
        let head = self.catch_up(true).await?;
        self.told.read_to(head);
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
        self.send(ToDevice::CaughtUp { cursor: self.told.announced() });

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
                        if self.told.joined(&doc) {
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
                        self.told.read_to(head);
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

    pub(super) async fn on_frame(&mut self, frame: pb::ClientFrame) -> Result<(), Status> {
        match frame.frame {
            Some(pb::client_frame::Frame::Sync(part)) => {
                let Some(sync) = self.parts.push(part)? else { return Ok(()) };
                self.shared.metrics.received(sync.message.len());
                let doc = match cubby_proto::doc_id(&sync.doc_id) {
                    Ok(doc) => doc,
                    Err(err) => {
                        self.send(ToDevice::Refused { doc: sync.doc_id, error: err });
                        return Ok(());
                    }
                };
                // Read only with a permit in hand (`serve`).
                let permit = self.spare.take().ok_or(ApiError::Internal)?;
                self.told.join(doc);
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
