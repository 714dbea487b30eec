//! The deterministic simulation: real Cubby servers and SDK clients on turmoil's simulated
//! network and clock.
//!
//! Each seed runs one server and several customers with several devices each. Devices edit at
//! random; meanwhile the driver partitions devices from the server (they keep editing offline),
//! holds and releases their traffic (delays), crashes the server (losing every write not
//! flushed) and restarts it cleanly, and crashes devices (same for their local stores). Then the
//! faults stop and every invariant is checked:
//!
//! - at every server crash, every change the server had acknowledged is on its disk;
//! - once faults stop, every device of a customer holds the same documents with the same heads,
//!   and every edit any of them made;
//! - no device ever holds another customer's document or value.
//!
//! Cluster seeds run two or three server nodes over the one disk (as nodes over one database:
//! node crashes lose nothing committed) and a simulated bus log (`cluster.rs`) whose entries
//! reach each node late and out of order and whose wake-ups get lost; devices move between
//! nodes as theirs go down or are cut off. The same invariants hold.
//!
//! The server, the SDK, TLS, HTTP/2 and gRPC are the real ones; the network, the clock and the
//! disks (an in-memory store that a crash tears, [`cubby_tests::sim_disk`]) are simulated, and
//! storage work runs inline so that a seed replays the same schedule.
//!
//! ```text
//! cargo test -p cubby-tests --test simulation                 # the CI seeds
//! cargo test -p cubby-tests --test simulation -- --seeds 500  # the long mode
//! cargo test -p cubby-tests --test simulation -- --seed 17    # replay one seed
//! cargo test -p cubby-tests --test simulation -- --cluster-seed 3  # replay one cluster seed
//! CUBBY_TEST_LOG=debug cargo test -p cubby-tests --test simulation -- --seed 17  # with logs
//! cargo test -p cubby-tests --test simulation -- --herd 1000  # BAD_INPUTS row 30
//! ```

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use cubby_client::{Client, TokenProvider};
use cubby_core::{CustomerId, DocId};
use cubby_crypto::keys::{Keyring, MasterSecret};
use cubby_crypto::signing::TokenSigner;
use cubby_server::{Listener, Platform, ServerConfig, StorageWork, auth};
use cubby_store::{Docs, EncryptedStore};
use cubby_tests::Rng;
use cubby_tests::sim_disk::SimDisk;

mod cluster;
mod herd;

const PORT: u16 = 7443;
/// How many seeds `cargo test` runs.
const CI_SEEDS: u64 = 8;
/// How many seeds `cargo test` runs with two or three nodes over one store.
const CI_CLUSTER_SEEDS: u64 = 4;
/// Cluster seeds `cargo test` runs besides, each of which once found a bug: 32, a device synced
/// with a node's copy of a document older than the feed it had just been told of.
const CLUSTER_REGRESSIONS: [u64; 1] = [32];
/// How many devices `cargo test` puts through a server restart (row 30).
const HERD_CI: usize = 200;
/// The simulated network's tick: the clock's and the network's resolution.
const TICK: Duration = Duration::from_millis(5);
/// How long faults are injected.
const FAULT_PHASE: Duration = Duration::from_secs(60);
/// How long devices may take to converge once faults stop (the HTTP/2 keepalive of a
/// connection stalled by a partition alone takes up to 50 s to notice).
const CONVERGE_WITHIN: Duration = Duration::from_secs(300);
/// How long a device's token lives: short, so that tokens run out amid the faults. The server
/// asks for a fresh one halfway, so an open stream renews its token every 4 s, and one stalled
/// longer than that past the server's ask is closed at its token's expiry.
const TOKEN_TTL: Duration = Duration::from_secs(8);
/// Unix time when a simulation starts (2026-09-21); tokens are issued and judged in simulated
/// time from there.
const SIM_EPOCH: Duration = Duration::from_secs(1_790_000_000);

/// The simulation's time of day, for the server's token clock and the devices' tokens alike.
fn sim_clock() -> Duration {
    SIM_EPOCH + turmoil::sim_elapsed().unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| -> Option<u64> {
        let at = args.iter().position(|a| a == flag)?;
        let text = args.get(at + 1).unwrap_or_else(|| fail(&format!("{flag} needs a number")));
        Some(text.parse().unwrap_or_else(|_| fail(&format!("{flag} {text}: not a number"))))
    };
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test -- --list`: nothing to enumerate here.
    }
    // `CUBBY_TEST_LOG=debug` (any `RUST_LOG`-style filter) prints the server's and devices' logs.
    if let Ok(filter) = std::env::var("CUBBY_TEST_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    if let Some(clients) = value("--herd") {
        herd::run(clients as usize, value("--seed").unwrap_or(1));
        return;
    }
    let seeds: Vec<u64> = match value("--seed") {
        Some(seed) => vec![seed],
        None if value("--cluster-seed").is_some() => vec![],
        None => {
            let count = value("--seeds")
                .or_else(|| std::env::var("CUBBY_SIM_SEEDS").ok()?.parse().ok())
                .unwrap_or(CI_SEEDS);
            let from = value("--from").unwrap_or(1);
            (from..from + count).collect()
        }
    };
    let started = Instant::now();
    let mut total = Totals::default();
    for &seed in &seeds {
        match run_seed(seed) {
            Ok(outcome) => {
                eprintln!("seed {seed}: ok, {outcome}");
                total.add(&outcome);
            }
            Err(failure) => fail(&format!(
                "seed {seed} FAILED: {failure}\n  replay: cargo test -p cubby-tests --test simulation -- --seed {seed}"
            )),
        }
    }
    let cluster_seeds: Vec<u64> = match value("--cluster-seed") {
        Some(seed) => vec![seed],
        None if value("--seed").is_some() => vec![],
        None => match value("--cluster-seeds") {
            Some(count) => (1..=count).collect(),
            None => (1..=CI_CLUSTER_SEEDS).chain(CLUSTER_REGRESSIONS).collect(),
        },
    };
    for &seed in &cluster_seeds {
        match run_cluster_seed(seed) {
            Ok(outcome) => {
                eprintln!("cluster seed {seed}: ok, {outcome}");
                total.add(&outcome);
            }
            Err(failure) => fail(&format!(
                "cluster seed {seed} FAILED: {failure}\n  replay: cargo test -p cubby-tests --test simulation -- --cluster-seed {seed}"
            )),
        }
    }
    eprintln!(
        "simulation: {} seeds passed in {:.1} s of real time: {:.1} simulated hours, {}",
        seeds.len() + cluster_seeds.len(),
        started.elapsed().as_secs_f64(),
        total.simulated.as_secs_f64() / 3600.0,
        total.outcome,
    );
    // Row 29's scripted partitions and row 30's herd (at a size CI affords), unless one seed
    // or a seed range was asked for.
    if value("--seed").is_none()
        && value("--seeds").is_none()
        && value("--cluster-seed").is_none()
        && value("--cluster-seeds").is_none()
    {
        match row_29_partition_mid_sync_both_sides_edit_offline() {
            Ok(outcome) => eprintln!("row 29: ok, {outcome}"),
            Err(failure) => fail(&format!("row 29 FAILED: {failure}")),
        }
        herd::run(HERD_CI, 1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1)
}

/// Locks, shrugging off poison: a panicking host already failed the run.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the server's host and every device host share with the driver.
struct World {
    seed: u64,
    config: ServerConfig,
    ca_pem: Vec<u8>,
    server_disk: SimDisk,
    /// The server's anchor and ledger: what a rollback of its disk does not reach.
    witness: cubby_store::witness::MemoryWitness,
    /// A clean restart of the server was asked for.
    restart: tokio::sync::Notify,
    /// The server's disk was rolled back or wiped since faults began: acknowledged edits may
    /// be on devices only until they offer them back, so crash checks wait for the end.
    rolled_back: AtomicBool,
    /// Times the server refused its store at start and the operator accepted it (a new epoch).
    restores: std::sync::atomic::AtomicUsize,
    devices: Vec<DeviceSlot>,
    customers: Vec<CustomerId>,
    journal: Mutex<Journal>,
    /// Faults have stopped: devices stop editing and report what they hold.
    quiet: AtomicBool,
    /// When the server accepted each connection (simulated time).
    accepts: Mutex<Vec<Duration>>,
    /// Server nodes sharing `server_disk` (1: the one server, with its witness).
    nodes: usize,
    /// What the nodes tell each other, when there are several.
    log: Arc<cluster::SimLog>,
    /// How the nodes wake each other.
    bus_mode: cubby_server::config::BusMode,
    _dir: tempfile::TempDir,
}

struct DeviceSlot {
    name: String,
    customer: usize,
    /// Mints the device's tokens, each `TOKEN_TTL` from simulated now.
    signer: Arc<TokenSigner>,
    key: [u8; 32],
    disk: SimDisk,
}

/// What devices did and saw.
#[derive(Default)]
struct Journal {
    /// Every edit whose `change` returned (durable on the device).
    edits: Vec<Edit>,
    /// Documents each customer's devices created, by customer.
    created: BTreeMap<usize, BTreeSet<DocId>>,
    /// Each device's latest report once faults stopped, by device.
    reports: BTreeMap<usize, Report>,
}

struct Edit {
    customer: usize,
    device: usize,
    doc: DocId,
    key: String,
    /// The server acknowledged it: its document was no longer marked unsynced on the device
    /// after the edit returned.
    acked: bool,
}

/// What a device holds: each document's heads and JSON, and how many are marked unsynced.
#[derive(Clone, PartialEq)]
struct Report {
    docs: BTreeMap<DocId, (Vec<ChangeHash>, serde_json::Value)>,
    unsynced: usize,
}

fn tag(customer: usize) -> String {
    format!("customer-{customer}")
}

impl World {
    fn new(seed: u64, customers: usize, devices_each: usize, nodes: usize) -> Arc<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::dev(dir.path(), SocketAddr::from(([0, 0, 0, 0], PORT)));
        config.limits.key_reload_secs = 24 * 3600;
        let master = MasterSecret::create(&cubby_server::master_key_path(&config)).expect("key");
        let cert = cubby_server::tls::ensure_self_signed(dir.path()).expect("certificate");
        let ca_pem = std::fs::read(&cert.cert).expect("certificate readable");
        let signer = Arc::new(auth::dev_signer(dir.path(), true).expect("dev tenant key"));
        let keyring = Keyring::from_master(&master);
        let mut rng = Rng(seed ^ 0x0005_EED0_FDE7_1CE5);
        let mut devices = Vec::new();
        let mut ids = Vec::new();
        for c in 0..customers {
            let subject = tag(c);
            ids.push(CustomerId::from_bytes(keyring.customer_id(auth::DEV_TENANT, &subject)));
            for d in 0..devices_each {
                let mut key = [0; 32];
                key.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
                devices.push(DeviceSlot {
                    name: format!("c{c}-d{d}"),
                    customer: c,
                    signer: signer.clone(),
                    key,
                    disk: SimDisk::default(),
                });
            }
        }
        Arc::new(Self {
            seed,
            config,
            ca_pem,
            server_disk: SimDisk::default(),
            witness: cubby_store::witness::MemoryWitness::new(),
            restart: tokio::sync::Notify::new(),
            rolled_back: AtomicBool::new(false),
            restores: std::sync::atomic::AtomicUsize::new(0),
            devices,
            customers: ids,
            journal: Mutex::new(Journal::default()),
            quiet: AtomicBool::new(false),
            accepts: Mutex::new(Vec::new()),
            nodes,
            log: cluster::SimLog::new(seed),
            bus_mode: if seed.is_multiple_of(2) {
                cubby_server::config::BusMode::Listen
            } else {
                cubby_server::config::BusMode::Poll
            },
            _dir: dir,
        })
    }

    /// The host name of server node `n` ("server" when there is one).
    fn node(&self, n: usize) -> String {
        if self.nodes == 1 { "server".into() } else { format!("server{n}") }
    }

    /// Checks that every acknowledged edit is on the server's disk now.
    fn check_durable(&self, when: &str) -> Result<usize, String> {
        let master = MasterSecret::read(&cubby_server::master_key_path(&self.config))
            .map_err(|e| format!("{when}: {e}"))?;
        let store = EncryptedStore::open(self.server_disk.durable(), Keyring::from_master(&master))
            .map_err(|e| format!("{when}: the server's disk does not open: {e}"))?;
        let journal = lock(&self.journal);
        let mut wanted: BTreeMap<(usize, DocId), Vec<&str>> = BTreeMap::new();
        for edit in journal.edits.iter().filter(|e| e.acked) {
            wanted.entry((edit.customer, edit.doc)).or_default().push(&edit.key);
        }
        let mut checked = 0;
        for ((customer, doc), keys) in wanted {
            let records = store
                .load(&self.customers[customer], &doc)
                .map_err(|e| format!("{when}: loading {doc}: {e}"))?
                .ok_or_else(|| format!("{when}: acknowledged document {doc} is not on disk"))?;
            let automerge = cubby_core::history::rebuild(
                records.snapshot.as_ref().map(|s| s.bytes.as_slice()),
                records.chunks.iter().map(|(_, b)| b.as_slice()),
            )
            .map_err(|e| format!("{when}: {doc} does not load: {e}"))?;
            let json = cubby_core::json::to_json(&automerge);
            for key in keys {
                if json.get(key).is_none() {
                    return Err(format!("{when}: acknowledged edit {key} of {doc} was lost"));
                }
                checked += 1;
            }
        }
        Ok(checked)
    }

    /// `Ok` once every customer's devices agree and hold every edit; otherwise why not.
    fn converged(&self) -> Result<(), String> {
        let journal = lock(&self.journal);
        for (c, _) in self.customers.iter().enumerate() {
            let devices: Vec<usize> =
                (0..self.devices.len()).filter(|&d| self.devices[d].customer == c).collect();
            let mut first: Option<(&str, &Report)> = None;
            for &d in &devices {
                let name = &self.devices[d].name;
                let report =
                    journal.reports.get(&d).ok_or_else(|| format!("{name} has not reported"))?;
                if report.unsynced > 0 {
                    return Err(format!("{name} has {} unsynced documents", report.unsynced));
                }
                match first {
                    None => first = Some((name, report)),
                    Some((other, theirs)) if !same_heads(theirs, report) => {
                        let differs = theirs.docs.keys().chain(report.docs.keys()).find(|doc| {
                            theirs.docs.get(doc).map(|d| &d.0) != report.docs.get(doc).map(|d| &d.0)
                        });
                        let said = |r: &Report, doc: &DocId| {
                            r.docs.get(doc).map(|(heads, json)| format!("{heads:?} {json}"))
                        };
                        let detail = differs.map(|doc| {
                            format!(
                                "{doc}: {other} {:?}, {name} {:?}",
                                said(theirs, doc),
                                said(report, doc)
                            )
                        });
                        return Err(format!("{name} and {other} hold different heads: {detail:?}"));
                    }
                    Some(_) => {}
                }
            }
            let Some((name, report)) = first else { continue };
            for edit in journal.edits.iter().filter(|e| e.customer == c) {
                let held = report.docs.get(&edit.doc).and_then(|(_, json)| json.get(&edit.key));
                if held.is_none() {
                    return Err(format!("{name} lacks edit {} of {}", edit.key, edit.doc));
                }
            }
        }
        Ok(())
    }

    /// No device holds a document or a value of another customer.
    fn check_isolation(&self) -> Result<(), String> {
        let journal = lock(&self.journal);
        for (&d, report) in &journal.reports {
            let slot = &self.devices[d];
            let own = journal.created.get(&slot.customer).cloned().unwrap_or_default();
            let prefix = format!("{}/", tag(slot.customer));
            for (doc, (_, json)) in &report.docs {
                if !own.contains(doc) {
                    return Err(format!(
                        "{} holds {doc}, which its customer never made",
                        slot.name
                    ));
                }
                let foreign = json.as_object().into_iter().flatten().find(|(_, value)| {
                    !value.as_str().is_some_and(|text| text.starts_with(&prefix))
                });
                if let Some((key, value)) = foreign {
                    return Err(format!("{} holds {key} = {value} in {doc}", slot.name));
                }
            }
        }
        Ok(())
    }
}

fn same_heads(a: &Report, b: &Report) -> bool {
    a.docs.len() == b.docs.len()
        && a.docs.iter().zip(&b.docs).all(|((ia, (ha, _)), (ib, (hb, _)))| ia == ib && ha == hb)
}

/// The server's host: a real `cubby-server` on the simulated network and disk, restarted
/// cleanly whenever the driver asks. When it refuses its store (rolled back or wiped), the host
/// does what the operator would, `cubby-server restore`, and starts it again.
async fn server(world: Arc<World>) -> turmoil::Result {
    loop {
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
        let listener = SimListener { listener, world: world.clone() };
        let platform = Platform {
            store: Arc::new(world.server_disk.clone()),
            listener,
            work: StorageWork::Inline,
            clock: auth::Clock::Simulated(sim_clock),
            witness: Some(Arc::new(world.witness.clone())),
            bus: Arc::new(cubby_server::bus::LocalBus::default()),
        };
        let running = match cubby_server::start_on(world.config.clone(), platform).await {
            Ok(running) => running,
            Err(cubby_server::StartError::Integrity { .. }) => {
                let master = MasterSecret::read(&cubby_server::master_key_path(&world.config))?;
                EncryptedStore::begin_epoch(
                    world.server_disk.clone(),
                    Keyring::from_master(&master),
                    Arc::new(world.witness.clone()),
                )?;
                world.restores.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        world.restart.notified().await;
        running.shutdown().await;
    }
}

/// Node `n` of several sharing the server's disk ("the database") and the simulated bus log,
/// without a witness, as nodes on PostgreSQL run; restarted by the driver after a crash.
async fn node(world: Arc<World>, n: usize) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let listener = SimListener { listener, world: world.clone() };
    let writer = n as i64 + 1;
    let store = cluster::Logged { disk: world.server_disk.clone(), log: world.log.clone(), writer };
    let bus = cubby_server::bus::log::LogBus::start(
        Arc::new(world.log.node(writer)),
        world.bus_mode,
        Duration::from_millis(250),
    );
    let platform = Platform {
        store: Arc::new(store),
        listener,
        work: StorageWork::Inline,
        clock: auth::Clock::Simulated(sim_clock),
        witness: None,
        bus: Arc::new(bus),
    };
    let _running = cubby_server::start_on(world.config.clone(), platform).await?;
    std::future::pending::<()>().await;
    Ok(())
}

/// The server's end of the simulated network; it notes when each connection arrives.
struct SimListener {
    listener: turmoil::net::TcpListener,
    world: Arc<World>,
}

impl Listener for SimListener {
    type Io = turmoil::net::TcpStream;

    async fn accept(&self) -> std::io::Result<(Self::Io, SocketAddr)> {
        let accepted = self.listener.accept().await?;
        lock(&self.world.accepts).push(turmoil::sim_elapsed().unwrap_or_default());
        Ok(accepted)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A device's token provider: a fresh token, issued in simulated time, whenever it is asked.
fn sim_tokens(slot: &DeviceSlot) -> impl TokenProvider {
    let (signer, subject) = (slot.signer.clone(), tag(slot.customer));
    move |_refresh| {
        let token =
            auth::dev_token_at(&signer, &subject, TOKEN_TTL, auth::Clock::Simulated(sim_clock));
        std::future::ready(Ok(token))
    }
}

/// An SDK client on the simulated network and its own simulated disk; with several server
/// nodes, each connection goes to the next one (a device whose node is down or cut off moves).
async fn sim_client(
    slot: &DeviceSlot,
    ca_pem: &[u8],
    autosync: bool,
    nodes: usize,
) -> Result<Client, cubby_client::ClientError> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(slot.customer));
    Client::builder()
        .with_store(Arc::new(slot.disk.clone()))
        .with_inline_storage(true)
        .with_local_key(slot.key)
        .with_server(format!("https://localhost:{PORT}"))
        .with_ca_pem(ca_pem.to_vec())
        .with_token_provider(sim_tokens(slot))
        .with_device_name(slot.name.clone())
        .with_transport(move || {
            let n = next.fetch_add(1, Ordering::Relaxed) % nodes;
            let host = if nodes == 1 { "server".to_owned() } else { format!("server{n}") };
            turmoil::net::TcpStream::connect((host, PORT))
        })
        .with_autosync(autosync)
        .build()
        .await
}

/// A device's host: it edits at random until faults stop, then reports what it holds.
async fn device(world: Arc<World>, d: usize, incarnation: u64) -> turmoil::Result {
    let slot = &world.devices[d];
    let client = sim_client(slot, &world.ca_pem, true, world.nodes).await?;
    let mut rng = Rng(world.seed ^ ((d as u64 + 1) << 32) ^ incarnation);
    loop {
        if world.quiet.load(Ordering::Relaxed) {
            let report = report(&client).await?;
            note_acks(&world, d, &client).await?;
            lock(&world.journal).reports.insert(d, report);
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        tokio::time::sleep(rng.millis(50, 1500)).await;
        edit(&world, d, &client, &mut rng).await?;
        note_acks(&world, d, &client).await?;
    }
}

/// One random edit: a new key in one of the customer's documents (sometimes a new document,
/// left empty one time in three: then its creation is all there is to sync).
async fn edit(world: &World, d: usize, client: &Client, rng: &mut Rng) -> turmoil::Result {
    let slot = &world.devices[d];
    let docs = client.list().await?;
    let doc = if docs.is_empty() || (docs.len() < 4 && rng.below(8) == 0) {
        let doc = client.create(&format!("made by {}", slot.name)).await?;
        lock(&world.journal).created.entry(slot.customer).or_default().insert(doc.id());
        if !docs.is_empty() && rng.below(3) == 0 {
            return Ok(());
        }
        doc
    } else {
        client.open(docs[rng.below(docs.len())].0).await?
    };
    let n = lock(&world.journal).edits.iter().filter(|e| e.device == d).count();
    let key = format!("{}-{n}", slot.name);
    doc.put(&key, serde_json::json!(format!("{}/{key}", tag(slot.customer)))).await?;
    lock(&world.journal).edits.push(Edit {
        customer: slot.customer,
        device: d,
        doc: doc.id(),
        key,
        acked: false,
    });
    Ok(())
}

/// Marks this device's edits acknowledged where their document is no longer unsynced.
async fn note_acks(world: &World, d: usize, client: &Client) -> turmoil::Result {
    let made = lock(&world.journal).edits.len();
    let unsynced: HashSet<DocId> = client.unsynced().await?.into_iter().collect();
    let mut journal = lock(&world.journal);
    for edit in journal.edits[..made].iter_mut().filter(|e| e.device == d) {
        edit.acked |= !unsynced.contains(&edit.doc);
    }
    Ok(())
}

async fn report(client: &Client) -> Result<Report, cubby_client::ClientError> {
    let mut docs = BTreeMap::new();
    for (id, _) in client.list().await? {
        let doc = client.open(id).await?;
        let mut heads = doc.heads();
        heads.sort();
        docs.insert(id, (heads, doc.to_json()));
    }
    Ok(Report { docs, unsynced: client.unsynced().await?.len() })
}

/// What one seed did.
#[derive(Default)]
struct Outcome {
    simulated: Duration,
    partitions: usize,
    delays: usize,
    server_crashes: usize,
    rollbacks: usize,
    wipes: usize,
    restores: usize,
    server_restarts: usize,
    device_crashes: usize,
    edits: usize,
    acked_checks: usize,
    writes_lost: usize,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} edits; faults: {} partitions, {} delays, {} server crashes, {} server disks rolled back and {} wiped (each accepted with a new epoch: {} restores), {} clean server restarts, {} device crashes; {} acknowledged edits found on disk after crashes; {} writes lost",
            self.edits,
            self.partitions,
            self.delays,
            self.server_crashes,
            self.rollbacks,
            self.wipes,
            self.restores,
            self.server_restarts,
            self.device_crashes,
            self.acked_checks,
            self.writes_lost,
        )
    }
}

#[derive(Default)]
struct Totals {
    simulated: Duration,
    outcome: Outcome,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.simulated += o.simulated;
        let t = &mut self.outcome;
        t.partitions += o.partitions;
        t.delays += o.delays;
        t.server_crashes += o.server_crashes;
        t.rollbacks += o.rollbacks;
        t.wipes += o.wipes;
        t.restores += o.restores;
        t.server_restarts += o.server_restarts;
        t.device_crashes += o.device_crashes;
        t.edits += o.edits;
        t.acked_checks += o.acked_checks;
        t.writes_lost += o.writes_lost;
    }
}

/// A fault to undo at a time: a link (device, node) to repair or release, a host to restart.
enum Undo {
    Repair(String, String),
    Release(String, String),
    Bounce(String),
}

/// Which faults a run injects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Every kind, at random.
    All,
    /// Partitions only, one after another, so that many cut a sync round in the middle.
    Partitions,
}

/// BAD_INPUTS row 29: one customer's two devices edit continuously; one of them is cut off again
/// and again (for 1 to 20 s, every 0.3 to 3 s), so that partitions land in the middle of sync
/// rounds, and both sides keep editing. After repair, both hold identical heads and every edit,
/// and no acknowledged change is lost.
fn row_29_partition_mid_sync_both_sides_edit_offline() -> Result<Outcome, String> {
    run(29, Plan::Partitions, 1, 2, 1)
}

fn run_seed(seed: u64) -> Result<Outcome, String> {
    let mut rng = Rng(seed);
    let customers = 2 + rng.below(2);
    let devices_each = 2 + rng.below(2);
    run(seed, Plan::All, customers, devices_each, 1)
}

/// Two or three server nodes over one store ("the database", which does not crash) and the
/// simulated bus log: devices spread over the nodes and move when theirs is down or cut off;
/// nodes crash and come back; bus entries arrive late and out of order, wake-ups get lost.
fn run_cluster_seed(seed: u64) -> Result<Outcome, String> {
    let mut rng = Rng(seed ^ 0xC1);
    let customers = 2 + rng.below(2);
    let devices_each = 2 + rng.below(2);
    run(seed, Plan::All, customers, devices_each, 2 + rng.below(2))
}

fn run(
    seed: u64,
    plan: Plan,
    customers: usize,
    devices_each: usize,
    nodes: usize,
) -> Result<Outcome, String> {
    let mut rng = Rng(seed ^ 0xFA17);
    let world = World::new(seed, customers, devices_each, nodes);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(FAULT_PHASE + CONVERGE_WITHIN + Duration::from_secs(60))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(25))
        .build();
    if nodes == 1 {
        let w = world.clone();
        sim.host("server", move || server(w.clone()));
    } else {
        for n in 0..nodes {
            let w = world.clone();
            sim.host(world.node(n).as_str(), move || node(w.clone(), n));
        }
    }
    let incarnations: Vec<Arc<std::sync::atomic::AtomicU64>> =
        world.devices.iter().map(|_| Arc::default()).collect();
    for (d, slot) in world.devices.iter().enumerate() {
        let (w, born) = (world.clone(), incarnations[d].clone());
        sim.host(slot.name.as_str(), move || {
            device(w.clone(), d, born.fetch_add(1, Ordering::Relaxed))
        });
    }

    let mut outcome = Outcome::default();
    let mut undo: Vec<(Duration, Undo)> = Vec::new();
    let mut down: HashSet<String> = HashSet::new();
    let mut next_fault = rng.millis(500, 3000);
    let step = |sim: &mut turmoil::Sim<'_>| sim.step().map_err(|e| format!("a host failed: {e}"));
    while sim.elapsed() < FAULT_PHASE {
        step(&mut sim)?;
        let now = sim.elapsed();
        for (_, action) in extract_due(&mut undo, now) {
            apply_undo(&mut sim, action, &mut down);
        }
        if now < next_fault {
            continue;
        }
        next_fault = now + rng.millis(300, 3000);
        let device = world.devices[rng.below(world.devices.len())].name.clone();
        let server = world.node(rng.below(nodes));
        let kind = match plan {
            Plan::All => rng.below(11),
            Plan::Partitions => 0,
        };
        match kind {
            // A device goes offline mid-sync and keeps editing (row 29).
            0..=2 => {
                sim.partition(device.as_str(), server.as_str());
                undo.push((now + rng.millis(1_000, 20_000), Undo::Repair(device, server)));
                outcome.partitions += 1;
            }
            // Its traffic is held, then delivered late.
            3 | 4 => {
                sim.hold(device.as_str(), server.as_str());
                undo.push((now + rng.millis(100, 5_000), Undo::Release(device, server)));
                outcome.delays += 1;
            }
            // The server loses power: what it had not flushed is gone, but for some first
            // writes since, as sled's log may have written them out (`SimDisk::crash_partly`).
            // A node of several dies: the database keeps every commit.
            5 | 6 if nodes > 1 && !down.contains(&server) => {
                sim.crash(server.as_str());
                outcome.acked_checks += world.check_durable("after a node crash")?;
                down.insert(server.clone());
                undo.push((now + rng.millis(200, 5_000), Undo::Bounce(server)));
                outcome.server_crashes += 1;
            }
            5 | 6 if nodes == 1 && !down.contains("server") => {
                sim.crash("server");
                outcome.writes_lost += world.server_disk.crash_partly(&mut rng);
                if !world.rolled_back.load(Ordering::Relaxed) {
                    outcome.acked_checks += world.check_durable("after a server crash")?;
                }
                down.insert("server".into());
                undo.push((now + rng.millis(200, 5_000), Undo::Bounce("server".into())));
                outcome.server_crashes += 1;
            }
            7 if nodes == 1 && !down.contains("server") => {
                world.restart.notify_one();
                outcome.server_restarts += 1;
            }
            // The server's disk goes back to an earlier state (a backup restored, a volume
            // snapshot put back), or is lost whole. The server refuses it at start; the
            // operator accepts it (a new epoch) and the devices offer back what they hold.
            10 if nodes == 1
                && !down.contains("server")
                && (outcome.rollbacks + outcome.wipes) < 2 =>
            {
                sim.crash("server");
                if rng.below(3) == 0 {
                    outcome.writes_lost += world.server_disk.wipe();
                    outcome.wipes += 1;
                } else {
                    outcome.writes_lost += world.server_disk.roll_back(&mut rng);
                    outcome.rollbacks += 1;
                }
                world.rolled_back.store(true, Ordering::Relaxed);
                down.insert("server".into());
                undo.push((now + rng.millis(200, 5_000), Undo::Bounce("server".into())));
            }
            // A device crashes (its unflushed local writes are gone) and comes back later.
            8 | 9 if !down.contains(&device) => {
                sim.crash(device.as_str());
                let slot = world.devices.iter().find(|s| s.name == device).expect("device");
                outcome.writes_lost += slot.disk.crash();
                down.insert(device.clone());
                undo.push((now + rng.millis(500, 10_000), Undo::Bounce(device)));
                outcome.device_crashes += 1;
            }
            _ => {}
        }
    }

    // Faults stop: heal everything, restart what is down, and wait for convergence.
    for (_, action) in std::mem::take(&mut undo) {
        apply_undo(&mut sim, action, &mut down);
    }
    world.quiet.store(true, Ordering::Relaxed);
    let deadline = sim.elapsed() + CONVERGE_WITHIN;
    let mut last = Err(String::from("nothing reported"));
    while sim.elapsed() < deadline {
        step(&mut sim)?;
        if sim.elapsed().as_millis() % 500 == 0 {
            last = world.converged();
            if last.is_ok() {
                break;
            }
        }
    }
    last.map_err(|why| format!("no convergence {CONVERGE_WITHIN:?} after faults stopped: {why}"))?;
    world.check_isolation()?;

    // Everything converged, so everything is acknowledged: a last crash must keep all of it.
    for n in 0..nodes {
        sim.crash(world.node(n).as_str());
    }
    outcome.writes_lost += world.server_disk.crash();
    let mut journal = lock(&world.journal);
    journal.edits.iter_mut().for_each(|e| e.acked = true);
    outcome.edits = journal.edits.len();
    drop(journal);
    outcome.acked_checks += world.check_durable("after the final crash")?;
    outcome.restores = world.restores.load(Ordering::Relaxed);
    outcome.simulated = sim.elapsed();
    Ok(outcome)
}

fn extract_due(undo: &mut Vec<(Duration, Undo)>, now: Duration) -> Vec<(Duration, Undo)> {
    let (due, later) = std::mem::take(undo).into_iter().partition(|(at, _)| *at <= now);
    *undo = later;
    due
}

fn apply_undo(sim: &mut turmoil::Sim<'_>, action: Undo, down: &mut HashSet<String>) {
    match action {
        Undo::Repair(a, b) => sim.repair(a.as_str(), b.as_str()),
        Undo::Release(a, b) => sim.release(a.as_str(), b.as_str()),
        Undo::Bounce(host) => {
            if down.remove(&host) {
                sim.bounce(host.as_str());
            }
        }
    }
}
