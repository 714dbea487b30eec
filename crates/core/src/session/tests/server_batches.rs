//! The server's side of one device's connection, batch by batch as the document actor takes
//! messages: whatever the interleaving, both sides end holding the same changes and knowing it.

use super::*;

/// What happens on one device's connection to the server, in the order the test picks.
#[derive(Clone, Debug)]
enum Event {
    /// The app edits on the device; the engine pushes.
    DeviceEdit,
    /// Another device's change reaches the server, which sends it on (the heads moved).
    ServerEdit,
    /// The server's actor takes up to this many queued messages as one batch, then replies.
    ServerTakes(usize),
    /// The device takes the next message from the server and answers it if it has anything
    /// to say, as the SDK does.
    DeviceTakes,
    /// The device heard nothing for a while and starts a fresh round on the same
    /// connection: its earlier messages may still be on their way.
    DeviceStalls,
    /// A new connection: messages in flight are lost; the server restores its saved session.
    Reconnect,
}

fn event() -> impl proptest::strategy::Strategy<Value = Event> {
    use proptest::prelude::*;
    prop_oneof![
        Just(Event::DeviceEdit),
        Just(Event::ServerEdit),
        (1..4usize).prop_map(Event::ServerTakes),
        Just(Event::DeviceTakes),
        Just(Event::DeviceStalls),
        Just(Event::Reconnect),
    ]
}

fn put(doc: &mut Automerge, n: usize) {
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(ROOT, format!("k{}", n % 3), n as i64)?;
        Ok(())
    })
    .expect("put");
}

/// The server's side of one batch, as the document actor does it.
fn server_takes(
    batch: usize,
    server: &mut Automerge,
    session: &mut PeerSession,
    inbox: &mut std::collections::VecDeque<Vec<u8>>,
    outbox: &mut std::collections::VecDeque<Vec<u8>>,
) {
    let taken: Vec<_> = inbox.drain(..batch.min(inbox.len())).collect();
    for message in &taken {
        session.receive(server, message).expect("valid");
    }
    if !taken.is_empty() {
        outbox.extend(session.reply(server));
    }
}

proptest::proptest! {
    /// Whatever the interleaving, once the connection is left to run both sides hold the same
    /// changes and each knows the other holds them: the server's silence after a device's
    /// acknowledgement never leaves a device waiting for its own.
    #[test]
    fn every_device_hears_that_the_server_holds_its_changes(
        events in proptest::collection::vec(event(), 1..50),
    ) {
        use std::collections::VecDeque;
        let first = doc_with("a", "0");
        let (mut device, mut server) = (first.fork(), first);
        let (mut on_device, mut on_server) = (PeerSession::new(), PeerSession::new());
        // The device opens the connection by saying where it stands.
        let mut to_server: VecDeque<_> = on_device.generate(&device).into_iter().collect();
        let mut to_device = VecDeque::new();
        for (n, event) in events.into_iter().enumerate() {
            match event {
                Event::DeviceEdit => {
                    put(&mut device, n);
                    to_server.extend(on_device.generate(&device));
                }
                Event::ServerEdit => {
                    put(&mut server, n);
                    to_device.extend(on_server.generate(&server));
                }
                Event::ServerTakes(batch) => server_takes(
                    batch, &mut server, &mut on_server, &mut to_server, &mut to_device,
                ),
                Event::DeviceTakes => {
                    if let Some(message) = to_device.pop_front() {
                        on_device.receive(&mut device, &message).expect("valid");
                        to_server.extend(on_device.generate(&device));
                    }
                }
                Event::DeviceStalls => {
                    on_device.reconnect();
                    to_server.extend(on_device.generate(&device));
                }
                Event::Reconnect => {
                    (to_server, to_device) = (VecDeque::new(), VecDeque::new());
                    on_device.reconnect();
                    on_server = PeerSession::restore_for(&on_server.persist(), &server);
                    to_server.extend(on_device.generate(&device));
                }
            }
        }
        // Left to run: the server takes what is queued, the device takes what comes back.
        for _ in 0..20 {
            if to_server.is_empty() && to_device.is_empty() {
                break;
            }
            server_takes(
                usize::MAX, &mut server, &mut on_server, &mut to_server, &mut to_device,
            );
            while let Some(message) = to_device.pop_front() {
                on_device.receive(&mut device, &message).expect("valid");
                to_server.extend(on_device.generate(&device));
            }
        }
        proptest::prop_assert!(to_server.is_empty() && to_device.is_empty(), "still talking");
        proptest::prop_assert_eq!(device.get_heads(), server.get_heads());
        proptest::prop_assert!(
            on_device.peer_has_everything(&device),
            "the device never heard that the server holds its changes"
        );
        proptest::prop_assert!(on_server.peer_has_everything(&server));
    }
}

#[test]
fn an_acknowledgement_of_what_the_server_sent_is_not_answered() {
    let mut server = doc_with("k", "v");
    let mut device = Automerge::new();
    sync_pair(&mut server, &mut device);
    let (mut on_server, mut on_device) = (PeerSession::new(), PeerSession::new());
    let hello = on_device.generate(&device).expect("hello");
    on_server.receive(&mut server, &hello).expect("valid");
    let answer = on_server.reply(&server).expect("a new connection is answered");
    on_device.receive(&mut device, &answer).expect("valid");
    // Another device's change: the server sends it on, the device acknowledges it. About
    // once in a hundred the device's Bloom filter (random actors, random hashes) claims the
    // change already, so the server sends only its heads; the device then asks for it, and
    // that request is answered.
    put(&mut server, 1);
    let mut to_device = on_server.generate(&server);
    for _ in 0..3 {
        on_device.receive(&mut device, &to_device.expect("a message")).expect("valid");
        let ack = on_device.generate(&device).expect("the device's heads");
        on_server.receive(&mut server, &ack).expect("valid");
        to_device = on_server.reply(&server);
        if device.get_heads() == server.get_heads() {
            break;
        }
    }
    assert_eq!(device.get_heads(), server.get_heads(), "the device has the change");
    assert_eq!(to_device, None, "the device already heard these heads");
    assert!(on_device.peer_has_everything(&device));
}

#[test]
fn peers_in_the_same_state_share_a_message_and_the_others_get_their_own() {
    let mut server = doc_with("k", "v");
    let (mut early, mut late) = (Automerge::new(), Automerge::new());
    let mut sessions = vec![PeerSession::new(), PeerSession::new(), PeerSession::new()];
    // Two receivers in step with the server, a third that has heard nothing yet.
    for (session, device) in sessions.iter_mut().zip([&mut early, &mut late]) {
        let mut on_device = PeerSession::new();
        for _ in 0..4 {
            if let Some(m) = on_device.generate(device) {
                session.receive(&mut server, &m).expect("valid");
            }
            if let Some(m) = session.generate(&server) {
                on_device.receive(device, &m).expect("valid");
            }
        }
    }
    put(&mut server, 1);
    let mut alone = sessions.clone();
    let mut shared = SharedMessages::default();
    for (session, alone) in sessions.iter_mut().zip(&mut alone) {
        assert_eq!(shared.generate(session, &server), alone.generate(&server));
        assert_eq!(session, alone);
    }
    assert_eq!(shared.made.len(), 2, "one message for the two in step, one for the third");
}
