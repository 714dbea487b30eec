//! Issue 29's figure: the server's CPU per isolated change, as the document it goes into grows.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// One device writes a document offline (`changes` overwrites of one key, or one text of
/// `text_chars` characters) and syncs it; a second device of the customer holds it. Then the
/// first makes `edits` isolated edits (a key overwritten, or a character typed into the text),
/// each waiting until the second has it, and `edits` more. The server's CPU per edit (its
/// process's CPU clock) over the second lot should not grow with the document. The first lot
/// is reported apart: it holds the document's first compaction (256 chunks), where the server
/// applies the whole history to the document's content for the first time. Its memory with
/// the document held is reported beside.
pub(crate) async fn flat(
    bin: &Path,
    changes: usize,
    text_chars: usize,
    edits: usize,
) -> Result<Value, Error> {
    use automerge::transaction::Transactable;
    let server = ServerProcess::start(bin)?;
    let rss_empty = server.rss()?;
    let writer =
        light_device_on(&server, "flat", false, Arc::new(cubby_store::MemoryStore::new())).await?;
    let doc = writer.create("flat").await?;
    let text = if text_chars > 0 {
        let made = doc
            .change(move |tx| {
                let text = tx.put_object(automerge::ROOT, "text", automerge::ObjType::Text)?;
                tx.splice_text(&text, 0, 0, &"a".repeat(text_chars))?;
                Ok(text)
            })
            .await?;
        Some(made)
    } else {
        None
    };
    for n in 0..changes as u64 {
        doc.put("n", json!(n)).await?;
    }
    writer.start_sync();
    tokio::time::timeout(Duration::from_secs(600), writer.wait_until_synced())
        .await
        .map_err(|_| "the writer did not sync within ten minutes")?
        .map_err(|e| format!("sync failed: {e}"))?;
    let rss_loaded = server.rss()?;

    let dirs = tempfile::tempdir()?;
    let receiver = server.device("flat", &dirs.path().join("receiver"), &Wire::default()).await?;
    synced(&receiver).await?;
    let copy = arrived(&receiver, doc.id()).await?;
    same_heads(&copy, &doc.heads()).await?;

    // What the server spends while nothing happens (timers, the store's flusher): an edit into
    // the large text waits a long time for the receiving device's Automerge, and that time
    // costs the server this much too.
    let idle = server.cpu()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_per_sec = (server.cpu()? - idle).as_secs_f64() / 2.0;
    let mut latency = Samples::default();
    let mut cpu = server.cpu()?;
    let mut first_lot = Duration::ZERO;
    let mut measured = Instant::now();
    for i in 0..2 * edits {
        if i == edits {
            let now = server.cpu()?;
            (first_lot, cpu) = (now - cpu, now);
            latency = Samples::default();
            measured = Instant::now();
        }
        let started = Instant::now();
        match &text {
            Some(obj) => {
                let obj = obj.clone();
                doc.change(move |tx| tx.splice_text(&obj, i, 0, "b")).await?;
            }
            None => doc.put("n", json!(changes + i)).await?,
        }
        same_heads(&copy, &doc.heads()).await?;
        latency.push(started.elapsed());
    }
    let cpu = server.cpu()? - cpu;
    let took = measured.elapsed();
    Ok(json!({
        "workload": "flat",
        "system": "cubby",
        "history_changes": changes + 1,
        "text_chars": text_chars,
        "edits": edits,
        "server_cpu_us_per_change": cpu.as_secs_f64() * 1e6 / edits as f64,
        "server_idle_cpu_us_per_sec": idle_per_sec * 1e6,
        "server_cpu_us_per_change_less_idle":
            (cpu.as_secs_f64() - idle_per_sec * took.as_secs_f64()) * 1e6 / edits as f64,
        "first_lot_server_cpu_us_per_change": first_lot.as_secs_f64() * 1e6 / edits as f64,
        "p50_ms": ms(latency.quantile(0.5)),
        "p99_ms": ms(latency.quantile(0.99)),
        "server_rss_growth_bytes": rss_loaded.saturating_sub(rss_empty),
    }))
}

/// Waits until `doc`'s heads are `heads`.
async fn same_heads(doc: &DocHandle, heads: &[automerge::ChangeHash]) -> Result<(), Error> {
    let mut events = doc.subscribe();
    let deadline = Instant::now() + PATIENCE;
    while doc.heads() != heads {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) => return Err("the document closed".into()),
            Err(_) => return Err("an edit did not arrive within a minute".into()),
        }
    }
    Ok(())
}
