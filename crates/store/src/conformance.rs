//! The suite every [`Store`] backend runs.
//!
//! A backend is any `FnMut() -> S` that opens the same storage again on each call (a reopen);
//! `conformance_tests!(|| { let storage = ..; move || open(&storage) })` expands to one `#[test]` per behaviour below, including
//! a model-based property test that checks random operations and reopens against a `BTreeMap`.

use cubby_core::{ChunkId, CustomerId, DocId, Seq};

use crate::{Chunk, DocRecords, Result, Snapshot, Space, Store, StoreError, Write};

mod model;
pub use model::random_operations_match_the_model;

/// Expands to the conformance tests for a backend. The argument is a factory, `Fn() -> B`, whose
/// every call makes a fresh backend `B: FnMut() -> impl Store` that reopens the same storage each
/// time it is called.
#[macro_export]
macro_rules! conformance_tests {
    ($new_backend:expr) => {
        #[test]
        fn conformance_keys_are_stored_once() {
            $crate::conformance::keys_are_stored_once(($new_backend)());
        }
        #[test]
        fn conformance_documents_round_trip() {
            $crate::conformance::documents_round_trip(($new_backend)());
        }
        #[test]
        fn conformance_feed_lists_each_document_at_its_latest_write() {
            $crate::conformance::feed_lists_each_document_at_its_latest_write(($new_backend)());
        }
        #[test]
        fn conformance_writes_off_the_feed_store_the_document_and_leave_the_feed() {
            $crate::conformance::writes_off_the_feed_store_the_document_and_leave_the_feed(
                ($new_backend)(),
            );
        }
        #[test]
        fn conformance_compaction_replaces_the_chunks_it_names() {
            $crate::conformance::compaction_replaces_the_chunks_it_names(($new_backend)());
        }
        #[test]
        fn conformance_customers_are_isolated() {
            $crate::conformance::customers_are_isolated(($new_backend)());
        }
        #[test]
        fn conformance_records_are_keyed_by_customer_and_space() {
            $crate::conformance::records_are_keyed_by_customer_and_space(($new_backend)());
        }
        #[test]
        fn conformance_flushed_writes_survive_reopen() {
            $crate::conformance::flushed_writes_survive_reopen(($new_backend)());
        }
        #[test]
        fn conformance_keys_can_be_replaced_listed_and_destroyed() {
            $crate::conformance::keys_can_be_replaced_listed_and_destroyed(($new_backend)());
        }
        #[test]
        fn conformance_erasing_a_customer_removes_only_their_data() {
            $crate::conformance::erasing_a_customer_removes_only_their_data(($new_backend)());
        }
        #[test]
        fn conformance_metadata_is_stored_for_the_position_its_write_leaves() {
            $crate::conformance::metadata_is_stored_for_the_position_its_write_leaves(
                ($new_backend)(),
            );
        }
        #[test]
        fn conformance_feed_head_is_the_last_position_taken() {
            $crate::conformance::feed_head_is_the_last_position_taken(($new_backend)());
        }
        #[test]
        fn conformance_a_batch_is_applied_in_order_and_durable_when_committed() {
            $crate::conformance::a_batch_is_applied_in_order_and_durable_when_committed(
                ($new_backend)(),
            );
        }
        #[test]
        fn conformance_random_operations_match_the_model() {
            $crate::conformance::random_operations_match_the_model($new_backend);
        }
    };
}

fn customer(n: u8) -> CustomerId {
    CustomerId::from_bytes([n + 1; 16])
}

fn doc(n: u8) -> DocId {
    DocId::from_bytes([n + 100; 16])
}

fn chunk(bytes: &[u8]) -> Option<Chunk<'_>> {
    Some(Chunk { id: ChunkId::of(bytes), bytes })
}

/// Chunks as loads give them, in id order.
fn parts(chunks: &[&[u8]]) -> Vec<(ChunkId, Vec<u8>)> {
    let mut parts: Vec<_> = chunks.iter().map(|b| (ChunkId::of(b), b.to_vec())).collect();
    parts.sort();
    parts.dedup();
    parts
}

/// A load, its chunks in id order (backends give them in any order).
fn load<S: Store>(store: &S, c: &CustomerId, d: &DocId) -> Option<DocRecords> {
    let mut records = store.load(c, d).expect("load")?;
    records.chunks.sort();
    Some(records)
}

fn snapshot(bytes: &[u8]) -> Snapshot {
    Snapshot { id: ChunkId::of(bytes), bytes: bytes.to_vec() }
}

/// A customer's data key is written once; a second writer gets the first key back.
pub fn keys_are_stored_once<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    assert_eq!(store.get_key(&customer(0)).expect("get"), None);
    assert_eq!(store.put_key_if_absent(&customer(0), b"first").expect("put"), b"first");
    assert_eq!(store.put_key_if_absent(&customer(0), b"second").expect("put"), b"first");
    assert_eq!(store.get_key(&customer(0)).expect("get").as_deref(), Some(&b"first"[..]));
    assert_eq!(store.get_key(&customer(1)).expect("get"), None);
}

/// Key rotation replaces a key only if it is unchanged; destroyed keys are gone after a reopen.
pub fn keys_can_be_replaced_listed_and_destroyed<S: Store>(mut open: impl FnMut() -> S) {
    let customers = |store: &S| -> Vec<CustomerId> {
        let mut list = store.list_customers().expect("list");
        list.retain(|c| *c != crate::SYSTEM);
        list
    };
    let store = open();
    store.put_key_if_absent(&customer(0), b"old").expect("put");
    store.put_key_if_absent(&customer(1), b"other").expect("put");
    assert_eq!(customers(&store), vec![customer(0), customer(1)]);
    assert!(!store.replace_key(&customer(0), b"stale", b"new").expect("replace"));
    assert!(store.replace_key(&customer(0), b"old", b"new").expect("replace"));
    assert!(!store.replace_key(&customer(2), b"old", b"new").expect("replace absent"));
    store.destroy_key(&customer(1)).expect("destroy");
    store.destroy_key(&customer(1)).expect("destroying twice is fine");
    drop(store);
    let store = open();
    assert_eq!(store.get_key(&customer(0)).expect("get").as_deref(), Some(&b"new"[..]));
    assert_eq!(store.get_key(&customer(1)).expect("get"), None);
    assert_eq!(customers(&store), vec![customer(0)]);
}

/// Erasure removes a customer's documents, feed and records, and nothing of anyone else's.
pub fn erasing_a_customer_removes_only_their_data<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let (gone, kept) = (customer(0), customer(1));
    for c in [gone, kept] {
        store.write_doc(&c, &doc(0), b"m", chunk(b"a")).expect("write");
        store.put_record(&c, Space::DEVICES, b"k", b"v").expect("put");
    }
    store.destroy_key(&gone).expect("destroy");
    store.erase_customer(&gone).expect("erase");
    store.erase_customer(&gone).expect("erasing twice is fine");
    store.flush().expect("flush");
    drop(store);
    let store = open();
    // A plain backend answers "nothing"; the encryption decorator refuses the erased customer.
    let empty_or_erased = |r: Result<Vec<(DocId, Seq, Vec<u8>)>>| match r {
        Ok(list) => list.is_empty(),
        Err(StoreError::Erased) => true,
        Err(_) => false,
    };
    assert!(empty_or_erased(store.list_docs(&gone)));
    assert!(matches!(store.load(&gone, &doc(0)), Ok(None) | Err(StoreError::Erased)));
    assert!(store.feed_since(&gone, Seq(0)).expect("feed").is_empty());
    assert!(store.scan_records(&gone, Space::DEVICES).expect("scan").is_empty());
    assert_eq!(store.get_key(&gone).expect("get"), None);
    assert_eq!(store.list_docs(&kept).expect("list").len(), 1);
    assert_eq!(store.feed_since(&kept, Seq(0)).expect("feed").len(), 1);
    assert_eq!(store.scan_records(&kept, Space::DEVICES).expect("scan").len(), 1);
}

/// Metadata and chunks come back as written; deleted documents are gone.
pub fn documents_round_trip<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let (c, d) = (customer(0), doc(0));
    assert_eq!(store.load(&c, &d).expect("load"), None);
    store.write_doc(&c, &d, b"m1", None).expect("create");
    store.write_doc(&c, &d, b"m2", chunk(b"a")).expect("write");
    let seq = store.write_doc(&c, &d, b"m3", chunk(b"b")).expect("write");
    let want =
        DocRecords { meta: b"m3".to_vec(), snapshot: None, chunks: parts(&[b"a", b"b"]), seq };
    assert_eq!(load(&store, &c, &d), Some(want));
    assert_eq!(store.list_docs(&c).expect("list"), vec![(d, seq, b"m3".to_vec())]);
    assert_eq!(store.doc_meta(&c, &d).expect("meta"), Some((seq, b"m3".to_vec())));
    store.delete_doc(&c, &d).expect("delete");
    assert_eq!(store.load(&c, &d).expect("load"), None);
    assert_eq!(store.doc_meta(&c, &d).expect("meta"), None);
    assert!(store.list_docs(&c).expect("list").is_empty());
}

/// Every write moves its document to the head of the feed, with an increasing position.
pub fn feed_lists_each_document_at_its_latest_write<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let c = customer(0);
    let s1 = store.write_doc(&c, &doc(1), b"", None).expect("write");
    let s2 = store.write_doc(&c, &doc(2), b"", None).expect("write");
    let s3 = store.write_doc(&c, &doc(1), b"", chunk(b"x")).expect("write");
    assert!(s1 < s2 && s2 < s3);
    assert_eq!(store.feed_since(&c, Seq(0)).expect("feed"), vec![(s2, doc(2)), (s3, doc(1))]);
    assert_eq!(store.feed_since(&c, s2).expect("feed"), vec![(s3, doc(1))]);
    assert!(store.feed_since(&c, s3).expect("feed").is_empty());
    let s4 = store.delete_doc(&c, &doc(2)).expect("delete");
    assert_eq!(store.feed_since(&c, s3).expect("feed"), vec![(s4, doc(2))]);
}

/// `write_doc_off_feed` stores what `write_doc` does and leaves the feed as it was.
pub fn writes_off_the_feed_store_the_document_and_leave_the_feed<S: Store>(
    mut open: impl FnMut() -> S,
) {
    let store = open();
    let c = customer(0);
    let s1 = store.write_doc(&c, &doc(1), b"m1", chunk(b"a")).expect("write");
    store.write_doc_off_feed(&c, &doc(2), b"m2", chunk(b"b")).expect("write off the feed");
    store.write_doc_off_feed(&c, &doc(1), b"m1'", chunk(b"c")).expect("write off the feed");
    store.write_doc_off_feed(&c, &doc(2), b"m2'", None).expect("metadata alone");

    assert_eq!(store.feed_since(&c, Seq(0)).expect("feed"), vec![(s1, doc(1))]);
    let want = |meta: &[u8], chunks: &[&[u8]], seq| DocRecords {
        meta: meta.to_vec(),
        snapshot: None,
        chunks: parts(chunks),
        seq,
    };
    assert_eq!(load(&store, &c, &doc(1)), Some(want(b"m1'", &[b"a", b"c"], s1)));
    assert_eq!(load(&store, &c, &doc(2)), Some(want(b"m2'", &[b"b"], Seq(0))));
    assert_eq!(store.list_docs(&c).expect("list").len(), 2);
    let s2 = store.delete_doc(&c, &doc(2)).expect("delete");
    assert_eq!(store.load(&c, &doc(2)).expect("load"), None);
    assert_eq!(store.feed_since(&c, s1).expect("feed"), vec![(s2, doc(2))]);
}

/// The metadata a write stores is the one for the position the write leaves the document at,
/// and reads give that position with it: the encryption decorator seals metadata for its
/// position, so that an older copy spliced over a newer one does not open.
pub fn metadata_is_stored_for_the_position_its_write_leaves<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let c = customer(0);
    let for_position = crate::MetaFn(|seq: Seq| seq.0.to_be_bytes().to_vec());
    let expect = |store: &S, d: DocId, seq: Seq| {
        let want = seq.0.to_be_bytes().to_vec();
        let loaded = store.load(&c, &d).expect("load").expect("exists");
        assert_eq!((loaded.seq, &loaded.meta), (seq, &want));
        assert_eq!(store.doc_meta(&c, &d).expect("meta"), Some((seq, want.clone())));
        assert!(store.list_docs(&c).expect("list").contains(&(d, seq, want)));
    };
    store.write_doc(&c, &doc(0), &for_position, None).expect("write");
    let seq = store.write_doc(&c, &doc(0), &for_position, chunk(b"a")).expect("write");
    expect(&store, doc(0), seq);
    // Off the feed: for the position the document has, or 0 without one.
    store.write_doc(&c, &doc(1), &for_position, None).expect("write");
    store.write_doc_off_feed(&c, &doc(0), &for_position, chunk(b"b")).expect("write");
    expect(&store, doc(0), seq);
    store.write_doc_off_feed(&c, &doc(2), &for_position, None).expect("write");
    expect(&store, doc(2), Seq(0));
    store.flush().expect("flush");
    drop(store);
    let store = open();
    expect(&store, doc(0), seq);
    // A document deleted and made again is stored for its new position.
    store.delete_doc(&c, &doc(0)).expect("delete");
    let again = store.write_doc(&c, &doc(0), &for_position, None).expect("write");
    expect(&store, doc(0), again);
}

/// The feed head is the last position taken, deletions included, and survives a reopen.
pub fn feed_head_is_the_last_position_taken<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let (c, other) = (customer(0), customer(1));
    assert_eq!(store.feed_head(&c).expect("head"), Seq(0));
    store.write_doc(&c, &doc(0), b"m", None).expect("write");
    store.write_doc_off_feed(&c, &doc(1), b"m", None).expect("off the feed");
    let last = store.delete_doc(&c, &doc(0)).expect("delete");
    assert_eq!(store.feed_head(&c).expect("head"), last);
    assert_eq!(store.feed_head(&other).expect("head"), Seq(0));
    store.flush().expect("flush");
    drop(store);
    let store = open();
    assert_eq!(store.feed_head(&c).expect("head"), last);
}

/// A snapshot replaces exactly the chunks it names and keeps the others; a compaction that
/// does not name the current snapshot (another writer's) changes nothing.
pub fn compaction_replaces_the_chunks_it_names<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let (c, d) = (customer(0), doc(0));
    for i in 0..4u8 {
        store.write_doc(&c, &d, b"m", chunk(&[i])).expect("write");
    }
    let first = snapshot(b"snap");
    let named: Vec<ChunkId> = (0..3u8).map(|i| ChunkId::of(&[i])).collect();
    store.compact(&c, &d, &first, &named).expect("compact");
    let loaded = load(&store, &c, &d).expect("exists");
    assert_eq!(loaded.snapshot, Some(first.clone()));
    assert_eq!(loaded.chunks, parts(&[&[3]]), "the chunk it did not name stays");
    // A second compaction that does not name the first snapshot: another writer's, refused.
    let stale = snapshot(b"stale");
    let refused = store.compact(&c, &d, &stale, &[ChunkId::of(&[3])]);
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(load(&store, &c, &d).expect("exists").snapshot, Some(first.clone()));
    // Naming it and the last chunk leaves the new snapshot alone.
    let all = snapshot(b"all");
    store.compact(&c, &d, &all, &[first.id, ChunkId::of(&[3])]).expect("compact");
    let loaded = load(&store, &c, &d).expect("exists");
    assert_eq!(loaded.snapshot, Some(all));
    assert!(loaded.chunks.is_empty());
}

/// One customer's documents, feed and records are invisible to another.
pub fn customers_are_isolated<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    store.write_doc(&customer(0), &doc(0), b"secret", chunk(b"x")).expect("write");
    store.put_record(&customer(0), Space::DEVICES, b"k", b"v").expect("record");
    assert_eq!(store.load(&customer(1), &doc(0)).expect("load"), None);
    assert!(store.list_docs(&customer(1)).expect("list").is_empty());
    assert!(store.feed_since(&customer(1), Seq(0)).expect("feed").is_empty());
    assert!(store.scan_records(&customer(1), Space::DEVICES).expect("scan").is_empty());
    assert_eq!(store.get_record(&customer(1), Space::DEVICES, b"k").expect("get"), None);
}

/// Records are read back by key, listed by space, and removed.
pub fn records_are_keyed_by_customer_and_space<S: Store>(mut open: impl FnMut() -> S) {
    let store = open();
    let c = customer(0);
    store.put_record(&c, Space::DEVICES, b"b", b"2").expect("put");
    store.put_record(&c, Space::DEVICES, b"a", b"1").expect("put");
    store.put_record(&c, Space::AUDIT, b"a", b"other").expect("put");
    assert_eq!(
        store.scan_records(&c, Space::DEVICES).expect("scan"),
        vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]
    );
    store.remove_record(&c, Space::DEVICES, b"a").expect("remove");
    assert_eq!(store.get_record(&c, Space::DEVICES, b"a").expect("get"), None);
    assert_eq!(
        store.get_record(&c, Space::AUDIT, b"a").expect("get").as_deref(),
        Some(&b"other"[..])
    );
}

/// What was flushed is there after the store is closed and opened again.
pub fn flushed_writes_survive_reopen<S: Store>(mut open: impl FnMut() -> S) {
    let (c, d) = (customer(0), doc(0));
    let seq = {
        let store = open();
        store.put_key_if_absent(&customer(1), b"key").expect("key");
        let seq = store.write_doc(&c, &d, b"m", chunk(b"x")).expect("write");
        store.put_record(&c, Space::LOCAL, b"cursor", b"7").expect("record");
        store.flush().expect("flush");
        seq
    };
    let store = open();
    assert_eq!(store.get_key(&customer(1)).expect("key").as_deref(), Some(&b"key"[..]));
    assert_eq!(store.feed_since(&c, Seq(0)).expect("feed"), vec![(seq, d)]);
    assert_eq!(load(&store, &c, &d).expect("exists").chunks, parts(&[b"x"]));
    assert_eq!(
        store.get_record(&c, Space::LOCAL, b"cursor").expect("get").as_deref(),
        Some(&b"7"[..])
    );
    // New writes continue the feed after the old positions.
    assert!(store.write_doc(&c, &d, b"m", chunk(b"y")).expect("write") > seq);
}

/// A batch ([`Store::commit`]) applies its writes in order, gives each one's feed position, and
/// is durable when the call returns: the store opened again holds all of it.
pub fn a_batch_is_applied_in_order_and_durable_when_committed<S: Store>(
    mut open: impl FnMut() -> S,
) {
    let (alice, bob) = (customer(0), customer(1));
    let (notes, list, gone) = (doc(0), doc(1), doc(2));
    let snapshot = snapshot(b"folded");
    let replaced = [ChunkId::of(b"a")];
    let (meta, meta2) = (b"meta".to_vec(), b"meta2".to_vec());
    let outcomes = {
        let store = open();
        store.write_doc(&alice, &gone, b"old", None).expect("write");
        store.flush().expect("flush");
        let batch = [
            Write::Doc {
                customer: &alice,
                doc: &notes,
                meta: &meta,
                chunk: chunk(b"a"),
                feed: true,
            },
            Write::Doc { customer: &bob, doc: &notes, meta: &meta, chunk: chunk(b"b"), feed: true },
            Write::Doc {
                customer: &alice,
                doc: &notes,
                meta: &meta2,
                chunk: chunk(b"c"),
                feed: true,
            },
            Write::Compact {
                customer: &alice,
                doc: &notes,
                snapshot: &snapshot,
                replaces: &replaced,
            },
            Write::Doc { customer: &alice, doc: &list, meta: &meta, chunk: None, feed: false },
            Write::Delete { customer: &alice, doc: &gone },
            Write::Record { customer: &bob, space: Space::AUDIT, key: b"k", value: b"v" },
        ];
        let outcomes: Vec<Option<Seq>> = store
            .commit(&batch)
            .expect("commit")
            .into_iter()
            .map(|outcome| outcome.expect("each write"))
            .collect();
        outcomes
    };
    let [a, b, c, compacted, off_feed, deleted, record] = outcomes[..] else {
        panic!("one outcome per write: {outcomes:?}");
    };
    let (a, b, c, deleted) = (a.expect("a"), b.expect("b"), c.expect("c"), deleted.expect("d"));
    assert!(a < c && c < deleted, "the writes took positions in batch order");
    assert_eq!(b.0, 1, "bob's feed is his own");
    assert_eq!((compacted, off_feed, record), (None, None, None), "these take no position");

    let store = open();
    let notes_now = load(&store, &alice, &notes).expect("exists");
    assert_eq!(notes_now.meta, meta2);
    assert_eq!(notes_now.snapshot, Some(snapshot));
    assert_eq!(notes_now.chunks, parts(&[b"c"]), "the compaction named chunk a alone");
    assert!(store.load(&alice, &list).expect("load").is_some());
    assert!(store.load(&alice, &gone).expect("load").is_none());
    assert_eq!(store.feed_since(&alice, Seq(0)).expect("feed"), vec![(c, notes), (deleted, gone)]);
    assert_eq!(
        store.get_record(&bob, Space::AUDIT, b"k").expect("get").as_deref(),
        Some(&b"v"[..])
    );
}
