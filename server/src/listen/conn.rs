//! A connection as the server holds it: its peer, closing on a hang-up or past the limit's
//! notice ([`Conn`]), and the HTTP/2 preface read before tonic gets it ([`Prefaced`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::{ConnectionSlot, Gate, Peer, REFUSED_FOR};

/// The HTTP/2 connection preface every client sends first (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted connection and its peer. It fails its reads and writes once the server hangs
/// up on every connection (a shutdown whose grace ran out), or, for a connection over the
/// limit, once it has had time to hear why.
pub(crate) struct Conn<Io> {
    io: Io,
    peer: Peer,
    hangup: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Counts it among the established connections while it lives.
    _slot: Option<ConnectionSlot>,
}

impl<Io> std::fmt::Debug for Conn<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl<Io> Conn<Io> {
    /// `hangup` is the server's; each connection waits on a child of it, so that one
    /// connection's polls do not contend with another's.
    pub(super) fn new(io: Io, addr: SocketAddr, hangup: &CancellationToken) -> Self {
        Self {
            io,
            peer: Peer { addr, over_limit: false },
            hangup: Box::pin(hangup.child_token().cancelled_owned()),
            _slot: None,
        }
    }

    /// Counts it among the server's connections, or marks it over the limit and hangs up on it
    /// [`REFUSED_FOR`] from now.
    pub(super) fn admit(&mut self, gate: &Gate, hangup: &CancellationToken) {
        match gate.connection_slot() {
            Some(slot) => self._slot = Some(slot),
            None => {
                self.peer.over_limit = true;
                let (server, soon) =
                    (hangup.child_token().cancelled_owned(), tokio::time::sleep(REFUSED_FOR));
                self.hangup = Box::pin(async move {
                    tokio::select! {
                        () = server => {}
                        () = soon => {}
                    }
                });
            }
        }
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
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer
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

/// A connection whose HTTP/2 preface the gate has read; it hands the preface to tonic first.
pub(crate) struct Prefaced<Io> {
    io: Io,
    /// How much of [`PREFACE`] tonic has been given.
    given: usize,
}

impl<Io> std::fmt::Debug for Prefaced<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefaced").finish_non_exhaustive()
    }
}

impl<Io: Connected> Connected for Prefaced<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Prefaced<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.given < PREFACE.len() {
            let rest = &PREFACE[self.given..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.given += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Prefaced<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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

/// Reads the HTTP/2 preface off `io`; refuses anything else.
pub(super) async fn read_preface<Io: AsyncRead + Unpin>(mut io: Io) -> io::Result<Prefaced<Io>> {
    let mut preface = [0u8; PREFACE.len()];
    io.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 connection"));
    }
    Ok(Prefaced { io, given: 0 })
}
