use super::*;

fn limits(handshakes: usize, connections: usize) -> GateLimits {
    GateLimits { handshakes, handshake_timeout: Duration::from_secs(5), connections }
}

#[test]
fn a_new_handshake_closes_the_oldest_once_it_has_had_its_second() {
    let gate = Gate::new(limits(2, 1));
    let start = tokio::time::Instant::now();
    let first = gate.begin_handshake(start).expect("room");
    let second = gate.begin_handshake(start).expect("room");
    // All young: taken anyway, up to four times the limit, then refused.
    let more: Vec<_> = (0..6).map(|_| gate.begin_handshake(start)).collect();
    assert_eq!(more.iter().filter(|t| t.is_some()).count(), 6);
    assert!(gate.begin_handshake(start).is_none(), "eight young handshakes are the most");
    assert!(!first.shed.is_cancelled());
    drop(more);
    let third = gate.begin_handshake(start + SHED_AFTER).expect("room made");
    assert!(first.shed.is_cancelled(), "the oldest made room");
    assert!(!second.shed.is_cancelled() && !third.shed.is_cancelled());
    drop((first, second, third));
    assert!(gate.lock().all.is_empty());
}

#[test]
fn established_connections_are_counted_and_capped() {
    let gate = Gate::new(limits(4, 2));
    let first = gate.connection_slot().expect("room");
    let second = gate.connection_slot().expect("room");
    assert!(gate.connection_slot().is_none(), "the cap holds");
    drop(first);
    assert_eq!(gate.connections(), 1);
    let _third = gate.connection_slot().expect("room again");
    drop(second);
}

#[test]
fn accept_failures_back_off_to_a_second_and_start_over_after_a_success() {
    let mut failures = AcceptFailures::new("test");
    let err = io::Error::other("too many open files");
    let pauses: Vec<_> = (0..10).map(|_| failures.failed(&err).as_millis()).collect();
    assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    failures.reset();
    assert_eq!(failures.failed(&err), AcceptFailures::FIRST);
}
