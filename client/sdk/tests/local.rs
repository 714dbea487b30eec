//! The SDK's local store, with no server: offline edits, reopen, compaction, the local key.

use cubby_client::{Client, ClientError, StoreError};
use cubby_store::Docs;
use serde_json::json;

async fn open(dir: &std::path::Path, key: [u8; 32]) -> Result<Client, ClientError> {
    Client::builder().with_data_dir(dir).with_local_key(key).build().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_survive_reopen_and_long_histories_are_compacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let client = open(dir.path(), [3; 32]).await.expect("opens");
    let doc = client.create("counter").await.expect("create");
    for i in 0..300 {
        doc.put("n", json!(i)).await.expect("put");
    }
    let id = doc.id();
    assert_eq!(client.unsynced().await.expect("unsynced"), vec![id], "nothing reached a server");
    drop(doc);
    client.shutdown().await;

    {
        // Raw look at the local store: a snapshot replaced most of the 300 chunks.
        let raw = cubby_store_sled::SledStore::open(&dir.path().join("store")).expect("raw");
        let local = cubby_core::CustomerId::from_bytes([1; 16]);
        let records = raw.load(&local, &id).expect("load").expect("exists");
        assert!(records.snapshot.is_some());
        assert!(records.chunks.len() < 256, "{} chunks", records.chunks.len());
    }

    let client = open(dir.path(), [3; 32]).await.expect("reopens");
    let doc = client.open(id).await.expect("open");
    assert_eq!(doc.to_json(), json!({"n": 299}));
    assert_eq!(doc.meta().title, "counter");
    assert_eq!(client.list().await.expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_local_key_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    open(dir.path(), [3; 32]).await.expect("opens").shutdown().await;
    let err = open(dir.path(), [4; 32]).await.expect_err("wrong key");
    assert!(matches!(err, ClientError::Store(StoreError::WrongMasterKey)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_documents_and_bad_changes_are_clear_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let client = open(dir.path(), [3; 32]).await.expect("opens");
    let missing = cubby_client::DocId::from_bytes([9; 16]);
    assert!(
        matches!(client.open(missing).await, Err(ClientError::UnknownDocument(id)) if id == missing)
    );
    let doc = client.create("t").await.expect("create");
    let bad = doc
        .change(|tx| {
            use automerge::transaction::Transactable;
            let text = tx.put_object(automerge::ROOT, "text", automerge::ObjType::Text)?;
            // Inserting far past the end of an empty text is refused by Automerge.
            tx.splice_text(&text, 10, 0, "x")
        })
        .await;
    assert!(matches!(bad, Err(ClientError::Change(_))), "{bad:?}");
    assert_eq!(doc.to_json(), json!({}), "a failed transaction changes nothing");
}
