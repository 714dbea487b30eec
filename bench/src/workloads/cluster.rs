//! The cluster workload: sled and PostgreSQL side by side, in one run. A PostgreSQL 15 of the
//! bench's own (initdb and pg_ctl from `CUBBY_BENCH_PG_BIN`, default Debian's
//! `/usr/lib/postgresql/15/bin`, as the `postgres` user when run as root), nodes of the real
//! binary on it, and SDK devices:
//!
//! - fan-out latency of isolated edits with the sender and the receiver on the same node and on
//!   two nodes, and the server's CPU per change (the nodes' and PostgreSQL's apart);
//! - durable acknowledgements per second with 64 writers on one node and spread over three;
//! - what one group commit costs the database: round trips and bytes between the nodes and the
//!   database (through a counting relay), transactions and WAL bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cubby_client::Client;
use serde_json::{Value, json};

use super::{Error, arrived, has, synced, write_until};
use crate::server::{ServerProcess, Wire, metric};
use crate::stats::{Samples, ms};

/// A PostgreSQL server of the bench's own; stopped and removed on drop.
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    root: bool,
}

impl Postgres {
    fn start() -> Result<Self, Error> {
        let bin = PathBuf::from(
            std::env::var("CUBBY_BENCH_PG_BIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        if !bin.join("initdb").exists() {
            return Err(format!(
                "no initdb in {} (install postgresql-15, or set CUBBY_BENCH_PG_BIN)",
                bin.display()
            )
            .into());
        }
        let root = nix::unistd::Uid::effective().is_root();
        let dir = tempfile::Builder::new().prefix("cubby-bench-pg").tempdir_in("/tmp")?;
        if root {
            Command::new("chown").arg("postgres:").arg(dir.path()).status()?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let pg = Self { dir, bin, port, root };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                &format!("--pgdata={}", data.display()),
                "--username=cubby",
                "--auth=trust",
                "--no-instructions",
            ],
        )?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -k {} -c max_connections=200",
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("server.log");
        pg.run(
            "pg_ctl",
            &[
                &format!("--pgdata={}", data.display()),
                &format!("--log={}", log.display()),
                "--wait",
                "-o",
                &options,
                "start",
            ],
        )?;
        Ok(pg)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        let mut command = if self.root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            command
        } else {
            Command::new(self.bin.join(program))
        };
        let out = command.args(args).output()?;
        if !out.status.success() {
            return Err(format!("{program}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn url(&self) -> String {
        format!("postgresql://cubby@127.0.0.1:{}/postgres", self.port)
    }

    /// One number from the database (`psql -At`).
    fn number(&self, sql: &str) -> Result<f64, Error> {
        let out =
            Command::new(self.bin.join("psql")).args(["-At", "-c", sql, &self.url()]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// The database's own counters: committed transactions, WAL bytes, and (if
    /// `pg_stat_statements` were loaded) nothing more; statements are counted by the server.
    fn counters(&self) -> Result<(f64, f64), Error> {
        let commits = self.number(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )?;
        let wal = self.number("SELECT wal_bytes FROM pg_stat_wal")?;
        Ok((commits, wal))
    }

    /// CPU time of every PostgreSQL process so far: the postmaster, its children, and the
    /// children it has reaped (`/proc/PID/stat`, 10 ms ticks).
    fn cpu(&self) -> Result<Duration, Error> {
        let pid_file = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))?;
        let postmaster: u32 = pid_file.lines().next().ok_or("empty postmaster.pid")?.parse()?;
        let ticks = |pid: u32, reaped: bool| -> Option<(u32, u64)> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
            // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
            let own = field(11)? + field(12)?;
            let children = if reaped { field(13)? + field(14)? } else { 0 };
            Some((field(1)? as u32, own + children))
        };
        let mut total = ticks(postmaster, true).ok_or("no postmaster")?.1;
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Some((parent, used)) = ticks(pid, false)
                && parent == postmaster
            {
                total += used;
            }
        }
        Ok(Duration::from_millis(total * 10))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .run("pg_ctl", &[&format!("--pgdata={}", data.display()), "--mode=immediate", "stop"]);
    }
}

/// A TCP relay between the nodes and the database that counts what crosses it: bytes each
/// way, and round trips (each time a node sends after the database has answered).
#[derive(Clone, Default)]
struct Relay {
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    round_trips: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    /// Relays a new local port to `port`; returns the local port.
    async fn start(&self, port: u16) -> Result<u16, Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?.port();
        let relay = self.clone();
        tokio::spawn(async move {
            while let Ok((node, _)) = listener.accept().await {
                let Ok(db) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    continue;
                };
                tokio::spawn(relay.clone().pipe(node, db));
            }
        });
        Ok(local)
    }

    async fn pipe(self, node: tokio::net::TcpStream, db: tokio::net::TcpStream) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = (node.set_nodelay(true), db.set_nodelay(true));
        let (mut node_in, mut node_out) = node.into_split();
        let (mut db_in, mut db_out) = db.into_split();
        // Whether the database spoke last: the node's next bytes then start a round trip.
        let answered = std::sync::Arc::new(AtomicBool::new(true));
        let (up_relay, up_answered) = (self.clone(), answered.clone());
        let up = async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n) = node_in.read(&mut buf).await {
                if n == 0 || db_out.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                up_relay.bytes.fetch_add(n as u64, Ordering::Relaxed);
                if up_answered.swap(false, Ordering::Relaxed) {
                    up_relay.round_trips.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let down = async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n) = db_in.read(&mut buf).await {
                if n == 0 || node_out.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                answered.store(true, Ordering::Relaxed);
            }
        };
        tokio::join!(up, down);
    }

    fn counts(&self) -> (f64, f64) {
        use std::sync::atomic::Ordering;
        (self.bytes.load(Ordering::Relaxed) as f64, self.round_trips.load(Ordering::Relaxed) as f64)
    }
}

/// A light device (its store in memory) of `subject` on `node`.
async fn device(node: &ServerProcess, subject: &str) -> Result<Client, Error> {
    Ok(Client::builder()
        .with_store(std::sync::Arc::new(cubby_store::MemoryStore::new()))
        .with_local_key([7; 32])
        .with_server(node.url.clone())
        .with_ca_pem(node.ca_pem.clone())
        .with_token_provider(cubby_client::StaticToken::new(node.token(subject)?))
        .build()
        .await?)
}

/// Isolated edits from a device on `from`, each waited for on a device on `to`.
async fn fanout(
    backend: &str,
    placement: &str,
    from: &ServerProcess,
    to: &ServerProcess,
    nodes: &[&ServerProcess],
    db: Option<&Postgres>,
    edits: usize,
) -> Result<Value, Error> {
    let subject = format!("fanout-{backend}-{placement}");
    let dirs = tempfile::tempdir()?;
    let wire = Wire::default();
    let writer = from.device(&subject, &dirs.path().join("w"), &wire).await?;
    let doc = writer.create("bench").await?;
    doc.put("n", json!(0)).await?;
    synced(&writer).await?;
    let reader = to.device(&subject, &dirs.path().join("r"), &wire).await?;
    synced(&reader).await?;
    let copy = arrived(&reader, doc.id()).await?;
    has(&copy, 0).await?;

    let cpu = |nodes: &[&ServerProcess]| -> Result<Duration, Error> {
        nodes.iter().map(|n| n.cpu()).sum::<Result<Duration, Error>>()
    };
    let (node_cpu, db_cpu) = (cpu(nodes)?, db.map(Postgres::cpu).transpose()?);
    let mut latency = Samples::default();
    for n in 1..=edits as u64 {
        let started = Instant::now();
        let (put, arrived) = tokio::join!(doc.put("n", json!(n)), has(&copy, n));
        put?;
        arrived?;
        latency.push(started.elapsed());
    }
    let per_change = |d: Duration| (d.as_secs_f64() * 1e6 / edits as f64).round();
    let db_cpu = match (db, db_cpu) {
        (Some(db), Some(before)) => per_change(db.cpu()? - before),
        _ => 0.0,
    };
    Ok(json!({
        "workload": "cluster_fanout",
        "backend": backend,
        "placement": placement,
        "edits": edits,
        "p50_ms": ms(latency.quantile(0.5)),
        "p99_ms": ms(latency.quantile(0.99)),
        "nodes_cpu_us_per_change": per_change(cpu(nodes)? - node_cpu),
        "db_cpu_us_per_change": db_cpu,
    }))
}

/// `writers` devices (one customer each), spread over `nodes`, writing as fast as they are
/// acknowledged for `secs` seconds.
async fn durability(
    backend: &str,
    nodes: &[&ServerProcess],
    db: Option<(&Postgres, &Relay)>,
    writers: usize,
    secs: u64,
) -> Result<Value, Error> {
    let mut clients = Vec::new();
    for i in 0..writers {
        let client =
            device(nodes[i % nodes.len()], &format!("{backend}-{}-{i}", nodes.len())).await?;
        synced(&client).await?;
        clients.push(client);
    }
    let batches = |nodes: &[&ServerProcess]| -> f64 {
        nodes.iter().filter_map(|n| metric(n.metrics?, "cubby_commit_batch_writes_count")).sum()
    };
    let cpu_before: Duration = nodes.iter().map(|n| n.cpu()).sum::<Result<Duration, Error>>()?;
    let db_before = db
        .map(|(db, relay)| Ok::<_, Error>((db.cpu()?, db.counters()?, relay.counts())))
        .transpose()?;
    let batches_before = batches(nodes);
    let until = Instant::now() + Duration::from_secs(secs);
    let runs = write_until(&clients, until).await;
    let cpu: Duration =
        nodes.iter().map(|n| n.cpu()).sum::<Result<Duration, Error>>()? - cpu_before;
    let commits = batches(nodes) - batches_before;
    let mut all = Samples::default();
    let mut count = 0usize;
    for run in runs {
        let run = run?;
        count += run.len();
        all.extend(run);
    }
    let per = |total: f64, n: f64| if n > 0.0 { (total / n * 10.0).round() / 10.0 } else { 0.0 };
    let mut row = json!({
        "workload": "cluster_durability",
        "backend": backend,
        "nodes": nodes.len(),
        "writers": writers,
        "seconds": secs,
        "acked_changes_per_sec": (count as f64 / secs as f64).round(),
        "ack_p50_ms": ms(all.quantile(0.5)),
        "ack_p99_ms": ms(all.quantile(0.99)),
        "nodes_cpu_us_per_change": (cpu.as_secs_f64() * 1e6 / count.max(1) as f64).round(),
        "group_commits": commits,
        "writes_per_group_commit": per(count as f64, commits),
    });
    if let (Some((db, relay)), Some((cpu_before, (xacts_before, wal_before), wire_before))) =
        (db, db_before)
    {
        let (xacts, wal) = db.counters()?;
        let (bytes, round_trips) = relay.counts();
        // Everything between the nodes and the database: group commits, bus reads and wake-ups,
        // health checks, loads.
        row["db_round_trips_per_group_commit"] = json!(per(round_trips - wire_before.1, commits));
        row["db_wire_bytes_per_group_commit"] = json!(per(bytes - wire_before.0, commits));
        let db_cpu = db.cpu()? - cpu_before;
        row["db_cpu_us_per_change"] =
            json!((db_cpu.as_secs_f64() * 1e6 / count.max(1) as f64).round());
        row["db_transactions_per_group_commit"] = json!(per(xacts - xacts_before, commits));
        row["wal_bytes_per_group_commit"] = json!(per(wal - wal_before, commits));
        row["wal_bytes_per_change"] = json!(per(wal - wal_before, count as f64));
    }
    Ok(row)
}

/// The workload: sled, then PostgreSQL with one and three nodes.
pub(crate) async fn cluster(
    bin: &Path,
    edits: usize,
    writers: usize,
    secs: u64,
) -> Result<Vec<Value>, Error> {
    let mut rows = Vec::new();
    {
        let sled = ServerProcess::start(bin)?;
        rows.push(fanout("sled", "same_node", &sled, &sled, &[&sled], None, edits).await?);
        rows.push(durability("sled", &[&sled], None, writers, secs).await?);
    }
    let pg = Postgres::start()?;
    let relay = Relay::default();
    let url = format!("postgresql://cubby@127.0.0.1:{}/postgres", relay.start(pg.port).await?);
    let first = ServerProcess::start_node(bin, Some(&url), None)?;
    let second = ServerProcess::start_node(bin, Some(&url), Some(&first))?;
    let third = ServerProcess::start_node(bin, Some(&url), Some(&first))?;
    let all = [&first, &second, &third];
    rows.push(fanout("postgres", "same_node", &first, &first, &all, Some(&pg), edits).await?);
    rows.push(fanout("postgres", "cross_node", &first, &second, &all, Some(&pg), edits).await?);
    rows.push(durability("postgres", &[&first], Some((&pg, &relay)), writers, secs).await?);
    rows.push(durability("postgres", &all, Some((&pg, &relay)), writers, secs).await?);
    Ok(rows)
}
