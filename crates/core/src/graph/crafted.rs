//! Changes no Automerge library makes, crafted for tests: a real change, decoded, edited as
//! JSON, and encoded again (with the hash of its new bytes).

use automerge::{Automerge, Change};
use serde_json::{Value, json};

/// `doc`'s last change by its own actor, with `edit` made to its first operation. `{actor}` in
/// a string stands for the change's actor.
pub(crate) fn first_op(doc: &Automerge, edit: &[(&str, Value)]) -> Change {
    let last = doc.get_last_local_change().expect("the document made a change");
    rewritten(&last, |change| {
        let actor = change["actor"].as_str().expect("an actor").to_owned();
        let op = change["ops"][0].as_object_mut().expect("an operation");
        for (field, value) in edit {
            match value {
                Value::Null => _ = op.remove(*field),
                Value::String(s) => {
                    _ = op.insert((*field).into(), json!(s.replace("{actor}", &actor)));
                }
                other => _ = op.insert((*field).into(), other.clone()),
            }
        }
    })
}

/// `change` with `edit` made to it as JSON (`ExpandedChange`'s form).
pub(crate) fn rewritten(change: &Change, edit: impl FnOnce(&mut Value)) -> Change {
    let mut json = serde_json::to_value(change.decode()).expect("a change is JSON");
    json.as_object_mut().expect("an object").remove("hash");
    edit(&mut json);
    let expanded: automerge::ExpandedChange = serde_json::from_value(json).expect("still a change");
    Change::from(expanded)
}
