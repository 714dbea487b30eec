//! A document as the server keeps it: its change graph, which answers sync and says what to
//! store, and its content, an Automerge document brought up to date only when a feature reads
//! or writes it.
//!
//! Taking in a device's change costs the graph's check and index (microseconds, whatever the
//! document's size); applying it to the content costs Automerge time that grows with the object
//! it edits. So the server acknowledges, stores and relays changes from the graph
//! ([`LazyDoc`] is a [`Replica`]), and applies them to the content in one batch when a business
//! read or write, an export or a compaction asks for it ([`LazyDoc::content`]).
//!
//! The content holds every change whose bytes the graph does not keep (a loaded snapshot's,
//! which the graph indexes by their metadata alone, and every change once a compaction has
//! brought the content up to date), so it is the graph's [`Archive`](crate::graph::Archive):
//! the graph keeps the bytes of the changes since the last compaction only.
//!
//! A device with nothing gets the last snapshot (made when such a device asks, if the last one
//! lacks much) and the changes since, as Automerge sends a new peer its whole document.
//!
//! A change the graph takes in passed its structural check (it parses, its hash is its bytes',
//! its sequence number follows its actor's previous change); Automerge may still refuse to
//! apply it (the graph refuses what is known to make Automerge panic: see
//! `graph::objects`). Then [`LazyDoc::content`] fails for the document with
//! [`ContentError::Refused`] and the content stays as it was (Automerge works on a copy), so
//! later calls fail the same way: nothing stored is dropped, and the history still syncs.

use automerge::sync::{Message, State};
use automerge::{Automerge, Change, ChangeHash};

use crate::graph::{ChangeGraph, GraphError, Snapshot};
use crate::history::{Content, LoadError};
use crate::session::{Replica, SyncError};

/// A document kept as its change graph, its content applied on demand. See the module's
/// documentation.
#[derive(Debug, Default)]
pub struct LazyDoc {
    graph: ChangeGraph,
    /// Every change whose bytes the graph does not keep, and perhaps later ones: never a change
    /// the graph does not hold.
    content: Automerge,
    /// Why Automerge refused to bring the content up to date: it is not tried again.
    refused: Option<String>,
    /// The last snapshot loaded or made, with its heads: a new device gets it in place of the
    /// changes one by one.
    snapshot: Option<(Vec<ChangeHash>, Vec<u8>)>,
}

/// Why a document's content cannot be brought up to date.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// Automerge refuses to apply changes the graph took in (or panics applying them).
    #[error("automerge refuses this document's changes: {0}")]
    Refused(String),
    /// A change in the graph no longer parses (never for a graph's own bytes).
    #[error("a change does not parse: {0}")]
    Graph(#[from] GraphError),
}

impl LazyDoc {
    /// The change graph.
    pub fn graph(&self) -> &ChangeGraph {
        &self.graph
    }

    /// The heads, sorted.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.graph.heads()
    }

    /// How many changes the content lacks: what the next [`LazyDoc::content`] applies.
    pub fn behind(&self) -> usize {
        self.graph.count_after(&self.content.get_heads())
    }

    /// The content, with every change the graph holds applied (in one batch).
    pub fn content(&mut self) -> Result<&Automerge, ContentError> {
        self.catch_up()?;
        Ok(&self.content)
    }

    /// Changes the content with `edit` (after bringing it up to date), and takes the changes
    /// it made into the graph.
    pub fn edit<T>(&mut self, edit: impl FnOnce(&mut Automerge) -> T) -> Result<T, ContentError> {
        self.catch_up()?;
        let before = self.graph.heads();
        let made = edit(&mut self.content);
        let changes = self.content.get_changes(&before);
        if let Err(err) = self.graph.add_checked(changes, &self.content) {
            // The content holds no change the graph does not: it goes back to what it was.
            if let Ok(was) = self.content.fork_at(&before) {
                self.content = was;
            }
            return Err(err.into());
        }
        Ok(made)
    }

    fn catch_up(&mut self) -> Result<(), ContentError> {
        let heads = self.content.get_heads();
        if heads == self.graph.heads() {
            return Ok(());
        }
        if let Some(why) = &self.refused {
            return Err(ContentError::Refused(why.clone()));
        }
        let run = self
            .graph
            .save_after(&heads, &self.content)
            .expect("the content holds every change whose bytes the graph does not keep");
        let changes = crate::graph::chunks(&run)?
            .into_iter()
            .map(|(_, chunk)| Change::try_from(chunk).map_err(|e| GraphError::Parse(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        // Automerge may apply part of a batch it refuses, or panic midway: it works on a copy.
        let mut content = self.content.clone();
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            content.apply_changes(changes)
        }));
        let why = match applied {
            Ok(Ok(())) if content.get_heads() == self.graph.heads() => {
                self.content = content;
                return Ok(());
            }
            Ok(Ok(())) => "changes were left out".to_owned(),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "automerge panicked".to_owned(),
        };
        self.refused = Some(why.clone());
        Err(ContentError::Refused(why))
    }
}

impl Replica for LazyDoc {
    fn heads(&self) -> Vec<ChangeHash> {
        self.graph.heads()
    }

    fn has_change(&self, hash: &ChangeHash) -> bool {
        self.graph.has(hash)
    }

    fn nothing_waits(&self) -> bool {
        self.graph.settled()
    }

    fn generate_message(&self, state: &mut State) -> Option<Message> {
        let snapshot = self.snapshot.as_ref().map(|(heads, bytes)| Snapshot { heads, bytes });
        self.graph.generate_sync_message_from(state, &self.content, snapshot)
    }

    fn receive_message(&mut self, state: &mut State, message: Message) -> Result<(), SyncError> {
        // A peer with nothing that reads version 2 (it sends the flags) is sent a snapshot:
        // make one now if the last one lacks a third of the changes or more.
        let new_peer = message.heads.is_empty() && message.flags.is_some();
        self.graph
            .receive_sync_message_from(state, message, &self.content)
            .map_err(SyncError::Refused)?;
        let stale = self
            .snapshot
            .as_ref()
            .is_none_or(|(heads, _)| self.graph.count_after(heads) * 3 >= self.graph.len());
        if new_peer && stale && !self.graph.is_empty() {
            // Should Automerge refuse the content, the peer gets the changes one by one.
            let _ = Content::snapshot(self);
        }
        Ok(())
    }
}

impl Content for LazyDoc {
    fn rebuild(snapshot: Option<&[u8]>, run: &[u8]) -> Result<Self, LoadError> {
        let content = match snapshot {
            Some(bytes) => Automerge::load(bytes)?,
            None => Automerge::new(),
        };
        let snapshot = snapshot.map(|bytes| (content.get_heads(), bytes.to_vec()));
        let mut graph = ChangeGraph::from_document(&content)?;
        graph.add_stored_from(run, &content)?;
        let missing = graph.missing();
        if !missing.is_empty() {
            return Err(LoadError::Incomplete(missing.len()));
        }
        Ok(Self { graph, content, refused: None, snapshot })
    }

    fn load_more(&mut self, run: &[u8]) -> Result<(), LoadError> {
        for (document, chunk) in crate::graph::chunks(run)? {
            if document {
                // Another writer's snapshot: its changes, rebuilt from its columns.
                let changes = Automerge::load(chunk)?.get_changes(&[]);
                self.graph.add_recorded(changes, &self.content)?;
            } else {
                self.graph.add_stored_from(chunk, &self.content)?;
            }
        }
        Ok(())
    }

    fn heads(&self) -> Vec<ChangeHash> {
        self.graph.heads()
    }

    fn changes_after(&self, heads: &[ChangeHash]) -> Vec<u8> {
        self.graph
            .save_after(heads, &self.content)
            .expect("the content holds every change whose bytes the graph does not keep")
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, LoadError> {
        self.catch_up().map_err(|err| match err {
            ContentError::Refused(why) => LoadError::Refused(why),
            ContentError::Graph(err) => LoadError::Graph(err),
        })?;
        // The content holds every change now: the graph need not keep their bytes too.
        self.graph.archive_until(&self.content.get_heads());
        let saved = self.content.save();
        self.snapshot = Some((self.content.get_heads(), saved.clone()));
        Ok(saved)
    }

    fn operations(&self) -> u64 {
        use automerge::ReadDoc;
        self.content.stats().num_ops
    }
}

#[cfg(test)]
mod tests;
