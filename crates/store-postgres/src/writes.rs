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
/// are then taken by this transaction alone until it commits. One statement: the rows are
/// inserted, or locked by the conflicting update, in the order given.
pub(crate) async fn lock_heads(tx: &Tx<'_>, customers: &[&CustomerId]) -> Result<()> {
    let mut ids: Vec<&[u8]> = customers.iter().map(|c| &c.as_bytes()[..]).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO feed_heads (customer, last)
         SELECT id, 0 FROM unnest($1::bytea[]) WITH ORDINALITY AS ids (id, n) ORDER BY n
         ON CONFLICT (customer) DO UPDATE SET last = feed_heads.last",
        &[&ids],
    )
    .await
    .map_err(backend)?;
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

/// Writes a document's metadata, for its current feed position, and its chunk, leaving the
/// feed as it is ([`cubby_store::Docs::write_doc_off_feed`]).
pub(crate) async fn write_doc_off_feed(
    tx: &Tx<'_>,
    customer: &CustomerId,
    doc: &DocId,
    meta: &dyn MetaAt,
    chunk: Option<Chunk<'_>>,
) -> Result<()> {
    let (c, d) = (&customer.as_bytes()[..], &doc.as_bytes()[..]);
    let row = tx
        .query_opt("SELECT seq FROM feed WHERE customer = $1 AND doc = $2", &[&c, &d])
        .await
        .map_err(backend)?;
    let seq = row.map_or(Seq(0), |row| seq_of(row.get(0)));
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
    Ok(())
}

/// One document write of a run that [`write_docs`] makes together.
pub(crate) struct DocWrite<'a> {
    pub(crate) customer: &'a CustomerId,
    pub(crate) doc: &'a DocId,
    pub(crate) meta: &'a dyn MetaAt,
    pub(crate) chunk: Option<Chunk<'a>>,
}

/// Writes a run of documents that each move in the feed, as if one after another, in three
/// statements whatever the run's length: every position (consecutive per customer, in the
/// run's order) with the feed moves and their bus log; then every metadata record (a document
/// written twice keeps its last); then every chunk. The customers' heads
/// must be locked. Returns each write's position, in order.
pub(crate) async fn write_docs(tx: &Tx<'_>, writer: i64, run: &[DocWrite<'_>]) -> Result<Vec<Seq>> {
    let customers: Vec<&[u8]> = run.iter().map(|w| &w.customer.as_bytes()[..]).collect();
    let docs: Vec<&[u8]> = run.iter().map(|w| &w.doc.as_bytes()[..]).collect();
    let rows = tx
        .query(
            "WITH input AS (
                 SELECT customer, doc, n
                 FROM unnest($1::bytea[], $2::bytea[]) WITH ORDINALITY AS i (customer, doc, n)
             ), counts AS (
                 SELECT customer, count(*) AS taken FROM input GROUP BY customer
             ), heads AS (
                 UPDATE feed_heads h SET last = h.last + counts.taken FROM counts
                 WHERE h.customer = counts.customer
                 RETURNING h.customer, h.last - counts.taken AS base
             ), positioned AS (
                 SELECT input.n, input.customer, input.doc,
                        heads.base + row_number() OVER (PARTITION BY input.customer ORDER BY input.n)
                            AS seq
                 FROM input JOIN heads USING (customer)
             ), moved AS (
                 INSERT INTO feed (customer, doc, seq)
                 SELECT DISTINCT ON (customer, doc) customer, doc, seq FROM positioned
                 ORDER BY customer, doc, seq DESC
                 ON CONFLICT (customer, doc) DO UPDATE SET seq = EXCLUDED.seq
             ), logged AS (
                 INSERT INTO bus_changes (writer, customer, doc, seq)
                 SELECT $3, customer, doc, seq FROM positioned
             )
             SELECT seq FROM positioned ORDER BY n",
            &[&customers, &docs, &writer],
        )
        .await
        .map_err(backend)?;
    if rows.len() != run.len() {
        return Err(StoreError::Backend("a feed head was not locked before the write".into()));
    }
    let seqs: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    let metas: Vec<Vec<u8>> =
        run.iter().zip(&seqs).map(|(w, &seq)| w.meta.at(seq_of(seq))).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&customers, &docs, &seqs, &metas];
    let metadata_written = tx.execute(
        "INSERT INTO docs (customer, doc, seq, meta)
         SELECT DISTINCT ON (customer, doc) customer, doc, seq, meta
         FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bytea[])
             AS i (customer, doc, seq, meta)
         ORDER BY customer, doc, seq DESC
         ON CONFLICT (customer, doc) DO UPDATE SET seq = EXCLUDED.seq, meta = EXCLUDED.meta",
        &params,
    );
    let with_chunks: Vec<&DocWrite<'_>> = run.iter().filter(|w| w.chunk.is_some()).collect();
    let chunk_customers: Vec<&[u8]> =
        with_chunks.iter().map(|w| &w.customer.as_bytes()[..]).collect();
    let chunk_docs: Vec<&[u8]> = with_chunks.iter().map(|w| &w.doc.as_bytes()[..]).collect();
    let chunk_ids: Vec<&[u8]> =
        with_chunks.iter().filter_map(|w| w.chunk.as_ref().map(|c| &c.id.as_bytes()[..])).collect();
    let chunk_bytes: Vec<&[u8]> =
        with_chunks.iter().filter_map(|w| w.chunk.map(|c| c.bytes)).collect();
    let chunks_written = async {
        if with_chunks.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO chunks (customer, doc, id, bytes)
             SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[])
             ON CONFLICT DO NOTHING",
            &[&chunk_customers, &chunk_docs, &chunk_ids, &chunk_bytes],
        )
        .await
    };
    // Sent together: one round trip for both.
    let (metadata_written, chunks_written) = tokio::join!(metadata_written, chunks_written);
    metadata_written.map_err(backend)?;
    chunks_written.map_err(backend)?;
    Ok(seqs.into_iter().map(seq_of).collect())
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
