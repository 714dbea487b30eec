//! Metrics in the Prometheus (OpenMetrics) text format, served on their own listener
//! (`[metrics] listen`, `--metrics`, `CUBBY_METRICS`) at `/metrics`.
//!
//! Counters and histograms are updated where things happen; what is live (devices, streams,
//! documents, each tenant's key loads) is read at each scrape. Labels are bounded: a method, a
//! status code, a tenant, never a customer.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The content type of a scrape.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A gRPC method and the status code it ended with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RpcLabels {
    pub method: String,
    pub code: &'static str,
}

/// Which way sync traffic went: `received` from devices or `sent` to them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub direction: &'static str,
}

/// What kind of limit refused a write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub kind: &'static str,
}

/// A tenant, by its configured name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TenantLabels {
    pub tenant: String,
}

/// The server's counters and histograms. One per server (tests run several in a process).
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub rpcs: Family<RpcLabels, Counter>,
    pub commit_batch: Histogram,
    pub commit_seconds: Histogram,
    pub apply_seconds: Histogram,
    pub quota_refusals: Family<KindLabels, Counter>,
    pub tokens_refused: Family<TenantLabels, Counter>,
    pub connects: Counter,
    /// The sync counters (messages, bytes) of each direction, looked up once: they are counted
    /// per message.
    received: (Counter, Counter),
    sent: (Counter, Counter),
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cubby");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register("rpcs", "gRPC calls ended, by method and status code", rpcs.clone());
        let sync_messages = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "sync_messages",
            "Automerge sync messages received from and sent to devices",
            sync_messages.clone(),
        );
        let sync_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "sync_bytes",
            "Bytes of Automerge sync messages received from and sent to devices",
            sync_bytes.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "commit_batch_writes",
            "Writes made durable by one group commit",
            commit_batch.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        registry.register(
            "commit_seconds",
            "Time one group commit took, writes and flush",
            commit_seconds.clone(),
        );
        let apply_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "apply_seconds",
            "Time applying one sync message to a document took",
            apply_seconds.clone(),
        );
        let quota_refusals = Family::<KindLabels, Counter>::default();
        registry.register(
            "quota_refusals",
            "Writes refused by a limit: rate, document size, account storage, apply time",
            quota_refusals.clone(),
        );
        let tokens_refused = Family::<TenantLabels, Counter>::default();
        registry.register(
            "tokens_refused",
            "Bearer tokens refused, by the tenant whose issuer they named (\"unknown\": none)",
            tokens_refused.clone(),
        );
        let connects = Counter::default();
        registry.register(
            "device_connects",
            "Devices that proved their key on a stream",
            connects.clone(),
        );
        let direction = |direction| {
            let labels = DirectionLabels { direction };
            (
                sync_messages.get_or_create(&labels).clone(),
                sync_bytes.get_or_create(&labels).clone(),
            )
        };
        let (received, sent) = (direction("received"), direction("sent"));
        Self {
            received,
            sent,
            registry,
            rpcs,
            commit_batch,
            commit_seconds,
            apply_seconds,
            quota_refusals,
            tokens_refused,
            connects,
        }
    }
}

impl Metrics {
    /// Counts a write refused by the limit `kind`.
    pub(crate) fn refused(&self, kind: &'static str) {
        self.quota_refusals.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts one sync message of `bytes` received from a device.
    pub(crate) fn received(&self, bytes: usize) {
        self.received.0.inc();
        self.received.1.inc_by(bytes as u64);
    }

    /// Counts one sync message of `bytes` sent to a device.
    pub(crate) fn sent(&self, bytes: usize) {
        self.sent.0.inc();
        self.sent.1.inc_by(bytes as u64);
    }
}

/// What is live when a scrape comes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Live {
    pub devices: u64,
    pub streams: u64,
    pub documents: u64,
    /// Each tenant's name, key loads tried, and loads failed.
    pub key_loads: Vec<(String, u64, u64)>,
}

/// The text of one scrape.
pub(crate) fn render(metrics: &Metrics, live: &Live) -> String {
    let mut live_registry = Registry::with_prefix("cubby");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    };
    gauge(&mut live_registry, "connected_devices", "Devices with a sync stream open", live.devices);
    gauge(&mut live_registry, "sync_streams", "Sync streams open", live.streams);
    gauge(
        &mut live_registry,
        "live_documents",
        "Documents held in memory by their actor",
        live.documents,
    );
    let loads = Family::<TenantLabels, Counter>::default();
    let failures = Family::<TenantLabels, Counter>::default();
    for (tenant, tried, failed) in &live.key_loads {
        let labels = TenantLabels { tenant: tenant.clone() };
        loads.get_or_create(&labels).inc_by(*tried);
        failures.get_or_create(&labels).inc_by(*failed);
    }
    live_registry.register(
        "jwks_fetches",
        "Loads of a tenant's keys (JWKS URL, discovery, or file) tried",
        loads,
    );
    live_registry.register(
        "jwks_failures",
        "Loads of a tenant's keys that failed (the keys held were kept)",
        failures,
    );
    let info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))]).set(1);
    live_registry.register("build_info", "The server's version", info);

    let mut text = String::with_capacity(8 << 10);
    // Writing into a String cannot fail.
    let _ = encode_registry(&mut text, &metrics.registry);
    let _ = encode_registry(&mut text, &live_registry);
    let _ = encode_eof(&mut text);
    text
}

/// Serves `/metrics` on `listener` until `stop`: plain HTTP/1.1, for a Prometheus on the same
/// network (bind it to a private address). `scrape` reads the live values.
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    scrape: Arc<dyn Fn() -> Live + Send + Sync>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let connections = tracker.clone();
    tracker.spawn(async move {
        let mut failures = crate::listen::AcceptFailures::new("metrics");
        while let Some((stream, _)) = failures.next(&stop, || listener.accept()).await {
            let (metrics, scrape, stop) = (metrics.clone(), scrape.clone(), stop.clone());
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let answer = answer(&request, &metrics, &*scrape);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
                // A scraper that sends nothing is not kept.
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
                }
            });
        }
    });
}

fn answer<B>(
    request: &Request<B>,
    metrics: &Metrics,
    scrape: &(dyn Fn() -> Live + Send + Sync),
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let started = Instant::now();
            let text = render(metrics, &scrape());
            tracing::debug!(took = ?started.elapsed(), bytes = text.len(), "metrics scraped");
            reply(StatusCode::OK, CONTENT_TYPE, text)
        }
        (&Method::GET, _) => {
            reply(StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n".into())
        }
        _ => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics\n".into()),
    }
}
