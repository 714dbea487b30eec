//! Per-customer limits answer RESOURCE_EXHAUSTED for that customer alone and acknowledge nothing
//! over the limit.

use cubby_client::SyncFailure;
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
