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
//! holds ciphertext and keyed ids only.

use std::future::Future;
use std::sync::OnceLock;

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_store::{
    Chunk, DocRecords, Docs, Keys, MetaAt, Records, Result, Snapshot, Space, Store, StoreError,
    Write,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Config, IsolationLevel, NoTls, Transaction};

pub mod schema;

/// Connections a node keeps open at most.
const POOL_SIZE: usize = 8;

/// How often a batch is tried again when the database aborts it for a serialization failure or
/// a deadlock (it then wrote nothing).
const RETRIES: usize = 5;

/// The storage traits on a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
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
    pub fn with_config(config: Config, ca_pem: Option<&[u8]>) -> Result<Self> {
        let settings = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let plain = config.get_ssl_mode() == SslMode::Disable
            || (config.get_ssl_mode() == SslMode::Prefer && ca_pem.is_none());
        let manager = if plain {
            Manager::from_config(config, NoTls, settings)
        } else {
            Manager::from_config(config, tls(ca_pem)?, settings)
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(backend)?;
        let store = Self { pool };
        store.block(async {
            let mut client = store.client().await?;
            schema::check_durability(&client).await?;
            schema::migrate(&mut client).await
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
    fn transaction<T>(&self, work: impl AsyncFn(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.block(async {
            let mut client = self.client().await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let tx = client.transaction().await.map_err(backend)?;
                let outcome = match work(&tx).await {
                    Ok(value) => tx.commit().await.map_err(backend).map(|()| value),
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
    fn read<T>(&self, work: impl AsyncFn(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(backend)?;
            let value = work(&tx).await?;
            tx.commit().await.map_err(backend)?;
            Ok(value)
        })
    }
}

fn id_bytes(bytes: &[u8], what: &'static str) -> Result<[u8; 16]> {
    bytes.try_into().map_err(|_| StoreError::Corrupt(what))
}

fn seq_of(value: i64) -> Seq {
    Seq(u64::try_from(value).unwrap_or(0))
}

fn space_of(space: Space) -> i16 {
    i16::from(space.0)
}

/// Locks the feed heads of `customers`, in id order, creating the missing ones: positions
/// are then taken by this transaction alone until it commits.
async fn lock_heads(tx: &Transaction<'_>, customers: &[&CustomerId]) -> Result<()> {
    let mut ids: Vec<&[u8]> = customers.iter().map(|c| &c.as_bytes()[..]).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        tx.execute(
            "INSERT INTO feed_heads (customer, last) VALUES ($1, 0)
             ON CONFLICT (customer) DO UPDATE SET last = feed_heads.last",
            &[&id],
        )
        .await
        .map_err(backend)?;
    }
    Ok(())
}

/// Takes the customer's next feed position for `doc` (its head must be locked).
async fn take_position(tx: &Transaction<'_>, customer: &CustomerId, doc: &DocId) -> Result<Seq> {
    let c = &customer.as_bytes()[..];
    let seq: i64 = tx
        .query_one(
            "UPDATE feed_heads SET last = last + 1 WHERE customer = $1 RETURNING last",
            &[&c],
        )
        .await
        .map_err(backend)?
        .get(0);
    tx.execute(
        "INSERT INTO feed (customer, doc, seq) VALUES ($1, $2, $3)
         ON CONFLICT (customer, doc) DO UPDATE SET seq = EXCLUDED.seq",
        &[&c, &&doc.as_bytes()[..], &seq],
    )
    .await
    .map_err(backend)?;
    Ok(seq_of(seq))
}

async fn write_doc(
    tx: &Transaction<'_>,
    customer: &CustomerId,
    doc: &DocId,
    meta: &dyn MetaAt,
    chunk: Option<Chunk<'_>>,
    feed: bool,
) -> Result<Option<Seq>> {
    let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
    let seq = if feed {
        take_position(tx, customer, doc).await?
    } else {
        let row = tx
            .query_opt("SELECT seq FROM feed WHERE customer = $1 AND doc = $2", &[&c, &d])
            .await
            .map_err(backend)?;
        row.map_or(Seq(0), |row| seq_of(row.get(0)))
    };
    let stored = i64::try_from(seq.0).map_err(backend)?;
    tx.execute(
        "INSERT INTO docs (customer, doc, seq, meta) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer, doc) DO UPDATE SET seq = EXCLUDED.seq, meta = EXCLUDED.meta",
        &[&c, &d, &stored, &meta.at(seq)],
    )
    .await
    .map_err(backend)?;
    if let Some(chunk) = chunk {
        tx.execute(
            "INSERT INTO chunks (customer, doc, id, bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&c, &d, &&chunk.id.as_bytes()[..], &chunk.bytes],
        )
        .await
        .map_err(backend)?;
    }
    Ok(feed.then_some(seq))
}

/// A compaction; `Ok(Err(Conflict))` when another writer compacted the document meanwhile
/// (nothing is written, and the transaction goes on).
async fn compact(
    tx: &Transaction<'_>,
    customer: &CustomerId,
    doc: &DocId,
    snapshot: &Snapshot,
    replaces: &[ChunkId],
) -> Result<Result<()>> {
    let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
    let exists = tx
        .query_opt("SELECT 1 FROM docs WHERE customer = $1 AND doc = $2 FOR UPDATE", &[&c, &d])
        .await
        .map_err(backend)?
        .is_some();
    if !exists {
        return Ok(Ok(()));
    }
    let current = tx
        .query_opt("SELECT id FROM snapshots WHERE customer = $1 AND doc = $2", &[&c, &d])
        .await
        .map_err(backend)?;
    if let Some(row) = current {
        let id = ChunkId::from_bytes(id_bytes(row.get(0), "snapshot id")?);
        if !replaces.contains(&id) {
            return Ok(Err(StoreError::Conflict));
        }
    }
    let replaced: Vec<&[u8]> = replaces.iter().map(|id| &id.as_bytes()[..]).collect();
    tx.execute(
        "DELETE FROM chunks WHERE customer = $1 AND doc = $2 AND id = ANY($3)",
        &[&c, &d, &replaced],
    )
    .await
    .map_err(backend)?;
    tx.execute(
        "INSERT INTO snapshots (customer, doc, id, bytes) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer, doc) DO UPDATE SET id = EXCLUDED.id, bytes = EXCLUDED.bytes",
        &[&c, &d, &&snapshot.id.as_bytes()[..], &snapshot.bytes],
    )
    .await
    .map_err(backend)?;
    Ok(Ok(()))
}

async fn delete_doc(tx: &Transaction<'_>, customer: &CustomerId, doc: &DocId) -> Result<Seq> {
    let seq = take_position(tx, customer, doc).await?;
    let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
    for table in ["docs", "snapshots", "chunks"] {
        tx.execute(&format!("DELETE FROM {table} WHERE customer = $1 AND doc = $2"), &[&c, &d])
            .await
            .map_err(backend)?;
    }
    Ok(seq)
}

async fn put_record(
    tx: &Transaction<'_>,
    customer: &CustomerId,
    space: Space,
    key: &[u8],
    value: &[u8],
) -> Result<()> {
    tx.execute(
        "INSERT INTO records (customer, space, key, value) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer, space, key) DO UPDATE SET value = EXCLUDED.value",
        &[&&customer.as_bytes()[..], &space_of(space), &key, &value],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

impl Keys for PgStore {
    fn get_key(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.read(async |tx| {
            let row = tx
                .query_opt(
                    "SELECT wrapped FROM keys WHERE customer = $1",
                    &[&&customer.as_bytes()[..]],
                )
                .await
                .map_err(backend)?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn put_key_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        self.transaction(async |tx| {
            let c = &customer.as_bytes()[..];
            tx.execute(
                "INSERT INTO keys (customer, wrapped) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&c, &wrapped],
            )
            .await
            .map_err(backend)?;
            let row = tx
                .query_one("SELECT wrapped FROM keys WHERE customer = $1", &[&c])
                .await
                .map_err(backend)?;
            Ok(row.get(0))
        })
    }

    fn replace_key(&self, customer: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        self.transaction(async |tx| {
            let replaced = tx
                .execute(
                    "UPDATE keys SET wrapped = $3 WHERE customer = $1 AND wrapped = $2",
                    &[&&customer.as_bytes()[..], &expected, &new],
                )
                .await
                .map_err(backend)?;
            Ok(replaced == 1)
        })
    }

    fn destroy_key(&self, customer: &CustomerId) -> Result<()> {
        self.transaction(async |tx| {
            tx.execute("DELETE FROM keys WHERE customer = $1", &[&&customer.as_bytes()[..]])
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.read(async |tx| {
            let rows = tx
                .query("SELECT customer FROM keys ORDER BY customer", &[])
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|row| Ok(CustomerId::from_bytes(id_bytes(row.get(0), "customer id")?)))
                .collect()
        })
    }
}

impl Docs for PgStore {
    fn write_doc(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        let write = Write::Doc { customer, doc, meta, chunk, feed: true };
        let seq = self.commit(&[write])?.pop().expect("one outcome per write")?;
        Ok(seq.expect("a feed write takes a position"))
    }

    fn write_doc_off_feed(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        let write = Write::Doc { customer, doc, meta, chunk, feed: false };
        self.commit(&[write])?.pop().expect("one outcome per write").map(drop)
    }

    fn load(&self, customer: &CustomerId, doc: &DocId) -> Result<Option<DocRecords>> {
        self.read(async |tx| {
            let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
            let Some(row) = tx
                .query_opt("SELECT seq, meta FROM docs WHERE customer = $1 AND doc = $2", &[&c, &d])
                .await
                .map_err(backend)?
            else {
                return Ok(None);
            };
            let snapshot = tx
                .query_opt(
                    "SELECT id, bytes FROM snapshots WHERE customer = $1 AND doc = $2",
                    &[&c, &d],
                )
                .await
                .map_err(backend)?
                .map(|s| -> Result<Snapshot> {
                    let id = ChunkId::from_bytes(id_bytes(s.get(0), "snapshot id")?);
                    Ok(Snapshot { id, bytes: s.get(1) })
                })
                .transpose()?;
            let chunks = tx
                .query("SELECT id, bytes FROM chunks WHERE customer = $1 AND doc = $2", &[&c, &d])
                .await
                .map_err(backend)?
                .iter()
                .map(|r| Ok((ChunkId::from_bytes(id_bytes(r.get(0), "chunk id")?), r.get(1))))
                .collect::<Result<_>>()?;
            Ok(Some(DocRecords { meta: row.get(1), snapshot, chunks, seq: seq_of(row.get(0)) }))
        })
    }

    fn doc_meta(&self, customer: &CustomerId, doc: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        self.read(async |tx| {
            let row = tx
                .query_opt(
                    "SELECT seq, meta FROM docs WHERE customer = $1 AND doc = $2",
                    &[&&customer.as_bytes()[..], &&doc.as_bytes()[..]],
                )
                .await
                .map_err(backend)?;
            Ok(row.map(|row| (seq_of(row.get(0)), row.get(1))))
        })
    }

    fn compact(
        &self,
        customer: &CustomerId,
        doc: &DocId,
        snapshot: &Snapshot,
        replaces: &[ChunkId],
    ) -> Result<()> {
        let write = Write::Compact { customer, doc, snapshot, replaces };
        self.commit(&[write])?.pop().expect("one outcome per write").map(drop)
    }

    fn delete_doc(&self, customer: &CustomerId, doc: &DocId) -> Result<Seq> {
        let write = Write::Delete { customer, doc };
        let seq = self.commit(&[write])?.pop().expect("one outcome per write")?;
        Ok(seq.expect("a deletion takes a position"))
    }

    fn list_docs(&self, customer: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        self.read(async |tx| {
            let rows = tx
                .query(
                    "SELECT doc, seq, meta FROM docs WHERE customer = $1 ORDER BY doc",
                    &[&&customer.as_bytes()[..]],
                )
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|r| {
                    let doc = DocId::from_bytes(id_bytes(r.get(0), "document id")?);
                    Ok((doc, seq_of(r.get(1)), r.get(2)))
                })
                .collect()
        })
    }

    fn feed_since(&self, customer: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        let cursor = i64::try_from(cursor.0).unwrap_or(i64::MAX);
        self.read(async |tx| {
            let rows = tx
                .query(
                    "SELECT seq, doc FROM feed WHERE customer = $1 AND seq > $2 ORDER BY seq",
                    &[&&customer.as_bytes()[..], &cursor],
                )
                .await
                .map_err(backend)?;
            rows.iter()
                .map(|r| {
                    Ok((seq_of(r.get(0)), DocId::from_bytes(id_bytes(r.get(1), "document id")?)))
                })
                .collect()
        })
    }

    fn feed_head(&self, customer: &CustomerId) -> Result<Seq> {
        self.read(async |tx| {
            let row = tx
                .query_opt(
                    "SELECT last FROM feed_heads WHERE customer = $1",
                    &[&&customer.as_bytes()[..]],
                )
                .await
                .map_err(backend)?;
            Ok(row.map_or(Seq(0), |row| seq_of(row.get(0))))
        })
    }
}

impl Records for PgStore {
    fn put_record(&self, c: &CustomerId, space: Space, key: &[u8], value: &[u8]) -> Result<()> {
        let write = Write::Record { customer: c, space, key, value };
        self.commit(&[write])?.pop().expect("one outcome per write").map(drop)
    }

    fn get_record(&self, c: &CustomerId, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.read(async |tx| {
            let row = tx
                .query_opt(
                    "SELECT value FROM records WHERE customer = $1 AND space = $2 AND key = $3",
                    &[&&c.as_bytes()[..], &space_of(space), &key],
                )
                .await
                .map_err(backend)?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn remove_record(&self, c: &CustomerId, space: Space, key: &[u8]) -> Result<()> {
        self.transaction(async |tx| {
            tx.execute(
                "DELETE FROM records WHERE customer = $1 AND space = $2 AND key = $3",
                &[&&c.as_bytes()[..], &space_of(space), &key],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
    }

    fn scan_records(&self, c: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.read(async |tx| {
            let rows = tx
                .query(
                    "SELECT key, value FROM records WHERE customer = $1 AND space = $2 ORDER BY key",
                    &[&&c.as_bytes()[..], &space_of(space)],
                )
                .await
                .map_err(backend)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }
}

impl Store for PgStore {
    fn erase_customer(&self, customer: &CustomerId) -> Result<()> {
        self.transaction(async |tx| {
            let c = &customer.as_bytes()[..];
            for table in ["docs", "snapshots", "chunks", "feed", "feed_heads", "records"] {
                tx.execute(&format!("DELETE FROM {table} WHERE customer = $1"), &[&c])
                    .await
                    .map_err(backend)?;
            }
            Ok(())
        })
    }

    /// Every write is durable when its transaction commits, before it returns.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn commit(&self, batch: &[Write<'_>]) -> Result<Vec<Result<Option<Seq>>>> {
        self.transaction(async |tx| {
            let takers: Vec<&CustomerId> = batch
                .iter()
                .filter_map(|write| match write {
                    Write::Doc { customer, feed: true, .. } | Write::Delete { customer, .. } => {
                        Some(*customer)
                    }
                    _ => None,
                })
                .collect();
            lock_heads(tx, &takers).await?;
            let mut outcomes = Vec::with_capacity(batch.len());
            for write in batch {
                let outcome = match *write {
                    Write::Doc { customer, doc, meta, chunk, feed } => {
                        Ok(write_doc(tx, customer, doc, meta, chunk, feed).await?)
                    }
                    Write::Compact { customer, doc, snapshot, replaces } => {
                        compact(tx, customer, doc, snapshot, replaces).await?.map(|()| None)
                    }
                    Write::Delete { customer, doc } => {
                        Ok(Some(delete_doc(tx, customer, doc).await?))
                    }
                    Write::Record { customer, space, key, value } => {
                        put_record(tx, customer, space, key, value).await?;
                        Ok(None)
                    }
                };
                outcomes.push(outcome);
            }
            Ok(outcomes)
        })
    }
}

#[cfg(test)]
mod tests;
