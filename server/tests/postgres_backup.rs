//! Backups of a PostgreSQL deployment with PostgreSQL's own tools, as the README's procedure
//! says: `pg_dump`, a restore into a new database, `cubby-server restore` (a new epoch), and
//! the devices bring back what the backup lacks. And crypto-shredding that holds in backups: a
//! dump taken before an erasure, restored after the key procedure (rotate, wait for the
//! re-wrap, retire the old generation), opens nothing of the erased customer.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Postgres, Running, channel, free_port, started, synced, with_token};
use cubby_proto::pb;
use serde_json::json;

/// The binary with `args`, on the node's data directory and database.
fn run(data: &Path, url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data")
        .arg(data)
        .env("CUBBY_DATABASE_URL", url)
        .env_remove("CUBBY_CONFIG")
        .output()
        .expect("the binary runs")
}

fn serve(data: &Path, port: u16, url: &str) -> Running {
    let child = Command::new(BIN)
        .arg("--data")
        .arg(data)
        .env("CUBBY_LISTEN", format!("127.0.0.1:{port}"))
        .env("CUBBY_DATABASE_URL", url)
        // Key changes are picked up (and data keys re-wrapped) within a second.
        .env("CUBBY_LIMITS_KEY_RELOAD_SECS", "1")
        .env_remove("CUBBY_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    started(child).0
}

fn token(data: &Path, url: &str, customer: &str) -> String {
    let out = run(data, url, &["dev-token", "--customer", customer]);
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

async fn device(data: &Path, port: u16, url: &str, customer: &str) -> cubby_client::Client {
    let home = tempfile::tempdir().expect("home").keep();
    cubby_client::Client::builder()
        .with_data_dir(home)
        .with_local_key([7; 32])
        .with_server(format!("https://127.0.0.1:{port}"))
        .with_ca_pem(std::fs::read(data.join("tls/cert.pem")).expect("cert"))
        .with_token_provider(cubby_client::StaticToken::new(token(data, url, customer)))
        .build()
        .await
        .expect("the client builds")
}

/// Retires KEK `generation` as soon as the running node has re-wrapped every data key with the
/// newer one (`keys retire` refuses until then).
async fn retire(data: &Path, url: &str, generation: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let retired = run(data, url, &["keys", "retire", &generation.to_string()]);
        if retired.status.success() {
            return;
        }
        let said = String::from_utf8_lossy(&retired.stderr);
        assert!(Instant::now() < deadline, "generation {generation} never retired: {said}");
        assert!(said.contains("still wrapped"), "refused only while keys remain: {said}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads document `id` as `customer` through the Account API.
async fn read(
    data: &Path,
    port: u16,
    url: &str,
    customer: &str,
    id: &[u8],
) -> Result<String, tonic::Status> {
    let channel = channel(&data.join("tls/cert.pem"), &format!("127.0.0.1:{port}")).await;
    let mut account = pb::account_client::AccountClient::new(channel);
    let request = pb::GetDocumentRequest { doc_id: id.to_vec() };
    let answer = account.get_document(with_token(request, &token(data, url, customer))).await?;
    Ok(answer.into_inner().json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_restores_and_devices_heal_it_and_a_dump_from_before_an_erasure_opens_nothing_after_the_key_procedure()
 {
    let postgres = Postgres::start();
    let url = postgres.url();
    let root = tempfile::tempdir().expect("temp dir");
    let data = root.path().join("node");
    let port = free_port();
    let node = serve(&data, port, &url);
    // Setup, once: no data key stays wrapped by generation 1, which derives from the root
    // secret and so can never be destroyed.
    let rotated = run(&data, &url, &["keys", "rotate"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    retire(&data, &url, 1).await;

    let alice = device(&data, port, &url, "alice").await;
    let bob = device(&data, port, &url, "bob").await;
    let alice_doc = alice.create("alice's").await.expect("create");
    alice_doc.put("note", json!("alice's secret")).await.expect("put");
    let bob_doc = bob.create("bob's").await.expect("create");
    bob_doc.put("note", json!("bob's secret")).await.expect("put");
    synced(&alice).await;
    synced(&bob).await;

    // The backup taken before bob's erasure.
    let before = root.path().join("before.sql");
    postgres.client("pg_dump", &["--no-owner", "--file", &before.to_string_lossy(), &url]);

    bob.delete_account().await.expect("bob erases his account");
    // The procedure: a new generation, every data key re-wrapped with it by the running node,
    // then the old one retired (refused while a key is still wrapped with it).
    let rotated = run(&data, &url, &["keys", "rotate"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    retire(&data, &url, 2).await;

    // The backup taken after the procedure; then alice writes on.
    let after = root.path().join("after.sql");
    postgres.client("pg_dump", &["--no-owner", "--file", &after.to_string_lossy(), &url]);
    alice_doc.put("late", json!("written after the backup")).await.expect("put");
    synced(&alice).await;
    drop(node);

    // The dump from before the erasure, restored into a new database with the master key as it
    // is now: nothing in it opens, bob's key and documents least of all.
    let restored = postgres.url_of("before_erasure");
    postgres.client("psql", &["-q", "-c", "CREATE DATABASE before_erasure", &url]);
    postgres.client(
        "psql",
        &["-q", "-v", "ON_ERROR_STOP=1", "-f", &before.to_string_lossy(), &restored],
    );
    let refused = run(&data, &restored, &["restore"]);
    assert!(!refused.status.success(), "the old dump opened");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("master key"), "refused for its keys: {said}");

    // The dump from after it: restored, accepted in a new epoch, and served.
    let restored = postgres.url_of("after_erasure");
    postgres.client("psql", &["-q", "-c", "CREATE DATABASE after_erasure", &url]);
    postgres.client(
        "psql",
        &["-q", "-v", "ON_ERROR_STOP=1", "-f", &after.to_string_lossy(), &restored],
    );
    let accepted = run(&data, &restored, &["restore"]);
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    let _node = serve(&data, port, &restored);
    // Alice's device reconnects by itself, hears the new epoch and offers back what the backup
    // lacks; a new device of hers then gets all of it.
    synced(&alice).await;
    let laptop = device(&data, port, &restored, "alice").await;
    synced(&laptop).await;
    let id = alice_doc.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = laptop.open(id).await.map(|doc| doc.to_json()).ok();
        if held.as_ref().is_some_and(|json| json == &alice_doc.to_json()) {
            break;
        }
        assert!(Instant::now() < deadline, "the laptop never got alice's document: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = laptop.wait_until_synced().await;
    }
    // Bob stays erased.
    let gone = read(&data, port, &restored, "bob", bob_doc.id().as_bytes()).await;
    assert_eq!(gone.expect_err("erased").code(), tonic::Code::NotFound);
}
