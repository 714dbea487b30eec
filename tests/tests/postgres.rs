//! A server storing in PostgreSQL (`[storage] url`): what the data directory holds, and what
//! the database does.

use cubby_tests::{TestServer, eventually, postgres_database};
use serde_json::json;

/// Devices sync through a server on PostgreSQL (over verified TLS); the server's data directory
/// holds no store;
/// a restarted server, and a second node started on a copy of the data directory, serve
/// everything from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgres_keeps_every_document_in_the_database() {
    // Over TLS, verified against the test database's CA.
    let url = format!("{}?sslmode=require", postgres_database().await);
    let ca = std::env::var("CUBBY_TEST_POSTGRES_CA").expect("set with CUBBY_TEST_POSTGRES_URL");
    let mut server = TestServer::start_with(|config| {
        config.storage.url = Some(url.clone());
        config.storage.ca_file = Some(ca.into());
    })
    .await;
    let phone = server.device("alice").await;
    let doc = phone.client.create("Groceries").await.expect("created");
    doc.put("milk", json!(2)).await.expect("put");
    phone.client.wait_until_synced().await.expect("synced");
    assert!(!server.data_dir().join("db").exists(), "no embedded store in the data directory");
    assert!(!server.data_dir().join("witness").exists());

    server.restart().await;
    doc.put("eggs", json!(12)).await.expect("put");
    // The restart cut the phone's stream; it reconnects by itself.
    eventually("the phone syncs with the restarted server", || async {
        phone.client.wait_until_synced().await.is_ok()
    })
    .await;
    let laptop = server.device("alice").await;
    let id = doc.id();
    eventually("the laptop has the phone's document", || async {
        laptop.client.wait_until_synced().await.is_ok()
            && laptop.client.open(id).await.is_ok_and(|d| d.to_json() == doc.to_json())
    })
    .await;
    let bob = server.device("bob").await;
    bob.client.wait_until_synced().await.expect("synced");
    assert!(bob.client.list().await.expect("list").is_empty(), "bob sees nothing of alice's");
}

/// The server refuses to start on a database it cannot use, saying which setting to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = cubby_server::ServerConfig::dev(
        dir.path(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    config.storage.url = Some("postgresql://cubby:secret-password@127.0.0.1:9/cubby".into());
    let Err(err) = cubby_server::start(config).await else {
        panic!("a server started on an unreachable database")
    };
    let said = err.to_string();
    assert!(said.contains("PostgreSQL") && said.contains("storage.url"), "{said}");
    assert!(!said.contains("secret-password"), "the password is not repeated: {said}");
}
