//! Where connections come from, and who gets in.
//!
//! A TCP listener on a real server, a simulated network in the deterministic simulation: both
//! hand tonic a [`Conn`], which carries the peer's address. Between the two sits the [`Gate`]:
//!
//! - **Handshakes in progress are bounded, and slow ones make room.** Up to
//!   `limits.max_handshakes` run at once; a new connection beyond that closes the oldest one in
//!   progress, provided it has had [`SHED_AFTER`] already (a real client's handshake takes
//!   milliseconds; one trickling its ClientHello a byte a second is always the oldest). While
//!   every handshake is younger than that, new connections are taken anyway, up to four times
//!   the limit, and closed at once past it. So a new client never waits behind slow handshakes.
//! - **A connection must finish its TLS handshake and send the HTTP/2 preface** within
//!   `limits.tls_handshake_timeout_secs`, or it is closed.
//! - **Connections are capped** at `limits.max_connections` (and below the process's descriptor
//!   limit), handshakes in progress included. One over the cap still gets its TLS handshake, but
//!   every call on it is answered `UNAVAILABLE` ("the server is at its connection limit") and it
//!   is closed a few seconds after it was accepted.
//! - **Accept errors back off** (10 ms doubling to 1 s), and are logged at most once a second,
//!   so running out of descriptors costs neither a core nor the disk.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TlsConnectInfo;

mod conn;
use conn::read_preface;
pub(crate) use conn::{Conn, Prefaced};

/// A source of connections.
pub trait Listener: Send + Sync + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection and its peer's address.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;

    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Io, SocketAddr)> {
        let (tcp, peer) = tokio::net::TcpListener::accept(self).await?;
        // Small frames go out at once; Nagle would hold an acknowledgement for 40 ms.
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// How long a handshake is left alone before a newer connection may close it to take its place.
pub(crate) const SHED_AFTER: Duration = Duration::from_secs(1);

/// How long a connection over the cap is kept open to answer `UNAVAILABLE` before it is closed.
const REFUSED_FOR: Duration = Duration::from_secs(5);

/// Descriptors kept free for everything but connections (the store's files, connections over
/// the cap while they are told so): this many, or a quarter of the limit if that is less.
const SPARE_DESCRIPTORS: u64 = 512;

/// What a connection tells the services about itself.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    /// The peer's address.
    pub(crate) addr: SocketAddr,
    /// The connection is over the server's connection limit: every call on it is refused.
    pub(crate) over_limit: bool,
}

impl Peer {
    /// The peer of a request's connection, plain or over TLS.
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Option<Peer> {
        let extensions = request.extensions();
        extensions
            .get::<Peer>()
            .or_else(|| extensions.get::<TlsConnectInfo<Peer>>().map(TlsConnectInfo::get_ref))
            .copied()
    }
}

/// Refuses every call on a connection over the server's connection limit (a tonic interceptor).
pub(crate) fn refuse_over_limit(
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    match Peer::of(&request) {
        Some(peer) if peer.over_limit => {
            Err(tonic::Status::unavailable("the server is at its connection limit; retry later"))
        }
        _ => Ok(request),
    }
}

/// The gate's limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GateLimits {
    /// Handshakes in progress before new connections close the oldest of them.
    pub(crate) handshakes: usize,
    /// Time to finish the TLS handshake and send the HTTP/2 preface.
    pub(crate) handshake_timeout: Duration,
    /// Connections at most, handshakes in progress included.
    pub(crate) connections: usize,
}

impl GateLimits {
    /// The limits the config asks for, with the connection cap kept below the process's
    /// descriptor limit (each connection is a descriptor).
    pub(crate) fn from_config(limits: &crate::Limits) -> Self {
        let mut connections = limits.max_connections.max(1);
        if let Some(descriptors) = descriptor_limit() {
            let spare = (descriptors / 4).min(SPARE_DESCRIPTORS);
            let room = descriptors.saturating_sub(spare);
            let room = usize::try_from(room.max(1)).unwrap_or(usize::MAX);
            if room < connections {
                tracing::warn!(
                    max_connections = connections,
                    descriptors,
                    allowed = room,
                    "the descriptor limit (ulimit -n) allows fewer connections than \
                     limits.max_connections; capping them lower"
                );
                connections = room;
            }
        }
        Self {
            handshakes: limits.max_handshakes.max(1),
            handshake_timeout: Duration::from_secs(limits.tls_handshake_timeout_secs.max(1)),
            connections,
        }
    }
}

/// The process's soft limit on open descriptors, where the platform has one.
fn descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
        (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft)
    }
    #[cfg(not(unix))]
    None
}

/// Admission at the edge: handshakes in progress and established connections.
#[derive(Debug)]
pub(crate) struct Gate {
    limits: GateLimits,
    handshakes: Mutex<Handshakes>,
    connections: Arc<AtomicUsize>,
}

/// Handshakes in progress, oldest first, with when each began.
#[derive(Debug, Default)]
struct Handshakes {
    next: u64,
    all: BTreeMap<u64, (tokio::time::Instant, CancellationToken)>,
}

/// One handshake in progress; leaves the gate's list when dropped.
struct HandshakeTicket {
    gate: Arc<Gate>,
    id: u64,
    /// Cancelled when a newer connection needs its place.
    shed: CancellationToken,
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.gate.lock().all.remove(&self.id);
    }
}

/// One connection, counted while it lives.
#[derive(Debug)]
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub(crate) fn new(limits: GateLimits) -> Arc<Self> {
        Arc::new(Self { limits, handshakes: Mutex::default(), connections: Arc::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handshakes> {
        self.handshakes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection's handshake, first closing the oldest one in progress if
    /// they are full and it has had [`SHED_AFTER`]. `None`: the new connection must be closed
    /// (four times the limit are in progress, all of them young).
    fn begin_handshake(self: &Arc<Self>, now: tokio::time::Instant) -> Option<HandshakeTicket> {
        let mut handshakes = self.lock();
        if handshakes.all.len() >= self.limits.handshakes {
            let oldest = handshakes.all.first_key_value().map(|(id, (at, _))| (*id, *at));
            match oldest {
                Some((id, at)) if now.duration_since(at) >= SHED_AFTER => {
                    if let Some((_, shed)) = handshakes.all.remove(&id) {
                        tracing::debug!("handshakes full: closing the oldest one in progress");
                        shed.cancel();
                    }
                }
                _ if handshakes.all.len() >= 4 * self.limits.handshakes => return None,
                _ => {}
            }
        }
        handshakes.next += 1;
        let (id, shed) = (handshakes.next, CancellationToken::new());
        handshakes.all.insert(id, (now, shed.clone()));
        Some(HandshakeTicket { gate: self.clone(), id, shed })
    }

    /// A place among the connections, if one is free.
    fn connection_slot(&self) -> Option<ConnectionSlot> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.limits.connections).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.connections.clone()))
    }

    /// Connections now.
    #[cfg(test)]
    fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Accepts connections until `stop`, hands each to `admit` (TLS and the preface, within the
    /// handshake deadline and while it keeps its place), and sends what comes through to tonic.
    /// `hangup` fails every connection accepted (see [`Conn`]).
    pub(crate) fn serve<L, T, F, Fut>(
        self: Arc<Self>,
        listener: L,
        admit: F,
        tracker: &TaskTracker,
        stop: CancellationToken,
        hangup: CancellationToken,
    ) -> mpsc::Receiver<io::Result<T>>
    where
        L: Listener,
        T: Send + 'static,
        F: Fn(Conn<L::Io>) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<T>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let handshakes = tracker.clone();
        tracker.spawn(async move {
            let mut failures = AcceptFailures::new("sync");
            while let Some((io, addr)) = failures.next(&stop, || listener.accept()).await {
                let Some(ticket) = self.begin_handshake(tokio::time::Instant::now()) else {
                    tracing::debug!(%addr, "too many handshakes in progress: connection closed");
                    continue;
                };
                let mut conn = Conn::new(io, addr, &hangup);
                conn.admit(&self, &hangup);
                let (tx, stop, deadline) =
                    (tx.clone(), stop.clone(), self.limits.handshake_timeout);
                let handshake = admit(conn);
                handshakes.spawn(async move {
                    tokio::select! {
                        done = tokio::time::timeout(deadline, handshake) => match done {
                            Ok(Ok(conn)) => {
                                drop(ticket);
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(err)) => tracing::debug!(%addr, %err, "connection refused"),
                            Err(_) => tracing::debug!(%addr, "handshake or preface timed out"),
                        },
                        () = ticket.shed.cancelled() => {
                            tracing::debug!(%addr, "handshake closed to make room");
                        }
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        rx
    }
}

/// Accept failures in a row: how long to pause, and when to say so. Every listener of the
/// server (connections, metrics, the control socket) backs off with one.
pub(crate) struct AcceptFailures {
    /// Which listener, for the log.
    listener: &'static str,
    pause: Duration,
    /// Failures not logged since the last line.
    unlogged: u64,
    logged_at: Option<tokio::time::Instant>,
}

impl AcceptFailures {
    const FIRST: Duration = Duration::from_millis(10);
    const MOST: Duration = Duration::from_secs(1);

    pub(crate) fn new(listener: &'static str) -> Self {
        Self { listener, pause: Duration::ZERO, unlogged: 0, logged_at: None }
    }

    /// What `accept` accepts next, pausing after each failure (longer while they go on);
    /// `None` once `stop` comes.
    pub(crate) async fn next<T, Fut>(
        &mut self,
        stop: &CancellationToken,
        mut accept: impl FnMut() -> Fut,
    ) -> Option<T>
    where
        Fut: Future<Output = io::Result<T>>,
    {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return None,
                accepted = accept() => accepted,
            };
            match accepted {
                Ok(accepted) => {
                    self.reset();
                    return Some(accepted);
                }
                Err(err) if self.back_off(&err, stop).await => {}
                Err(_) => return None,
            }
        }
    }

    /// An accept succeeded: the next failure pauses briefly again.
    fn reset(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// Notes a failure and pauses before the next accept; false if `stop` came meanwhile.
    async fn back_off(&mut self, err: &io::Error, stop: &CancellationToken) -> bool {
        let pause = self.failed(err);
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = stop.cancelled() => false,
        }
    }

    /// Notes a failure; returns how long to pause before accepting again.
    fn failed(&mut self, err: &io::Error) -> Duration {
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::MOST);
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.logged_at.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            tracing::warn!(%err, listener = self.listener, failures = self.unlogged,
                pause_ms = self.pause.as_millis() as u64,
                "accepting connections failed; backing off");
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
        self.pause
    }
}

/// Plaintext connections: only the HTTP/2 preface, within the deadline.
pub(crate) fn plaintext<L: Listener>(
    gate: Arc<Gate>,
    listener: L,
    tracker: &TaskTracker,
    stop: CancellationToken,
    hangup: CancellationToken,
) -> mpsc::Receiver<io::Result<Prefaced<Conn<L::Io>>>> {
    gate.serve(listener, read_preface, tracker, stop, hangup)
}

/// A connection over TLS, ready for tonic.
pub(crate) type TlsConn<Io> = Prefaced<tokio_rustls::server::TlsStream<Conn<Io>>>;

/// TLS connections: the handshake, then the HTTP/2 preface, within the deadline.
pub(crate) fn tls<L: Listener>(
    gate: Arc<Gate>,
    listener: L,
    acceptor: tokio_rustls::TlsAcceptor,
    tracker: &TaskTracker,
    stop: CancellationToken,
    hangup: CancellationToken,
) -> mpsc::Receiver<io::Result<TlsConn<L::Io>>> {
    let admit = move |conn| {
        let accepting = acceptor.accept(conn);
        async move { read_preface(accepting.await?).await }
    };
    gate.serve(listener, admit, tracker, stop, hangup)
}

#[cfg(test)]
mod tests;
