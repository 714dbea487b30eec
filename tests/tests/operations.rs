//! Running Cubby as a service: what an operator scrapes and reads.

use std::net::SocketAddr;

use cubby_proto::pb;
use cubby_tests::{TestServer, authed, eventually};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs `path` from the metrics listener over plain HTTP/1.1: the status line and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("sends");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of the sample `name` (with its labels, as written) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_devices_calls_sync_traffic_and_refusals() {
    let server = TestServer::start_with(|config| {
        config.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let addr = server.running().metrics_addr().expect("metrics are served");
    let scrape = || async move {
        let (status, body) = http_get(addr, "/metrics").await;
        assert!(status.contains(" 200 "), "{status}");
        body
    };

    let phone = server.device("alice").await;
    let laptop = server.device("alice").await;
    let tablet = server.device("bob").await;
    let doc = phone.client.create("Groceries").await.expect("create");
    doc.put("milk", json!(2)).await.expect("put");
    eventually("the laptop receives the document", || async {
        laptop.client.open(doc.id()).await.is_ok_and(|d| d.to_json() == json!({"milk": 2}))
    })
    .await;

    // A call with a token no tenant issued, and one without a token at all.
    let mut account = pb::account_client::AccountClient::new(server.channel().await);
    let forged = "eyJhbGciOiJFZERTQSJ9.eyJpc3MiOiJodHRwczovL2Vsc2V3aGVyZSJ9.c2ln";
    let refused = account
        .list_devices(authed(pb::ListDevicesRequest::default(), forged))
        .await
        .expect_err("a forged token is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let listed = account
        .list_devices(authed(pb::ListDevicesRequest::default(), &server.token("alice")))
        .await
        .expect("alice lists her devices");
    assert!(listed.metadata().get("x-request-id").is_some(), "every call gets a request id");

    eventually("the scrape shows three connected devices", || async {
        sample(&scrape().await, "cubby_connected_devices") == Some(3.0)
    })
    .await;
    let text = scrape().await;
    assert!(text.ends_with("# EOF\n"), "an OpenMetrics exposition");
    assert_eq!(sample(&text, "cubby_sync_streams"), Some(3.0));
    assert!(sample(&text, "cubby_live_documents").is_some_and(|n| n >= 1.0));
    let list = "cubby_rpcs_total{method=\"/cubby.v1.Account/ListDevices\"";
    assert_eq!(sample(&text, &format!("{list},code=\"OK\"}}")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!("{list},code=\"Unauthenticated\"}}")), Some(1.0));
    assert_eq!(sample(&text, "cubby_tokens_refused_total{tenant=\"unknown\"}"), Some(1.0));
    for direction in ["received", "sent"] {
        let messages = format!("cubby_sync_messages_total{{direction=\"{direction}\"}}");
        assert!(sample(&text, &messages).is_some_and(|n| n >= 1.0), "{messages} in {text}");
        let bytes = format!("cubby_sync_bytes_total{{direction=\"{direction}\"}}");
        assert!(sample(&text, &bytes).is_some_and(|n| n > 0.0), "{bytes}");
    }
    assert!(sample(&text, "cubby_commit_batch_writes_count").is_some_and(|n| n >= 1.0));
    assert!(sample(&text, "cubby_commit_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(sample(&text, "cubby_apply_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(sample(&text, "cubby_device_connects_total").is_some_and(|n| n >= 3.0));
    assert_eq!(sample(&text, "cubby_jwks_fetches_total{tenant=\"dev\"}"), Some(0.0));
    // Nothing names a customer: neither their subject nor their keyed id.
    let alice = server.customer_id("alice").to_string();
    assert!(!text.contains("alice") && !text.contains(&alice), "no customer in the metrics");

    // A device leaving is seen at the next scrape.
    drop(tablet.close().await);
    eventually("the scrape shows two connected devices", || async {
        sample(&scrape().await, "cubby_connected_devices") == Some(2.0)
    })
    .await;
    let (status, _) = http_get(addr, "/").await;
    assert!(status.contains(" 404 "), "{status}");
}

/// A certificate for `localhost` issued by `ca`, as PEM (certificate, key).
fn issue(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("names");
    (params.signed_by(&key, ca).expect("certificate").pem(), key.serialize_pem())
}

/// The certificate the server at `addr` presents to a new connection (DER), trusting `ca_pem`.
async fn presented(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("a certificate")).expect("a root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let tls = connector.connect(name, tcp).await.expect("the handshake succeeds");
    let (_, session) = tls.get_ref();
    session.peer_certificates().expect("a certificate")[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_to_new_connections_without_a_restart() {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
    let files = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    let (first_cert, first_key) = issue(&ca);
    std::fs::write(&cert_path, &first_cert).expect("write");
    std::fs::write(&key_path, &first_key).expect("write");
    let (cert, key) = (cert_path.clone(), key_path.clone());
    let server = TestServer::start_with(move |config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.limits.cert_reload_secs = 1;
    })
    .await;
    let addr = server.running().local_addr();
    assert_eq!(presented(addr, &ca.pem()).await, der(&first_cert));
    // A device connected before the renewal stays connected through it.
    let mut account = pb::account_client::AccountClient::new(
        tonic::transport::Endpoint::from_shared(server.url())
            .expect("url")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
                    .domain_name("localhost"),
            )
            .expect("TLS")
            .connect()
            .await
            .expect("connects"),
    );
    let token = server.token("alice");
    account
        .list_devices(authed(pb::ListDevicesRequest::default(), &token))
        .await
        .expect("a call before the renewal");

    // A renewal, as certbot makes it: the certificate, then its key. (That a look between the
    // two keeps the old pair is `tls::tests`'s.)
    let (renewed_cert, renewed_key) = issue(&ca);
    std::fs::write(&cert_path, &renewed_cert).expect("write");
    std::fs::write(&key_path, &renewed_key).expect("write");
    let ca_pem = ca.pem();
    eventually("new connections get the renewed certificate", || async {
        presented(addr, &ca_pem).await == der(&renewed_cert)
    })
    .await;
    account
        .list_devices(authed(pb::ListDevicesRequest::default(), &token))
        .await
        .expect("the connection made before the renewal carries on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_by_a_limit_is_counted_by_kind() {
    let server = TestServer::start_with(|config| {
        config.limits.max_writes_per_sec = 1;
        config.limits.max_document_bytes = 64 * 1024;
        config.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let addr = server.running().metrics_addr().expect("metrics are served");
    let erin = server.device("erin").await;
    let doc = erin.client.create("fast").await.expect("create");
    // More writes than five seconds' budget, as fast as they go.
    for i in 0..12 {
        doc.put(&format!("k{i}"), json!(i)).await.expect("put");
        let _ = erin.client.wait_until_synced().await;
    }
    // And one document past its size limit.
    let big = erin.client.create("big").await.expect("create");
    big.put("blob", json!("x".repeat(100 * 1024))).await.expect("saved locally");
    eventually("both refusals are counted", || async {
        let (_, text) = http_get(addr, "/metrics").await;
        sample(&text, "cubby_quota_refusals_total{kind=\"rate\"}").is_some_and(|n| n >= 1.0)
            && sample(&text, "cubby_quota_refusals_total{kind=\"document_size\"}")
                .is_some_and(|n| n >= 1.0)
    })
    .await;
}
