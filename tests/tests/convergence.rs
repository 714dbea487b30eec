//! Seeded random schedules: devices go offline and online, edit and create documents; once
//! everyone is back online, every device holds the same documents with the same heads.

use std::collections::BTreeMap;

use cubby_tests::{Device, Rng, TestServer};
use serde_json::json;

struct Slot {
    device: Option<Device>,
    online: bool,
}

async fn run_schedule(seed: u64) {
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let server = TestServer::start().await;
    let mut slots = Vec::new();
    for _ in 0..3 {
        slots.push(Slot { device: Some(server.device("alice").await), online: true });
    }
    let first =
        slots[0].device.as_ref().expect("open").client.create("seed doc").await.expect("create");
    let mut docs = vec![first.id()];
    drop(first);

    for step in 0..40 {
        let i = rng.below(slots.len());
        match rng.below(10) {
            0..=5 => {
                // Edit a document this device holds (it may not have received every one yet).
                let device = slots[i].device.as_ref().expect("open");
                let id = docs[rng.below(docs.len())];
                if let Ok(doc) = device.client.open(id).await {
                    let key = format!("k{}", rng.below(4));
                    doc.put(&key, json!(format!("d{i}s{step}"))).await.expect("put");
                }
            }
            6 => {
                let device = slots[i].device.as_ref().expect("open");
                let doc =
                    device.client.create(&format!("created at {step}")).await.expect("create");
                docs.push(doc.id());
            }
            _ => {
                // Toggle the device offline or online (close and reopen its local store).
                let slot = &mut slots[i];
                let dir = slot.device.take().expect("open").close().await;
                slot.online = !slot.online;
                slot.device = Some(Device::open(&server, "alice", dir, slot.online).await);
            }
        }
    }

    // Everyone back online; sync until nothing moves.
    for slot in &mut slots {
        if !slot.online {
            let dir = slot.device.take().expect("open").close().await;
            slot.device = Some(Device::open(&server, "alice", dir, true).await);
            slot.online = true;
        }
    }
    let deadline = tokio::time::Instant::now() + cubby_tests::DEADLINE;
    loop {
        let mut views = Vec::new();
        for slot in &slots {
            let client = &slot.device.as_ref().expect("open").client;
            let Ok(synced) =
                tokio::time::timeout(cubby_tests::DEADLINE, client.wait_until_synced()).await
            else {
                let unsynced = client.unsynced().await.expect("unsynced");
                let status = client.status().borrow().clone();
                panic!(
                    "seed {seed}: a device never got up to date: {status:?}, unsynced {unsynced:?}"
                );
            };
            synced.unwrap_or_else(|f| panic!("seed {seed}: sync failed: {f}"));
            let mut view = BTreeMap::new();
            for (id, _) in client.list().await.expect("list") {
                view.insert(id, client.open(id).await.expect("open").heads());
            }
            views.push(view);
        }
        if views.iter().all(|v| *v == views[0]) {
            assert_eq!(
                views[0].len(),
                docs.len(),
                "seed {seed}: every created document is everywhere"
            );
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            report(&server, &slots).await;
            panic!("seed {seed}: devices did not converge");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Prints what every device and the server hold, for a schedule that did not converge.
async fn report(server: &TestServer, slots: &[Slot]) {
    let mut ids = std::collections::BTreeSet::new();
    for (i, slot) in slots.iter().enumerate() {
        let client = &slot.device.as_ref().expect("open").client;
        for (id, _) in client.list().await.expect("list") {
            let doc = client.open(id).await.expect("open");
            eprintln!("device {i} {}: heads {:?} {}", id.short(), doc.heads(), doc.to_json());
            ids.insert(id);
        }
    }
    for id in ids {
        let answer = server.document_json(&server.token("alice"), id.as_bytes()).await;
        eprintln!("server {}: {:?}", id.short(), answer);
    }
}

/// 24 seeds by default; `CUBBY_SEEDS=N` runs N (a failing seed names itself in the panic, and
/// the report shows every device's and the server's view).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_offline_schedules_converge() {
    let seeds: u64 = std::env::var("CUBBY_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    for seed in 1..=seeds {
        run_schedule(seed).await;
    }
}
