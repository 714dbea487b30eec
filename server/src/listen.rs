//! Where connections come from: a TCP listener on a real server, a simulated network in the
//! deterministic simulation. Both hand tonic a [`Conn`], which carries the peer's address.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A source of connections.
pub trait Listener: Send + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection and its peer's address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;

    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        let (tcp, peer) = tokio::net::TcpListener::accept(self).await?;
        // Small frames go out at once; Nagle would hold an acknowledgement for 40 ms.
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// An accepted connection and its peer. It fails its reads and writes once the server hangs
/// up on every connection (a shutdown whose grace ran out).
pub struct Conn<Io> {
    io: Io,
    peer: SocketAddr,
    hangup: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<Io> std::fmt::Debug for Conn<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl<Io> Conn<Io> {
    /// `hangup` is the server's; each connection waits on a child of it, so that one
    /// connection's polls do not contend with another's.
    pub(crate) fn new(io: Io, peer: SocketAddr, hangup: &CancellationToken) -> Self {
        Self { io, peer, hangup: Box::pin(hangup.child_token().cancelled_owned()) }
    }

    /// The error reads and writes fail with once the server hung up. A pending read waits on
    /// the hangup too, so an idle connection hears it.
    fn hung_up(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.hangup.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(io::ErrorKind::ConnectionAborted, "the server closed the connection")
        })
    }
}

impl<Io> Connected for Conn<Io> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo { local_addr: None, remote_addr: Some(self.peer) }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Conn<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(err) = self.hung_up(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Conn<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.hung_up(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.hung_up(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Plaintext connections, handed on as they are accepted. `stop` ends accepting; `hangup`
/// fails every connection accepted (see [`Conn`]).
pub(crate) fn plaintext<L: Listener>(
    mut listener: L,
    tracker: &TaskTracker,
    stop: CancellationToken,
    hangup: CancellationToken,
) -> mpsc::Receiver<io::Result<Conn<L::Io>>> {
    let (tx, rx) = mpsc::channel(64);
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((io, peer)) => {
                    if tx.send(Ok(Conn::new(io, peer, &hangup))).await.is_err() {
                        return;
                    }
                }
                Err(err) => tracing::warn!(%err, "accept failed"),
            }
        }
    });
    rx
}
