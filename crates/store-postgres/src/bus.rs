//! The database's half of the change bus: how a node learns what the others wrote.
//!
//! Nothing here is trusted to arrive: the database itself is the log. Every move in the feed
//! is logged in `bus_changes` by the transaction that makes it, with the node that wrote it
//! (`writer`) and the transaction (`txid`): a node that dies right after committing loses no
//! announcement. The events that are not document writes (an erasure, a revocation, a new
//! epoch: bytes the server encodes) go to `bus_events`, written the same way. A reader keeps a [`Cursor`]: the snapshot it last read
//! in (`pg_current_snapshot()`: the transactions that had committed then). The next read takes
//! the entries its new snapshot shows and the old one did not (`pg_visible_in_snapshot`), so
//! it misses none and reads each once, whatever order transactions commit in (a sequence would
//! not do: a number taken first may commit last), and a long transaction elsewhere on the
//! database server delays nothing but itself.
//!
//! `NOTIFY cubby_bus` is only a wake-up, sent by the transaction that writes (a group commit,
//! an event): a node that hears it reads at once instead of at its next poll. A lost notification delays a change; it never loses one. Engines without
//! LISTEN/NOTIFY run the same reads on a timer.

use std::future::Future;

use cubby_core::{CustomerId, DocId};
pub use cubby_store::bus::Heard;
use cubby_store::{Result, StoreError};
use tokio::sync::mpsc;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Socket};

use crate::writes::{id_bytes, seq_of};
use crate::{PgStore, backend, runtime};

/// The notification channel every node listens on.
pub(crate) const CHANNEL: &str = "cubby_bus";

/// What a node needs to open a connection of its own, outside the pool.
pub(crate) struct Connect {
    pub(crate) config: Config,
    pub(crate) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Where a reader of the bus is: the snapshot it last read in, as PostgreSQL prints it
/// (`xmin:xmax:running,...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor(String);

/// Notifications on the bus's channel, on a connection of its own.
pub struct Listener {
    _client: Client,
    wakes: mpsc::Receiver<()>,
}

impl Listener {
    /// Waits for a notification; `false` when the connection is gone (listen again).
    pub async fn notified(&mut self) -> bool {
        self.wakes.recv().await.is_some()
    }
}

/// Runs `work` on the driver's runtime, from whatever runtime awaits it.
async fn on_driver<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    runtime().spawn(work).await.map_err(backend)?
}

/// The snapshot a read sees.
const SNAPSHOT: &str = "SELECT pg_current_snapshot()::text";

/// What the other nodes (not writer `$2`) wrote that snapshot `$1` did not show, with the
/// statement's own snapshot first in every row (alone, when there is nothing new): feed moves
/// in order of transaction and position, then events in order.
const READ: &str = "
    SELECT s.now::text, e.kind, e.writer, e.customer, e.doc, e.seq, e.event
    FROM (SELECT pg_current_snapshot() AS now) s
    LEFT JOIN LATERAL (
        SELECT 0::smallint AS kind, writer, customer, doc, seq, NULL::bytea AS event, txid,
               0::bigint AS id
        FROM bus_changes
        WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
          AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot) AND writer <> $2
        UNION ALL
        SELECT 1::smallint, writer, NULL, NULL, NULL, event, txid, id
        FROM bus_events
        WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
          AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot) AND writer <> $2
    ) e ON true
    ORDER BY e.kind, e.txid, e.customer, e.seq, e.id";

/// The advisory lock a node holds while it prunes ([`PgStore::bus_prune`]); an arbitrary
/// constant, as the migrations' is.
const PRUNE_LOCK: i64 = 0x6375_6262_7970_7275;

impl PgStore {
    /// This store's id among the nodes writing the database: what it writes on the bus
    /// carries it, and [`PgStore::bus_read`] leaves it out.
    pub fn writer(&self) -> i64 {
        self.writer
    }

    /// A cursor at the present: reads from it return what is written from now on.
    pub async fn bus_cursor(&self) -> Result<Cursor> {
        let pool = self.pool.clone();
        on_driver(async move {
            let client = pool.get().await.map_err(backend)?;
            let row = client.query_one(SNAPSHOT, &[]).await.map_err(backend)?;
            Ok(Cursor(row.get(0)))
        })
        .await
    }

    /// What other nodes wrote in the transactions that finished since `cursor`, which it
    /// moves on: the documents moved in the feed, in order of transaction and position, then
    /// the events published, in order.
    pub async fn bus_read(&self, cursor: &mut Cursor) -> Result<Vec<Heard>> {
        let (pool, writer, from) = (self.pool.clone(), self.writer, cursor.0.clone());
        let (now, heard) = on_driver(async move {
            let client = pool.get().await.map_err(backend)?;
            // One statement, so one snapshot: the snapshot itself, and what it shows that the
            // cursor's did not (a statement sees exactly what its snapshot shows).
            let statement = client.prepare_cached(READ).await.map_err(backend)?;
            let rows = client.query(&statement, &[&from, &writer]).await.map_err(backend)?;
            let now: String = rows.first().ok_or(StoreError::Corrupt("bus read"))?.get(0);
            let mut heard = Vec::new();
            for row in &rows {
                match row.get::<_, Option<i16>>(1) {
                    None => {}
                    Some(0) => heard.push(Heard::Changed {
                        writer: row.get(2),
                        customer: CustomerId::from_bytes(id_bytes(row.get(3), "bus customer")?),
                        doc: DocId::from_bytes(id_bytes(row.get(4), "bus document id")?),
                        seq: seq_of(row.get(5)),
                    }),
                    Some(_) => heard.push(Heard::Event { writer: row.get(2), bytes: row.get(6) }),
                }
            }
            Ok((now, heard))
        })
        .await?;
        cursor.0 = now;
        Ok(heard)
    }

    /// Writes `events` for the other nodes and wakes them, in one transaction. (Document
    /// writes log themselves and wake the other nodes in their own transaction.)
    pub async fn bus_publish(&self, events: Vec<Vec<u8>>) -> Result<()> {
        let (pool, writer) = (self.pool.clone(), self.writer);
        on_driver(async move {
            let mut client = pool.get().await.map_err(backend)?;
            let tx = client.transaction().await.map_err(backend)?;
            if !events.is_empty() {
                for event in &events {
                    tx.execute(
                        "INSERT INTO bus_events (writer, event) VALUES ($1, $2)",
                        &[&writer, event],
                    )
                    .await
                    .map_err(backend)?;
                }
            }
            tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await.map_err(backend)?;
            tx.commit().await.map_err(backend)
        })
        .await
    }

    /// Forgets logged changes older than ten minutes and events older than an hour: a node
    /// that has not read them by then has been cut off from the database that long, and its
    /// devices have long reconnected (to a node that reads its state from the store). One node
    /// prunes at a time (an advisory lock); another that asks meanwhile leaves it to that one.
    pub async fn bus_prune(&self) -> Result<()> {
        let pool = self.pool.clone();
        on_driver(async move {
            let mut client = pool.get().await.map_err(backend)?;
            let tx = client.transaction().await.map_err(backend)?;
            let row = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
                .await
                .map_err(backend)?;
            if !row.get::<_, bool>(0) {
                return Ok(());
            }
            tx.batch_execute(
                "DELETE FROM bus_changes WHERE at < now() - interval '10 minutes';
                 DELETE FROM bus_events WHERE at < now() - interval '1 hour';",
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)
        })
        .await
    }

    /// Listens for the bus's notifications on a connection of its own (the pool's connections
    /// are shared and cannot hold a `LISTEN`).
    pub async fn bus_listen(&self) -> Result<Listener> {
        let Connect { config, tls } = &self.connect;
        let config = config.clone();
        match tls.clone() {
            None => on_driver(listen(config, NoTls)).await,
            Some(tls) => on_driver(listen(config, tls)).await,
        }
    }
}

async fn listen<T>(config: Config, tls: T) -> Result<Listener>
where
    T: MakeTlsConnect<Socket> + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut connection) = config.connect(tls).await.map_err(backend)?;
    let (wake, wakes) = mpsc::channel(1);
    tokio::spawn(async move {
        // Ends when the connection fails or the listener is dropped (its client with it);
        // the listener then hears `None`.
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                // A full queue already holds a wake-up.
                Ok(AsyncMessage::Notification(_)) => _ = wake.try_send(()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(backend)?;
    Ok(Listener { _client: client, wakes })
}
