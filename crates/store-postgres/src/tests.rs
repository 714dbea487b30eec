//! The conformance suite against a real PostgreSQL: `CUBBY_TEST_POSTGRES_URL` names it
//! (`bash tests/run.sh` starts one; by hand, `source tests/postgres.sh && postgres_start`).
//! Each backend the suite makes gets a schema of its own, dropped when it is done.

use std::sync::Arc;

use cubby_store::{Docs, Store};
use tokio_postgres::Config;

use super::{PgStore, backend, runtime};

fn database() -> Config {
    let url = std::env::var("CUBBY_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "CUBBY_TEST_POSTGRES_URL is not set: these tests need a PostgreSQL server. \
             `bash tests/run.sh` starts one; by hand: source tests/postgres.sh && postgres_start"
        )
    });
    url.parse().expect("CUBBY_TEST_POSTGRES_URL is a PostgreSQL URL")
}

/// A schema of its own in the test database, dropped with the last clone.
struct TestSchema {
    name: String,
}

impl TestSchema {
    fn new() -> Arc<Self> {
        let id: [u8; 8] = cubby_crypto::random_array();
        let name = format!("cubby_t_{}", id.iter().map(|b| format!("{b:02x}")).collect::<String>());
        admin(&format!("CREATE SCHEMA {name}"));
        Arc::new(Self { name })
    }

    fn open(&self) -> PgStore {
        let mut config = database();
        config.options(format!("-c search_path={}", self.name));
        PgStore::with_config(config, None).expect("the store opens")
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        admin(&format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

/// Runs one statement on its own connection.
fn admin(sql: &str) {
    runtime()
        .block_on(async {
            let (client, connection) =
                database().connect(tokio_postgres::NoTls).await.map_err(backend)?;
            tokio::spawn(connection);
            client.batch_execute(sql).await.map_err(backend)
        })
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
}

/// Runs one query on its own connection: its rows.
fn admin_rows(sql: &str) -> Vec<tokio_postgres::Row> {
    runtime()
        .block_on(async {
            let (client, connection) =
                database().connect(tokio_postgres::NoTls).await.map_err(backend)?;
            tokio::spawn(connection);
            client.query(sql, &[]).await.map_err(backend)
        })
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
}

cubby_store::conformance_tests!(|| {
    let schema = TestSchema::new();
    move || schema.open()
});

#[test]
fn a_schema_newer_than_this_code_is_refused() {
    let schema = TestSchema::new();
    drop(schema.open());
    admin(&format!("UPDATE {}.cubby_schema SET version = version + 1", schema.name));
    let err = PgStore::with_config(
        {
            let mut config = database();
            config.options(format!("-c search_path={}", schema.name));
            config
        },
        None,
    )
    .expect_err("a newer schema is refused");
    assert!(matches!(err, cubby_store::StoreError::Format { .. }), "{err}");
}

#[test]
fn nodes_writing_one_customer_at_once_take_every_position_once_and_in_commit_order() {
    let schema = TestSchema::new();
    let customer = cubby_core::CustomerId::from_bytes([3; 16]);
    let nodes: Vec<PgStore> = (0..4).map(|_| schema.open()).collect();
    let positions: Vec<Vec<cubby_core::Seq>> = std::thread::scope(|scope| {
        let writers: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                scope.spawn(move || {
                    (0..50u8)
                        .map(|i| {
                            let doc = cubby_core::DocId::from_bytes([
                                n as u8, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                            ]);
                            node.write_doc(&customer, &doc, b"meta", None).expect("written")
                        })
                        .collect()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().expect("writer")).collect()
    });
    let mut all: Vec<u64> = positions.iter().flatten().map(|s| s.0).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>(), "every position taken once");
    for node in &positions {
        assert!(node.windows(2).all(|w| w[0] < w[1]), "one node's writes in order: {node:?}");
    }
    let feed = nodes[0].feed_since(&customer, cubby_core::Seq(0)).expect("feed");
    assert_eq!(feed.len(), 200);
    assert_eq!(nodes[1].feed_head(&customer).expect("head").0, 200);
    nodes[2].flush().expect("flush");
}

fn encrypted(store: PgStore) -> cubby_store::EncryptedStore<PgStore> {
    use cubby_crypto::keys::{Keyring, MasterSecret};
    let keyring = Keyring::from_master(&MasterSecret::from_bytes([5; 32]));
    cubby_store::EncryptedStore::open(store, keyring).expect("the key check passes")
}

#[test]
fn conformance_holds_through_the_encryption_decorator() {
    let schema = TestSchema::new();
    cubby_store::conformance::flushed_writes_survive_reopen(|| encrypted(schema.open()));
}

/// What the database holds, every column of every row, as bytes.
fn every_stored_byte(schema: &TestSchema) -> Vec<Vec<u8>> {
    let sql = format!(
        "SELECT customer || wrapped FROM {s}.keys
         UNION ALL SELECT customer || doc || meta FROM {s}.docs
         UNION ALL SELECT customer || doc || id || bytes FROM {s}.chunks
         UNION ALL SELECT customer || doc || id || bytes FROM {s}.snapshots
         UNION ALL SELECT customer || doc FROM {s}.feed
         UNION ALL SELECT customer FROM {s}.feed_heads
         UNION ALL SELECT customer || key || value FROM {s}.records",
        s = schema.name
    );
    admin_rows(&sql).iter().map(|r| r.get(0)).collect()
}

/// Document content, metadata and record values reach the database sealed, and a chunk's
/// content id does not reach it at all (parts are stored under keyed names).
#[test]
fn what_the_database_holds_of_content_is_sealed() {
    use cubby_core::{ChunkId, CustomerId, DocId};
    use cubby_store::{Chunk, Records, Space};
    let schema = TestSchema::new();
    let store = encrypted(schema.open());
    let (customer, doc) = (CustomerId::from_bytes([0xc5; 16]), DocId::from_bytes([0xd6; 16]));
    let secret = b"the customer's secret note";
    let chunk = Chunk { id: ChunkId::of(secret), bytes: secret };
    store
        .write_doc(&customer, &doc, b"meta: the customer's secret title", Some(chunk))
        .expect("write");
    store.put_record(&customer, Space::AUDIT, b"entry 1", secret).expect("record");
    store.flush().expect("flush");
    let records = store.load(&customer, &doc).expect("load").expect("it reads back");
    assert_eq!(records.chunks, vec![(chunk.id, secret.to_vec())]);

    let stored = every_stored_byte(&schema);
    assert!(stored.len() >= 6, "rows were written: {}", stored.len());
    let found =
        |needle: &[u8]| stored.iter().any(|row| row.windows(needle.len()).any(|w| w == needle));
    assert!(found(b"entry 1"), "the check can see what is stored");
    assert!(!found(b"secret"), "plaintext reached the database");
    assert!(!found(chunk.id.as_bytes()), "a content hash reached the database");
}

/// The CA of the test server's certificate (`tests/postgres.sh` makes it).
fn test_ca() -> Vec<u8> {
    let path = std::env::var("CUBBY_TEST_POSTGRES_CA")
        .expect("CUBBY_TEST_POSTGRES_CA is set where CUBBY_TEST_POSTGRES_URL is");
    std::fs::read(path).expect("the test CA reads")
}

/// Whether the store's connections are TLS, as the database sees them.
fn connected_over_tls(store: &PgStore) -> bool {
    store
        .block(async {
            let client = store.client().await?;
            let row = client
                .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                .await
                .map_err(backend)?;
            Ok(row.get(0))
        })
        .expect("the store answers")
}

#[test]
fn with_sslmode_require_or_a_ca_the_connection_is_tls_and_verified() {
    let schema = TestSchema::new();
    let url = std::env::var("CUBBY_TEST_POSTGRES_URL").expect("set");
    let ca = test_ca();
    let search = format!("options=-c%20search_path%3D{}", schema.name);

    let verified = PgStore::connect(&format!("{url}?sslmode=require&{search}"), Some(&ca))
        .expect("a certificate the CA signed is taken");
    assert!(connected_over_tls(&verified), "sslmode=require with a CA is TLS");
    let by_ca = PgStore::connect(&format!("{url}?{search}"), Some(&ca)).expect("opens");
    assert!(connected_over_tls(&by_ca), "a CA alone asks for TLS");
    let plain = PgStore::connect(&format!("{url}?{search}"), None).expect("opens");
    assert!(!connected_over_tls(&plain), "neither: plain, for a private network");

    // A certificate the CA given does not vouch for is refused, and so is one no public root
    // does: never taken unverified.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a cert");
    let other_ca = other.cert.pem();
    let refused =
        PgStore::connect(&format!("{url}?sslmode=require&{search}"), Some(other_ca.as_bytes()));
    assert!(refused.is_err(), "a certificate from another CA is refused");
    let refused = PgStore::connect(&format!("{url}?sslmode=require&{search}"), None);
    assert!(refused.is_err(), "a private CA's certificate is refused without that CA");
}

mod bus {
    use std::time::Duration;

    use cubby_core::{CustomerId, DocId, Seq};
    use cubby_store::Docs;

    use super::{TestSchema, backend, database, runtime};
    use crate::bus::Heard;

    fn ids(n: u8) -> (CustomerId, DocId) {
        (CustomerId::from_bytes([n; 16]), DocId::from_bytes([n + 100; 16]))
    }

    /// A node hears the other nodes' document writes and deletions (even of a document it
    /// wrote since), and the events they publish, each once, and nothing of its own.
    #[test]
    fn a_node_hears_what_the_others_wrote_once_and_not_its_own() {
        let schema = TestSchema::new();
        let (a, b) = (schema.open(), schema.open());
        assert_ne!(a.writer(), b.writer());
        let mut cursor = runtime().block_on(b.bus_cursor()).expect("cursor");
        let (customer, doc) = ids(1);
        a.write_doc(&customer, &doc, b"m", None).expect("write");
        // B moves the same document on before it reads: A's move is still heard.
        b.write_doc(&customer, &doc, b"m", None).expect("b's own write");
        a.delete_doc(&customer, &ids(3).1).expect("delete");
        runtime().block_on(a.bus_publish(vec![b"erased".to_vec()])).expect("publish");

        let heard = runtime().block_on(b.bus_read(&mut cursor)).expect("read");
        let writer = a.writer();
        assert_eq!(
            heard,
            vec![
                Heard::Changed { writer, customer, doc, seq: Seq(1) },
                Heard::Changed { writer, customer, doc: ids(3).1, seq: Seq(3) },
                Heard::Event { writer, bytes: b"erased".to_vec() },
            ]
        );
        assert_eq!(runtime().block_on(b.bus_read(&mut cursor)).expect("read"), vec![]);
        // A's own reader hears B's write only.
        let mut own = runtime().block_on(a.bus_cursor()).expect("cursor");
        b.write_doc(&customer, &doc, b"m2", None).expect("write");
        let heard = runtime().block_on(a.bus_read(&mut own)).expect("read");
        assert_eq!(heard, vec![Heard::Changed { writer: b.writer(), customer, doc, seq: Seq(4) }]);
    }

    /// Old entries are pruned; nodes pruning at once take turns, and neither fails.
    #[test]
    fn old_entries_are_pruned_by_one_node_at_a_time() {
        let schema = TestSchema::new();
        let (a, b) = (schema.open(), schema.open());
        let (customer, doc) = ids(2);
        a.write_doc(&customer, &doc, b"m", None).expect("old write");
        super::admin(&format!(
            "UPDATE {}.bus_changes SET at = now() - interval '11 minutes'",
            schema.name
        ));
        a.write_doc(&customer, &ids(4).1, b"m", None).expect("new write");
        let (pruned_a, pruned_b) =
            runtime().block_on(async { tokio::join!(a.bus_prune(), b.bus_prune()) });
        pruned_a.expect("a prunes");
        pruned_b.expect("b prunes or leaves it to a");
        let mut cursor = runtime().block_on(b.bus_cursor()).expect("cursor");
        // The new entry stays: a fresh write after it is heard, and so is nothing pruned.
        a.write_doc(&customer, &doc, b"m", None).expect("write");
        let heard = runtime().block_on(b.bus_read(&mut cursor)).expect("read");
        assert_eq!(heard.len(), 1, "{heard:?}");
        let left: i64 =
            super::admin_rows(&format!("SELECT count(*) FROM {}.bus_changes", schema.name))[0]
                .get(0);
        assert_eq!(left, 2, "the old entry is gone, the two newer ones stay");
    }

    /// A transaction that began first and commits last is heard when it commits, and does
    /// not hold back what committed before it.
    #[test]
    fn a_write_that_commits_after_a_later_one_is_not_skipped() {
        let schema = TestSchema::new();
        let (a, b) = (schema.open(), schema.open());
        let mut cursor = runtime().block_on(b.bus_cursor()).expect("cursor");
        let (slow_customer, slow_doc) = ids(7);
        let (customer, doc) = ids(8);
        runtime()
            .block_on(async {
                let mut config = database();
                config.options(format!("-c search_path={}", schema.name));
                let (mut slow, connection) =
                    config.connect(tokio_postgres::NoTls).await.map_err(backend)?;
                tokio::spawn(connection);
                // A write by another node that takes its transaction id first...
                let tx = slow.transaction().await.map_err(backend)?;
                tx.execute(
                    "INSERT INTO bus_changes (customer, doc, seq, writer) VALUES ($1, $2, 1, 999)",
                    &[&&slow_customer.as_bytes()[..], &&slow_doc.as_bytes()[..]],
                )
                .await
                .map_err(backend)?;
                // ...while a later one commits.
                std::thread::scope(|scope| {
                    scope.spawn(|| a.write_doc(&customer, &doc, b"m", None)).join().expect("writer")
                })?;
                let early = b.bus_read(&mut cursor).await?;
                let writer = a.writer();
                assert_eq!(early, vec![Heard::Changed { writer, customer, doc, seq: Seq(1) }]);
                tx.commit().await.map_err(backend)?;
                let heard = b.bus_read(&mut cursor).await?;
                let slow = Heard::Changed {
                    writer: 999,
                    customer: slow_customer,
                    doc: slow_doc,
                    seq: Seq(1),
                };
                assert_eq!(heard, vec![slow], "the slow write, once");
                assert_eq!(b.bus_read(&mut cursor).await?, vec![]);
                Ok::<_, cubby_store::StoreError>(())
            })
            .expect("the database answers");
    }

    /// A listener is woken by a publication and by a document write.
    #[test]
    fn a_listener_is_woken_by_a_publication() {
        let schema = TestSchema::new();
        let (a, b) = (schema.open(), schema.open());
        runtime()
            .block_on(async {
                let mut listener = b.bus_listen().await?;
                a.bus_publish(vec![]).await?;
                let woken = tokio::time::timeout(Duration::from_secs(20), listener.notified())
                    .await
                    .expect("woken before the deadline");
                assert!(woken, "the listener's connection holds");
                // A document write wakes it too, from its own transaction.
                let (customer, doc) = ids(9);
                std::thread::scope(|scope| {
                    scope.spawn(|| a.write_doc(&customer, &doc, b"m", None)).join().expect("writer")
                })?;
                let woken = tokio::time::timeout(Duration::from_secs(20), listener.notified())
                    .await
                    .expect("woken by the write before the deadline");
                assert!(woken);
                Ok::<_, cubby_store::StoreError>(())
            })
            .expect("the database answers");
    }
}
