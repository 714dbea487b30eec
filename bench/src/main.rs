//! `cubby-bench`: Cubby's load generator.
//!
//! Runs Cubby's workloads against the real `cubby-server` binary (its own process, so its CPU
//! time and memory are its own) with real SDK devices over TLS on loopback, and measures in the
//! same run the limits those figures stand against: a bare gRPC stream over the same TLS, the
//! cipher, `fdatasync`, sled, and Automerge. One JSON object per line on stdout; a summary
//! with each Cubby figure beside its limit on stderr.
//!
//! ```text
//! cargo build --release -p cubby-server -p cubby-bench
//! target/release/cubby-bench [all|limits|fanout|flat|burst|idle|durability|large|reconnect|peers|cluster]
//!     [--quick] [--server PATH]
//! ```
//!
//! `cluster` (not part of `all`) runs sled and PostgreSQL side by side: fan-out on one node and
//! across two, durable acknowledgements on one node and three, and what a group commit costs the
//! database; it starts a PostgreSQL 15 of its own (`CUBBY_BENCH_PG_BIN`, default
//! `/usr/lib/postgresql/15/bin`). `peers` (part of `all`) runs the fan-out and idle workloads against automerge-repo's sync
//! server, samod and y-sweet; `bench/peers/install.sh` installs them, and `bench/run.sh` runs both.

mod limits;
mod peers;
mod server;
mod stats;
mod workloads;

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod echo {
    tonic::include_proto!("cubby.bench");
}

use std::path::PathBuf;

use serde_json::Value;

type Error = Box<dyn std::error::Error + Send + Sync>;

const WORKLOADS: [&str; 11] = [
    "all",
    "limits",
    "fanout",
    "flat",
    "burst",
    "idle",
    "durability",
    "large",
    "reconnect",
    "peers",
    "cluster",
];

fn usage() -> String {
    format!("usage: cubby-bench [{}] [--quick] [--server PATH]", WORKLOADS.join("|"))
}

fn main() {
    if let Err(err) = run() {
        eprintln!("cubby-bench: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Error> {
    let mut what = None;
    let mut quick = false;
    let mut server = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            "--quick" => quick = true,
            "--server" => server = Some(PathBuf::from(args.next().ok_or("--server needs a path")?)),
            _ if arg.starts_with('-') => {
                return Err(format!("unknown option {arg}\n{}", usage()).into());
            }
            _ if what.is_some() => {
                return Err(format!("one workload at a time\n{}", usage()).into());
            }
            _ => what = Some(arg),
        }
    }
    let what = what.unwrap_or_else(|| "all".to_owned());
    let what = what.as_str();
    if what == "echo-server" {
        // The idle-connection limit's service, in a process of its own (see `limits`).
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(limits::serve_echo());
    }
    if !WORKLOADS.contains(&what) {
        return Err(format!("no workload named {what}\n{}", usage()).into());
    }
    let server = match server {
        Some(path) => path,
        // Built beside this binary by `cargo build -p cubby-server -p cubby-bench`.
        None => std::env::current_exe()?.with_file_name("cubby-server"),
    };
    if !server.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p cubby-server) or pass --server",
            server.display()
        )
        .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results = Vec::new();
    let mut emit = |result: Value| {
        println!("{result}");
        results.push(result);
    };
    let scale = if quick { 10 } else { 1 };
    if matches!(what, "all" | "limits") {
        emit(runtime.block_on(limits::tls_stream(256, 2000 / scale))?);
        emit(runtime.block_on(limits::idle_streams(10_000 / scale))?);
        emit(runtime.block_on(limits::tls_streams_concurrent(64 / scale.min(8), 256, 5))?);
        for size in [256, 4096, 65_536] {
            emit(limits::cipher(size));
        }
        emit(limits::fdatasync(1000 / scale)?);
        emit(limits::sled(20_000 / scale, 256)?);
        emit(limits::automerge(10_000 / scale)?);
        // The fan-out workload's documents: one value overwritten 1,000 times (500 at K = 16).
        for changes in [1000, 500] {
            emit(limits::automerge(changes / scale)?);
        }
    }
    if matches!(what, "all" | "fanout") {
        for receivers in [1, 4, 16] {
            let edits = if receivers == 16 { 500 } else { 1000 } / scale;
            emit(runtime.block_on(workloads::fanout(&server, receivers, edits))?);
        }
    }
    if matches!(what, "all" | "flat") {
        // Isolated changes into a document of 100, 10,000 and 100,000 changes, and typed into
        // a text of 1,000,000 characters.
        for (changes, text) in [(100, 0), (10_000, 0), (100_000, 0), (0, 1_000_000)] {
            emit(runtime.block_on(workloads::flat(
                &server,
                changes / scale,
                text / scale,
                300 / scale,
            ))?);
        }
    }
    if matches!(what, "all" | "burst") {
        emit(runtime.block_on(workloads::burst(&server, 10_000 / scale, 4, 3))?);
    }
    if matches!(what, "all" | "idle") {
        // Ten devices per customer, then one each (a consumer app: most customers have one
        // device connected), which also measures what each connected customer costs.
        for (devices, customers) in [(1000, 1000), (5000, 1000), (10_000, 1000), (10_000, 10_000)] {
            emit(runtime.block_on(workloads::idle(&server, devices / scale, customers / scale))?);
        }
    }
    if matches!(what, "all" | "durability") {
        emit(runtime.block_on(workloads::durability(&server, 64 / scale.min(8), 10))?);
    }
    if matches!(what, "all" | "large") {
        emit(runtime.block_on(workloads::large_account(
            &server,
            1000 / scale,
            200,
            100_000 / scale,
        ))?);
    }
    if matches!(what, "all" | "reconnect") {
        for missing in [1, 100, 1000] {
            emit(runtime.block_on(workloads::reconnect(
                &server,
                2000 / scale,
                missing / scale.min(missing),
            ))?);
        }
        emit(runtime.block_on(workloads::token_renewal(&server, 50 / scale, 5))?);
    }
    // Not part of `all`: it needs PostgreSQL 15 installed (it starts one of its own).
    if what == "cluster" {
        let edits = 500 / scale;
        for row in runtime.block_on(workloads::cluster(&server, edits, 64 / scale.min(8), 10))? {
            emit(row);
        }
    }
    if matches!(what, "all" | "peers") {
        for peer in peers::Peer::ALL {
            // automerge-repo's clients wait out its 100 ms throttle between edits.
            let edits = if peer.gap().is_zero() { 1000 } else { 200 } / scale;
            for receivers in [1, 4, 16] {
                let edits = if receivers == 16 { edits / 2 } else { edits };
                emit(peers::fanout(peer, receivers, edits)?);
            }
            emit(peers::idle(peer, 1000 / scale, 1000 / scale)?);
        }
    }
    summarize(&results);
    Ok(())
}

/// A Cubby fan-out row's server CPU per change against what the limits measured in the same run
/// say the least such a change can cost a server: a bare TLS stream's CPU for a round trip per
/// device involved (the sender's change in and the answer out; each receiver's change out and
/// its acknowledgement in), one 4 KiB write and `fdatasync`, Automerge applying the change to a
/// document of the same history one change at a time, and sealing it.
fn cpu_floor(results: &[Value], r: &Value) -> Option<String> {
    if r["system"] != "cubby" {
        return None;
    }
    let limit = |name: &'static str| results.iter().filter(move |l| l["limit"] == name);
    let round_trip =
        limit("tls_grpc_stream").find_map(|l| l["server_cpu_us_per_round_trip"].as_f64())?;
    let fsync = limit("fdatasync").find_map(|l| l["cpu_us"].as_f64())?;
    let apply = limit("automerge")
        .find(|l| l["changes"] == r["edits"])
        .and_then(|l| l["apply_one_at_a_time_us_per_change"].as_f64())?;
    let seal = limit("aes_256_gcm")
        .find(|l| l["record_bytes"] == 256)
        .and_then(|l| l["seal_us"].as_f64())?;
    let cpu = r["server_cpu_us_per_change"].as_f64()?;
    let devices = r["receivers"].as_f64()? + 1.0;
    let floor = devices * round_trip + fsync + apply + seal;
    Some(format!(
        "CPU {:.1}x the floor of {floor:.0} us: {devices} round trips {:.0}, fdatasync {fsync:.0}, Automerge {apply:.0}, seal {seal:.1}",
        cpu / floor,
        devices * round_trip,
    ))
}

/// Prints each Cubby figure beside its limit, as a ratio.
fn summarize(results: &[Value]) {
    let find = |key: &str, value: &str| results.iter().find(|r| r[key] == value);
    // Round trips to an echo service in a process of its own, as the server is to the devices;
    // in one process too, as runs before the ninth round measured it, for comparison.
    let floor = find("limit", "tls_grpc_stream").and_then(|r| r["rtt_p50_ms"].as_f64());
    let in_process =
        find("limit", "tls_grpc_stream").and_then(|r| r["in_process_rtt_p50_ms"].as_f64());
    let fsync = find("limit", "fdatasync").and_then(|r| r["per_sec_at_p50"].as_f64());
    // Fan-out and idle devices: Cubby and the peers, from this run.
    let y_sweet = |receivers: &Value, key: &str| {
        results
            .iter()
            .find(|r| {
                r["workload"] == "fanout"
                    && r["system"] == "y-sweet"
                    && &r["receivers"] == receivers
            })
            .and_then(|r| r[key].as_f64())
    };
    for r in results.iter().filter(|r| r["workload"] == "fanout") {
        let p50 = r["p50_ms"].as_f64().unwrap_or(0.0);
        let p99 = r["p99_ms"].as_f64().unwrap_or(0.0);
        let mut against = Vec::new();
        if let (Some(f), Some(i)) = (floor, in_process) {
            against.push(format!(
                "{:.1}x two TLS stream round trips, {:.1}x two in one process",
                p50 / (2.0 * f),
                p50 / (2.0 * i)
            ));
        }
        if let Some(floor) = cpu_floor(results, r) {
            against.push(floor);
        }
        if let Some(devices) = r["devices_cpu_us_per_change"].as_f64() {
            against.push(format!("the devices' CPU {devices:.0} us/change"));
        }
        if r["system"] == "cubby"
            && let (Some(y50), Some(y99)) =
                (y_sweet(&r["receivers"], "p50_ms"), y_sweet(&r["receivers"], "p99_ms"))
        {
            against.push(format!("{:.1}x / {:.1}x y-sweet's p50 / p99", p50 / y50, p99 / y99));
        }
        eprintln!(
            "fanout to {:>2}, {:<14} p50 {p50:>6.2} ms, p99 {p99:>6.2} ms, server CPU {:>6.0} us/change, {:>5.0} wire bytes/change ({})",
            r["receivers"],
            r["system"].as_str().unwrap_or("?"),
            r["server_cpu_us_per_change"].as_f64().unwrap_or(0.0),
            r["wire_bytes_per_change"].as_f64().unwrap_or(0.0),
            against.join(", "),
        );
    }
    for r in results.iter().filter(|r| r["workload"] == "token_renewal") {
        eprintln!(
            "{} devices over {} token lifetimes of {} s: {} connections; per device and token lifetime {:.0} wire bytes, {:.0} us of server CPU, {:.1} ms not up to date",
            r["devices"],
            r["token_lifetimes"],
            r["token_life_s"],
            r["connections"],
            r["wire_bytes_per_token_life"].as_f64().unwrap_or(0.0),
            r["server_cpu_us_per_token_life"].as_f64().unwrap_or(0.0),
            r["ms_not_up_to_date_per_token_life"].as_f64().unwrap_or(0.0),
        );
    }
    for r in results.iter().filter(|r| r["workload"] == "reconnect") {
        eprintln!(
            "reconnect after missing {:>4}: {} wire bytes ({} for an empty reconnect), {:.2}x the missing changes' {} bytes",
            r["missing"],
            r["reconnect_wire_bytes"],
            r["empty_reconnect_wire_bytes"],
            r["ratio_to_missing"].as_f64().unwrap_or(0.0),
            r["missing_change_bytes"],
        );
    }
    let idle_floor = find("limit", "idle_tls_grpc_streams")
        .and_then(|r| r["server_bytes_per_connection"].as_f64());
    for r in results.iter().filter(|r| r["workload"] == "idle") {
        let bytes = r["server_bytes_per_device"].as_f64().unwrap_or(0.0);
        let ratio = idle_floor
            .filter(|_| r["system"] == "cubby")
            .map(|f| format!(" ({:.1}x a bare idle TLS gRPC stream)", bytes / f));
        let edit = match r["edit_error"].as_str() {
            Some(error) => format!("one edit failed: {error}"),
            None => format!("one edit p50 {} ms p99 {} ms", r["edit_p50_ms"], r["edit_p99_ms"]),
        };
        let edit = match r.get("metrics_scrape_p50_ms") {
            Some(scrape) if !scrape.is_null() => {
                format!("{edit}, a metrics scrape {scrape} ms (p50)")
            }
            _ => edit,
        };
        eprintln!(
            "{:>5} idle devices of {:>5} customers, {:<14} {bytes:>7} bytes of server memory each{}, server CPU {}% while idle, {:>5} connections/s, {edit}",
            r["devices"],
            r["customers"],
            r["system"].as_str().unwrap_or("?"),
            ratio.unwrap_or_default(),
            r["idle_server_cpu_percent"],
            r["connections_per_sec"],
        );
    }
    for r in results.iter().filter(|r| r["workload"] == "large_account") {
        eprintln!(
            "large account ({} documents, {} bytes at rest): a fresh device synced in {} ms with {} wire bytes ({:.2}x at rest); after a restart, an edit to the large document was acknowledged in {} ms cold, {} ms warm; a keystroke in it reached a device holding it closed in {} ms (p50, max {} ms)",
            r["documents"],
            r["bytes_at_rest"],
            r["fresh_device_ms"],
            r["fresh_device_wire_bytes"],
            r["wire_to_rest_ratio"].as_f64().unwrap_or(0.0),
            r["cold_edit_ack_ms"],
            r["warm_edit_ack_ms"],
            r["background_keystroke_p50_ms"],
            r["background_keystroke_max_ms"],
        );
    }
    for r in results.iter().filter(|r| r["workload"] == "burst") {
        for round in r["rounds"].as_array().into_iter().flatten() {
            eprintln!(
                "burst of {} changes into a document of {}: all {} devices have them after {} ms; server CPU {} us/change",
                r["changes"],
                round["history_before"],
                r["receivers"],
                round["ms_until_all_have_all"],
                round["server_cpu_us_per_change"],
            );
        }
    }
    for r in results.iter().filter(|r| r["workload"] == "durability") {
        let acked = r["acked_changes_per_sec"].as_f64().unwrap_or(0.0);
        let bare = find("limit", "tls_grpc_streams_concurrent")
            .filter(|l| l["streams"] == r["writers"])
            .and_then(|l| l["round_trips_per_sec"].as_f64());
        let ratio = fsync.map(|f| {
            let bare = bare.map(|b| {
                format!(", {:.2}x a bare TLS stream's round trips with as many streams", acked / b)
            });
            format!("{:.1}x one fdatasync per change{}", acked / f, bare.unwrap_or_default())
        });
        eprintln!(
            "durability, {} writers: {acked:.0} acknowledged changes/s ({}), ack p50 {} ms p99 {} ms",
            r["writers"],
            ratio.unwrap_or_default(),
            r["ack_p50_ms"],
            r["ack_p99_ms"],
        );
    }
}
