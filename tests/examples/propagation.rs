//! Device-to-device propagation latency, a fresh device's sync time, and the sync time of a
//! device that made as many documents offline, on loopback.
//!
//! ```text
//! cargo run --release -p cubby-tests --example propagation -- [EDITS] [DOCS]
//! ```
//!
//! A real server (TLS, sled, group commit) and real SDK devices run in this process. Prints one
//! JSON line per result.

use std::time::{Duration, Instant};

use cubby_client::DocEvent;
use cubby_tests::{Device, TestServer};
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let edits: usize = args.next().map_or(1000, |a| a.parse().expect("EDITS is a number"));
    let docs: usize = args.next().map_or(1000, |a| a.parse().expect("DOCS is a number"));
    // The writer below creates DOCS documents as fast as it can: lift the per-account write rate
    // limit, or it is told to slow down past about a thousand.
    let server =
        TestServer::start_with(|config| config.limits.max_writes_per_sec = 1_000_000).await;

    // 1. Isolated small edits, one device to another.
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("latency").await.expect("create");
    doc.put("n", json!(-1)).await.expect("put");
    let on_laptop = loop {
        if let Ok(d) = laptop.client.open(doc.id()).await {
            if d.to_json()["n"] == json!(-1) {
                break d;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut events = on_laptop.subscribe();
    let mut samples = Vec::with_capacity(edits);
    for i in 0..edits {
        let started = Instant::now();
        doc.put("n", json!(i)).await.expect("put");
        loop {
            if on_laptop.to_json()["n"] == json!(i) {
                break;
            }
            match events.recv().await {
                Ok(DocEvent::Remote) | Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events closed: {e}"),
            }
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "{}",
        json!({"result": "propagation", "edits": edits,
               "p50_ms": percentile(&samples, 0.50), "p99_ms": percentile(&samples, 0.99),
               "max_ms": percentile(&samples, 1.0)})
    );

    // 2. A fresh device syncs a store of DOCS documents.
    let writer = server.device("bob").await;
    for i in 0..docs {
        let d = writer.client.create(&format!("doc {i}")).await.expect("create");
        d.put("i", json!(i)).await.expect("put");
    }
    writer.client.wait_until_synced().await.expect("writer synced");
    let started = Instant::now();
    let fresh = server.device("bob").await;
    fresh.client.wait_until_synced().await.expect("fresh device synced");
    let elapsed = started.elapsed();
    let listed = fresh.client.list().await.expect("list").len();
    assert_eq!(listed, docs, "the fresh device holds every document");
    println!(
        "{}",
        json!({"result": "fresh_device_sync", "documents": docs, "seconds": elapsed.as_secs_f64()})
    );

    // 3. A device that created DOCS documents offline connects and pushes them all.
    let offline =
        Device::open(&server, "carol", tempfile::tempdir().expect("temp dir"), false).await;
    for i in 0..docs {
        let d = offline.client.create(&format!("doc {i}")).await.expect("create");
        d.put("i", json!(i)).await.expect("put");
    }
    let dir = offline.close().await;
    let started = Instant::now();
    let online = Device::open(&server, "carol", dir, true).await;
    online.client.wait_until_synced().await.expect("the offline writer synced");
    let elapsed = started.elapsed();
    println!(
        "{}",
        json!({"result": "offline_writer_sync", "documents": docs, "seconds": elapsed.as_secs_f64()})
    );
}
