//! Two server nodes sharing one store, as the nodes of a cluster do: devices of one customer
//! on both converge live, and an erasure or a revocation made on one takes effect on the other
//! within a second. Each runs on two in-process nodes sharing a sled store and a local bus,
//! and on two nodes on one PostgreSQL database that hear each other only through it, woken by
//! `NOTIFY` or polling.

use std::time::Duration;

use cubby_server::config::BusMode;
use cubby_tests::{TestServer, eventually, eventually_within};
use serde_json::json;

/// What the nodes tell each other takes effect within a second.
const WITHIN: Duration = Duration::from_secs(1);

async fn on_postgres(mode: BusMode) -> Vec<TestServer> {
    TestServer::start_postgres_cluster(2, |config| config.storage.bus = mode).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_nodes_converge_live() {
    converge_live(TestServer::start_cluster(2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_postgres_nodes_converge_live() {
    converge_live(on_postgres(BusMode::Listen).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_polling_postgres_nodes_converge_live() {
    converge_live(on_postgres(BusMode::Poll).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_and_an_erasure_on_one_node_take_effect_on_the_other_within_a_second() {
    revoke_and_erase(TestServer::start_cluster(2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_revocation_and_an_erasure_take_effect_on_the_other_node_within_a_second() {
    revoke_and_erase(on_postgres(BusMode::Listen).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_postgres_nodes_take_a_revocation_and_an_erasure_within_a_second() {
    revoke_and_erase(on_postgres(BusMode::Poll).await).await;
}

async fn converge_live(nodes: Vec<TestServer>) {
    let phone = nodes[0].device("alice").await;
    let laptop = nodes[1].device("alice").await;

    // Made on one node, it reaches the device on the other.
    let on_phone = phone.client.create("shopping").await.expect("create");
    on_phone.put("milk", json!(1)).await.expect("put");
    let id = on_phone.id();
    eventually("the laptop holds the list", || async {
        laptop.client.list().await.expect("list").iter().any(|(d, _)| *d == id)
    })
    .await;
    let on_laptop = laptop.client.open(id).await.expect("opens");

    // Each node has the document loaded now: edits go back and forth live, many times, and
    // edits made at the same moment on both merge.
    for round in 0..10i64 {
        on_laptop.put("laptop", json!(round)).await.expect("put");
        on_phone.put("phone", json!(round)).await.expect("put");
        eventually("both devices see both edits", || async {
            let (a, b) = (on_phone.to_json(), on_laptop.to_json());
            a == b && a["laptop"] == json!(round) && a["phone"] == json!(round)
        })
        .await;
    }
    // And the store both nodes share holds all of it, as either node serves it.
    let want = on_phone.to_json();
    for node in &nodes {
        let served = node.document_json(&node.token("alice"), id.as_bytes()).await.expect("read");
        let served: serde_json::Value = serde_json::from_str(&served).expect("json");
        assert_eq!(served, want);
    }
}

async fn revoke_and_erase(nodes: Vec<TestServer>) {
    let (a, b) = (&nodes[0], &nodes[1]);

    // Alice's tablet syncs through node B; she revokes it through node A.
    let phone = a.device("alice").await;
    let tablet = b.device("alice").await;
    tablet.client.wait_until_synced().await.expect("synced");
    phone.client.wait_until_synced().await.expect("synced");
    let status = tablet.client.status();
    phone.client.revoke_device(tablet.client.device_id()).await.expect("revokes");
    eventually_within(
        WITHIN,
        "node B closes the revoked tablet's stream, and it wipes",
        || async { matches!(*status.borrow(), cubby_client::SyncStatus::Wiped { .. }) },
    )
    .await;

    // Bob, with a device on each node, erases his account through node B.
    let bob_a = a.device("bob").await;
    let bob_b = b.device("bob").await;
    let doc = bob_a.client.create("bob's").await.expect("create");
    doc.put("k", json!(1)).await.expect("put");
    bob_a.client.wait_until_synced().await.expect("synced");
    bob_b.client.wait_until_synced().await.expect("synced");
    bob_b.client.delete_account().await.expect("erases");
    let bob_token = a.token("bob");
    eventually_within(WITHIN, "node A refuses the erased account", || async {
        let read = a.document_json(&bob_token, doc.id().as_bytes()).await;
        read.is_err_and(|refused| refused.code() == tonic::Code::NotFound)
    })
    .await;
    let status = bob_a.client.status();
    eventually_within(WITHIN, "bob's device on node A is told, and wipes", || async {
        matches!(*status.borrow(), cubby_client::SyncStatus::Wiped { .. })
    })
    .await;
    // Alice, on both nodes, carries on.
    phone.client.create("still here").await.expect("create").put("x", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("alice still syncs");
}
