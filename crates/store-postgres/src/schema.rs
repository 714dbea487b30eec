//! The database schema, and its migrations applied at open.

use cubby_store::{Result, StoreError};
use tokio_postgres::Client;

use crate::backend;

/// Every migration, in order: migration `n` (from 1) brings the schema to version `n`. Never
/// change one that shipped; add the next.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema. Ids are 16 bytes; every value is sealed by the encryption decorator
    // before it gets here, so the database sees ciphertext and keyed ids only. Sealed bytes do
    // not compress: the large columns are stored out of line uncompressed.
    "CREATE TABLE keys (
        customer bytea PRIMARY KEY,
        wrapped bytea NOT NULL
    );
    -- Each customer's last feed position: the row lock taken to move it orders the customer's
    -- writes, so positions commit in order and a reader never sees one before an earlier one.
    CREATE TABLE feed_heads (
        customer bytea PRIMARY KEY,
        last bigint NOT NULL
    );
    -- Each document's latest feed position (a deleted document keeps its entry).
    CREATE TABLE feed (
        customer bytea NOT NULL,
        doc bytea NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (customer, doc)
    );
    CREATE UNIQUE INDEX feed_by_seq ON feed (customer, seq) INCLUDE (doc);
    -- Live documents: metadata, and the position it was written for.
    CREATE TABLE docs (
        customer bytea NOT NULL,
        doc bytea NOT NULL,
        seq bigint NOT NULL,
        meta bytea NOT NULL,
        PRIMARY KEY (customer, doc)
    );
    CREATE TABLE snapshots (
        customer bytea NOT NULL,
        doc bytea NOT NULL,
        id bytea NOT NULL,
        bytes bytea NOT NULL,
        PRIMARY KEY (customer, doc)
    );
    ALTER TABLE snapshots ALTER COLUMN bytes SET STORAGE EXTERNAL;
    CREATE TABLE chunks (
        customer bytea NOT NULL,
        doc bytea NOT NULL,
        id bytea NOT NULL,
        bytes bytea NOT NULL,
        PRIMARY KEY (customer, doc, id)
    );
    ALTER TABLE chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;
    CREATE TABLE records (
        customer bytea NOT NULL,
        space smallint NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (customer, space, key)
    );",
    // 2: the change bus (`bus.rs`). Every move in the feed is also logged in `bus_changes`
    // (the feed keeps only each document's last), with the node that wrote it (`writer`, from
    // the `writers` sequence, one per open store) and its transaction (`txid`); other nodes
    // read the entries their last snapshot did not show. Erasures, revocations and epochs go
    // to `bus_events`, read the same way. Entries are kept ten minutes, events an hour.
    "CREATE SEQUENCE writers;
    CREATE TABLE bus_changes (
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        writer bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        customer bytea NOT NULL,
        doc bytea NOT NULL,
        seq bigint NOT NULL
    );
    CREATE INDEX bus_changes_by_txid ON bus_changes (txid);
    CREATE INDEX bus_changes_by_age ON bus_changes (at);
    CREATE TABLE bus_events (
        id bigserial PRIMARY KEY,
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        writer bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        event bytea NOT NULL
    );
    CREATE INDEX bus_events_by_txid ON bus_events (txid);",
];

/// The schema version this code writes and reads.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// An arbitrary constant: the advisory lock that keeps nodes starting at once from migrating
/// together.
const MIGRATION_LOCK: i64 = 0x6375_6262_7973_716c;

/// Brings the schema to [`VERSION`], in one transaction under an advisory lock, and refuses a
/// schema newer than this code (a newer Cubby migrated it; running this one could lose data).
pub(crate) async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await.map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(backend)?;
    // `IF NOT EXISTS` says so in a notice, every start: not worth a log line.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(backend)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS cubby_schema (version integer NOT NULL)")
        .await
        .map_err(backend)?;
    let found: Option<i32> = tx
        .query_opt("SELECT version FROM cubby_schema", &[])
        .await
        .map_err(backend)?
        .map(|row| row.get(0));
    let found = match found {
        Some(version) => version,
        None => {
            tx.execute("INSERT INTO cubby_schema (version) VALUES (0)", &[])
                .await
                .map_err(backend)?;
            0
        }
    };
    if found > VERSION {
        return Err(StoreError::Format { found: found as u32, expected: VERSION as u32 });
    }
    for migration in &MIGRATIONS[found as usize..] {
        tx.batch_execute(migration).await.map_err(backend)?;
    }
    tx.execute("UPDATE cubby_schema SET version = $1", &[&VERSION]).await.map_err(backend)?;
    tx.commit().await.map_err(backend)
}

/// Refuses a database that would lose acknowledged writes in a crash: Cubby acknowledges a
/// change once its transaction commits.
pub(crate) async fn check_durability(client: &Client) -> Result<()> {
    for (setting, unsafe_value) in [("fsync", "off"), ("synchronous_commit", "off")] {
        let value: String =
            client.query_one(&format!("SHOW {setting}"), &[]).await.map_err(backend)?.get(0);
        if value == unsafe_value {
            return Err(StoreError::Backend(
                format!(
                    "the database runs with {setting} = {value}: a crash would lose changes \
                     Cubby acknowledged; set it on"
                )
                .into(),
            ));
        }
    }
    Ok(())
}
