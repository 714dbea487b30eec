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
pub const TARGETS: [(&str, Target); 5] = [
    ("client_frame", client_frame),
    ("sync_message", sync_message),
    ("graph_sync", graph_sync),
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
        ("token", token.into_bytes()),
        ("sealed_record", sealed),
    ]
}
