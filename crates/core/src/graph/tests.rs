use automerge::sync::{ChunkList, Have, Message, State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ROOT};
use proptest::prelude::*;

use super::*;

fn doc(actor: u8) -> Automerge {
    Automerge::new().with_actor(ActorId::from([actor; 16]))
}

fn put(doc: &mut Automerge, key: &str, value: i64) {
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(ROOT, key, value)?;
        Ok(())
    })
    .expect("a put on the root cannot fail");
}

/// A server's side in the property test: a graph, or a document loaded from a snapshot.
trait Server: crate::session::Replica {
    /// Takes in changes that reached the server from another of its peers.
    fn take(&mut self, changes: Vec<Change>);
    /// Every change's hash.
    fn all(&self) -> Vec<ChangeHash>;
}

impl Server for ChangeGraph {
    fn take(&mut self, changes: Vec<Change>) {
        self.add(changes).expect("takes them in");
    }

    fn all(&self) -> Vec<ChangeHash> {
        self.hashes().collect()
    }
}

impl Server for crate::lazy::LazyDoc {
    fn take(&mut self, changes: Vec<Change>) {
        let run: Vec<u8> = changes.iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        crate::history::Content::load_more(self, &run).expect("takes them in");
    }

    fn all(&self) -> Vec<ChangeHash> {
        self.graph().hashes().collect()
    }
}

/// A graph holding every change of `doc`.
fn graph_of(doc: &Automerge) -> ChangeGraph {
    let mut graph = ChangeGraph::new();
    let changes: Vec<Change> = doc.get_changes(&[]).into_iter().collect();
    graph.add(changes).expect("a document's own changes are well formed");
    graph
}

#[test]
fn changes_wait_for_their_dependencies_and_duplicates_are_skipped() {
    let mut d = doc(1);
    for i in 0..3 {
        put(&mut d, "k", i);
    }
    let changes: Vec<Change> = d.get_changes(&[]).into_iter().collect();
    let mut graph = ChangeGraph::new();
    // The last first: it waits, and is heard of as needed.
    assert_eq!(graph.add([changes[2].clone()]).expect("queued"), vec![]);
    assert!(graph.is_empty());
    let mut state = State::new();
    state.their_heads = Some(vec![changes[2].hash()]);
    let message = graph.generate_sync_message(&mut state).expect("a first message");
    assert_eq!(message.need, vec![changes[1].hash()], "what the queued change depends on");
    let added = graph.add(changes.iter().cloned()).expect("added");
    assert_eq!(added, changes.iter().map(Change::hash).collect::<Vec<_>>());
    assert_eq!(graph.heads(), d.get_heads());
    assert_eq!(graph.add(changes.iter().cloned()).expect("again"), vec![]);
    assert_eq!(graph.len(), 3);
    assert_eq!(graph.bytes(&changes[0].hash()), Some(changes[0].raw_bytes()));
}

#[test]
fn a_change_that_breaks_its_actors_sequence_or_does_not_parse_is_refused() {
    // Two documents with one actor: each makes a change numbered 1.
    let (mut a, mut b) = (doc(7), doc(7));
    put(&mut a, "a", 1);
    put(&mut b, "b", 1);
    let mut graph = graph_of(&a);
    let heads = graph.heads();
    // A good change first, then the twin: neither is taken in.
    let mut c = doc(8);
    put(&mut c, "c", 1);
    let mut batch = c.get_changes(&[]);
    batch.extend(b.get_changes(&[]));
    assert_eq!(graph.add(batch), Err(GraphError::Sequence));
    assert_eq!((graph.len(), graph.heads()), (1, heads));
    assert_eq!(graph.add(c.get_changes(&[])).expect("the good one alone").len(), 1);
    let mut bytes = a.get_changes(&[])[0].raw_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert!(matches!(graph.add_bytes([&bytes[..]]), Err(GraphError::Parse(_))));
    assert_eq!(graph.len(), 2);
}

#[test]
fn stored_history_round_trips_through_the_graph() {
    let (mut a, mut b) = (doc(1), doc(2));
    put(&mut a, "a", 1);
    let first = a.get_heads();
    for i in 0..5 {
        put(&mut a, "a", i);
        put(&mut b, "b", i);
    }
    a.merge(&mut b.clone()).expect("merges");
    let mut graph = ChangeGraph::new();
    graph.add_stored(&a.save_after(&[])).expect("the changes load");
    assert_eq!(graph.heads(), a.get_heads());
    assert!(graph.settled());
    // What it stores after some heads is what Automerge stores: both load to the same heads.
    let after = graph.save_after(&first, &()).expect("every byte kept");
    let mut loaded = doc(3);
    let first_change = graph.bytes(&first[0]).expect("known").to_vec();
    loaded.load_incremental(&first_change).expect("the first change");
    loaded.load_incremental(&after).expect("the rest");
    assert_eq!(loaded.get_heads(), a.get_heads());
    assert_eq!(after.len(), a.save_after(&first).len());
    let mut whole = doc(4);
    whole.load_incremental(&graph.save_after(&[], &()).expect("kept")).expect("everything");
    assert_eq!(whole.get_heads(), a.get_heads());
    // A whole document, truncated or foreign bytes are refused, and nothing is taken in.
    let mut fresh = ChangeGraph::new();
    for bad in [a.save(), a.save_after(&[])[..20].to_vec(), b"not automerge".to_vec()] {
        assert!(matches!(fresh.add_stored(&bad), Err(GraphError::Parse(_))));
    }
    assert!(fresh.is_empty());
}

#[test]
fn a_version_2_message_with_a_document_is_refused_and_one_with_changes_read() {
    let mut a = doc(1);
    put(&mut a, "k", 1);
    let mut graph = ChangeGraph::new();
    let message = Message {
        heads: a.get_heads(),
        need: Vec::new(),
        have: Vec::new(),
        changes: ChunkList::from(a.save()),
        flags: None,
        version: automerge::sync::MessageVersion::V2,
    };
    let refused = graph.receive_sync_message(&mut State::new(), message.clone());
    assert_eq!(refused, Err(GraphError::Version));
    let changes = Message { changes: ChunkList::from(a.save_after(&[])), ..message };
    let taken = graph.receive_sync_message(&mut State::new(), changes).expect("read");
    assert_eq!(taken, a.get_heads());
}

/// What a message says, with its changes as a set: the graph sends them in the order it took
/// them in, which need not be Automerge's.
fn said(message: &Message) -> (Vec<ChangeHash>, Vec<ChangeHash>, Vec<Have>, Vec<Vec<u8>>) {
    let mut changes: Vec<Vec<u8>> = message.changes.iter().map(<[u8]>::to_vec).collect();
    changes.sort();
    (message.heads.clone(), message.need.clone(), message.have.clone(), changes)
}

/// One step of a history: actor `actor` edits, or takes in what `other` has.
#[derive(Clone, Debug)]
enum Step {
    Edit { actor: usize, value: i64 },
    Merge { actor: usize, other: usize },
}

/// Plays `steps` on the actors' documents.
fn play(docs: &mut [Automerge; 3], steps: &[Step]) {
    for (n, step) in steps.iter().enumerate() {
        match *step {
            Step::Edit { actor, value } => put(&mut docs[actor], &format!("k{}", n % 5), value),
            Step::Merge { actor, other } if actor != other => {
                let mut theirs = docs[other].clone();
                docs[actor].merge(&mut theirs).expect("merges");
            }
            Step::Merge { .. } => {}
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, any::<i64>()).prop_map(|(actor, value)| Step::Edit { actor, value }),
        1 => (0..3usize, 0..3usize).prop_map(|(actor, other)| Step::Merge { actor, other }),
    ]
}

proptest! {
    /// Changes taken in any order, in batches of any size (as stored chunks come back from a
    /// store), give the graph of the document: the same changes and heads, nothing waiting.
    #[test]
    fn any_order_gives_the_same_graph(
        steps in proptest::collection::vec(step(), 1..40),
        seed in any::<u64>(),
        batch in 1..8usize,
    ) {
        let mut docs = [doc(0), doc(1), doc(2)];
        play(&mut docs, &steps);
        let mut all = docs[0].clone();
        for other in &docs[1..] {
            all.merge(&mut other.clone()).expect("merges");
        }
        let mut changes = all.get_changes(&[]);
        // A shuffle from the seed (Fisher-Yates over a simple generator).
        let mut state = seed | 1;
        for i in (1..changes.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            changes.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut graph = ChangeGraph::new();
        let mut added = 0;
        for part in changes.chunks(batch) {
            added += graph.add(part.to_vec()).expect("well formed").len();
        }
        prop_assert_eq!(added, changes.len());
        prop_assert_eq!(graph.len(), changes.len());
        prop_assert_eq!(graph.heads(), all.get_heads());
        prop_assert!(graph.settled());
        // Dependencies first, whatever order they came in.
        let order: Vec<ChangeHash> = graph.hashes().collect();
        for (at, hash) in order.iter().enumerate() {
            let change = automerge::ReadDoc::get_change_by_hash(&all, hash).expect("known");
            for dep in change.deps() {
                prop_assert!(order[..at].contains(dep));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// For random histories of three actors, a server's graph (actor 0's changes) syncing with
    /// a peer (actor 1's document), each starting fresh or from an earlier sync: every message
    /// the graph sends says what Automerge's own document would (its version-1 messages, less
    /// the flags), so the peers converge in the same rounds with the same bytes; and they do
    /// converge, a peer that lost everything midway too. The server is a graph of every change,
    /// or the server's own: a document loaded from a snapshot (`LazyDoc`), whose graph takes the
    /// bytes of the snapshot's changes from it.
    #[test]
    fn the_graph_answers_as_automerge_and_peers_converge(
        from_snapshot in any::<bool>(),
        before in proptest::collection::vec(step(), 0..30),
        after in proptest::collection::vec(step(), 0..30),
        synced_before in any::<bool>(),
        peer_edits in proptest::collection::vec(any::<bool>(), 8),
        server_edits in proptest::collection::vec(0..3usize, 8),
        lost_at in proptest::option::of(1..6usize),
    ) {
        let mut docs = [doc(0), doc(1), doc(2)];
        play(&mut docs, &before);
        let shared = if synced_before {
            let mut server = docs[0].clone();
            docs[1].merge(&mut server).expect("merges");
            let mut peer = docs[1].clone();
            docs[0].merge(&mut peer).expect("merges");
            docs[0].get_heads()
        } else {
            Vec::new()
        };
        play(&mut docs, &after);
        let state = || {
            let mut earlier = State::new();
            earlier.shared_heads = shared.clone();
            State::decode(&earlier.encode()).expect("decodes")
        };

        let mut graph: Box<dyn Server> = if from_snapshot {
            let loaded = <crate::lazy::LazyDoc as crate::history::Content>::rebuild(
                Some(&docs[0].save()),
                &[],
            );
            Box::new(loaded.expect("a snapshot loads"))
        } else {
            Box::new(graph_of(&docs[0]))
        };
        let mut reference = docs[0].clone();
        let mut peer = docs[1].clone();
        let (mut g_state, mut r_state, mut p_state) = (state(), state(), state());
        let mut rounds = 0;
        loop {
            rounds += 1;
            prop_assert!(rounds < 50, "no convergence in 50 rounds");
            // The peer edits while it syncs, sometimes twice before the server answers, and
            // a change from another of the server's peers (actor 2) reaches the server.
            // Once, perhaps, the peer loses everything and starts over (a reinstalled app).
            if lost_at == Some(rounds) {
                peer = Automerge::new();
                p_state = State::new();
            }
            let edits = if peer_edits.get(rounds).copied().unwrap_or(false) { 2 } else { 1 };
            let mut peer_spoke = false;
            for edit in 0..edits {
                if edit > 0 {
                    put(&mut peer, "during", rounds as i64);
                }
                let from_peer = peer.generate_sync_message(&mut p_state);
                peer_spoke |= from_peer.is_some();
                if let Some(message) = &from_peer {
                    graph.receive_message(&mut g_state, message.clone()).expect("takes it in");
                    reference.receive_sync_message(&mut r_state, message.clone()).expect("applies");
                }
            }
            // A change from another of the server's peers (actor 2) reaches the server; the
            // second time before the server's answer has reached the peer.
            let mut elsewhere = |graph: &mut Box<dyn Server>, reference: &mut Automerge| {
                put(&mut docs[2], "elsewhere", rounds as i64);
                let mut theirs = docs[2].clone();
                reference.merge(&mut theirs).expect("merges");
                graph.take(reference.get_changes(&graph.heads()));
            };
            let server_edit = server_edits.get(rounds).copied().unwrap_or(0);
            if server_edit == 1 {
                elsewhere(&mut graph, &mut reference);
            }
            let mut answers = Vec::new();
            for answer in 0..if server_edit == 2 { 2 } else { 1 } {
                if answer > 0 {
                    elsewhere(&mut graph, &mut reference);
                }
                // Automerge's version-1 answers: it sends a whole document to a peer that says
                // it reads one.
                r_state.their_capabilities = None;
                // (A document loaded from a snapshot sends it in version 2 too: see
                // `a_new_device_gets_the_snapshot_in_place_of_the_changes_one_by_one`.)
                g_state.their_capabilities = None;
                let ours = graph.generate_message(&mut g_state);
                let theirs = reference.generate_sync_message(&mut r_state);
                prop_assert_eq!(ours.as_ref().map(said), theirs.as_ref().map(said), "round {}", rounds);
                answers.extend(ours);
            }
            for message in &answers {
                prop_assert!(message.flags.is_none());
                peer.receive_sync_message(&mut p_state, message.clone()).expect("applies");
            }
            if !peer_spoke && answers.is_empty() {
                break;
            }
        }
        prop_assert_eq!(peer.get_heads(), graph.heads());
        prop_assert_eq!(reference.get_heads(), graph.heads());
        let mut all: Vec<ChangeHash> = graph.all();
        all.sort();
        let mut want: Vec<ChangeHash> = reference.get_changes(&[]).iter().map(|c| c.hash()).collect();
        want.sort();
        prop_assert_eq!(all, want);
    }
}

/// What Automerge 0.12 panics applying is refused before any peer can be sent it: an
/// operation on an object that does not exist or on a value, a sequence position in a map,
/// an insertion after an element the sequence never had, an insertion into a map (a debug
/// assertion) (and, stricter than Automerge, a key in a sequence). Inserting after the sequence's head or an element that was there is not.
#[test]
fn operations_naming_what_does_not_exist_are_refused() {
    use automerge::{ObjType, ReadDoc};
    use serde_json::json;
    let mut phone = doc(1);
    phone
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            let list = tx.put_object(ROOT, "list", ObjType::List)?;
            tx.insert(&list, 0, 1)?;
            tx.insert(&list, 1, 2)?;
            Ok(())
        })
        .expect("a list");
    let before = phone.clone();
    let list = phone.get(ROOT, "list").expect("read").expect("there").1;
    phone
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.insert(&list, 1, 3))
        .expect("an insertion");
    let refused: [(&str, &[(&str, serde_json::Value)]); 6] = [
        ("no such object", &[("obj", json!("9@{actor}"))]),
        (
            "an insertion into a map",
            &[("obj", json!("_root")), ("elemId", json!(null)), ("key", json!("x"))],
        ),
        ("a value is not an object", &[("obj", json!("2@{actor}"))]),
        ("after an element never there", &[("elemId", json!("9@{actor}"))]),
        ("a position in a map", &[("obj", json!("_root"))]),
        ("a key in a list", &[("elemId", json!(null)), ("key", json!("x"))]),
    ];
    for (case, edit) in refused {
        let change = crate::graph::crafted::first_op(&phone, edit);
        let mut graph = ChangeGraph::new();
        graph.add(before.get_changes(&[])).expect("the history");
        let err = graph.add([change.clone()]).expect_err(case);
        assert!(matches!(err, GraphError::Operation(_)), "{case}: {err}");
        assert_eq!(graph.heads(), before.get_heads(), "{case}: nothing taken in");
        let mut applied = before.clone();
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            applied.apply_changes([change]).is_err()
        }));
        // An insertion into a map breaks Automerge's order of operations only where the key
        // sorts among others (fuzz/regressions/graph_ops/insert-into-root-map); a key in a
        // list it takes, and ignores.
        if !["a key in a list", "an insertion into a map"].contains(&case) {
            assert!(refused.unwrap_or(true), "{case}: Automerge takes it (drop the check?)");
        }
    }
    let allowed: [(&str, &[(&str, serde_json::Value)]); 3] = [
        ("as made", &[]),
        ("after the head", &[("elemId", json!("_head"))]),
        ("after the first element", &[("elemId", json!("2@{actor}"))]),
    ];
    for (case, edit) in allowed {
        let change = crate::graph::crafted::first_op(&phone, edit);
        let mut graph = ChangeGraph::new();
        graph.add(before.get_changes(&[])).expect("the history");
        graph.add([change.clone()]).expect(case);
        // The same check against a graph made from the document, which asks it.
        let mut lazy = ChangeGraph::from_document(&before).expect("indexed");
        lazy.add_checked([change], &before).expect(case);
    }
}

/// Stored history is recorded, not refused: a change stored before a rule was made (here, an
/// insertion into a map) still records what its other operations made, so that later changes
/// acting on those objects are taken in.
#[test]
fn stored_history_records_every_operation_even_one_refused_now() {
    use automerge::ObjType;
    use serde_json::json;
    let mut phone = doc(1);
    phone
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "x", 1)?;
            tx.put_object(ROOT, "m", ObjType::Map)?;
            Ok(())
        })
        .expect("two operations");
    let stored = crate::graph::crafted::first_op(&phone, &[("insert", json!(true))]);
    let mut live = phone.clone();
    let m = automerge::ReadDoc::get(&live, ROOT, "m").expect("read").expect("there").1;
    live.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(&m, "k", 1)).expect("a put");
    let next =
        crate::graph::crafted::rewritten(&live.get_last_local_change().expect("made"), |change| {
            change["deps"] = json!([stored.hash().to_string()])
        });

    let mut strict = ChangeGraph::new();
    let err = strict.add([stored.clone()]).expect_err("refused when received");
    assert!(matches!(err, GraphError::Operation(_)), "{err}");
    let mut graph = ChangeGraph::new();
    graph.add_stored(stored.raw_bytes()).expect("stored history is recorded");
    graph.add([next]).expect("the map its other operation made is known");
}
