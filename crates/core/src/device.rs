//! The device's side of its feed, with no I/O: what the device and the server still owe each
//! other in one connection, which documents are in an exchange at once, and how far the
//! device's cursor may go. The SDK's sync engine is the executor.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::DocId;

/// What the device and the server still owe each other in one connection, by document: local
/// changes the server has not acknowledged, and announced feed positions the device does not hold
/// yet. The engine asks about it on every frame, so each question costs one document: asked of
/// every document instead, a fresh device's sync of thousands of them grew with their square.
#[derive(Default)]
pub struct Owed {
    /// Documents with local changes the server has not acknowledged.
    unsynced: HashSet<DocId>,
    /// Announced feed positions this device does not hold yet, in feed order.
    pending: BTreeSet<(u64, DocId)>,
    /// The same positions, by document.
    pending_by_doc: HashMap<DocId, BTreeSet<u64>>,
    /// Documents in either.
    docs: HashSet<DocId>,
    /// Documents owed at some point since the device was last up to date, for progress.
    round: HashSet<DocId>,
}

impl Owed {
    /// `id` has local changes the server has not acknowledged.
    pub fn unsynced(&mut self, id: DocId) {
        self.unsynced.insert(id);
        self.refresh(id);
    }

    /// The server holds every local change of `id`.
    pub fn acknowledged(&mut self, id: DocId) {
        self.unsynced.remove(&id);
        self.refresh(id);
    }

    /// The server announced a change of `id` at feed position `seq`.
    pub fn announced(&mut self, seq: u64, id: DocId) {
        self.pending.insert((seq, id));
        self.pending_by_doc.entry(id).or_default().insert(seq);
        self.refresh(id);
    }

    /// The device holds what the server had of `id` at feed position `held`.
    pub fn held(&mut self, id: DocId, held: u64) {
        if let Some(seqs) = self.pending_by_doc.get_mut(&id) {
            while let Some(seq) = seqs.first().copied().filter(|seq| *seq <= held) {
                seqs.remove(&seq);
                self.pending.remove(&(seq, id));
            }
        }
        self.refresh(id);
    }

    /// Nothing is owed of `id` any more (deleted, or unknown to the server).
    pub fn forget(&mut self, id: DocId) {
        self.unsynced.remove(&id);
        for seq in self.pending_by_doc.remove(&id).unwrap_or_default() {
            self.pending.remove(&(seq, id));
        }
        self.refresh(id);
    }

    fn refresh(&mut self, id: DocId) {
        let pending = self.pending_by_doc.get(&id).is_some_and(|seqs| !seqs.is_empty());
        if pending || self.unsynced.contains(&id) {
            self.docs.insert(id);
            self.round.insert(id);
        } else {
            self.pending_by_doc.remove(&id);
            self.docs.remove(&id);
        }
    }

    /// Whether anything of `id` is owed.
    pub fn contains(&self, id: &DocId) -> bool {
        self.docs.contains(id)
    }

    /// Whether nothing is owed: the device is up to date (once caught up).
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The documents something is owed of.
    pub fn docs(&self) -> impl Iterator<Item = DocId> + '_ {
        self.docs.iter().copied()
    }

    /// The lowest announced feed position the device does not hold yet.
    pub fn first_pending(&self) -> Option<u64> {
        self.pending.first().map(|(seq, _)| *seq)
    }

    /// Up to date: the next round counts from nothing.
    pub fn new_round(&mut self) {
        self.round.clear();
    }

    /// Documents of this round done, and in all.
    pub fn progress(&self) -> (usize, usize) {
        (self.round.len() - self.docs.len(), self.round.len())
    }
}

/// Which documents are in an exchange at once when a device connects: announced ones and its
/// own documents edited offline alike take turns, at most `max_docs` and (with one in an
/// exchange) `max_bytes` of stored history together. A device that sent everything before
/// reading an answer had its connection closed under it.
#[derive(Debug)]
pub struct Window {
    waiting: VecDeque<(DocId, u64)>,
    asking: HashMap<DocId, u64>,
    max_docs: usize,
    max_bytes: u64,
}

impl Window {
    /// A window of `max_docs` documents and `max_bytes` of their history.
    pub fn new(max_docs: usize, max_bytes: u64) -> Self {
        Self { waiting: VecDeque::new(), asking: HashMap::new(), max_docs, max_bytes }
    }

    /// `doc` waits its turn, weighing `size` (its history as announced; 0 when unknown).
    pub fn wait(&mut self, doc: DocId, size: u64) {
        self.waiting.push_back((doc, size));
    }

    /// `doc` goes before the others (a refused document whose pause is over).
    pub fn wait_first(&mut self, doc: DocId) {
        self.waiting.push_front((doc, 0));
    }

    /// Whether `doc` waits its turn.
    pub fn is_waiting(&self, doc: &DocId) -> bool {
        self.waiting.iter().any(|(d, _)| d == doc)
    }

    /// The documents waiting their turn.
    pub fn waiting(&self) -> impl Iterator<Item = DocId> + '_ {
        self.waiting.iter().map(|(d, _)| *d)
    }

    /// The next document to ask for, if the window has room: `exchanging` documents are in an
    /// exchange, `in_exchange` says which. A document held meanwhile, deleted, or in an
    /// exchange already is skipped.
    pub fn next(
        &mut self,
        exchanging: usize,
        owed: &Owed,
        in_exchange: impl Fn(&DocId) -> bool,
    ) -> Option<(DocId, u64)> {
        self.asking.retain(|doc, _| in_exchange(doc));
        let bytes: u64 = self.asking.values().sum();
        loop {
            let busy = exchanging > 0 && bytes >= self.max_bytes;
            if busy || exchanging >= self.max_docs {
                return None;
            }
            let (doc, size) = self.waiting.pop_front()?;
            if owed.contains(&doc) && !in_exchange(&doc) {
                return Some((doc, size));
            }
        }
    }

    /// `doc` is in an exchange now, weighing `size`.
    pub fn asked(&mut self, doc: DocId, size: u64) {
        self.asking.insert(doc, size);
    }
}

/// How far the device's cursor may go: past every position announced on this connection whose
/// changes it holds, and never before `CaughtUp` (`caught_up`). `None`: it stays.
pub fn next_cursor(cursor: u64, caught_up: bool, owed: &Owed, announced: u64) -> Option<u64> {
    let candidate = owed.first_pending().map_or(announced, |seq| seq - 1);
    (caught_up && candidate > cursor).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocId {
        DocId::from_slice(&[n; 16]).expect("16 bytes")
    }

    #[test]
    fn a_document_is_owed_while_it_has_unacknowledged_changes_or_unheld_positions() {
        let mut owed = Owed::default();
        owed.unsynced(doc(1));
        owed.announced(7, doc(1));
        owed.announced(9, doc(1));
        owed.announced(8, doc(2));
        assert_eq!(owed.first_pending(), Some(7));
        assert_eq!(owed.progress(), (0, 2));

        owed.acknowledged(doc(1));
        assert!(owed.contains(&doc(1)), "position 7 and 9 are not held yet");
        owed.held(doc(1), 8);
        assert_eq!(owed.first_pending(), Some(8), "7 is held, 8 (of the other document) is not");
        assert!(owed.contains(&doc(1)), "position 9 is not held yet");
        owed.held(doc(1), 9);
        assert!(!owed.contains(&doc(1)));
        assert_eq!(owed.progress(), (1, 2));

        owed.forget(doc(2));
        assert!(owed.is_empty());
        assert_eq!(owed.first_pending(), None);
        assert_eq!(owed.progress(), (2, 2));
    }

    #[test]
    fn the_window_takes_documents_while_it_has_room_and_skips_those_not_owed() {
        let mut owed = Owed::default();
        let mut window = Window::new(2, 100);
        for (n, size) in [(1, 40), (2, 40), (3, 40), (4, 120), (5, 10)] {
            owed.announced(u64::from(n), doc(n));
            window.wait(doc(n), size);
        }
        owed.held(doc(2), 2); // Held meanwhile: skipped.
        let mut exchange: Vec<DocId> = Vec::new();
        let take = |window: &mut Window, exchange: &mut Vec<DocId>| {
            while let Some((d, size)) = window.next(exchange.len(), &owed, |d| exchange.contains(d))
            {
                window.asked(d, size);
                exchange.push(d);
            }
        };
        take(&mut window, &mut exchange);
        assert_eq!(exchange, vec![doc(1), doc(3)], "two at once, at most");
        exchange.clear();
        take(&mut window, &mut exchange);
        assert_eq!(exchange, vec![doc(4)], "alone, any size goes; then 120 bytes leave no room");
        exchange.clear();
        take(&mut window, &mut exchange);
        assert_eq!(exchange, vec![doc(5)]);
        assert!(!window.is_waiting(&doc(5)));
    }

    #[test]
    fn the_cursor_passes_only_what_the_device_holds_and_only_after_caught_up() {
        let mut owed = Owed::default();
        assert_eq!(next_cursor(3, false, &owed, 9), None, "before CaughtUp it stays");
        assert_eq!(next_cursor(3, true, &owed, 9), Some(9));
        owed.announced(5, doc(1));
        assert_eq!(next_cursor(3, true, &owed, 9), Some(4), "up to the first position lacked");
        assert_eq!(next_cursor(4, true, &owed, 9), None);
        owed.held(doc(1), 5);
        assert_eq!(next_cursor(4, true, &owed, 9), Some(9));
    }
}
