//! Cubby's fuzz targets, as plain functions of arbitrary bytes.
//!
//! `fuzz/` (a cargo-fuzz project outside the workspace) calls each of these from a
//! `fuzz_target!`; `tests/regressions.rs` replays every input kept under
//! `fuzz/regressions/<target>/` through the same function on every `cargo test`. Each function
//! panics only when Cubby breaks a promise about that input (a panic inside Automerge itself is
//! reported too: the server contains those, see `docs.rs`, but they are bugs to know about).

use std::sync::OnceLock;

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use cubby_core::session::PeerSession;
use cubby_crypto::jwt::{Algorithm, Validation, Verifier, VerifyingKey};
use cubby_crypto::keys::{DataKey, Keyring, MasterSecret};
use cubby_crypto::signing::TokenSigner;
use cubby_proto::pb;
use prost::Message;

/// A fuzz target: arbitrary bytes in, a panic only on a broken promise.
pub type Target = fn(&[u8]);

/// The targets, by name (the directory names under `fuzz/regressions/`).
pub const TARGETS: [(&str, Target); 6] = [
    ("client_frame", client_frame),
    ("sync_message", sync_message),
    ("graph_sync", graph_sync),
    ("graph_ops", graph_ops),
    ("token", token),
    ("sealed_record", sealed_record),
];

/// A frame from a device: decoding never panics, and whatever decodes re-encodes to a frame that
/// decodes the same, with its ids validated as the server does.
pub fn client_frame(data: &[u8]) {
    let Ok(frame) = pb::ClientFrame::decode(data) else { return };
    let again = pb::ClientFrame::decode(frame.encode_to_vec().as_slice())
        .expect("a decoded frame re-encodes to a frame that decodes");
    assert_eq!(again, frame, "decode and encode round-trip");
    match frame.frame {
        Some(pb::client_frame::Frame::Sync(sync)) => {
            let _ = cubby_proto::doc_id(&sync.doc_id);
        }
        Some(pb::client_frame::Frame::Hello(hello)) => {
            let _ = cubby_proto::device_id(&hello.device_id);
        }
        Some(pb::client_frame::Frame::FreshToken(fresh)) => token(fresh.token.as_bytes()),
        Some(pb::client_frame::Frame::Proof(_)) | None => {}
    }
}

/// A document with some history, built once.
fn base_document() -> &'static [u8] {
    static SAVED: OnceLock<Vec<u8>> = OnceLock::new();
    SAVED.get_or_init(|| {
        let mut doc = Automerge::new();
        for i in 0..3_i64 {
            let mut tx = doc.transaction();
            tx.put(ROOT, format!("k{i}"), i).expect("put on a fresh document");
            tx.commit();
        }
        doc.save()
    })
}

/// An Automerge sync message from a peer, handled as the document actor does: refused with the
/// document unchanged, or applied; either way the session can go on.
pub fn sync_message(data: &[u8]) {
    let mut doc = Automerge::load(base_document()).expect("the base document loads");
    let mut session = PeerSession::new();
    let _ = session.generate(&doc);
    let before = doc.get_heads();
    match session.receive(&mut doc, data) {
        Ok(_) => {}
        Err(_) => assert_eq!(doc.get_heads(), before, "a refused message changed the document"),
    }
    // The session still works after anything.
    let _ = session.generate(&doc);
    let _ = session.reply(&doc);
}

/// An Automerge sync message from a peer, taken by the change graph (`cubby_core::graph`) and
/// by Automerge's own document: the graph never panics, a message it refuses leaves it as it
/// was, and when both take the message in they agree on the heads. (A change the graph takes
/// in and Automerge refuses to apply is possible: the graph checks structure only.)
pub fn graph_sync(data: &[u8]) {
    use automerge::sync::{Message, State, SyncDoc};
    use cubby_core::graph::ChangeGraph;
    let mut doc = Automerge::load(base_document()).expect("the base document loads");
    let mut graph = ChangeGraph::new();
    graph.add(doc.get_changes(&[])).expect("the base document's changes");
    let Ok(message) = Message::decode(data) else { return };
    let (mut on_graph, mut on_doc) = (State::new(), State::new());
    let _ = graph.generate_sync_message(&mut on_graph);
    let _ = doc.generate_sync_message(&mut on_doc);
    let before = graph.heads();
    let taken = graph.receive_sync_message(&mut on_graph, message.clone());
    if taken.is_err() {
        assert_eq!(graph.heads(), before, "a refused message changed the graph");
    }
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.receive_sync_message(&mut on_doc, message).is_ok()
    }));
    if taken.is_ok() && matches!(applied, Ok(true)) {
        assert_eq!(graph.heads(), doc.get_heads(), "the graph and the document disagree");
    }
    // The graph's session goes on after anything.
    let _ = graph.generate_sync_message(&mut on_graph);
}

/// A document with a map, a list and a text, and its last change (three operations), the
/// template [`graph_ops`] rewrites.
fn ops_base() -> &'static (Automerge, automerge::Change) {
    static BASE: OnceLock<(Automerge, automerge::Change)> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "n", 1)?;
            tx.put_object(ROOT, "map", automerge::ObjType::Map)?;
            let list = tx.put_object(ROOT, "list", automerge::ObjType::List)?;
            tx.insert(&list, 0, 1)?;
            tx.insert(&list, 1, 2)?;
            let text = tx.put_object(ROOT, "text", automerge::ObjType::Text)?;
            tx.splice_text(&text, 0, 0, "ab")?;
            Ok(())
        })
        .expect("a fresh document");
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "m", 2)?;
            tx.put(ROOT, "o", 3)?;
            tx.put(ROOT, "p", 4)
        })
        .expect("three puts");
        let template = doc.get_last_local_change().expect("made");
        let before = doc.get_changes(&[]).len() - 1;
        let first = doc.get_changes(&[]).into_iter().take(before).collect::<Vec<_>>();
        let mut base = Automerge::new();
        base.apply_changes(first).expect("its own changes");
        (base, template)
    })
}

/// A change whose operations the fuzzer rewrites (the object each acts on, its position, whether
/// it inserts, its action and what it overwrites), among ids that exist, ids of values, ids
/// made earlier in the same change and ids nobody made. Whenever the change graph takes it in,
/// Automerge applies it without panicking: the graph relays changes it has not applied, so
/// what it takes in must not break a device that applies it. A graph made from the document
/// (which asks the document what exists) decides the same.
pub fn graph_ops(data: &[u8]) {
    use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
    use automerge::{ObjType, ScalarValue};
    use cubby_core::graph::ChangeGraph;
    let (base, template) = ops_base();
    let mut change = template.decode();
    let actor = change.actor_id.clone();
    let start = change.start_op.get();
    // Counters in the base: 1 "n", 2 map, 3 list, 4-5 its elements, 6 text, 7-8 its
    // characters; 9 and 99 were never made.
    let id = |counter: u64| OpId(counter, actor.clone());
    let mut bytes = data.iter().copied();
    let mut next = || bytes.next().unwrap_or(0);
    for i in 0..change.operations.len() {
        let own = |b: u8| start + u64::from(b) % (i as u64 + 1);
        let pick = |b: u8| -> u64 { [1, 2, 3, 4, 5, 6, 7, 8, 9, 99][usize::from(b) % 10] };
        let op = &mut change.operations[i];
        let (o, k, a, p) = (next(), next(), next(), next());
        op.obj = match o % 4 {
            0 => ObjectId::Root,
            1 | 2 => ObjectId::Id(id(pick(o / 4))),
            _ => ObjectId::Id(id(own(o / 4))),
        };
        op.key = match k % 5 {
            0 => Key::Map("x".into()),
            1 => Key::Seq(ElementId::Head),
            2 | 3 => Key::Seq(ElementId::Id(id(pick(k / 5)))),
            _ => Key::Seq(ElementId::Id(id(own(k / 5)))),
        };
        op.insert = a & 1 == 1;
        op.action = match (a >> 1) % 7 {
            0 => OpType::Put(ScalarValue::Int(1)),
            1 => OpType::Put(ScalarValue::Str("c".into())),
            2 => OpType::Make(ObjType::Map),
            3 => OpType::Make(ObjType::List),
            4 => OpType::Make(ObjType::Text),
            5 => OpType::Delete,
            _ => OpType::Increment(1),
        };
        op.pred = if p % 3 == 0 { Vec::new().into() } else { vec![id(pick(p / 3))].into() };
    }
    change.hash = None;
    let Ok(change) = std::panic::catch_unwind(|| automerge::Change::from(change)) else { return };
    let mut graph = ChangeGraph::new();
    graph.add(base.get_changes(&[])).expect("the base document's changes");
    let taken = graph.add([change.clone()]).is_ok();
    let mut from_document = ChangeGraph::from_document(base).expect("the base document");
    let asked = from_document.add_checked([change.clone()], base).is_ok();
    assert_eq!(taken, asked, "the two graphs disagree");
    if taken {
        let mut doc = base.clone();
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            doc.apply_changes([change]).map(|()| cubby_core::json::to_json(&doc))
        }));
        assert!(applied.is_ok(), "the graph took in a change that makes Automerge panic");
    }
}

fn verifier() -> &'static (Verifier, TokenSigner) {
    static VERIFIER: OnceLock<(Verifier, TokenSigner)> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let signer = TokenSigner::from_pkcs8(&cubby_crypto::signing::generate_pkcs8())
            .expect("a fresh key pair");
        let validation = Validation::new("fuzz", "cubby", &[Algorithm::EdDSA]);
        let verifier =
            Verifier::new(validation, vec![signer.verifying_key()]).expect("one good key");
        (verifier, signer)
    })
}

/// A bearer token (and a JWKS document): verification never panics, and nothing without a valid
/// signature from the configured key is ever accepted.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (verifier, _) = verifier();
    // Fuzzed bytes cannot carry a valid Ed25519 signature by this process's fresh key.
    assert!(verifier.verify(&text, 1_700_000_000).is_err(), "a forged token was accepted");
    let _ = cubby_crypto::jwt::unverified_issuer(&text);
    let _ = VerifyingKey::from_jwks(&text, &Algorithm::ALL);
    let _ = VerifyingKey::from_pem(&text, None);
}

/// Bytes read back from storage as a sealed record or a wrapped data key: opening never panics
/// and never succeeds without the key that sealed them.
pub fn sealed_record(data: &[u8]) {
    static KEYS: OnceLock<(DataKey, Keyring)> = OnceLock::new();
    let (key, keyring) = KEYS.get_or_init(|| {
        (DataKey::generate(), Keyring::from_master(&MasterSecret::from_bytes([9; 32])))
    });
    assert!(
        cubby_crypto::envelope::open(key, b"aad", data).is_err(),
        "random bytes opened as a record"
    );
    assert!(keyring.unwrap(b"owner", data).is_err(), "random bytes unwrapped as a data key");
}

/// Inputs that must pass every target, for the regression test and as fuzzing seeds.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame = pb::ClientFrame {
        frame: Some(pb::client_frame::Frame::Sync(pb::DocSync {
            doc_id: vec![1; 16],
            message: vec![0x42, 1, 2],
            create: Some(pb::NewDoc { title: "t".into(), private: false }),
            seq: 3,
            more: false,
        })),
    };
    let doc = Automerge::load(base_document()).expect("loads");
    let message = PeerSession::new().generate(&Automerge::new()).expect("a first message");
    let full = {
        let mut session = PeerSession::new();
        let first = PeerSession::new().generate(&doc).expect("a first message");
        let _ = session.receive(&mut Automerge::new(), &first);
        session.generate(&doc).unwrap_or_default()
    };
    let (_, signer) = verifier();
    // Well formed and signed, but long expired: it parses all the way and is still refused.
    let token = signer.sign_jwt(&serde_json::json!({
        "iss": "fuzz", "aud": "cubby", "sub": "s", "exp": 1_000, "iat": 900,
    }));
    let sealed = cubby_crypto::envelope::seal(&DataKey::generate(), b"aad", b"record");
    vec![
        ("client_frame", frame.encode_to_vec()),
        ("sync_message", message.clone()),
        ("sync_message", full.clone()),
        ("graph_sync", message),
        ("graph_sync", full),
        // Operations as made, and each rewritten to act on the list after its first element.
        ("graph_ops", vec![0; 12]),
        ("graph_ops", [10, 17, 1, 0].repeat(3)),
        ("token", token.into_bytes()),
        ("sealed_record", sealed),
    ]
}
