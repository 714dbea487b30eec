//! An app's control of syncing: pausing and resuming it, connecting at once rather than wait out
//! a retry's pause, and sharing one client between its parts, against a real server over TLS.

use std::time::Duration;

use cubby_client::{StaticToken, SyncFailure, SyncStatus};
use cubby_tests::{TestServer, eventually};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_device_keeps_its_edits_until_it_resumes() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("notes").await.expect("create");
    doc.put("a", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");

    phone.client.pause_sync();
    assert_eq!(*phone.client.status().borrow(), SyncStatus::Paused);
    doc.put("b", json!(2)).await.expect("an edit while paused is saved");
    assert_eq!(phone.client.unsynced().await.expect("lists"), vec![doc.id()]);
    assert_eq!(phone.client.wait_until_synced().await, Err(SyncFailure::Paused));
    // Still paused a moment later: the engine does not reconnect on its own.
    let mut status = phone.client.status();
    let reconnected = tokio::time::timeout(
        Duration::from_millis(300),
        status.wait_for(|s| *s != SyncStatus::Paused),
    );
    assert!(reconnected.await.is_err(), "sync resumed by itself: {:?}", *status.borrow());

    phone.client.resume_sync();
    phone.client.wait_until_synced().await.expect("synced after resuming");
    eventually("the laptop gets the edit made while paused", || async {
        let Ok(on_laptop) = laptop.client.open(doc.id()).await else { return false };
        on_laptop.to_json() == json!({"a": 1, "b": 2})
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_now_cuts_a_long_retry_pause_short() {
    let mut server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let client = server
        .client_builder(StaticToken::new(server.token("alice")))
        .with_data_dir(dir.path())
        .with_retry_pauses(Duration::from_secs(120), Duration::from_secs(120))
        .build()
        .await
        .expect("builds");
    client.wait_until_synced().await.expect("synced");

    server.stop().await;
    let mut status = client.status();
    let offline = status.wait_for(|s| matches!(s, SyncStatus::Offline { failure: Some(_) }));
    tokio::time::timeout(cubby_tests::DEADLINE, offline).await.expect("sees it").expect("status");
    // Its next try would come after up to two minutes; the app says the network is back.
    server.restart().await;
    client.reconnect_now();
    let up_to_date = status.wait_for(|s| *s == SyncStatus::UpToDate);
    let back = tokio::time::timeout(Duration::from_secs(30), up_to_date).await;
    back.expect("connected well before its retry pause ran out").expect("status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_a_client_share_its_documents_and_its_sync() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let other_part = phone.client.clone();
    let doc = other_part.create("notes").await.expect("create through a clone");
    doc.put("from", json!("clone")).await.expect("put");
    let same = phone.client.open(doc.id()).await.expect("the original opens it");
    assert_eq!(same.to_json(), json!({"from": "clone"}));

    drop(other_part);
    // Dropping a clone does not stop the sync the others use.
    phone.client.wait_until_synced().await.expect("still syncing");
    eventually("the laptop has it", || async {
        let Ok(on_laptop) = laptop.client.open(doc.id()).await else { return false };
        on_laptop.to_json() == json!({"from": "clone"})
    })
    .await;
}

/// An account call whose token the server refuses (it expired since the provider cached it) is
/// made once more with a fresh one from the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_call_with_a_refused_token_is_retried_with_a_fresh_one() {
    let server = TestServer::start().await;
    let good = server.token("alice");
    let refreshed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked = refreshed.clone();
    let provider = move |fresh: bool| {
        let (good, asked) = (good.clone(), asked.clone());
        async move {
            if !fresh {
                return Ok("an.expired.token".to_owned());
            }
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(good)
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let client = server
        .client_builder(provider)
        .with_data_dir(dir.path())
        .with_autosync(false)
        .build()
        .await
        .expect("builds");
    let devices = client.devices().await.expect("answered with the fresh token");
    assert!(devices.is_empty(), "this device never synced: {devices:?}");
    assert_eq!(refreshed.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A provider whose fresh token is refused too: the refusal, with its code.
    let other_dir = tempfile::tempdir().expect("temp dir");
    let refused = server
        .client_builder(|_fresh: bool| async { Ok("never.any.good".to_owned()) })
        .with_data_dir(other_dir.path())
        .with_autosync(false)
        .build()
        .await
        .expect("builds");
    let err = refused.devices().await.expect_err("no good token");
    assert_eq!(err.code(), cubby_client::ErrorCode::Unauthenticated, "{err}");
}

/// Once sync has stopped for good (here: the device was revoked and wiped), pausing and
/// resuming leave its last status standing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_wiped_device_keeps_it_wiped() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    laptop.client.wait_until_synced().await.expect("synced");
    phone.client.revoke_device(laptop.client.device_id()).await.expect("revokes");
    let mut status = laptop.client.status();
    let wiped = status.wait_for(|s| matches!(s, SyncStatus::Wiped { .. }));
    tokio::time::timeout(cubby_tests::DEADLINE, wiped)
        .await
        .expect("wiped in time")
        .expect("status");
    eventually("the engine has stopped", || async {
        laptop.client.wait_until_synced().await.is_err()
    })
    .await;

    laptop.client.pause_sync();
    assert!(matches!(*laptop.client.status().borrow(), SyncStatus::Wiped { .. }));
    laptop.client.resume_sync();
    assert!(matches!(*laptop.client.status().borrow(), SyncStatus::Wiped { .. }));
}
