//! The Rust SDK's figures that the bindings' are compared with (`client/ffi/bench.sh` runs this
//! and `python/bench.py` against one release server, one after the other):
//!
//! - device-to-device latency: a `put` on one device until the other device's event for it,
//!   over `EDITS` isolated one-field edits (p50, p99);
//! - cold start to first sync: a new device, from `build` until it holds 100 documents that
//!   another device made;
//! - an idle client's memory: this process's resident set with one client open and synced.
//!
//! Settings: CUBBY_SERVER, CUBBY_CA, CUBBY_TOKEN_COMMAND, EDITS (1000), BENCH_DIR. Prints one
//! JSON object.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cubby_client::{Client, DocEvent, TokenError};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

async fn device(dir: &Path, name: &str) -> Result<Client, Error> {
    let command = env("CUBBY_TOKEN_COMMAND")?;
    let tokens = move |_refresh: bool| {
        let command = command.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                let mut words = command.split_whitespace();
                std::process::Command::new(words.next().unwrap_or_default()).args(words).output()
            })
            .await;
            match out {
                Ok(Ok(out)) if out.status.success() => {
                    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
                }
                _ => Err(TokenError("the token command failed".into())),
            }
        }
    };
    Ok(Client::builder()
        .with_data_dir(dir.join(name))
        .with_local_key([7; 32])
        .with_server(env("CUBBY_SERVER")?)
        .with_ca_pem(std::fs::read(env("CUBBY_CA")?)?)
        .with_token_provider(tokens)
        .with_device_name(name)
        .build()
        .await?)
}

fn quantile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1e3
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let edits: usize = std::env::var("EDITS").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let dir = PathBuf::from(env("BENCH_DIR")?).join("rust");

    let writer = device(&dir, "writer").await?;
    writer.wait_until_synced().await?;
    let idle_rss_kib = rss_kib();
    let reader = device(&dir, "reader").await?;
    let doc = writer.create("latency").await?;
    doc.put("n", serde_json::json!(0)).await?;
    writer.wait_until_synced().await?;
    let far = loop {
        if let Ok(far) = reader.open(doc.id()).await {
            break far;
        }
        reader.wait_until_synced().await?;
    };
    let mut events = far.subscribe();
    let mut samples = Vec::with_capacity(edits);
    for n in 1..=edits {
        let started = Instant::now();
        doc.put("n", serde_json::json!(n)).await?;
        loop {
            if events.recv().await? == DocEvent::Remote && far.to_json()["n"] == n {
                break;
            }
        }
        samples.push(started.elapsed());
    }

    for n in 0..100 {
        writer.create(&format!("cold {n}")).await?.put("n", serde_json::json!(n)).await?;
    }
    writer.wait_until_synced().await?;
    let started = Instant::now();
    let fresh = device(&dir, "fresh").await?;
    fresh.wait_until_synced().await?;
    let cold_start = started.elapsed();
    let held = fresh.list().await?.len();
    assert!(held >= 100, "the fresh device holds {held} documents");

    println!(
        "{}",
        serde_json::json!({
            "sdk": "rust",
            "edits": edits,
            "latency_p50_ms": quantile(&mut samples, 0.5),
            "latency_p99_ms": quantile(&mut samples, 0.99),
            "cold_start_100_docs_ms": cold_start.as_secs_f64() * 1e3,
            "idle_client_rss_kib": idle_rss_kib,
        })
    );
    for client in [writer, reader, fresh] {
        client.shutdown().await;
    }
    Ok(())
}
