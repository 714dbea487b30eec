//! `cubby-server`: the Cubby sync server.
//!
//! [`start`] opens the encrypted store, verifies the master key, binds the listener and serves
//! the gRPC services (Sync, Account, health, reflection) over TLS 1.3; [`RunningServer::shutdown`]
//! stops it and waits until every write is flushed and the store is closed.
//!
//! This file is the composition root: [`start`] and [`start_on`] build the parts and wire them.
//! Modules, from the edge inwards: [`config`] (TOML settings), [`tls`] (certificates and the
//! handshake), `listen` (accepting connections), [`auth`] (tokens), `customers` (who may act now:
//! erased accounts, revoked tokens, open streams), `sync`, `account` and `admin` (the services;
//! `frames` is the sync stream's wire), `shared` (what the services share), `devices`, `audit`
//! and `rights` (device registry, audit log, export and erasure), `docs` (one actor per live
//! document), [`bus`] (what the nodes sharing a store tell each other), `hub` (per-customer
//! change announcements), `durable` (group commit), `keys` (KEK rotation), `restore`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cubby_core::history::CompactionPolicy;
use cubby_crypto::keys::{Keyring, MasterSecret};
use cubby_proto::{ApiError, pb};
use cubby_store::witness::Witness;
use cubby_store::{EncryptedStore, Store, StoreError};
use cubby_store_postgres::PgStore;
use cubby_store_sled::{SledStore, WitnessDir};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod account;
mod admin;
mod audit;
pub mod auth;
pub mod backup;
pub mod bus;
pub mod config;
mod customers;
mod devices;
mod docs;
mod durable;
mod frames;
mod health;
mod hub;
mod idp;
mod keys;
mod listen;
mod metrics;
mod quota;
mod reflection;
mod restore;
mod rights;
mod rpc;
mod running;
mod shared;
mod start_error;
mod sync;
pub mod tls;

pub use config::{ConfigError, Limits, ServerConfig, TenantConfig, TlsConfig};
pub use listen::Listener;
pub use restore::{Restored, restore};
pub use running::RunningServer;
pub(crate) use shared::Shared;
pub use start_error::StartError;

/// The encrypted store every part of the server writes through.
pub(crate) type Vault = EncryptedStore<Arc<dyn Store>>;

/// Where synchronous storage work runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageWork {
    /// On tokio's blocking pool, and group commit on its own thread: a real server.
    #[default]
    BlockingPool,
    /// On the calling task, and group commit as a task: for a deterministic simulation, whose
    /// store lives in memory and never blocks. Exports still run on the blocking pool.
    Inline,
}

impl StorageWork {
    /// Runs `work` here or on the blocking pool. A panic inside it becomes `INTERNAL` either way.
    pub(crate) async fn run<T: Send + 'static>(
        self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        match self {
            Self::Inline => std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|_| ApiError::Internal),
            Self::BlockingPool => {
                tokio::task::spawn_blocking(work).await.map_err(|_| ApiError::Internal)
            }
        }
    }
}

/// The master key file the config names (or the development default in the data directory).
pub fn master_key_path(config: &ServerConfig) -> PathBuf {
    config.master_key_file.clone().unwrap_or_else(|| config.data.join("master.key"))
}

/// The store directory inside the data directory.
pub fn store_path(config: &ServerConfig) -> PathBuf {
    config.data.join("db")
}

/// The witness directory the config names (or `<data>/witness`).
pub fn witness_path(config: &ServerConfig) -> PathBuf {
    config.witness_dir.clone().unwrap_or_else(|| config.data.join("witness"))
}

fn master_key(config: &ServerConfig) -> Result<(MasterSecret, Option<PathBuf>), StartError> {
    let path = master_key_path(config);
    if config.master_key_file.is_some() || path.exists() {
        Ok((MasterSecret::read(&path)?, None))
    } else {
        Ok((MasterSecret::create(&path)?, Some(path)))
    }
}

/// What a server runs on besides its configuration: where it stores, how it takes
/// connections, and where storage work runs. [`start`] uses the machine (sled in the data
/// directory, a TCP listener on `listen`, the blocking pool); the deterministic simulation
/// supplies an in-memory disk and a simulated network.
pub struct Platform<L> {
    /// The storage backend. The server seals everything it writes with the master key.
    pub store: Arc<dyn Store>,
    /// Where connections come from.
    pub listener: L,
    /// Where synchronous storage work runs.
    pub work: StorageWork,
    /// The time of day tokens are judged by.
    pub clock: auth::Clock,
    /// Where the store's anchor and ledger live, which a restore of the store must not reach.
    /// `None` for a node of several sharing one store: their store has no witness yet.
    pub witness: Option<Arc<dyn Witness>>,
    /// What the nodes sharing the store tell each other ([`bus::LocalBus`] for one node, or
    /// for the nodes of one process).
    pub bus: Arc<dyn bus::Bus>,
}

/// Starts a server on this machine. Returns once it is listening.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    create_data_dir(&config)?;
    // The port before the key: a start refused for a port in use creates no key, so the start
    // that does create it is the one that says so ("back it up").
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let metrics_listener = bind_metrics(&config).await?;
    // The key before the store: without it nothing may be written.
    let master = master_key(&config)?;
    let Backing { store, witness, bus } = open_store(&config).await?;
    // The control socket serves backups of the embedded store; a database is backed up with
    // its own tools, and several nodes may share one data directory.
    let embedded = witness.is_some();
    let platform = Platform {
        store,
        listener,
        work: StorageWork::BlockingPool,
        clock: auth::Clock::System,
        bus,
        witness,
    };
    let extras = Extras { metrics: metrics_listener, control_socket: embedded };
    launch(config, master, platform, extras).await
}

/// A server's storage, and how it hears the other nodes on it.
struct Backing {
    store: Arc<dyn Store>,
    witness: Option<Arc<dyn Witness>>,
    bus: Arc<dyn bus::Bus>,
}

/// The configured backend: sled in the data directory, with the witness beside it, for this
/// node alone; or the PostgreSQL database, which nodes share, hearing each other through it
/// (`bus::postgres`), and whose writes are durable at commit (no witness: several nodes cannot
/// yet share one).
async fn open_store(config: &ServerConfig) -> Result<Backing, StartError> {
    match config.storage.backend()? {
        (config::Backend::Postgres, Some(url)) => {
            let (config_, url) = (config.clone(), url.to_owned());
            let store = tokio::task::spawn_blocking(move || connect_postgres(&config_, &url))
                .await
                .map_err(|_| ConfigError("opening the database panicked".into()))??;
            let store = Arc::new(store);
            let poll = Duration::from_millis(config.storage.bus_poll_ms);
            let bus = bus::log::LogBus::start(store.clone(), config.storage.bus, poll);
            Ok(Backing { store, witness: None, bus: Arc::new(bus) })
        }
        _ => {
            let db_path = store_path(config);
            let sled = SledStore::open(&db_path)
                .map_err(|source| StartError::Store { path: db_path.clone(), source })?;
            let witness = WitnessDir::open(&witness_path(config))
                .map_err(|source| StartError::Store { path: witness_path(config), source })?;
            Ok(Backing {
                store: Arc::new(sled),
                witness: Some(Arc::new(witness)),
                bus: Arc::new(bus::LocalBus::default()),
            })
        }
    }
}

/// Connects to the configured PostgreSQL database at `url` (blocking).
fn connect_postgres(config: &ServerConfig, url: &str) -> Result<PgStore, StartError> {
    let ca = match &config.storage.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            ConfigError(format!("cannot read storage.ca_file {}: {e}", path.display()))
        })?),
        None => None,
    };
    PgStore::connect(url, ca.as_deref()).map_err(StartError::Database)
}

/// Every wrapped data key in the configured store, as `cubby-server keys retire` counts them:
/// from the embedded store's key files (the server may be running), or from the database.
pub fn wrapped_keys(config: &ServerConfig) -> Result<Vec<Vec<u8>>, StartError> {
    use cubby_store::Keys;
    match config.storage.backend()? {
        (config::Backend::Postgres, Some(url)) => {
            let store = connect_postgres(config, url)?;
            let mut keys = Vec::new();
            for customer in store.list_customers().map_err(StartError::Database)? {
                keys.extend(store.get_key(&customer).map_err(StartError::Database)?);
            }
            Ok(keys)
        }
        _ => {
            let path = store_path(config);
            cubby_store_sled::wrapped_keys(&path)
                .map_err(|source| StartError::Store { path, source })
        }
    }
}

/// What a server on this machine has besides its platform.
struct Extras {
    /// The metrics listener, bound before anything else is made.
    metrics: Option<tokio::net::TcpListener>,
    /// Whether to serve backups on `<data>/control.sock`.
    control_socket: bool,
}

/// Binds the metrics listener, if one is configured.
async fn bind_metrics(
    config: &ServerConfig,
) -> Result<Option<tokio::net::TcpListener>, StartError> {
    let Some(addr) = config.metrics.listen else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    Ok(Some(listener))
}

/// Starts a server on `platform`. Returns once it is listening.
pub async fn start_on<L: Listener>(
    config: ServerConfig,
    platform: Platform<L>,
) -> Result<RunningServer, StartError> {
    create_data_dir(&config)?;
    let metrics_listener = bind_metrics(&config).await?;
    let master = master_key(&config)?;
    let extras = Extras { metrics: metrics_listener, control_socket: false };
    launch(config, master, platform, extras).await
}

fn create_data_dir(config: &ServerConfig) -> Result<(), StartError> {
    std::fs::create_dir_all(&config.data).map_err(|e| {
        ConfigError(format!("cannot create data directory {}: {e}", config.data.display())).into()
    })
}

async fn launch<L: Listener>(
    config: ServerConfig,
    (master, master_key_created): (MasterSecret, Option<PathBuf>),
    platform: Platform<L>,
    Extras { metrics: metrics_listener, control_socket }: Extras,
) -> Result<RunningServer, StartError> {
    tls::install_ring_provider();
    let metrics = Arc::new(metrics::Metrics::default());
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    if config.limits.max_message_bytes < 2 * cubby_proto::parts::PART_BYTES {
        return Err(ConfigError(
            "limits.max_message_bytes must be at least 2 MiB (sync messages travel in 1 MiB parts)"
                .into(),
        )
        .into());
    }
    let Platform { store: backend, listener, work, clock, witness, bus } = platform;
    let db_path = store_path(&config);
    let keyring = Keyring::from_master(&master);
    let opened = match witness {
        Some(witness) => EncryptedStore::open_witnessed(backend, keyring, witness),
        None => EncryptedStore::open(backend, keyring),
    };
    let vault = match opened {
        Ok(store) => Arc::new(store),
        Err(source) => {
            if let StoreError::Integrity(reason) = &source {
                tracing::error!(%reason, "the store cannot be vouched for; refusing to start");
            }
            return Err(StartError::opening(&config, source));
        }
    };
    let store: Arc<dyn Store> = vault.clone();
    let store_error = |source| StartError::Store { path: db_path.clone(), source };
    let erased = vault.erased_customers().map_err(store_error)?;
    let auth = auth::Authenticator::new(&config, Keyring::from_master(&master), clock)?
        .with_metrics(metrics.clone());
    // Revocations a restored store lacks are put back before anyone is admitted.
    let replayed = devices::replay_revocations(&vault, auth.expired_before()).map_err(|e| {
        StartError::Store {
            path: db_path.clone(),
            source: StoreError::Backend(e.to_string().into()),
        }
    })?;
    if replayed > 0 {
        tracing::warn!(
            replayed,
            "revocations missing from the store were put back from the ledger"
        );
    }
    let customers = customers::Customers::load(vault.clone(), erased, auth.expired_before(), work)
        .map_err(store_error)?;
    drop(master);

    let cert = if config.tls.insecure_plaintext {
        None
    } else {
        Some(match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => {
                tls::CertPaths { cert: cert.clone(), key: key.clone(), self_signed: false }
            }
            (None, None) => tls::ensure_self_signed(&config.data)?,
            _ => return Err(ConfigError("tls: set both cert and key, or neither".into()).into()),
        })
    };
    let served_cert = cert.as_ref().map(tls::ServedCert::load).transpose()?.map(Arc::new);
    let tls_config = served_cert.clone().map(tls::server_config).transpose()?;

    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr: config.listen, source })?;

    let limits = config.limits.clone();
    let stop = CancellationToken::new();
    let hangup = CancellationToken::new();
    let tracker = TaskTracker::new();
    let hub = Arc::new(hub::Hub::default());
    let (health, health_service) = tonic_health::server::health_reporter();
    let storage_health =
        health::StorageHealth::watch(store.clone(), health.clone(), work, &tracker, stop.clone());
    let on_failure = {
        let storage_health = storage_health.clone();
        Box::new(move || storage_health.failed())
    };
    let node: bus::NodeId = u64::from_be_bytes(cubby_crypto::random_array());
    let (committer, commit) = durable::Committer::start(
        store.clone(),
        (bus.clone(), node),
        limits.max_commit_batch,
        on_failure,
        work,
        metrics.clone(),
    );
    let quotas = Arc::new(quota::Quotas::new(
        quota::QuotaLimits {
            max_document_bytes: limits.max_document_bytes,
            max_customer_bytes: limits.max_customer_bytes,
            writes_per_sec: limits.max_writes_per_sec,
        },
        metrics.clone(),
    ));
    let docs = docs::Docs::new(docs::Ctx {
        quotas: quotas.clone(),
        store: store.clone(),
        commit,
        idle: Duration::from_secs(limits.idle_document_secs),
        apply_deadline: Duration::from_millis(limits.apply_deadline_ms.max(1)),
        policy: CompactionPolicy {
            max_chunks: limits.compact_after_chunks.max(1),
            ..CompactionPolicy::default()
        },
        tracker: tracker.clone(),
        stop: stop.clone(),
        work,
        metrics: metrics.clone(),
    });
    let live_docs = docs.clone();
    auth.start_refreshing(&tracker, stop.clone()).await;
    if let Some(served) = served_cert {
        let every = Duration::from_secs(limits.cert_reload_secs.max(1));
        served.spawn_reload(every, &tracker, stop.clone());
    }
    keys::spawn_rotation(
        vault.clone(),
        master_key_path(&config),
        Duration::from_secs(limits.key_reload_secs.max(1)),
        work,
        &tracker,
        stop.clone(),
    );
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        auth,
        store,
        customers,
        quotas,
        devices: devices::Devices::default(),
        docs,
        hub,
        bus: bus.clone(),
        node,
        limits: limits.clone(),
        tracker: tracker.clone(),
        stop: stop.clone(),
        work,
        part_budgets: sync::PartBudgets::default(),
        vault: vault.clone(),
    });

    #[cfg(unix)]
    if control_socket {
        let flushed = vault.clone();
        let flushes = Arc::new(move || flushed.flushes());
        let store: Arc<dyn Store> = vault.clone();
        if let Err(err) = backup::serve(&config.data, store, flushes, &tracker, stop.clone()) {
            tracing::warn!(%err, socket = %backup::socket_path(&config.data).display(),
                "cannot open the control socket: `cubby-server backup` needs the server stopped");
        }
    }
    #[cfg(not(unix))]
    let _ = control_socket;
    if let Some(listener) = metrics_listener {
        let live = Arc::downgrade(&shared);
        let scrape = Arc::new(move || {
            let Some(shared) = live.upgrade() else { return metrics::Live::default() };
            let (devices, streams) = shared.customers.connected();
            metrics::Live {
                devices,
                streams,
                documents: shared.docs.live() as u64,
                key_loads: shared.auth.key_loads(),
            }
        });
        metrics::serve(listener, metrics.clone(), scrape, &tracker, stop.clone());
    }

    // Held weakly: a node that shut down stops hearing the bus, and nothing it holds outlives it.
    let hearing = Arc::downgrade(&shared);
    bus.subscribe(Arc::new(move |envelope: &bus::Envelope| {
        if let Some(shared) = hearing.upgrade() {
            shared.on_event(envelope);
        }
    }));
    health::set(&health, true).await;
    let (reflection, reflection_v1alpha) = reflection::service(&[
        cubby_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ])
    .map_err(|e| ConfigError(format!("reflection: {e}")))?;
    let max = limits.max_message_bytes;
    let sync_service =
        pb::sync_server::SyncServer::new(sync::SyncService { shared: shared.clone() })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
    let account_service =
        pb::account_server::AccountServer::new(account::AccountService { shared: shared.clone() })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
    let admin_service = pb::admin_server::AdminServer::new(admin::AdminService { shared })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let described = [
        cubby_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let router = tonic::transport::Server::builder()
        .layer(rpc::RpcLayer::new(&described, metrics.clone()))
        .layer(tonic::service::InterceptorLayer::new(listen::refuse_over_limit))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_secs)))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(sync_service)
        .add_service(account_service)
        .add_service(admin_service);

    let shutdown = stop.clone().cancelled_owned();
    let gate = listen::Gate::new(listen::GateLimits::from_config(&limits));
    let serve = match tls_config {
        Some(tls_config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
            let incoming =
                listen::tls(gate, listener, acceptor, &tracker, stop.clone(), hangup.clone());
            let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
        None => {
            tracing::warn!("serving PLAINTEXT: for local development behind a trusted proxy only");
            let incoming =
                listen::plaintext(gate, listener, &tracker, stop.clone(), hangup.clone());
            let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    Ok(RunningServer {
        addr,
        metrics_addr,
        cert,
        master_key_created,
        stop,
        hangup,
        grace: Duration::from_secs(limits.shutdown_grace_secs),
        tracker,
        serve,
        committer,
        docs: live_docs,
        vault,
        work,
    })
}
