use super::SledStore;
use cubby_store::Docs;

cubby_store::conformance_tests!(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    move || SledStore::open(dir.path()).expect("sled opens")
});

/// A chunk over a quarter of a log segment goes to a blob file of its own, which sled's
/// flush never syncs: the store's flush does.
#[test]
fn a_flush_syncs_the_blob_files_sled_leaves_unsynced() {
    use cubby_store::{Chunk, Store};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let customer = cubby_core::CustomerId::from_bytes([1; 16]);
    let doc = cubby_core::DocId::from_bytes([2; 16]);
    let large: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let blobs = || std::fs::read_dir(dir.path().join("sled/blobs")).expect("blobs").count();

    fn chunk(bytes: &[u8]) -> Option<Chunk<'_>> {
        Some(Chunk { id: cubby_core::ChunkId::of(bytes), bytes })
    }
    store.write_doc(&customer, &doc, b"meta", chunk(&large)).expect("write");
    store.flush().expect("flush");
    assert!(blobs() > 0, "sled wrote the large chunk to a blob file");
    assert_eq!(store.files.sync().expect("sync"), 0, "the store's flush synced it already");

    // sled's own flush leaves the next one for the store to sync.
    let larger = [large.as_slice(), b"more"].concat();
    store.write_doc(&customer, &doc, b"meta", chunk(&larger)).expect("write");
    store.db.flush().expect("sled's flush");
    assert!(store.files.sync().expect("sync") > 0, "sled left a blob file unsynced");
}

/// A crash keeps some first steps of a document write and drops the rest (sled's log is
/// durable in order). For every such prefix, of a new, an existing and a deleted document,
/// with and without a chunk: what survives the reopen tells devices nothing false, and the
/// repair (devices resend what was lost; the server writes again a document without a feed
/// position) leaves the document announced once, last, with its chunk.
#[test]
fn every_prefix_of_a_document_write_a_crash_can_keep_is_harmless() {
    use cubby_core::{CustomerId, DocId, Seq};
    use cubby_store::{Chunk, Store};
    let c = CustomerId::from_bytes([1; 16]);
    let (d, other) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
    let bytes = b"the lost change".as_slice();
    for earlier in ["none", "written", "deleted"] {
        for with_chunk in [false, true] {
            for kept in 0.. {
                let case = format!("earlier {earlier}, chunk {with_chunk}, {kept} steps");
                let dir = tempfile::tempdir().expect("temp dir");
                let store = SledStore::open(dir.path()).expect("opens");
                let mut deleted_at = None;
                if earlier != "none" {
                    let a = Chunk { id: cubby_core::ChunkId::of(b"a"), bytes: b"a" };
                    store.write_doc(&c, &d, b"m0", Some(a)).expect("write");
                }
                if earlier == "deleted" {
                    deleted_at = Some(store.delete_doc(&c, &d).expect("delete"));
                }
                let before = store.write_doc(&c, &other, b"m", None).expect("write");
                let id = cubby_core::ChunkId::of(bytes);
                let chunk = with_chunk.then_some(Chunk { id, bytes });
                let (_, steps) = store.doc_write_steps(&c, &d, b"m1", chunk).expect("steps");
                let all = steps.len();
                steps.into_iter().take(kept).for_each(|s| store.apply_step(s).expect("step"));
                store.flush().expect("flush");
                drop(store);
                let store = SledStore::open(dir.path()).expect("reopens");

                let feed = store.feed_since(&c, Seq(0)).expect("feed");
                let at: Vec<Seq> = feed.iter().filter(|(_, f)| *f == d).map(|(s, _)| *s).collect();
                assert!(at.len() <= 1, "{case}: the document is in the feed once");
                let loaded = store.load(&c, &d).expect("load");
                let has_chunk =
                    |l: &cubby_store::DocRecords| l.chunks.iter().any(|(_, b)| b == bytes);
                if loaded.as_ref().is_some_and(has_chunk) {
                    let announced = at.first().is_some_and(|s| *s > before);
                    assert!(announced, "{case}: a kept chunk is announced");
                }
                match &loaded {
                    // Position 0: the server writes it again when it loads it.
                    Some(l) if l.seq == Seq(0) => assert!(earlier != "written", "{case}"),
                    // At its position, or at a later one whose write was cut short.
                    Some(l) => assert!(at.len() == 1 && at[0] >= l.seq, "{case}: in the feed"),
                    // Only the deletion the devices were told of already.
                    None => assert_eq!(at, Vec::from_iter(deleted_at), "{case}: no deletion"),
                }

                // The repair: devices resend a lost change or retry a lost metadata
                // change; a document without a feed position is written again.
                let lost_chunk = with_chunk && !loaded.as_ref().is_some_and(has_chunk);
                let stale = loaded.as_ref().is_none_or(|l| l.seq == Seq(0) || l.meta != b"m1");
                if lost_chunk || stale {
                    let chunk = lost_chunk.then_some(Chunk { id, bytes });
                    store.write_doc(&c, &d, b"m1", chunk).expect("the resend");
                }
                let feed = store.feed_since(&c, Seq(0)).expect("feed");
                let loaded = store.load(&c, &d).expect("load").expect("the document exists");
                assert_eq!(feed.last(), Some(&(loaded.seq, d)), "{case}: announced last");
                assert_eq!(feed.iter().filter(|(_, f)| *f == d).count(), 1, "{case}");
                assert_eq!(feed.iter().filter(|(_, f)| *f == other).count(), 1, "{case}");
                assert_eq!(loaded.meta, b"m1", "{case}");
                assert_eq!(has_chunk(&loaded), with_chunk, "{case}: the chunk is stored");
                if kept == all {
                    break;
                }
            }
        }
    }
}

/// The id of test chunk `index`, whose bytes are the index.
fn id_of(index: u64) -> cubby_core::ChunkId {
    cubby_core::ChunkId::of(&index.to_be_bytes())
}

/// The indexes of the test chunks loaded, in order.
fn indexes(loaded: &cubby_store::DocRecords) -> Vec<u64> {
    let mut indexes: Vec<u64> = loaded
        .chunks
        .iter()
        .map(|(_, b)| u64::from_be_bytes(b.as_slice().try_into().expect("8 bytes")))
        .collect();
    indexes.sort_unstable();
    indexes
}

/// A snapshot that replaces test chunks `indexes`.
fn compact(
    store: &SledStore,
    c: &cubby_core::CustomerId,
    doc: &cubby_core::DocId,
    indexes: std::ops::Range<u64>,
) {
    use cubby_store::Snapshot;
    let snapshot = Snapshot { id: cubby_core::ChunkId::of(b"snap"), bytes: b"snap".to_vec() };
    let replaces: Vec<_> = indexes.map(id_of).collect();
    store.compact(c, doc, &snapshot, &replaces).expect("compact");
}

/// The chunks of `doc` on disk, covered or not.
fn chunks_on_disk(store: &SledStore, c: &cubby_core::CustomerId, doc: &cubby_core::DocId) -> usize {
    store.db.scan_prefix(super::key(b'c', c, &[doc.as_bytes()])).count()
}

/// Writes chunks `indexes` of `doc`, each a write of its own.
fn write_chunks(
    store: &SledStore,
    c: &cubby_core::CustomerId,
    doc: &cubby_core::DocId,
    indexes: std::ops::Range<u64>,
) {
    use cubby_store::Chunk;
    for index in indexes {
        let bytes = index.to_be_bytes();
        let chunk = Chunk { id: id_of(index), bytes: &bytes };
        store.write_doc(c, doc, b"meta", Some(chunk)).expect("write");
    }
}

/// A compaction leaves the chunks it covers for the writes after it to remove, a few each
/// (of any document), so that no write pays for all of them; a load never returns them,
/// and the chunks after the snapshot stay.
#[test]
fn covered_chunks_are_removed_a_few_per_write_and_never_loaded() {
    use super::SWEEP_PER_WRITE;
    use cubby_core::{CustomerId, DocId};
    use cubby_store::Chunk;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let c = CustomerId::from_bytes([1; 16]);
    let (a, b) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
    write_chunks(&store, &c, &a, 0..300);
    compact(&store, &c, &a, 0..300);
    assert_eq!(chunks_on_disk(&store, &c, &a), 300 - SWEEP_PER_WRITE);

    let mut next = 300;
    while chunks_on_disk(&store, &c, &a) > (next - 300) as usize {
        let before = chunks_on_disk(&store, &c, &a);
        // Every other write is to another document, off the feed as a device writes: it
        // sweeps too.
        if next % 2 == 0 {
            write_chunks(&store, &c, &a, next..next + 1);
            next += 1;
        } else {
            let bytes = next.to_be_bytes();
            let chunk = Chunk { id: id_of(next), bytes: &bytes };
            store.write_doc_off_feed(&c, &b, b"meta", Some(chunk)).expect("write");
        }
        let loaded = store.load(&c, &a).expect("load").expect("exists");
        assert!(loaded.snapshot.is_some());
        let after = (300..next).filter(|i| i % 2 == 0).collect::<Vec<_>>();
        assert_eq!(indexes(&loaded), after, "only the chunks after it");
        assert!(chunks_on_disk(&store, &c, &a) < before, "each write removed some");
    }
    assert!(next - 300 <= (300 / SWEEP_PER_WRITE) as u64, "gone within {} writes", next - 300);
    // Once they are gone, writes remove nothing more.
    write_chunks(&store, &c, &b, 1000..1010);
    let loaded = store.load(&c, &a).expect("load").expect("exists");
    let after = (300..next).filter(|i| i % 2 == 0).count();
    assert_eq!(loaded.chunks.len(), after);
    assert_eq!(chunks_on_disk(&store, &c, &a), after);
}

/// Covered chunks still on disk at a restart (the queue of them is in memory) are found by
/// the next load, which skips them and has the writes after it remove them.
#[test]
fn covered_chunks_left_at_a_restart_are_removed_after_the_next_load() {
    use cubby_core::{CustomerId, DocId};
    use cubby_store::Store;
    let dir = tempfile::tempdir().expect("temp dir");
    let c = CustomerId::from_bytes([1; 16]);
    let (a, b) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
    let left = {
        let store = SledStore::open(dir.path()).expect("opens");
        write_chunks(&store, &c, &a, 0..100);
        compact(&store, &c, &a, 0..100);
        store.flush().expect("flush");
        chunks_on_disk(&store, &c, &a)
    };
    assert!(left > 0);
    let store = SledStore::open(dir.path()).expect("reopens");
    write_chunks(&store, &c, &b, 0..10);
    assert_eq!(chunks_on_disk(&store, &c, &a), left, "nothing queued them");
    let loaded = store.load(&c, &a).expect("load").expect("exists");
    assert!(loaded.chunks.is_empty(), "the load skipped them");
    write_chunks(&store, &c, &b, 10..60);
    assert_eq!(chunks_on_disk(&store, &c, &a), 0, "and queued them");
}

/// Deleting a document (or erasing its customer) forgets its queued removals: a document
/// made again under the same id keeps its new chunks, even those with the ids of the ones
/// replaced before.
#[test]
fn a_document_made_again_keeps_its_chunks_from_an_earlier_compaction() {
    use cubby_core::{CustomerId, DocId};
    use cubby_store::Store;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let c = CustomerId::from_bytes([1; 16]);
    let (a, b) = (DocId::from_bytes([2; 16]), DocId::from_bytes([3; 16]));
    for erase in [false, true] {
        write_chunks(&store, &c, &a, 0..100);
        compact(&store, &c, &a, 0..100);
        if erase {
            store.erase_customer(&c).expect("erase");
        } else {
            store.delete_doc(&c, &a).expect("delete");
        }
        write_chunks(&store, &c, &a, 0..10);
        write_chunks(&store, &c, &b, 0..30);
        let loaded = store.load(&c, &a).expect("load").expect("made again");
        assert!(loaded.snapshot.is_none());
        assert_eq!(indexes(&loaded), (0..10).collect::<Vec<_>>(), "erase: {erase}");
        store.delete_doc(&c, &a).expect("delete");
    }
}

/// An older copy of a document's metadata put back over the newer one (as someone with the
/// files and sled's checksums could), with or without its old position, is refused: its
/// position is behind the document's, or the feed no longer names the document there.
#[test]
fn older_metadata_spliced_back_with_or_without_its_position_is_refused() {
    use cubby_core::{CustomerId, DocId};
    use cubby_store::StoreError;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let (c, d) = (CustomerId::from_bytes([1; 16]), DocId::from_bytes([2; 16]));
    let raw = |prefix| super::key(prefix, &c, &[d.as_bytes()]);
    store.write_doc(&c, &d, b"shared", None).expect("write");
    let (old_meta, old_position) = (
        store.db.get(raw(b'm')).expect("get").expect("meta"),
        store.db.get(raw(b'p')).expect("get").expect("position"),
    );
    store.write_doc(&c, &d, b"private", None).expect("the newer metadata");
    store.db.insert(raw(b'm'), old_meta.clone()).expect("splice the metadata");
    let refused = store.load(&c, &d).expect_err("older than the document");
    assert!(matches!(refused, StoreError::Corrupt(what) if what.contains("older")));
    store.db.insert(raw(b'p'), old_position).expect("and its position");
    let refused = store.load(&c, &d).expect_err("not at its feed position");
    assert!(matches!(refused, StoreError::Corrupt(what) if what.contains("feed")));
    assert!(store.doc_meta(&c, &d).is_err() && store.list_docs(&c).is_err());
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_as_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _first = SledStore::open(dir.path()).expect("opens");
    assert!(matches!(SledStore::open(dir.path()), Err(cubby_store::StoreError::InUse)));
}

#[test]
fn conformance_holds_through_the_encryption_decorator() {
    use cubby_crypto::keys::{Keyring, MasterSecret};
    let dir = tempfile::tempdir().expect("temp dir");
    let open = || {
        let keyring = Keyring::from_master(&MasterSecret::from_bytes([5; 32]));
        cubby_store::EncryptedStore::open(SledStore::open(dir.path()).expect("opens"), keyring)
            .expect("key check")
    };
    cubby_store::conformance::flushed_writes_survive_reopen(open);
}

/// A copy made while writes go on holds the store as it was between two writes: writes made one
/// after another are in the copy up to some point, and none after it, and its keys come along.
#[test]
fn a_copy_under_concurrent_writes_holds_a_prefix_of_them() {
    use cubby_store::{Keys, Records, Space};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(&dir.path().join("store")).expect("opens");
    let customer = cubby_core::CustomerId::from_bytes([3; 16]);
    store.put_key_if_absent(&customer, b"wrapped").expect("a key");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                store.put_record(&customer, Space(1), &n.to_be_bytes(), &[7; 64]).expect("a write");
                n += 1;
            }
            n
        })
    };
    // Let some writes land, then copy in the middle of the others.
    while store.scan_records(&customer, Space(1)).expect("scan").len() < 500 {
        std::thread::yield_now();
    }
    let copy = dir.path().join("copy");
    let copied = store.copy_to(&copy).expect("copies");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().expect("the writer");
    drop(store);

    let reopened = SledStore::open(&copy).expect("the copy opens as a store");
    let records = reopened.scan_records(&customer, Space(1)).expect("scan");
    let held: Vec<u32> = records
        .iter()
        .map(|(k, _)| u32::from_be_bytes(k.as_slice().try_into().expect("4 bytes")))
        .collect();
    assert!(held.len() >= 500 && (held.len() as u32) <= written, "{} of {written}", held.len());
    assert!(held.iter().enumerate().all(|(i, &n)| n == i as u32), "the first writes, no gap");
    assert_eq!(copied.keys, 1);
    assert_eq!(reopened.get_key(&customer).expect("read"), Some(b"wrapped".to_vec()));
}
