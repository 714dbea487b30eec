//! The customer owns the data: device keys, revocation, export, erasure, the business's admin API
//! with private documents and an audit trail, and key rotation, against a real server over TLS.

use cubby_store::{Docs, Keys, Records};
use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use cubby_client::{ErrorCode, SyncStatus, WipeReason};
use cubby_crypto::signing::{DeviceKey, generate_pkcs8};
use cubby_proto::pb;
use cubby_proto::pb::account_client::AccountClient;
use cubby_proto::pb::admin_client::AdminClient;
use cubby_tests::{Device, RawStream, TestServer, authed, eventually, files_under};
use serde_json::json;

fn admin_token(server: &TestServer) -> String {
    let signer = cubby_server::auth::dev_signer(server.data_dir(), false).expect("dev key");
    cubby_server::auth::dev_service_token(&signer, "backend", Duration::from_secs(3600))
}

async fn account(server: &TestServer) -> AccountClient<tonic::transport::Channel> {
    AccountClient::new(server.channel().await)
}

async fn admin(server: &TestServer) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(server.channel().await)
}

/// The account API's document list, asked for with `token`.
async fn list_documents(
    server: &TestServer,
    token: &str,
) -> Result<tonic::Response<pb::ListDocumentsResponse>, tonic::Status> {
    account(server).await.list_documents(authed(pb::ListDocumentsRequest {}, token)).await
}

/// Revokes alice's device `id` through the account API.
async fn revoke(server: &TestServer, id: [u8; 16]) {
    let request = pb::RevokeDeviceRequest { device_id: id.to_vec() };
    let mut account = account(server).await;
    account.revoke_device(authed(request, &server.token("alice"))).await.expect("revoked");
}

fn new_key() -> DeviceKey {
    DeviceKey::from_pkcs8(&generate_pkcs8()).expect("key")
}

async fn wiped(device: &Device) -> Option<WipeReason> {
    match &*device.client.status().borrow() {
        SyncStatus::Wiped { reason } => Some(*reason),
        _ => None,
    }
}

/// Reopening a wiped device's directory starts a new, empty device.
async fn assert_wiped_on_disk(server: &TestServer, device: Device) {
    let old_id = device.client.device_id();
    let dir = device.close().await;
    let reopened = Device::open(server, "nobody", dir, false).await;
    assert_ne!(reopened.client.device_id(), old_id, "a wiped store starts a new device");
    assert!(reopened.client.list().await.expect("lists").is_empty(), "nothing survives a wipe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_the_device_key_cannot_sync_as_that_device() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let (key, id) = (new_key(), cubby_crypto::random_array());
    let mut first = RawStream::connect_as(&server, &token, &key, id).await.expect("registers");
    assert!(matches!(first.next().await, Ok(Some(pb::server_frame::Frame::CaughtUp(_)))));
    drop(first);
    // The same device id with another key: refused, whatever the token.
    let mut thief =
        RawStream::connect_as(&server, &server.token("alice"), &new_key(), id).await.expect("ok");
    let refused = thief.next().await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // A proof that does not verify (signed over another challenge) is refused too.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::Hello {
        device_id: cubby_crypto::random_array::<16>().to_vec(),
        public_key: key.public_key().to_vec(),
        ..Default::default()
    };
    tx.send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Hello(hello)) })
        .await
        .expect("send");
    let mut sync = pb::sync_client::SyncClient::new(server.channel().await);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = sync.connect(authed(stream, &token)).await.expect("connects").into_inner();
    assert!(matches!(
        inbound.message().await,
        Ok(Some(pb::ServerFrame { frame: Some(pb::server_frame::Frame::Challenge(_)) }))
    ));
    let proof = pb::Proof { signature: key.prove(&id, b"some other challenge") };
    tx.send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Proof(proof)) })
        .await
        .expect("send");
    let refused = inbound.message().await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // The rightful device still connects.
    let mut again = RawStream::connect_as(&server, &token, &key, id).await.expect("connects");
    assert!(matches!(again.next().await, Ok(Some(pb::server_frame::Frame::CaughtUp(_)))));
    // Only the rightful device was registered.
    let list = account(&server)
        .await
        .list_devices(authed(pb::ListDevicesRequest {}, &token))
        .await
        .expect("lists")
        .into_inner()
        .devices;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].public_key, key.public_key().to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_is_cut_off_refused_and_wiped() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create("notes").await.expect("create");
    doc.put("text", json!("hello")).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    laptop.client.wait_until_synced().await.expect("synced");
    eventually("the phone is connected", || async {
        *phone.client.status().borrow() == SyncStatus::UpToDate
    })
    .await;
    let devices = laptop.client.devices().await.expect("lists");
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().any(|d| d.id == laptop.client.device_id() && d.this_device));

    // Revoke the phone while it streams: it is told, and wipes itself.
    let started = Instant::now();
    let revoked = laptop.client.revoke_device(phone.client.device_id()).await.expect("revokes");
    assert!(revoked.revoked_ms.is_some());
    eventually("the phone wipes itself", || async {
        wiped(&phone).await == Some(WipeReason::DeviceRevoked)
    })
    .await;
    eprintln!("revoke to wiped phone: {:?}", started.elapsed());
    let refused = phone.client.list().await.expect_err("the wiped phone reads nothing");
    assert_eq!(refused.code(), ErrorCode::Wiped, "{refused}");
    let refused = phone.client.open(doc.id()).await.expect_err("nor opens what it held");
    assert_eq!(refused.code(), ErrorCode::Wiped, "{refused}");
    assert!(doc.put("more", json!(1)).await.is_err(), "its open handles write nothing");
    let doc_id = doc.id();
    drop(doc);
    assert_wiped_on_disk(&server, phone).await;

    // Revoking it again, an unknown device, a malformed id: clear errors, nothing changes.
    let again = laptop.client.revoke_device(revoked.id).await.expect_err("already revoked");
    assert!(again.to_string().contains("FailedPrecondition"), "{again}");
    let unknown = laptop
        .client
        .revoke_device("1111111111111111".parse().expect("id"))
        .await
        .expect_err("unknown");
    assert!(unknown.to_string().contains("NotFound"), "{unknown}");
    let malformed = account(&server)
        .await
        .revoke_device(authed(
            pb::RevokeDeviceRequest { device_id: vec![1; 3] },
            &server.token("alice"),
        ))
        .await
        .expect_err("malformed");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    // The laptop carries on.
    let notes = laptop.client.open(doc_id).await.expect("the laptop has it");
    notes.put("from", json!("laptop")).await.expect("put");
    laptop.client.wait_until_synced().await.expect("the laptop still syncs");
    let audit = laptop.client.audit().await.expect("audit");
    assert!(
        audit.iter().any(|e| e.action == "device.revoke" && e.target == revoked.id.to_string())
    );
    assert_eq!(audit.iter().filter(|e| e.action == "device.register").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_19_revoked_device_reconnect_and_token_are_refused() {
    let server = TestServer::start().await;
    let (key, id) = (new_key(), cubby_crypto::random_array::<16>());
    let device_token = server.token("alice");
    let mut stream = RawStream::connect_as(&server, &device_token, &key, id).await.expect("ok");
    assert!(matches!(stream.next().await, Ok(Some(pb::server_frame::Frame::CaughtUp(_)))));
    revoke(&server, id).await;
    // The open stream is closed with the wipe instruction.
    let closed = stream.until_closed().await.expect("closed with a status");
    assert_eq!(closed.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        closed.metadata().get(cubby_proto::WIPE_METADATA).and_then(|v| v.to_str().ok()),
        Some(cubby_proto::WIPE_REVOKED)
    );
    // Its token is refused everywhere now, and a fresh token does not bring the device back.
    let err = list_documents(&server, &device_token)
        .await
        .expect_err("the revoked device's token is refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // The device itself is still told to wipe, with its old token or a fresh one.
    for token in [device_token.clone(), server.token("alice")] {
        let mut back = RawStream::connect_as(&server, &token, &key, id).await.expect("proves");
        let refused = back.next().await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.metadata().get(cubby_proto::WIPE_METADATA).is_some());
    }
    // Another device presenting the revoked token (a fresh install, a stolen token) is refused
    // once it has said who it is, and registers nothing: the device list a customer checks after
    // losing a phone does not fill up with its attempts.
    let devices_before = devices(&server).await;
    for _ in 0..3 {
        let refused = match RawStream::connect(&server, &device_token).await {
            Ok(mut other) => other.next().await.expect_err("refused"),
            Err(status) => status,
        };
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(devices(&server).await, devices_before, "no device was registered");
    let mut account = account(&server).await;
    let audit = account.list_audit(authed(pb::ListAuditRequest {}, &server.token("alice"))).await;
    let registrations = audit
        .expect("audit")
        .into_inner()
        .entries
        .iter()
        .filter(|e| e.action == "device.register")
        .count();
    assert_eq!(registrations, 1, "only the device that was revoked ever registered");
}

/// The ids of alice's devices, as the server lists them.
async fn devices(server: &TestServer) -> Vec<Vec<u8>> {
    let mut account = account(server).await;
    let listed = account
        .list_devices(authed(pb::ListDevicesRequest {}, &server.token("alice")))
        .await
        .expect("lists devices");
    listed.into_inner().devices.into_iter().map(|d| d.device_id).collect()
}

/// Revoking a device refuses every token it used that is still valid: the one it connected
/// with, a fresh one it sent on that stream, and the one of a later connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_19_a_revoked_device_s_earlier_and_fresh_tokens_are_refused_too() {
    let server = TestServer::start().await;
    let (key, id) = (new_key(), cubby_crypto::random_array::<16>());
    let (first, fresh) =
        (server.token("alice"), server.token_for("alice", Duration::from_secs(7200)));
    let mut stream = RawStream::connect_as(&server, &first, &key, id).await.expect("connects");
    stream.send(pb::client_frame::Frame::FreshToken(pb::FreshToken { token: fresh.clone() })).await;
    // Frames are handled in order: once this is refused, the fresh token has been taken.
    stream
        .send(pb::client_frame::Frame::Sync(pb::DocSync {
            doc_id: vec![1; 3],
            ..Default::default()
        }))
        .await;
    loop {
        match stream.next().await.expect("the stream stays up") {
            Some(pb::server_frame::Frame::Error(_)) => break,
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
    drop(stream);
    let later = server.token("alice");
    let mut again = RawStream::connect_as(&server, &later, &key, id).await.expect("reconnects");
    assert!(matches!(again.next().await, Ok(Some(pb::server_frame::Frame::CaughtUp(_)))));
    drop(again);

    revoke(&server, id).await;
    let other = server.token("alice");
    for (name, token) in [("first", &first), ("fresh", &fresh), ("later", &later)] {
        let err = list_documents(&server, token).await.expect_err(name);
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{name}");
    }
    // A token the device never used still works.
    assert!(list_documents(&server, &other).await.is_ok());
}

/// A revoked device's token stays refused after a restart for as long as the clock leeway still
/// accepts it, past its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_19_a_revoked_token_stays_refused_across_a_restart_within_the_leeway() {
    let mut server = TestServer::start().await;
    let (key, id) = (new_key(), cubby_crypto::random_array::<16>());
    let token = server.token_for("alice", Duration::from_secs(1));
    let expired = std::time::SystemTime::now() + Duration::from_secs(2);
    let mut stream = RawStream::connect_as(&server, &token, &key, id).await.expect("connects");
    // On a loaded machine the server may already ask for a fresh token (halfway through the
    // second): the device is connected either way.
    loop {
        match stream.next().await {
            Ok(Some(pb::server_frame::Frame::CaughtUp(_))) => break,
            Ok(Some(pb::server_frame::Frame::TokenExpiring(_))) => {}
            other => panic!("connected and caught up, not {other:?}"),
        }
    }
    revoke(&server, id).await;
    eventually("the token has expired", || async { std::time::SystemTime::now() > expired }).await;
    server.restart().await;
    let err = list_documents(&server, &token).await.expect_err("still refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{err:?}");
}

/// The files of a tar archive, by path.
fn untar(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(bytes);
    let mut files = BTreeMap::new();
    for entry in archive.entries().expect("a tar archive") {
        let mut entry = entry.expect("an entry");
        let path = entry.path().expect("a path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("readable");
        files.insert(path, data);
    }
    files
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_round_trips_every_document_with_the_servers_heads() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let notes = phone.client.create("notes").await.expect("create");
    for i in 0..20 {
        notes.put(&format!("line{i}"), json!(format!("text {i}"))).await.expect("put");
    }
    let todo = phone.client.create("todo").await.expect("create");
    todo.put("items", json!(["milk", {"eggs": 12}])).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");

    let mut archive = Vec::new();
    let size = phone.client.export(&mut archive).await.expect("exports");
    assert_eq!(size as usize, archive.len());
    let files = untar(&archive);
    let manifest: serde_json::Value =
        serde_json::from_slice(&files["cubby-export/manifest.json"]).expect("manifest is JSON");
    assert_eq!(manifest["format"], "cubby-export-v1");
    let documents = manifest["documents"].as_array().expect("documents");
    assert_eq!(documents.len(), 2);
    for doc in [&notes, &todo] {
        let entry = documents
            .iter()
            .find(|d| d["id"] == doc.id().to_string())
            .expect("listed in the manifest");
        assert_eq!(entry["title"], doc.meta().title);
        let binary = &files[&format!("cubby-export/documents/{}.automerge", doc.id())];
        assert_eq!(entry["automerge"]["sha256"], hex(&cubby_crypto::sha256(binary)));
        assert_eq!(entry["automerge"]["size"], binary.len());
        let loaded = automerge::Automerge::load(binary).expect("the binary loads with Automerge");
        // The device is in sync, so its heads are the server's.
        assert_eq!(loaded.get_heads(), doc.heads());
        let heads: Vec<String> = doc.heads().iter().map(|h| h.to_string()).collect();
        assert_eq!(entry["heads"], json!(heads));
        let rendered: serde_json::Value =
            serde_json::from_slice(&files[&format!("cubby-export/documents/{}.json", doc.id())])
                .expect("JSON");
        assert_eq!(rendered, doc.to_json());
    }
    let devices: serde_json::Value =
        serde_json::from_slice(&files["cubby-export/devices.json"]).expect("JSON");
    assert_eq!(devices[0]["id"], phone.client.device_id().to_string());
    let audit: serde_json::Value =
        serde_json::from_slice(&files["cubby-export/audit.json"]).expect("JSON");
    assert!(audit.as_array().expect("a list").iter().any(|e| e["action"] == "device.register"));
    assert_eq!(
        manifest["audit"]["sha256"],
        hex(&cubby_crypto::sha256(&files["cubby-export/audit.json"]))
    );
    // The export itself is on the record.
    let log = phone.client.audit().await.expect("audit");
    assert!(log.iter().any(|e| e.action == "export" && e.actor == "customer"));
}

const MARKER: &str = "ERASE-ME-5d1c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_27_erasure_destroys_the_key_first_and_nothing_readable_remains() {
    let mut server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let bob = server.device("bob").await;
    for title in ["one", "two"] {
        let doc = phone.client.create(title).await.expect("create");
        doc.put("secret", json!(MARKER)).await.expect("put");
    }
    let bobs = bob.client.create("bob's").await.expect("create");
    bobs.put("x", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    bob.client.wait_until_synced().await.expect("synced");
    laptop.client.wait_until_synced().await.expect("synced");
    let alice = server.customer_id("alice");
    let key_file = server.data_dir().join("db/keys").join(hex(alice.as_bytes()));
    let wrapped = std::fs::read(&key_file).expect("alice has a key file");
    let old_token = server.token("alice");

    let receipt = phone.client.delete_account().await.expect("erases");
    assert_eq!((receipt.documents, receipt.devices), (2, 2));
    assert!(receipt.bytes > 0 && receipt.audit_entries >= 2);
    assert_eq!(wiped(&phone).await, Some(WipeReason::AccountErased));
    eventually("the laptop wipes on contact", || async {
        wiped(&laptop).await == Some(WipeReason::AccountErased)
    })
    .await;

    // Old tokens get a clear NOT_FOUND, also for a second erasure; the business cannot reach
    // alice either.
    for attempt in 0..2 {
        let err = account(&server)
            .await
            .delete_account(authed(pb::DeleteAccountRequest {}, &old_token))
            .await
            .expect_err("erased");
        assert_eq!(err.code(), tonic::Code::NotFound, "attempt {attempt}");
    }
    let err = admin(&server)
        .await
        .erase_customer(authed(
            pb::CustomerRequest { subject: "alice".into() },
            &admin_token(&server),
        ))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Bob is untouched.
    bobs.put("y", json!(2)).await.expect("put");
    bob.client.wait_until_synced().await.expect("bob still syncs");

    assert_wiped_on_disk(&server, phone).await;
    assert_wiped_on_disk(&server, laptop).await;
    server.stop().await;
    // The wrapped key is gone from every file; no record of alice is left; nothing reads.
    assert!(!key_file.exists());
    for file in files_under(server.data_dir()) {
        let bytes = std::fs::read(&file).expect("readable");
        assert!(
            !bytes.windows(wrapped.len()).any(|w| w == wrapped.as_slice()),
            "alice's wrapped key is still in {}",
            file.display()
        );
        assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()));
    }
    let raw = cubby_store_sled::SledStore::open(&server.data_dir().join("db")).expect("raw");
    use cubby_store::Space;
    assert!(!raw.list_customers().expect("list").contains(&alice));
    assert!(raw.list_docs(&alice).expect("list").is_empty());
    for space in [Space::DEVICES, Space::AUDIT, Space::PROFILE, Space::DENIED_TOKENS] {
        assert!(raw.scan_records(&alice, space).expect("scan").is_empty());
    }
    assert_eq!(raw.list_docs(&server.customer_id("bob")).expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_change_reaches_the_device_live_and_is_audited() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let bob = server.device("bob").await;
    let doc = phone.client.create("settings").await.expect("create");
    doc.put("items", json!(["a"])).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    let bobs = bob.client.create("bob's").await.expect("create");
    bob.client.wait_until_synced().await.expect("synced");
    let token = admin_token(&server);
    let mut admin = admin(&server).await;
    let edit = |path: &str, op: pb::edit::Op| pb::Edit { path: path.into(), op: Some(op) };
    let change = |doc: &[u8], edits: Vec<pb::Edit>| pb::ChangeDocumentRequest {
        subject: "alice".into(),
        doc_id: doc.to_vec(),
        edits,
    };

    let answer = admin
        .change_document(authed(
            change(
                doc.id().as_bytes(),
                vec![
                    edit("/theme", pb::edit::Op::SetJson("\"dark\"".into())),
                    edit("/items/-", pb::edit::Op::InsertJson("{\"b\": 2}".into())),
                ],
            ),
            &token,
        ))
        .await
        .expect("applies")
        .into_inner();
    let expected = json!({"theme": "dark", "items": ["a", {"b": 2}]});
    assert_eq!(serde_json::from_str::<serde_json::Value>(&answer.json).expect("json"), expected);
    eventually("the phone sees the business's change live", || async { doc.to_json() == expected })
        .await;

    // Bad input changes nothing.
    let heads = doc.heads();
    let bad = [
        (
            change(
                doc.id().as_bytes(),
                vec![edit("no-slash", pb::edit::Op::Delete(pb::Delete {}))],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            change(
                doc.id().as_bytes(),
                vec![edit("/theme", pb::edit::Op::SetJson("{not json".into()))],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            change(
                doc.id().as_bytes(),
                vec![
                    edit("/theme", pb::edit::Op::SetJson("1".into())),
                    edit("/missing", pb::edit::Op::Delete(pb::Delete {})),
                ],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            change(doc.id().as_bytes(), vec![pb::Edit { path: "/x".into(), op: None }]),
            tonic::Code::InvalidArgument,
        ),
        (change(doc.id().as_bytes(), vec![]), tonic::Code::InvalidArgument),
        (
            change(&[7; 16], vec![edit("/x", pb::edit::Op::SetJson("1".into()))]),
            tonic::Code::NotFound,
        ),
        (
            change(bobs.id().as_bytes(), vec![edit("/x", pb::edit::Op::SetJson("1".into()))]),
            tonic::Code::NotFound,
        ),
        (
            change(&[7; 3], vec![edit("/x", pb::edit::Op::SetJson("1".into()))]),
            tonic::Code::InvalidArgument,
        ),
        (
            pb::ChangeDocumentRequest {
                subject: "nobody".into(),
                ..change(doc.id().as_bytes(), vec![edit("/x", pb::edit::Op::SetJson("1".into()))])
            },
            tonic::Code::NotFound,
        ),
    ];
    for (i, (request, code)) in bad.into_iter().enumerate() {
        let err = admin.change_document(authed(request, &token)).await.expect_err("refused");
        assert_eq!(err.code(), code, "case {i}: {err:?}");
    }
    let read = admin
        .read_document(authed(
            pb::DocumentRequest { subject: "alice".into(), doc_id: doc.id().as_bytes().to_vec() },
            &token,
        ))
        .await
        .expect("reads")
        .into_inner();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&read.json).expect("json"), expected);
    assert_eq!(doc.heads(), heads, "nothing changed");
    assert!(bob.client.open(bobs.id()).await.expect("open").to_json().get("x").is_none());

    // Usage, and the audit trail the customer sees.
    let customers = admin
        .list_customers(authed(pb::ListCustomersRequest::default(), &token))
        .await
        .expect("lists")
        .into_inner()
        .customers;
    let usage = customers.iter().find(|c| c.subject == "alice").expect("alice is listed");
    assert_eq!((usage.documents, usage.devices), (1, 1));
    assert!(usage.bytes > 0 && usage.last_seen_ms > 0);
    let page = admin
        .list_customers(authed(
            pb::ListCustomersRequest { page_size: 1, ..Default::default() },
            &token,
        ))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(page.customers.len(), 1);
    let rest = admin
        .list_customers(authed(
            pb::ListCustomersRequest { page_size: 1, page_token: page.next_page_token },
            &token,
        ))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(rest.customers.len(), 1);
    assert_ne!(rest.customers[0].subject, page.customers[0].subject);
    let log = phone.client.audit().await.expect("audit");
    let target = doc.id().to_string();
    assert!(log.iter().any(|e| e.actor == "business:backend"
        && e.action == "admin.write"
        && e.target == target
        && e.outcome == "ok"));
    assert!(log.iter().any(|e| e.action == "admin.read" && e.outcome == "ok"));

    // The business erases Bob on request: a receipt, and Bob's connected device wipes itself.
    let receipt = admin
        .erase_customer(authed(pb::CustomerRequest { subject: "bob".into() }, &token))
        .await
        .expect("erases")
        .into_inner();
    assert_eq!((receipt.documents, receipt.devices), (1, 1));
    eventually("bob's device wipes", || async {
        wiped(&bob).await == Some(WipeReason::AccountErased)
    })
    .await;
    let again = admin
        .erase_customer(authed(pb::CustomerRequest { subject: "bob".into() }, &token))
        .await
        .expect_err("already erased");
    assert_eq!(again.code(), tonic::Code::NotFound);
    assert!(doc.to_json() == expected, "alice is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_document_is_refused_to_the_business_and_the_attempt_audited() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let diary = phone.client.create("diary").await.expect("create");
    diary.put("entry", json!("private thoughts")).await.expect("put");
    let shared = phone.client.create("shared").await.expect("create");
    shared.put("k", json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    assert!(phone.client.set_private(diary.id(), true).await.expect("marks").private);

    let token = admin_token(&server);
    let mut admin = admin(&server).await;
    let target = |doc: &cubby_client::DocHandle| pb::DocumentRequest {
        subject: "alice".into(),
        doc_id: doc.id().as_bytes().to_vec(),
    };
    let read = admin.read_document(authed(target(&diary), &token)).await.expect_err("refused");
    assert_eq!(read.code(), tonic::Code::PermissionDenied);
    assert!(!read.message().contains("private thoughts"));
    let write = pb::ChangeDocumentRequest {
        subject: "alice".into(),
        doc_id: diary.id().as_bytes().to_vec(),
        edits: vec![pb::Edit { path: "/x".into(), op: Some(pb::edit::Op::SetJson("1".into())) }],
    };
    let write = admin.change_document(authed(write, &token)).await.expect_err("refused");
    assert_eq!(write.code(), tonic::Code::PermissionDenied);
    admin.read_document(authed(target(&shared), &token)).await.expect("shared reads");

    // Nothing of it, its title included, is in the business's listings.
    let alice = || pb::CustomerRequest { subject: "alice".into() };
    let listed = admin.list_customer_documents(authed(alice(), &token)).await.expect("lists");
    let listed = listed.into_inner().documents;
    assert_eq!(listed.iter().map(|d| d.title.as_str()).collect::<Vec<_>>(), ["shared"]);
    let usage = pb::ListCustomersRequest::default();
    admin.list_customers(authed(usage, &token)).await.expect("usage");

    // The business's export withholds it.
    let mut chunks = admin
        .export_customer(authed(pb::CustomerRequest { subject: "alice".into() }, &token))
        .await
        .expect("exports")
        .into_inner();
    let mut archive = Vec::new();
    while let Some(chunk) = chunks.message().await.expect("chunk") {
        archive.extend_from_slice(&chunk.data);
    }
    let files = untar(&archive);
    assert!(!files.contains_key(&format!("cubby-export/documents/{}.automerge", diary.id())));
    assert!(files.contains_key(&format!("cubby-export/documents/{}.automerge", shared.id())));
    assert!(!files.values().any(|f| f.windows(16).any(|w| w == b"private thoughts")));
    let manifest = String::from_utf8(files["cubby-export/manifest.json"].clone()).expect("utf-8");
    assert!(!manifest.contains("diary"), "the title stays out of the manifest: {manifest}");
    assert!(!manifest.contains(&diary.id().to_string()), "and so does its id");

    let log = phone.client.audit().await.expect("audit");
    let diary_id = diary.id().to_string();
    for action in ["admin.read", "admin.write"] {
        assert!(
            log.iter().any(|e| e.action == action && e.target == diary_id && e.outcome == "denied"),
            "{action} refusal is audited: {log:?}"
        );
    }
    for action in ["export", "admin.list", "admin.usage"] {
        assert!(
            log.iter().any(|e| e.action == action && e.actor == "business:backend"),
            "{action} is audited: {log:?}"
        );
    }
    // Shared again, the business can read it.
    phone.client.set_private(diary.id(), false).await.expect("unmarks");
    admin.read_document(authed(target(&diary), &token)).await.expect("reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_shows_a_document_made_private_or_shared_again() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let diary = phone.client.create("diary").await.expect("create");
    diary.put("entry", json!("private thoughts")).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    eventually("the laptop holds the diary", || async {
        laptop.client.list().await.expect("lists").iter().any(|(id, _)| *id == diary.id())
    })
    .await;
    // The laptop has it open: its loaded copy must change too, not only the stored one.
    let on_laptop = laptop.client.open(diary.id()).await.expect("opens");
    let id = diary.id();
    let private_on = |device, want| shows_private(device, id, want);

    assert!(phone.client.set_private(diary.id(), true).await.expect("marks").private);
    assert!(private_on(&phone, true).await, "the device that marked it shows it at once");
    eventually("the laptop shows the diary private", || private_on(&laptop, true)).await;
    // A later edit on the laptop keeps the flag it stores with the change.
    on_laptop.put("entry", json!("more thoughts")).await.expect("put");
    assert!(private_on(&laptop, true).await, "an edit does not store the old flag");

    laptop.client.set_private(diary.id(), false).await.expect("unmarks");
    assert!(private_on(&laptop, false).await);
    eventually("the phone shows the diary shared again", || private_on(&phone, false)).await;
}

/// Whether `device` lists document `id` with the private flag `want`, and its open copy agrees.
async fn shows_private(device: &Device, id: cubby_core::DocId, want: bool) -> bool {
    let listed = device.client.list().await.expect("lists");
    let open = device.client.open(id).await.expect("opens").meta();
    listed.iter().any(|(d, meta)| *d == id && meta.private == want) && open.private == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_tokens_are_refused_on_the_admin_api_and_service_tokens_on_the_customer_api() {
    let server = TestServer::start().await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("d").await.expect("create");
    phone.client.wait_until_synced().await.expect("synced");
    let customer = server.token("alice");
    let mut admin = admin(&server).await;
    let err = admin
        .list_customers(authed(pb::ListCustomersRequest::default(), &customer))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let request =
        pb::DocumentRequest { subject: "alice".into(), doc_id: doc.id().as_bytes().to_vec() };
    let err = admin.read_document(authed(request, &customer)).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = admin
        .list_customers(authed(pb::ListCustomersRequest::default(), "garbage"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = account(&server)
        .await
        .list_documents(authed(pb::ListDocumentsRequest {}, &admin_token(&server)))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let request = pb::CustomerRequest { subject: String::new() };
    let err =
        admin.erase_customer(authed(request, &admin_token(&server))).await.expect_err("empty");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_26_key_rotation_under_live_sync_fails_no_request() {
    let mut server = TestServer::start_with(|c| c.limits.key_reload_secs = 1).await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let bob = server.device("bob").await;
    let doc = phone.client.create("live").await.expect("create");
    bob.client.create("bob's").await.expect("create");
    phone.client.wait_until_synced().await.expect("synced");
    bob.client.wait_until_synced().await.expect("synced");
    let before = server.running().key_generations().await.expect("counts");
    assert_eq!(before.keys().copied().collect::<Vec<_>>(), vec![1]);

    // Watch every status change of both devices for failures while edits flow.
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watch = |device: &Device| {
        let mut status = device.client.status();
        let failures = failures.clone();
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                if let SyncStatus::Offline { failure: Some(f) } = &*status.borrow_and_update() {
                    failures.lock().expect("lock").push(f.to_string());
                }
            }
        })
    };
    let watchers = [watch(&phone), watch(&laptop)];
    let master = server.data_dir().join("master.key");
    let mut rotated = false;
    for i in 0..60u64 {
        doc.put("n", json!(i)).await.expect("put");
        if i == 10 {
            assert_eq!(cubby_crypto::keys::MasterSecret::rotate(&master).expect("rotates"), 2);
            rotated = true;
        }
        eventually("the laptop sees each edit", || async {
            laptop.client.open(doc.id()).await.is_ok_and(|d| d.to_json()["n"] == json!(i))
        })
        .await;
        let unary = account(&server)
            .await
            .list_documents(authed(pb::ListDocumentsRequest {}, &server.token("bob")))
            .await;
        assert!(unary.is_ok(), "a request failed during rotation: {unary:?}");
        if rotated && server.running().key_generations().await.expect("counts").keys().eq([&2]) {
            break;
        }
    }
    eventually("every data key is re-wrapped", || async {
        server.running().key_generations().await.expect("counts").keys().eq([&2])
    })
    .await;
    doc.put("after", json!(true)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    watchers.iter().for_each(tokio::task::JoinHandle::abort);
    let failures = failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "sync failed during rotation: {failures:?}");
    drop(doc);
    for device in [phone, laptop, bob] {
        device.close().await;
    }

    // Generation 1 is unused now: retire it, restart with only generation 2, read everything.
    server.stop().await;
    let store = server.data_dir().join("db");
    cubby_crypto::keys::MasterSecret::retire(&master, 1, |generation| {
        let keys = cubby_store_sled::wrapped_keys(&store).expect("key files");
        Ok(keys
            .iter()
            .filter(|k| cubby_crypto::keys::Keyring::generation_of(k) == Some(generation))
            .count())
    })
    .expect("generation 1 retires");
    server.restart().await;
    for subject in ["alice", "bob"] {
        let docs = account(&server)
            .await
            .list_documents(authed(pb::ListDocumentsRequest {}, &server.token(subject)))
            .await
            .expect("lists")
            .into_inner()
            .documents;
        assert_eq!(docs.len(), 1);
        account(&server)
            .await
            .get_document(authed(
                pb::GetDocumentRequest { doc_id: docs[0].doc_id.clone() },
                &server.token(subject),
            ))
            .await
            .expect("reads with only the new key");
    }
}

/// Issue 24, row 11: a device's data directory belongs to one account. Another customer's token
/// on it (a family computer, a second sign-in) is refused with a clear error before anything of
/// the first customer's is shown, and registers no device under the second. When the client
/// cannot tell at start (no token yet, or one that is not a JWT), the server's challenge names
/// the account: the client then stops, shows nothing more, and syncs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_token_on_a_device_directory_is_refused_and_shows_nothing() {
    let server = TestServer::start().await;
    let alice = server.device("alice").await;
    alice
        .client
        .create("alice's diary")
        .await
        .expect("create")
        .put("k", json!(1))
        .await
        .expect("put");
    alice.client.wait_until_synced().await.expect("synced");
    let dir = alice.close().await;

    let refused = server
        .client_builder(cubby_client::StaticToken::new(server.token("bob")))
        .with_data_dir(dir.path())
        .build()
        .await
        .expect_err("bob's token on alice's device");
    assert!(matches!(refused, cubby_client::ClientError::WrongAccount), "{refused}");
    assert!(refused.to_string().contains("another account"), "{refused}");

    // No token at start (offline): the server's challenge names the account.
    let opaque = LateBob { token: server.token("bob"), asked: Default::default() };
    let client = server
        .client_builder(opaque)
        .with_data_dir(dir.path())
        .build()
        .await
        .expect("the client cannot tell yet");
    let failure = client.wait_until_synced().await.expect_err("refused at the challenge");
    assert_eq!(failure, cubby_client::SyncFailure::WrongAccount);
    assert!(matches!(client.list().await, Err(cubby_client::ClientError::WrongAccount)));
    let mut account = account(&server).await;
    let devices = account
        .list_devices(authed(pb::ListDevicesRequest {}, &server.token("bob")))
        .await
        .expect("bob's devices");
    assert!(devices.into_inner().devices.is_empty(), "no device registered under bob");
    client.shutdown().await;

    // Alice's token still opens it.
    let alice = Device::open(&server, "alice", dir, true).await;
    assert_eq!(alice.client.list().await.expect("alice's own").len(), 1);
}

/// Bob's token, but none the first time it is asked for (the app was offline).
struct LateBob {
    token: String,
    asked: std::sync::atomic::AtomicBool,
}

impl cubby_client::TokenProvider for LateBob {
    fn token(&self, _refresh: bool) -> cubby_client::TokenFuture {
        let first = !self.asked.swap(true, std::sync::atomic::Ordering::SeqCst);
        let token = self.token.clone();
        Box::pin(async move {
            if first {
                return Err(cubby_client::TokenError("offline".into()));
            }
            Ok(token)
        })
    }
}

/// Issue 24, rows 3 and 4: an older copy of a revoked device's record put back over the newer
/// (spliced into the store, as someone with the files could) does not bring the device back: the
/// revocation is in the ledger, which puts it back at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_devices_older_record_spliced_back_into_the_store_does_not_unrevoke_it() {
    use cubby_store::{Space, Store};
    let mut server = TestServer::start().await;
    let (key, id) = (new_key(), cubby_crypto::random_array::<16>());
    let mut connected =
        RawStream::connect_as(&server, &server.token("alice"), &key, id).await.expect("connects");
    assert!(matches!(connected.next().await, Ok(Some(pb::server_frame::Frame::CaughtUp(_)))));
    drop(connected);
    let alice = server.customer_id("alice");
    server.stop().await;
    let db = server.data_dir().join("db");
    let raw = || cubby_store_sled::SledStore::open(&db).expect("sled");
    let before = raw().get_record(&alice, Space::DEVICES, &id).expect("get").expect("registered");
    server.restart().await;
    revoke(&server, id).await;
    server.stop().await;
    {
        let store = raw();
        store.put_record(&alice, Space::DEVICES, &id, &before).expect("splice");
        store.flush().expect("flush");
    }
    server.restart().await;
    let listed = account(&server)
        .await
        .list_devices(authed(pb::ListDevicesRequest {}, &server.token("alice")))
        .await
        .expect("devices")
        .into_inner()
        .devices;
    let device = listed.iter().find(|d| d.device_id == id).expect("listed");
    assert!(device.revoked_ms > 0, "still revoked");
    let mut back =
        RawStream::connect_as(&server, &server.token("alice"), &key, id).await.expect("proves");
    let refused = back.next().await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}

/// Issue 24, row 4: the metadata a document had before it was made private, put back over the
/// newer (as someone with the files could), does not open: the document answers `DATA_LOSS` to
/// everyone, and is never shown to the business as shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_documents_older_metadata_spliced_back_does_not_expose_it_to_the_business() {
    use cubby_store::{Store, StoreError};
    let mut server = TestServer::start().await;
    let phone = server.device("alice").await;
    let diary = phone.client.create("diary").await.expect("create");
    diary.put("entry", json!("private thoughts")).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    let id = diary.id();
    drop(diary);
    phone.close().await;
    let alice = server.customer_id("alice");
    let db = server.data_dir().join("db");
    server.stop().await;
    let shared = {
        let raw = cubby_store_sled::SledStore::open(&db).expect("sled");
        raw.doc_meta(&alice, &id).expect("meta").expect("exists").1
    };
    server.restart().await;
    let mut account = account(&server).await;
    let private = pb::SetDocumentPrivateRequest { doc_id: id.as_bytes().to_vec(), private: true };
    account.set_document_private(authed(private, &server.token("alice"))).await.expect("private");
    server.stop().await;
    {
        let raw = cubby_store_sled::SledStore::open(&db).expect("sled");
        raw.write_doc_off_feed(&alice, &id, &shared, None).expect("splice the older metadata");
        raw.flush().expect("flush");
        let opened = cubby_store::EncryptedStore::open(raw, keyring(&server));
        let refused = opened.expect("opens").doc_meta(&alice, &id).expect_err("refused");
        assert!(matches!(refused, StoreError::Corrupt(_)), "{refused}");
    }
    server.restart().await;
    let read = pb::DocumentRequest { subject: "alice".into(), doc_id: id.as_bytes().to_vec() };
    let refused = admin(&server)
        .await
        .read_document(authed(read, &admin_token(&server)))
        .await
        .expect_err("not served");
    assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused:?}");
    assert!(!refused.message().contains("private thoughts"));
    let own = server.document_json(&server.token("alice"), id.as_bytes()).await;
    assert_eq!(own.expect_err("quarantined").code(), tonic::Code::DataLoss);
}

/// The server's keyring, from its data directory's master key.
fn keyring(server: &TestServer) -> cubby_crypto::keys::Keyring {
    let path = server.data_dir().join("master.key");
    cubby_crypto::keys::Keyring::from_master(
        &cubby_crypto::keys::MasterSecret::read(&path).expect("master key"),
    )
}
