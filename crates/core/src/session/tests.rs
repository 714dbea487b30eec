//! The sync protocol between two peers: convergence, refusals, resending, sessions kept
//! across reconnects, and the attacks of BAD_INPUTS. Two property tests have files of their own:
//! `in_step` (the fast path of `receive` ends where Automerge's own would, and where a change
//! graph's would) and
//! `server_batches` (the server's batching never leaves a device waiting).

use super::*;
use automerge::{ROOT, transaction::Transactable};

mod in_step;
mod server_batches;

impl PeerSession {
    /// A message for the peer even when the protocol has nothing new to say: lets a test
    /// send whenever it likes.
    fn answer(&mut self, doc: &impl Replica) -> Vec<u8> {
        match self.generate(doc) {
            Some(message) => message,
            None => self.forced(doc),
        }
    }
}

fn doc_with(key: &str, value: &str) -> Automerge {
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(ROOT, key, value)?;
        Ok(())
    })
    .expect("put on a fresh document");
    doc
}

/// Runs the protocol until neither side has anything to say; returns the rounds it took.
fn sync_pair(a: &mut Automerge, b: &mut Automerge) -> usize {
    exchange(a, &mut PeerSession::new(), b, &mut PeerSession::new())
}

/// Runs the protocol between `a` (its session with `b` is `a_to_b`) and `b` until neither
/// side has anything to say; returns the rounds it took.
fn exchange(
    a: &mut Automerge,
    a_to_b: &mut PeerSession,
    b: &mut Automerge,
    b_to_a: &mut PeerSession,
) -> usize {
    for round in 1..100 {
        let ma = a_to_b.generate(a);
        if let Some(m) = &ma {
            b_to_a.receive(b, m).expect("valid message");
        }
        let mb = b_to_a.generate(b);
        if let Some(m) = &mb {
            a_to_b.receive(a, m).expect("valid message");
        }
        if ma.is_none() && mb.is_none() {
            return round;
        }
    }
    panic!("no convergence in 100 rounds");
}

#[test]
fn concurrent_edits_converge() {
    let mut a = doc_with("a", "1");
    let mut b = doc_with("b", "2");
    sync_pair(&mut a, &mut b);
    assert_eq!(a.get_heads(), b.get_heads());
    assert_eq!(crate::json::to_json(&a), serde_json::json!({"a": "1", "b": "2"}));
}

#[test]
fn truncated_message_is_refused_and_leaves_the_document_unchanged() {
    let mut source = doc_with("k", "v");
    let message = PeerSession::new().generate(&source).expect("a first message");
    // The first message only carries heads; a second carries the change itself.
    let mut target = Automerge::new();
    let mut session = PeerSession::new();
    session.receive(&mut target, &message).expect("valid");
    let mut back = PeerSession::new();
    let reply = session.generate(&target).expect("reply");
    back.receive(&mut source, &reply).expect("valid");
    let with_change = back.generate(&source).expect("message carrying the change");
    let mut refused = 0;
    for cut in 0..with_change.len() {
        let mut scratch = target.clone();
        let mut fresh = PeerSession::new();
        // A cut that ends on an optional trailing section is itself a valid message; every
        // other cut must be refused without touching the document.
        if fresh.receive(&mut scratch, &with_change[..cut]).is_err() {
            refused += 1;
            assert_eq!(scratch.get_heads(), target.get_heads(), "cut at {cut}");
        }
    }
    assert!(refused >= with_change.len() - 2, "only {refused} cuts refused");
    // The session is still usable afterwards.
    session.receive(&mut target, &with_change).expect("the whole message applies");
    assert_eq!(target.get_heads(), source.get_heads());
}

#[test]
fn a_change_waiting_for_its_dependency_is_not_settled() {
    let mut source = doc_with("a", "1");
    let first = source.get_heads();
    source
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "b", "2")?;
            Ok(())
        })
        .expect("put");
    // Deliver only the second change: it waits in the queue for the first.
    let mut target = Automerge::new();
    target.load_incremental(&source.save_after(&first)).expect("queued, not refused");
    assert!(target.get_heads().is_empty());
    let mut session = PeerSession::new();
    let mut back = PeerSession::new();
    let hello = back.generate(&Automerge::new()).expect("hello");
    session.receive(&mut target, &hello).expect("valid");
    assert!(!session.settled(&target), "a queued change keeps the exchange open");
    let mut empty = Automerge::new();
    let mut s2 = PeerSession::new();
    s2.receive(&mut empty, &hello).expect("valid");
    assert!(s2.settled(&empty), "two empty documents are settled");
}

#[test]
fn a_change_the_peer_forgot_is_sent_again_when_it_needs_it() {
    let mut a = doc_with("k", "v");
    // B has history of its own, so forgetting A's change does not empty its heads (which
    // Automerge already treats as "the peer lost everything").
    let mut b = doc_with("other", "x");
    let (mut a_to_b, mut b_to_a) = (PeerSession::new(), PeerSession::new());
    // Run the protocol; B applies the first message carrying changes to a copy it then
    // throws away (as when a queued change or a reloaded document is forgotten), while its
    // session lives on.
    let mut forgotten = false;
    for _ in 0..20 {
        if let Some(m) = a_to_b.generate(&a) {
            let carries = !sync::Message::decode(&m).expect("valid").changes.is_empty();
            if carries && !forgotten {
                forgotten = true;
                let mut scratch = b.clone();
                b_to_a.receive(&mut scratch, &m).expect("valid");
            } else {
                b_to_a.receive(&mut b, &m).expect("valid");
            }
        }
        if let Some(m) = b_to_a.generate(&b) {
            a_to_b.receive(&mut a, &m).expect("valid");
        }
    }
    assert!(forgotten, "a change was forgotten");
    assert_eq!(a.get_heads(), b.get_heads(), "the forgotten change was sent again");
}

#[test]
fn a_pipelined_change_is_always_acknowledged() {
    let mut device = doc_with("k", "v");
    let mut server = Automerge::new();
    let (mut to_server, mut to_device) = (PeerSession::new(), PeerSession::new());
    // The device sends twice before hearing back: its change, then its heads again.
    let first = to_server.generate(&device).expect("hello");
    to_device.receive(&mut server, &first).expect("valid");
    let reply = to_device.generate(&server).expect("reply");
    to_server.receive(&mut device, &reply).expect("valid");
    let with_change = to_server.generate(&device).expect("carries the change");
    to_server.reconnect();
    let heads_only = to_server.generate(&device).expect("a second message");
    to_device.receive(&mut server, &with_change).expect("valid");
    to_device.receive(&mut server, &heads_only).expect("valid");
    assert_eq!(server.get_heads(), device.get_heads());
    // Plain generate may stay silent here; the reply tells the device.
    let answer = to_device.reply(&server).expect("the device has not heard these heads");
    to_server.receive(&mut device, &answer).expect("valid");
    assert!(to_server.peer_has_everything(&device), "the device learns the server has its change");
}

#[test]
fn a_reconnected_session_speaks_first_again() {
    let mut doc = doc_with("k", "v");
    let mut session = PeerSession::new();
    assert!(session.generate(&doc).is_some());
    // The peer never answered (the connection dropped): nothing more to say on this one.
    assert!(session.generate(&doc).is_none());
    session.reconnect();
    assert!(session.generate(&doc).is_some(), "a new connection starts a new round");
    doc = doc_with("k", "w");
    assert!(session.generate(&doc).is_some());
}

#[test]
fn persisted_session_makes_reconnect_small() {
    let mut server = Automerge::new();
    for i in 0..300 {
        server
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(ROOT, format!("k{i}"), i as i64)?;
                Ok(())
            })
            .expect("put");
    }
    let mut device = Automerge::new();
    let mut to_server = PeerSession::new();
    exchange(&mut device, &mut to_server, &mut server, &mut PeerSession::new());
    let saved = to_server.persist();
    let mut restored = PeerSession::restore(&saved).expect("decodes");
    let fresh_hello = PeerSession::new().generate(&device).expect("hello").len();
    let restored_hello = restored.generate(&device).expect("hello").len();
    assert!(restored_hello < fresh_hello, "{restored_hello} >= {fresh_hello}");
}

/// Syncs `device` with `server` until both are quiet; returns the server's session with it.
fn settle(server: &mut Automerge, device: &mut Automerge) -> PeerSession {
    let mut to_device = PeerSession::new();
    exchange(device, &mut PeerSession::new(), server, &mut to_device);
    to_device
}

#[test]
fn a_pushed_message_carries_what_changed_since_the_saved_session() {
    let mut server = doc_with("title", "notes");
    let mut device = Automerge::new();
    let saved = settle(&mut server, &mut device).persist();
    let mut writer = server.fork();
    writer
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "late", "edit").map(drop))
        .expect("put");
    server.merge(&mut writer).expect("merge");

    // The device has said nothing on its new connection: the first message carries the change.
    let mut restored = PeerSession::restore_for(&saved, &server);
    let pushed = restored.push(&server).expect("something changed");
    let mut from_server = PeerSession::new();
    assert!(from_server.receive(&mut device, &pushed).expect("valid").changed);
    assert_eq!(device.get_heads(), server.get_heads());
    // Its answer acknowledges, and the exchange ends there.
    let answer = from_server.generate(&device).expect("the device's new heads");
    restored.receive(&mut server, &answer).expect("valid");
    assert!(restored.peer_has_everything(&server));
    assert_eq!(restored.reply(&server), None);

    // Nothing to push: in step, never synced, or the peer spoke first on this connection.
    assert_eq!(PeerSession::restore_for(&restored.persist(), &server).push(&server), None);
    assert_eq!(PeerSession::new().push(&server), None);
    let mut spoken = PeerSession::restore_for(&saved, &server);
    let hello = PeerSession::restore_for(&saved, &device).generate(&device).expect("hello");
    spoken.receive(&mut server, &hello).expect("valid");
    assert_eq!(spoken.push(&server), None);
}

#[test]
fn a_push_to_a_device_that_lost_part_of_what_it_shared_converges_after_one_more_exchange() {
    let mut server = doc_with("a", "1");
    let mut device = Automerge::new();
    settle(&mut server, &mut device);
    server
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "b", "2").map(drop))
        .expect("put");
    let mut kept = device.clone(); // what the device still has after a crash
    let saved = settle(&mut server, &mut device).persist();
    server
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "c", "3").map(drop))
        .expect("put");

    let mut to_device = PeerSession::restore_for(&saved, &server);
    let mut to_server = PeerSession::new();
    let pushed = to_device.push(&server).expect("something changed");
    to_server.receive(&mut kept, &pushed).expect("valid");
    assert_ne!(kept.get_heads(), server.get_heads(), "the pushed change lacks its dependency");
    let rounds = exchange(&mut kept, &mut to_server, &mut server, &mut to_device);
    assert!(rounds <= 3, "{rounds} rounds");
    assert_eq!(kept.get_heads(), server.get_heads());
}

/// A message from `a` carrying its changes to an empty `b`, after one round trip.
fn message_with_changes(a: &Automerge) -> Vec<u8> {
    let (mut a, mut b) = (a.clone(), Automerge::new());
    let (mut a_side, mut b_side) = (PeerSession::new(), PeerSession::new());
    let heads = a_side.generate(&a).expect("a advertises its heads");
    b_side.receive(&mut b, &heads).expect("valid");
    let need = b_side.generate(&b).expect("b says what it has");
    a_side.receive(&mut a, &need).expect("valid");
    a_side.generate(&a).expect("a sends its changes")
}

#[test]
fn row_03_a_tampered_change_is_never_accepted() {
    let a = doc_with("secret", "original value");
    let message = message_with_changes(&a);
    let mut applied_unchanged = 0;
    for i in 0..message.len() {
        let mut tampered = message.clone();
        tampered[i] ^= 0x20;
        let mut b = Automerge::new();
        let _ = PeerSession::new().receive(&mut b, &tampered);
        let heads = b.get_heads();
        // Either nothing was applied, or exactly A's own change (the flip hit a byte that
        // does not belong to the change, such as an advertised head): never a change of
        // someone's making.
        assert!(
            heads.is_empty() || heads == a.get_heads(),
            "byte {i}: a tampered change was applied"
        );
        applied_unchanged += usize::from(heads == a.get_heads());
    }
    // The untampered message does apply.
    let mut b = Automerge::new();
    PeerSession::new().receive(&mut b, &message).expect("valid");
    assert_eq!(b.get_heads(), a.get_heads());
    assert!(applied_unchanged < message.len() / 2, "most flips hit the change and are refused");
}

#[test]
fn row_06_duplicate_delivery_is_idempotent() {
    let a = doc_with("k", "v");
    let message = message_with_changes(&a);
    let mut b = Automerge::new();
    let mut session = PeerSession::new();
    session.receive(&mut b, &message).expect("valid");
    let (heads, saved) = (b.get_heads(), b.save());
    for _ in 0..3 {
        let _ = session.receive(&mut b, &message);
        assert_eq!(b.get_heads(), heads);
        assert_eq!(b.save(), saved);
    }
    // A fresh session (a reconnect) replaying it is just as harmless.
    let _ = PeerSession::new().receive(&mut b, &message);
    assert_eq!(b.get_heads(), heads);
}

#[test]
fn row_05_07_reordered_messages_and_missing_dependencies_converge() {
    // A makes two changes, each sent in its own message; B gets them in the wrong order.
    let mut a = doc_with("first", "1");
    let mut b = Automerge::new();
    let (mut a_side, mut b_side) = (PeerSession::new(), PeerSession::new());
    let mut messages = Vec::new();
    for round in 0..2 {
        if round == 1 {
            a.transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(ROOT, "second", "2")?;
                Ok(())
            })
            .expect("put");
        }
        // Let B's side of the protocol ask, then capture what A sends.
        let ask = b_side.generate(&b).unwrap_or_else(|| b_side.answer(&b));
        a_side.receive(&mut a, &ask).expect("valid");
        if let Some(message) = a_side.generate(&a) {
            messages.push(message);
        }
    }
    assert_eq!(messages.len(), 2, "one message per change");
    for message in messages.iter().rev() {
        // The later change waits for its dependency (or is refused); nothing is corrupted.
        let _ = b_side.receive(&mut b, message);
    }
    // After one reliable round on a fresh connection, both hold everything.
    a_side.reconnect();
    b_side.reconnect();
    sync_pair(&mut a, &mut b);
    assert_eq!(a.get_heads(), b.get_heads());
    assert_eq!(crate::json::to_json(&b), crate::json::to_json(&a));
}

#[test]
fn row_32_concurrent_edits_of_one_field_merge_deterministically() {
    let mut phone = doc_with("title", "from the phone");
    let mut laptop = Automerge::load(&phone.save()).expect("loads");
    laptop.set_actor(automerge::ActorId::random());
    for (doc, value) in [(&mut phone, "phone wins?"), (&mut laptop, "laptop wins?")] {
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "title", value)?;
            Ok(())
        })
        .expect("put");
    }
    sync_pair(&mut phone, &mut laptop);
    assert_eq!(phone.get_heads(), laptop.get_heads());
    assert_eq!(crate::json::to_json(&phone), crate::json::to_json(&laptop));
    // The conflict stays visible to apps that want it.
    assert_eq!(phone.get_all(ROOT, "title").expect("read").len(), 2);
}
