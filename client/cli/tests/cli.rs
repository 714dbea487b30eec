//! The `cubby` binary against a real server: two devices of one customer, offline edits, live
//! watching, and one-line errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cubby_tests::TestServer;

const BIN: &str = env!("CARGO_BIN_EXE_cubby");

struct Device {
    home: tempfile::TempDir,
    server: String,
    token: String,
    ca: std::path::PathBuf,
}

impl Device {
    fn new(server: &TestServer, customer: &str) -> Self {
        let home = tempfile::tempdir().expect("temp dir");
        let ca = home.path().join("ca.pem");
        std::fs::write(&ca, &server.ca_pem).expect("write CA");
        Self { home, server: server.url(), token: server.token(customer), ca }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("CUBBY_SERVER", &self.server)
            .env("CUBBY_TOKEN", &self.token)
            .env("CUBBY_HOME", self.home.path().join("device"))
            .env("CUBBY_CA", &self.ca);
        cmd
    }

    /// Runs `cubby ARGS` off the async workers (the server runs in this process).
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        tokio::task::spawn_blocking(move || cmd.output().expect("cubby runs"))
            .await
            .expect("joined")
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "cubby {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(!out.status.success(), "cubby {args:?} should fail");
        let stderr = String::from_utf8(out.stderr).expect("utf-8");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        stderr
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("valid JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_edit_one_document_through_the_cli() {
    let server = TestServer::start().await;
    let (phone, laptop) = (Device::new(&server, "alice"), Device::new(&server, "alice"));
    let id = phone.ok(&["doc", "create", "--title", "Groceries"]).await.trim().to_owned();
    phone.ok(&["doc", "put", &id, "milk", "2"]).await;

    assert_eq!(laptop.ok(&["sync"]).await.trim(), "up to date (1 document)");
    assert_eq!(laptop.ok(&["doc", "list"]).await, format!("{id}\tGroceries\n"));
    assert_eq!(json(&laptop.ok(&["doc", "get", &id]).await), serde_json::json!({"milk": 2}));
    laptop.ok(&["doc", "put", &id, "eggs", "{\"count\": 12, \"brown\": true}"]).await;

    phone.ok(&["sync"]).await;
    assert_eq!(
        json(&phone.ok(&["doc", "get", &id]).await),
        serde_json::json!({"milk": 2, "eggs": {"count": 12, "brown": true}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_remote_change_as_it_arrives() {
    let server = TestServer::start().await;
    let (phone, laptop) = (Device::new(&server, "alice"), Device::new(&server, "alice"));
    let id = phone.ok(&["doc", "create", "--title", "Live"]).await.trim().to_owned();

    let mut watch = laptop
        .command(&["watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch");
    let stdout = watch.stdout.take().expect("piped");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = tokio::time::Instant::now() + cubby_tests::DEADLINE;
    let mut next_line = async || {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .expect("watch printed the change in time")
            .expect("watch is running");
        let change = json(&line);
        assert_eq!(change["doc"], serde_json::json!(id));
        change
    };
    phone.ok(&["doc", "put", &id, "status", "shipped"]).await;
    // The first change seen of a document shows it whole...
    loop {
        let change = next_line().await;
        if change["content"]["status"] == "shipped" {
            assert_eq!(change["title"], "Live");
            break;
        }
    }
    // ...later ones only what changed, as JSON Pointers.
    phone.ok(&["doc", "put", &id, "boxes", "{\"count\": 2}"]).await;
    let change = next_line().await;
    assert!(change.get("content").is_none(), "{change}");
    let changes = change["changes"].as_array().expect("a list of changes");
    assert!(changes.contains(&serde_json::json!({"path": "/boxes/count", "put": 2})), "{change}");
    // Text put again arrives as the characters that changed (and is stored as only those).
    phone.ok(&["doc", "put", "--text", &id, "note", "ring twice"]).await;
    let change = next_line().await;
    assert!(change["changes"].to_string().contains("ring twice"), "{change}");
    phone.ok(&["doc", "put", "--text", &id, "note", "ring the bell twice"]).await;
    let change = next_line().await;
    let changes = change["changes"].as_array().expect("a list of changes");
    let [splice] = &changes[..] else { panic!("one change: {change}") };
    let inserted = splice["splice"].as_str().expect("a splice");
    assert_eq!(inserted.chars().count(), "the bell ".len(), "only what changed: {change}");
    // A deletion is a line too.
    phone.ok(&["doc", "delete", &id]).await;
    let change = next_line().await;
    assert_eq!(change["deleted"], true, "{change}");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_offline_sync_on_the_next_sync() {
    let server = TestServer::start().await;
    let mut offline = Device::new(&server, "alice");
    let online_url = std::mem::replace(&mut offline.server, "https://127.0.0.1:9".into());
    let id =
        offline.ok(&["doc", "create", "--title", "Written on a plane"]).await.trim().to_owned();
    let out = offline.run(&["doc", "put", &id, "seat", "14C"]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not synced yet"));

    offline.server = online_url;
    offline.ok(&["sync"]).await;
    let other = Device::new(&server, "alice");
    other.ok(&["sync"]).await;
    assert_eq!(json(&other.ok(&["doc", "get", &id]).await), serde_json::json!({"seat": "14C"}));
    // The local copy says so; a synced one has nothing to add.
    let local = other.run(&["doc", "get", &id]).await;
    let said = String::from_utf8_lossy(&local.stderr);
    assert!(said.contains("this device's copy") && said.contains("--sync"), "{said}");
    let synced = other.run(&["doc", "get", "--sync", &id]).await;
    assert!(synced.status.success());
    assert!(!String::from_utf8_lossy(&synced.stderr).contains("this device's copy"));
}

/// A self-signed certificate for localhost, in `dir`; `ca` marks it as a CA as `openssl req
/// -x509` does. Returns the certificate's and the key's paths.
fn certificate(dir: &std::path::Path, ca: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("names");
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_server_certificate_says_what_to_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = certificate(dir.path(), true);
    let server = TestServer::start_with(|config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
    })
    .await;
    let device = Device::new(&server, "alice");
    let refused = device.fails(&["sync", "--timeout", "5"]).await;
    assert!(refused.contains("basicConstraints=critical,CA:FALSE"), "{refused}");

    let stranger = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start().await;
    let mut device = Device::new(&server, "alice");
    device.ca = certificate(stranger.path(), false).0;
    let refused = device.fails(&["sync", "--timeout", "5"]).await;
    assert!(refused.contains("give the client the server's CA certificate"), "{refused}");
    assert_eq!(refused.matches("invalid peer certificate").count(), 1, "said once: {refused}");
    // A certificate this device does not trust is a setting to fix, not a network to wait
    // for: an edit is saved, and the command says so and fails.
    let put = device.fails(&["doc", "create", "--title", "notes"]).await;
    assert!(put.contains("saved on this device, but sync failed"), "{put}");
    assert!(put.contains("give the client the server's CA certificate"), "{put}");
    assert!(!put.contains("unreachable"), "{put}");

    // A CA file with no certificate in it is refused, naming the file.
    let empty = stranger.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("written");
    device.ca = empty.clone();
    let refused = device.fails(&["sync"]).await;
    assert!(
        refused.contains("has no PEM certificate") && refused.contains("empty.pem"),
        "{refused}"
    );

    // http:// for a server that speaks TLS says to use https://.
    let mut plain = Device::new(&server, "alice");
    plain.server = server.url().replace("https://", "http://");
    let refused = plain.fails(&["sync", "--timeout", "5"]).await;
    assert!(refused.contains("use an https:// URL"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_naming_the_problem() {
    let server = TestServer::start().await;
    let device = Device::new(&server, "alice");

    let mut bad_token = Device::new(&server, "alice");
    bad_token.token = "not-a-token".into();
    assert!(bad_token.fails(&["sync"]).await.contains("token rejected"));

    let mut unreachable = Device::new(&server, "alice");
    unreachable.server = "https://127.0.0.1:9".into();
    assert!(unreachable.fails(&["sync", "--timeout", "5"]).await.contains("server unreachable"));

    let missing = "2g3YjDp9LXhsNKtRWqTMvo";
    assert!(device.fails(&["doc", "get", missing]).await.contains("unknown document"));
    assert!(device.fails(&["doc", "get", "not-an-id"]).await.contains("is not a document id"));

    let mut no_server = device.command(&["sync"]);
    no_server.env_remove("CUBBY_SERVER");
    let out = tokio::task::spawn_blocking(move || no_server.output().expect("runs"))
        .await
        .expect("joined");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_renamed_and_deleted_through_the_cli_changes_on_every_device() {
    let server = TestServer::start().await;
    let (phone, laptop) = (Device::new(&server, "alice"), Device::new(&server, "alice"));
    let id = phone.ok(&["doc", "create", "--title", "Groceries"]).await.trim().to_owned();
    laptop.ok(&["sync"]).await;

    assert_eq!(
        phone.ok(&["doc", "rename", &id, "Shopping"]).await.trim(),
        format!("{id}\tShopping")
    );
    assert!(phone.ok(&["doc", "list"]).await.contains(&format!("{id}\tShopping")));
    laptop.ok(&["sync"]).await;
    assert!(laptop.ok(&["doc", "list"]).await.contains(&format!("{id}\tShopping")));

    assert_eq!(phone.ok(&["doc", "delete", &id]).await.trim(), format!("{id}\tdeleted"));
    assert!(!phone.ok(&["doc", "list"]).await.contains(&id));
    laptop.ok(&["sync"]).await;
    assert!(!laptop.ok(&["doc", "list"]).await.contains(&id));
    let again = phone.fails(&["doc", "delete", &id]).await;
    assert!(again.contains("NotFound"), "{again}");
}

/// A token command is run for a token, and again for a fresh one when the server refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_command_is_asked_again_when_its_token_is_refused() {
    let server = TestServer::start().await;
    let mut device = Device::new(&server, "alice");
    let dir = device.home.path().to_owned();
    std::fs::write(dir.join("good"), &device.token).expect("written");
    // The first run prints a token the server refuses; later runs the good one.
    let command = format!(
        "if [ -e {d}/asked ]; then cat {d}/good; else touch {d}/asked; echo not.a.token; fi",
        d = dir.display()
    );
    device.token = String::new();
    let mut sync = device.command(&["sync"]);
    sync.env_remove("CUBBY_TOKEN").env("CUBBY_TOKEN_COMMAND", &command);
    let out =
        tokio::task::spawn_blocking(move || sync.output().expect("runs")).await.expect("joined");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("asked").exists(), "the command ran");

    let mut failing = device.command(&["sync"]);
    failing.env_remove("CUBBY_TOKEN").env("CUBBY_TOKEN_COMMAND", "echo broken >&2; exit 3");
    let out =
        tokio::task::spawn_blocking(move || failing.output().expect("runs")).await.expect("joined");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("the token command failed") && said.contains("broken"), "{said}");
}

/// Without a CA of its own, a device trusts what the operating system's store trusts (here
/// Linux's, pointed at the server's certificate with `SSL_CERT_FILE`, as an administrator
/// installing a company CA would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pinned_ca_the_system_trust_store_decides() {
    let server = TestServer::start().await;
    let device = Device::new(&server, "alice");
    let empty = device.home.path().join("no-certs");
    std::fs::create_dir_all(&empty).expect("made");

    let mut trusted = device.command(&["sync"]);
    trusted.env_remove("CUBBY_CA").env("SSL_CERT_FILE", &device.ca).env("SSL_CERT_DIR", &empty);
    let out =
        tokio::task::spawn_blocking(move || trusted.output().expect("runs")).await.expect("joined");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut stranger = device.command(&["sync", "--timeout", "5"]);
    let other = certificate(device.home.path(), false).0;
    stranger.env_remove("CUBBY_CA").env("SSL_CERT_FILE", &other).env("SSL_CERT_DIR", &empty);
    let out = tokio::task::spawn_blocking(move || stranger.output().expect("runs"))
        .await
        .expect("joined");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("give the client the server's CA certificate"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_rights_through_the_cli() {
    let server = TestServer::start().await;
    let (phone, laptop) = (Device::new(&server, "alice"), Device::new(&server, "alice"));
    let id = phone.ok(&["doc", "create", "--title", "Diary"]).await.trim().to_owned();
    phone.ok(&["doc", "put", &id, "entry", "dear diary"]).await;
    laptop.ok(&["sync"]).await;

    assert_eq!(phone.ok(&["doc", "private", &id]).await.trim(), format!("{id}\tprivate"));
    let devices = phone.ok(&["devices"]).await;
    assert_eq!(devices.lines().count(), 2, "{devices}");
    // Times are RFC 3339, in UTC.
    let seen = devices.lines().next().and_then(|l| l.split("last seen ").nth(1)).expect("a time");
    assert!(seen.starts_with("20") && seen.contains('T') && seen[..20].ends_with('Z'), "{devices}");
    let this = devices.lines().find(|l| l.ends_with("(this device)")).expect("marked");
    let laptop_id = devices.lines().find(|l| *l != this).expect("the laptop").split('\t').next();
    let laptop_id = laptop_id.expect("an id").to_owned();

    let archive = phone.home.path().join("export.tar");
    let out = phone.ok(&["export", "--out", archive.to_str().expect("utf-8")]).await;
    assert!(out.starts_with("exported "), "{out}");
    let mut tar = tar::Archive::new(std::fs::File::open(&archive).expect("written"));
    let names: Vec<String> = tar
        .entries()
        .expect("a tar file")
        .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&format!("cubby-export/documents/{id}.automerge")), "{names:?}");
    assert!(names.contains(&"cubby-export/manifest.json".to_owned()));

    assert_eq!(
        phone.ok(&["devices", "revoke", &laptop_id]).await.split('\t').next(),
        Some(format!("revoked {laptop_id}").as_str())
    );
    let refused = laptop.fails(&["sync"]).await;
    assert!(refused.contains("wipe"), "{refused}");
    let audit = phone.ok(&["audit"]).await;
    assert!(audit.contains("device.revoke") && audit.contains("export"), "{audit}");

    assert!(phone.fails(&["account", "delete"]).await.contains("--yes"));
    let erased = phone.ok(&["account", "delete", "--yes"]).await;
    assert!(erased.starts_with("erased: 1 documents"), "{erased}");
    assert_eq!(phone.ok(&["doc", "list"]).await, "", "this device's copy is wiped");
    assert!(phone.fails(&["devices"]).await.contains("erased"));
}

/// `kill -9` of the CLI while it saves: the local store reopens, each edit is wholly present or
/// wholly absent, and whatever is present syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_33_cli_killed_mid_write_keeps_each_edit_whole_or_absent() {
    let server = TestServer::start().await;
    let (phone, laptop) = (Device::new(&server, "alice"), Device::new(&server, "alice"));
    let id = phone.ok(&["doc", "create", "--title", "Crash"]).await.trim().to_owned();
    let seed = u64::from_be_bytes(cubby_crypto::random_array()) % 1_000_000;
    eprintln!("kill delays seeded with {seed}");
    let big = "x".repeat(100 * 1024); // one argument may hold at most 128 KiB
    let mut present = 0;
    for round in 0..10u64 {
        let mut cmd = phone.command(&["doc", "put", &id, &format!("key{round}"), &big]);
        // The moment of the kill is the fault being injected: anywhere in the first 80 ms.
        let delay = Duration::from_millis((seed + round * 7919) % 80);
        tokio::task::spawn_blocking(move || {
            let mut child =
                cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawns");
            std::thread::sleep(delay);
            let _ = child.kill();
            child.wait().expect("reaped");
        })
        .await
        .expect("joined");
        let doc = json(&phone.ok(&["doc", "get", &id]).await);
        match doc.get(format!("key{round}")) {
            None => {}
            Some(value) => {
                assert_eq!(
                    value.as_str().map(str::len),
                    Some(big.len()),
                    "a torn edit in round {round}"
                );
                present += 1;
            }
        }
    }
    eprintln!("{present} of 10 killed edits were saved whole, the rest cleanly absent");
    phone.ok(&["sync"]).await;
    laptop.ok(&["sync"]).await;
    assert_eq!(
        json(&laptop.ok(&["doc", "get", &id]).await),
        json(&phone.ok(&["doc", "get", &id]).await),
        "what survived on the phone reached the laptop"
    );
}

/// Issue 24, row 10: an edit made offline to a document deleted elsewhere meanwhile is not
/// dropped silently: `cubby sync` names it and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_names_offline_edits_that_lost_to_a_deletion_and_fails() {
    let server = TestServer::start().await;
    let (phone, laptop) = (Device::new(&server, "alice"), Device::new(&server, "alice"));
    let id = phone.ok(&["doc", "create", "--title", "Trip"]).await.trim().to_owned();
    laptop.ok(&["sync"]).await;
    // The laptop edits it offline (no server it can reach)...
    let mut offline = laptop.command(&["doc", "put", &id, "note", "pack boots"]);
    offline.env("CUBBY_SERVER", "https://127.0.0.1:9");
    let saved = tokio::task::spawn_blocking(move || offline.output().expect("runs")).await;
    assert!(saved.expect("joined").status.success(), "saved on the device");
    // ...while it is deleted on the server.
    let doc_id = id_bytes(&id);
    let mut account = cubby_proto::pb::account_client::AccountClient::new(server.channel().await);
    let request = cubby_proto::pb::DeleteDocumentRequest { doc_id };
    account
        .delete_document(cubby_tests::authed(request, &server.token("alice")))
        .await
        .expect("deleted");

    let out = laptop.run(&["sync"]).await;
    assert!(!out.status.success(), "the discarded edit makes the sync fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&id) && stderr.contains("\"Trip\"") && stderr.contains("discarded"),
        "{stderr}"
    );
    // Said once: the next sync is clean, and the document is gone.
    assert_eq!(laptop.ok(&["sync"]).await.trim(), "up to date (0 documents)");
}

/// Issue 24, row 11: another customer's token on a device's home is refused with one line
/// naming the problem, and nothing of the first customer's is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_token_on_a_home_is_refused() {
    let server = TestServer::start().await;
    let mut phone = Device::new(&server, "alice");
    phone.ok(&["doc", "create", "--title", "alice's secret"]).await;
    phone.token = server.token("bob");
    let err = phone.fails(&["doc", "list"]).await;
    assert!(err.contains("another account"), "{err}");
    assert!(!err.contains("secret"));
}

/// The 16 bytes of a printed (base58) id.
fn id_bytes(id: &str) -> Vec<u8> {
    let parsed: cubby_client::DocId = id.parse().expect("a document id");
    parsed.as_bytes().to_vec()
}

/// The business's admin commands, with a service token: ids printed and taken in base58, as
/// the customer's own commands print them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_business_reaches_a_customers_store_through_cubby_admin() {
    let server = TestServer::start().await;
    let phone = Device::new(&server, "alice");
    let id = phone.ok(&["doc", "create", "--title", "Settings"]).await.trim().to_owned();
    phone.ok(&["doc", "put", &id, "theme", "dark"]).await;
    let mut backend = Device::new(&server, "alice");
    backend.token = server.service_token("backend");

    let customers = backend.ok(&["admin", "customers"]).await;
    let alice = customers.lines().find(|l| l.starts_with("alice\t")).expect("alice is listed");
    assert_eq!(alice.split('\t').nth(1), Some("1"), "one document: {alice}");
    let docs = backend.ok(&["admin", "docs", "alice"]).await;
    assert!(docs.starts_with(&format!("{id}\tSettings\t")), "{docs}");
    assert_eq!(
        json(&backend.ok(&["admin", "read", "alice", &id]).await),
        serde_json::json!({"theme": "dark"})
    );

    let changed = backend
        .ok(&["admin", "change", "alice", &id, "--set", "/font/size=14", "--set", "/theme=light"])
        .await;
    assert_eq!(json(&changed), serde_json::json!({"theme": "light", "font": {"size": 14}}));
    phone.ok(&["sync"]).await;
    assert_eq!(json(&phone.ok(&["doc", "get", &id]).await)["theme"], "light", "the device sees it");
    let created = backend.ok(&["admin", "create", "alice", "--title", "Welcome"]).await;
    let created = created.trim();
    assert_eq!(
        json(&backend.ok(&["admin", "read", "alice", created]).await),
        serde_json::json!({})
    );

    let out = backend.home.path().join("alice.tar");
    let exported =
        backend.ok(&["admin", "export", "alice", "--out", out.to_str().expect("utf-8")]).await;
    assert!(exported.starts_with("exported "), "{exported}");
    let names: Vec<String> = tar::Archive::new(std::fs::File::open(&out).expect("archive"))
        .entries()
        .expect("a tar")
        .map(|e| e.expect("entry").path().expect("path").display().to_string())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(&format!("{id}.json"))), "{names:?}");

    // A customer's own token is no service token; an erasure needs --yes.
    let refused = phone.fails(&["admin", "docs", "alice"]).await;
    assert!(refused.contains("PermissionDenied"), "{refused}");
    let unconfirmed = backend.fails(&["admin", "erase", "alice"]).await;
    assert!(unconfirmed.contains("--yes"), "{unconfirmed}");
    let bad = backend.fails(&["admin", "change", "alice", &id, "--set", "theme=x"]).await;
    assert!(bad.contains("JSON Pointer"), "{bad}");
    let erased = backend.ok(&["admin", "erase", "alice", "--yes"]).await;
    assert!(erased.starts_with("erased alice: 2 documents"), "{erased}");
    let gone = backend.ok(&["admin", "customers"]).await;
    assert!(!gone.lines().any(|l| l.starts_with("alice\t")), "{gone}");
}
