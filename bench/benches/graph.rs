//! The server's cost for one isolated change, by document: Automerge's own sync (apply the
//! change, then answer), against the change graph (`cubby_core::graph`), which answers from the
//! change graph without applying anything. The same stream of device messages, each with one
//! new change, into the same document. `cargo bench -p cubby-bench --bench graph`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use automerge::sync::{Message, State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT};
use criterion::{Criterion, criterion_group, criterion_main};
use cubby_core::graph::ChangeGraph;

/// A document as the server holds it, its sync state with a device that has synced it fully,
/// and the device's next messages, each carrying one new change.
struct Stream {
    server: Automerge,
    state: State,
    messages: Vec<Message>,
}

/// Runs sync between `a` and `b` until neither has anything to say.
fn settle(a: &mut Automerge, on_a: &mut State, b: &mut Automerge, on_b: &mut State) {
    loop {
        let to_b = a.generate_sync_message(on_a);
        if let Some(m) = &to_b {
            b.receive_sync_message(on_b, m.clone()).expect("valid");
        }
        let to_a = b.generate_sync_message(on_b);
        if let Some(m) = &to_a {
            a.receive_sync_message(on_a, m.clone()).expect("valid");
        }
        if to_a.is_none() && to_b.is_none() {
            return;
        }
    }
}

/// `count` messages from a device that edits `server` with `edit`, one change each, with the
/// server answering each (the device takes the answer in before its next edit).
fn stream(mut server: Automerge, count: usize, edit: impl Fn(&mut Automerge, usize)) -> Stream {
    let mut device = server.fork();
    let (mut on_server, mut on_device) = (State::new(), State::new());
    settle(&mut device, &mut on_device, &mut server, &mut on_server);
    let (base, state) = (server.clone(), on_server.clone());
    let mut messages = Vec::with_capacity(count);
    for n in 0..count {
        edit(&mut device, n);
        // As with a server that answers from the graph, which never says it reads version 2:
        // else a device sends its whole document when its changes are a third of the history.
        on_device.their_capabilities = None;
        let message = device.generate_sync_message(&mut on_device).expect("the change");
        assert_eq!(message.changes.len(), 1, "one change a message");
        server.receive_sync_message(&mut on_server, message.clone()).expect("applies");
        if let Some(answer) = server.generate_sync_message(&mut on_server) {
            device.receive_sync_message(&mut on_device, answer).expect("valid");
        }
        messages.push(message);
    }
    Stream { server: base, state, messages }
}

/// A map written `changes` times, one change each.
fn map_history(changes: usize) -> Stream {
    let mut doc = Automerge::new();
    for n in 0..changes {
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, format!("k{}", n % 64), n as i64)?;
            Ok(())
        })
        .expect("put");
    }
    stream(doc, 2_000, |device, n| {
        device
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(ROOT, "edit", n as i64)?;
                Ok(())
            })
            .expect("put");
    })
}

/// A text of `chars` characters typed at once, then one character typed into it per change.
fn long_text(chars: usize, count: usize) -> Stream {
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        let text = tx.put_object(ROOT, "text", ObjType::Text)?;
        tx.splice_text(&text, 0, 0, &"x".repeat(chars))?;
        Ok(())
    })
    .expect("typed");
    stream(doc, count, move |device, n| {
        let (_, text) =
            automerge::ReadDoc::get(device, ROOT, "text").expect("reads").expect("the text");
        device
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.splice_text(&text, (n * 7_919) % chars, 0, "y")?;
                Ok(())
            })
            .expect("typed");
    })
}

/// Times `step` over the stream's messages, `iters` of them, starting over from a fresh copy
/// (untimed) when the stream runs out.
fn replay<D>(
    stream: &Stream,
    iters: u64,
    fresh: impl Fn(&Stream) -> D,
    step: impl Fn(&mut D, &mut State, Message),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let (mut doc, mut state) = (fresh(stream), stream.state.clone());
        for message in stream.messages.iter().take((iters - done) as usize) {
            let message = message.clone();
            let started = Instant::now();
            step(&mut doc, &mut state, message);
            total += started.elapsed();
            done += 1;
        }
        drop(black_box(doc));
    }
    total
}

fn graph_of(doc: &Automerge) -> ChangeGraph {
    let mut graph = ChangeGraph::new();
    graph.add(doc.get_changes(&[])).expect("well formed");
    graph
}

fn one_change(c: &mut Criterion) {
    let mut group = c.benchmark_group("one_change");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    let streams = [
        ("map_of_100_changes", map_history(100)),
        ("map_of_10000_changes", map_history(10_000)),
        ("map_of_100000_changes", map_history(100_000)),
        ("text_of_1000000_chars", long_text(1_000_000, 12)),
    ];
    for (name, stream) in &streams {
        let graph = graph_of(&stream.server);
        group.bench_function(format!("graph/{name}"), |b| {
            b.iter_custom(|iters| {
                replay(
                    stream,
                    iters,
                    |_| graph.clone(),
                    |graph, state, message| {
                        graph.receive_sync_message(state, message).expect("takes it in");
                        black_box(graph.generate_sync_message(state));
                    },
                )
            });
        });
        group.bench_function(format!("automerge/{name}"), |b| {
            b.iter_custom(|iters| {
                replay(
                    stream,
                    iters,
                    |stream| stream.server.clone(),
                    |doc, state, message| {
                        doc.receive_sync_message(state, message).expect("applies");
                        black_box(doc.generate_sync_message(state));
                    },
                )
            });
        });
    }
    group.finish();
}

criterion_group!(benches, one_change);
criterion_main!(benches);
