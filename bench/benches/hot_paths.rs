//! Criterion micro-benchmarks of the per-change hot paths: the sync frame codec, sealing and
//! opening a record, the document actor's apply of one device change, the sled store's document
//! writes, loading a document from its stored snapshot and chunks, and sync messages in parts.
//! `cargo bench -p cubby-bench`.

use automerge::Automerge;
use automerge::transaction::Transactable;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use cubby_core::session::PeerSession;
use cubby_proto::pb;
use cubby_store::Docs;
use prost::Message;

fn frame_codec(c: &mut Criterion) {
    let frame = pb::ClientFrame {
        frame: Some(pb::client_frame::Frame::Sync(pb::DocSync {
            doc_id: vec![1; 16],
            message: vec![7; 256],
            create: None,
            seq: 0,
            more: false,
        })),
    };
    c.bench_function("frame_codec/encode_decode_256B", |b| {
        b.iter(|| {
            let bytes = std::hint::black_box(&frame).encode_to_vec();
            pb::ClientFrame::decode(bytes.as_slice()).expect("decodes")
        });
    });
}

fn seal_open(c: &mut Criterion) {
    let key = cubby_crypto::keys::DataKey::generate();
    for size in [256usize, 4096] {
        let plaintext = vec![5u8; size];
        let sealed = cubby_crypto::envelope::seal(&key, b"aad", &plaintext);
        c.bench_function(&format!("seal/{size}B"), |b| {
            b.iter(|| cubby_crypto::envelope::seal(&key, b"aad", std::hint::black_box(&plaintext)));
        });
        c.bench_function(&format!("open/{size}B"), |b| {
            b.iter(|| cubby_crypto::envelope::open(&key, b"aad", std::hint::black_box(&sealed)));
        });
    }
}

/// A document with `changes` small changes.
fn history(changes: u64) -> Automerge {
    let mut doc = Automerge::new();
    for n in 0..changes {
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "n", n).expect("put");
        tx.commit();
    }
    doc
}

/// A document of `changes` changes on the server and on a device, and the two sessions
/// between them, settled: each side knows the heads the other has.
fn settled(changes: u64) -> (Automerge, Automerge, PeerSession, PeerSession) {
    let mut server = history(changes);
    let mut device = server.fork();
    let (mut on_server, mut on_device) = (PeerSession::new(), PeerSession::new());
    for _ in 0..4 {
        if let Some(m) = on_device.generate(&device) {
            on_server.receive(&mut server, &m).expect("valid");
        }
        if let Some(m) = on_server.generate(&server) {
            on_device.receive(&mut device, &m).expect("valid");
        }
    }
    (server, device, on_server, on_device)
}

/// The server's copy of a document of `changes` changes, its session with a device (settled:
/// the heads both share), and that device's sync message carrying one new change (what the
/// document actor applies for an isolated edit).
fn one_change_message(changes: u64) -> (Automerge, Vec<u8>, Vec<u8>) {
    let (server, mut device, on_server, mut on_device) = settled(changes);
    let mut tx = device.transaction();
    tx.put(automerge::ROOT, "n", changes + 1).expect("put");
    tx.commit();
    let message = on_device.generate(&device).expect("a message with the change");
    let mut check = server.clone();
    PeerSession::restore(&on_server.persist())
        .expect("restores")
        .receive(&mut check, &message)
        .expect("applies");
    assert_eq!(check.get_heads(), device.get_heads(), "the message carries the change");
    (server, on_server.persist(), message)
}

fn actor_apply(c: &mut Criterion) {
    for changes in [100u64, 1_000, 10_000] {
        let (server, session, message) = one_change_message(changes);
        let setup =
            || (server.clone(), PeerSession::restore(&session).expect("a saved session restores"));
        c.bench_function(&format!("actor_apply/one_change_into_{changes}"), |b| {
            b.iter_batched(
                setup,
                |(mut doc, mut session)| {
                    session.receive(&mut doc, &message).expect("applies");
                    (doc, session)
                },
                BatchSize::SmallInput,
            );
        });
        c.bench_function(&format!("actor_answer/after_one_change_into_{changes}"), |b| {
            b.iter_batched(
                || {
                    let (mut doc, mut session) = setup();
                    session.receive(&mut doc, &message).expect("applies");
                    (doc, session)
                },
                // Returned, so that dropping the document is not timed.
                |(doc, mut session)| {
                    let reply = session.reply(&doc);
                    (doc, session, reply)
                },
                BatchSize::SmallInput,
            );
        });
    }
}

/// The server's copy of a document of `changes` changes after one more change reached it from
/// another device, its session with a receiving device it has just sent that change to, and the
/// receiver's reply (its new heads: the acknowledgement the actor takes from every receiver).
fn acknowledgement(changes: u64) -> (Automerge, PeerSession, Vec<u8>) {
    let (mut server, mut receiver, mut on_server, mut on_receiver) = settled(changes);
    let mut tx = server.transaction();
    tx.put(automerge::ROOT, "n", changes + 1).expect("put");
    tx.commit();
    let push = on_server.generate(&server).expect("the change for the receiver");
    on_receiver.receive(&mut receiver, &push).expect("applies");
    assert_eq!(receiver.get_heads(), server.get_heads(), "the receiver has the change");
    let reply = on_receiver.generate(&receiver).expect("the receiver's new heads");
    (server, on_server, reply)
}

fn actor_acknowledgement(c: &mut Criterion) {
    for changes in [100u64, 1_000, 10_000] {
        let (server, session, reply) = acknowledgement(changes);
        c.bench_function(&format!("actor_ack/receive_and_reply_in_{changes}"), |b| {
            b.iter_batched(
                || (server.clone(), session.clone()),
                |(mut doc, mut session)| {
                    session.receive(&mut doc, &reply).expect("valid");
                    let reply = session.reply(&doc);
                    (doc, session, reply)
                },
                BatchSize::SmallInput,
            );
        });
    }
}

fn parts(c: &mut Criterion) {
    let sync = pb::DocSync { doc_id: vec![2; 16], message: vec![9; 4 << 20], ..Default::default() };
    c.bench_function("parts/split_and_reassemble_4MiB", |b| {
        b.iter_batched(
            || sync.clone(),
            |sync| {
                let mut reassembly = cubby_proto::parts::Reassembly::new(8 << 20);
                let mut whole = None;
                for part in cubby_proto::parts::split(sync) {
                    whole = reassembly.push(part).expect("fits");
                }
                whole.expect("the last part completes it")
            },
            BatchSize::LargeInput,
        );
    });
}

/// A text of `typed` characters saved as a snapshot, then `chunks` more characters typed one per
/// stored chunk (each an `Automerge::save_after`), as a device or the server keeps them before
/// the next compaction.
fn stored_text(typed: usize, chunks: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut doc = Automerge::new();
    let text = doc
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put_object(automerge::ROOT, "text", automerge::ObjType::Text)
        })
        .expect("creates the text")
        .result;
    let type_one = |doc: &mut Automerge, at: usize| {
        doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.splice_text(&text, at, 0, "a"))
            .expect("types");
    };
    for at in 0..typed {
        type_one(&mut doc, at);
    }
    let snapshot = doc.save();
    let stored = (0..chunks)
        .map(|n| {
            let heads = doc.get_heads();
            type_one(&mut doc, typed + n);
            doc.save_after(&heads)
        })
        .collect();
    (snapshot, stored)
}

/// The sled store's document writes, without the flush that follows them: the server's
/// (metadata, feed move, chunk) and a device's (off the feed), at the fan-out workload's sizes
/// (a 60-byte metadata record, a 200-byte chunk), round 64 documents of one customer.
/// A chunk id for the benches' chunks, which all have the same bytes: the id a distinct chunk
/// would have.
fn chunk_id(index: u64) -> cubby_core::ChunkId {
    cubby_core::ChunkId::of(&index.to_be_bytes())
}

fn store_write(c: &mut Criterion) {
    use cubby_store::Chunk;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = cubby_store_sled::SledStore::open(dir.path()).expect("opens");
    let customer = cubby_core::CustomerId::from_bytes([1; 16]);
    let docs: Vec<_> = (0..64u8).map(|i| cubby_core::DocId::from_bytes([i; 16])).collect();
    let (meta, bytes) = ([3u8; 60], [4u8; 200]);
    let mut index = 0u64;
    c.bench_function("store_write/server_write_doc", |b| {
        b.iter(|| {
            index += 1;
            let id = chunk_id(index);
            let (doc, chunk) = (&docs[(index % 64) as usize], Chunk { id, bytes: &bytes });
            store.write_doc(&customer, doc, &meta, Some(chunk)).expect("writes")
        });
    });
    c.bench_function("store_write/device_write_doc_off_feed", |b| {
        b.iter(|| {
            index += 1;
            let id = chunk_id(index);
            let (doc, chunk) = (&docs[(index % 64) as usize], Chunk { id, bytes: &bytes });
            store.write_doc_off_feed(&customer, doc, &meta, Some(chunk)).expect("writes")
        });
    });
    // A compaction at the default policy's 256 chunks (a new document each time). The chunks it
    // covers are removed a few at a time by the writes after it: here the next setup's, untimed.
    let mut fresh = 0u32;
    c.bench_function("store_write/compact_256_chunks", |b| {
        b.iter_batched(
            || {
                fresh += 1;
                let mut id = [0xcc; 16];
                id[..4].copy_from_slice(&fresh.to_be_bytes());
                let doc = cubby_core::DocId::from_bytes(id);
                for index in 0..256 {
                    let chunk = Chunk { id: chunk_id(index), bytes: &bytes };
                    store.write_doc_off_feed(&customer, &doc, &meta, Some(chunk)).expect("writes");
                }
                doc
            },
            |doc| {
                let bytes = vec![5; 600];
                let snapshot = cubby_store::Snapshot { id: cubby_core::ChunkId::of(&bytes), bytes };
                let replaces: Vec<_> = (0..256).map(chunk_id).collect();
                store.compact(&customer, &doc, &snapshot, &replaces).expect("compacts")
            },
            BatchSize::PerIteration,
        );
    });
}

fn rebuild(c: &mut Criterion) {
    for typed in [10_000, 100_000] {
        let (snapshot, chunks) = stored_text(typed, 256);
        c.bench_function(&format!("rebuild/text_of_{typed}_plus_256_chunks"), |b| {
            b.iter(|| {
                cubby_core::history::rebuild(Some(&snapshot), chunks.iter().map(Vec::as_slice))
                    .expect("loads")
            });
        });
    }
}

criterion_group!(
    benches,
    frame_codec,
    seal_open,
    actor_apply,
    actor_acknowledgement,
    store_write,
    rebuild,
    parts
);
criterion_main!(benches);
