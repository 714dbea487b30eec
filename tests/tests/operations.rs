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
