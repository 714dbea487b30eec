use super::*;
use crate::history::CompactionPolicy;
use automerge::Automerge;
use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc};

const PHONE: DeviceId = DeviceId::from_bytes([1; 16]);
const LAPTOP: DeviceId = DeviceId::from_bytes([2; 16]);

fn history() -> History<LazyDoc> {
    History::new(CompactionPolicy::default())
}

/// A stored document with one change in it.
fn existing(private: bool) -> Document<u8> {
    let meta = DocMeta { private, ..DocMeta::new("notes") };
    let mut history = history();
    history
        .doc_mut()
        .edit(|doc| {
            doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "list", 1))
                .expect("a change");
        })
        .expect("an empty document's content");
    history.take_chunk();
    Document::new(Some(Live { history, meta, seq: Seq(5) }))
}

#[test]
fn an_offer_creates_ratchets_privacy_or_is_unknown() {
    let private = Some(("notes".to_owned(), true));
    let public = Some(("notes".to_owned(), false));
    // (exists, private before, create) -> (offer, private after)
    let table = [
        (false, false, None, Offer::Unknown, None),
        (false, false, public.clone(), Offer::Created, Some(false)),
        (false, false, private.clone(), Offer::Created, Some(true)),
        (true, false, None, Offer::Exists, Some(false)),
        (true, false, public.clone(), Offer::Exists, Some(false)),
        (true, false, private.clone(), Offer::MadePrivate, Some(true)),
        (true, true, public, Offer::Exists, Some(true)),
        (true, true, private, Offer::Exists, Some(true)),
    ];
    for (exists, was_private, create, want, private_after) in table {
        let mut doc = if exists { existing(was_private) } else { Document::<u8>::new(None) };
        let case = format!("exists {exists}, private {was_private}, create {create:?}");
        assert_eq!(doc.offer(create, history), want, "{case}");
        assert_eq!(doc.live().map(|l| l.meta.private), private_after, "{case}");
        let stored = doc.persist().map(|p| p.metadata);
        assert_eq!(stored, want.touched().then_some(true), "{case}: what is stored");
    }
}

/// A phone and a laptop in step; the phone makes a change and sends it.
fn two_in_step() -> (Document<u8>, Automerge, Automerge, PeerSession, PeerSession) {
    let mut doc = existing(false);
    doc.persisted(DocMeta::new("notes"), Seq(5));
    let (mut phone, mut laptop) = (Automerge::new(), Automerge::new());
    let (mut phone_to_server, mut laptop_to_server) = (PeerSession::new(), PeerSession::new());
    doc.join(1, PHONE, PeerSession::new());
    doc.join(2, LAPTOP, PeerSession::new());
    // Each says what it has, and is answered, until nothing is left to say.
    for _ in 0..10 {
        let mut said = false;
        for (id, device, session) in
            [(1, &mut phone, &mut phone_to_server), (2, &mut laptop, &mut laptop_to_server)]
        {
            if let Some(message) = session.generate(device) {
                doc.apply(&id, &message).expect("applies");
                said = true;
            }
        }
        if !said {
            break;
        }
        let spoke = HashSet::from([1, 2]);
        for (id, answer, _) in doc.answers(&spoke, false) {
            if let Answer::Message(message) = answer {
                let (device, session) = if id == 1 {
                    (&mut phone, &mut phone_to_server)
                } else {
                    (&mut laptop, &mut laptop_to_server)
                };
                session.receive(device, &message).expect("receives");
            }
        }
    }
    (doc, phone, laptop, phone_to_server, laptop_to_server)
}

#[test]
fn the_sender_is_answered_and_the_other_peers_hear_of_a_change_only_if_the_heads_moved() {
    let (mut doc, mut phone, mut laptop, mut phone_to_server, mut laptop_to_server) = two_in_step();
    phone
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "milk", 1).map(drop))
        .expect("a change");
    // Usually one message carries the change; when the server's Bloom filter took it for
    // one it has (a false positive), the server asks for it in its answer.
    for _ in 0..4 {
        if let Some(message) = phone_to_server.generate(&phone) {
            doc.apply(&1, &message).expect("applies");
        }
        let server = doc.live().expect("live").history.doc();
        if server.graph().heads() == phone.get_heads() {
            break;
        }
        for (_, answer, _) in doc.answers(&HashSet::from([1]), false) {
            if let Answer::Message(message) = answer {
                phone_to_server.receive(&mut phone, &message).expect("receives");
            }
        }
    }
    let persist = doc.persist().expect("a chunk");
    assert!(persist.chunk.is_some() && !persist.metadata);
    doc.persisted(persist.meta, Seq(6));

    // Nobody spoke and the heads did not move: nothing for anyone.
    assert!(doc.answers(&HashSet::new(), false).is_empty());
    // The phone spoke and the heads moved: both are answered; the phone's message named
    // every head, so it holds the durable document.
    let mut answers = doc.answers(&HashSet::from([1]), true);
    answers.sort_by_key(|(id, ..)| *id);
    assert!(matches!(answers[0], (1, Answer::Message(_), true)), "{answers:?}");
    let (2, Answer::Message(to_laptop), false) = &answers[1] else {
        panic!("the laptop hears of the change: {answers:?}");
    };
    laptop_to_server.receive(&mut laptop, to_laptop).expect("receives");
    assert!(laptop.get(ROOT, "milk").expect("read").is_some(), "the change reached it");

    // The laptop's acknowledgement names every head: it holds the document now, and it
    // heard the current heads already, so it is not answered.
    let ack = laptop_to_server.generate(&laptop).expect("an acknowledgement");
    doc.apply(&2, &ack).expect("applies");
    assert!(doc.persist().is_none(), "an acknowledgement stores nothing");
    let answers = doc.answers(&HashSet::from([2]), false);
    assert_eq!(answers, vec![(2, Answer::Nothing, true)]);
}

#[test]
fn a_leaving_peer_keeps_its_session_only_if_it_shared_anything() {
    let (mut doc, ..) = two_in_step();
    doc.join(3, PHONE, PeerSession::new());
    let (device, kept) = doc.leave(&1).expect("was there");
    assert_eq!(device, PHONE);
    assert!(kept.is_some(), "in step: worth keeping");
    let mut fresh = Document::<u8>::new(None);
    fresh.join(1, PHONE, PeerSession::new());
    assert_eq!(fresh.leave(&1).map(|(_, kept)| kept), Some(None));
    assert_eq!(fresh.leave(&1), None);
}

#[test]
fn a_deletion_tells_every_peer_and_forgets_them() {
    let (mut doc, ..) = two_in_step();
    let mut told = doc.deleted();
    told.sort_unstable();
    assert_eq!(told, vec![1, 2]);
    assert!(doc.live().is_none() && !doc.has_peer(&1));
    assert_eq!(doc.offer(None, history), Offer::Unknown);
}

#[test]
fn a_document_stored_without_a_feed_position_is_stored_again_with_its_metadata() {
    let mut doc = existing(false);
    doc.persisted(DocMeta::new("notes"), Seq(0));
    let persist = doc.persist().expect("written again");
    assert!(persist.metadata && persist.chunk.is_none());
    doc.persisted(persist.meta, Seq(9));
    assert!(doc.persist().is_none(), "then nothing, until something changes");
}
