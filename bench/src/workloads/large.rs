//! Workloads 4 and 7: a large account, synced whole by a fresh device and edited after a restart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// Workloads 4 and 7: an account of `docs` documents of `changes` changes each plus one text
/// document of `text_changes` one-character insertions, written on one device and synced.
/// Then (4) a fresh device with a sled store syncs the whole account: time and wire bytes
/// against the bytes at rest (every document saved whole); and (7) the server restarts, so the
/// large document is no longer in memory, and a device holding it types one character into
/// it: time until the server acknowledges (it must first load the document from encrypted
/// storage), beside the same edit once the document is loaded.
pub(crate) async fn large_account(
    bin: &Path,
    docs: usize,
    changes: usize,
    text_changes: usize,
) -> Result<Value, Error> {
    use automerge::transaction::Transactable;
    let mut server = ServerProcess::start(bin)?;
    let author_store = Arc::new(cubby_store::MemoryStore::new());
    let author = light_device_on(&server, "large", false, author_store.clone()).await?;
    let mut at_rest = 0usize;
    for d in 0..docs {
        let doc = author.create(&format!("doc {d}")).await?;
        for n in 0..changes as u64 {
            doc.put("n", json!(n)).await?;
        }
        at_rest += doc.read(|d| d.save().len());
    }
    let text = author.create("long text").await?;
    text.change(|tx| tx.put_object(automerge::ROOT, "text", automerge::ObjType::Text).map(drop))
        .await?;
    let text_obj = text.read(|d| {
        use automerge::ReadDoc;
        d.get(automerge::ROOT, "text").ok().flatten().map(|(_, id)| id)
    });
    let text_obj = text_obj.ok_or("the text object is missing")?;
    for i in 0..text_changes {
        let obj = text_obj.clone();
        text.change(move |tx| tx.splice_text(&obj, i, 0, "a")).await?;
    }
    at_rest += text.read(|d| d.save().len());
    author.start_sync();
    tokio::time::timeout(Duration::from_secs(600), author.wait_until_synced())
        .await
        .map_err(|_| "the author did not sync within ten minutes")?
        .map_err(|e| format!("sync failed: {e}"))?;

    // Workload 4: a fresh device with a real local store.
    let dirs = tempfile::tempdir()?;
    let wire = Wire::default();
    let started = Instant::now();
    let fresh = server.device("large", &dirs.path().join("fresh"), &wire).await?;
    tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            let held = fresh.list().await.map(|l| l.len()).unwrap_or(0);
            if held == docs + 1 && fresh.wait_until_synced().await.is_ok() {
                let copy = fresh.open(text.id()).await?;
                if copy.heads() == text.heads() {
                    return Ok::<_, Error>(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .map_err(|_| "the fresh device did not sync within ten minutes")??;
    let fresh_took = started.elapsed();
    let fresh_bytes = wire.bytes();
    fresh.shutdown().await;

    // Workload 7: a device holding everything reconnects to a freshly started server.
    author.shutdown().await;
    server.restart()?;
    let device = server.device("large", &dirs.path().join("fresh"), &Wire::default()).await?;
    synced(&device).await?;
    let copy = arrived(&device, text.id()).await?;
    // One character typed into the large document: the server must load it from encrypted
    // storage before it can apply and acknowledge the change. Then the same again, warm.
    let mut edit_times = Vec::new();
    for at in [0usize, 1] {
        let obj = text_obj.clone();
        let mut events = copy.subscribe();
        let started = Instant::now();
        copy.change(move |tx| tx.splice_text(&obj, at, 0, "b")).await?;
        acknowledged(&mut events).await?;
        edit_times.push(started.elapsed());
    }
    let (cold, warm) = (edit_times[0], edit_times[1]);

    // The author comes back online with the text closed, as a second device in the background
    // would be, while the first types into it: how long until each keystroke is on the author's
    // device (shown to the app, `DocEvent::Remote`).
    let background = light_device_on(&server, "large", true, author_store).await?;
    synced(&background).await?;
    let mut events = background.events();
    let mut keystrokes = Samples::default();
    for at in 0..KEYSTROKES {
        let obj = text_obj.clone();
        let started = Instant::now();
        copy.change(move |tx| tx.splice_text(&obj, at, 0, "c")).await?;
        loop {
            match tokio::time::timeout(PATIENCE, events.recv()).await {
                Ok(Ok((id, cubby_client::DocEvent::Remote))) if id == text.id() => break,
                Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(_)) => return Err("the background device stopped".into()),
                Err(_) => return Err("a keystroke did not reach the background device".into()),
            }
        }
        keystrokes.push(started.elapsed());
    }
    background.shutdown().await;
    Ok(json!({
        "workload": "large_account",
        "system": "cubby",
        "documents": docs + 1,
        "changes_per_document": changes,
        "text_changes": text_changes,
        "bytes_at_rest": at_rest,
        "fresh_device_ms": ms(fresh_took),
        "fresh_device_wire_bytes": fresh_bytes,
        "wire_to_rest_ratio": fresh_bytes as f64 / at_rest.max(1) as f64,
        "cold_edit_ack_ms": ms(cold),
        "warm_edit_ack_ms": ms(warm),
        "background_keystroke_p50_ms": ms(keystrokes.quantile(0.5)),
        "background_keystroke_max_ms": ms(keystrokes.quantile(1.0)),
    }))
}
