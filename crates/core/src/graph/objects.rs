//! What the operations of a graph's changes made, so that each new change is checked against
//! it: the objects (and whether each is a map or a sequence) and the elements inserted into
//! each sequence.
//!
//! A change whose structure is sound can still name what does not exist, and Automerge 0.12
//! panics applying one that does: an operation on an object nobody made (or on an id that made
//! a value, not an object), a sequence position in a map, an insertion after an element the
//! sequence never had, an object made at such a position; and an insertion into a map breaks
//! the order of its operations (a debug assertion; release builds go on with the document out
//! of order). What no Automerge library makes is refused too (a key in a sequence, an operation
//! at a sequence's head that inserts nothing), so that the check stays simple: every position
//! must exist. The graph relays changes it has not applied, so it refuses those before
//! any peer can receive them. `crates/fuzz`'s `graph_ops` target compares this check with
//! Automerge's apply.
//!
//! Elements are kept as runs of counters per sequence and actor: typing inserts consecutive
//! counters, so a long text typed by a few people is a few runs.

use std::collections::{BTreeMap, HashMap};

use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType};
use automerge::{ActorId, Change, ObjType};

use super::{Archive, GraphError};

/// What an object's positions are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A map (or table): positions are keys.
    Map,
    /// A list or text: positions are elements.
    Seq,
}

impl From<ObjType> for Kind {
    fn from(t: ObjType) -> Self {
        match t {
            ObjType::Map | ObjType::Table => Self::Map,
            ObjType::List | ObjType::Text => Self::Seq,
        }
    }
}

/// An operation's id, its actor by index.
type Id = (u64, u32);

/// How to undo one thing [`Objects::take_in`] recorded.
#[derive(Clone, Copy, Debug)]
pub(super) enum Undo {
    Object(Id),
    Element { obj: Id, actor: u32, counter: u64 },
}

/// The objects and elements the graph's own changes made (those in its archive are asked of
/// the archive).
#[derive(Clone, Debug, Default)]
pub(super) struct Objects {
    actors: HashMap<ActorId, u32>,
    kinds: HashMap<Id, Kind>,
    /// Per sequence, per actor: the counters of the elements it inserted, as runs
    /// (start to end, inclusive).
    elements: HashMap<Id, HashMap<u32, BTreeMap<u64, u64>>>,
}

impl Objects {
    fn actor(&mut self, actor: &ActorId) -> u32 {
        let next = self.actors.len() as u32;
        *self.actors.entry(actor.clone()).or_insert(next)
    }

    fn id(&mut self, id: &OpId) -> Id {
        (id.0, self.actor(&id.1))
    }

    /// Checks `change`'s operations against what exists (here or in `archive`) and records
    /// what they make, with how to undo it in `undo`. Unless `strict`, every operation is
    /// recorded whatever the check says (stored history: a document stored before a rule was
    /// made must still be edited), and the first refusal is returned after. Strict, the first
    /// refusal stops it; what it recorded is in `undo`.
    pub(super) fn take_in(
        &mut self,
        change: &Change,
        archive: &impl Archive,
        undo: &mut Vec<Undo>,
        strict: bool,
    ) -> Result<(), GraphError> {
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode()))
            .map_err(|_| GraphError::Parse("a change's operations do not decode".into()))?;
        let actor = self.actor(change.actor_id());
        let mut refused = None;
        for (i, op) in decoded.operations.iter().enumerate() {
            if let Err(err) = self.check(op, archive) {
                if strict {
                    return Err(err);
                }
                refused.get_or_insert(err);
            }
            let id = (decoded.start_op.get().saturating_add(i as u64), actor);
            if let OpType::Make(t) = op.action {
                self.kinds.insert(id, t.into());
                undo.push(Undo::Object(id));
            }
            if let (true, ObjectId::Id(obj)) = (op.insert, &op.obj) {
                let obj = self.id(obj);
                let runs = self.elements.entry(obj).or_default().entry(actor).or_default();
                add(runs, id.0);
                undo.push(Undo::Element { obj, actor, counter: id.0 });
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// Whether `op` names only what exists, and is a kind of operation Automerge makes.
    fn check(&mut self, op: &Op, archive: &impl Archive) -> Result<(), GraphError> {
        let bad = |why: &'static str| Err(GraphError::Operation(why));
        let (obj, kind) = match &op.obj {
            ObjectId::Root => (None, Kind::Map),
            ObjectId::Id(obj) => {
                let key = self.id(obj);
                let kind = match self.kinds.get(&key) {
                    Some(kind) => *kind,
                    None => match archive.object_kind(obj) {
                        Some(kind) => kind,
                        None => return bad("no such object"),
                    },
                };
                (Some((key, obj)), kind)
            }
        };
        if op.insert
            && (!op.pred.is_empty() || !matches!(op.action, OpType::Put(_) | OpType::Make(_)))
        {
            return bad("an insertion that overwrites or deletes");
        }
        match (&op.key, kind, obj) {
            (Key::Map(_), Kind::Map, _) if op.insert => bad("an insertion into a map"),
            (Key::Map(_), Kind::Map, _) => Ok(()),
            (Key::Seq(ElementId::Head), Kind::Seq, _) if !op.insert => {
                bad("a position at the head of a sequence that inserts nothing")
            }
            (Key::Seq(ElementId::Head), Kind::Seq, _) => Ok(()),
            // An insertion goes after the element, anything else acts on it.
            (Key::Seq(ElementId::Id(elem)), Kind::Seq, Some((key, obj))) => {
                if self.has_element(key, elem, obj, archive) {
                    Ok(())
                } else {
                    bad("a position the sequence never had")
                }
            }
            (Key::Map(_), Kind::Seq, _) => bad("a key in a sequence"),
            (Key::Seq(_), _, _) => bad("a sequence position in a map"),
        }
    }

    fn has_element(
        &mut self,
        obj: Id,
        elem: &OpId,
        raw_obj: &OpId,
        archive: &impl Archive,
    ) -> bool {
        let (counter, actor) = self.id(elem);
        let runs = self.elements.get(&obj).and_then(|by_actor| by_actor.get(&actor));
        let here = runs
            .and_then(|runs| runs.range(..=counter).next_back())
            .is_some_and(|(_, &end)| counter <= end);
        here || archive.has_element(raw_obj, elem)
    }

    /// Undoes what [`Objects::take_in`] recorded, last first.
    pub(super) fn undo(&mut self, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Object(id) => _ = self.kinds.remove(&id),
                Undo::Element { obj, actor, counter } => {
                    if let Some(runs) = self.elements.get_mut(&obj).and_then(|a| a.get_mut(&actor))
                    {
                        remove(runs, counter);
                    }
                }
            }
        }
    }
}

/// Adds `counter` to the runs, joining its neighbours.
fn add(runs: &mut BTreeMap<u64, u64>, counter: u64) {
    let before = runs.range(..=counter).next_back().map(|(&s, &e)| (s, e));
    if before.is_some_and(|(_, end)| counter <= end) {
        return;
    }
    let mut start = counter;
    if let Some((s, end)) = before
        && end.checked_add(1) == Some(counter)
    {
        start = s;
    }
    let mut end = counter;
    if let Some(next) = counter.checked_add(1)
        && let Some(after) = runs.remove(&next)
    {
        end = after;
    }
    runs.insert(start, end);
}

/// Removes `counter` from the runs, splitting the one it is in.
fn remove(runs: &mut BTreeMap<u64, u64>, counter: u64) {
    let Some((start, end)) = runs.range(..=counter).next_back().map(|(&s, &e)| (s, e)) else {
        return;
    };
    if counter > end {
        return;
    }
    runs.remove(&start);
    if start < counter {
        runs.insert(start, counter - 1);
    }
    if counter < end {
        runs.insert(counter + 1, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_and_split() {
        let mut runs = BTreeMap::new();
        for c in [5, 7, 6, 1, 2, 9] {
            add(&mut runs, c);
        }
        assert_eq!(runs, BTreeMap::from([(1, 2), (5, 7), (9, 9)]));
        remove(&mut runs, 6);
        assert_eq!(runs, BTreeMap::from([(1, 2), (5, 5), (7, 7), (9, 9)]));
        remove(&mut runs, 9);
        remove(&mut runs, 3);
        add(&mut runs, 6);
        assert_eq!(runs, BTreeMap::from([(1, 2), (5, 7)]));
    }
}
