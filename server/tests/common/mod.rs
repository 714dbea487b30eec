//! What the tests that run the `cubby-server` binary share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_cubby-server");

/// Kills the child on drop so a failing test leaves no server behind.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies a directory tree, as `cp -r` would: its directories and files, not a running
/// server's socket.
pub(crate) fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("readable") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        let kind = entry.file_type().expect("type");
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Waits for a server started as `child` (its stdout piped) to print the dev-tenant hint.
pub(crate) fn started(mut child: Child) -> (Running, Vec<String>) {
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

/// A TLS channel to the binary at `addr`, trusting its certificate `cert`.
pub(crate) async fn channel(cert: &Path, addr: &str) -> tonic::transport::Channel {
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

pub(crate) fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ok"));
    request
}

/// A free loopback port: the restore tests restart the binary on the same address, as an
/// operator would, so that devices reconnect where they were.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until `client` and the server hold the same changes, however many attempts that
/// takes (a device retries on its own while the server is away).
pub(crate) async fn synced(client: &cubby_client::Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(failure) = client.wait_until_synced().await {
        assert!(Instant::now() < deadline, "never synced: {failure}");
        let mut status = client.status();
        let retried = status.wait_for(|s| !matches!(s, cubby_client::SyncStatus::Offline { .. }));
        let _ = tokio::time::timeout(Duration::from_secs(60), retried).await;
    }
}

/// Runs `program` with `args` as the unprivileged `postgres` user when the tests run as root
/// (PostgreSQL refuses to run as root).
pub(crate) fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server of the test's own, which it may stop and start.
pub(crate) struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    pub(crate) fn start() -> Self {
        let bin = PathBuf::from(std::env::var("CUBBY_TEST_PG_BIN").expect(
            "CUBBY_TEST_PG_BIN is not set: `bash tests/run.sh` installs PostgreSQL and sets it; \
             by hand: source tests/postgres.sh && postgres_start",
        ));
        let dir = tempfile::Builder::new().prefix("cubby-pgc").tempdir_in("/tmp").expect("dir");
        let owned = Command::new("chown").arg("postgres:").arg(dir.path()).status();
        assert!(owned.is_ok_and(|s| s.success()) || !is_root(), "chown to postgres");
        let initdb = as_postgres(&bin.join("initdb"))
            .arg(format!("--pgdata={}", dir.path().join("data").display()))
            .args(["--username=cubby", "--auth=trust", "--encoding=UTF8", "--no-instructions"])
            .output()
            .expect("initdb runs");
        assert!(initdb.status.success(), "initdb: {}", String::from_utf8_lossy(&initdb.stderr));
        let postgres = Self { dir, bin, port: free_port() };
        postgres.resume();
        postgres
    }

    pub(crate) fn url(&self) -> String {
        format!("postgresql://cubby@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg(format!("--pgdata={}", data.display()))
            .arg(format!("--log={}", log.display()))
            .args(args)
            .output()
            .expect("pg_ctl runs");
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again).
    pub(crate) fn resume(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -k {} -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        self.pg_ctl(&["--wait", "--timeout=60", "-o", &options, "start"]);
    }

    /// Stops the server, disconnecting everyone at once (`--mode=fast`).
    pub(crate) fn halt(&self) {
        self.pg_ctl(&["--mode=fast", "--wait", "stop"]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg(format!("--pgdata={}", data.display()))
            .args(["--mode=immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

impl Postgres {
    /// The URL of database `name` on this server.
    pub(crate) fn url_of(&self, name: &str) -> String {
        format!("postgresql://cubby@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs one of PostgreSQL's client programs (`pg_dump`, `psql`) and returns its output.
    pub(crate) fn client(&self, program: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(self.bin.join(program))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} runs: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
