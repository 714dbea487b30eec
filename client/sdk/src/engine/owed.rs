//! What the device and the server still owe each other in one connection: the part of the
//! device's feed with no I/O, asked about on every frame.

use std::collections::{BTreeSet, HashMap, HashSet};

use cubby_core::DocId;

/// What the device and the server still owe each other in one connection, by document: local
/// changes the server has not acknowledged, and announced feed positions the device does not hold
/// yet. The engine asks about it on every frame, so each question costs one document: asked of
/// every document instead, a fresh device's sync of thousands of them grew with their square.
#[derive(Default)]
pub(super) struct Owed {
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
    pub(super) fn unsynced(&mut self, id: DocId) {
        self.unsynced.insert(id);
        self.refresh(id);
    }

    /// The server holds every local change of `id`.
    pub(super) fn acknowledged(&mut self, id: DocId) {
        self.unsynced.remove(&id);
        self.refresh(id);
    }

    /// The server announced a change of `id` at feed position `seq`.
    pub(super) fn announced(&mut self, seq: u64, id: DocId) {
        self.pending.insert((seq, id));
        self.pending_by_doc.entry(id).or_default().insert(seq);
        self.refresh(id);
    }

    /// The device holds what the server had of `id` at feed position `held`.
    pub(super) fn held(&mut self, id: DocId, held: u64) {
        if let Some(seqs) = self.pending_by_doc.get_mut(&id) {
            while let Some(seq) = seqs.first().copied().filter(|seq| *seq <= held) {
                seqs.remove(&seq);
                self.pending.remove(&(seq, id));
            }
        }
        self.refresh(id);
    }

    /// Nothing is owed of `id` any more (deleted, or unknown to the server).
    pub(super) fn forget(&mut self, id: DocId) {
        self.unsynced.remove(&id);
        for seq in self.pending_by_doc.remove(&id).unwrap_or_default() {
            self.pending.remove(&(seq, id));
        }
        self.refresh(id);
    }

    pub(super) fn refresh(&mut self, id: DocId) {
        let pending = self.pending_by_doc.get(&id).is_some_and(|seqs| !seqs.is_empty());
        if pending || self.unsynced.contains(&id) {
            self.docs.insert(id);
            self.round.insert(id);
        } else {
            self.pending_by_doc.remove(&id);
            self.docs.remove(&id);
        }
    }

    pub(super) fn contains(&self, id: &DocId) -> bool {
        self.docs.contains(id)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    pub(super) fn docs(&self) -> impl Iterator<Item = DocId> + '_ {
        self.docs.iter().copied()
    }

    /// The lowest announced feed position the device does not hold yet.
    pub(super) fn first_pending(&self) -> Option<u64> {
        self.pending.first().map(|(seq, _)| *seq)
    }

    /// Up to date: the next round counts from nothing.
    pub(super) fn new_round(&mut self) {
        self.round.clear();
    }

    /// Documents of this round done, and in all.
    pub(super) fn progress(&self) -> (usize, usize) {
        (self.round.len() - self.docs.len(), self.round.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubby_core::DocId;

    pub(super) fn doc(n: u8) -> DocId {
        DocId::from_slice(&[n; 16]).expect("16 bytes")
    }

    #[test]
    pub(super) fn a_document_is_owed_while_it_has_unacknowledged_changes_or_unheld_positions() {
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
}
