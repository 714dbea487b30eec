//! The storage traits on [`PgStore`]: reads in one read-only snapshot, writes through
//! [`Store::commit`].

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_store::{
    Chunk, DocRecords, Docs, Keys, MetaAt, Records, Result, Snapshot, Space, Store, Write,
};

use crate::writes::{self, id_bytes, seq_of, space_of};
use crate::{PgStore, backend};

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
            for table in
                ["docs", "snapshots", "chunks", "feed", "feed_heads", "records", "bus_changes"]
            {
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

    /// Whether the database answers, and takes writes (a standby refuses them).
    fn ready(&self) -> Result<()> {
        self.block(async {
            let client = self.client().await?;
            let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(backend)?;
            if row.get::<_, bool>(0) {
                return Err(cubby_store::StoreError::Backend(
                    "the database is a read-only standby".into(),
                ));
            }
            Ok(())
        })
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
            writes::lock_heads(tx, &takers).await?;
            if !takers.is_empty() {
                // Wakes the other nodes when this commits (`bus.rs`); not at all if it does not.
                tx.execute("SELECT pg_notify($1, '')", &[&crate::bus::CHANNEL])
                    .await
                    .map_err(backend)?;
            }
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut at = 0;
            while at < batch.len() {
                // A run of writes that move in the feed goes together, in three statements.
                let run: Vec<writes::DocWrite<'_>> = batch[at..]
                    .iter()
                    .map_while(|write| match *write {
                        Write::Doc { customer, doc, meta, chunk, feed: true } => {
                            Some(writes::DocWrite { customer, doc, meta, chunk })
                        }
                        _ => None,
                    })
                    .collect();
                if !run.is_empty() {
                    at += run.len();
                    let seqs = writes::write_docs(tx, self.writer, &run).await?;
                    outcomes.extend(seqs.into_iter().map(|seq| Ok(Some(seq))));
                    continue;
                }
                let write = &batch[at];
                at += 1;
                let outcome = match *write {
                    // Those that move in the feed went in a run above.
                    Write::Doc { customer, doc, meta, chunk, .. } => {
                        writes::write_doc_off_feed(tx, customer, doc, meta, chunk).await?;
                        Ok(None)
                    }
                    Write::Compact { customer, doc, snapshot, replaces } => {
                        writes::compact(tx, customer, doc, snapshot, replaces).await?.map(|()| None)
                    }
                    Write::Delete { customer, doc } => {
                        Ok(Some(writes::delete_doc(tx, self.writer, customer, doc).await?))
                    }
                    Write::Record { customer, space, key, value } => {
                        writes::put_record(tx, customer, space, key, value).await?;
                        Ok(None)
                    }
                };
                outcomes.push(outcome);
            }
            Ok(outcomes)
        })
    }
}
