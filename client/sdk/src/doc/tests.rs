//! The writer's rules: jobs of one document run one at a time in the order queued, and a
//! document with queued writes stays the one loaded copy.

use std::sync::{Arc, Mutex, mpsc};

use cubby_core::DocId;

use super::DocShared;
use crate::Client;

async fn offline_client() -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let client = Client::builder()
        .with_data_dir(dir.path())
        .with_local_key([9; 32])
        .build()
        .await
        .expect("builds");
    (client, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_documents_jobs_run_one_at_a_time_in_the_order_queued() {
    let (client, _dir) = offline_client().await;
    let doc = DocShared::new(DocId::from_bytes([1; 16]), "t", &client.inner);
    let (release, gate) = mpsc::channel::<()>();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let first = {
        let ran = ran.clone();
        doc.queue(move |_, _| {
            gate.recv().expect("released");
            ran.lock().expect("lock").push(1);
            Ok(())
        })
    };
    let (started, second_ran) = tokio::sync::oneshot::channel();
    let second = {
        let ran = ran.clone();
        doc.queue_flushed(move |_, _| {
            let _ = started.send(());
            ran.lock().expect("lock").push(2);
            Ok(())
        })
    };
    let third = {
        let ran = ran.clone();
        doc.queue(move |_, _| {
            ran.lock().expect("lock").push(3);
            Ok(())
        })
    };
    // The second does not start while the first holds its turn (given a while to show it).
    let early = tokio::time::timeout(std::time::Duration::from_millis(50), second_ran).await;
    assert!(early.is_err(), "the second job ran before the first was done");
    release.send(()).expect("the first job waits");
    first.done().await.expect("first");
    second.done().await.expect("second, flushed");
    third.done().await.expect("third");
    assert_eq!(*ran.lock().expect("lock"), vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_with_writes_on_their_way_stays_the_loaded_copy() {
    let (client, _dir) = offline_client().await;
    let handle = client.create("notes").await.expect("create");
    let id = handle.id();
    let copy = client.inner.doc(id).await.expect("loaded");
    let (release, gate) = mpsc::channel::<()>();
    let pending = copy.queue(move |_, _| {
        gate.recv().expect("released");
        Ok(())
    });
    let weak = Arc::downgrade(&copy);
    drop((copy, handle));
    let again = client.inner.doc(id).await.expect("loaded");
    assert!(
        weak.upgrade().is_some_and(|held| Arc::ptr_eq(&held, &again)),
        "the copy with a write on its way is the one handed out"
    );
    drop(again);
    release.send(()).expect("the job waits");
    pending.done().await.expect("done");
    eventually(|| weak.upgrade().is_none()).await;
}

/// Waits until `done` holds, failing after a deadline.
async fn eventually(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "the copy was never dropped");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_tell_each_change_and_say_what_a_slow_reader_missed() {
    use futures_util::StreamExt;
    let (client, _dir) = offline_client().await;
    let doc = client.create("notes").await.expect("create");
    let mut events = Box::pin(doc.events());
    let mut all = Box::pin(client.event_stream());
    doc.put("n", serde_json::json!(1)).await.expect("put");
    assert_eq!(events.next().await, Some(super::DocEvent::Local));
    assert_eq!(all.next().await, Some((doc.id(), super::DocEvent::Local)));

    // Far more changes than the stream holds, unread: the reader is told it missed some.
    for n in 0..100 {
        doc.put("n", serde_json::json!(n)).await.expect("put");
    }
    match events.next().await {
        Some(super::DocEvent::Missed { count }) => assert!(count > 0),
        other => panic!("expected Missed, got {other:?}"),
    }
    assert_eq!(events.next().await, Some(super::DocEvent::Local), "then the events kept");
}
