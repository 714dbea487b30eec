//! The peers Cubby is compared with, in the same run: automerge-repo's sync server under Node,
//! samod, and y-sweet, each in its own process (so its CPU time and memory are its own), driven
//! by `bench/peers/driver.mjs` (Automerge or Yjs clients in one Node process) through Cubby's
//! fan-out and idle-device workloads. `bench/peers/install.sh` installs them.

use std::io::{BufRead, BufReader, Lines, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server::{cpu_of, rss_of};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// automerge-repo sends a document's changes at most every 100 ms (`syncDebounceRate`), in the
/// client and in the server alike, so isolated edits to its protocol are spaced past that.
const AUTOMERGE_REPO_GAP: Duration = Duration::from_millis(110);

/// One peer: how to start its server, and which clients speak to it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peer {
    /// `@automerge/automerge-repo` 2.5 with its WebSocket adapter and Node filesystem storage.
    AutomergeRepo,
    /// samod 0.16, the Rust automerge-repo, behind axum's WebSocket route with its filesystem
    /// storage.
    Samod,
    /// y-sweet 0.9, the Rust Yjs server, with its filesystem store.
    YSweet,
}

impl Peer {
    pub(crate) const ALL: [Peer; 3] = [Peer::AutomergeRepo, Peer::Samod, Peer::YSweet];

    /// Its name in the results.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::AutomergeRepo => "automerge-repo",
            Peer::Samod => "samod",
            Peer::YSweet => "y-sweet",
        }
    }

    /// The driver's client kind for it.
    fn clients(self) -> &'static str {
        match self {
            Peer::AutomergeRepo | Peer::Samod => "automerge",
            Peer::YSweet => "yjs",
        }
    }

    /// How long the driver waits between isolated edits.
    pub(crate) fn gap(self) -> Duration {
        match self {
            Peer::AutomergeRepo | Peer::Samod => AUTOMERGE_REPO_GAP,
            Peer::YSweet => Duration::ZERO,
        }
    }

    /// The command serving `data` on loopback `port`, or why it is missing.
    fn command(self, data: &Path, port: u16) -> Result<Command, Error> {
        let dir = peers_dir();
        let installed = |path: PathBuf| {
            if path.exists() {
                Ok(path)
            } else {
                Err(format!("{} not found: run bench/peers/install.sh", path.display()))
            }
        };
        let mut command = match self {
            Peer::AutomergeRepo => {
                installed(dir.join("node_modules"))?;
                let mut c = Command::new("node");
                c.arg(dir.join("automerge-repo-server.mjs")).arg(data).arg(port.to_string());
                c
            }
            Peer::Samod => {
                let mut c = Command::new(installed(tools_dir().join("samod-server"))?);
                c.arg(data).arg(port.to_string());
                c
            }
            Peer::YSweet => {
                let mut c = Command::new(installed(tools_dir().join("bin/y-sweet"))?);
                c.arg("serve").arg(data).args(["--host", "127.0.0.1", "--port"]);
                c.arg(port.to_string());
                c
            }
        };
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        Ok(command)
    }
}

/// `bench/peers`: the driver, the automerge-repo server and their Node packages.
fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// `target/peers`: where `bench/peers/install.sh` puts the peers' binaries.
fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers")
}

/// A peer's server process with its own data directory; killed on drop.
struct PeerServer {
    child: Child,
    _data: tempfile::TempDir,
    url: String,
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PeerServer {
    fn start(peer: Peer) -> Result<Self, Error> {
        let data = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = peer.command(data.path(), port)?.spawn()?;
        let server = Self { child, _data: data, url: format!("ws://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{} did not listen within 30 s", peer.name()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    fn cpu(&self) -> Result<Duration, Error> {
        cpu_of(self.child.id())
    }

    fn rss(&self) -> Result<u64, Error> {
        rss_of(self.child.id())
    }
}

/// The Node process holding the devices, spoken to in lines (see `driver.mjs`).
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(peer: Peer, server: &PeerServer) -> Result<Self, Error> {
        let mut child = Command::new("node")
            .arg(peers_dir().join("driver.mjs"))
            .args([peer.clients(), &server.url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run node: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        Ok(Self { child, stdin, lines })
    }

    fn send(&mut self, line: &str) -> Result<(), Error> {
        writeln!(self.stdin, "{line}")?;
        Ok(self.stdin.flush()?)
    }

    /// The driver's next JSON line.
    fn read(&mut self) -> Result<Value, Error> {
        let line = self.lines.next().ok_or("the driver stopped (its error is above)")??;
        Ok(serde_json::from_str(&line)?)
    }

    /// Starts `command`, waits until the driver is ready, and returns what it said then.
    fn ready(&mut self, command: &Value) -> Result<Value, Error> {
        self.send(&command.to_string())?;
        let ready = self.read()?;
        if ready["ready"] != true {
            return Err(format!("the driver said {ready} instead of ready").into());
        }
        Ok(ready)
    }
}

/// Workload 1 against `peer`: one device makes `edits` isolated small edits, each waiting until
/// all `receivers` have it.
pub(crate) fn fanout(peer: Peer, receivers: usize, edits: usize) -> Result<Value, Error> {
    let server = PeerServer::start(peer)?;
    let mut driver = Driver::start(peer, &server)?;
    let gap_ms = peer.gap().as_millis();
    driver.ready(
        &json!({"run": "fanout", "receivers": receivers, "edits": edits, "gap_ms": gap_ms}),
    )?;
    // The driver's CPU is its devices', as the bench process's is Cubby's devices'.
    let (cpu, devices_cpu) = (server.cpu()?, cpu_of(driver.child.id())?);
    driver.send("go")?;
    let mut result = driver.read()?;
    let cpu = server.cpu()? - cpu;
    let devices_cpu = cpu_of(driver.child.id())? - devices_cpu;
    let per_change = |cpu: Duration| json!((cpu.as_secs_f64() * 1e6 / edits as f64).round());
    result["workload"] = json!("fanout");
    result["system"] = json!(peer.name());
    result["server_cpu_us_per_change"] = per_change(cpu);
    result["devices_cpu_us_per_change"] = per_change(devices_cpu);
    result["server_rss_bytes"] = json!(server.rss()?);
    Ok(result)
}

/// Workload 3 against `peer`: `devices` idle devices across `customers` documents; the server's
/// memory per connected device, the connection rate, and one edit's latency at that scale.
pub(crate) fn idle(peer: Peer, devices: usize, customers: usize) -> Result<Value, Error> {
    let server = PeerServer::start(peer)?;
    let mut driver = Driver::start(peer, &server)?;
    let baseline = server.rss()?;
    let ready =
        driver.ready(&json!({"run": "idle", "devices": devices, "customers": customers}))?;
    // Let allocations settle, as for Cubby, then read the server's memory; its CPU meanwhile
    // is what idle devices cost it.
    let cpu = server.cpu()?;
    std::thread::sleep(Duration::from_secs(2));
    let idle_cpu = server.cpu()? - cpu;
    let rss = server.rss()?;
    driver.send("go")?;
    let mut result = driver.read()?;
    result["workload"] = json!("idle");
    result["system"] = json!(peer.name());
    result["server_rss_bytes"] = json!(rss);
    result["server_bytes_per_device"] = json!(rss.saturating_sub(baseline) / devices as u64);
    result["connections_per_sec"] = ready["connections_per_sec"].clone();
    result["idle_server_cpu_percent"] = json!((idle_cpu.as_secs_f64() / 2.0 * 100.0).round());
    Ok(result)
}
