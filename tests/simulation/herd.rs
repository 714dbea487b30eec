//! BAD_INPUTS row 30: the server restarts under many connected devices.
//!
//! `clients` devices (four per customer) connect, each writes into its own document and waits
//! for the acknowledgement. Then the server crashes and comes straight back. Every device must
//! reconnect (spread out by its jittered backoff, not all at once), write again, and converge
//! with its customer's other devices; every acknowledged write must survive the crash.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cubby_client::Client;
use futures_util::future::join_all;

use super::{Edit, TICK, World, fail, lock, report, sim_client, tag};

/// Devices per simulated host.
const PER_HOST: usize = 100;
/// The window in which reconnections are counted for the peak.
const WINDOW: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Herd {
    /// Devices whose first write was acknowledged.
    ready: AtomicUsize,
    /// The server has been bounced.
    bounced: AtomicBool,
}

pub(crate) fn run(clients: usize, seed: u64) {
    let started = Instant::now();
    let world = World::new(seed, clients.div_ceil(4), 4, 1);
    let clients = world.devices.len();
    let herd = Arc::new(Herd::default());
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(900))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(25))
        // The listen backlog: turmoil panics rather than refusing when it overflows.
        .tcp_capacity(16 * 1024)
        .build();
    let w = world.clone();
    sim.host("server", move || super::server(w.clone()));
    for (k, first) in (0..clients).step_by(PER_HOST).enumerate() {
        let (w, h) = (world.clone(), herd.clone());
        let devices = first..(first + PER_HOST).min(clients);
        sim.host(format!("fleet-{k}"), move || fleet(w.clone(), h.clone(), devices.clone()));
    }
    let step = |sim: &mut turmoil::Sim<'_>| {
        sim.step().unwrap_or_else(|e| fail(&format!("herd: a host failed: {e}")));
    };

    while herd.ready.load(Ordering::Relaxed) < clients {
        step(&mut sim);
    }
    let connected_at = sim.elapsed();
    let before = lock(&world.accepts).len();

    sim.crash("server");
    world.server_disk.crash();
    let checked =
        world.check_durable("after the bounce").unwrap_or_else(|e| fail(&format!("herd: {e}")));
    sim.bounce("server");
    let bounced_at = sim.elapsed();
    herd.bounced.store(true, Ordering::Relaxed);

    let deadline = bounced_at + Duration::from_secs(300);
    let converged = loop {
        step(&mut sim);
        if sim.elapsed().as_millis() % 500 == 0 && world.converged().is_ok() {
            break sim.elapsed();
        }
        if sim.elapsed() > deadline {
            fail(&format!(
                "herd of {clients}: no convergence 300 s after the bounce: {}",
                world.converged().err().unwrap_or_default()
            ));
        }
    };
    world.check_isolation().unwrap_or_else(|e| fail(&format!("herd: {e}")));

    let accepts: Vec<Duration> = lock(&world.accepts)[before..].to_vec();
    let peak = accepts
        .iter()
        .map(|&t| accepts.iter().filter(|&&u| u >= t && u < t + WINDOW).count())
        .max()
        .unwrap_or(0);
    let last = accepts.iter().max().copied().unwrap_or(bounced_at);
    eprintln!(
        "herd of {clients} devices: all connected and acknowledged by {:.1} s; after the bounce \
         {} connections in {:.1} s (peak {peak} in any {} ms), all converged {:.1} s after it; \
         {checked} acknowledged writes survived the crash; {:.1} s of real time",
        connected_at.as_secs_f64(),
        accepts.len(),
        (last - bounced_at).as_secs_f64(),
        WINDOW.as_millis(),
        (converged - bounced_at).as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    if accepts.len() < clients {
        fail(&format!("herd: only {} of {clients} devices reconnected", accepts.len()));
    }
    if accepts.len() > 2 * clients {
        fail(&format!("herd: {} connections for {clients} devices: a retry storm", accepts.len()));
    }
    // Full jitter over the first backoff (1 s) spreads them: about a tenth per 100 ms.
    if peak * 4 > clients {
        fail(&format!("herd: {peak} of {clients} devices reconnected within {WINDOW:?}"));
    }
}

/// A host running many devices.
async fn fleet(
    world: Arc<World>,
    herd: Arc<Herd>,
    devices: std::ops::Range<usize>,
) -> turmoil::Result {
    let mut clients = Vec::new();
    for d in devices {
        clients.push((d, sim_client(&world.devices[d], &world.ca_pem, true, 1).await?));
    }
    let runs = join_all(clients.iter().map(|(d, client)| member(&world, &herd, *d, client))).await;
    runs.into_iter().collect()
}

/// One device: a write before the bounce, one after, then reports until the run ends.
async fn member(world: &World, herd: &Herd, d: usize, client: &Client) -> turmoil::Result {
    let slot = &world.devices[d];
    let doc = client.create(&slot.name).await?;
    lock(&world.journal).created.entry(slot.customer).or_default().insert(doc.id());
    let write = |key: String| async {
        doc.put(&key, serde_json::json!(format!("{}/{key}", tag(slot.customer)))).await?;
        let edit = Edit { customer: slot.customer, device: d, doc: doc.id(), key, acked: false };
        lock(&world.journal).edits.push(edit);
        Ok::<_, cubby_client::ClientError>(())
    };
    write(format!("{}-before", slot.name)).await?;
    while !client.unsynced().await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    super::note_acks(world, d, client).await?;
    herd.ready.fetch_add(1, Ordering::Relaxed);
    while !herd.bounced.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write(format!("{}-after", slot.name)).await?;
    loop {
        let report = report(client).await?;
        lock(&world.journal).reports.insert(d, report);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
