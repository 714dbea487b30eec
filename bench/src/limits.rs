//! The limits Cubby's figures are measured against, on the same machine in the same run: a bare
//! gRPC stream over TLS, the cipher, the disk, the embedded database, and Automerge itself.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use automerge::Automerge;
use automerge::transaction::Transactable;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use crate::echo::Blob;
use crate::echo::echo_client::EchoClient;
use crate::echo::echo_server::{Echo, EchoServer};
use crate::stats::{Samples, ms, us};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Echoes every message of a stream.
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    type EchoStream = ReceiverStream<Result<Blob, tonic::Status>>;

    async fn echo(
        &self,
        request: tonic::Request<tonic::Streaming<Blob>>,
    ) -> Result<tonic::Response<Self::EchoStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(Ok(blob)) = inbound.next().await {
                if tx.send(Ok(blob)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// A bare tonic bidirectional stream over rustls TLS 1.3 on loopback (the same TLS setup as the
/// server), with `size`-byte messages: round trip, one at a time, and messages per second with
/// many in flight. Measured twice: with the echo service in this process, and in a process of
/// its own, as `cubby-server` is to the bench's devices; the second also reads the service's
/// CPU time per round trip.
pub(crate) async fn tls_stream(size: usize, round_trips: usize) -> Result<Value, Error> {
    let dir = tempfile::tempdir()?;
    let (addr, cert) = echo_server(dir.path()).await?;
    let mut in_process = echo_rounds(addr, &cert, size, round_trips, None).await?;
    let service = EchoProcess::start()?;
    let mut apart =
        echo_rounds(service.addr, &service.cert, size, round_trips, Some(service.pid())).await?;
    Ok(json!({
        "workload": "limit",
        "limit": "tls_grpc_stream",
        "message_bytes": size,
        "rtt_p50_ms": ms(apart.rtt.quantile(0.5)),
        "rtt_p99_ms": ms(apart.rtt.quantile(0.99)),
        "server_cpu_us_per_round_trip": apart.cpu_per_round_trip.map(us),
        "messages_per_sec": apart.rate.round(),
        "in_process_rtt_p50_ms": ms(in_process.rtt.quantile(0.5)),
        "in_process_rtt_p99_ms": ms(in_process.rtt.quantile(0.99)),
        "in_process_messages_per_sec": in_process.rate.round(),
    }))
}

/// The bare stream at the durability workload's concurrency: `streams` connections to the
/// echo service in its own process, each sending `size`-byte messages one round trip at a time
/// for `secs` seconds, as its writers wait for each acknowledgement. Round trips per second and
/// the service's CPU per round trip: what the transport alone allows on this machine, with its
/// clients sharing it as the writers do.
pub(crate) async fn tls_streams_concurrent(
    streams: usize,
    size: usize,
    secs: u64,
) -> Result<Value, Error> {
    let service = EchoProcess::start()?;
    let mut clients = Vec::with_capacity(streams);
    for _ in 0..streams {
        let channel = echo_channel(service.addr, &service.cert).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let replies = EchoClient::new(channel).echo(ReceiverStream::new(rx)).await?.into_inner();
        clients.push((tx, replies));
    }
    let blob = Blob { data: vec![7; size] };
    let until = Instant::now() + Duration::from_secs(secs);
    let cpu = crate::server::cpu_of(service.pid())?;
    let started = Instant::now();
    let counts = futures_util::future::join_all(clients.iter_mut().map(|(tx, replies)| {
        let blob = blob.clone();
        async move {
            let mut count = 0u64;
            while Instant::now() < until {
                tx.send(blob.clone()).await?;
                replies.message().await?.ok_or("the echo stream ended")?;
                count += 1;
            }
            Ok::<_, Error>(count)
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let cpu = crate::server::cpu_of(service.pid())? - cpu;
    let mut total = 0u64;
    for count in counts {
        total += count?;
    }
    Ok(json!({
        "workload": "limit",
        "limit": "tls_grpc_streams_concurrent",
        "streams": streams,
        "message_bytes": size,
        "round_trips_per_sec": (total as f64 / elapsed.as_secs_f64()).round(),
        "server_cpu_us_per_round_trip": us(cpu / u32::try_from(total.max(1))?),
    }))
}

/// What [`echo_rounds`] measured.
struct EchoRounds {
    rtt: Samples,
    /// The service's CPU time per isolated round trip, when it runs in process `pid`.
    cpu_per_round_trip: Option<Duration>,
    /// Messages per second, many in flight.
    rate: f64,
}

/// Round trips one at a time on a new stream to the echo service at `addr`, then ten times as
/// many pipelined.
async fn echo_rounds(
    addr: SocketAddr,
    cert: &[u8],
    size: usize,
    round_trips: usize,
    pid: Option<u32>,
) -> Result<EchoRounds, Error> {
    let channel = echo_channel(addr, cert).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut replies = EchoClient::new(channel).echo(ReceiverStream::new(rx)).await?.into_inner();
    let blob = Blob { data: vec![7; size] };

    // The service's CPU time before, when it runs in a process of its own.
    let before = pid.map(|pid| crate::server::cpu_of(pid).map(|cpu| (pid, cpu))).transpose()?;
    let mut rtt = Samples::default();
    for _ in 0..round_trips {
        let started = Instant::now();
        tx.send(blob.clone()).await?;
        replies.message().await?.ok_or("the echo stream ended")?;
        rtt.push(started.elapsed());
    }
    let cpu_per_round_trip = match before {
        Some((pid, cpu)) => Some((crate::server::cpu_of(pid)? - cpu) / round_trips as u32),
        None => None,
    };
    let pipelined = round_trips * 10;
    let started = Instant::now();
    let sender = {
        let (tx, blob) = (tx.clone(), blob.clone());
        tokio::spawn(async move {
            for _ in 0..pipelined {
                if tx.send(blob.clone()).await.is_err() {
                    return;
                }
            }
        })
    };
    for _ in 0..pipelined {
        replies.message().await?.ok_or("the echo stream ended")?;
    }
    sender.await?;
    let rate = pipelined as f64 / started.elapsed().as_secs_f64();
    Ok(EchoRounds { rtt, cpu_per_round_trip, rate })
}

/// Starts the echo service on loopback with the server's TLS setup (its certificate in `dir`).
/// Returns its address and certificate.
async fn echo_server(dir: &Path) -> Result<(SocketAddr, Vec<u8>), Error> {
    cubby_server::tls::install_ring_provider();
    let cert = cubby_server::tls::ensure_self_signed(dir)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cubby_server::tls::server_config(
        std::sync::Arc::new(cubby_server::tls::ServedCert::load(&cert)?),
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = async_stream(listener, acceptor);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(incoming),
    );
    Ok((addr, std::fs::read(&cert.cert)?))
}

/// A new TLS connection to the echo service.
async fn echo_channel(addr: SocketAddr, cert: &[u8]) -> Result<tonic::transport::Channel, Error> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert))
        .domain_name("localhost");
    Ok(tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// `cubby-bench echo-server`: the echo service in a process of its own, so that its memory can
/// be read apart from its clients'. Prints `echo ADDR CERT_PATH` and serves until killed.
pub(crate) async fn serve_echo() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let (addr, _) = echo_server(dir.path()).await?;
    println!("echo {addr} {}", dir.path().join("tls/cert.pem").display());
    std::future::pending::<()>().await;
    Ok(())
}

/// The floor for workload 3: the echo service's memory per connected client that holds one
/// open stream and is otherwise idle, the service in its own process, `count` clients.
pub(crate) async fn idle_streams(count: usize) -> Result<Value, Error> {
    let server = EchoProcess::start()?;
    let (addr, cert) = (server.addr, server.cert.clone());
    let baseline = crate::server::rss_of(server.pid())?;
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let channel = echo_channel(addr, &cert).await?;
        let mut replies =
            EchoClient::new(channel).echo(ReceiverStream::new(rx)).await?.into_inner();
        tx.send(Blob { data: vec![7; 64] }).await?;
        replies.message().await?.ok_or("the echo stream ended")?;
        streams.push((tx, replies));
    }
    // Let allocations settle, as for Cubby, then read the service's memory.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rss = crate::server::rss_of(server.pid())?;
    drop(streams);
    Ok(json!({
        "workload": "limit",
        "limit": "idle_tls_grpc_streams",
        "connections": count,
        "server_bytes_per_connection": rss.saturating_sub(baseline) / count as u64,
    }))
}

/// `cubby-bench echo-server` as a child process; killed on drop.
struct EchoProcess {
    child: std::process::Child,
    addr: SocketAddr,
    cert: Vec<u8>,
}

impl EchoProcess {
    fn start() -> Result<Self, Error> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("echo-server")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        // Killed on drop from here on.
        let mut service = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), cert: vec![] };
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let mut words = line.split_whitespace().skip(1);
        service.addr = words.next().ok_or("the echo server said nothing")?.parse()?;
        service.cert = std::fs::read(words.next().ok_or("no certificate path")?)?;
        Ok(service)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TLS handshakes on accepted connections, handed to tonic as they finish.
fn async_stream(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            if let Ok(tls) = acceptor.accept(tcp).await
                && tx.send(Ok(tls)).await.is_err()
            {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// AES-256-GCM seal and open (ring, through Cubby's envelope) at `size` bytes.
pub(crate) fn cipher(size: usize) -> Value {
    let key = cubby_crypto::keys::DataKey::generate();
    let plaintext = vec![5u8; size];
    let rounds = (64 << 20) / size.max(1);
    let started = Instant::now();
    let mut sealed = Vec::new();
    for _ in 0..rounds {
        sealed = cubby_crypto::envelope::seal(&key, b"aad", &plaintext);
    }
    let seal = started.elapsed() / rounds as u32;
    let started = Instant::now();
    for _ in 0..rounds {
        let opened = cubby_crypto::envelope::open(&key, b"aad", &sealed);
        assert!(opened.is_ok(), "a record sealed just now opens");
    }
    let open = started.elapsed() / rounds as u32;
    json!({
        "workload": "limit", "limit": "aes_256_gcm", "record_bytes": size,
        "seal_us": us(seal), "open_us": us(open),
        "seal_mb_per_sec": (size as f64 / seal.as_secs_f64() / 1e6).round(),
    })
}

/// `fdatasync` after a 4 KiB write, in a temporary file on the disk the server uses.
pub(crate) fn fdatasync(rounds: usize) -> Result<Value, Error> {
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("sync"))?;
    let block = [1u8; 4096];
    let mut samples = Samples::default();
    // This thread's CPU time, the kernel's share included: what a write and its flush cost the
    // machine besides the wait for the disk.
    let thread_cpu = || nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID.now().map(Duration::from);
    let cpu = thread_cpu()?;
    for _ in 0..rounds {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    let cpu = (thread_cpu()? - cpu) / rounds as u32;
    Ok(json!({
        "workload": "limit", "limit": "fdatasync",
        "p50_us": us(samples.quantile(0.5)), "p99_us": us(samples.quantile(0.99)),
        "per_sec_at_p50": (1.0 / samples.quantile(0.5).as_secs_f64()).round(),
        "cpu_us": us(cpu),
    }))
}

/// sled inserts of `value`-byte values: without a flush, and with a flush after each.
pub(crate) fn sled(inserts: usize, value: usize) -> Result<Value, Error> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let bytes = vec![3u8; value];
    let started = Instant::now();
    for i in 0..inserts as u64 {
        db.insert(i.to_be_bytes(), bytes.as_slice())?;
    }
    let unflushed = inserts as f64 / started.elapsed().as_secs_f64();
    let flushed_rounds = inserts / 10;
    // This process's CPU time, sled's I/O threads included (the bench's other threads are idle
    // here).
    let cpu = crate::server::cpu_of(std::process::id())?;
    let started = Instant::now();
    for i in 0..flushed_rounds as u64 {
        db.insert((u64::MAX - i).to_be_bytes(), bytes.as_slice())?;
        db.flush()?;
    }
    let flushed = flushed_rounds as f64 / started.elapsed().as_secs_f64();
    let cpu = (crate::server::cpu_of(std::process::id())? - cpu) / flushed_rounds as u32;
    Ok(json!({
        "workload": "limit", "limit": "sled_insert", "value_bytes": value,
        "inserts_per_sec": unflushed.round(), "flushed_inserts_per_sec": flushed.round(),
        "cpu_us_per_flushed_insert": us(cpu),
    }))
}

/// Automerge alone: applying `changes` small changes one at a time and as one batch, and loading
/// the saved document.
pub(crate) fn automerge(changes: usize) -> Result<Value, Error> {
    let mut source = Automerge::new();
    for n in 0..changes as u64 {
        let mut tx = source.transaction();
        tx.put(automerge::ROOT, "n", n)?;
        tx.commit();
    }
    let all = source.get_changes(&[]);
    let mut one_by_one = Automerge::new();
    let started = Instant::now();
    for change in &all {
        one_by_one.apply_changes([change.clone()])?;
    }
    let single = started.elapsed() / changes as u32;
    let mut batched = Automerge::new();
    let started = Instant::now();
    batched.apply_changes(all)?;
    let batch = started.elapsed() / changes as u32;
    let saved = source.save();
    let started = Instant::now();
    let loaded = Automerge::load(&saved)?;
    let load = started.elapsed();
    assert_eq!(loaded.get_heads(), source.get_heads(), "the saved document loads whole");
    Ok(json!({
        "workload": "limit", "limit": "automerge", "changes": changes,
        "apply_one_at_a_time_us_per_change": us(single),
        "apply_batch_us_per_change": us(batch),
        "load_ms": ms(load), "saved_bytes": saved.len(),
    }))
}
