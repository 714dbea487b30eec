//! Cubby's workloads, each against a fresh server process.

use std::path::Path;
use std::time::{Duration, Instant};

use cubby_client::{Client, DocHandle};
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::server::{ServerProcess, Wire};
use crate::stats::{Samples, ms};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long any one wait may take before the run is abandoned.
const PATIENCE: Duration = Duration::from_secs(60);

async fn synced(client: &Client) -> Result<(), Error> {
    tokio::time::timeout(PATIENCE, client.wait_until_synced())
        .await
        .map_err(|_| "not synced within a minute")?
        .map_err(|e| format!("sync failed: {e}"))?;
    Ok(())
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

/// Workload 1: one device makes `edits` isolated small edits (each waits for the last to reach
/// everyone); `receivers` other devices of the same customer receive each.
pub(crate) async fn fanout(bin: &Path, receivers: usize, edits: usize) -> Result<Value, Error> {
    let server = ServerProcess::start(bin)?;
    let dirs = tempfile::tempdir()?;
    let wire = Wire::default();
    let writer = server.device("fanout", &dirs.path().join("writer"), &wire).await?;
    let doc = writer.create("bench").await?;
    doc.put("n", json!(0)).await?;
    synced(&writer).await?;
    let mut devices = Vec::new();
    let mut copies = Vec::new();
    for i in 0..receivers {
        let device = server.device("fanout", &dirs.path().join(format!("r{i}")), &wire).await?;
        synced(&device).await?;
        let deadline = Instant::now() + PATIENCE;
        let copy = loop {
            if let Ok(copy) = device.open(doc.id()).await {
                break copy;
            }
            if Instant::now() > deadline {
                return Err("a receiver never got the document".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        has(&copy, 0).await?;
        copies.push(copy);
        devices.push(device);
    }

    let (cpu, bytes) = (server.cpu()?, wire.bytes());
    let mut latency = Samples::default();
    for n in 1..=edits as u64 {
        let started = Instant::now();
        let arrivals = join_all(copies.iter().map(|copy| async move {
            has(copy, n).await.map(|()| started.elapsed())
        }));
        let (put, arrived) = tokio::join!(doc.put("n", json!(n)), arrivals);
        put?;
        for at in arrived {
            latency.push(at?);
        }
    }
    let cpu = server.cpu()? - cpu;
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
    let writer = server.device("reconnect", &dirs.path().join("writer"), &wire).await?;
    let doc = writer.create("bench").await?;
    for n in 0..history as u64 {
        doc.put("n", json!(n)).await?;
    }
    synced(&writer).await?;
    let reader_dir = dirs.path().join("reader");
    let reader = server.device("reconnect", &reader_dir, &wire).await?;
    synced(&reader).await?;
    has(&reader.open(doc.id()).await?, history as u64 - 1).await?;
    reader.shutdown().await;

    // What reconnecting costs with nothing to catch up on.
    let idle = Wire::default();
    let reader = server.device("reconnect", &reader_dir, &idle).await?;
    synced(&reader).await?;
    reader.shutdown().await;

    let before = doc.heads();
    for n in 0..missing as u64 {
        doc.put("n", json!(history as u64 + n)).await?;
    }
    synced(&writer).await?;
    let changes: usize = doc.read(|d| d.get_changes(&before).iter().map(|c| c.raw_bytes().len()).sum());
    let catching_up = Wire::default();
    let started = Instant::now();
    let reader = server.device("reconnect", &reader_dir, &catching_up).await?;
    has(&reader.open(doc.id()).await?, (history + missing) as u64 - 1).await?;
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
