//! The steps of a write inside a transaction, and the conversions between the store's ids and
//! the database's columns. [`Store::commit`](cubby_store::Store::commit) runs them in order, one
//! transaction a batch; every single write is a batch of one.

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_store::{Chunk, MetaAt, Result, Snapshot, Space, StoreError};

use crate::{Tx, backend};

pub(crate) fn id_bytes(bytes: &[u8], what: &'static str) -> Result<[u8; 16]> {
    bytes.try_into().map_err(|_| StoreError::Corrupt(what))
}

pub(crate) fn seq_of(value: i64) -> Seq {
    Seq(u64::try_from(value).unwrap_or(0))
}

pub(crate) fn space_of(space: Space) -> i16 {
    i16::from(space.0)
}

/// Locks the feed heads of `customers`, in id order, creating the missing ones: positions
/// are then taken by this transaction alone until it commits.
pub(crate) async fn lock_heads(tx: &Tx<'_>, customers: &[&CustomerId]) -> Result<()> {
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

/// Takes the customer's next feed position for `doc` (its head must be locked), moves the
/// document there in the feed, and logs the move for the other nodes (`bus.rs`): one statement.
async fn take_position(
    tx: &Tx<'_>,
    writer: i64,
    customer: &CustomerId,
    doc: &DocId,
) -> Result<Seq> {
    let seq: i64 = tx
        .query_one(
            "WITH head AS (
                 UPDATE feed_heads SET last = last + 1 WHERE customer = $1 RETURNING last
             ), moved AS (
                 INSERT INTO feed (customer, doc, seq) SELECT $1, $2, last FROM head
                 ON CONFLICT (customer, doc) DO UPDATE SET seq = EXCLUDED.seq
                 RETURNING customer, doc, seq
             ), logged AS (
                 INSERT INTO bus_changes (writer, customer, doc, seq)
                 SELECT $3, customer, doc, seq FROM moved
             )
             SELECT last FROM head",
            &[&&customer.as_bytes()[..], &&doc.as_bytes()[..], &writer],
        )
        .await
        .map_err(backend)?
        .get(0);
    Ok(seq_of(seq))
}

pub(crate) async fn write_doc(
    tx: &Tx<'_>,
    writer: i64,
    customer: &CustomerId,
    doc: &DocId,
    meta: &dyn MetaAt,
    chunk: Option<Chunk<'_>>,
    feed: bool,
) -> Result<Option<Seq>> {
    let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
    let seq = if feed {
        take_position(tx, writer, customer, doc).await?
    } else {
        let row = tx
            .query_opt("SELECT seq FROM feed WHERE customer = $1 AND doc = $2", &[&c, &d])
            .await
            .map_err(backend)?;
        row.map_or(Seq(0), |row| seq_of(row.get(0)))
    };
    let (stored, meta) = (i64::try_from(seq.0).map_err(backend)?, meta.at(seq));
    // Sent together: one round trip for both.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&c, &d, &stored, &meta];
    let meta_written = tx.execute(
        "INSERT INTO docs (customer, doc, seq, meta) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer, doc) DO UPDATE SET seq = EXCLUDED.seq, meta = EXCLUDED.meta",
        &params,
    );
    let chunk_written = async {
        let Some(chunk) = chunk else { return Ok(0) };
        tx.execute(
            "INSERT INTO chunks (customer, doc, id, bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&c, &d, &&chunk.id.as_bytes()[..], &chunk.bytes],
        )
        .await
    };
    let (meta_written, chunk_written) = tokio::join!(meta_written, chunk_written);
    meta_written.map_err(backend)?;
    chunk_written.map_err(backend)?;
    Ok(feed.then_some(seq))
}

/// A compaction; `Ok(Err(Conflict))` when another writer compacted the document meanwhile
/// (nothing is written, and the transaction goes on).
pub(crate) async fn compact(
    tx: &Tx<'_>,
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

pub(crate) async fn delete_doc(
    tx: &Tx<'_>,
    writer: i64,
    customer: &CustomerId,
    doc: &DocId,
) -> Result<Seq> {
    let seq = take_position(tx, writer, customer, doc).await?;
    let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
    for table in ["docs", "snapshots", "chunks"] {
        tx.execute(&format!("DELETE FROM {table} WHERE customer = $1 AND doc = $2"), &[&c, &d])
            .await
            .map_err(backend)?;
    }
    Ok(seq)
}

pub(crate) async fn put_record(
    tx: &Tx<'_>,
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
