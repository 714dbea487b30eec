//! A tenant whose keys come from a real OpenID provider (`oidc-provider`, see `tests/idp/`):
//! found by discovery over HTTPS, picked up again when the provider rotates its signing key
//! in the middle of live sync, and kept while the provider is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cubby_proto::pb;
use cubby_tests::idp::{self, Provider};
use cubby_tests::{TestServer, authed, client_with_tokens, eventually};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape of the server's metrics.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("sends");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    response
}

/// The value of the sample `name` (labels as written) in a scrape, 0 when absent.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_an_openid_provider_survive_its_key_rotation_and_its_outage() {
    let mut provider = Provider::start().await;
    let idp = provider.client();
    let tenant: cubby_server::TenantConfig =
        toml::from_str(&provider.tenant_toml("acme")).expect("a tenant");
    let server = TestServer::start_with(move |config| {
        config.tenants.push(tenant);
        // A token naming an unknown key may have keys fetched again every second (not every
        // minute), so that the outage below is noticed quickly.
        config.limits.jwks_min_refresh_secs = 1;
        config.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let metrics = server.running().metrics_addr().expect("metrics on");
    assert!(idp.jwks_fetches().await >= 1, "the server found the keys by discovery");

    // Two devices of the provider's client `alice` sync live; the phone keeps writing.
    let dirs = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let phone = client_with_tokens(&server, dirs.0.path(), idp.tokens("alice")).await;
    let laptop = client_with_tokens(&server, dirs.1.path(), idp.tokens("alice")).await;
    let doc = phone.create("Counter").await.expect("create");
    let id = doc.id();
    let (written, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                doc.put("n", json!(n)).await.expect("a local write");
                written.store(n, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            doc
        })
    };
    eventually("the laptop follows the phone", || async {
        laptop.open(id).await.is_ok_and(|d| d.to_json()["n"].as_u64().unwrap_or(0) >= 5)
    })
    .await;

    // The provider rotates to a new key of another algorithm; new tokens are signed with it.
    let old = idp.token("alice", None).await.expect("a token");
    let kid = idp.rotate("ES256").await;
    let fresh = idp.token("alice", None).await.expect("a token");
    assert_eq!(idp::header(&fresh)["kid"], json!(kid));
    assert_eq!(idp::header(&fresh)["alg"], json!("ES256"));
    assert_ne!(idp::header(&old)["kid"], json!(kid));

    // A third device connects with a token of the new key, mid-sync, and catches up.
    let dir = tempfile::tempdir().expect("dir");
    let tablet = client_with_tokens(&server, dir.path(), idp.tokens("alice")).await;
    let at_rotation = written.load(Ordering::SeqCst);
    eventually("the tablet catches up past the rotation", || async {
        tablet.open(id).await.is_ok_and(|d| d.to_json()["n"].as_u64().unwrap_or(0) > at_rotation)
    })
    .await;

    // The business's backend, with the admin scope, reads the document through the admin API.
    let service = idp.token("backend", Some(idp::ADMIN_SCOPE)).await.expect("a service token");
    let mut admin = pb::admin_client::AdminClient::new(server.channel().await);
    let alice = || pb::CustomerRequest { subject: "alice".into() };
    let listed = admin
        .list_customer_documents(authed(alice(), &service))
        .await
        .expect("the admin API takes the provider's service token");
    assert_eq!(listed.into_inner().documents.len(), 1);
    // Alice's own token, without the scope, is no service token.
    let refused = admin
        .list_customer_documents(authed(alice(), &fresh))
        .await
        .expect_err("a customer token is refused by the admin API");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    stop.store(true, Ordering::SeqCst);
    let doc = writer.await.expect("the writer ends");
    let last = written.load(Ordering::SeqCst);
    for (name, device) in [("laptop", &laptop), ("tablet", &tablet)] {
        eventually(&format!("the {name} has the last write"), || async {
            device.open(id).await.is_ok_and(|d| d.to_json()["n"] == json!(last))
        })
        .await;
    }
    assert_eq!(doc.to_json()["n"], json!(last));
    let text = scrape(metrics).await;
    assert_eq!(
        sample(&text, "cubby_tokens_refused_total{tenant=\"acme\"}"),
        0.0,
        "no token of the provider was refused through the rotation: {text}"
    );
    let failed: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("cubby_rpcs_total") && !l.contains("code=\"OK\""))
        .filter(|l| !l.contains("PermissionDenied") && !l.ends_with(" 0"))
        .collect();
    assert!(failed.is_empty(), "calls failed during the rotation: {failed:?}");

    // The provider goes down. Tokens of the keys the server holds keep working; a token of a
    // key it never saw is refused (it cannot be checked), and the failed fetch is counted.
    let before = idp.token("bob", None).await.expect("a token for bob");
    provider.stop();
    let mut account = pb::account_client::AccountClient::new(server.channel().await);
    account
        .list_devices(authed(pb::ListDevicesRequest::default(), &before))
        .await
        .expect("a token of a held key is accepted while the provider is down");
    let forged = forged_token(&provider.issuer);
    eventually("a fetch for an unknown key fails, and is counted", || async {
        let mut account = pb::account_client::AccountClient::new(server.channel().await);
        let refused = account
            .list_devices(authed(pb::ListDevicesRequest::default(), &forged))
            .await
            .expect_err("an unknown key fails closed");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        sample(&scrape(metrics).await, "cubby_jwks_failures_total{tenant=\"acme\"}") >= 1.0
    })
    .await;
    account
        .list_devices(authed(pb::ListDevicesRequest::default(), &before))
        .await
        .expect("and still accepted after failed fetches");
}

/// A well-formed token claiming the provider's issuer, signed by a key it never published.
fn forged_token(issuer: &str) -> String {
    let signer =
        cubby_crypto::signing::TokenSigner::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("a key");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    signer.sign_jwt(&json!({
        "iss": issuer, "aud": idp::AUDIENCE, "sub": "mallory", "exp": now + 300,
    }))
}
