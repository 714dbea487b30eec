//! Three `cubby-server` processes on one PostgreSQL behind HAProxy, as the README deploys
//! them: devices of one customer, spread over the nodes by the balancer, converge live; a node
//! killed with SIGKILL under write load loses nothing it acknowledged, and its devices move to
//! the others; PostgreSQL stopped under load turns every node `NOT_SERVING` and refusing
//! writes, and started again, the nodes recover by themselves and everything converges.
//!
//! Each test runs a PostgreSQL of its own (initdb and pg_ctl from `CUBBY_TEST_PG_BIN`, which
//! `tests/postgres.sh` exports) so that it can stop it, and HAProxy from Debian's packages
//! (`tests/run.sh` installs both).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, Postgres, Running, channel, free_port, started, synced, with_token};
use cubby_proto::pb;
use serde_json::{Value, json};

/// How long a test waits for a condition.
const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `cubby-server` node: its data directory (a copy of the first node's), port and metrics
/// port.
struct Node {
    data: PathBuf,
    port: u16,
    metrics: u16,
    running: Option<Running>,
}

impl Node {
    /// Devices with a sync stream open on this node, as its metrics say.
    fn connected_devices(&self) -> u64 {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.metrics)) else {
            return 0;
        };
        let mut text = String::new();
        let asked = stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        if asked.is_err() || stream.read_to_string(&mut text).is_err() {
            return 0;
        }
        text.lines()
            .find_map(|line| line.strip_prefix("cubby_connected_devices "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// HAProxy in front of the nodes: TCP, round robin, a node taken out while its port refuses
/// connections.
struct Balancer {
    _running: Running,
    port: u16,
}

struct Cluster {
    root: tempfile::TempDir,
    nodes: Vec<Node>,
    balancer: Balancer,
}

impl Cluster {
    /// Three nodes on `postgres`, started on one data directory (the first node's: master key,
    /// development tenant, certificate) and a copy of it, and HAProxy in front of them.
    fn start(postgres: &Postgres) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for n in 0..3 {
            // Node 1 on a copy of node 0's data directory, node 2 on the same one.
            let data = root.path().join(format!("node{}", n % 2));
            if n == 1 {
                common::copy_tree(&root.path().join("node0"), &data);
            }
            let mut node = Node { data, port: free_port(), metrics: free_port(), running: None };
            node.running = Some(serve(&node, &postgres.url()));
            nodes.push(node);
        }
        let balancer = balance(root.path(), &nodes);
        Self { root, nodes, balancer }
    }

    fn cert(&self) -> Vec<u8> {
        std::fs::read(self.nodes[0].data.join("tls/cert.pem")).expect("cert")
    }

    fn token(&self, customer: &str) -> String {
        let out = Command::new(BIN)
            .arg("dev-token")
            .arg("--data")
            .arg(&self.nodes[0].data)
            .args(["--customer", customer])
            .output()
            .expect("the binary runs");
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// A device of `customer` syncing through the balancer.
    async fn device(&self, customer: &str) -> cubby_client::Client {
        let home = tempfile::tempdir_in(self.root.path()).expect("home").keep();
        cubby_client::Client::builder()
            .with_data_dir(home)
            .with_local_key([7; 32])
            .with_server(format!("https://127.0.0.1:{}", self.balancer.port))
            .with_ca_pem(self.cert())
            .with_token_provider(cubby_client::StaticToken::new(self.token(customer)))
            .build()
            .await
            .expect("the client builds")
    }

    /// What node `n`'s health service says of the whole server.
    async fn health(&self, n: usize) -> Option<i32> {
        let cert = self.nodes[n].data.join("tls/cert.pem");
        let addr = format!("127.0.0.1:{}", self.nodes[n].port);
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(channel(&cert, &addr).await);
        let asked = health.check(tonic_health::pb::HealthCheckRequest::default()).await;
        asked.ok().map(|answer| answer.into_inner().status)
    }
}

/// `cubby-server --data DIR` with `CUBBY_DATABASE_URL`, as the README starts a node.
fn serve(node: &Node, url: &str) -> Running {
    let child = Command::new(BIN)
        .arg("--data")
        .arg(&node.data)
        .env("CUBBY_LISTEN", format!("127.0.0.1:{}", node.port))
        .env("CUBBY_DATABASE_URL", url)
        .env("CUBBY_METRICS", format!("127.0.0.1:{}", node.metrics))
        .env_remove("CUBBY_CONFIG")
        .env_remove("CUBBY_DATA")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    started(child).0
}

fn balance(dir: &Path, nodes: &[Node]) -> Balancer {
    let port = free_port();
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            format!("    server node{n} 127.0.0.1:{} check inter 200ms fall 1 rise 2\n", node.port)
        })
        .collect();
    let config = format!(
        "global\n    maxconn 4096\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n\
         frontend cubby\n    bind 127.0.0.1:{port}\n    default_backend nodes\n\
         backend nodes\n    balance roundrobin\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("config written");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy runs (`bash tests/run.sh` installs it from Debian's packages)");
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "haproxy never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Balancer { _running: Running(child), port }
}

/// Devices writing their own counter into one shared document as fast as they can, until
/// stopped; each returns its last value.
struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<i64>>,
}

impl Load {
    fn start(docs: &[cubby_client::DocHandle]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = docs
            .iter()
            .enumerate()
            .map(|(n, doc)| {
                let (doc, stop) = (doc.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut value = 0;
                    while !stop.load(Ordering::SeqCst) {
                        value += 1;
                        doc.put(&format!("device{n}"), json!(value)).await.expect("a local put");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    value
                })
            })
            .collect();
        Self { stop, writers }
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        let mut last = Vec::new();
        for writer in self.writers {
            last.push(writer.await.expect("the writer ran"));
        }
        last
    }
}

/// Three devices of alice through the balancer (one per node, round robin), each with the
/// shared document open.
async fn devices(cluster: &Cluster) -> (Vec<cubby_client::Client>, Vec<cubby_client::DocHandle>) {
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(cluster.device("alice").await);
    }
    let doc = clients[0].create("counters").await.expect("create");
    doc.put("created", json!(true)).await.expect("put");
    synced(&clients[0]).await;
    let mut docs = vec![doc.clone()];
    for client in &clients[1..] {
        let id = doc.id();
        eventually("each device gets the shared document", || async {
            client.list().await.expect("list").iter().any(|(d, _)| *d == id)
        })
        .await;
        docs.push(client.open(id).await.expect("opens"));
    }
    for node in &cluster.nodes {
        eventually("the balancer spread the devices over every node", || async {
            node.connected_devices() > 0
        })
        .await;
    }
    (clients, docs)
}

/// Every device, and a new one, end up with every device's last value.
async fn everything_converges(
    cluster: &Cluster,
    clients: &[cubby_client::Client],
    docs: &[cubby_client::DocHandle],
    last: &[i64],
) {
    for client in clients {
        synced(client).await;
    }
    let want: Vec<Value> = last.iter().map(|v| json!(v)).collect();
    let holds = |json: &Value| (0..want.len()).all(|n| json[format!("device{n}")] == want[n]);
    for doc in docs {
        eventually("every device holds every device's last write", || async {
            holds(&doc.to_json())
        })
        .await;
    }
    let newcomer = cluster.device("alice").await;
    synced(&newcomer).await;
    let id = docs[0].id();
    eventually("a new device gets every acknowledged write", || async {
        newcomer.wait_until_synced().await.is_ok()
            && match newcomer.open(id).await {
                Ok(doc) => holds(&doc.to_json()),
                Err(_) => false,
            }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_live_and_a_node_killed_under_load_loses_nothing() {
    let postgres = Postgres::start();
    let mut cluster = Cluster::start(&postgres);
    let (clients, docs) = devices(&cluster).await;

    // Live: an edit on one device reaches the others, whichever node each is on.
    for (n, doc) in docs.iter().enumerate() {
        doc.put("live", json!(n)).await.expect("put");
        for other in &docs {
            eventually("the edit reaches every device live", || async {
                other.to_json()["live"] == json!(n)
            })
            .await;
        }
    }

    // Under load, node 0 is killed; its devices reconnect through the balancer to the others.
    let load = Load::start(&docs);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = cluster.nodes[0].running.take().expect("running");
    let pid = killed.0.id().to_string();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().expect("kill").success());
    drop(killed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = load.finish().await;
    assert!(last.iter().all(|&v| v > 10), "the devices kept writing: {last:?}");
    everything_converges(&cluster, &clients, &docs, &last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_stopped_nodes_say_not_serving_refuse_writes_and_recover_by_themselves() {
    let postgres = Postgres::start();
    let cluster = Cluster::start(&postgres);
    let (clients, docs) = devices(&cluster).await;
    let load = Load::start(&docs);
    tokio::time::sleep(Duration::from_millis(500)).await;

    postgres.halt();
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    for n in 0..3 {
        eventually("every node reports NOT_SERVING", || async {
            cluster.health(n).await == Some(not_serving)
        })
        .await;
    }
    // A write is refused, saying the storage is unavailable.
    let cert = cluster.nodes[1].data.join("tls/cert.pem");
    let mut account = pb::account_client::AccountClient::new(
        channel(&cert, &format!("127.0.0.1:{}", cluster.nodes[1].port)).await,
    );
    let refused = account
        .create_document(with_token(
            pb::CreateDocumentRequest { title: "during".into() },
            &cluster.token("alice"),
        ))
        .await
        .expect_err("no database, no write");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.resume();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for n in 0..3 {
        eventually("every node reports SERVING again", || async {
            cluster.health(n).await == Some(serving)
        })
        .await;
    }
    let last = load.finish().await;
    everything_converges(&cluster, &clients, &docs, &last).await;
}
