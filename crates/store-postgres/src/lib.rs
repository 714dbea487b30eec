//! Cubby storage on PostgreSQL: the [`cubby_store`] traits over one database that several
//! `cubby-server` nodes share.
//!
//! Every call is one transaction, committed before it returns: a write is durable when it
//! returns, so [`Store::flush`] has nothing left to do, and a group commit ([`Store::commit`])
//! is one transaction. A customer's feed positions are taken by moving their row of
//! `feed_heads`, whose lock the transaction holds until it commits: one customer's writes commit
//! in position order, on every node, and a reader never sees a position before an earlier one.
//! A batch locks its customers' rows in id order, so two nodes' batches never deadlock.
//!
//! The driver is tokio-postgres, pooled by deadpool-postgres (a lost connection is replaced on
//! the next call), on a runtime of this crate's own: the storage traits block, and their callers
//! run them on blocking threads. The schema is migrated at open ([`schema`]); a schema newer
//! than this code is refused. Values arrive sealed by the encryption decorator, so the database
//! holds sealed values.
//!
//! Here: connecting, TLS and the transactions every call runs in; `writes.rs`: the SQL of each
//! write; `stores.rs`: the traits; `schema.rs`: the tables and their migrations.

use std::future::Future;
use std::sync::OnceLock;

use cubby_store::{Result, StoreError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config, IsolationLevel, NoTls, Row};

pub mod bus;
pub mod schema;

/// Connections a node keeps open at most.
const POOL_SIZE: usize = 8;

/// How long a node waits for a connection (made or taken from the pool) before the call fails.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a batch is tried again when the database aborts it for a serialization failure or
/// a deadlock (it then wrote nothing).
const RETRIES: usize = 5;

/// The storage traits on a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
    /// This store's id among the nodes writing the database, from its `writers` sequence.
    writer: i64,
    /// How to open a connection of its own (the change bus listens on one).
    connect: bus::Connect,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// The runtime the driver runs on, whatever runtime (if any) calls the store.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cubby-postgres")
            .enable_all()
            .build()
            .expect("the operating system refused to start the database driver's threads")
    })
}

/// A database error as a storage error: a full disk is [`StoreError::Full`].
pub(crate) fn backend(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    let err = err.into();
    let full = err
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|code| *code == SqlState::DISK_FULL);
    if full { StoreError::Full } else { StoreError::Backend(err) }
}

/// TLS to the database: rustls on ring, verifying the server against `ca_pem` or Mozilla's
/// roots.
fn tls(ca_pem: Option<&[u8]>) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::RootCertStore;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.map_err(backend)?).map_err(backend)?;
            }
            if roots.is_empty() {
                return Err(StoreError::Backend(
                    "the database CA file has no PEM certificate in it".into(),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(backend)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Whether the database aborted a transaction that may simply be tried again.
fn retryable(err: &StoreError) -> bool {
    let StoreError::Backend(err) = err else { return false };
    err.downcast_ref::<tokio_postgres::Error>().and_then(tokio_postgres::Error::code).is_some_and(
        |code| {
            *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        },
    )
}

impl PgStore {
    /// Connects to the database at `url` (`postgresql://user@host:port/db`, as libpq reads it),
    /// checks that it is durable, and migrates its schema.
    ///
    /// TLS (rustls, on ring) is used with `sslmode=require` in the URL, or whenever `ca_pem` is
    /// given; the server's certificate is then always verified, against `ca_pem` or else
    /// Mozilla's roots (never accepted unverified, as libpq's `require` would). Without either,
    /// the connection is plain: for a private network or a local socket.
    pub fn connect(url: &str, ca_pem: Option<&[u8]>) -> Result<Self> {
        let config: Config = url.parse().map_err(backend)?;
        Self::with_config(config, ca_pem)
    }

    /// As [`PgStore::connect`], from a parsed configuration.
    pub fn with_config(mut config: Config, ca_pem: Option<&[u8]>) -> Result<Self> {
        // A database that went away must not hold calls up for ever: a node reports it and
        // refuses writes instead.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(TIMEOUT);
        }
        let settings = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let plain = config.get_ssl_mode() == SslMode::Disable
            || (config.get_ssl_mode() == SslMode::Prefer && ca_pem.is_none());
        let tls = if plain { None } else { Some(tls(ca_pem)?) };
        let connect = bus::Connect { config: config.clone(), tls: tls.clone() };
        let manager = match tls {
            None => Manager::from_config(config, NoTls, settings),
            Some(tls) => Manager::from_config(config, tls, settings),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(backend)?;
        let mut store = Self { pool, writer: 0, connect };
        store.writer = store.block(async {
            let mut client = store.client().await?;
            schema::check_durability(&client).await?;
            schema::migrate(&mut client).await?;
            let row = client.query_one("SELECT nextval('writers')", &[]).await.map_err(backend)?;
            Ok(row.get::<_, i64>(0))
        })?;
        Ok(store)
    }

    /// Runs `work` on the driver's runtime and waits for it. The traits block, and their
    /// callers call them from blocking threads, from plain threads, and now and then from an
    /// async task of a multi-thread runtime (the server opening its store): that task's worker
    /// hands its other tasks over while it waits ([`tokio::task::block_in_place`]).
    fn block<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|handle| handle.runtime_flavor()) {
            Err(_) => runtime().block_on(work),
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| runtime().block_on(work))
            }
            Ok(_) => Err(StoreError::Backend(
                "the PostgreSQL store blocks: call it from a blocking thread, not from a \
                 single-threaded async runtime"
                    .into(),
            )),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(backend)
    }

    /// Runs `work` in one transaction and commits it, trying again when the database aborted
    /// it for a conflict with another node's (nothing of it was written then).
    fn transaction<T>(&self, work: impl AsyncFn(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.block(async {
            let mut client = self.client().await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let tx = Tx(client.transaction().await.map_err(backend)?);
                let outcome = match work(&tx).await {
                    Ok(value) => tx.0.commit().await.map_err(backend).map(|()| value),
                    Err(err) => Err(err),
                };
                match outcome {
                    Err(err) if attempt < RETRIES && retryable(&err) => continue,
                    outcome => return outcome,
                }
            }
        })
    }

    /// Runs `work` in a read-only transaction that sees one snapshot of the database.
    fn read<T>(&self, work: impl AsyncFn(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(backend)?;
            let tx = Tx(tx);
            let value = work(&tx).await?;
            tx.0.commit().await.map_err(backend)?;
            Ok(value)
        })
    }
}

/// A transaction whose statements are prepared once per connection and kept
/// (`prepare_cached`): a statement then costs one round trip to the database, not two (parse,
/// then bind and execute). Statements of one transaction sent together (`try_join!`) share
/// round trips too: the driver pipelines them.
pub(crate) struct Tx<'a>(deadpool_postgres::Transaction<'a>);

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Tx<'_> {
    pub(crate) async fn execute(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> std::result::Result<u64, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.execute(&statement, params).await
    }

    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query(&statement, params).await
    }

    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> std::result::Result<Row, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_one(&statement, params).await
    }

    pub(crate) async fn query_opt(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> std::result::Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_opt(&statement, params).await
    }
}

mod stores;
mod writes;

#[cfg(test)]
mod tests;
