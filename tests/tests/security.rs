//! What one customer can never do to another, what a bad token gets, and what is on disk.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cubby_core::Seq;
use cubby_proto::pb;
use cubby_proto::pb::account_client::AccountClient;
use cubby_proto::pb::sync_client::SyncClient;
use cubby_store::{Docs, Store};
use cubby_tests::{RawStream, TestServer, authed, files_under};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

/// A stream of client frames for a raw Sync call, starting with `first`. Keep the sender to keep
/// the stream open.
fn frames(
    first: Vec<pb::client_frame::Frame>,
) -> (tokio::sync::mpsc::Sender<pb::ClientFrame>, ReceiverStream<pb::ClientFrame>) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for frame in first {
        tx.try_send(pb::ClientFrame { frame: Some(frame) }).expect("room for the first frames");
    }
    (tx, ReceiverStream::new(rx))
}

/// A hello that never gets to prove anything (its token is refused first).
fn hello() -> pb::client_frame::Frame {
    pb::client_frame::Frame::Hello(pb::Hello { device_id: vec![9; 16], ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_14_another_customers_document_is_not_found_like_a_missing_one() {
    let server = TestServer::start().await;
    let alice = server.device("alice").await;
    let doc = alice.client.create("private").await.expect("create");
    doc.put("secret", json!("alice's")).await.expect("put");
    alice.client.wait_until_synced().await.expect("synced");
    let (alice_token, bob_token) = (server.token("alice"), server.token("bob"));

    assert!(
        server
            .document_json(&alice_token, doc.id().as_bytes())
            .await
            .expect("alice reads")
            .contains("alice's")
    );
    let foreign =
        server.document_json(&bob_token, doc.id().as_bytes()).await.expect_err("bob is refused");
    let missing = server.document_json(&bob_token, &[42; 16]).await.expect_err("no such document");
    assert_eq!(foreign.code(), tonic::Code::NotFound);
    assert_eq!((foreign.code(), foreign.message()), (missing.code(), missing.message()));

    // Deleting it as Bob is the same NOT_FOUND, and Alice's document survives.
    let mut account = AccountClient::new(server.channel().await);
    let request = pb::DeleteDocumentRequest { doc_id: doc.id().as_bytes().to_vec() };
    let deleted = account.delete_document(authed(request, &bob_token)).await.expect_err("refused");
    assert_eq!(deleted.code(), tonic::Code::NotFound);
    assert!(server.document_json(&alice_token, doc.id().as_bytes()).await.is_ok());

    // Over the sync stream: a sync message for Alice's id is answered like one for a missing id.
    let message = cubby_core::session::PeerSession::new()
        .generate(&automerge::Automerge::new())
        .expect("a first message");
    let ask = |id: &[u8]| {
        pb::client_frame::Frame::Sync(pb::DocSync {
            doc_id: id.to_vec(),
            message: message.clone(),
            create: None,
            seq: 0,
            more: false,
        })
    };
    let mut raw = RawStream::connect(&server, &bob_token).await.expect("bob connects");
    raw.send(ask(doc.id().as_bytes())).await;
    raw.send(ask(&[42; 16])).await;
    let mut errors = Vec::new();
    while errors.len() < 2 {
        match raw.next().await.expect("stream open") {
            Some(pb::server_frame::Frame::Error(e)) => errors.push((e.code, e.message)),
            Some(pb::server_frame::Frame::Sync(_)) => panic!("bob received sync data"),
            _ => {}
        }
    }
    assert_eq!(errors[0], errors[1]);
    assert_eq!(errors[0].0, tonic::Code::NotFound as i32);
}

fn sign(signer: &cubby_crypto::signing::TokenSigner, claims: serde_json::Value) -> String {
    signer.sign_jwt(&claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_unauthenticated() {
    let server = TestServer::start().await;
    let signer = cubby_server::auth::dev_signer(server.data_dir(), false).expect("dev key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = |exp: serde_json::Value, aud: &str| json!({"iss": cubby_server::auth::DEV_ISSUER, "aud": aud, "sub": "alice", "exp": exp, "iat": now});
    let good = sign(&signer, claims(json!(now + 600), "cubby"));
    let foreign_signer =
        cubby_crypto::signing::TokenSigner::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    let payload = URL_SAFE_NO_PAD.encode(claims(json!(now + 600), "cubby").to_string());
    let cases = [
        ("expired", sign(&signer, claims(json!(now - 3600), "cubby"))),
        ("forged", sign(&foreign_signer, claims(json!(now + 600), "cubby"))),
        (
            "alg none",
            format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#)),
        ),
        ("wrong audience", sign(&signer, claims(json!(now + 600), "another-app"))),
        ("string exp", sign(&signer, claims(json!((now - 3600).to_string()), "cubby"))),
        ("garbage", "not-a-token".to_owned()),
    ];
    let mut account = AccountClient::new(server.channel().await);
    let mut sync = SyncClient::new(server.channel().await);
    assert!(account.list_documents(authed(pb::ListDocumentsRequest {}, &good)).await.is_ok());
    for (name, token) in &cases {
        let err = account
            .list_documents(authed(pb::ListDocumentsRequest {}, token))
            .await
            .expect_err(name);
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{name}: {err:?}");
        let (_keep, stream) = frames(vec![hello()]);
        let err = sync.connect(authed(stream, token)).await.expect_err(name);
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{name} on the sync stream");
    }
    let missing = account
        .list_documents(tonic::Request::new(pb::ListDocumentsRequest {}))
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
}

/// A subject is bounded once, at the token: one the admin API could not name (over 1,024 bytes)
/// is refused on every API, so every customer that exists can be exported and erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_longer_than_the_admin_api_accepts_is_refused_on_every_api() {
    use cubby_server::auth::MAX_SUBJECT_BYTES;
    let server = TestServer::start().await;
    let signer = cubby_server::auth::dev_signer(server.data_dir(), false).expect("dev key");
    let ttl = Duration::from_secs(600);
    let mut account = AccountClient::new(server.channel().await);
    let mut sync = SyncClient::new(server.channel().await);

    let long = "x".repeat(10_000);
    let token = cubby_server::auth::dev_token(&signer, &long, ttl);
    let err = account.list_documents(authed(pb::ListDocumentsRequest {}, &token)).await;
    let err = err.expect_err("a 10 KB subject is refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("subject"), "the status says why: {err:?}");
    let (_keep, stream) = frames(vec![hello()]);
    let err = sync.connect(authed(stream, &token)).await.expect_err("refused on the stream");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The longest accepted subject is one the business can name.
    let longest = "y".repeat(MAX_SUBJECT_BYTES);
    let token = cubby_server::auth::dev_token(&signer, &longest, ttl);
    let created = pb::CreateDocumentRequest { title: "t".into() };
    account.create_document(authed(created, &token)).await.expect("accepted");
    let admin = cubby_server::auth::dev_service_token(&signer, "backend", ttl);
    let mut business = pb::admin_client::AdminClient::new(server.channel().await);
    let listed = business
        .list_customer_documents(authed(pb::CustomerRequest { subject: longest }, &admin))
        .await
        .expect("the business reaches that customer");
    assert_eq!(listed.into_inner().documents.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_11_stream_is_closed_when_its_token_expires() {
    let server = TestServer::start().await;
    let token = server.token_for("alice", Duration::from_secs(1));
    let mut raw = RawStream::connect(&server, &token).await.expect("valid for now");
    let ended = raw.until_closed().await;
    assert_eq!(ended.map(|s| s.code()), Some(tonic::Code::Unauthenticated));
}

const MARKER: &str = "CUBBY-MARKER-7f3a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_written_into_a_document_is_in_no_file_on_disk() {
    let mut server = TestServer::start().await;
    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let doc = phone.client.create(&format!("title {MARKER}")).await.expect("create");
    doc.put("note", json!(format!("text {MARKER}"))).await.expect("put");
    doc.put(MARKER, json!(1)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    cubby_tests::eventually("the laptop has the marker", || async {
        laptop
            .client
            .open(doc.id())
            .await
            .is_ok_and(|d| d.to_json()["note"] == json!(format!("text {MARKER}")))
    })
    .await;
    drop(doc);
    let (phone_dir, laptop_dir) = (phone.close().await, laptop.close().await);
    server.stop().await;

    let mut scanned = 0;
    for dir in [server.data_dir(), phone_dir.path(), laptop_dir.path()] {
        for file in files_under(dir) {
            let bytes = std::fs::read(&file).expect("readable");
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
                "marker found in {}",
                file.display()
            );
            scanned += 1;
        }
    }
    assert!(scanned >= 6, "scanned {scanned} files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_21_record_copied_to_another_customer_or_document_fails_to_open() {
    let mut server = TestServer::start().await;
    let alice_device = server.device("alice").await;
    let bob_device = server.device("bob").await;
    let doc = alice_device.client.create("mine").await.expect("create");
    doc.put("secret", json!("alice's")).await.expect("put");
    let other = alice_device.client.create("other").await.expect("create");
    other.put("x", json!(1)).await.expect("put");
    alice_device.client.wait_until_synced().await.expect("synced");
    let bobs = bob_device.client.create("bob's").await.expect("create");
    bobs.put("y", json!(2)).await.expect("put");
    bob_device.client.wait_until_synced().await.expect("synced");
    server.stop().await;

    // Copy Alice's sealed records, byte for byte, under Bob's key and under her other document.
    let (alice, bob) = (server.customer_id("alice"), server.customer_id("bob"));
    {
        let raw =
            cubby_store_sled::SledStore::open(&server.data_dir().join("db")).expect("raw sled");
        let stolen = raw.load(&alice, &doc.id()).expect("load").expect("exists");
        assert!(!stolen.chunks.is_empty());
        let (id, bytes) = &stolen.chunks[0];
        let chunk = Some(cubby_store::Chunk { id: *id, bytes });
        raw.write_doc(&bob, &doc.id(), &stolen.meta, chunk).expect("raw copy to bob");
        raw.write_doc(&alice, &other.id(), &stolen.meta, chunk).expect("raw copy to other doc");
        assert!(raw.feed_since(&bob, Seq(0)).expect("feed").iter().any(|(_, d)| *d == doc.id()));
        raw.flush().expect("flush");
    }
    server.restart().await;
    for (token, id) in [(server.token("bob"), doc.id()), (server.token("alice"), other.id())] {
        let err = server
            .document_json(&token, id.as_bytes())
            .await
            .expect_err("a moved record does not open");
        assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
        assert!(!err.message().contains("alice's"));
    }
    // Everything else still reads.
    assert!(
        server
            .document_json(&server.token("alice"), doc.id().as_bytes())
            .await
            .expect("alice's own")
            .contains("alice's")
    );
    assert!(server.document_json(&server.token("bob"), bobs.id().as_bytes()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_01_malformed_sync_message_is_refused_and_the_stream_stays_usable() {
    let server = TestServer::start().await;
    let alice = server.device("alice").await;
    let doc = alice.client.create("target").await.expect("create");
    doc.put("k", json!("v")).await.expect("put");
    alice.client.wait_until_synced().await.expect("synced");
    let heads_before = doc.heads();

    let frame = |message: Vec<u8>| {
        pb::client_frame::Frame::Sync(pb::DocSync {
            doc_id: doc.id().as_bytes().to_vec(),
            message,
            create: None,
            seq: 0,
            more: false,
        })
    };
    let valid = cubby_core::session::PeerSession::new()
        .generate(&automerge::Automerge::new())
        .expect("message");
    let mut raw = RawStream::connect(&server, &server.token("alice")).await.expect("connects");
    raw.send(frame(b"\x42garbage".to_vec())).await;
    loop {
        if let Some(pb::server_frame::Frame::Error(e)) = raw.next().await.expect("open") {
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
            assert_eq!(e.doc_id, doc.id().as_bytes().to_vec());
            break;
        }
    }
    raw.send(frame(valid)).await;
    loop {
        if let Some(pb::server_frame::Frame::Sync(s)) = raw.next().await.expect("still open") {
            assert_eq!(s.doc_id, doc.id().as_bytes().to_vec());
            break;
        }
    }
    // The document is untouched.
    let json =
        server.document_json(&server.token("alice"), doc.id().as_bytes()).await.expect("reads");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json).expect("json"), json!({"k": "v"}));
    assert_eq!(doc.heads(), heads_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_04_a_message_over_the_size_limit_is_resource_exhausted() {
    let server = TestServer::start().await;
    let mut raw = RawStream::connect(&server, &server.token("alice")).await.expect("connects");
    raw.send(pb::client_frame::Frame::Sync(pb::DocSync {
        doc_id: vec![1; 16],
        message: vec![0x42; 5 << 20],
        create: None,
        seq: 0,
        more: false,
    }))
    .await;
    let refused = raw.until_closed().await.expect("closed with a status");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    // The server is fine.
    let device = server.device("alice").await;
    device.client.create("after").await.expect("create");
    device.client.wait_until_synced().await.expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_09_a_connection_that_never_finishes_the_tls_handshake_is_closed() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start_with(|c| c.limits.tls_handshake_timeout_secs = 1).await;
    let addr = server.url().trim_start_matches("https://").to_owned();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.expect("connects");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(cubby_tests::DEADLINE, silent.read(&mut buf))
        .await
        .expect("the server closes the connection by itself");
    assert!(matches!(read, Ok(0) | Err(_)), "closed, not answered: {read:?}");
    // Its slot is free: a real client still connects.
    let device = server.device("alice").await;
    device.client.create("after").await.expect("create");
    device.client.wait_until_synced().await.expect("still serving");
}

/// A new device of alice's on a connection with 16 KiB flow-control windows, which fill quickly.
async fn small_window_stream(server: &TestServer) -> RawStream {
    let channel = server
        .channel_with(|e| {
            e.initial_stream_window_size(16 * 1024).initial_connection_window_size(16 * 1024)
        })
        .await;
    let key =
        cubby_crypto::signing::DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    RawStream::connect_on(channel, &server.token("alice"), &key, cubby_crypto::random_array())
        .await
        .expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_10_a_device_that_never_reads_is_disconnected_and_others_carry_on() {
    // The phone's 2000 writes come as fast as the server acknowledges them: no write limit
    // here, which would hold the phone up for its own sake.
    let server = TestServer::start_with(|c| {
        c.limits.slow_consumer_secs = 1;
        c.limits.max_writes_per_sec = 1_000_000;
    })
    .await;
    let phone = server.device("alice").await;
    // A device that connects and then never reads another frame, with small flow-control
    // windows so that they fill quickly.
    let mut stalled = small_window_stream(&server).await;
    // Each write is announced, with the document's title, to every device of the customer:
    // enough of them fill the stalled device's windows and then its queue on the server.
    let doc = phone.client.create(&"t".repeat(1000)).await.expect("create");
    for i in 0..2000 {
        doc.put("n", json!(i)).await.expect("put");
        if i % 100 == 0 {
            phone.client.wait_until_synced().await.expect("the phone is never held up");
        }
    }
    phone.client.wait_until_synced().await.expect("the phone is never held up");
    // The stalled stream was dropped: past whatever it had buffered, it ends, saying why (the
    // status goes ahead of what was still queued for it).
    let ended = stalled.until_closed().await.expect("the stream ends with a status");
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("not reading"), "{ended:?}");
}

/// A device that sends everything at once (no window of its own, as a client written from the
/// proto might) and reads its answers as they come, if slowly, is slowed down, never cut off:
/// the server stops reading its frames while their answers wait in its queue. (Its queue used
/// to overflow within a second, which closed the stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_sends_thousands_of_documents_at_once_and_reads_is_never_cut_off() {
    const DOCS: usize = 2000;
    let server = TestServer::start().await;
    // Small flow-control windows, as on a phone: answers wait on the server, not in the
    // device's transport.
    let mut raw = small_window_stream(&server).await;
    let empty = {
        let mut state = automerge::sync::State::new();
        let doc = automerge::Automerge::new();
        automerge::sync::SyncDoc::generate_sync_message(&doc, &mut state)
            .expect("a first message")
            .encode()
    };
    let tx = raw.tx.clone();
    let sender = tokio::spawn(async move {
        for n in 0..DOCS {
            let frame = pb::DocSync {
                doc_id: cubby_crypto::random_array::<16>().to_vec(),
                message: empty.clone(),
                create: Some(pb::NewDoc { title: format!("doc {n}"), private: false }),
                ..Default::default()
            };
            let frame = pb::ClientFrame { frame: Some(pb::client_frame::Frame::Sync(frame)) };
            tx.send(frame).await.expect("the stream stays open");
        }
    });
    let mut answered = std::collections::HashSet::new();
    // The device is busy for a moment after its first answer, as a phone's app may be.
    let mut busy = true;
    while answered.len() < DOCS {
        if busy && !answered.is_empty() {
            busy = false;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match raw.next().await {
            Ok(Some(pb::server_frame::Frame::Sync(sync))) => {
                answered.insert(sync.doc_id);
            }
            Ok(Some(pb::server_frame::Frame::Error(error))) => panic!("refused: {error:?}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended after {} answers", answered.len()),
            Err(status) => panic!("cut off after {} answers: {status:?}", answered.len()),
        }
    }
    sender.await.expect("every document was sent");
}

/// Reads `raw` until the server asks for a fresh token; returns the seconds it says are left.
async fn until_token_expiring(raw: &mut RawStream) -> u64 {
    loop {
        match raw.next().await {
            Ok(Some(pb::server_frame::Frame::TokenExpiring(expiring))) => {
                return expiring.seconds_left;
            }
            Ok(Some(_)) => {}
            other => panic!("the stream ended before asking for a fresh token: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_11_a_fresh_token_sent_on_the_stream_keeps_it_open_past_the_first() {
    let server = TestServer::start().await;
    let mut raw = RawStream::connect(&server, &server.token_for("alice", Duration::from_secs(3)))
        .await
        .expect("valid for now");
    // Its token expires a second later and is never renewed: once it is closed, the first
    // stream's own token has expired too.
    let mut control =
        RawStream::connect(&server, &server.token_for("alice", Duration::from_secs(4)))
            .await
            .expect("valid for now");
    let left = until_token_expiring(&mut raw).await;
    assert!(left <= 3, "asked with {left} s left of a 3 s token");
    raw.send(pb::client_frame::Frame::FreshToken(pb::FreshToken { token: server.token("alice") }))
        .await;
    let ended = control.until_closed().await;
    assert_eq!(ended.map(|s| s.code()), Some(tonic::Code::Unauthenticated));

    // The renewed stream still answers: a document created on it syncs.
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "k", 1).expect("put");
    tx.commit();
    let mut session = cubby_core::session::PeerSession::new();
    let message = session.generate(&doc).expect("a first message");
    raw.send(pb::client_frame::Frame::Sync(pb::DocSync {
        doc_id: cubby_crypto::random_array::<16>().to_vec(),
        message,
        create: Some(pb::NewDoc { title: "after the first token".into(), private: false }),
        seq: 0,
        more: false,
    }))
    .await;
    loop {
        match raw.next().await {
            Ok(Some(pb::server_frame::Frame::Sync(_))) => break,
            Ok(Some(_)) => {}
            other => panic!("the renewed stream ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_11_the_same_token_sent_back_is_asked_for_once_and_the_stream_still_closes() {
    let server = TestServer::start().await;
    let token = server.token_for("alice", Duration::from_secs(2));
    let mut raw = RawStream::connect(&server, &token).await.expect("valid for now");
    until_token_expiring(&mut raw).await;
    raw.send(pb::client_frame::Frame::FreshToken(pb::FreshToken { token })).await;
    loop {
        match raw.next().await {
            Ok(Some(pb::server_frame::Frame::TokenExpiring(_))) => panic!("asked again"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unauthenticated);
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_11_a_fresh_token_for_another_customer_or_forged_closes_the_stream() {
    let server = TestServer::start().await;
    let foreign =
        cubby_crypto::signing::TokenSigner::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    let cases = [
        ("bob's", server.token("bob"), tonic::Code::PermissionDenied),
        (
            "forged",
            cubby_server::auth::dev_token(&foreign, "alice", Duration::from_secs(3600)),
            tonic::Code::Unauthenticated,
        ),
        ("garbage", "not-a-token".to_owned(), tonic::Code::Unauthenticated),
    ];
    for (name, token, code) in cases {
        let mut raw = RawStream::connect(&server, &server.token("alice")).await.expect("valid");
        raw.send(pb::client_frame::Frame::FreshToken(pb::FreshToken { token })).await;
        let ended = raw.until_closed().await;
        assert_eq!(ended.map(|s| s.code()), Some(code), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_one_stream_across_short_lived_tokens() {
    use std::sync::atomic::Ordering;
    let server = TestServer::start().await;
    let (provider, fresh) = cubby_tests::counting_tokens(&server, "alice", Duration::from_secs(4));
    let dir = tempfile::tempdir().expect("temp dir");
    let phone = cubby_tests::client_with_tokens(&server, dir.path(), provider).await;
    let laptop = server.device("alice").await;
    let doc = phone.create("notes").await.expect("create");
    doc.put("n", json!(0)).await.expect("put");
    phone.wait_until_synced().await.expect("synced");
    // The phone's first token was made before this, so it expires before `first_expired`.
    let first_expired = std::time::SystemTime::now() + Duration::from_secs(4);
    let last_seen = || async {
        let devices = laptop.client.devices().await.expect("devices");
        let phone = devices.iter().find(|d| d.id == phone.device_id()).expect("listed");
        phone.last_seen_ms
    };
    let connected = last_seen().await;

    cubby_tests::eventually("the phone renewed its token three times", || async {
        fresh.load(Ordering::SeqCst) >= 3 && std::time::SystemTime::now() > first_expired
    })
    .await;
    doc.put("n", json!(1)).await.expect("put");
    cubby_tests::eventually("the laptop has the phone's edit", || async {
        laptop.client.open(doc.id()).await.is_ok_and(|d| d.to_json()["n"] == json!(1))
    })
    .await;
    // A reconnect would have recorded the device as seen again.
    assert_eq!(last_seen().await, connected, "the phone reconnected");
}
