use automerge::transaction::Transactable;
use automerge::{AutomergeError, ROOT};
use serde_json::json;

use super::*;
use crate::history::{CompactionPolicy, History};
use crate::session::PeerSession;

fn put(doc: &mut Automerge, key: &str, value: i64) {
    doc.transact::<_, _, AutomergeError>(|tx| tx.put(ROOT, key, value)).expect("put");
}

/// Syncs `device` with `server` until neither has anything to say; returns the bytes the
/// server sent.
fn sync(device: &mut Automerge, server: &mut LazyDoc) -> usize {
    let (mut to_server, mut to_device) = (PeerSession::new(), PeerSession::new());
    let mut sent = 0;
    for _ in 0..20 {
        let up = to_server.generate(device);
        if let Some(message) = &up {
            to_device.receive(server, message).expect("the server takes it in");
        }
        let down = to_device.generate(server);
        if let Some(message) = &down {
            sent += message.len();
            to_server.receive(device, message).expect("the device takes it in");
        }
        if up.is_none() && down.is_none() {
            return sent;
        }
    }
    panic!("no convergence in 20 rounds");
}

#[test]
fn changes_are_taken_in_without_the_content_and_applied_in_one_batch_when_read() {
    let mut phone = Automerge::new();
    let mut server = LazyDoc::default();
    for i in 0..5 {
        put(&mut phone, "n", i);
        sync(&mut phone, &mut server);
    }
    assert_eq!(server.heads(), phone.get_heads());
    assert_eq!(server.behind(), 5, "nothing applied while syncing");
    let content = server.content().expect("applies");
    assert_eq!(crate::json::to_json(content), json!({ "n": 4 }));
    assert_eq!(server.behind(), 0);
}

#[test]
fn a_business_edit_goes_into_the_graph_and_reaches_devices() {
    let mut phone = Automerge::new();
    put(&mut phone, "a", 1);
    let mut server = LazyDoc::default();
    sync(&mut phone, &mut server);
    server.edit(|doc| put(doc, "b", 2)).expect("the content catches up");
    assert_eq!(server.behind(), 0);
    assert_eq!(server.graph().len(), 2, "the edit is in the graph");
    sync(&mut phone, &mut server);
    assert_eq!(phone.get_heads(), server.heads());
    assert_eq!(crate::json::to_json(&phone), json!({ "a": 1, "b": 2 }));
}

/// A stored history rebuilds with the snapshot's changes indexed, not kept: a device with
/// nothing gets them from the content, and a chunk taken after a lost one carries them.
#[test]
fn a_rebuilt_history_serves_its_snapshot_from_the_content() {
    let policy = CompactionPolicy { max_chunks: 3, max_chunk_bytes: u64::MAX };
    let mut history: History<LazyDoc> = History::new(policy);
    let mut phone = Automerge::new();
    let (mut snapshot, mut chunks) = (None, Vec::new());
    for i in 0..5 {
        put(&mut phone, "n", i);
        sync(&mut phone, history.doc_mut());
        chunks.extend(history.take_chunk());
        if let Some(compaction) = history.take_compaction().expect("the content applies") {
            let kept = history.doc().graph().kept_bytes();
            assert_eq!(kept, (0, 0), "the content holds the changes' bytes");
            chunks.retain(|c| !compaction.replaces.contains(&c.id));
            history.compacted(&compaction);
            snapshot = Some(compaction.snapshot);
        }
    }
    let snapshot = snapshot.expect("compacted once");
    assert_eq!(chunks.len(), 2, "two chunks after the snapshot");
    let mut rebuilt = History::<LazyDoc>::rebuild(
        Some((snapshot.id, &snapshot.bytes)),
        chunks.iter().map(|c| (c.id, c.bytes.as_slice())),
        policy,
    )
    .expect("rebuilds");
    assert_eq!(rebuilt.doc().heads(), phone.get_heads());
    assert_eq!(rebuilt.doc().graph().kept_bytes().0, 2, "the chunks' changes only");

    let mut laptop = Automerge::new();
    sync(&mut laptop, rebuilt.doc_mut());
    assert_eq!(laptop.get_heads(), phone.get_heads());
    assert_eq!(crate::json::to_json(&laptop), json!({ "n": 4 }));

    let lost = {
        put(&mut laptop, "m", 1);
        sync(&mut laptop, rebuilt.doc_mut());
        rebuilt.take_chunk().expect("a chunk")
    };
    rebuilt.lost(&lost.id);
    let everything = rebuilt.take_chunk().expect("everything, again");
    let mut loaded = Automerge::new();
    loaded.load_incremental(&everything.bytes).expect("loads");
    assert_eq!(loaded.get_heads(), laptop.get_heads());
}

#[test]
fn another_writers_snapshot_is_taken_in() {
    let mut there = Automerge::new();
    put(&mut there, "a", 1);
    let mut here = LazyDoc::default();
    sync(&mut there, &mut here);
    put(&mut there, "b", 2);
    here.load_more(&there.save()).expect("a snapshot loads");
    assert_eq!(here.heads(), there.get_heads());
    assert_eq!(crate::json::to_json(here.content().expect("applies")), json!({ "a": 1, "b": 2 }));
}

#[test]
fn a_missing_chunk_is_found_at_rebuild() {
    let mut phone = Automerge::new();
    let mut chunks = Vec::new();
    for i in 0..3 {
        let before = phone.get_heads();
        put(&mut phone, "n", i);
        chunks.push(phone.save_after(&before));
    }
    chunks.remove(1);
    let err = LazyDoc::rebuild(None, &chunks.concat()).expect_err("a change is missing");
    assert!(matches!(err, LoadError::Incomplete(1)), "{err}");
}

/// A change stored before the graph checked operations, that Automerge panics applying: an
/// operation on an object that does not exist.
#[test]
fn changes_automerge_refuses_leave_the_content_as_it_was_and_the_history_whole() {
    let mut phone = Automerge::new();
    put(&mut phone, "a", 1);
    let mut server = LazyDoc::default();
    sync(&mut phone, &mut server);
    put(&mut phone, "b", 2);
    let bad = crate::graph::crafted::first_op(&phone, &[("obj", json!("7@{actor}"))]);
    let stored = bad.raw_bytes().to_vec();
    server.load_more(&stored).expect("stored history is not checked again");
    assert!(server.graph().has(&bad.hash()));
    assert_eq!(server.behind(), 2);
    let err = server.content().expect_err("refused");
    assert!(matches!(err, ContentError::Refused(_)), "{err}");
    assert_eq!(server.behind(), 2, "the content is as it was");
    assert!(matches!(server.content(), Err(ContentError::Refused(_))), "and stays refused");
    assert!(server.edit(|_| ()).is_err(), "no edit on top of it");
    // The history still holds and stores it, and a device that has it syncs.
    let run = server.changes_after(&[]);
    let reloaded = LazyDoc::rebuild(None, &run).expect("reloads");
    assert!(reloaded.graph().has(&bad.hash()));
}

/// A device with nothing (or lacking much) that reads version 2 gets the snapshot the server
/// loaded or made (when such a device asks), with the changes since one by one, in place of
/// every change one by one: far fewer bytes, as Automerge sends its whole document.
#[test]
fn a_new_device_gets_the_snapshot_in_place_of_the_changes_one_by_one() {
    let mut phone = Automerge::new();
    for i in 0..2_000 {
        put(&mut phone, "n", i);
    }
    let saved = phone.save();
    put(&mut phone, "after", 1);
    let last = phone.save_after(&Automerge::load(&saved).expect("loads").get_heads());
    let changes_alone = phone.save_after(&[]).len();
    let loaded = LazyDoc::rebuild(Some(&saved), &last).expect("loads");
    let mut synced = LazyDoc::default();
    sync(&mut phone.clone(), &mut synced);
    assert_eq!(synced.graph().kept_bytes().0, 2_001, "no snapshot yet");
    for (case, mut server) in
        [("loaded from a snapshot", loaded), ("synced, never compacted", synced)]
    {
        let mut laptop = Automerge::new();
        let sent = sync(&mut laptop, &mut server);
        assert_eq!(laptop.get_heads(), phone.get_heads(), "{case}");
        assert_eq!(crate::json::to_json(&laptop), json!({ "n": 1999, "after": 1 }), "{case}");
        // A snapshot, a change or so after it, and the server's first Bloom filter (over every
        // change, about 10 bits each, as Automerge's own).
        assert!(
            sent < saved.len() + 2_000 * 10 / 8 + 1024,
            "{case}: {sent} bytes sent, not a snapshot ({}) and a little; the changes are \
             {changes_alone}",
            saved.len()
        );
    }
}
