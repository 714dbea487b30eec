//! The real `cubby-server` binary, started the way the README says.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cubby_proto::pb;

mod common;

use common::{BIN, Running, channel, free_port, started, synced, with_token};

/// Starts the binary in `dir` with the README's defaults (port 0 instead of 7443, so tests can
/// run side by side) and returns it with the lines it printed up to the dev-tenant hint.
fn start_in(dir: &Path) -> (Running, Vec<String>) {
    let child = Command::new(BIN)
        .current_dir(dir)
        .env("CUBBY_LISTEN", "127.0.0.1:0")
        .env_remove("CUBBY_CONFIG")
        .env_remove("CUBBY_DATA")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    started(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_command_starts_a_tls_server_that_answers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut server, lines) = start_in(dir.path());
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("cubby-server listening on https://"))
        .expect("prints its https address")
        .to_owned();
    let cert = dir.path().join("cubby-data/tls/cert.pem");
    assert!(
        lines.iter().any(|l| l.contains("self-signed TLS certificate") && l.contains("cert.pem"))
    );
    assert!(lines.iter().any(|l| l == "data: ./cubby-data"), "says where the data is: {lines:?}");
    assert!(lines.iter().any(|l| l == "tenants: development"), "and whom it trusts: {lines:?}");
    assert!(dir.path().join("cubby-data/master.key").exists());

    let token = Command::new(BIN)
        .current_dir(dir.path())
        .args(["dev-token", "--data", "./cubby-data", "--customer", "alice", "--ttl", "10m"])
        .output()
        .expect("dev-token runs");
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).expect("utf-8").trim().to_owned();

    let mut account = pb::account_client::AccountClient::new(channel(&cert, &addr).await);
    let mut request = tonic::Request::new(pb::CreateDocumentRequest { title: "hello".into() });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("header"));
    let created = account.create_document(request).await.expect("the server answers").into_inner();
    assert_eq!(created.title, "hello");
    let unauthenticated =
        account.list_documents(pb::ListDocumentsRequest {}).await.expect_err("no token");
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    // SIGTERM (what systemd sends) shuts it down cleanly.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

/// Runs the binary with a config file (in `dir`) naming `data` and `master_key`.
fn run_configured(dir: &Path, data: &Path, master_key: &Path) -> std::process::Output {
    let config = dir.join("cubby.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata = \"{}\"\nmaster_key_file = \"{}\"\ndev_tenant = true\n",
        data.display(),
        master_key.display()
    );
    std::fs::write(&config, text).expect("write config");
    Command::new(BIN).arg("--config").arg(&config).output().expect("runs")
}

#[test]
fn row_25_configured_server_without_its_master_key_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run_configured(dir.path(), &dir.path().join("data"), &dir.path().join("missing.key"));
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: a supervisor does not retry it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("master key file") && stderr.contains("missing.key"), "{stderr}");
    assert!(stderr.contains("cubby-server keys create --out"), "says how to make one: {stderr}");
    assert!(!dir.path().join("data/db").exists(), "nothing was written without a key");
}

#[test]
fn row_25_wrong_master_key_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, _) = start_in(dir.path());
    drop(server);
    let other_key = dir.path().join("other.key");
    let created =
        Command::new(BIN).args(["keys", "create", "--out"]).arg(&other_key).output().expect("runs");
    assert!(created.status.success());
    let out = run_configured(dir.path(), &dir.path().join("cubby-data"), &other_key);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: a supervisor does not retry it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("master key does not match"), "{stderr}");
}

fn run_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).current_dir(dir).args(args).output().expect("the binary runs")
}

/// An account client for the binary started in `dir`, and a fresh token for `alice`.
async fn alice_account(
    dir: &Path,
    lines: &[String],
) -> (pb::account_client::AccountClient<tonic::transport::Channel>, String) {
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("cubby-server listening on https://"))
        .expect("prints its https address");
    let token = run_in(dir, &["dev-token", "--customer", "alice"]);
    let token = String::from_utf8(token.stdout).expect("utf-8").trim().to_owned();
    let channel = channel(&dir.join("cubby-data/tls/cert.pem"), addr).await;
    (pb::account_client::AccountClient::new(channel), token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_and_retire_through_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, lines) = start_in(dir.path());
    let (mut account, token) = alice_account(dir.path(), &lines).await;
    let request = with_token(pb::CreateDocumentRequest { title: "kept".into() }, &token);
    account.create_document(request).await.expect("creates");
    drop(server);

    let rotated = run_in(dir.path(), &["keys", "rotate"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert!(String::from_utf8_lossy(&rotated.stdout).contains("added key-encryption key 2"));
    // Nothing re-wrapped yet (the server is down), and 2 is the current generation.
    for (generation, why) in [("1", "still wrapped"), ("2", "current one"), ("7", "no key")] {
        let out = run_in(dir.path(), &["keys", "retire", generation]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why) && stderr.lines().count() == 1, "{stderr}");
    }
    // A start finishes the rotation in the background; generation 1 retires once it is done
    // (while the server runs), and the data still reads.
    let (server, _) = start_in(dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let retired = run_in(dir.path(), &["keys", "retire", "1"]);
        if retired.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&retired.stderr);
        assert!(stderr.contains("still wrapped") && Instant::now() < deadline, "{stderr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(server);
    let (_server, lines) = start_in(dir.path());
    let (mut account, token) = alice_account(dir.path(), &lines).await;
    let docs = account
        .list_documents(with_token(pb::ListDocumentsRequest {}, &token))
        .await
        .expect("reads with generation 2 alone")
        .into_inner()
        .documents;
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].title, "kept");
}

/// Under a low descriptor limit (256 here), connections are capped below it (192), and a flood
/// of real HTTP/2 connections past that uses up the descriptors while those over the cap are
/// told so: `accept` then fails until some close. The server backs off (its log says so at
/// most about once a second, where it used to spin logging tens of MiB a second), a client
/// that gets in meanwhile is refused UNAVAILABLE with the reason, and once the flood leaves a
/// real client is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_and_the_server_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr.log");
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" 2>\"$1\"")
        .arg(BIN)
        .arg(&log)
        .current_dir(dir.path())
        .env("CUBBY_LISTEN", "127.0.0.1:0")
        .env_remove("CUBBY_CONFIG")
        .env_remove("CUBBY_DATA")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let (_server, lines) = started(child);
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("cubby-server listening on https://"))
        .expect("prints its https address")
        .to_owned();
    let cert = dir.path().join("cubby-data/tls/cert.pem");
    let failures = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().filter(|l| l.contains("accepting connections failed")).count()
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&cert).expect("cert")),
        ))
        .expect("tls")
        .connect_timeout(Duration::from_secs(2));

    let started_at = Instant::now();
    let connecting = (0..320).map(|_| endpoint.connect());
    let flood: Vec<_> = futures_util::future::join_all(connecting).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures() == 0 {
        assert!(
            Instant::now() < deadline,
            "the flood never exhausted the descriptors: {} connected; log: {}",
            flood.iter().filter(|c| c.is_ok()).count(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once those over the cap are closed (five seconds after they came), the server accepts
    // again, and tells a newcomer why it cannot serve it.
    let (mut account, token) = alice_account(dir.path(), &lines).await;
    let request = || with_token(pb::ListDocumentsRequest {}, &token);
    let refused = account.list_documents(request()).await.expect_err("over the cap");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("connection limit"), "{refused:?}");

    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (mut account, _) = alice_account(dir.path(), &lines).await;
        if account.list_documents(request()).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the server does not serve again after the flood");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started_at.elapsed().as_secs() as usize;
    let logged = failures();
    assert!(logged <= seconds + 2, "{logged} accept failures logged in {seconds} s");
}

/// The binary, to serve the data directory in `dir` on `port` in development mode.
fn serving(dir: &Path, port: u16) -> Command {
    let mut command = Command::new(BIN);
    command
        .current_dir(dir)
        .env("CUBBY_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("CUBBY_CONFIG")
        .env_remove("CUBBY_DATA");
    command
}

/// The binary serving the data directory in `dir` on `port`.
fn serve_on(dir: &Path, port: u16) -> Running {
    let child = serving(dir, port)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    started(child).0
}

/// Stops the binary as systemd would (SIGTERM) and waits for it to exit.
fn stop(mut server: Running) {
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A device of `customer` with its local data in `home`, syncing with the binary in `dir` on
/// `port`.
async fn device_of(dir: &Path, port: u16, customer: &str, home: &Path) -> cubby_client::Client {
    let token = run_in(dir, &["dev-token", "--customer", customer]);
    let token = String::from_utf8(token.stdout).expect("utf-8").trim().to_owned();
    cubby_client::Client::builder()
        .with_data_dir(home)
        .with_local_key([7; 32])
        .with_server(format!("https://127.0.0.1:{port}"))
        .with_ca_pem(std::fs::read(dir.join("cubby-data/tls/cert.pem")).expect("cert"))
        .with_token_provider(cubby_client::StaticToken::new(token))
        .build()
        .await
        .expect("the client builds")
}

/// The JSON of every document `client` holds, by title.
async fn contents(
    client: &cubby_client::Client,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut all = std::collections::BTreeMap::new();
    for (id, meta) in client.list().await.expect("lists") {
        all.insert(meta.title, client.open(id).await.expect("opens").to_json());
    }
    all
}

/// Issue 24, rows 1 and 2: a store found behind what the server acknowledged, by a flipped bit
/// in sled's log (which sled takes for the end of its log) or by a backup put back by hand, is
/// refused at start with a message naming the way out; `cubby-server restore` accepts it and
/// starts a new epoch; the devices that connect offer back everything they hold, so a new
/// device then gets every acknowledged change. Row 3: a revocation and an erasure made after the
/// backup stay in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_is_refused_until_accepted_and_then_the_devices_bring_back_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (dir, port) = (dir.path(), free_port());
    let homes = tempfile::tempdir().expect("temp dir");
    let home = |name: &str| homes.path().join(name);
    let server = serve_on(dir, port);

    let phone = device_of(dir, port, "alice", &home("phone")).await;
    let tablet = device_of(dir, port, "alice", &home("tablet")).await;
    let bob = device_of(dir, port, "bob", &home("bob")).await;
    let notes = phone.create("notes").await.expect("create");
    notes.put("before", serde_json::json!(1)).await.expect("put");
    bob.create("bob's").await.expect("create").put("k", serde_json::json!(1)).await.expect("put");
    for device in [&phone, &tablet, &bob] {
        synced(device).await;
    }
    let (tablet_id, notes_id) = (tablet.device_id(), notes.id());
    drop(notes); // A handle keeps its client's store open.
    for device in [phone, tablet, bob] {
        device.shutdown().await;
    }
    stop(server);
    let backup = homes.path().join("backup-of-db");
    common::copy_tree(&dir.join("cubby-data/db"), &backup);

    // After the backup: a field and three documents, acknowledged; a revocation; an erasure.
    let server = serve_on(dir, port);
    let phone = device_of(dir, port, "alice", &home("phone")).await;
    let notes = phone.open(notes_id).await.expect("opens");
    notes.put("after", serde_json::json!(2)).await.expect("put");
    drop(notes);
    for n in 0..3 {
        let doc = phone.create(&format!("new {n}")).await.expect("create");
        doc.put("n", serde_json::json!(n)).await.expect("put");
    }
    synced(&phone).await;
    let acknowledged = contents(&phone).await;
    assert_eq!(acknowledged.len(), 4);
    phone.revoke_device(tablet_id).await.expect("revokes the tablet");
    let bob = device_of(dir, port, "bob", &home("bob")).await;
    bob.delete_account().await.expect("bob erases his account");
    phone.shutdown().await;
    drop(bob);
    stop(server);

    // The backup, put back by hand: refused, saying what to do.
    std::fs::remove_dir_all(dir.join("cubby-data/db")).expect("rm");
    common::copy_tree(&backup, &dir.join("cubby-data/db"));
    let refused = serving(dir, port).output().expect("runs");
    assert!(!refused.status.success(), "a rolled-back store must not be served");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("acknowledged") && stderr.contains("cubby-server restore"), "{stderr}");

    // The operator accepts it: a new epoch.
    let restored = run_in(dir, &["restore"]);
    assert!(restored.status.success(), "{}", String::from_utf8_lossy(&restored.stderr));
    assert!(String::from_utf8_lossy(&restored.stdout).contains("new epoch"));
    let _server = serve_on(dir, port);

    // The phone connects and offers back everything it holds; a new device gets all of it.
    let phone = device_of(dir, port, "alice", &home("phone")).await;
    synced(&phone).await;
    let fresh = device_of(dir, port, "alice", &home("fresh")).await;
    synced(&fresh).await;
    assert_eq!(contents(&fresh).await, acknowledged, "every acknowledged change is back");

    // The revoked tablet stays revoked, and is told to wipe when it comes back.
    let listed = phone.devices().await.expect("devices");
    let tablet = listed.iter().find(|d| d.id == tablet_id).expect("the tablet is listed");
    assert!(tablet.revoked_ms.is_some(), "a restore does not un-revoke a device");
    let tablet = device_of(dir, port, "alice", &home("tablet")).await;
    let failure = tablet.wait_until_synced().await.expect_err("refused");
    assert!(matches!(failure, cubby_client::SyncFailure::Wipe(_)), "{failure:?}");
    // Bob stays erased: his token is refused, and his key is gone from the disk again.
    let bob = device_of(dir, port, "bob", &home("bob-again")).await;
    let failure = bob.wait_until_synced().await.expect_err("erased");
    assert!(matches!(failure, cubby_client::SyncFailure::Wipe(_)), "{failure:?}");
    let keys = std::fs::read_dir(dir.join("cubby-data/db/keys")).expect("keys").count();
    assert_eq!(keys, 2, "the store's key check and alice's: bob's key was destroyed again");
}

/// Issue 24, row 1: one flipped bit in sled's log loses everything after it (sled takes a bad
/// checksum for the end of its log, and says nothing). The server notices at start and refuses
/// to serve the store; accepted with `cubby-server restore`, it gets back from the device
/// everything the damage took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_the_sled_log_is_refused_at_start_and_the_device_brings_back_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (dir, port) = (dir.path(), free_port());
    let homes = tempfile::tempdir().expect("temp dir");
    let server = serve_on(dir, port);
    let phone = device_of(dir, port, "alice", &homes.path().join("phone")).await;
    for n in 0..20 {
        let doc = phone.create(&format!("doc {n}")).await.expect("create");
        doc.put("n", serde_json::json!(n)).await.expect("put");
        synced(&phone).await;
    }
    let acknowledged = contents(&phone).await;
    phone.shutdown().await;
    stop(server);

    let log = dir.join("cubby-data/db/sled/db");
    let mut bytes = std::fs::read(&log).expect("the log");
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 1;
    std::fs::write(&log, bytes).expect("flip one bit");
    let refused = serving(dir, port).output().expect("runs");
    assert!(!refused.status.success(), "the damaged store is not served");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cubby-server restore"));

    assert!(run_in(dir, &["restore"]).status.success());
    let _server = serve_on(dir, port);
    let phone = device_of(dir, port, "alice", &homes.path().join("phone")).await;
    synced(&phone).await;
    let laptop = device_of(dir, port, "alice", &homes.path().join("laptop")).await;
    synced(&laptop).await;
    assert_eq!(contents(&laptop).await, acknowledged, "the device brought back what was lost");
}

/// Issue 24: a store put back whole from a backup, witness and all, is not noticed at start;
/// once other devices have written past what this device saw, neither is it noticed when the
/// device connects. The device learns it only when the server answers `NOT_FOUND` for a
/// document it holds: it keeps the document (never taking "not found" for a deletion), and
/// offers it back with its changes, once a fresh catch-up shows no deletion of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_the_server_lost_unnoticed_is_offered_back_not_deleted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (dir, port) = (dir.path(), free_port());
    let homes = tempfile::tempdir().expect("temp dir");
    let home = |name: &str| homes.path().join(name);
    let server = serve_on(dir, port);
    let phone = device_of(dir, port, "alice", &home("phone")).await;
    phone.create("kept").await.expect("create").put("k", serde_json::json!(1)).await.expect("put");
    synced(&phone).await;
    phone.shutdown().await;
    stop(server);
    let backup = homes.path().join("backup-of-everything");
    common::copy_tree(&dir.join("cubby-data"), &backup);

    let server = serve_on(dir, port);
    let phone = device_of(dir, port, "alice", &home("phone")).await;
    let late = phone.create("late").await.expect("create");
    late.put("before", serde_json::json!(1)).await.expect("put");
    let late_id = late.id();
    drop(late);
    synced(&phone).await;
    phone.shutdown().await;
    stop(server);

    // The whole data directory put back, witness included: nothing to notice at start.
    std::fs::remove_dir_all(dir.join("cubby-data")).expect("rm");
    common::copy_tree(&backup, &dir.join("cubby-data"));
    let _server = serve_on(dir, port);
    let laptop = device_of(dir, port, "alice", &home("laptop")).await;
    for n in 0..5 {
        let doc = laptop.create(&format!("laptop {n}")).await.expect("create");
        doc.put("n", serde_json::json!(n)).await.expect("put");
    }
    synced(&laptop).await;

    // The phone's cursor is behind the server's head now, so its hello says nothing amiss; its
    // edit to the lost document is answered `NOT_FOUND`.
    let phone = device_of(dir, port, "alice", &home("phone")).await;
    let mut events = phone.events();
    synced(&phone).await;
    let late = phone.open(late_id).await.expect("the phone still holds it");
    late.put("after", serde_json::json!(2)).await.expect("put");
    synced(&phone).await;
    drop(late);
    assert!(phone.take_discarded().await.expect("discarded").is_empty(), "nothing discarded");
    while let Ok((id, event)) = events.try_recv() {
        assert!(
            !(id == late_id && matches!(event, cubby_client::DocEvent::Deleted { .. })),
            "the phone took NOT_FOUND for a deletion"
        );
    }
    let want = serde_json::json!({ "before": 1, "after": 2 });
    assert_eq!(contents(&phone).await.get("late"), Some(&want), "the phone keeps it");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        synced(&laptop).await;
        if contents(&laptop).await.get("late") == Some(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "the lost document never came back to the server");
        let mut status = laptop.status();
        let _ = tokio::time::timeout(Duration::from_secs(1), status.changed()).await;
    }
}

/// Issue 26, part 5: with a config file, `--data` still chooses the data directory, every
/// setting can come from the environment over the file (a duration as people write it), and
/// `dev-token` reads the development tenant's key where the settings say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_config_file_the_flags_and_the_environment_still_choose() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    assert!(run_in(dir, &["keys", "create", "--out", "master.key"]).status.success());
    let config = "master_key_file = \"master.key\"\ndata = \"from-the-file\"\nlisten = \
                  \"127.0.0.1:1\"\n[limits]\nslow_consumer_secs = 30\n";
    std::fs::write(dir.join("cubby.toml"), config).expect("write the config");
    let child = Command::new(BIN)
        .current_dir(dir)
        .args(["--config", "cubby.toml", "--data", "from-the-flag"])
        .env("CUBBY_LISTEN", "127.0.0.1:0")
        .env("CUBBY_DEV_TENANT", "true")
        .env("CUBBY_LIMITS_SLOW_CONSUMER_SECS", "2m")
        .env_remove("CUBBY_DATA")
        .env_remove("CUBBY_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let (mut server, lines) = started(child);
    assert!(dir.join("from-the-flag/db").is_dir(), "{lines:?}");
    assert!(!dir.join("from-the-file").exists(), "--data wins over the file");

    // dev-token, given the same config and flag, signs with the tenant key the server uses.
    let token = Command::new(BIN)
        .current_dir(dir)
        .args(["--config", "cubby.toml", "--data", "from-the-flag", "dev-token", "--customer"])
        .arg("alice")
        .env("CUBBY_DEV_TENANT", "true")
        .output()
        .expect("runs");
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).expect("utf-8");
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("cubby-server listening on https://"))
        .expect("prints its https address");
    let ca = std::fs::read(dir.join("from-the-flag/tls/cert.pem")).expect("its certificate");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connects");
    let mut account = pb::account_client::AccountClient::new(channel);
    let mut request = tonic::Request::new(pb::ListDocumentsRequest {});
    let bearer = format!("Bearer {}", token.trim()).parse().expect("header");
    request.metadata_mut().insert("authorization", bearer);
    account.list_documents(request).await.expect("the server takes the token");

    // A misspelt setting is named, not ignored.
    let refused = Command::new(BIN)
        .current_dir(dir)
        .args(["--config", "cubby.toml", "dev-token", "--customer", "alice"])
        .env("CUBBY_LIMITS_SLOW_CONSUMER_SEC", "2m")
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("CUBBY_LIMITS_SLOW_CONSUMER_SEC"));
    let _ = server.0.kill();
}

/// Issue 26, part 6: `cubby-server backup` while the server runs and a device writes, restored
/// into a new directory: every change acknowledged before the backup is in it, and the device
/// brings back the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_write_load_restores_into_a_new_directory_and_devices_heal_the_rest() {
    let (old, new) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (old, new, port) = (old.path(), new.path(), free_port());
    let homes = tempfile::tempdir().expect("temp dir");
    let server = serve_on(old, port);
    let phone = device_of(old, port, "alice", &homes.path().join("phone")).await;
    let doc = phone.create("counter").await.expect("create");
    for n in 1..=20 {
        doc.put("n", serde_json::json!(n)).await.expect("put");
    }
    synced(&phone).await;
    let id = doc.id();

    // The phone keeps writing while the backup is made.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (writing, written) =
        (std::sync::Arc::new(AtomicBool::new(true)), std::sync::Arc::new(AtomicU64::new(20)));
    let writer = {
        let (writing, written) = (writing.clone(), written.clone());
        tokio::spawn(async move {
            let mut n = 20;
            while writing.load(Ordering::SeqCst) {
                n += 1;
                doc.put("n", serde_json::json!(n)).await.expect("put");
                written.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    synced(&phone).await;
    let acknowledged = phone.open(id).await.expect("opens").to_json()["n"].as_u64().expect("n");
    assert!(acknowledged >= 20);
    let file = homes.path().join("cubby.backup");
    let dir = old.to_path_buf();
    let made = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            run_in(&dir, &["backup", "--out", file.to_str().expect("utf-8")])
        })
        .await
        .expect("ran")
    };
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    assert!(String::from_utf8_lossy(&made.stdout).contains("restore --from"));
    // Writes go on after the backup, which the restored server will lack.
    let deadline = Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::SeqCst) < acknowledged + 20 {
        assert!(Instant::now() < deadline, "the writer stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writing.store(false, Ordering::SeqCst);
    let last = writer.await.expect("the writer ends");
    synced(&phone).await;

    // Nothing in the archive is readable without the master key: no plaintext of the
    // document's title.
    let archive = std::fs::read(&file).expect("the archive");
    assert!(!archive.windows(b"counter".len()).any(|w| w == b"counter"), "sealed as the store");

    // Restored into a new directory that has the master key (and, for the devices, the same
    // certificate and development tenant), then served where the old server was.
    let data = new.join("cubby-data");
    std::fs::create_dir_all(&data).expect("mkdir");
    for name in ["master.key", "dev-tenant.key"] {
        std::fs::copy(old.join("cubby-data").join(name), data.join(name)).expect("copy");
    }
    common::copy_tree(&old.join("cubby-data/tls"), &data.join("tls"));
    let restored = run_in(new, &["restore", "--from", file.to_str().expect("utf-8")]);
    assert!(restored.status.success(), "{}", String::from_utf8_lossy(&restored.stderr));
    stop(server);
    let _server = serve_on(new, port);

    // A new device sees at least what was acknowledged before the backup began...
    let fresh = device_of(new, port, "alice", &homes.path().join("fresh")).await;
    synced(&fresh).await;
    let held = fresh.open(id).await.expect("the document is in the backup").to_json()["n"]
        .as_u64()
        .expect("n");
    assert!(held >= acknowledged, "the backup holds {held}, {acknowledged} was acknowledged");
    // ...and everything once the phone, which holds the rest, has reconnected.
    synced(&phone).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        synced(&fresh).await;
        let now = fresh.open(id).await.expect("opens").to_json()["n"].as_u64();
        if now == Some(last) {
            break;
        }
        assert!(Instant::now() < deadline, "the fresh device has {now:?}, not {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 26, part 3: `--log-format json` writes one JSON object per line; a call's lines carry
/// its method and request id (the caller's); a refusal is logged at INFO with its reason; no
/// token or subject appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_each_call_its_request_id_and_customer_and_never_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--log-format", "json"])
        .env("CUBBY_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env_remove("CUBBY_CONFIG")
        .env_remove("CUBBY_DATA")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stderr = child.stderr.take().expect("piped");
    let (tx, logged) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (_server, lines) = started(child);
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("cubby-server listening on https://"))
        .expect("its address")
        .to_owned();
    let token = run_in(dir.path(), &["dev-token", "--customer", "alice-the-subject"]);
    let token = String::from_utf8(token.stdout).expect("utf-8").trim().to_owned();
    let mut account = pb::account_client::AccountClient::new(
        channel(&dir.path().join("cubby-data/tls/cert.pem"), &addr).await,
    );
    let mut listed = with_token(pb::ListDocumentsRequest {}, &token);
    listed.metadata_mut().insert("x-request-id", "req-ok-1".parse().expect("header"));
    account.list_documents(listed).await.expect("alice lists her documents");
    let forged = format!("{token}x");
    let mut refused = with_token(pb::ListDocumentsRequest {}, &forged);
    refused.metadata_mut().insert("x-request-id", "req-refused-1".parse().expect("header"));
    let status = account.list_documents(refused).await.expect_err("a bad signature");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // Read the log until the refusal's line, every line JSON.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let refusal = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = logged.recv_timeout(left).unwrap_or_else(|_| panic!("no refusal in {seen:#?}"));
        let entry: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(!line.contains(&token) && !line.contains("alice-the-subject"), "{line}");
        seen.push(entry.clone());
        if entry["fields"]["message"] == "rpc refused" {
            break entry;
        }
    };
    assert_eq!(refusal["level"], "INFO");
    assert_eq!(refusal["span"]["request_id"], "req-refused-1", "{refusal}");
    assert_eq!(refusal["span"]["method"], "/cubby.v1.Account/ListDocuments");
    assert_eq!(refusal["fields"]["code"], "Unauthenticated");
    assert!(refusal["fields"]["reason"].as_str().is_some_and(|r| r.contains("invalid token")));
}
