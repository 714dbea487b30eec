//! Devices of one customer converge through a real server.

use std::sync::Arc;
use std::time::Duration;

use cubby_core::DocId;
use cubby_store::hooked::{Call, Hooked};
use cubby_store::{Docs, Space};
use cubby_tests::{Device, TestServer, eventually};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_converge_live() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;

    let doc = phone.client.create("Groceries").await.expect("create");
    doc.put("milk", json!(2)).await.expect("put");
    eventually("the laptop receives the phone's document", || async {
        match laptop.client.open(doc.id()).await {
            Ok(d) => d.to_json() == json!({"milk": 2}),
            Err(_) => false,
        }
    })
    .await;
    let on_laptop = laptop.client.open(doc.id()).await.expect("open");
    assert_eq!(on_laptop.meta().title, "Groceries");

    // And back, live: an edit on the laptop shows up on the phone while both stay connected.
    let mut phone_events = doc.subscribe();
    on_laptop.put("eggs", json!(12)).await.expect("put");
    tokio::time::timeout(cubby_tests::DEADLINE, async {
        while doc.to_json() != json!({"milk": 2, "eggs": 12}) {
            phone_events.recv().await.expect("events flow");
        }
    })
    .await
    .expect("the phone sees the laptop's edit");
    assert_eq!(doc.heads(), on_laptop.heads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_offline_edits_merge_on_reconnect() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("Notes").await.expect("create");
    doc.put("title", json!("draft")).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    laptop.client.wait_until_synced().await.expect("synced");
    eventually("the laptop has the document", || async {
        laptop.client.open(doc.id()).await.is_ok()
    })
    .await;

    // Both go offline and edit the same document, including the same field. (A handle keeps
    // its client's store open, so let go of it before reopening the device.)
    let id = doc.id();
    drop(doc);
    let (phone_dir, laptop_dir) = (phone.close().await, laptop.close().await);
    let phone = Device::open(&server, "alice", phone_dir, false).await;
    let laptop = Device::open(&server, "alice", laptop_dir, false).await;
    let on_phone = phone.client.open(id).await.expect("open");
    let on_laptop = laptop.client.open(id).await.expect("open");
    on_phone.put("from_phone", json!(true)).await.expect("offline put");
    on_phone.put("title", json!("phone title")).await.expect("offline put");
    on_laptop.put("from_laptop", json!(true)).await.expect("offline put");
    on_laptop.put("title", json!("laptop title")).await.expect("offline put");
    assert_eq!(phone.client.unsynced().await.expect("unsynced"), vec![id]);

    // Reconnect both.
    phone.client.wait_until_synced().await.expect("phone syncs");
    laptop.client.wait_until_synced().await.expect("laptop syncs");
    eventually("both hold the same heads", || async {
        phone.client.wait_until_synced().await.is_ok() && on_phone.heads() == on_laptop.heads()
    })
    .await;
    let merged = on_phone.to_json();
    assert_eq!(merged, on_laptop.to_json());
    assert_eq!(merged["from_phone"], json!(true));
    assert_eq!(merged["from_laptop"], json!(true));
    // The concurrent title edits resolve to one of the two, the same on both devices.
    assert!(merged["title"] == json!("phone title") || merged["title"] == json!("laptop title"));
}

/// `put` of a JSON object over one already there changes only the fields that differ: two
/// devices that each change another field of it offline both keep their change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_offline_puts_of_one_object_keep_both_changed_fields() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("Profile").await.expect("create");
    let id = doc.id();
    doc.put("me", json!({"name": "Ann", "city": "Oslo"})).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop has the profile", || async {
        let Ok(on_laptop) = laptop.client.open(id).await else { return false };
        on_laptop.to_json()["me"]["name"] == json!("Ann")
    })
    .await;
    phone.client.pause_sync();
    laptop.client.pause_sync();
    let (on_phone, on_laptop) = (doc, laptop.client.open(id).await.expect("open"));
    on_phone.put("me", json!({"name": "Anna", "city": "Oslo"})).await.expect("offline put");
    on_laptop.put("me", json!({"name": "Ann", "city": "Bergen"})).await.expect("offline put");

    phone.client.resume_sync();
    laptop.client.resume_sync();
    phone.client.wait_until_synced().await.expect("phone syncs");
    laptop.client.wait_until_synced().await.expect("laptop syncs");
    eventually("both hold the same heads", || async {
        phone.client.wait_until_synced().await.is_ok() && on_phone.heads() == on_laptop.heads()
    })
    .await;
    let both = json!({"name": "Anna", "city": "Bergen"});
    assert_eq!(on_phone.to_json()["me"], both);
    assert_eq!(on_laptop.to_json()["me"], both);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_device_catches_up_after_server_restart() {
    let mut server = TestServer::start().await;
    let phone = server.device("alice").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let doc = phone.client.create(&format!("doc {i}")).await.expect("create");
        doc.put("n", json!(i)).await.expect("put");
        ids.push(doc.id());
    }
    phone.client.wait_until_synced().await.expect("synced");
    phone.close().await;

    server.restart().await;

    let tablet = server.device("alice").await;
    tablet.client.wait_until_synced().await.expect("the new device syncs");
    let mut listed: Vec<_> =
        tablet.client.list().await.expect("list").into_iter().map(|(id, _)| id).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    for id in &ids {
        let doc = tablet.client.open(*id).await.expect("open");
        assert!(doc.to_json()["n"].is_number(), "{id} synced its content");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_device_syncs_only_what_changed_since_its_cursor() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let docs: Vec<_> = create_docs(&phone, 4).await;
    phone.client.wait_until_synced().await.expect("synced");
    laptop.client.wait_until_synced().await.expect("synced");
    eventually("the laptop holds all four, content included", || async {
        let mut complete = 0;
        for doc in &docs {
            if laptop.client.open(doc.id()).await.is_ok_and(|d| d.heads() == doc.heads()) {
                complete += 1;
            }
        }
        complete == docs.len() && laptop.client.wait_until_synced().await.is_ok()
    })
    .await;
    let laptop_dir = laptop.close().await;

    // While the laptop is away, one document changes.
    docs[2].put("changed", json!(true)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");

    let laptop = Device::open(&server, "alice", laptop_dir, true).await;
    let mut events = laptop.client.events();
    laptop.client.wait_until_synced().await.expect("synced");
    let changed = laptop.client.open(docs[2].id()).await.expect("open");
    assert_eq!(changed.to_json()["changed"], json!(true));
    // Only the changed document was delivered on reconnect.
    let mut remote = std::collections::HashSet::new();
    while let Ok((id, _)) = events.try_recv() {
        remote.insert(id);
    }
    assert_eq!(remote, std::collections::HashSet::from([docs[2].id()]));
}

async fn create_docs(device: &Device, n: usize) -> Vec<cubby_client::DocHandle> {
    let mut out = Vec::new();
    for i in 0..n {
        let doc = device.client.create(&format!("d{i}")).await.expect("create");
        doc.put("i", json!(i)).await.expect("put");
        out.push(doc);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_documents_leave_memory_and_come_back_on_demand() {
    let server = TestServer::start_with(|config| config.limits.idle_document_secs = 1).await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("short-lived").await.expect("create");
    doc.put("x", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    assert!(
        server.running().live_documents() >= 1,
        "a document with a connected device stays loaded"
    );
    let id = doc.id();
    drop(doc);
    phone.close().await;
    eventually("the idle document is evicted", || async { server.running().live_documents() == 0 })
        .await;

    // It loads again when someone needs it.
    let laptop = server.device("alice").await;
    laptop.client.wait_until_synced().await.expect("synced");
    let on_laptop = laptop.client.open(id).await.expect("open");
    assert_eq!(
        on_laptop.to_json(),
        json!({"x": 1}),
        "status {:?}, heads {:?}",
        *laptop.client.status().borrow(),
        on_laptop.heads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_deleted_on_the_server_leave_every_device() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("to delete").await.expect("create");
    doc.put("x", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    let id = doc.id();
    drop(doc);

    delete_on_the_server(&server, id).await;
    eventually("the phone drops the deleted document", || async {
        phone.client.list().await.expect("list").is_empty()
    })
    .await;
    let laptop = server.device("alice").await;
    laptop.client.wait_until_synced().await.expect("synced");
    assert!(laptop.client.list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_histories_are_compacted_and_reload_after_restart() {
    let mut server = TestServer::start_with(|config| config.limits.compact_after_chunks = 4).await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("busy").await.expect("create");
    for i in 0..20 {
        doc.put("n", json!(i)).await.expect("put");
        phone.client.wait_until_synced().await.expect("synced");
    }
    let id = doc.id();
    drop(doc);
    phone.close().await;
    server.stop().await;
    {
        let raw =
            cubby_store_sled::SledStore::open(&server.data_dir().join("db")).expect("raw sled");
        let records = raw.load(&server.customer_id("alice"), &id).expect("load").expect("exists");
        assert!(records.snapshot.is_some(), "the history was folded into a snapshot");
        assert!(records.chunks.len() < 4, "{} chunks left after compaction", records.chunks.len());
    }
    server.restart().await;
    let laptop = server.device("alice").await;
    laptop.client.wait_until_synced().await.expect("synced");
    assert_eq!(laptop.client.open(id).await.expect("open").to_json(), json!({"n": 19}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_devices_reconnect_by_themselves_after_a_server_restart() {
    use cubby_client::SyncStatus;
    let mut server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("shared").await.expect("create");
    doc.put("before", json!(true)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop has it", || async { laptop.client.open(doc.id()).await.is_ok() }).await;
    let on_laptop = laptop.client.open(doc.id()).await.expect("open");

    let mut status = laptop.client.status();
    server.stop().await;
    tokio::time::timeout(
        cubby_tests::DEADLINE,
        status.wait_for(|s| matches!(s, SyncStatus::Offline { .. })),
    )
    .await
    .expect("the laptop notices")
    .expect("status open");
    // Edits while the server is down stay local and are not lost.
    doc.put("while_down", json!(1)).await.expect("offline put");
    server.restart().await;
    tokio::time::timeout(cubby_tests::DEADLINE, status.wait_for(|s| *s == SyncStatus::UpToDate))
        .await
        .expect("the laptop reconnects on its own")
        .expect("status open");
    doc.put("after", json!(true)).await.expect("put");
    eventually("edits flow again, including the one made while the server was down", || async {
        on_laptop.to_json() == json!({"before": true, "while_down": 1, "after": true})
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refreshed_from_the_provider() {
    use std::sync::atomic::Ordering;
    let server = TestServer::start().await;
    // Every token lives one second: the stream gets a fresh one on it, or is closed at the
    // expiry and comes back with one.
    let (provider, refreshes) =
        cubby_tests::counting_tokens(&server, "alice", std::time::Duration::from_secs(1));
    let dir = tempfile::tempdir().expect("temp dir");
    let device = cubby_tests::client_with_tokens(&server, dir.path(), provider).await;
    device.wait_until_synced().await.expect("synced");
    eventually("the provider is asked for a fresh token", || async {
        refreshes.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Still syncing with the refreshed token.
    let doc = device.create("after refresh").await.expect("create");
    doc.put("ok", json!(true)).await.expect("put");
    eventually("the change reaches the server", || async {
        server
            .document_json(&server.token("alice"), doc.id().as_bytes())
            .await
            .is_ok_and(|json| json.contains("\"ok\":true"))
    })
    .await;
}

/// Random letters: Automerge's compression leaves about 60% of their size.
fn random_text(bytes: usize, salt: u64) -> String {
    let mut rng = cubby_tests::Rng(salt);
    (0..bytes).map(|_| char::from(b'a' + rng.below(26) as u8)).collect()
}

/// BAD_INPUTS row 31: a device comes back from a long time offline with more history than one
/// gRPC message may carry (4 MiB), while the server gained changes too. The sync messages go in
/// parts under the limit; everything converges; a new device then receives the whole document
/// (Automerge sends it as one saved document, again larger than one message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_31_offline_device_with_history_over_the_message_limit_syncs_in_parts() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("Journal").await.expect("create");
    doc.put("start", json!(true)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop has the journal", || async {
        laptop.client.open(doc.id()).await.is_ok()
    })
    .await;

    // The phone goes offline for a long time and writes 10 MiB (about 6 MiB compressed); the
    // laptop writes meanwhile.
    let id = doc.id();
    drop(doc);
    let phone = Device::open(&server, "alice", phone.close().await, false).await;
    let on_phone = phone.client.open(id).await.expect("open");
    for i in 0..160u64 {
        on_phone.put(&format!("entry-{i}"), json!(random_text(64 * 1024, i))).await.expect("put");
    }
    let on_laptop = laptop.client.open(id).await.expect("open");
    for i in 0..20 {
        on_laptop.put(&format!("laptop-{i}"), json!(i)).await.expect("put");
    }
    laptop.client.wait_until_synced().await.expect("laptop synced");

    phone.client.wait_until_synced().await.expect("the phone's history reaches the server");
    eventually("both hold the same heads", || async {
        phone.client.wait_until_synced().await.is_ok()
            && laptop.client.wait_until_synced().await.is_ok()
            && on_phone.heads() == on_laptop.heads()
    })
    .await;
    assert_eq!(on_laptop.to_json()["entry-159"], json!(random_text(64 * 1024, 159)));

    let tablet = server.device("alice").await;
    eventually("a new device receives the whole journal", || async {
        tablet.client.wait_until_synced().await.is_ok()
            && tablet.client.open(id).await.is_ok_and(|d| d.heads() == on_phone.heads())
    })
    .await;
}

/// Exchanges sync messages for `doc` on `raw` until the server has nothing more to say.
async fn sync_raw(
    raw: &mut cubby_tests::RawStream,
    session: &mut cubby_core::session::PeerSession,
    doc: &mut automerge::Automerge,
    id: [u8; 16],
    create: bool,
) -> Vec<usize> {
    use cubby_proto::pb;
    let mut replies = Vec::new();
    let mut outgoing = session.generate(doc);
    loop {
        if let Some(message) = outgoing.take() {
            let create = create.then(|| pb::NewDoc { title: "long".into(), private: false });
            raw.send(pb::client_frame::Frame::Sync(pb::DocSync {
                doc_id: id.to_vec(),
                message,
                create,
                seq: 0,
                more: false,
            }))
            .await;
        }
        match raw.next().await.expect("the stream stays up") {
            Some(pb::server_frame::Frame::Sync(sync)) => {
                replies.push(sync.message.len());
                session.receive(doc, &sync.message).expect("a valid message");
                outgoing = session.generate(doc);
                if outgoing.is_none() {
                    return replies;
                }
            }
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
}

/// Workload 5's premise: a device reconnecting to a document it already holds in full costs a
/// few hundred bytes, not a Bloom filter over the document's whole history (the server keeps
/// each device's sync state per document between connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_to_a_long_history_costs_about_what_changed() {
    use automerge::transaction::Transactable;
    let server = TestServer::start().await;
    let token = server.token("alice");
    let key =
        cubby_crypto::signing::DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    let (device, id) = (cubby_crypto::random_array::<16>(), cubby_crypto::random_array::<16>());
    let mut doc = automerge::Automerge::new();
    for i in 0..20_000u64 {
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "n", i).expect("put");
        tx.commit();
    }
    let mut session = cubby_core::session::PeerSession::new();
    let mut raw =
        cubby_tests::RawStream::connect_as(&server, &token, &key, device).await.expect("connects");
    sync_raw(&mut raw, &mut session, &mut doc, id, true).await;

    // Reconnect, as the SDK does: only the shared heads survive on the device's side. First
    // with nothing new, then with one change made offline (the server cannot know those heads).
    for offline_edit in [false, true] {
        drop(raw);
        session.reconnect();
        if offline_edit {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "offline", true).expect("put");
            tx.commit();
        }
        raw = cubby_tests::RawStream::connect_as(&server, &token, &key, device)
            .await
            .expect("connects");
        let replies = sync_raw(&mut raw, &mut session, &mut doc, id, false).await;
        let bytes: usize = replies.iter().sum();
        eprintln!(
            "reconnect to a 20,000-change document (offline edit: {offline_edit}): the server sent {bytes} bytes in {} messages",
            replies.len()
        );
        assert!(bytes < 1024, "the server sent {bytes} bytes ({replies:?})");
    }
}

/// `DocEvent::Synced` tells the app when the server has acknowledged its changes: by then they
/// are durable on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_is_told_when_the_server_acknowledged_its_changes() {
    use cubby_client::DocEvent;
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("Notes").await.expect("create");
    let mut events = doc.subscribe();
    doc.put("title", json!("acknowledged")).await.expect("put");
    let synced = tokio::time::timeout(cubby_tests::DEADLINE, async {
        while let Ok(event) = events.recv().await {
            if event == DocEvent::Synced {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(synced, Ok(true), "no Synced event");
    let stored =
        server.document_json(&server.token("alice"), doc.id().as_bytes()).await.expect("reads");
    assert_eq!(stored, json!({"title": "acknowledged"}).to_string());
}

/// Announcements are a small lossy channel per customer (`hub.rs`): a stream that falls behind
/// re-reads the change feed. A device must hear of every document however many arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_hears_of_every_document_of_a_burst() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    laptop.client.wait_until_synced().await.expect("laptop connected");

    let made = futures_util::future::join_all((0..150).map(|i| {
        let phone = &phone;
        async move {
            let doc = phone.client.create(&format!("d{i}")).await.expect("create");
            doc.put("i", json!(i)).await.expect("put");
            doc.id()
        }
    }))
    .await;
    eventually("the laptop lists all 150 documents", || async {
        let listed = laptop.client.list().await.expect("list");
        made.iter().all(|id| listed.iter().any(|(d, _)| d == id))
    })
    .await;
    for id in made.iter().step_by(37) {
        let copy = laptop.client.open(*id).await.expect("open");
        eventually("a document's contents arrive", || async { copy.to_json().get("i").is_some() })
            .await;
    }
}

/// A stream holds back announcements of a document its device syncs live (the document's actor
/// sends the change itself), but never one of a change to its metadata: a device syncing a
/// document hears at once that it was made private elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_syncing_a_document_live_hears_that_it_was_made_private() {
    use automerge::transaction::Transactable;
    use cubby_proto::pb;
    let server = TestServer::start().await;
    let token = server.token("alice");
    let id = cubby_crypto::random_array::<16>();
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "note", "hello").expect("put");
    tx.commit();
    let mut session = cubby_core::session::PeerSession::new();
    let mut raw = cubby_tests::RawStream::connect(&server, &token).await.expect("connects");
    sync_raw(&mut raw, &mut session, &mut doc, id, true).await;

    let mut account = pb::account_client::AccountClient::new(server.channel().await);
    let request = pb::SetDocumentPrivateRequest { doc_id: id.to_vec(), private: true };
    let info = account
        .set_document_private(cubby_tests::authed(request, &token))
        .await
        .expect("made private")
        .into_inner();
    assert!(info.private);
    // `next` panics if no frame comes within the harness's deadline.
    loop {
        match raw.next().await.expect("the stream stays up") {
            Some(pb::server_frame::Frame::Changed(changed)) if changed.doc_id == id => {
                let info = changed.info.expect("not a deletion");
                assert!(info.doc_id.is_empty(), "the announcement names the document once");
                if info.private {
                    break;
                }
            }
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
}

/// Watches a device's local backend: counts the documents loaded from it, and can hold back the
/// next unsynced mark on its way to the disk, as a slow blocking pool can.
#[derive(Default)]
struct Watched {
    gate: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    loads: std::sync::atomic::AtomicUsize,
    /// How many loads there had been when the first unsynced mark was removed.
    loads_at_first_sync: std::sync::OnceLock<usize>,
    /// How many loads there had been when the first change from the server was stored.
    loads_at_first_arrival: std::sync::OnceLock<usize>,
}

impl Watched {
    fn loads(&self) -> usize {
        self.loads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A backend in memory that this watches.
    fn backend(self: &Arc<Self>) -> Arc<dyn cubby_store::Store> {
        let watched = self.clone();
        Arc::new(Hooked::new(cubby_store::MemoryStore::new(), move |call: Call<'_>| {
            watched.hear(call);
        }))
    }

    fn hear(&self, call: Call<'_>) {
        match call {
            Call::WriteDoc { chunk: true } => {
                self.loads_at_first_arrival.get_or_init(|| self.loads());
            }
            Call::Load => {
                self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Call::PutRecord(Space::UNSYNCED) => {
                let held = self.gate.lock().expect("gate").take();
                if let Some(gate) = held {
                    let _ = gate.recv();
                }
            }
            Call::RemoveRecord(Space::UNSYNCED) => {
                self.loads_at_first_sync.get_or_init(|| self.loads());
            }
            _ => {}
        }
    }
}

/// A device of alice's on `backend`, syncing from the start if `sync`.
async fn alice_on(
    server: &TestServer,
    backend: Arc<dyn cubby_store::Store>,
    sync: bool,
) -> cubby_client::Client {
    server
        .client_builder(cubby_client::StaticToken::new(server.token("alice")))
        .with_store(backend)
        .with_autosync(sync)
        .build()
        .await
        .expect("client builds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_whose_mark_lands_after_the_server_acknowledged_it_is_not_left_unsynced() {
    let server = TestServer::start().await;
    let watched = Arc::new(Watched::default());
    let backend = watched.backend();
    let phone = alice_on(&server, backend.clone(), true).await;
    let laptop = server.device("alice").await;
    let doc = phone.create("notes").await.expect("create");
    doc.put("a", json!(1)).await.expect("put");
    phone.wait_until_synced().await.expect("synced");
    eventually("the laptop holds the notes", || async {
        laptop.client.list().await.expect("lists").iter().any(|(id, _)| *id == doc.id())
    })
    .await;
    let on_laptop = laptop.client.open(doc.id()).await.expect("opens");

    // The phone's next edit is in its document, but its unsynced mark waits on the way to disk.
    let (release, gate) = std::sync::mpsc::channel();
    *watched.gate.lock().expect("gate") = Some(gate);
    let edit = {
        let doc = doc.clone();
        tokio::spawn(async move { doc.put("b", json!(2)).await })
    };
    // An edit from the laptop makes the phone answer, and that answer carries the phone's edit:
    // the server acknowledges it before its mark exists.
    on_laptop.put("c", json!(3)).await.expect("put");
    eventually("the phone's edit reaches the laptop", || async {
        on_laptop.to_json().get("b") == Some(&json!(2))
    })
    .await;
    release.send(()).expect("the mark is waiting");
    edit.await.expect("joins").expect("put");

    eventually("the phone has nothing left unsynced", || async {
        phone.unsynced().await.expect("lists").is_empty()
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), phone.wait_until_synced())
        .await
        .expect("wait_until_synced returns")
        .expect("synced");
}

/// Waits until `events` show a change to `id` from elsewhere.
async fn arrived(
    events: &mut tokio::sync::broadcast::Receiver<(DocId, cubby_client::DocEvent)>,
    id: DocId,
) {
    let wait = async {
        loop {
            match events.recv().await.expect("events flow") {
                (doc, cubby_client::DocEvent::Remote) if doc == id => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(cubby_tests::DEADLINE, wait).await.expect("the change arrives");
}

/// A device keeps a document it syncs in the background loaded between changes: someone typing
/// on another device sends one per keystroke, and loading the document from the local store for
/// each would cost the whole document per keystroke. It does not keep every document it syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_document_takes_changes_without_being_loaded_for_each() {
    let server = TestServer::start().await;
    let watched = Arc::new(Watched::default());
    let backend = watched.backend();
    let laptop = alice_on(&server, backend.clone(), true).await;
    let phone = server.device("alice").await;
    let mut events = laptop.events();
    // The laptop never opens the document: each change is shown to its app as an event.
    let notes = phone.client.create("notes").await.expect("create");
    notes.put("n", json!(0)).await.expect("put");
    arrived(&mut events, notes.id()).await;
    let before = watched.loads();
    for n in 1..=5 {
        notes.put("n", json!(n)).await.expect("put");
        arrived(&mut events, notes.id()).await;
    }
    assert_eq!(watched.loads(), before, "the laptop loaded the notes again for a change");

    // Changes to many other documents since: the notes are no longer kept loaded.
    for title in 0..16 {
        let other = phone.client.create(&format!("other {title}")).await.expect("create");
        other.put("n", json!(title)).await.expect("put");
        arrived(&mut events, other.id()).await;
    }
    let before = watched.loads();
    notes.put("n", json!(6)).await.expect("put");
    arrived(&mut events, notes.id()).await;
    assert_eq!(watched.loads(), before + 1, "the notes were loaded again, once");
    let on_laptop = laptop.open(notes.id()).await.expect("opens");
    assert_eq!(on_laptop.to_json(), json!({"n": 6}));
}

/// A device stores what the server sends without waiting for its disk: the server already holds
/// it durably. Power lost before the device's next flush takes those changes with it, and the
/// device's next connection brings them back.
#[tokio::test]
async fn changes_a_device_lost_with_its_unflushed_writes_come_back_at_its_next_connection() {
    let server = TestServer::start().await;
    let disk = cubby_tests::sim_disk::SimDisk::default();
    let backend = Arc::new(disk.clone());
    let laptop = alice_on(&server, backend.clone(), true).await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("notes").await.expect("create");
    doc.put("a", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop holds the notes", || async {
        match laptop.open(doc.id()).await {
            Ok(copy) => copy.to_json().get("a") == Some(&json!(1)),
            Err(_) => false,
        }
    })
    .await;
    // Anything the laptop flushes from here on (its own edit) makes what came before durable.
    laptop.open(doc.id()).await.expect("opens").put("mine", json!(true)).await.expect("put");
    laptop.wait_until_synced().await.expect("synced");

    doc.put("b", json!(2)).await.expect("put");
    let copy = laptop.open(doc.id()).await.expect("opens");
    eventually("the laptop shows the phone's edit", || async {
        copy.to_json().get("b") == Some(&json!(2))
    })
    .await;
    // The edit shows before it is stored: power goes once the client has let go of its store.
    drop((copy, laptop));
    eventually("the laptop's writes have all landed", || async {
        Arc::strong_count(&backend) == 1
    })
    .await;
    assert!(disk.crash() > 0, "the received edit was waiting for a flush");

    let backend = Arc::new(disk.clone());
    let laptop = alice_on(&server, backend.clone(), false).await;
    let copy = laptop.open(doc.id()).await.expect("opens offline");
    let offline = copy.to_json();
    assert_eq!(offline.get("mine"), Some(&json!(true)), "the laptop's own edit was flushed");
    assert_eq!(offline.get("b"), None, "the crash took the received edit");
    laptop.start_sync();
    eventually("the edit comes back", || async { copy.to_json().get("b") == Some(&json!(2)) })
        .await;
    assert_eq!(copy.to_json()["mine"], json!(true));

    // Once the laptop says it is synced, its copy is on its disk.
    doc.put("c", json!(3)).await.expect("put");
    eventually("the laptop shows the next edit", || async {
        copy.to_json().get("c") == Some(&json!(3))
    })
    .await;
    laptop.wait_until_synced().await.expect("synced");
    drop((copy, laptop));
    eventually("the laptop's writes have all landed", || async {
        Arc::strong_count(&backend) == 1
    })
    .await;
    disk.crash();
    let laptop = alice_on(&server, Arc::new(disk.clone()), false).await;
    let offline = laptop.open(doc.id()).await.expect("opens offline").to_json();
    assert_eq!((offline.get("b"), offline.get("c")), (Some(&json!(2)), Some(&json!(3))));
}

/// The server keeps serving a device's requests while it announces a feed larger than what one
/// connection buffers: a device that asks for a document before reading the announcements gets
/// its answer ahead of the rest of them. When the server announced the whole feed before reading
/// again, a device blocked on sending its requests and the server blocked on announcing waited on
/// each other; a fresh device of an account of 16,000 documents lost its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_while_a_large_feed_is_still_being_announced() {
    use cubby_proto::pb;
    let server =
        TestServer::start_with(|config| config.limits.max_writes_per_sec = 1_000_000).await;
    let writer = server.device("alice").await;
    let docs = 1500;
    let mut last = None;
    for n in 0..docs {
        let doc = writer.client.create(&format!("doc {n}")).await.expect("create");
        doc.put("n", json!(n)).await.expect("put");
        last = Some(doc.id());
    }
    writer.client.wait_until_synced().await.expect("the writer synced");
    let id = last.expect("documents were written");

    // A new device, whose feed starts at the beginning, asks for the last document at once.
    let mut raw =
        cubby_tests::RawStream::connect(&server, &server.token("alice")).await.expect("connects");
    let mut session = cubby_core::session::PeerSession::new();
    let message = session.generate(&automerge::Automerge::new()).expect("a first message");
    raw.send(pb::client_frame::Frame::Sync(pb::DocSync {
        doc_id: id.as_bytes().to_vec(),
        message,
        create: None,
        seq: 0,
        more: false,
    }))
    .await;
    let mut announced = 0;
    loop {
        match raw.next().await.expect("the stream stays up") {
            Some(pb::server_frame::Frame::Changed(_)) => announced += 1,
            Some(pb::server_frame::Frame::Sync(sync)) if sync.doc_id == id.as_bytes() => break,
            Some(pb::server_frame::Frame::CaughtUp(_)) => {
                panic!("the answer waited for the whole feed ({announced} announcements)")
            }
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
    assert!(announced < docs, "{announced} announcements came first");
}

/// A device that made more documents offline than the server queues for one device syncs them
/// a few at a time, reading the answers as they come. When it sent every one before reading any
/// answer, 16,000 documents made offline (release build) lost the connection every time: the
/// server's answers piled up unread until the device's HTTP/2 layer closed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_many_documents_made_offline_syncs_them_a_few_at_a_time() {
    let server =
        TestServer::start_with(|config| config.limits.max_writes_per_sec = 1_000_000).await;
    let watched = Arc::new(Watched::default());
    let backend = watched.backend();
    let offline = alice_on(&server, backend.clone(), false).await;
    let docs = 1000;
    for n in 0..docs {
        offline
            .create(&format!("doc {n}"))
            .await
            .expect("create")
            .put("n", json!(n))
            .await
            .expect("put");
    }
    offline.shutdown().await;

    let before = watched.loads();
    let online = alice_on(&server, backend.clone(), true).await;
    online.wait_until_synced().await.expect("every document made offline is synced");
    assert!(online.unsynced().await.expect("unsynced").is_empty());
    // The SDK syncs up to 128 documents at once.
    let loaded = watched.loads_at_first_sync.get().expect("marks were removed") - before;
    assert!(
        loaded <= 128,
        "{loaded} documents were loaded to be sent before the first answer was read"
    );

    let fresh = server.device("alice").await;
    fresh.client.wait_until_synced().await.expect("a new device syncs");
    assert_eq!(fresh.client.list().await.expect("list").len(), docs);
}

/// Large documents are synced a few at a time, those a device made offline and those a new
/// device is told of alike: each is loaded whole while its exchange lasts, so how many go at once
/// is bounded by their stored size as well as by their number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_documents_are_synced_a_few_at_a_time() {
    let server = TestServer::start().await;
    let written = Arc::new(Watched::default());
    let written_to = written.backend();
    let offline = alice_on(&server, written_to.clone(), false).await;
    let docs = 16;
    for n in 0..docs {
        let doc = offline.create(&format!("scan {n}")).await.expect("create");
        // About 1 MiB stored each: four fill the window.
        doc.put("pixels", json!(random_text(1 << 20, n))).await.expect("put");
    }
    offline.shutdown().await;
    let before = written.loads();
    let writer = alice_on(&server, written_to.clone(), true).await;
    writer.wait_until_synced().await.expect("the writer synced");
    let sent = written.loads_at_first_sync.get().expect("marks were removed") - before;
    assert!(sent <= 8, "{sent} documents of about 1 MiB were sent before the first answer");

    let told = Arc::new(Watched::default());
    let told_to = told.backend();
    let fresh = alice_on(&server, told_to.clone(), true).await;
    fresh.wait_until_synced().await.expect("the new device synced");
    assert_eq!(fresh.list().await.expect("list").len(), docs as usize);
    let asked = *told.loads_at_first_arrival.get().expect("changes arrived");
    assert!(asked <= 8, "{asked} documents of about 1 MiB were asked for before the first arrived");
}

/// A device that reconnects to a document it synced before is sent what changed right behind
/// the announcement, before it says anything: the server kept its sync state, so the device
/// need not ask, which saves a round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_is_sent_what_changed_without_asking() {
    use automerge::transaction::Transactable;
    use cubby_core::session::PeerSession;
    use cubby_proto::pb::server_frame::Frame;
    use cubby_tests::RawStream;

    let server = TestServer::start().await;
    let token = server.token("alice");
    let key =
        cubby_crypto::signing::DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    let (device, raw_id) = (cubby_crypto::random_array::<16>(), cubby_crypto::random_array());
    let id = DocId::from_bytes(raw_id);

    // A device speaking the protocol frame by frame makes a document and syncs it.
    let mut doc = automerge::Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "n", 1).map(drop))
        .expect("put");
    let mut session = PeerSession::new();
    let mut raw = RawStream::connect_as(&server, &token, &key, device).await.expect("connects");
    sync_raw(&mut raw, &mut session, &mut doc, raw_id, true).await;
    drop(raw);

    // Meanwhile another device of the customer edits it.
    let laptop = server.device("alice").await;
    eventually("the laptop has it", || async { laptop.client.open(id).await.is_ok() }).await;
    let copy = laptop.client.open(id).await.expect("open");
    copy.put("late", json!("edit")).await.expect("put");
    laptop.client.wait_until_synced().await.expect("synced");
    let heads = copy.heads();

    // Back, the device says nothing after its proof: the change comes anyway, announced as
    // pushed, and before the server says the device is caught up.
    let mut raw = RawStream::connect_as(&server, &token, &key, device).await.expect("reconnects");
    session.reconnect();
    let mut announced_pushed = false;
    loop {
        match raw.next().await.expect("the stream stays open").expect("a frame") {
            Frame::Changed(changed) if changed.doc_id == id.as_bytes() => {
                announced_pushed |= changed.pushed;
            }
            Frame::Sync(sync) => {
                session.receive(&mut doc, &sync.message).expect("a valid server message");
            }
            Frame::CaughtUp(_) => break,
            _ => {}
        }
    }
    assert!(announced_pushed, "the announcement says the change follows");
    assert_eq!(doc.get_heads(), heads, "the change arrived unasked, before CaughtUp");
}

/// Deletes alice's document `id` through the account API.
async fn delete_on_the_server(server: &TestServer, id: cubby_client::DocId) {
    let mut account = cubby_proto::pb::account_client::AccountClient::new(server.channel().await);
    let request = cubby_proto::pb::DeleteDocumentRequest { doc_id: id.as_bytes().to_vec() };
    account
        .delete_document(cubby_tests::authed(request, &server.token("alice")))
        .await
        .expect("deleted");
}

/// Issue 24, row 10: a handle the app still holds to a document the server deleted refuses
/// changes (written back, they made the document again), and the app is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_handle_to_a_document_deleted_on_the_server_refuses_changes() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("held").await.expect("create");
    doc.put("x", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    let mut events = doc.subscribe();
    delete_on_the_server(&server, doc.id()).await;
    eventually("the phone drops the deleted document", || async {
        phone.client.list().await.expect("list").is_empty()
    })
    .await;
    let told = tokio::time::timeout(cubby_tests::DEADLINE, async {
        loop {
            if let Ok(cubby_client::DocEvent::Deleted { discarded }) = events.recv().await {
                return discarded;
            }
        }
    })
    .await
    .expect("the handle's subscriber is told");
    assert!(!told, "nothing was discarded: every change had reached the server");
    let refused = doc.put("y", json!(2)).await.expect_err("a deleted document takes no change");
    assert!(matches!(refused, cubby_client::ClientError::Deleted(id) if id == doc.id()));
    phone.client.wait_until_synced().await.expect("synced");
    assert!(phone.client.list().await.expect("list").is_empty(), "it did not come back");
    let err = server.document_json(&server.token("alice"), doc.id().as_bytes()).await;
    assert_eq!(err.expect_err("still deleted").code(), tonic::Code::NotFound);
}

/// Issue 24, row 10: an edit made offline to a document another device deleted meanwhile
/// loses to the deletion, and is reported (the event, and `take_discarded`), never dropped
/// silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_edit_to_a_document_deleted_elsewhere_is_reported_not_dropped() {
    let server = TestServer::start().await;
    let laptop = server.device("alice").await;
    let doc = laptop.client.create("shared list").await.expect("create");
    doc.put("first", json!(1)).await.expect("put");
    laptop.client.wait_until_synced().await.expect("synced");
    let id = doc.id();
    drop(doc);
    let dir = laptop.close().await;

    // Offline, the laptop edits it; meanwhile it is deleted on the server.
    let laptop = cubby_tests::Device::open(&server, "alice", dir, false).await;
    laptop.client.open(id).await.expect("held").put("offline", json!(2)).await.expect("saved");
    delete_on_the_server(&server, id).await;
    let mut events = laptop.client.events();
    laptop.client.start_sync();
    laptop.client.wait_until_synced().await.expect("synced");
    let told = tokio::time::timeout(cubby_tests::DEADLINE, async {
        loop {
            if let Ok((doc, cubby_client::DocEvent::Deleted { discarded })) = events.recv().await {
                return (doc, discarded);
            }
        }
    })
    .await
    .expect("the app is told");
    assert_eq!(told, (id, true), "its unsynced change was discarded, and it says so");
    let discarded = laptop.client.take_discarded().await.expect("listed");
    assert_eq!(discarded.len(), 1);
    assert_eq!((discarded[0].id, discarded[0].title.as_str()), (id, "shared list"));
    assert!(laptop.client.take_discarded().await.expect("taken").is_empty(), "told once");
    assert!(laptop.client.list().await.expect("list").is_empty());
}

/// A change Automerge 0.12 panics applying (an operation on an object nobody made), sent by a
/// device of the customer's own: the server takes its changes in without applying them and
/// relays them, so it refuses this one at once (`INVALID_ARGUMENT`), and no other device ever
/// receives it; the document reads and syncs as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_automerge_would_panic_on_is_refused_and_never_relayed() {
    use automerge::transaction::Transactable;
    use cubby_proto::pb;
    let server = TestServer::start().await;
    let token = server.token("alice");
    let key =
        cubby_crypto::signing::DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    let id = cubby_crypto::random_array::<16>();
    let mut doc = automerge::Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "a", 1))
        .expect("put");
    let mut session = cubby_core::session::PeerSession::new();
    let mut raw =
        cubby_tests::RawStream::connect_as(&server, &token, &key, [7; 16]).await.expect("connects");
    sync_raw(&mut raw, &mut session, &mut doc, id, true).await;
    let laptop = server.device("alice").await;
    eventually("the laptop has the document", || async {
        laptop.client.wait_until_synced().await.is_ok()
            && laptop.client.open(DocId::from_bytes(id)).await.is_ok()
    })
    .await;

    // The next change of this device's, its operation moved onto an object nobody made.
    let mut next = doc.clone();
    next.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "b", 2))
        .expect("put");
    let change = next.get_last_local_change().expect("made");
    let mut expanded = serde_json::to_value(change.decode()).expect("json");
    let actor = expanded["actor"].as_str().expect("actor").to_owned();
    expanded.as_object_mut().expect("object").remove("hash");
    expanded["ops"][0]["obj"] = json!(format!("99@{actor}"));
    let bad = automerge::Change::from(
        serde_json::from_value::<automerge::ExpandedChange>(expanded).expect("a change"),
    );
    let message = automerge::sync::Message {
        heads: vec![bad.hash()],
        need: Vec::new(),
        have: vec![automerge::sync::Have::default()],
        changes: automerge::sync::ChunkList::from(vec![bad.raw_bytes().to_vec()]),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    raw.send(pb::client_frame::Frame::Sync(pb::DocSync {
        doc_id: id.to_vec(),
        message: message.encode(),
        create: None,
        seq: 0,
        more: false,
    }))
    .await;
    let refusal = loop {
        match raw.next().await.expect("the stream stays up") {
            Some(pb::server_frame::Frame::Error(error)) => break error,
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    };
    assert_eq!(refusal.code, tonic::Code::InvalidArgument as i32, "{refusal:?}");

    // Nothing of it reached the server's document or the laptop; both still sync.
    let view = server.document_json(&token, &id).await.expect("reads");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&view).expect("json"), json!({"a": 1}));
    let on_laptop = laptop.client.open(DocId::from_bytes(id)).await.expect("open");
    on_laptop.put("c", json!(3)).await.expect("put");
    laptop.client.wait_until_synced().await.expect("the laptop syncs");
    assert_eq!(on_laptop.to_json(), json!({"a": 1, "c": 3}));
    let view = server.document_json(&token, &id).await.expect("reads");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&view).expect("json"),
        json!({"a": 1, "c": 3})
    );
}
