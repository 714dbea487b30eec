//! The system under test: the real `cubby-server` binary in its own process (so its CPU time is
//! its own), and devices that are real SDK clients whose bytes on the wire are counted.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use cubby_client::{Client, StaticToken, TokenProvider};
use cubby_crypto::signing::TokenSigner;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A `cubby-server` process with its own data directory; killed on drop.
pub(crate) struct ServerProcess {
    child: Child,
    bin: std::path::PathBuf,
    data: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// Its self-signed certificate.
    pub(crate) ca_pem: Vec<u8>,
    /// Where it serves its metrics (`None` for a server older than its metrics, which the
    /// before-and-after comparisons run).
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Starts `bin` on a free loopback port in development mode and waits until it listens.
    pub(crate) fn start(bin: &Path) -> Result<Self, Error> {
        Self::start_node(bin, None, None)
    }

    /// Starts `bin` as a node storing in the PostgreSQL database at `database` (or in sled
    /// without), on a copy of `like`'s data directory if given (its master key, certificate
    /// and development tenant: a node of the same cluster).
    pub(crate) fn start_node(
        bin: &Path,
        database: Option<&str>,
        like: Option<&ServerProcess>,
    ) -> Result<Self, Error> {
        let data = tempfile::tempdir()?;
        if let Some(like) = like {
            copy_files(like.data.path(), data.path())?;
        }
        let (child, url, metrics) = spawn(bin, data.path(), "127.0.0.1:0", database)?;
        let ca_pem = std::fs::read(data.path().join("tls/cert.pem"))?;
        Ok(Self { child, data, url, ca_pem, metrics, bin: bin.to_path_buf() })
    }

    /// Stops the process and starts it again on the same data directory and port.
    pub(crate) fn restart(&mut self) -> Result<(), Error> {
        self.child.kill()?;
        self.child.wait()?;
        let addr = self.url.trim_start_matches("https://").to_owned();
        (self.child, _, self.metrics) = spawn(&self.bin, self.data.path(), &addr, None)?;
        Ok(())
    }

    /// A development token for `subject`, valid for a day.
    pub(crate) fn token(&self, subject: &str) -> Result<String, Error> {
        Ok(cubby_server::auth::dev_token(&self.signer()?, subject, Duration::from_secs(86_400)))
    }

    /// What signs the development tenant's tokens.
    pub(crate) fn signer(&self) -> Result<TokenSigner, Error> {
        Ok(cubby_server::auth::dev_signer(self.data.path(), false)?)
    }

    /// CPU time the server process has used so far, all threads.
    pub(crate) fn cpu(&self) -> Result<Duration, Error> {
        cpu_of(self.child.id())
    }

    /// The server's resident memory, bytes.
    pub(crate) fn rss(&self) -> Result<u64, Error> {
        rss_of(self.child.id())
    }

    /// A device of `subject` with its own sled store, its bytes counted in `wire`.
    pub(crate) async fn device(
        &self,
        subject: &str,
        dir: &Path,
        wire: &Wire,
    ) -> Result<Client, Error> {
        self.build_device(dir, wire, StaticToken::new(self.token(subject)?), true).await
    }

    /// Like [`ServerProcess::device`], but it syncs only once told to (`Client::start_sync`).
    pub(crate) async fn offline_device(
        &self,
        subject: &str,
        dir: &Path,
        wire: &Wire,
    ) -> Result<Client, Error> {
        self.build_device(dir, wire, StaticToken::new(self.token(subject)?), false).await
    }

    /// Like [`ServerProcess::device`], with its tokens from `tokens`.
    pub(crate) async fn device_with_tokens(
        &self,
        dir: &Path,
        wire: &Wire,
        tokens: impl TokenProvider,
    ) -> Result<Client, Error> {
        self.build_device(dir, wire, tokens, true).await
    }

    async fn build_device(
        &self,
        dir: &Path,
        wire: &Wire,
        tokens: impl TokenProvider,
        autosync: bool,
    ) -> Result<Client, Error> {
        let addr = self.url.trim_start_matches("https://").to_owned();
        let wire = wire.clone();
        let client = Client::builder()
            .with_data_dir(dir)
            .with_local_key([7; 32])
            .with_server(self.url.clone())
            .with_ca_pem(self.ca_pem.clone())
            .with_token_provider(tokens)
            .with_autosync(autosync)
            .with_transport(move || {
                let (addr, wire) = (addr.clone(), wire.clone());
                async move {
                    wire.connections.fetch_add(1, Ordering::Relaxed);
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    Ok(Counted { inner: tcp, wire })
                }
            })
            .build()
            .await?;
        Ok(client)
    }
}

/// CPU time process `pid` has used so far, all its threads, those that have exited included
/// (the process's CPU-time clock, `clock_getcpuclockid`).
///
/// Summing the live threads' `/proc/PID/task/*/schedstat` instead loses every thread that
/// exits before the second reading, with all its time, and can go backwards: sled's I/O pool
/// starts a thread whenever fewer than seven wait and lets it go after a second without work,
/// and tokio's blocking pool does the same after ten.
pub(crate) fn cpu_of(pid: u32) -> Result<Duration, Error> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    let now = nix::time::ClockId::pid_cpu_clock_id(pid)?.now()?;
    Ok(Duration::from(now))
}

/// Process `pid`'s resident memory, bytes.
pub(crate) fn rss_of(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .ok_or("no VmRSS")?;
    Ok(kb * 1024)
}

/// Whether `bin` serves metrics (an older server has no `--metrics`).
fn serves_metrics(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--help")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--metrics"))
}

/// Runs the server binary on `data` and `listen`; returns once it listens, with its URL and
/// its metrics address.
fn spawn(
    bin: &Path,
    data: &Path,
    listen: &str,
    database: Option<&str>,
) -> Result<(Child, String, Option<std::net::SocketAddr>), Error> {
    let mut command = Command::new(bin);
    if let Some(url) = database {
        command.env("CUBBY_DATABASE_URL", url);
    }
    command.arg("--data").arg(data).args(["--listen", listen]);
    if serves_metrics(bin) {
        command.args(["--metrics", "127.0.0.1:0"]);
    }
    let mut child = command
        .env_remove("CUBBY_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (mut url, mut metrics) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("cubby-server listening on ") {
            url = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.strip_prefix("metrics: http://") {
            metrics = rest.trim().trim_end_matches("/metrics").parse().ok();
        }
        if line.starts_with("development tenant on") {
            break;
        }
    }
    let url = url.ok_or("the server did not say where it listens")?;
    Ok((child, url, metrics))
}

/// Copies a data directory's files (not a running server's control socket).
fn copy_files(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_files(&entry.path(), &to.join(entry.file_name()))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A counter's value in the server's metrics at `addr` (`None` when it cannot be read).
pub(crate) fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Bytes that crossed the wire (TLS records included), both directions, over many connections,
/// and how many connections were made.
#[derive(Clone, Debug, Default)]
pub(crate) struct Wire {
    bytes: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
}

impl Wire {
    /// Bytes so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Connections made so far.
    pub(crate) fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A byte stream that adds what passes through it to a [`Wire`].
struct Counted<T> {
    inner: T,
    wire: Wire,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.wire.bytes.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.wire.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
