use super::*;
use crate::MemoryStore;
use crate::hooked::{Call, Hooked};
use crate::{Docs, IntegrityError, Records, Write};
use cubby_crypto::keys::MasterSecret;

fn keyring(byte: u8) -> Keyring {
    Keyring::from_master(&MasterSecret::from_bytes([byte; 32]))
}

crate::conformance_tests!(|| {
    let backend = MemoryStore::new();
    move || EncryptedStore::open(backend.clone(), keyring(9)).expect("opens")
});

const ALICE: CustomerId = CustomerId::from_bytes([1; 16]);
const BOB: CustomerId = CustomerId::from_bytes([2; 16]);
const DOC: DocId = DocId::from_bytes([3; 16]);
const OTHER_DOC: DocId = DocId::from_bytes([4; 16]);

#[test]
fn wrong_master_key_is_refused_at_open() {
    let backend = MemoryStore::new();
    EncryptedStore::open(backend.clone(), keyring(1)).expect("first open");
    assert!(matches!(EncryptedStore::open(backend, keyring(2)), Err(StoreError::WrongMasterKey)));
}

#[test]
fn nothing_plain_reaches_the_backend() {
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    store
        .write_doc(
            &ALICE,
            &DOC,
            b"MARKER-meta",
            Some(Chunk { id: ChunkId::of(b"MARKER-chunk"), bytes: b"MARKER-chunk" }),
        )
        .expect("write");
    store.put_record(&ALICE, Space::DEVICES, b"k", b"MARKER-record").expect("put");
    let raw = backend.load(&ALICE, &DOC).expect("load").expect("exists");
    let everything = [
        raw.meta.clone(),
        raw.chunks[0].1.clone(),
        backend.get_record(&ALICE, Space::DEVICES, b"k").expect("get").expect("exists"),
    ]
    .concat();
    assert!(!everything.windows(6).any(|w| w == b"MARKER"));
}

#[test]
fn parts_are_stored_under_names_that_reveal_nothing_of_their_content() {
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    let chunk = Chunk { id: ChunkId::of(b"x"), bytes: b"x" };
    let snapshot = Snapshot { id: ChunkId::of(b"s"), bytes: b"s".to_vec() };
    for c in [ALICE, BOB] {
        store.write_doc(&c, &DOC, b"m", Some(chunk)).expect("write");
        store.compact(&c, &DOC, &snapshot, &[]).expect("compact");
    }
    let alice = backend.load(&ALICE, &DOC).expect("load").expect("exists");
    let bob = backend.load(&BOB, &DOC).expect("load").expect("exists");
    let (alice_chunk, alice_snapshot) = (alice.chunks[0].0, alice.snapshot.expect("snapshot").id);
    // Neither the content hash nor a name shared by two customers with the same content.
    assert_ne!(alice_chunk, chunk.id);
    assert_ne!(alice_snapshot, snapshot.id);
    assert_ne!(alice_chunk, bob.chunks[0].0);
    assert_ne!(alice_snapshot, bob.snapshot.expect("snapshot").id);
    // The decorator hands back the content ids, and a part written twice is one part.
    store.write_doc(&ALICE, &DOC, b"m", Some(chunk)).expect("write again");
    let loaded = store.load(&ALICE, &DOC).expect("load").expect("exists");
    assert_eq!(loaded.chunks, vec![(chunk.id, b"x".to_vec())]);
    assert_eq!(loaded.snapshot.expect("snapshot").id, snapshot.id);
    // A compaction names the parts by content id and drops them by their stored names.
    let next = Snapshot { id: ChunkId::of(b"n"), bytes: b"n".to_vec() };
    store.compact(&ALICE, &DOC, &next, &[chunk.id, snapshot.id]).expect("compact");
    let raw = backend.load(&ALICE, &DOC).expect("load").expect("exists");
    assert!(raw.chunks.is_empty());
    assert_ne!(raw.snapshot.expect("snapshot").id, next.id);
}

#[test]
fn a_format_3_store_is_upgraded_and_its_parts_read_until_a_compaction_replaces_them() {
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    store.write_doc(&ALICE, &DOC, b"m", None).expect("write");
    // What format 3 wrote: parts under their content ids, sealed for them.
    store.put_system(FORMAT_KEY, &3u32.to_be_bytes()).expect("format 3");
    let key = store.key(&ALICE).expect("key");
    let old = |kind, id: ChunkId, bytes: &[u8]| {
        envelope::seal(&key, &doc_aad(kind, &ALICE, &DOC, id.as_bytes()), bytes)
    };
    let (chunk, snapshot) = (ChunkId::of(b"c3"), ChunkId::of(b"s3"));
    let (_, meta) = backend.doc_meta(&ALICE, &DOC).expect("meta").expect("exists");
    let sealed_chunk = old(CHUNK_3, chunk, b"c3");
    backend
        .write_doc_off_feed(&ALICE, &DOC, &meta, Some(Chunk { id: chunk, bytes: &sealed_chunk }))
        .expect("raw chunk");
    let sealed_snapshot = Snapshot { id: snapshot, bytes: old(SNAPSHOT_3, snapshot, b"s3") };
    backend.compact(&ALICE, &DOC, &sealed_snapshot, &[]).expect("raw snapshot");
    drop(store);

    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("upgrades");
    assert_eq!(store.get_system(FORMAT_KEY).expect("format"), Some(FORMAT.to_be_bytes().to_vec()));
    let new = Chunk { id: ChunkId::of(b"c4"), bytes: b"c4" };
    store.write_doc(&ALICE, &DOC, b"m", Some(new)).expect("write");
    let loaded = store.load(&ALICE, &DOC).expect("load").expect("exists");
    assert_eq!(loaded.snapshot.map(|s| (s.id, s.bytes)), Some((snapshot, b"s3".to_vec())));
    let mut chunks = loaded.chunks;
    chunks.sort();
    let mut expected = vec![(chunk, b"c3".to_vec()), (new.id, b"c4".to_vec())];
    expected.sort();
    assert_eq!(chunks, expected);
    // A format-3 part does not open under another name either.
    let other = ChunkId::of(b"other");
    backend
        .write_doc_off_feed(
            &ALICE,
            &OTHER_DOC,
            &meta,
            Some(Chunk { id: other, bytes: &sealed_chunk }),
        )
        .expect("raw chunk");
    assert!(matches!(store.load(&ALICE, &OTHER_DOC), Err(StoreError::Corrupt(_))));

    // The compaction, naming parts by content id, drops both forms.
    let next = Snapshot { id: ChunkId::of(b"n"), bytes: b"n".to_vec() };
    store.compact(&ALICE, &DOC, &next, &[snapshot, chunk, new.id]).expect("compact");
    drop(store);
    let raw = backend.load(&ALICE, &DOC).expect("load").expect("exists");
    assert!(raw.chunks.is_empty(), "{:?}", raw.chunks);
    let store = EncryptedStore::open(backend, keyring(1)).expect("reopens");
    let loaded = store.load(&ALICE, &DOC).expect("load").expect("exists");
    assert_eq!(loaded.snapshot.map(|s| (s.id, s.bytes)), Some((next.id, b"n".to_vec())));
}

#[test]
fn chunk_moved_to_another_customer_or_document_or_position_fails_to_open() {
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    for c in [ALICE, BOB] {
        for d in [DOC, OTHER_DOC] {
            store
                .write_doc(&c, &d, b"m", Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }))
                .expect("write");
        }
    }
    let stolen = backend.load(&ALICE, &DOC).expect("load").expect("exists");
    let (id, sealed_chunk) = stolen.chunks[0].clone();
    // Into Bob's store, same document id: another data key and another customer in the AAD.
    backend
        .write_doc(&BOB, &DOC, &stolen.meta, Some(Chunk { id, bytes: &sealed_chunk }))
        .expect("raw write");
    assert!(matches!(store.load(&BOB, &DOC), Err(StoreError::Corrupt(_))));
    // Into Alice's other document: same key, but the AAD names another document.
    backend.write_doc(&ALICE, &OTHER_DOC, &stolen.meta, None).expect("raw write");
    assert!(matches!(store.load(&ALICE, &OTHER_DOC), Err(StoreError::Corrupt(_))));
    // Under another id in the same document.
    let other = ChunkId::of(b"y");
    backend
        .write_doc(&ALICE, &DOC, &stolen.meta, Some(Chunk { id: other, bytes: &sealed_chunk }))
        .expect("raw write");
    assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Corrupt(_))));
    // Bob's untouched document still opens.
    assert!(store.load(&BOB, &OTHER_DOC).expect("load").is_some());
}

#[test]
fn an_erased_customer_gets_no_new_key_and_their_old_records_do_not_open() {
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    let chunk = Chunk { id: ChunkId::of(b"x"), bytes: b"x" };
    store.write_doc(&ALICE, &DOC, b"m", Some(chunk)).expect("write");
    store.write_doc(&BOB, &DOC, b"m", None).expect("write");
    let stolen = backend.load(&ALICE, &DOC).expect("load").expect("exists");
    store.erase_customer(&ALICE).expect("erase");
    assert!(store.erased_at(&ALICE).expect("tombstone").is_some());
    assert_eq!(store.erased_customers().expect("list"), vec![ALICE]);
    assert_eq!(backend.get_key(&ALICE).expect("get"), None);
    // Nothing can be written for Alice again, even after a reopen, and a copy of her old
    // records put back by hand does not open.
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("reopens");
    assert!(matches!(store.write_doc(&ALICE, &DOC, b"m", None), Err(StoreError::Erased)));
    backend.write_doc(&ALICE, &DOC, &stolen.meta, None).expect("raw write");
    assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Erased)));
    assert!(store.load(&BOB, &DOC).expect("load").is_some());
}

#[test]
fn rewrapping_moves_every_key_to_the_new_generation_and_keeps_data_readable() {
    let dir = std::env::temp_dir()
        .join(format!("cubby-rewrap-{}", u64::from_be_bytes(cubby_crypto::random_array())));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("master.key");
    let master = MasterSecret::create(&path).expect("creates");
    let backend = MemoryStore::new();
    let store =
        EncryptedStore::open(backend.clone(), Keyring::from_master(&master)).expect("opens");
    store.write_doc(&ALICE, &DOC, b"alice", None).expect("write");
    store.write_doc(&BOB, &DOC, b"bob", None).expect("write");
    assert_eq!(store.key_generations().expect("count"), BTreeMap::from([(1, 3)]));
    MasterSecret::rotate(&path).expect("rotates");
    store
        .set_keyring(Keyring::from_master(&MasterSecret::read(&path).expect("reads")))
        .expect("the rotated keyring opens the key check");
    assert!(matches!(store.set_keyring(keyring(42)), Err(StoreError::WrongMasterKey)));
    assert_eq!(store.rewrap_keys().expect("rewraps"), 3);
    assert_eq!(store.rewrap_keys().expect("nothing left"), 0);
    assert_eq!(store.key_generations().expect("count"), BTreeMap::from([(2, 3)]));
    MasterSecret::retire(&path, 1, |_| Ok(0)).expect("retires");
    // A fresh process with only generation 2 reads everything.
    let store = EncryptedStore::open(
        backend,
        Keyring::from_master(&MasterSecret::read(&path).expect("reads")),
    )
    .expect("opens with the new generation");
    assert_eq!(
        store.doc_meta(&ALICE, &DOC).expect("meta").map(|(_, m)| m).as_deref(),
        Some(&b"alice"[..])
    );
    assert_eq!(
        store.doc_meta(&BOB, &DOC).expect("meta").map(|(_, m)| m).as_deref(),
        Some(&b"bob"[..])
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_customer_whose_key_is_being_made_holds_up_no_other_customer() {
    const CAROL: CustomerId = CustomerId::from_bytes([5; 16]);
    let (entered, alice_entered) = std::sync::mpsc::channel();
    let (let_alice_go, release) = std::sync::mpsc::channel::<()>();
    let (entered, release) = (Mutex::new(entered), Mutex::new(release));
    // Making alice's key waits until the test lets it go, as a slow disk's `fsync`s would.
    let backend = Hooked::new(MemoryStore::new(), move |call: Call<'_>| {
        if let Call::PutKey(&ALICE) = call {
            let _ = entered.lock().expect("entered").send(());
            let _ = release.lock().expect("release").recv();
        }
    });
    let store = Arc::new(EncryptedStore::open(backend, keyring(9)).expect("opens"));
    store.write_doc(&BOB, &DOC, b"bob", None).expect("bob's key is made at once");

    let alice = {
        let store = store.clone();
        std::thread::spawn(move || store.write_doc(&ALICE, &DOC, b"alice", None))
    };
    let deadline = std::time::Duration::from_secs(10);
    alice_entered.recv_timeout(deadline).expect("alice's key is being made");

    // Meanwhile bob (key known) and carol (key still to make) read and write.
    let (served, others) = std::sync::mpsc::channel();
    {
        let store = store.clone();
        std::thread::spawn(move || {
            let _ = served.send(
                store
                    .write_doc(&BOB, &OTHER_DOC, b"bob again", None)
                    .and_then(|_| store.write_doc(&CAROL, &DOC, b"carol", None))
                    .and_then(|_| store.doc_meta(&BOB, &DOC)),
            );
        });
    }
    let read = others.recv_timeout(deadline).expect("other customers waited on alice's key");
    assert_eq!(
        read.expect("bob and carol are served").map(|(_, m)| m).as_deref(),
        Some(&b"bob"[..])
    );

    let_alice_go.send(()).expect("alice is waiting");
    alice.join().expect("no panic").expect("alice's write lands once her key is made");
    assert_eq!(
        store.doc_meta(&ALICE, &DOC).expect("meta").map(|(_, m)| m).as_deref(),
        Some(&b"alice"[..])
    );
}

#[test]
fn an_older_copy_of_a_documents_metadata_spliced_over_the_newer_does_not_open() {
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    store.write_doc(&ALICE, &DOC, b"shared", None).expect("write");
    let (_, old) = backend.doc_meta(&ALICE, &DOC).expect("meta").expect("exists");
    store.write_doc(&ALICE, &DOC, b"private", None).expect("the newer metadata");
    // The old sealed bytes put back in place, as an attacker with the files could.
    backend.write_doc_off_feed(&ALICE, &DOC, &old, None).expect("raw splice");
    assert!(matches!(store.load(&ALICE, &DOC), Err(StoreError::Corrupt("metadata"))));
    assert!(matches!(store.doc_meta(&ALICE, &DOC), Err(StoreError::Corrupt("metadata"))));
    assert!(matches!(store.list_docs(&ALICE), Err(StoreError::Corrupt("metadata"))));
}

#[test]
fn a_store_in_another_format_is_refused() {
    let backend = MemoryStore::new();
    // A store written before formats were recorded: a key check and nothing else.
    backend
        .put_key_if_absent(&SYSTEM, &keyring(1).wrap(SYSTEM.as_bytes(), &DataKey::generate()))
        .expect("key check");
    let refused = EncryptedStore::open(backend, keyring(1)).expect_err("refused");
    assert!(matches!(refused, StoreError::Format { found: 1, expected: FORMAT }), "{refused}");
    // A store of a newer format than this build's.
    let backend = MemoryStore::new();
    let store = EncryptedStore::open(backend.clone(), keyring(1)).expect("opens");
    store.put_system(FORMAT_KEY, &(FORMAT + 1).to_be_bytes()).expect("format");
    drop(store);
    let refused = EncryptedStore::open(backend, keyring(1)).expect_err("refused");
    assert!(matches!(refused, StoreError::Format { found, .. } if found == FORMAT + 1));
}

fn witnessed(
    backend: &MemoryStore,
    witness: &crate::witness::MemoryWitness,
) -> Result<EncryptedStore<MemoryStore>> {
    EncryptedStore::open_witnessed(backend.clone(), keyring(1), Arc::new(witness.clone()))
}

#[test]
fn a_store_that_lost_acknowledged_flushes_is_refused_until_the_operator_starts_an_epoch() {
    let witness = crate::witness::MemoryWitness::new();
    let backend = MemoryStore::new();
    let store = witnessed(&backend, &witness).expect("a new store opens");
    store.write_doc(&ALICE, &DOC, b"first", None).expect("write");
    store.flush().expect("flush 1");
    let backup = backend.copy();
    store.write_doc(&ALICE, &DOC, b"second", None).expect("write");
    store.flush().expect("flush 2");
    store.flush().expect("nothing written: not counted");
    let epoch = store.epoch();
    drop(store);

    assert!(witnessed(&backend, &witness).is_ok(), "the store as it was opens");
    let refused = witnessed(&backup, &witness).expect_err("the backup is behind");
    assert!(
        matches!(
            refused,
            StoreError::Integrity(IntegrityError::RolledBack { acknowledged: 2, found: 1 })
        ),
        "{refused}"
    );
    let empty = MemoryStore::new();
    let wiped = witnessed(&empty, &witness).expect_err("an empty store");
    assert!(matches!(wiped, StoreError::Integrity(IntegrityError::Wiped { acknowledged: 2 })));
    assert!(empty.get_key(&SYSTEM).expect("key").is_none(), "nothing written to it");
    let other_key =
        EncryptedStore::open_witnessed(backend.clone(), keyring(2), Arc::new(witness.clone()));
    assert!(matches!(other_key, Err(StoreError::WrongMasterKey)), "the key is named first");
    let unwitnessed = witnessed(&backend, &crate::witness::MemoryWitness::new());
    assert!(matches!(unwitnessed, Err(StoreError::Integrity(IntegrityError::AnchorMissing))));

    // The operator accepts the backup: a new epoch, and the store opens from then on.
    let restored =
        EncryptedStore::begin_epoch(backup.clone(), keyring(1), Arc::new(witness.clone()))
            .expect("accepted");
    assert_ne!(restored.epoch(), epoch);
    let meta = restored.doc_meta(&ALICE, &DOC).expect("meta").map(|(_, m)| m);
    assert_eq!(meta.as_deref(), Some(&b"first"[..]));
    drop(restored);
    assert!(witnessed(&backup, &witness).is_ok());
    // The store from before the restore is an earlier epoch's now.
    let old = witnessed(&backend, &witness).expect_err("an earlier epoch");
    assert!(matches!(old, StoreError::Integrity(IntegrityError::OldEpoch)), "{old}");
}

#[test]
fn an_erasure_survives_the_restore_of_a_backup_taken_before_it() {
    let witness = crate::witness::MemoryWitness::new();
    let backend = MemoryStore::new();
    let store = witnessed(&backend, &witness).expect("opens");
    store
        .write_doc(&ALICE, &DOC, b"alice's", Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }))
        .expect("w");
    store.write_doc(&BOB, &DOC, b"bob's", None).expect("write");
    store.flush().expect("flush");
    let backup = backend.copy();
    store.erase_customer(&ALICE).expect("erase");
    drop(store);

    let restored =
        EncryptedStore::begin_epoch(backup.clone(), keyring(1), Arc::new(witness.clone()))
            .expect("the backup is accepted");
    assert!(restored.erased_at(&ALICE).expect("tombstone").is_some());
    assert_eq!(backup.get_key(&ALICE).expect("key"), None, "her key is destroyed again");
    assert!(backup.load(&ALICE, &DOC).expect("load").is_none(), "and her records removed");
    assert!(matches!(restored.load(&ALICE, &DOC), Ok(None) | Err(StoreError::Erased)));
    assert!(restored.load(&BOB, &DOC).expect("bob").is_some());
    assert_eq!(restored.ledger().expect("ledger").len(), 1, "the erasure is in the ledger once");
}

#[test]
fn a_batch_with_an_erased_customers_write_commits_the_rest_as_one_counted_flush() {
    let backend = MemoryStore::new();
    let witness = crate::witness::MemoryWitness::new();
    let store = witnessed(&backend, &witness).expect("a new store");
    store.erase_customer(&BOB).expect("erase bob");
    let before = store.flushes();
    let meta = b"meta".to_vec();
    let batch = [
        Write::Doc {
            customer: &ALICE,
            doc: &DOC,
            meta: &meta,
            chunk: Some(Chunk { id: ChunkId::of(b"x"), bytes: b"x" }),
            feed: true,
        },
        Write::Doc { customer: &BOB, doc: &DOC, meta: &meta, chunk: None, feed: true },
        Write::Record { customer: &ALICE, space: Space::AUDIT, key: b"k", value: b"v" },
    ];
    let outcomes = store.commit(&batch).expect("the batch commits");
    assert!(matches!(outcomes[0], Ok(Some(_))), "{outcomes:?}");
    assert!(matches!(outcomes[1], Err(StoreError::Erased)), "bob's write fails alone");
    assert!(matches!(outcomes[2], Ok(None)), "{outcomes:?}");
    assert_eq!(store.flushes(), before + 1, "one batch, one counted flush");
    drop(store);
    let store = witnessed(&backend, &witness).expect("the anchor names the batch's flush");
    assert_eq!(store.load(&ALICE, &DOC).expect("load").expect("alice's").chunks.len(), 1);
    assert_eq!(store.get_record(&ALICE, Space::AUDIT, b"k").expect("get"), Some(b"v".to_vec()));
}
