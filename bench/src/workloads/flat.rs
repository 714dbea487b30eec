//! Issue 29's figure: the server's CPU per isolated change, as the document it goes into grows.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// One device writes a document offline (`changes` overwrites of one key, or one text of
/// `text_chars` characters) and syncs it; a second device of the customer holds it. Then the
/// first makes `edits` isolated edits (a key overwritten, or a character typed into the text),
/// each waiting until the second has it. The server's CPU per edit (its process's CPU clock)
/// should not grow with the document; its memory with the document held is reported beside.
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

    let cpu = server.cpu()?;
    let mut latency = Samples::default();
    for i in 0..edits {
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
    Ok(json!({
        "workload": "flat",
        "system": "cubby",
        "history_changes": changes + 1,
        "text_chars": text_chars,
        "edits": edits,
        "server_cpu_us_per_change": cpu.as_secs_f64() * 1e6 / edits as f64,
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
