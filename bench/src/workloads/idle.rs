//! Workload 3: many idle devices, and what they, an edit among them and a metrics scrape cost.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// Workload 3: `devices` idle devices connected across `customers` customers. Reports the
/// server's memory per connected device, the connection rate, and the latency of one edit
/// between two devices of one customer at that scale.
pub(crate) async fn idle(bin: &Path, devices: usize, customers: usize) -> Result<Value, Error> {
    let server = ServerProcess::start(bin)?;
    let baseline = server.rss()?;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(devices);
    for chunk in (0..devices).collect::<Vec<_>>().chunks(100) {
        let batch = join_all(chunk.iter().map(|i| {
            let subject = format!("idle-{}", i % customers);
            let server = &server;
            async move {
                let client = light_device(server, &subject).await?;
                synced(&client).await?;
                Ok::<_, Error>(client)
            }
        }))
        .await;
        for client in batch {
            clients.push(client?);
        }
    }
    let connect_rate = devices as f64 / started.elapsed().as_secs_f64();
    // Let allocations settle, then read the server's memory; its CPU meanwhile is what idle
    // devices cost it.
    let cpu = server.cpu()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu = server.cpu()? - cpu;
    let rss = server.rss()?;
    // What a Prometheus scrape costs with every device connected.
    let mut scrapes = Samples::default();
    let mut scrape_bytes = 0;
    for _ in 0..server.metrics.map_or(0, |_| 50) {
        let Some(addr) = server.metrics else { break };
        let started = Instant::now();
        let text = scrape(addr).await?;
        scrapes.push(started.elapsed());
        scrape_bytes = text.len();
        let seen = text
            .lines()
            .find_map(|l| l.strip_prefix("cubby_connected_devices ")?.trim().parse::<usize>().ok());
        if seen != Some(devices) {
            return Err(format!("the scrape counts {seen:?} devices, not {devices}").into());
        }
    }

    // One edit from customer 0's idle device to one more device of theirs.
    let extra = light_device(&server, "idle-0").await?;
    synced(&extra).await?;
    let (a, b) = (&clients[0], &extra);
    let doc = a.create("edit at scale").await?;
    doc.put("n", json!(0)).await?;
    synced(a).await?;
    let copy = arrived(b, doc.id()).await?;
    let mut latency = Samples::default();
    for n in 1..=100u64 {
        let started = Instant::now();
        let (put, arrived) = tokio::join!(doc.put("n", json!(n)), has(&copy, n));
        put?;
        arrived?;
        latency.push(started.elapsed());
    }
    let per_device = rss.saturating_sub(baseline) / devices as u64;
    for client in clients {
        client.shutdown().await;
    }
    extra.shutdown().await;
    Ok(json!({
        "workload": "idle",
        "system": "cubby",
        "devices": devices,
        "customers": customers,
        "server_rss_bytes": rss,
        "server_bytes_per_device": per_device,
        "connections_per_sec": connect_rate.round(),
        "idle_server_cpu_percent": (idle_cpu.as_secs_f64() / 2.0 * 100.0).round(),
        "edit_p50_ms": ms(latency.quantile(0.5)),
        "edit_p99_ms": ms(latency.quantile(0.99)),
        "metrics_scrape_p50_ms": server.metrics.map(|_| ms(scrapes.quantile(0.5))),
        "metrics_scrape_bytes": scrape_bytes,
    }))
}

/// One `GET /metrics` over plain HTTP/1.1, as Prometheus makes it: the body.
async fn scrape(addr: std::net::SocketAddr) -> Result<String, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (_, body) = response.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    Ok(body.to_owned())
}
