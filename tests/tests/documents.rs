//! What an app does with its documents through the SDK besides editing them: rename and delete
//! them, and tell failures apart by their codes, against a real server over TLS.

use cubby_client::{DocEvent, ErrorCode};
use cubby_tests::{TestServer, eventually};
use serde_json::json;

fn title_of(
    list: &[(cubby_client::DocId, cubby_client::DocMeta)],
    id: cubby_client::DocId,
) -> Option<String> {
    list.iter().find(|(d, _)| *d == id).map(|(_, meta)| meta.title.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_document_has_its_new_title_on_every_device() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("Groceries").await.expect("create");
    doc.put("milk", json!(2)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");

    let meta = phone.client.rename(doc.id(), "Shopping").await.expect("renames");
    assert_eq!(meta.title, "Shopping");
    assert_eq!(doc.meta().title, "Shopping", "the open handle shows it at once");
    let listed = phone.client.list().await.expect("lists");
    assert_eq!(title_of(&listed, doc.id()).as_deref(), Some("Shopping"));
    eventually("the laptop shows the new title", || async {
        let listed = laptop.client.list().await.expect("lists");
        title_of(&listed, doc.id()).as_deref() == Some("Shopping")
    })
    .await;
    // The content is untouched.
    let on_laptop = laptop.client.open(doc.id()).await.expect("opens");
    eventually("the laptop has the content", || async {
        on_laptop.to_json() == json!({"milk": 2})
    })
    .await;

    let too_long = phone.client.rename(doc.id(), &"x".repeat(2000)).await;
    let err = too_long.expect_err("a title over 1024 bytes is refused");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_document_is_gone_here_at_once_and_elsewhere_soon() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("Old notes").await.expect("create");
    doc.put("n", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop has it", || async { laptop.client.open(doc.id()).await.is_ok() }).await;
    let mut events = doc.subscribe();

    phone.client.delete(doc.id()).await.expect("deletes");
    let listed = phone.client.list().await.expect("lists");
    assert!(title_of(&listed, doc.id()).is_none(), "gone from this device when delete returns");
    assert_eq!(events.try_recv().ok(), Some(DocEvent::Deleted { discarded: false }));
    let refused = doc.put("n", json!(2)).await.expect_err("a deleted document takes no change");
    assert_eq!(refused.code(), ErrorCode::Deleted);
    eventually("the laptop's copy is gone", || async {
        let listed = laptop.client.list().await.expect("lists");
        title_of(&listed, doc.id()).is_none()
    })
    .await;

    let again = phone.client.delete(doc.id()).await.expect_err("deleting it again");
    assert_eq!(again.code(), ErrorCode::NotFound, "{again}");
    let unknown = phone.client.open(doc.id()).await.expect_err("opening it");
    assert_eq!(unknown.code(), ErrorCode::UnknownDocument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_told_apart_from_a_refusal() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Nothing listens on port 9.
    let offline = server
        .client_builder(cubby_client::StaticToken::new(server.token("alice")))
        .with_server("https://127.0.0.1:9")
        .with_data_dir(dir.path())
        .with_autosync(false)
        .build()
        .await
        .expect("builds offline");
    let err = offline.devices().await.expect_err("no server to ask");
    assert_eq!(err.code(), ErrorCode::Offline, "{err}");
    assert_eq!(err.code().as_str(), "offline");

    let refused = server.device("bob").await;
    let stranger = refused.client.rename(cubby_client::DocId::from_bytes([5; 16]), "x").await;
    let err = stranger.expect_err("no such document");
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_two_devices_edit_at_once_keeps_both_edits() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("letter").await.expect("create");
    doc.put_text("body", "Dear Sam, thanks").await.expect("text");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop has the text", || async {
        let Ok(on_laptop) = laptop.client.open(doc.id()).await else { return false };
        on_laptop.to_json()["body"] == json!("Dear Sam, thanks")
    })
    .await;
    let on_laptop = laptop.client.open(doc.id()).await.expect("opens");

    // Both pause, edit different places of the same text, and resume.
    phone.client.pause_sync();
    laptop.client.pause_sync();
    doc.splice_text("body", 5, 3, "Samantha").await.expect("splice on the phone");
    on_laptop.splice_text("body", 16, 0, " a lot").await.expect("splice on the laptop");
    let wrong = doc.splice_text("body", 100, 1, "x").await.expect_err("past the end");
    assert_eq!(wrong.code(), ErrorCode::InvalidChange);
    phone.client.resume_sync();
    laptop.client.resume_sync();

    let both = json!("Dear Samantha, thanks a lot");
    eventually("both devices hold both edits", || async {
        doc.to_json()["body"] == both && on_laptop.to_json()["body"] == both
    })
    .await;
}

/// A typed document, as an app keeps one.
#[derive(Debug, Clone, PartialEq, autosurgeon::Reconcile, autosurgeon::Hydrate)]
struct Profile {
    name: String,
    city: String,
    tags: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_documents_reconcile_and_hydrate_and_merge_by_field() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("profile").await.expect("create");
    let ann = Profile { name: "Ann".into(), city: "Oslo".into(), tags: vec!["admin".into()] };
    doc.reconcile(&ann).await.expect("reconciles");
    assert_eq!(doc.hydrate::<Profile>().expect("hydrates"), ann);
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop reads the same profile", || async {
        let Ok(on_laptop) = laptop.client.open(doc.id()).await else { return false };
        on_laptop.hydrate::<Profile>().ok().as_ref() == Some(&ann)
    })
    .await;
    let on_laptop = laptop.client.open(doc.id()).await.expect("opens");

    // Each device changes another field while apart: both changes stay.
    phone.client.pause_sync();
    laptop.client.pause_sync();
    doc.reconcile(&Profile { name: "Anna".into(), ..ann.clone() }).await.expect("reconciles");
    on_laptop
        .reconcile(&Profile { city: "Bergen".into(), ..ann.clone() })
        .await
        .expect("reconciles");
    phone.client.resume_sync();
    laptop.client.resume_sync();
    let both = Profile { name: "Anna".into(), city: "Bergen".into(), tags: vec!["admin".into()] };
    eventually("both devices hold both changes", || async {
        doc.hydrate::<Profile>().ok().as_ref() == Some(&both)
            && on_laptop.hydrate::<Profile>().ok().as_ref() == Some(&both)
    })
    .await;

    // A document of another shape is said to be one.
    let other = phone.client.create("notes").await.expect("create");
    other.put("name", json!(3)).await.expect("put");
    let err = other.hydrate::<Profile>().expect_err("not a profile");
    assert_eq!(err.code(), ErrorCode::Shape, "{err}");
}
