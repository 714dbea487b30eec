//! Who gets a connection: slow handshakes, silent connections and a full server never keep a
//! real client out for long, and a refusal says why (BAD_INPUTS row 9 and beyond).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cubby_proto::pb;
use cubby_tests::{TestServer, authed, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The start of a TLS ClientHello: a trickling client sends this a byte at a time.
const HELLO_START: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

/// Opens `n` connections that trickle a ClientHello a byte a second until dropped.
async fn tricklers(server: &TestServer, n: usize) -> tokio::task::JoinHandle<()> {
    let addr = server.url().trim_start_matches("https://").to_owned();
    let mut sockets = Vec::new();
    for _ in 0..n {
        sockets.push(tokio::net::TcpStream::connect(&addr).await.expect("the kernel accepts"));
    }
    tokio::spawn(async move {
        for byte in HELLO_START.iter().cycle() {
            for socket in &mut sockets {
                let _ = socket.write_all(&[*byte]).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// A new device's first sync, and how long it took. A connection the server closes (as it
/// does while a flood of young handshakes is past four times its limit) is retried by the
/// device, as any client would.
async fn fresh_device_syncs(server: &TestServer) -> Duration {
    let started = Instant::now();
    let device = server.device("alice").await;
    device.client.create("fresh").await.expect("create");
    while let Err(failure) = device.client.wait_until_synced().await {
        assert!(
            started.elapsed() < cubby_tests::DEADLINE,
            "a fresh client never got in: {failure}"
        );
        // Until the device tries again.
        let mut status = device.client.status();
        let retried = status.wait_for(|s| !matches!(s, cubby_client::SyncStatus::Offline { .. }));
        let _ = tokio::time::timeout(cubby_tests::DEADLINE, retried).await;
    }
    started.elapsed()
}

/// 500 connections trickling their handshakes a byte a second fill every handshake place (256),
/// and a fresh client takes the place of the oldest: it never waits for them. Run with
/// `--nocapture` for the time it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_do_not_keep_a_fresh_client_out() {
    // Handshakes are given all the time in the world: only taking their places lets a new
    // client in.
    let server = TestServer::start_with(|c| c.limits.tls_handshake_timeout_secs = 3600).await;
    let trickle = tricklers(&server, 500).await;
    let took = fresh_device_syncs(&server).await;
    println!("a fresh device synced in {took:?} beside 500 trickling handshakes");
    trickle.abort();
}

/// The same with fewer places than trickling handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_closes_the_oldest_handshake_when_all_places_are_taken() {
    let server = TestServer::start_with(|c| {
        c.limits.max_handshakes = 16;
        c.limits.tls_handshake_timeout_secs = 3600;
    })
    .await;
    let trickle = tricklers(&server, 100).await;
    let took = fresh_device_syncs(&server).await;
    println!("a fresh device synced in {took:?} with all 16 handshake places trickled");
    trickle.abort();
}

/// A TLS client config trusting the test server.
fn tls_client(server: &TestServer) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&server.ca_pem) {
        roots.add(cert.expect("a certificate")).expect("trusted");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A connection that finishes TLS and then says nothing is closed once the deadline for its
/// HTTP/2 preface passes, instead of holding a descriptor for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_the_http2_preface_is_closed() {
    let server = TestServer::start_with(|c| c.limits.tls_handshake_timeout_secs = 1).await;
    let addr = server.url().trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connects");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tls_client(&server).connect(name, tcp).await.expect("the handshake finishes");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(cubby_tests::DEADLINE, tls.read(&mut buf))
        .await
        .expect("the server closes the silent connection by itself");
    assert!(matches!(read, Ok(0) | Err(_)), "closed, not answered: {read:?}");

    // Something that is not HTTP/2 is closed at once.
    let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connects");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tls_client(&server).connect(name, tcp).await.expect("the handshake finishes");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("writes");
    let read = tokio::time::timeout(cubby_tests::DEADLINE, tls.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "closed: {read:?}");
}

/// Connections over `max_connections` are answered UNAVAILABLE with a reason, on every
/// service, and once a place is free a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_unavailable_with_the_reason() {
    let server = TestServer::start_with(|c| c.limits.max_connections = 2).await;
    let token = server.token("alice");
    let list = |channel| {
        let token = token.clone();
        async move {
            let mut account = pb::account_client::AccountClient::new(channel);
            account.list_documents(authed(pb::ListDocumentsRequest {}, &token)).await
        }
    };
    let first = server.channel().await;
    let second = server.channel().await;
    list(first.clone()).await.expect("within the cap");
    list(second.clone()).await.expect("within the cap");
    let refused = list(server.channel().await).await.expect_err("over the cap");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("connection limit"), "{refused:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let refused = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("every service refuses");
    assert_eq!(refused.code(), tonic::Code::Unavailable);

    drop((first, second));
    eventually("a place frees up once a connection closes", || async {
        list(server.channel().await).await.is_ok()
    })
    .await;
}
