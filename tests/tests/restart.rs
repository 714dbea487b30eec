//! BAD_INPUTS row 30 on a real network: the server restarts under 200 connected devices (the
//! simulation puts 1,000 through the same, `--herd 1000`). Every device reconnects with its
//! jittered backoff, and every customer's devices converge on what each wrote before and after.
//! Also: a stop with a silent device connected, and a new document whose feed entry a crash lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cubby_client::{Client, DocHandle, StaticToken};
use cubby_store::{Docs, MemoryStore};
use cubby_tests::{DEADLINE, TestServer};
use futures_util::future::join_all;

const CUSTOMERS: usize = 50;
const DEVICES_EACH: usize = 4;

async fn device(server: &TestServer, customer: usize) -> Client {
    // The devices' own storage is not under test here: keep it in memory, so 200 of them are
    // cheap. The server and the network are real.
    server
        .client_builder(StaticToken::new(server.token(&format!("herd-{customer}"))))
        .with_store(Arc::new(MemoryStore::new()))
        .build()
        .await
        .expect("client builds")
}

/// Waits until `client` holds every document of its customer, each with both writes.
async fn converged(client: &Client, docs: usize) -> bool {
    let Ok(list) = client.list().await else { return false };
    if list.len() != docs || !client.unsynced().await.is_ok_and(|u| u.is_empty()) {
        return false;
    }
    for (id, _) in list {
        let Ok(doc) = client.open(id).await else { return false };
        let json = doc.to_json();
        if json.get("before").is_none() || json.get("after").is_none() {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_30_server_restart_with_200_connected_devices_all_reconnect_and_converge() {
    let mut server = TestServer::start().await;
    let mut devices = Vec::new();
    for c in 0..CUSTOMERS {
        for _ in 0..DEVICES_EACH {
            devices.push(device(&server, c).await);
        }
    }
    let docs: Vec<DocHandle> = join_all(devices.iter().map(|client| async move {
        let doc = client.create("herd").await.expect("create");
        doc.put("before", serde_json::json!(1)).await.expect("write");
        tokio::time::timeout(DEADLINE, client.wait_until_synced())
            .await
            .expect("connected within the deadline")
            .expect("synced");
        doc
    }))
    .await;

    let restarted = Instant::now();
    server.restart().await;
    join_all(docs.iter().map(|doc| doc.put("after", serde_json::json!(2)))).await;
    let all = join_all(devices.iter().map(|client| async move {
        let deadline = Instant::now() + 3 * DEADLINE;
        while !converged(client, DEVICES_EACH).await {
            assert!(Instant::now() < deadline, "a device did not converge after the restart");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }));
    all.await;
    eprintln!(
        "{} devices reconnected and converged {:.1} s after the restart began",
        devices.len(),
        restarted.elapsed().as_secs_f64()
    );
    for client in devices {
        client.shutdown().await;
    }
}

/// A TCP relay to `server` for one connection that stops passing bytes, both ways, once
/// `freeze` says so, and keeps both sockets open: a device gone silent without closing its
/// connection (a suspended app, a dead network).
async fn freezing_relay(
    server: std::net::SocketAddr,
    freeze: tokio::sync::watch::Receiver<bool>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        let (device, _) = listener.accept().await.expect("accepts");
        let upstream = tokio::net::TcpStream::connect(server).await.expect("connects");
        let (device_rx, device_tx) = device.into_split();
        let (server_rx, server_tx) = upstream.into_split();
        tokio::join!(
            pass(device_rx, server_tx, freeze.clone()),
            pass(server_rx, device_tx, freeze),
        );
    });
    addr
}

/// Copies `from` to `to` until `freeze`, then holds both open and silent for good.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut freeze: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 16 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if to.write_all(&buf[..n]).await.is_err() { break },
            },
            () = async { drop(freeze.wait_for(|frozen| *frozen).await) } => break,
        }
    }
    std::future::pending::<()>().await;
}

/// A server stops within its shutdown grace even when a device went silent on an open stream:
/// it does not wait for that device to close its side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stops_in_time_with_a_silent_device_connected() {
    let mut server = TestServer::start_with(|c| c.limits.shutdown_grace_secs = 1).await;
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    let addr = server.url().trim_start_matches("https://").parse().expect("an address");
    let relay = freezing_relay(addr, frozen).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&server.ca_pem));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{relay}"))
        .expect("valid url")
        .tls_config(tls)
        .expect("valid TLS config")
        .connect()
        .await
        .expect("connects through the relay");
    let key =
        cubby_crypto::signing::DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("key");
    let mut raw = cubby_tests::RawStream::connect_on(
        channel,
        &server.token("alice"),
        &key,
        cubby_crypto::random_array(),
    )
    .await
    .expect("connects");
    assert!(matches!(
        raw.next().await,
        Ok(Some(cubby_proto::pb::server_frame::Frame::CaughtUp(_)))
    ));
    freeze.send_replace(true);
    tokio::time::timeout(DEADLINE, server.stop()).await.expect("the server stopped in time");
}

/// A crash can keep a new document's metadata and lose its feed entry: the sled store writes
/// them as separate inserts, metadata first (`doc_write_steps`). When its creator sends it
/// again, the server writes it again, and the customer's other devices hear of it. The document
/// is empty, so nothing else would make the server write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_document_whose_feed_entry_a_crash_lost_reaches_the_other_devices() {
    use cubby_core::DocMeta;
    use cubby_crypto::keys::{Keyring, MasterSecret};
    use cubby_store::{EncryptedStore, Store};
    let mut server = TestServer::start().await;
    let laptop = server.device("alice").await;
    let phone = server.device("alice").await;
    laptop.client.wait_until_synced().await.expect("synced");
    phone.client.wait_until_synced().await.expect("synced");
    server.stop().await;
    let doc = phone.client.create("born in a crash").await.expect("created offline");
    {
        // What the crash kept of the server's write of it: the metadata alone.
        let data = server.data_dir();
        let master = MasterSecret::read(&data.join("master.key")).expect("master key");
        let sled = cubby_store_sled::SledStore::open(&data.join("db")).expect("opens");
        let store = EncryptedStore::open(sled, Keyring::from_master(&master)).expect("key check");
        let meta = DocMeta::new("born in a crash").encode();
        let alice = server.customer_id("alice");
        store.write_doc_off_feed(&alice, &doc.id(), &meta, None).expect("write");
        store.flush().expect("flush");
    }
    server.restart().await;
    cubby_tests::eventually("the laptop hears of the phone's document", || async {
        laptop.client.open(doc.id()).await.is_ok()
    })
    .await;
    assert_eq!(laptop.client.open(doc.id()).await.expect("open").meta().title, "born in a crash");
}
