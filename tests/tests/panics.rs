//! A panic inside the document actor, standing for one deep in Automerge on crafted input, is
//! contained (BAD_INPUTS row 34). This file is its own test process: fail points are global.

use cubby_client::SyncFailure;
use cubby_proto::pb;
use cubby_tests::{TestServer, authed, eventually};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_34_panic_while_applying_a_sync_message_is_contained() {
    let scenario = fail::FailScenario::setup();
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let bob = server.device("bob").await;
    let doc = phone.client.create("d").await.expect("create");
    doc.put("a", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    let bobs = bob.client.create("bob's").await.expect("create");
    bob.client.wait_until_synced().await.expect("synced");

    fail::cfg("doc-after-apply", "panic").expect("fail point");
    doc.put("b", json!(2)).await.expect("the local edit is saved");
    let failure = phone.client.wait_until_synced().await.expect_err("the server refused it");
    assert!(
        matches!(&failure, SyncFailure::Other(m) if m.contains("Internal")),
        "INTERNAL for that request: {failure:?}"
    );
    // Nothing half-applied is visible, and the server keeps serving other customers.
    let account = pb::account_client::AccountClient::new(server.channel().await);
    let read = |token: String, id: Vec<u8>| {
        let server = &server;
        async move { server.document_json(&token, &id).await }
    };
    let alice_view =
        read(server.token("alice"), doc.id().as_bytes().to_vec()).await.expect("reads");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&alice_view).expect("json"),
        json!({"a": 1})
    );
    read(server.token("bob"), bobs.id().as_bytes().to_vec()).await.expect("bob is unaffected");
    let listed = account
        .clone()
        .list_documents(authed(pb::ListDocumentsRequest {}, &server.token("bob")))
        .await
        .expect("the server keeps serving");
    assert_eq!(listed.into_inner().documents.len(), 1);

    // Once the cause is gone, the device's retry lands: it kept the edit.
    fail::remove("doc-after-apply");
    eventually("the edit syncs after the fault", || async {
        phone.client.wait_until_synced().await.is_ok()
    })
    .await;
    let view = read(server.token("alice"), doc.id().as_bytes().to_vec()).await.expect("reads");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&view).expect("json"),
        json!({"a": 1, "b": 2})
    );
    scenario.teardown();
}
