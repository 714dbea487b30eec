//! Per-customer limits answer RESOURCE_EXHAUSTED for that customer alone and acknowledge nothing
//! over the limit.

use cubby_client::{SyncFailure, SyncStatus};
use cubby_tests::TestServer;
use serde_json::json;

fn refused_for(failure: &SyncFailure, what: &str) -> bool {
    matches!(failure, SyncFailure::Other(m) if m.contains("ResourceExhausted") && m.contains(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_and_account_size_limits_refuse_only_that_customer() {
    let server = TestServer::start_with(|c| {
        c.limits.max_document_bytes = 16 * 1024;
        c.limits.max_customer_bytes = 40 * 1024;
    })
    .await;
    let bob = server.device("bob").await;
    let bobs = bob.client.create("bob's").await.expect("create");

    // One document may not outgrow its limit.
    let carol = server.device("carol").await;
    let doc = carol.client.create("growing").await.expect("create");
    doc.put("a", json!("x".repeat(6 * 1024))).await.expect("put");
    carol.client.wait_until_synced().await.expect("fits");
    doc.put("b", json!("y".repeat(12 * 1024))).await.expect("saved locally");
    let failure = carol.client.wait_until_synced().await.expect_err("over the document limit");
    assert!(refused_for(&failure, "document would exceed"), "{failure:?}");

    // Nor may one account outgrow its limit, however it spreads its documents.
    let dave = server.device("dave").await;
    let mut refused = None;
    for i in 0..10 {
        let doc = dave.client.create(&format!("part {i}")).await.expect("create");
        doc.put("v", json!("z".repeat(10 * 1024))).await.expect("saved locally");
        if let Err(failure) = dave.client.wait_until_synced().await {
            refused = Some((i, failure));
            break;
        }
    }
    let (parts, failure) = refused.expect("the account limit is reached");
    assert!(refused_for(&failure, "storage limit"), "{failure:?}");
    assert!((2..5).contains(&parts), "40 KiB holds 3 parts of 10 KiB, refused part {parts}");

    // Bob never noticed.
    for i in 0..5 {
        bobs.put(&format!("k{i}"), json!("w".repeat(2 * 1024))).await.expect("put");
        bob.client.wait_until_synced().await.expect("bob is not limited by others");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_rate_limit_slows_one_customer_and_loses_nothing() {
    let server = TestServer::start_with(|c| c.limits.max_writes_per_sec = 2).await;
    let erin = server.device("erin").await;
    let doc = erin.client.create("fast").await.expect("create");
    // Ten seconds' worth of writes as fast as they go: the burst (five seconds' worth) passes,
    // then the server refuses until the budget refills.
    let mut refusals = 0;
    for i in 0..20 {
        doc.put(&format!("k{i}"), json!(i)).await.expect("put");
        if let Err(failure) = erin.client.wait_until_synced().await {
            assert!(refused_for(&failure, "too many writes"), "{failure:?}");
            refusals += 1;
        }
    }
    assert!(refusals > 0, "the rate limit was reached");
    // Nothing is lost: the device keeps its edits and they land as the budget refills.
    let laptop = server.device("erin").await;
    cubby_tests::eventually("every write arrives", || async {
        let _ = erin.client.wait_until_synced().await;
        laptop.client.open(doc.id()).await.is_ok_and(|d| d.to_json().get("k19").is_some())
    })
    .await;
    let bob = server.device("bob").await;
    bob.client.create("bob's").await.expect("create");
    bob.client.wait_until_synced().await.expect("bob has his own budget");
}

/// A refused document does not end the device's connection: the device pauses that document,
/// offers its changes again, and never goes offline or reconnects meanwhile, while the server
/// takes them as the customer's budget refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_document_is_offered_again_on_the_same_connection() {
    let server = TestServer::start_with(|c| c.limits.max_writes_per_sec = 2).await;
    let erin = server.device("erin").await;
    let doc = erin.client.create("fast").await.expect("create");
    erin.client.wait_until_synced().await.expect("created");

    // Every status the device passes through from here on.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut status = erin.client.status();
    let recorder = tokio::spawn(async move {
        let mut seen = Vec::new();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => return seen,
                changed = status.changed() => match changed {
                    Ok(()) => seen.push(status.borrow_and_update().clone()),
                    Err(_) => return seen,
                },
            }
        }
    });
    // Ten seconds' worth of writes as fast as they go: the burst passes, then the server refuses.
    for i in 0..20 {
        doc.put(&format!("k{i}"), json!(i)).await.expect("put");
        let _ = erin.client.wait_until_synced().await;
    }
    let laptop = server.device("erin").await;
    cubby_tests::eventually("every write arrives", || async {
        laptop.client.open(doc.id()).await.is_ok_and(|d| d.to_json().get("k19").is_some())
    })
    .await;
    // Its refusal clears once the server's answer to that offer reaches it.
    cubby_tests::eventually("the device is up to date again", || async {
        erin.client.wait_until_synced().await.is_ok()
    })
    .await;

    let _ = stop.send(());
    let seen = recorder.await.expect("recorder");
    let refused = seen.iter().position(|s| {
        matches!(s, SyncStatus::Refused { failure, .. }
        if refused_for(failure, "too many writes"))
    });
    let refused = refused.unwrap_or_else(|| panic!("the server refused some writes: {seen:?}"));
    assert!(
        !seen[refused..]
            .iter()
            .any(|s| matches!(s, SyncStatus::Connecting | SyncStatus::Offline { .. })),
        "the connection stayed up through the refusals: {seen:?}"
    );
}

/// BAD_INPUTS row 8: a history that takes longer to apply than the server allows (here a 1 ms
/// deadline and one change of 20,000 operations) is refused with RESOURCE_EXHAUSTED, none of it
/// is kept, the customer's write budget is charged, and other customers are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_08_a_history_too_slow_to_apply_is_refused_charged_and_others_are_served() {
    let server = TestServer::start_with(|c| c.limits.apply_deadline_ms = 1).await;
    let phone = server.device("alice").await;
    let log = phone.client.create("log").await.expect("create");
    log.put("start", json!(true)).await.expect("put");
    phone.client.wait_until_synced().await.expect("a small change applies inline");

    log.change(|tx| {
        for i in 0..20_000 {
            automerge::transaction::Transactable::put(tx, automerge::ROOT, format!("k{i}"), i)?;
        }
        Ok(())
    })
    .await
    .expect("saved locally");
    let bob = server.device("bob").await;
    let failure = phone.client.wait_until_synced().await.expect_err("refused");
    assert!(refused_for(&failure, "took too long to apply"), "{failure:?}");

    // Bob is served; Alice's budget was charged, so her other device's small write waits.
    let bobs = bob.client.create("bob's").await.expect("create");
    bobs.put("k", json!(1)).await.expect("put");
    bob.client.wait_until_synced().await.expect("bob is not affected");
    let laptop = server.device("alice").await;
    let note = laptop.client.create("note").await.expect("create");
    note.put("k", json!(1)).await.expect("saved locally");
    let failure = laptop.client.wait_until_synced().await.expect_err("alice is charged");
    assert!(refused_for(&failure, "too many writes"), "{failure:?}");

    // Nothing of the refused history reached the server. (The refused apply may still be
    // running on its thread, which Automerge cannot interrupt: the document answers "busy;
    // retry" until it is back.)
    let token = server.token("alice");
    let deadline = std::time::Instant::now() + cubby_tests::DEADLINE;
    let stored = loop {
        match server.document_json(&token, log.id().as_bytes()).await {
            Ok(json) => break json,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "still busy: {status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("the log does not read: {status:?}"),
        }
    };
    assert_eq!(stored, json!({"start": true}).to_string());
}

/// The limits count what a document holds, not every change it was ever sent: a compaction
/// folds a hundred-byte chunk per edit into a snapshot of a few hundred bytes, and recounts the
/// document's size and the customer's use. 150 edits of one key send about 15 KB of chunks,
/// well over both limits here, and hold well under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_back_what_the_limits_counted_for_folded_chunks() {
    let server = TestServer::start_with(|c| {
        c.limits.max_document_bytes = 4 * 1024;
        c.limits.max_customer_bytes = 6 * 1024;
        c.limits.compact_after_chunks = 8;
    })
    .await;
    let phone = server.device("erin").await;
    let doc = phone.client.create("counter").await.expect("create");
    for n in 0..150 {
        doc.put("n", json!(n)).await.expect("put");
        if let Err(failure) = phone.client.wait_until_synced().await {
            panic!("edit {n} refused: {failure:?}");
        }
    }
}

/// One frame of a sync message in parts (never finished) for document `doc`.
fn part(doc: [u8; 16], bytes: usize) -> cubby_proto::pb::client_frame::Frame {
    cubby_proto::pb::client_frame::Frame::Sync(cubby_proto::pb::DocSync {
        doc_id: doc.to_vec(),
        message: vec![0x42; bytes],
        more: true,
        ..Default::default()
    })
}

/// The status `raw`'s stream ends with once it has sent `frames`, or `None` if it is still open.
async fn sends_until_refused(
    raw: &mut cubby_tests::RawStream,
    frames: Vec<cubby_proto::pb::client_frame::Frame>,
) -> Option<tonic::Status> {
    for frame in frames {
        if raw.tx.send(cubby_proto::pb::ClientFrame { frame: Some(frame) }).await.is_err() {
            break;
        }
    }
    // A part of an unknown document is answered by nothing; one more frame with a bad id
    // shows the stream is still read (its refusal comes back as a DocError).
    let probe = cubby_proto::pb::DocSync { doc_id: vec![1; 3], ..Default::default() };
    let _ = raw
        .tx
        .send(cubby_proto::pb::ClientFrame {
            frame: Some(cubby_proto::pb::client_frame::Frame::Sync(probe)),
        })
        .await;
    loop {
        match raw.next().await {
            Ok(Some(cubby_proto::pb::server_frame::Frame::Error(_))) => return None,
            Ok(Some(_)) => continue,
            Ok(None) => return Some(tonic::Status::cancelled("ended without a status")),
            Err(status) => return Some(status),
        }
    }
}

/// Sync messages in parts cost memory until their last part arrives: a stream, a connection
/// and a customer each hold only so much, ids counted, and a bad id is refused at its first part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_parts_are_bounded_per_stream_connection_and_customer() {
    const MIB: usize = 1 << 20;
    let server = TestServer::start_with(|c| {
        c.limits.max_document_bytes = 4 * MIB as u64;
        c.limits.max_partial_bytes_per_customer = (6 * MIB + MIB / 2) as u64;
    })
    .await;
    let token = server.token("mallory");

    // A garbage id is refused before its part is held: no more ids of megabytes kept.
    let mut raw = cubby_tests::RawStream::connect(&server, &token).await.expect("connects");
    let garbage =
        cubby_proto::pb::DocSync { doc_id: vec![9; MIB], more: true, ..Default::default() };
    let refused =
        sends_until_refused(&mut raw, vec![cubby_proto::pb::client_frame::Frame::Sync(garbage)])
            .await
            .expect("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Two streams of one customer hold 3 MiB each; a third, on its own connection too, is
    // refused at its first part: the customer's 6.5 MiB are spoken for.
    let mut held = Vec::new();
    for n in 0..2u8 {
        let mut raw = cubby_tests::RawStream::connect(&server, &token).await.expect("connects");
        let frames = (0..3).map(|_| part([n; 16], MIB - 64)).collect();
        assert!(sends_until_refused(&mut raw, frames).await.is_none(), "stream {n} holds 3 MiB");
        held.push(raw);
    }
    let mut third = cubby_tests::RawStream::connect(&server, &token).await.expect("connects");
    let refused = sends_until_refused(&mut third, vec![part([3; 16], MIB - 64)]).await;
    let refused = refused.expect("over the customer's budget");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("this customer"), "{refused:?}");
    // Another customer is not held to mallory's budget.
    let mut other =
        cubby_tests::RawStream::connect(&server, &server.token("trent")).await.expect("connects");
    let frames = (0..3).map(|_| part([4; 16], MIB - 64)).collect();
    assert!(sends_until_refused(&mut other, frames).await.is_none(), "trent holds his own");
    // A stream that ends gives its bytes back.
    drop(held.pop());
    cubby_tests::eventually("the closed stream's parts are given back", || async {
        let mut again = cubby_tests::RawStream::connect(&server, &token).await.expect("connects");
        sends_until_refused(&mut again, vec![part([5; 16], MIB - 64)]).await.is_none()
    })
    .await;

    // Streams multiplexed on one connection share that connection's 4 MiB.
    let channel = server.channel().await;
    let key = || {
        cubby_crypto::signing::DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key")
    };
    let on = |channel: tonic::transport::Channel| {
        let (token, key) = (server.token("walter"), key());
        async move {
            cubby_tests::RawStream::connect_on(channel, &token, &key, cubby_crypto::random_array())
                .await
                .expect("connects")
        }
    };
    let mut first = on(channel.clone()).await;
    let frames = (0..3).map(|_| part([6; 16], MIB - 64)).collect();
    assert!(sends_until_refused(&mut first, frames).await.is_none());
    let mut second = on(channel).await;
    let frames = (0..2).map(|_| part([7; 16], MIB - 64)).collect();
    let refused = sends_until_refused(&mut second, frames).await.expect("over the connection's");
    assert!(refused.message().contains("this connection"), "{refused:?}");
}

/// Issue 24, row 10: a document refused for a limit (here too large) pauses that document only:
/// the status names it, and the device's other documents keep reaching the server and its other
/// devices on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_refused_for_a_limit_pauses_alone_and_the_status_names_it() {
    let server = TestServer::start_with(|c| c.limits.max_document_bytes = 16 * 1024).await;
    let phone = server.device("carol").await;
    let laptop = server.device("carol").await;
    let big = phone.client.create("big").await.expect("create");
    let small = phone.client.create("small").await.expect("create");
    phone.client.wait_until_synced().await.expect("both exist on the server");
    big.put("a", json!("x".repeat(20 * 1024))).await.expect("saved locally");
    let mut status = phone.client.status();
    let refused = tokio::time::timeout(
        cubby_tests::DEADLINE,
        status.wait_for(|s| matches!(s, SyncStatus::Refused { .. })),
    )
    .await
    .expect("refused in time")
    .expect("status")
    .clone();
    let SyncStatus::Refused { documents, .. } = refused else { unreachable!() };
    assert_eq!(documents, vec![big.id()], "only the large document is paused");
    for n in 0..5 {
        small.put("n", json!(n)).await.expect("put");
    }
    cubby_tests::eventually("the other document keeps syncing", || async {
        let Ok(doc) = laptop.client.open(small.id()).await else { return false };
        doc.to_json().get("n") == Some(&json!(4))
    })
    .await;
    assert!(phone.client.unsynced().await.expect("unsynced").contains(&big.id()), "kept");
}
