//! Faults the real binary must survive without losing an acknowledged change: `kill -9` under
//! sustained writes from several devices, and a full disk.
//!
//! In the crash test each round lets three SDK devices (two customers) write for a random while, kills the server
//! with SIGKILL, opens its data directory directly and checks that every change the server had
//! acknowledged to a device is on disk, then restarts it. At the end every device converges and
//! the server holds every change any device made, acknowledged or not (devices resend).
//!
//! `CUBBY_CRASH_ROUNDS=200 cargo test -p cubby-server --test faults` is the long mode (default 10);
//! `CUBBY_CRASH_SEED=N` replays one schedule.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cubby_client::{Client, DocHandle, StaticToken, SyncStatus};
use cubby_core::{CustomerId, DocId};
use cubby_crypto::keys::{Keyring, MasterSecret};
use cubby_store::{Docs, EncryptedStore};
use cubby_store_sled::SledStore;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_cubby-server");
const DEADLINE: Duration = Duration::from_secs(60);

/// The server process; killed on drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, port: u16) -> Server {
    let mut child = Command::new(BIN)
        .arg("--data")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env_remove("CUBBY_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("piped");
    let server = Server { child };
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8");
        let done = line.starts_with("development tenant on");
        seen.push(line);
        if done {
            return server;
        }
    }
    panic!("the server did not start: {seen:?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn token(data: &Path, subject: &str) -> String {
    let out = Command::new(BIN)
        .arg("dev-token")
        .arg("--data")
        .arg(data)
        .args(["--customer", subject, "--ttl", "1d"])
        .output()
        .expect("dev-token runs");
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

/// A small seeded generator (xorshift64*), so a failing schedule replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// One writing device: it puts `k1`, `k2`, ... into its own document, and records the highest
/// `n` the server acknowledged (every change up to it is in the server's advertised heads).
struct Writer {
    customer: CustomerId,
    doc: DocId,
    written: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<(Client, DocHandle)>,
}

async fn writer(
    url: &str,
    ca: &[u8],
    token: String,
    customer: CustomerId,
    dir: &Path,
    stop: Arc<AtomicBool>,
) -> Writer {
    let client = Client::builder()
        .with_data_dir(dir)
        .with_local_key([3; 32])
        .with_server(url)
        .with_token_provider(StaticToken::new(token))
        .with_ca_pem(ca.to_vec())
        .build()
        .await
        .expect("client builds");
    let doc = client.create("crash log").await.expect("create");
    client.wait_until_synced().await.expect("first sync");
    let (written, acked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let id = doc.id();
    let (w, a) = (written.clone(), acked.clone());
    let task = tokio::spawn(async move {
        let mut status = client.status();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            doc.put(&format!("k{n}"), json!(n)).await.expect("a local write never fails");
            w.store(n, Ordering::SeqCst);
            match tokio::time::timeout(Duration::from_secs(2), client.wait_until_synced()).await {
                Ok(Ok(())) => a.store(n, Ordering::SeqCst),
                // Server down: keep writing offline, at the pace of status changes.
                _ => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
                }
            }
        }
        (client, doc)
    });
    Writer { customer, doc: id, written, acked, task }
}

/// Opens the data directory of a stopped server and returns, per writer, the highest `n` such
/// that `k1..=kn` are all stored.
fn stored_prefix(data: &Path, writers: &[(CustomerId, DocId)]) -> Vec<u64> {
    let master = MasterSecret::read(&data.join("master.key")).expect("master key");
    let store = EncryptedStore::open(
        SledStore::open(&data.join("db")).expect("the store reopens after kill -9"),
        Keyring::from_master(&master),
    )
    .expect("key check");
    writers
        .iter()
        .map(|(customer, doc)| {
            let Some(records) = store.load(customer, doc).expect("loads") else { return 0 };
            let automerge = cubby_core::history::rebuild(
                records.snapshot.as_ref().map(|s| s.bytes.as_slice()),
                records.chunks.iter().map(|(_, b)| b.as_slice()),
            )
            .expect("the stored document rebuilds");
            let json = cubby_core::json::to_json(&automerge);
            (1..).take_while(|n| json.get(format!("k{n}")).is_some()).last().unwrap_or(0)
        })
        .collect()
}

/// Waits until `client` is up to date, through the failures of reconnects, or panics with `what`
/// after [`DEADLINE`].
async fn synced_within_deadline(client: &Client, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while client.wait_until_synced().await.is_err() {
        assert!(Instant::now() < deadline, "{what}");
        let mut status = client.status();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            status.wait_for(|s| *s == SyncStatus::UpToDate),
        )
        .await;
    }
}

fn customer_id(data: &Path, subject: &str) -> CustomerId {
    let master = MasterSecret::read(&data.join("master.key")).expect("master key");
    CustomerId::from_bytes(Keyring::from_master(&master).customer_id("dev", subject))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_23_kill_9_under_write_load_loses_no_acknowledged_change() {
    let rounds: u64 =
        std::env::var("CUBBY_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("CUBBY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from_be_bytes(cubby_crypto::random_array()) | 1);
    eprintln!("crash schedule seed {seed} (CUBBY_CRASH_SEED={seed} replays it), {rounds} rounds");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let data: PathBuf = dir.path().join("data");
    let port = free_port();
    let mut server = Some(start(&data, port));
    let url = format!("https://127.0.0.1:{port}");
    let ca = std::fs::read(data.join("tls/cert.pem")).expect("cert");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, subject) in ["alice", "alice", "bob"].into_iter().enumerate() {
        let device = dir.path().join(format!("device{i}"));
        let customer = customer_id(&data, subject);
        let token = token(&data, subject);
        writers.push(writer(&url, &ca, token, customer, &device, stop.clone()).await);
    }
    let targets: Vec<_> = writers.iter().map(|w| (w.customer, w.doc)).collect();

    let started = Instant::now();
    let mut last_acked = 0;
    for round in 0..rounds {
        // Let the devices write, and make sure the server acknowledged something this round.
        tokio::time::sleep(Duration::from_millis(50 + rng.below(350))).await;
        let deadline = Instant::now() + DEADLINE;
        while writers.iter().map(|w| w.acked.load(Ordering::SeqCst)).sum::<u64>() <= last_acked {
            assert!(Instant::now() < deadline, "round {round}: no acknowledgement (seed {seed})");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(server.take()); // SIGKILL, then reap.
        let acked: Vec<u64> = writers.iter().map(|w| w.acked.load(Ordering::SeqCst)).collect();
        last_acked = acked.iter().sum();
        let data_for_check = data.clone();
        let targets_for_check = targets.clone();
        let stored =
            tokio::task::spawn_blocking(move || stored_prefix(&data_for_check, &targets_for_check))
                .await
                .expect("check ran");
        for (i, (stored, acked)) in stored.iter().zip(&acked).enumerate() {
            assert!(
                stored >= acked,
                "round {round}, device {i}: acknowledged k1..=k{acked} but only k1..=k{stored} survived kill -9 (seed {seed})"
            );
        }
        server = Some(start(&data, port));
    }
    stop.store(true, Ordering::Relaxed);
    let mut devices = Vec::new();
    for w in writers {
        let (client, doc) = w.task.await.expect("writer ran");
        devices.push((client, doc, w.written.load(Ordering::SeqCst)));
    }
    // Everything any device wrote, acknowledged or not, reaches the server and the other device.
    for (client, _, _) in &devices {
        synced_within_deadline(client, &format!("a device did not converge (seed {seed})")).await;
    }
    let alice_laptop = &devices[1].0;
    let phone_doc = devices[0].1.id();
    let written = devices[0].2;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = alice_laptop.open(phone_doc).await.map(|d| d.to_json()).unwrap_or_default();
        if seen.get(format!("k{written}")).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the laptop never saw the phone's last write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut written = Vec::new();
    for (client, doc, n) in devices {
        drop(doc);
        client.shutdown().await;
        written.push(n);
    }
    let mut server = server.take().expect("running");
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    server.child.wait().expect("stops");
    let stored = tokio::task::spawn_blocking(move || stored_prefix(&data, &targets))
        .await
        .expect("check ran");
    assert!(
        stored.iter().zip(&written).all(|(s, w)| s >= w),
        "the server lacks writes: stored {stored:?}, written {written:?} (seed {seed})"
    );
    eprintln!(
        "{rounds} kill -9 rounds in {:.1} s, {last_acked} acknowledged writes checked after the last kill",
        started.elapsed().as_secs_f64()
    );
}

/// An 8 MiB tmpfs, unmounted on drop. Mounting needs root, which the CI machines have; without
/// it the test fails rather than pretend.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting an 8 MiB tmpfs needs root (CI runs as root)");
        Self { path, _dir: dir }
    }

    /// Fills the disk with a file until only about `left` bytes remain; returns the file.
    fn fill(&self, left: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let chunk = vec![0u8; 64 * 1024];
        let mut file = std::fs::File::create(&filler).expect("filler");
        let mut written = 0u64;
        while written + left < 8 << 20 && file.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_24_disk_full_refuses_writes_without_acknowledging_and_recovers_after_space_is_freed() {
    let disk = SmallDisk::mount();
    let data = disk.path.join("data");
    let port = free_port();
    let server = start(&data, port);
    let url = format!("https://127.0.0.1:{port}");
    let ca = std::fs::read(data.join("tls/cert.pem")).expect("cert");
    let devices = tempfile::tempdir().expect("temp dir");
    let open = |name: &str| {
        Client::builder()
            .with_data_dir(devices.path().join(name))
            .with_local_key([5; 32])
            .with_server(&url)
            .with_token_provider(StaticToken::new(token(&data, "alice")))
            .with_ca_pem(ca.clone())
            .build()
    };
    let phone = open("phone").await.expect("client builds");
    let doc = phone.create("big").await.expect("create");
    phone.wait_until_synced().await.expect("synced");
    let filler = disk.fill(3 << 20);

    // Write 64 KiB values until the server refuses one; every write before was acknowledged.
    let value = "v".repeat(64 * 1024);
    let mut acked = 0;
    let refusal = loop {
        doc.put(&format!("k{}", acked + 1), json!(value)).await.expect("the device has room");
        match phone.wait_until_synced().await {
            Ok(()) => acked += 1,
            Err(failure) => break failure,
        }
        assert!(acked < 200, "8 MiB cannot hold {acked} writes of 64 KiB");
    };
    assert!(refusal.to_string().contains("full"), "a clear refusal: {refusal}");
    assert!(acked > 0, "some writes fit before the disk filled");
    eprintln!("{acked} writes of 64 KiB acknowledged before the disk filled: {refusal}");

    // The server stays up and answers promptly while full, and its health check says so.
    let again = tokio::time::timeout(DEADLINE, phone.wait_until_synced()).await;
    assert!(matches!(again, Ok(Err(_))), "still refused, promptly: {again:?}");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca)),
        )
        .expect("tls")
        .connect()
        .await
        .expect("connects");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let status = health.check(request).await.expect("health answers").into_inner().status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "health never reported the full disk");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Free the space, restart: everything acknowledged is there, and the refused write syncs
    // from the device, which kept it.
    drop(server);
    std::fs::remove_file(filler).expect("free space");
    let _server = start(&data, port);
    synced_within_deadline(&phone, "the phone never synced after space was freed").await;
    let laptop = open("laptop").await.expect("client builds");
    laptop.wait_until_synced().await.expect("a fresh device syncs");
    let json = laptop.open(doc.id()).await.expect("the laptop has it").to_json();
    for n in 1..=acked + 1 {
        assert_eq!(json[format!("k{n}")], json!(value), "write k{n} was lost");
    }
    drop(doc);
    phone.shutdown().await;
    laptop.shutdown().await;
}
