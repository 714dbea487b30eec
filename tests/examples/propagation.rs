//! Device-to-device propagation latency, a fresh device's sync time, and the sync time of a
//! device that made as many documents offline, on loopback.
//!
//! ```text
//! cargo run --release -p cubby-tests --example propagation -- [EDITS] [DOCS] [RTT_MS]
//! ```
//!
//! With RTT_MS, a second fresh device also syncs the DOCS documents over a link that delays
//! every byte by half of RTT_MS each way (latency only, no bandwidth limit; the TCP handshake is
//! not delayed), then reconnects over it after missing one change.
//!
//! A real server (TLS, sled, group commit) and real SDK devices run in this process. Prints one
//! JSON line per result.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cubby_client::DocEvent;
use cubby_tests::{Device, TestServer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let edits: usize = args.next().map_or(1000, |a| a.parse().expect("EDITS is a number"));
    let docs: usize = args.next().map_or(1000, |a| a.parse().expect("DOCS is a number"));
    let rtt: Option<Duration> =
        args.next().map(|a| Duration::from_millis(a.parse().expect("RTT_MS is a number")));
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
        if let Ok(d) = laptop.client.open(doc.id()).await
            && d.to_json()["n"] == json!(-1)
        {
            break d;
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

    if let Some(rtt) = rtt {
        // 2b. The same over a slow link.
        let dir = tempfile::tempdir().expect("temp dir");
        let started = Instant::now();
        let far = far_device(&server, dir.path(), rtt).await;
        far.wait_until_synced().await.expect("the far device synced");
        let elapsed = started.elapsed();
        assert_eq!(far.list().await.expect("list").len(), docs);
        println!(
            "{}",
            json!({"result": "fresh_device_sync_over_link", "rtt_ms": rtt.as_millis() as u64,
                   "documents": docs, "seconds": elapsed.as_secs_f64()})
        );
        far.shutdown().await;

        // 2c. That device comes back after one change to one document.
        let first = writer.client.list().await.expect("list")[0].0;
        let doc = writer.client.open(first).await.expect("open");
        doc.put("missed", json!(true)).await.expect("put");
        writer.client.wait_until_synced().await.expect("writer synced");
        let started = Instant::now();
        let far = far_device(&server, dir.path(), rtt).await;
        far.wait_until_synced().await.expect("the far device synced again");
        let elapsed = started.elapsed();
        let copy = far.open(first).await.expect("open");
        assert_eq!(copy.to_json()["missed"], json!(true));
        println!(
            "{}",
            json!({"result": "reconnect_over_link", "rtt_ms": rtt.as_millis() as u64,
                   "round_trips": elapsed.as_secs_f64() / rtt.as_secs_f64(),
                   "seconds": elapsed.as_secs_f64()})
        );
        far.shutdown().await;
    }

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

/// A device of bob's in `dir` that reaches the server over a link with `rtt` round trips.
async fn far_device(
    server: &TestServer,
    dir: &std::path::Path,
    rtt: Duration,
) -> cubby_client::Client {
    let addr = server.running().local_addr();
    server
        .client_builder(cubby_client::StaticToken::new(server.token("bob")))
        .with_data_dir(dir)
        .with_transport(move || delayed_link(addr, rtt))
        .build()
        .await
        .expect("client builds")
}

/// A connection to `addr` whose bytes each arrive half of `rtt` after they were sent, in order.
async fn delayed_link(addr: SocketAddr, rtt: Duration) -> std::io::Result<tokio::io::DuplexStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (app, link) = tokio::io::duplex(1 << 20);
    let (from_server, to_server) = tcp.into_split();
    let (from_app, to_app) = tokio::io::split(link);
    tokio::spawn(carry(from_app, to_server, rtt / 2));
    tokio::spawn(carry(from_server, to_app, rtt / 2));
    Ok(app)
}

/// Copies `from` to `to`, each read delivered `delay` after it was read.
async fn carry(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let deliver = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = deliver.await;
}
