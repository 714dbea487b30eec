//! Cubby's workloads, each against a fresh server process.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cubby_client::{Client, DocHandle};
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::server::{ServerProcess, Wire};
use crate::stats::{Samples, ms};

mod cluster;
mod flat;
mod idle;
mod large;
pub(crate) use cluster::cluster;
pub(crate) use flat::flat;
pub(crate) use idle::idle;
pub(crate) use large::large_account;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long any one wait may take before the run is abandoned.
const PATIENCE: Duration = Duration::from_secs(60);

/// Characters typed into the large text while a second device holds it closed.
const KEYSTROKES: usize = 20;

async fn synced(client: &Client) -> Result<(), Error> {
    tokio::time::timeout(PATIENCE, client.wait_until_synced())
        .await
        .map_err(|_| "not synced within a minute")?
        .map_err(|e| format!("sync failed: {e}"))?;
    Ok(())
}

/// Waits for the server's acknowledgement of the document's changes (`DocEvent::Synced`).
async fn acknowledged(
    events: &mut tokio::sync::broadcast::Receiver<cubby_client::DocEvent>,
) -> Result<(), Error> {
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Ok(cubby_client::DocEvent::Synced)) => return Ok(()),
            Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) => return Err("the document closed".into()),
            Err(_) => return Err("no acknowledgement within a minute".into()),
        }
    }
}

/// Waits until `doc`'s root `n` is `value`.
async fn has(doc: &DocHandle, value: u64) -> Result<(), Error> {
    let mut events = doc.subscribe();
    let deadline = Instant::now() + PATIENCE;
    while doc.to_json()["n"] != json!(value) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) => return Err("the document closed".into()),
            Err(_) => return Err(format!("edit {value} did not arrive within a minute").into()),
        }
    }
    Ok(())
}

/// `device`'s copy of `doc`, once it has one.
async fn arrived(device: &Client, doc: cubby_core::DocId) -> Result<DocHandle, Error> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(copy) = device.open(doc).await {
            return Ok(copy);
        }
        if Instant::now() > deadline {
            return Err("a device never got the document".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server, a writer device with one document (`n` = 0), and `receivers` more devices of the
/// same customer holding it, every one with a sled store and its bytes counted.
struct Scene {
    server: ServerProcess,
    dirs: tempfile::TempDir,
    wire: Wire,
    writer: Client,
    doc: DocHandle,
    _receivers: Vec<Client>,
    copies: Vec<DocHandle>,
}

impl Scene {
    async fn new(bin: &Path, subject: &str, receivers: usize) -> Result<Self, Error> {
        let server = ServerProcess::start(bin)?;
        let dirs = tempfile::tempdir()?;
        let wire = Wire::default();
        let writer = server.device(subject, &dirs.path().join("writer"), &wire).await?;
        let doc = writer.create(subject).await?;
        doc.put("n", json!(0)).await?;
        synced(&writer).await?;
        let (mut devices, mut copies) = (Vec::new(), Vec::new());
        for i in 0..receivers {
            let device = server.device(subject, &dirs.path().join(format!("r{i}")), &wire).await?;
            synced(&device).await?;
            copies.push(arrived(&device, doc.id()).await?);
            devices.push(device);
        }
        Ok(Self { server, dirs, wire, writer, doc, _receivers: devices, copies })
    }
}

/// Workload 1: one device makes `edits` isolated small edits (each waits for the last to reach
/// everyone); `receivers` other devices of the same customer receive each.
pub(crate) async fn fanout(bin: &Path, receivers: usize, edits: usize) -> Result<Value, Error> {
    let scene = Scene::new(bin, "fanout", receivers).await?;
    let Scene { server, wire, doc, copies, .. } = &scene;
    for copy in copies {
        has(copy, 0).await?;
    }

    let (cpu, bytes) = (server.cpu()?, wire.bytes());
    // This process's CPU: the devices', which share the machine with the server.
    let devices_cpu = crate::server::cpu_of(std::process::id())?;
    let mut latency = Samples::default();
    for n in 1..=edits as u64 {
        let started = Instant::now();
        let arrivals = join_all(
            copies.iter().map(|copy| async move { has(copy, n).await.map(|()| started.elapsed()) }),
        );
        let (put, arrived) = tokio::join!(doc.put("n", json!(n)), arrivals);
        put?;
        for at in arrived {
            latency.push(at?);
        }
    }
    let cpu = server.cpu()? - cpu;
    let devices_cpu = crate::server::cpu_of(std::process::id())? - devices_cpu;
    let bytes = wire.bytes() - bytes;
    let per_change = |total: f64| total / edits as f64;
    Ok(json!({
        "workload": "fanout",
        "system": "cubby",
        "receivers": receivers,
        "edits": edits,
        "p50_ms": ms(latency.quantile(0.5)),
        "p99_ms": ms(latency.quantile(0.99)),
        "p999_ms": ms(latency.quantile(0.999)),
        "server_cpu_us_per_change": per_change(cpu.as_secs_f64() * 1e6),
        "devices_cpu_us_per_change": per_change(devices_cpu.as_secs_f64() * 1e6),
        "wire_bytes_per_change": per_change(bytes as f64),
        "server_rss_bytes": server.rss()?,
    }))
}

/// Workload 5: a device misses `missing` changes while offline, then reconnects. Reports the
/// bytes its reconnection took beyond an empty reconnection (TLS, hello, proof), against the
/// size of the missing changes themselves.
pub(crate) async fn reconnect(bin: &Path, history: usize, missing: usize) -> Result<Value, Error> {
    let server = ServerProcess::start(bin)?;
    let dirs = tempfile::tempdir()?;
    let wire = Wire::default();
    // The writer makes each lot of changes offline, then syncs them together. Made online, each
    // change can be a write of its own, and a few thousand in a few seconds exceed the
    // server's default per-customer write rate (200 a second, five seconds' worth at once).
    // The changes the reader misses are the same either way.
    let writer_dir = dirs.path().join("writer");
    let id = {
        let writer = server.offline_device("reconnect", &writer_dir, &wire).await?;
        let doc = writer.create("bench").await?;
        for n in 0..history as u64 {
            doc.put("n", json!(n)).await?;
        }
        writer.start_sync();
        synced(&writer).await?;
        writer.shutdown().await;
        doc.id()
    };
    let reader_dir = dirs.path().join("reader");
    let reader = server.device("reconnect", &reader_dir, &wire).await?;
    synced(&reader).await?;
    has(&reader.open(id).await?, history as u64 - 1).await?;
    reader.shutdown().await;

    // What reconnecting costs with nothing to catch up on.
    let idle = Wire::default();
    let reader = server.device("reconnect", &reader_dir, &idle).await?;
    synced(&reader).await?;
    reader.shutdown().await;

    let writer = server.offline_device("reconnect", &writer_dir, &wire).await?;
    let doc = writer.open(id).await?;
    let before = doc.heads();
    for n in 0..missing as u64 {
        doc.put("n", json!(history as u64 + n)).await?;
    }
    writer.start_sync();
    synced(&writer).await?;
    let changes: usize =
        doc.read(|d| d.get_changes(&before).iter().map(|c| c.raw_bytes().len()).sum());
    let catching_up = Wire::default();
    let started = Instant::now();
    let reader = server.device("reconnect", &reader_dir, &catching_up).await?;
    has(&reader.open(id).await?, (history + missing) as u64 - 1).await?;
    let took = started.elapsed();
    synced(&reader).await?;
    let extra = catching_up.bytes().saturating_sub(idle.bytes());
    Ok(json!({
        "workload": "reconnect",
        "system": "cubby",
        "history": history,
        "missing": missing,
        "missing_change_bytes": changes,
        "reconnect_wire_bytes": catching_up.bytes(),
        "empty_reconnect_wire_bytes": idle.bytes(),
        "ratio_to_missing": extra as f64 / changes.max(1) as f64,
        "ms_to_synced": ms(took),
    }))
}

/// How long the tokens of [`token_renewal`]'s devices live.
const TOKEN_LIFE: Duration = Duration::from_secs(4);

/// `devices` devices whose tokens live [`TOKEN_LIFE`] stay connected, idle, for `lifetimes` of
/// them: what each token lifetime costs in connections, wire bytes and server CPU, and how long
/// a device is not up to date. The server asks for a fresh token before one expires and the
/// device sends it on its open stream; a server that does not ask closes the stream at the
/// expiry, and the device reconnects.
pub(crate) async fn token_renewal(
    bin: &Path,
    devices: usize,
    lifetimes: u32,
) -> Result<Value, Error> {
    let server = ServerProcess::start(bin)?;
    let dirs = tempfile::tempdir()?;
    let wire = Wire::default();
    let signer = Arc::new(server.signer()?);
    let asked = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for n in 0..devices {
        let (signer, asked) = (signer.clone(), asked.clone());
        let tokens = move |refresh: bool| {
            if refresh {
                asked.fetch_add(1, Ordering::Relaxed);
            }
            let token = cubby_server::auth::dev_token(&signer, &format!("renewal-{n}"), TOKEN_LIFE);
            async move { Ok::<_, cubby_client::TokenError>(token) }
        };
        let device =
            server.device_with_tokens(&dirs.path().join(n.to_string()), &wire, tokens).await?;
        device.create("renewal").await?;
        synced(&device).await?;
        clients.push(device);
    }
    let away: Vec<_> = clients.iter().map(|c| tokio::spawn(time_not_up_to_date(c))).collect();
    let (bytes, connections, cpu) = (wire.bytes(), wire.connections(), server.cpu()?);
    asked.store(0, Ordering::Relaxed);
    // The workload is the devices sitting connected while their tokens run out.
    tokio::time::sleep(TOKEN_LIFE * lifetimes).await;
    let (bytes, connections, cpu) =
        (wire.bytes() - bytes, wire.connections() - connections, server.cpu()? - cpu);
    let fresh = asked.load(Ordering::Relaxed);
    for device in clients {
        device.shutdown().await;
    }
    let mut away_total = Duration::ZERO;
    for device in away {
        away_total += device.await?;
    }
    let n = devices as f64 * f64::from(lifetimes);
    Ok(json!({
        "workload": "token_renewal",
        "system": "cubby",
        "devices": devices,
        "token_lifetimes": lifetimes,
        "token_life_s": TOKEN_LIFE.as_secs(),
        "fresh_tokens": fresh,
        "connections": connections,
        "wire_bytes_per_token_life": bytes as f64 / n,
        "server_cpu_us_per_token_life": cpu.as_secs_f64() * 1e6 / n,
        "ms_not_up_to_date_per_token_life": ms(away_total) / n,
    }))
}

/// How long `client` is not up to date from now until it shuts down, from its status.
fn time_not_up_to_date(client: &Client) -> impl Future<Output = Duration> + use<> {
    let mut status = client.status();
    async move {
        let (mut away, mut since) = (Duration::ZERO, None);
        loop {
            let up = matches!(*status.borrow_and_update(), cubby_client::SyncStatus::UpToDate);
            match (up, since) {
                (false, None) => since = Some(Instant::now()),
                (true, Some(at)) => {
                    away += Instant::now().duration_since(at);
                    since = None;
                }
                _ => {}
            }
            if status.changed().await.is_err() {
                return away + since.map_or(Duration::ZERO, |at| at.elapsed());
            }
        }
    }
}

/// A device whose own storage is not under test: in memory, so thousands fit in one process.
async fn light_device(server: &ServerProcess, subject: &str) -> Result<Client, Error> {
    light_device_with(server, subject, true).await
}

async fn light_device_with(
    server: &ServerProcess,
    subject: &str,
    autosync: bool,
) -> Result<Client, Error> {
    light_device_on(server, subject, autosync, Arc::new(cubby_store::MemoryStore::new())).await
}

/// A light device on a store of the caller's: built again on the same store, it is the same
/// device, with what it held.
async fn light_device_on(
    server: &ServerProcess,
    subject: &str,
    autosync: bool,
    store: Arc<cubby_store::MemoryStore>,
) -> Result<Client, Error> {
    Ok(Client::builder()
        .with_store(store)
        .with_local_key([7; 32])
        .with_server(server.url.clone())
        .with_ca_pem(server.ca_pem.clone())
        .with_token_provider(cubby_client::StaticToken::new(server.token(subject)?))
        .with_autosync(autosync)
        .build()
        .await?)
}

/// Each client makes a document and writes to it, each write waiting for its acknowledgement,
/// until `until`; each client's acknowledgement times.
async fn write_until(clients: &[Client], until: Instant) -> Vec<Result<Samples, Error>> {
    join_all(clients.iter().map(|client| async move {
        let doc = client.create("log").await?;
        let mut events = doc.subscribe();
        let mut acks = Samples::default();
        let mut n = 0u64;
        while Instant::now() < until {
            let started = Instant::now();
            doc.put("n", json!(n)).await?;
            acknowledged(&mut events).await?;
            acks.push(started.elapsed());
            n += 1;
        }
        Ok::<_, Error>(acks)
    }))
    .await
}

/// Workload 6: `writers` devices (one customer each) write as fast as the server acknowledges,
/// for `secs` seconds. Reports acknowledged changes per second and the acknowledgement latency
/// (from the `change` call to its `DocEvent::Synced`).
pub(crate) async fn durability(bin: &Path, writers: usize, secs: u64) -> Result<Value, Error> {
    let server = ServerProcess::start(bin)?;
    // The writers keep their local stores in memory: on 2 cores, 64 sled stores flushing in
    // the bench process would measure the devices' disks, not the server's durability.
    let mut clients = Vec::new();
    for i in 0..writers {
        let client = light_device(&server, &format!("writer-{i}")).await?;
        synced(&client).await?;
        clients.push(client);
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let cpu = server.cpu()?;
    let runs = write_until(&clients, until).await;
    let cpu = server.cpu()? - cpu;
    let mut all = Samples::default();
    let mut count = 0usize;
    for run in runs {
        let run = run?;
        count += run.len();
        all.extend(run);
    }
    Ok(json!({
        "workload": "durability",
        "system": "cubby",
        "writers": writers,
        "seconds": secs,
        "acked_changes_per_sec": (count as f64 / secs as f64).round(),
        "ack_p50_ms": ms(all.quantile(0.5)),
        "ack_p99_ms": ms(all.quantile(0.99)),
        "server_cpu_us_per_change": (cpu.as_secs_f64() * 1e6 / count.max(1) as f64).round(),
    }))
}

/// Workload 2: one device makes `changes` changes offline, then syncs; `receivers` other
/// devices of the customer are connected. Reports the time until every device has all of
/// them, and the server's CPU per change, for each of `rounds` bursts into the same document
/// (so each lands on a longer history: the CPU per change should stay flat).
pub(crate) async fn burst(
    bin: &Path,
    changes: usize,
    receivers: usize,
    rounds: usize,
) -> Result<Value, Error> {
    let Scene { server, dirs, writer, doc, copies, _receivers, .. } =
        Scene::new(bin, "burst", receivers).await?;
    let id = doc.id();
    drop(doc);
    writer.shutdown().await;
    let mut each = Vec::new();
    for round in 0..rounds {
        // Offline: the same device, not syncing, makes the burst.
        let offline = Client::builder()
            .with_data_dir(dirs.path().join("writer"))
            .with_local_key([7; 32])
            .with_server(server.url.clone())
            .with_ca_pem(server.ca_pem.clone())
            .with_token_provider(cubby_client::StaticToken::new(server.token("burst")?))
            .with_autosync(false)
            .build()
            .await?;
        let doc = offline.open(id).await?;
        let first = (round * changes) as u64 + 1;
        let last = ((round + 1) * changes) as u64;
        for n in first..=last {
            doc.put("n", json!(n)).await?;
        }
        let cpu = server.cpu()?;
        let started = Instant::now();
        offline.start_sync();
        for copy in &copies {
            has(copy, last).await?;
        }
        let took = started.elapsed();
        let cpu = server.cpu()? - cpu;
        synced(&offline).await?;
        offline.shutdown().await;
        each.push(json!({
            "history_before": round * changes,
            "ms_until_all_have_all": ms(took),
            "server_cpu_us_per_change": (cpu.as_secs_f64() * 1e6 / changes as f64).round(),
        }));
    }
    Ok(json!({
        "workload": "burst",
        "system": "cubby",
        "changes": changes,
        "receivers": receivers,
        "rounds": each,
    }))
}
