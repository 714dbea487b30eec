//! What one device is told of its customer's change feed, on the server's side of its stream,
//! with no I/O: which announcements it is sent, which are held back because the document's
//! actor sends the change itself, and when the stream must read the feed from the store instead
//! of trusting what the change bus delivered.
//!
//! The stream task is the executor: it feeds in what the bus delivers ([`Told::heard`]), what
//! it reads from the store ([`Told::read`]), what document actors say the device holds
//! ([`Told::holds`]), and sends what comes out. `A` is the announcement the stream sends.

use std::collections::{HashMap, HashSet};

use crate::{DocId, Seq};

/// One change of the feed, as the stream weighs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The document.
    pub doc: DocId,
    /// Its feed position.
    pub seq: Seq,
    /// A change of content this node's actor of the document sends to the devices syncing it
    /// live (not a deletion, a metadata change, or another node's write): held back for them.
    pub content: bool,
}

/// What to do with an announcement the bus delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard<A> {
    /// Read the feed from the store from the last position announced: a position was skipped
    /// (lost, late or out of order), or the bus carried no details.
    ReadFeed,
    /// Send these, in order (perhaps none).
    Send(Vec<A>),
}

/// What one device has been told, and what it holds.
#[derive(Debug)]
pub struct Told<A> {
    /// The highest position announced: everything up to it was sent, or is held by the
    /// device (`CaughtUp` says it; the catch-up reads the feed after it).
    announced: Seq,
    /// The highest position heard of from the bus, or read from the feed.
    heard: Seq,
    /// Documents the device syncs live on this stream (it sent their actors a message).
    joined: HashSet<DocId>,
    /// Per document, the position of the newest durable state the device holds.
    held: HashMap<DocId, Seq>,
    /// Announcements held back, one per document (the latest).
    deferred: HashMap<DocId, (Seq, A)>,
}

impl<A> Default for Told<A> {
    fn default() -> Self {
        Self {
            announced: Seq(0),
            heard: Seq(0),
            joined: HashSet::new(),
            held: HashMap::new(),
            deferred: HashMap::new(),
        }
    }
}

impl<A> Told<A> {
    /// A device whose cursor is `cursor` (0 for one from another epoch).
    pub fn from(cursor: Seq) -> Self {
        Self { announced: cursor, ..Self::default() }
    }

    /// The highest position announced: the catch-up reads the feed after it.
    pub fn announced(&self) -> Seq {
        self.announced
    }

    /// The feed was read up to `head` (its last position when read).
    pub fn read_to(&mut self, head: Seq) {
        self.heard = self.heard.max(head);
    }

    /// The device syncs `doc` live on this stream from now on.
    pub fn join(&mut self, doc: DocId) {
        self.joined.insert(doc);
    }

    /// The documents the device synced live on this stream, forgotten (it left).
    pub fn take_joined(&mut self) -> Vec<DocId> {
        self.joined.drain().collect()
    }

    /// Whether the device syncs `doc` live on this stream.
    pub fn joined(&self, doc: &DocId) -> bool {
        self.joined.contains(doc)
    }

    /// `doc` was announced at `seq` by the document's actor itself (a pushed catch-up).
    pub fn pushed(&mut self, doc: DocId, seq: Seq) {
        self.joined.insert(doc);
        self.announced = self.announced.max(seq);
    }

    /// The document's actor says the device holds `doc` as of `seq`: an announcement held back
    /// for it at or before `seq` need not be sent.
    pub fn holds(&mut self, doc: DocId, seq: Seq) {
        let held = self.held.entry(doc).or_default();
        *held = (*held).max(seq);
        if self.deferred.get(&doc).is_some_and(|(at, _)| *at <= seq) {
            self.deferred.remove(&doc);
        }
    }

    fn holds_at(&self, doc: &DocId, seq: Seq) -> bool {
        self.held.get(doc).is_some_and(|at| *at >= seq)
    }

    /// An announcement the bus delivered (`partial`: without the document's details).
    pub fn heard(&mut self, change: Change, partial: bool, announcement: A) -> Heard<A> {
        if change.seq <= self.heard {
            return Heard::Send(Vec::new());
        }
        if partial || change.seq.0 > self.heard.0 + 1 {
            self.heard = change.seq;
            return Heard::ReadFeed;
        }
        self.heard = change.seq;
        Heard::Send(self.read(change, announcement))
    }

    /// A change read from the feed (or delivered in order): what to send now. A content change
    /// of a document the device syncs live is held back, unless it holds it already; anything
    /// else goes out after every held-back announcement before it that the device does not
    /// hold yet, in feed order, so the device's cursor never passes a change it lacks.
    pub fn read(&mut self, change: Change, announcement: A) -> Vec<A> {
        if change.seq <= self.announced {
            return Vec::new();
        }
        if change.content && self.joined.contains(&change.doc) {
            // Not announced yet: the position announced only ever covers what was sent.
            if !self.holds_at(&change.doc, change.seq) {
                self.deferred.insert(change.doc, (change.seq, announcement));
            }
            return Vec::new();
        }
        let due: Vec<DocId> =
            self.deferred.iter().filter(|(_, (at, _))| *at < change.seq).map(|(d, _)| *d).collect();
        let mut owed: Vec<(Seq, A)> = due
            .into_iter()
            .filter_map(|doc| {
                self.deferred.remove(&doc).filter(|(at, _)| !self.holds_at(&doc, *at))
            })
            .collect();
        owed.sort_by_key(|(at, _)| *at);
        self.announced = change.seq;
        owed.into_iter().map(|(_, a)| a).chain([announcement]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocId {
        DocId::from_bytes([n; 16])
    }

    fn change(n: u8, seq: u64, content: bool) -> Change {
        Change { doc: doc(n), seq: Seq(seq), content }
    }

    #[test]
    fn announcements_in_order_are_sent_and_a_skipped_position_reads_the_feed() {
        let mut told: Told<u64> = Told::from(Seq(4));
        told.read_to(Seq(4));
        // (position, partial, what comes out)
        let table = [
            (5, false, Heard::Send(vec![5])),
            (5, false, Heard::Send(vec![])),
            (7, false, Heard::ReadFeed),
            (6, false, Heard::Send(vec![])),
            (8, true, Heard::ReadFeed),
            (9, false, Heard::Send(vec![9])),
        ];
        for (seq, partial, want) in table {
            assert_eq!(told.heard(change(1, seq, false), partial, seq), want, "position {seq}");
        }
    }

    #[test]
    fn a_live_document_s_change_is_held_back_until_a_later_one_unless_the_device_holds_it() {
        let mut told: Told<u64> = Told::default();
        told.join(doc(1));
        told.join(doc(2));
        // Content changes of documents it syncs live: held back.
        assert!(told.read(change(1, 1, true), 1).is_empty());
        assert!(told.read(change(2, 2, true), 2).is_empty());
        // The device holds document 2's: it need not hear of it.
        told.holds(doc(2), Seq(2));
        // Another document changes: document 1's goes first, in feed order; 2's not at all.
        assert_eq!(told.read(change(3, 3, true), 3), vec![1, 3]);
        // A metadata change of a live document is never held back.
        assert_eq!(told.read(change(1, 4, false), 4), vec![4]);
        assert_eq!(told.announced(), Seq(4));
        // Nothing is announced twice.
        assert!(told.read(change(3, 3, true), 3).is_empty());
    }

    #[test]
    fn only_the_latest_held_back_change_of_a_document_is_kept() {
        let mut told: Told<u64> = Told::default();
        told.join(doc(1));
        assert!(told.read(change(1, 1, true), 1).is_empty());
        assert!(told.read(change(1, 2, true), 2).is_empty());
        assert_eq!(told.read(change(2, 3, true), 3), vec![2, 3]);
        // A pushed catch-up counts as announced.
        told.pushed(doc(4), Seq(9));
        assert!(told.joined(&doc(4)));
        assert!(told.read(change(5, 8, true), 8).is_empty());
    }
}
