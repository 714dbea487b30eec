//! `PeerSession::receive`'s in-step path, against the replica's own `receive_sync_message`
//! (Automerge's, or a change graph's): over random edits, sends, repeated and dropped
//! deliveries and reconnects, the session ends exactly as the replica would leave it.

use super::*;

/// One step of two peers syncing over a connection that can queue, repeat and drop messages.
#[derive(Clone, Debug)]
enum Step {
    Edit {
        side: usize,
    },
    Send {
        side: usize,
        answer: bool,
    },
    Deliver {
        to: usize,
        again: bool,
    },
    /// Both sides send and deliver in turn until neither has anything to say.
    Settle,
    Reconnect,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0..2usize).prop_map(|side| Step::Edit { side }),
        (0..2usize, any::<bool>()).prop_map(|(side, answer)| Step::Send { side, answer }),
        (0..2usize, any::<bool>()).prop_map(|(to, again)| Step::Deliver { to, again }),
        Just(Step::Settle),
        Just(Step::Reconnect),
    ]
}

/// What `receive` must do: the replica's own `receive_sync_message`, then the sent-again rule.
fn replica_receive(state: &mut sync::State, doc: &mut impl Replica, message: &[u8]) {
    let message = sync::Message::decode(message).expect("messages here are valid");
    doc.receive_message(state, message).expect("messages here apply");
    for hash in state.their_need.clone().unwrap_or_default() {
        state.sent_hashes.remove(&hash);
    }
}

/// Delivers `message`, checking that `receive` leaves the session exactly as the replica would
/// have; returns whether it took the in-step path.
fn deliver<R: Replica + Clone>(session: &mut PeerSession, doc: &mut R, message: &[u8]) -> bool {
    let (mut expected, mut expected_doc) = (session.state.clone(), doc.clone());
    replica_receive(&mut expected, &mut expected_doc, message);
    let fast = in_step(&sync::Message::decode(message).expect("valid"), &doc.heads());
    session.receive(doc, message).expect("valid");
    assert_eq!(session.state, expected, "in step: {fast}");
    assert_eq!(doc.heads(), expected_doc.heads());
    // A reply now says what Automerge would, quiet acknowledgements included.
    let (mut quick, mut full) = (session.clone(), session.clone());
    assert_eq!(quick.reply(doc), full.reply_in_full(doc), "reply after in step: {fast}");
    assert_eq!(quick.state, full.state);
    fast
}

proptest::proptest! {
    #[test]
    fn in_step_matches_automerge(
        steps in proptest::collection::vec(step(), 1..60),
        read_only in proptest::bool::ANY,
    ) {
        // Both start from the same change, so that even a read-only peer (which never takes
        // the other's changes) can be in step.
        let first = doc_with("a", "0");
        let mut docs = [first.fork(), first];
        let mut sessions = [PeerSession::new(), PeerSession::new()];
        // A read-only peer flags its messages so (automerge's publish-only mode).
        sessions[1].state.read_only = read_only;
        let mut wire: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Edit { side } => {
                    docs[side]
                        .transact::<_, _, automerge::AutomergeError>(|tx| {
                            tx.put(ROOT, format!("k{}", n % 3), n as i64)?;
                            Ok(())
                        })
                        .expect("put");
                }
                Step::Send { side, answer } => {
                    let message = if answer {
                        Some(sessions[side].answer(&docs[side]))
                    } else {
                        sessions[side].generate(&docs[side])
                    };
                    wire[1 - side].extend(message);
                }
                Step::Deliver { to, again } => {
                    if let Some(message) = wire[to].first().cloned() {
                        if !again {
                            wire[to].remove(0);
                        }
                        deliver(&mut sessions[to], &mut docs[to], &message);
                    }
                }
                Step::Settle => {
                    for _ in 0..10 {
                        let mut quiet = true;
                        for side in [0, 1] {
                            if let Some(m) = sessions[side].generate(&docs[side]) {
                                deliver(&mut sessions[1 - side], &mut docs[1 - side], &m);
                                quiet = false;
                            }
                        }
                        if quiet {
                            break;
                        }
                    }
                }
                Step::Reconnect => {
                    wire = [Vec::new(), Vec::new()];
                    sessions.iter_mut().for_each(PeerSession::reconnect);
                }
            }
        }
    }
}

proptest::proptest! {
    /// The same, with a change graph on one side (the server's): its edits are another
    /// device's changes taken in.
    #[test]
    fn in_step_matches_the_graph(
        steps in proptest::collection::vec(step(), 1..60),
        read_only in proptest::bool::ANY,
    ) {
        let first = doc_with("a", "0");
        let mut author = first.fork();
        let mut graph = ChangeGraph::new();
        graph.add(first.get_changes(&[])).expect("well formed");
        let mut device = first;
        let mut sessions = [PeerSession::new(), PeerSession::new()];
        sessions[1].state.read_only = read_only;
        let mut wire: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Edit { side } => {
                    let edited = if side == 0 { &mut author } else { &mut device };
                    edited
                        .transact::<_, _, automerge::AutomergeError>(|tx| {
                            tx.put(ROOT, format!("k{}", n % 3), n as i64)?;
                            Ok(())
                        })
                        .expect("put");
                    if side == 0 {
                        let change = author.get_last_local_change().expect("just made");
                        graph.add([change]).expect("in order");
                    }
                }
                Step::Send { side, answer } => {
                    let message = match (side, answer) {
                        (0, true) => Some(sessions[0].answer(&graph)),
                        (0, false) => sessions[0].generate(&graph),
                        (_, true) => Some(sessions[1].answer(&device)),
                        (_, false) => sessions[1].generate(&device),
                    };
                    wire[1 - side].extend(message);
                }
                Step::Deliver { to, again } => {
                    if let Some(message) = wire[to].first().cloned() {
                        if !again {
                            wire[to].remove(0);
                        }
                        if to == 0 {
                            deliver(&mut sessions[0], &mut graph, &message);
                        } else {
                            deliver(&mut sessions[1], &mut device, &message);
                        }
                    }
                }
                Step::Settle => {
                    for _ in 0..10 {
                        let to_device = sessions[0].generate(&graph);
                        if let Some(m) = &to_device {
                            deliver(&mut sessions[1], &mut device, m);
                        }
                        let to_graph = sessions[1].generate(&device);
                        if let Some(m) = &to_graph {
                            deliver(&mut sessions[0], &mut graph, m);
                        }
                        if to_device.is_none() && to_graph.is_none() {
                            break;
                        }
                    }
                }
                Step::Reconnect => {
                    wire = [Vec::new(), Vec::new()];
                    sessions.iter_mut().for_each(PeerSession::reconnect);
                }
            }
        }
    }
}

#[test]
fn an_acknowledgement_skips_the_walk_and_ends_the_same() {
    let mut device = doc_with("k", "v");
    let mut server = Automerge::new();
    let (mut to_server, mut to_device) = (PeerSession::new(), PeerSession::new());
    let mut in_step = 0;
    for _ in 0..5 {
        if let Some(m) = to_server.generate(&device) {
            in_step += usize::from(deliver(&mut to_device, &mut server, &m));
        }
        let m = to_device.answer(&server);
        in_step += usize::from(deliver(&mut to_server, &mut device, &m));
    }
    assert_eq!(server.get_heads(), device.get_heads());
    assert!(in_step >= 2, "acknowledgements took the in-step path {in_step} times");
}
