//! Where a graph made from a document finds what it does not keep itself.

use std::collections::HashMap;

use automerge::legacy::OpId;
use automerge::{Change, ChangeHash};

use super::Kind;

/// The changes a graph made from a document ([`ChangeGraph::from_document`](super::ChangeGraph::from_document)) does not keep: that
/// document, which holds their bytes and what their operations made.
pub trait Archive {
    /// The bytes of these changes, in this order; `None` when one of them is not here.
    fn change_bytes(&self, hashes: &[ChangeHash]) -> Option<Vec<Vec<u8>>>;
    /// The kind of the object `obj` made, if it made one here.
    fn object_kind(&self, obj: &OpId) -> Option<Kind>;
    /// Whether the sequence `obj` ever had the element `elem` (deleted or not).
    fn has_element(&self, obj: &OpId, elem: &OpId) -> bool;
}

impl Archive for automerge::Automerge {
    fn object_kind(&self, obj: &OpId) -> Option<Kind> {
        use automerge::ReadDoc;
        let obj = self.import_obj(&format!("{}@{}", obj.0, obj.1)).ok()?;
        self.object_type(&obj).ok().map(Kind::from)
    }

    fn has_element(&self, obj: &OpId, elem: &OpId) -> bool {
        use automerge::ReadDoc;
        let Ok(obj) = self.import_obj(&format!("{}@{}", obj.0, obj.1)) else { return false };
        let Ok(cursor) = automerge::Cursor::try_from(format!("{}@{}", elem.0, elem.1)) else {
            return false;
        };
        // Automerge 0.12 asserts that a cursor's operation is in the sequence it names: one
        // made elsewhere panics (the `graph_ops` fuzz target found it). Reading leaves the
        // document as it was.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.get_cursor_position(&obj, &cursor, None).is_ok()
        }))
        .unwrap_or(false)
    }

    fn change_bytes(&self, hashes: &[ChangeHash]) -> Option<Vec<Vec<u8>>> {
        use automerge::ReadDoc;
        // One change at a time is rebuilt from the document's columns each; many at once
        // (a new device's first copy) are rebuilt in one pass.
        if hashes.len() <= 16 {
            return hashes
                .iter()
                .map(|h| self.get_change_by_hash(h).map(|c| c.raw_bytes().to_vec()))
                .collect();
        }
        let mut all: HashMap<ChangeHash, Change> =
            self.get_changes(&[]).into_iter().map(|c| (c.hash(), c)).collect();
        hashes.iter().map(|h| all.remove(h).map(|c| c.raw_bytes().to_vec())).collect()
    }
}

/// No archive: a graph that keeps every change's bytes and knows what each made.
impl Archive for () {
    fn change_bytes(&self, hashes: &[ChangeHash]) -> Option<Vec<Vec<u8>>> {
        hashes.is_empty().then(Vec::new)
    }

    fn object_kind(&self, _: &OpId) -> Option<Kind> {
        None
    }

    fn has_element(&self, _: &OpId, _: &OpId) -> bool {
        false
    }
}
