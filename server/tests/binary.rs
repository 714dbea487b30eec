//! The real `cubby-server` binary, started the way the README says.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cubby_proto::pb;

const BIN: &str = env!("CARGO_BIN_EXE_cubby-server");

/// Kills the child on drop so a failing test leaves no server behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

/// Waits for a server started as `child` (its stdout piped) to print the dev-tenant hint.
fn started(mut child: Child) -> (Running, Vec<String>) {
    let stdout = child.stdout.take().expect("piped");
    let running = Running(child);
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8 output");
        let done = line.starts_with("development tenant on");
        lines.push(line);
        assert!(Instant::now() < deadline, "server did not finish starting: {lines:?}");
        if done {
            return (running, lines);
        }
    }
    panic!("server exited early: {lines:?}");
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
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("master key file") && stderr.contains("missing.key"), "{stderr}");
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
    assert!(!out.status.success());
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

/// A TLS channel to the binary at `addr`, trusting its certificate `cert`.
async fn channel(cert: &Path, addr: &str) -> tonic::transport::Channel {
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(cert).expect("cert")),
    );
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("TLS connection to the binary")
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ok"));
    request
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
